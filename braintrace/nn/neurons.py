r"""Spiking neurons: :class:`LIF`, the non-leaky-to-rest :class:`IF` and the adaptive :class:`ALIF`.

One step (exponential Euler, :math:`\beta = e^{-\Delta t/\tau}`, ``dt`` from
``brainstate.environ.get_dt()``), for :class:`LIF` with input current :math:`I_t`:

.. math::
    s_{t-1} &= \mathrm{spk}\!\left(\frac{V_{t-1} - V_{th}}{V_{th} - V_{reset}}\right)
        \quad\text{(the previous step's spike, recomputed from } V_{t-1}\text{)} \\
    \hat V &= \begin{cases}
        V_{t-1} - (V_{th} - V_{reset})\, s_{t-1} & \texttt{spk\_reset='subtract'} \\
        V_{t-1} - (\mathrm{sg}(V_{t-1}) - V_{reset})\, s_{t-1} & \texttt{spk\_reset='hard'}
        \end{cases} \\
    V_t &= \beta \hat V + (1 - \beta)(V_{rest} + R I_t), \qquad
    s_t = \mathrm{spk}\!\left(\frac{V_t - V_{th}}{V_{th} - V_{reset}}\right).

``sg`` is ``stop_gradient``: a hard reset sets ``V`` to ``V_reset`` without a gradient through the
reset value. The reset is applied at the start of the next step, so the returned spike is a
function of the hidden state's *new* value :math:`V_t`: an online learner sees
:math:`\partial s_t/\partial V_t` through the surrogate, and the reset enters the hidden Jacobian
:math:`\partial V_t/\partial V_{t-1}` (as in ``brainstate.nn.LIF``).

Time constants may be saiunit quantities (``tau=10. * u.ms`` with ``dt=1. * u.ms``) or plain
numbers (then ``dt`` must be a plain number too); a non-positive one raises ``ValueError``.
Voltages and ``R`` are plain numbers by default; quantities work when they are consistent
(``R * I`` in the unit of ``V``).

The constructors also accept the keywords of ``brainpy.state`` / braintrace 0.2 (``V_initializer``,
``a_initializer``); their defaults are plain numbers where those use voltages and resistances
(``V_th=1. * u.mV``, ``R=1. * u.ohm``), so a model written with units passes them explicitly.
"""

from __future__ import annotations

from typing import Callable, Optional

import brainstate
import jax
import jax.numpy as jnp
import saiunit as u

from . import surrogate
from ._common import (
    Size,
    check_time_constant,
    check_trailing_shape,
    decay_factor,
    init_state,
    pick_alias,
    time_ratio,
    to_dimensionless,
    to_size,
)

__all__ = ["LIF", "IF", "ALIF"]

init = brainstate.nn.init

_ZERO_INIT = init.ZeroInit()  # the default initialiser object, so that an alias can tell it was not given

_RESETS = {"subtract": "subtract", "soft": "subtract", "hard": "hard"}


def _reset_mode(spk_reset, owner):
    try:
        return _RESETS[spk_reset]
    except (KeyError, TypeError):
        raise ValueError(
            f"{owner}: `spk_reset` must be 'subtract' (alias 'soft') or 'hard', got {spk_reset!r}."
        ) from None


def _dtype_of(v):
    return jnp.result_type(u.get_mantissa(v))


class _Neuron(brainstate.nn.Module):
    def _setup_common(self, in_size, V_th, V_reset, V_rest, R, tau, spk_fun, spk_reset):
        owner = type(self).__name__
        self.in_size = to_size(in_size, "in_size", owner)
        self.out_size = self.in_size
        self.varshape = self.in_size
        self.tau = check_time_constant(tau, "tau", owner)
        self.V_th, self.V_reset, self.V_rest, self.R = V_th, V_reset, V_rest, R
        if not callable(spk_fun):
            raise TypeError(
                f"{owner}: `spk_fun` must be callable (e.g. braintrace.nn.surrogate.sigmoid), "
                f"got {spk_fun!r}."
            )
        self.spk_fun = spk_fun
        self.spk_reset = _reset_mode(spk_reset, owner)

    def _check_input(self, x):
        check_trailing_shape(x, self.varshape, type(self).__name__)

    def _integrate(self, V, x):
        """Exponential Euler step of ``tau dV/dt = -(V - V_rest) + R x`` from ``V``."""
        decay = decay_factor(self.tau, _dtype_of(V), type(self).__name__)
        return decay * V + (1 - decay) * (self.V_rest + self.R * x)

    def _reset(self, V, spk):
        if self.spk_reset == "subtract":
            return V - (self.V_th - self.V_reset) * spk
        return V - (jax.lax.stop_gradient(V) - self.V_reset) * spk


class LIF(_Neuron):
    r"""Leaky integrate-and-fire neuron (see the module docstring for the update).

    Parameters
    ----------
    in_size : int or tuple of int
        Number (shape) of neurons.
    tau : time constant
        Membrane time constant; default ``5. * u.ms``.
    V_th, V_reset, V_rest : numbers or arrays (or voltages)
        Threshold (default 1), reset value (0) and resting potential (0).
    R : number or array
        Input resistance (default 1).
    tau_ref : time constant, optional
        Refractory period. After a spike at step ``t`` the membrane is not integrated for the next
        ``ceil(tau_ref / dt)`` steps (it keeps its value after the reset); the remaining count, in
        steps, is the non-trainable ``brainstate.ShortTermState`` ``refractory``. ``None``
        (default): no refractoriness.
    spk_fun : callable
        Surrogate spike function of the scaled voltage; default
        :func:`braintrace.nn.surrogate.relu_grad`.
    spk_reset : ``'subtract'`` (alias ``'soft'``) or ``'hard'``
    V_init : initializer or array
        Initial membrane potential; default ``ZeroInit()``.
    name : str, optional
    V_initializer : initializer or array, optional
        Alias of ``V_init`` (the keyword of ``brainpy.state.LIF`` / braintrace 0.2); give one of the two.

    States
    ------
    V : brainstate.HiddenState, shape ``(batch, *in_size)`` or ``in_size``

    Examples
    --------
    >>> import jax.numpy as jnp, brainstate, saiunit as u, braintrace
    >>> with brainstate.environ.context(dt=1. * u.ms):
    ...     lif = braintrace.nn.LIF(3, tau=10. * u.ms); lif.init_state(batch_size=2)
    ...     spikes = lif(jnp.full((2, 3), 30.))
    >>> spikes.shape
    (2, 3)
    """

    def __init__(
        self,
        in_size: Size,
        tau=5.0 * u.ms,
        V_th=1.0,
        V_reset=0.0,
        V_rest=0.0,
        R=1.0,
        tau_ref=None,
        spk_fun: Callable = surrogate.relu_grad,
        spk_reset: str = "subtract",
        V_init=_ZERO_INIT,
        name: Optional[str] = None,
        *,
        V_initializer=None,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        self._setup_common(in_size, V_th, V_reset, V_rest, R, tau, spk_fun, spk_reset)
        self.tau_ref = None if tau_ref is None else check_time_constant(tau_ref, "tau_ref", owner)
        self.V_init = pick_alias(V_init, _ZERO_INIT, V_initializer, "V_init", "V_initializer", owner)

    def _new_V(self, batch_size):
        return init_state(self.V_init, self.varshape, batch_size, type(self).__name__, "V_init")

    def init_state(self, batch_size: Optional[int] = None, **kwargs):
        self.V = brainstate.HiddenState(self._new_V(batch_size))
        if self.tau_ref is not None:
            V = u.get_mantissa(self.V.value)
            self.refractory = brainstate.ShortTermState(jnp.zeros(jnp.shape(V), _dtype_of(V)))

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        self.V.value = self._new_V(batch_size)
        if self.tau_ref is not None:
            self.refractory.value = jnp.zeros_like(self.refractory.value)

    def get_spike(self, V=None):
        """Spikes of ``V`` (default: the current state): ``spk_fun((V - V_th) / (V_th - V_reset))``."""
        V = self.V.value if V is None else V
        scaled = to_dimensionless(
            (V - self.V_th) / (self.V_th - self.V_reset), type(self).__name__, "the scaled voltage"
        )
        return self.spk_fun(scaled)

    def update(self, x=0.0):
        self._check_input(x)
        last_V = self.V.value
        V = self._reset(last_V, self.get_spike(last_V))
        V_int = self._integrate(V, x)
        if self.tau_ref is not None:
            left = self.refractory.value
            V_int = u.math.where(left > 0, V, V_int)
            steps = 1.0 / time_ratio(self.tau_ref, type(self).__name__, "tau_ref")
            fired = jax.lax.stop_gradient(V_int > self.V_th)
            self.refractory.value = jnp.where(fired, jnp.asarray(steps, left.dtype), jnp.maximum(left - 1, 0))
        self.V.value = V_int
        return self.get_spike(V_int)


class IF(LIF):
    r"""Integrate-and-fire neuron: a :class:`LIF` whose membrane relaxes to 0 and resets by the
    threshold (as ``brainpy.state.IF``, the published ``braintrace.nn.IF``).

    .. math::
        s_{t-1} &= \mathrm{spk}\!\left(\frac{V_{t-1} - V_{th}}{V_{th}}\right), \qquad
        \hat V = \begin{cases}
            V_{t-1} - V_{th}\, s_{t-1} & \texttt{spk\_reset='subtract'} \\
            V_{t-1} - \mathrm{sg}(V_{t-1})\, s_{t-1} & \texttt{spk\_reset='hard'}
            \end{cases} \\
        V_t &= \beta \hat V + (1 - \beta) R I_t, \qquad
        s_t = \mathrm{spk}\!\left(\frac{V_t - V_{th}}{V_{th}}\right), \qquad \beta = e^{-\Delta t/\tau},

    i.e. :class:`LIF` with ``V_rest = V_reset = 0`` (in the unit of ``V_th``) and no refractory
    period. One hidden state per neuron: an ETP op feeding ``I`` gets the exact ``D_RTRL`` trace.
    The positional order after ``in_size`` is that of :class:`LIF` (``brainpy.state.IF`` has ``R``
    second); pass the other arguments by keyword.

    Parameters
    ----------
    in_size : int or tuple of int
    tau : time constant; default ``5. * u.ms``
    V_th : number, array or voltage
        Threshold (default 1; must be non-zero, it scales the spike function's argument).
    R : number or array; default 1
    spk_fun, spk_reset, V_init, name, V_initializer
        As :class:`LIF`.

    States
    ------
    V : brainstate.HiddenState, shape ``(batch, *in_size)`` or ``in_size``

    Examples
    --------
    >>> import jax.numpy as jnp, brainstate, saiunit as u, braintrace
    >>> with brainstate.environ.context(dt=1. * u.ms):
    ...     neuron = braintrace.nn.IF(3, tau=8. * u.ms, V_th=1.2); neuron.init_state(batch_size=2)
    ...     spikes = neuron(jnp.full((2, 3), 30.))
    >>> spikes.shape
    (2, 3)
    """

    def __init__(
        self,
        in_size: Size,
        tau=5.0 * u.ms,
        V_th=1.0,
        R=1.0,
        spk_fun: Callable = surrogate.relu_grad,
        spk_reset: str = "subtract",
        V_init=_ZERO_INIT,
        name: Optional[str] = None,
        *,
        V_initializer=None,
    ):
        zero = V_th * 0  # 0 in the unit (and shape) of the threshold
        V_init = pick_alias(V_init, _ZERO_INIT, V_initializer, "V_init", "V_initializer", type(self).__name__)
        super().__init__(
            in_size,
            tau=tau,
            V_th=V_th,
            V_reset=zero,
            V_rest=zero,
            R=R,
            spk_fun=spk_fun,
            spk_reset=spk_reset,
            V_init=V_init,
            name=name,
        )


class ALIF(_Neuron):
    r"""Adaptive LIF neuron: a spike-triggered adaptation ``a`` raises the threshold to
    :math:`V_{th} + \beta_a a`.

    .. math::
        s_{t-1} &= \mathrm{spk}\!\left(
            \frac{V_{t-1} - V_{th} - \beta_a a_{t-1}}{V_{th} - V_{reset}}\right), \\
        \hat V &= \text{reset of } V_{t-1} \text{ by } s_{t-1} \text{ (as in LIF)}, \qquad
        V_t = \beta \hat V + (1-\beta)(V_{rest} + R I_t), \\
        a_t &= \beta_{a}^{\tau} (a_{t-1} + s_{t-1}), \qquad \beta_a^{\tau} = e^{-\Delta t/\tau_a}, \\
        s_t &= \mathrm{spk}\!\left(\frac{V_t - V_{th} - \beta_a a_t}{V_{th} - V_{reset}}\right)
        \quad\text{(as ``brainstate.nn.ALIF``).}

    ``V`` and ``a`` are both ``brainstate.HiddenState`` and form one hidden group of two states per
    neuron (each depends on the other's previous value through :math:`s_{t-1}`).

    Parameters
    ----------
    in_size : int or tuple of int
    tau : time constant; default ``5. * u.ms``
    tau_a : adaptation time constant; default ``100. * u.ms``
    beta : number or array
        Adaptation strength :math:`\beta_a` (default 0.1).
    V_th, V_reset, V_rest, R, spk_fun, spk_reset, V_init, name
        As :class:`LIF`.
    a_init : initializer or array; default ``ZeroInit()``
    V_initializer, a_initializer : initializer or array, optional
        Aliases of ``V_init`` and ``a_init`` (the keywords of ``brainpy.state.ALIF`` / braintrace 0.2).
    """

    def __init__(
        self,
        in_size: Size,
        tau=5.0 * u.ms,
        tau_a=100.0 * u.ms,
        beta=0.1,
        V_th=1.0,
        V_reset=0.0,
        V_rest=0.0,
        R=1.0,
        spk_fun: Callable = surrogate.relu_grad,
        spk_reset: str = "subtract",
        V_init=_ZERO_INIT,
        a_init=_ZERO_INIT,
        name: Optional[str] = None,
        *,
        V_initializer=None,
        a_initializer=None,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        self._setup_common(in_size, V_th, V_reset, V_rest, R, tau, spk_fun, spk_reset)
        self.tau_a = check_time_constant(tau_a, "tau_a", owner)
        self.beta = beta
        self.V_init = pick_alias(V_init, _ZERO_INIT, V_initializer, "V_init", "V_initializer", owner)
        self.a_init = pick_alias(a_init, _ZERO_INIT, a_initializer, "a_init", "a_initializer", owner)

    def _new(self, init_, batch_size, what):
        return init_state(init_, self.varshape, batch_size, type(self).__name__, what)

    def init_state(self, batch_size: Optional[int] = None, **kwargs):
        self.V = brainstate.HiddenState(self._new(self.V_init, batch_size, "V_init"))
        self.a = brainstate.HiddenState(self._new(self.a_init, batch_size, "a_init"))

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        self.V.value = self._new(self.V_init, batch_size, "V_init")
        self.a.value = self._new(self.a_init, batch_size, "a_init")

    def get_spike(self, V=None, a=None):
        """``spk_fun((V - V_th - beta a) / (V_th - V_reset))`` (defaults: the current states)."""
        V = self.V.value if V is None else V
        a = self.a.value if a is None else a
        scaled = (V - self.V_th - self.beta * a) / (self.V_th - self.V_reset)
        return self.spk_fun(to_dimensionless(scaled, type(self).__name__, "the scaled voltage"))

    def update(self, x=0.0):
        self._check_input(x)
        last_V, last_a = self.V.value, self.a.value
        last_spk = self.get_spike(last_V, last_a)
        V = self._integrate(self._reset(last_V, last_spk), x)
        a = decay_factor(self.tau_a, _dtype_of(last_a), type(self).__name__, "tau_a") * (last_a + last_spk)
        self.V.value = V
        self.a.value = a
        return self.get_spike(V, a)
