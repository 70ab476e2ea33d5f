r"""Synapse dynamics: :class:`Expon`, :class:`Alpha`, :class:`DualExpon` and the short-term plasticity
models :class:`STD` and :class:`STP`.

Each is a per-unit linear (or, for STD/STP, spike-gated) recurrence of ``brainstate.HiddenState``
values, integrated with the exponential Euler step of ``brainpy.state`` (``dt`` from
``brainstate.environ.get_dt()``, :math:`\beta = e^{-\Delta t/\tau}`). An ETP op feeding the input
drives every state of a unit only through that unit's own dynamics, so its weights get the exact
``D_RTRL`` trace (the states of a unit form one hidden group).

The constructors accept the keywords of ``brainpy.state`` (the published ``braintrace.nn`` forwards
these names there); the positional order after ``in_size`` puts the time constants first, where
``brainpy.state`` has ``name`` second. Conductance initialisers default to the plain ``ZeroInit()``
(``brainpy.state``: ``Constant(0. * u.mS)``).
"""

from __future__ import annotations

import numbers
from typing import Optional

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u

from ._common import (
    Size,
    check_time_constant,
    check_trailing_shape,
    decay_factor,
    init_state,
    pick_alias,
    to_dimensionless,
    to_size,
)

__all__ = ["Expon", "Alpha", "DualExpon", "STD", "STP"]

init = brainstate.nn.init

_ZERO_INIT = init.ZeroInit()  # the default initialiser object, so that an alias can tell it was not given


class _Synapse(brainstate.nn.Module):
    def _setup_size(self, in_size):
        self.in_size = to_size(in_size, "in_size", type(self).__name__)
        self.out_size = self.varshape = self.in_size

    def _tau(self, tau, name):
        return check_time_constant(tau, name, type(self).__name__)

    def _new(self, init_, batch_size, what):
        return init_state(init_, self.varshape, batch_size, type(self).__name__, what)

    def _decay(self, tau, like, name="tau"):
        return decay_factor(tau, u.math.get_dtype(like), type(self).__name__, name)

    def _check_input(self, x):
        check_trailing_shape(x, self.varshape, type(self).__name__)


class Expon(_Synapse):
    r"""Exponential synapse: :math:`g_t = e^{-\Delta t/\tau}\, g_{t-1} + x_t` (as ``brainstate.nn.Expon``).

    A single-state leaky unit: an ETP op feeding ``x`` makes its weights relations with the exact
    D-RTRL trace (``D = e^{-dt/tau}``).

    Parameters
    ----------
    in_size : int or tuple of int
    tau : time constant
        Decay time constant; default ``8. * u.ms`` (``dt`` from ``brainstate.environ.get_dt()``, same
        dimension). Non-positive: ``ValueError``.
    g_init : initializer or array; default ``ZeroInit()``
    name : str, optional
    g_initializer : initializer or array, optional
        Alias of ``g_init`` (the keyword of ``brainpy.state.Expon`` / braintrace 0.2).

    States
    ------
    g : brainstate.HiddenState, shape ``(batch, *in_size)`` or ``in_size``

    Examples
    --------
    >>> import jax.numpy as jnp, brainstate, saiunit as u, braintrace
    >>> with brainstate.environ.context(dt=1. * u.ms):
    ...     syn = braintrace.nn.Expon(3, tau=10. * u.ms); syn.init_state()
    ...     _ = syn(jnp.ones(3)); g = syn(jnp.zeros(3))
    >>> round(float(g[0]), 4)
    0.9048
    """

    def __init__(
        self,
        in_size: Size,
        tau=8.0 * u.ms,
        g_init=_ZERO_INIT,
        name: Optional[str] = None,
        *,
        g_initializer=None,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        self._setup_size(in_size)
        self.tau = self._tau(tau, "tau")
        self.g_init = pick_alias(g_init, _ZERO_INIT, g_initializer, "g_init", "g_initializer", owner)

    def init_state(self, batch_size: Optional[int] = None, **kwargs):
        self.g = brainstate.HiddenState(self._new(self.g_init, batch_size, "g_init"))

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        self.g.value = self._new(self.g_init, batch_size, "g_init")

    def update(self, x=None):
        g = self.g.value
        g = self._decay(self.tau, g) * g
        if x is not None:
            self._check_input(x)
            g = g + x
        self.g.value = g
        return g


class Alpha(_Synapse):
    r"""Alpha synapse: a rise variable ``h`` fed by the input and the conductance ``g`` it drives
    (as ``brainpy.state.Alpha``), :math:`\tau \dot h = -h`, :math:`\tau \dot g = -g + h`.

    One exponential Euler step (:math:`\beta = e^{-\Delta t/\tau}`; ``g`` reads the previous ``h``):

    .. math::
        g_t = \beta\, g_{t-1} + (1 - \beta)\, h_{t-1}, \qquad h_t = \beta\, h_{t-1} + x_t;
        \qquad \text{output } g_t.

    ``g`` and ``h`` form one hidden group per unit (:math:`D = [[\beta, 1-\beta], [0, \beta]]`); the
    input reaches the output one step later, through ``h``.

    Parameters
    ----------
    in_size : int or tuple of int
    tau : time constant; default ``8. * u.ms``
    g_init : initializer or array
        Initial value of both ``g`` and ``h``; default ``ZeroInit()``.
    name : str, optional
    g_initializer : initializer or array, optional
        Alias of ``g_init`` (the keyword of ``brainpy.state.Alpha``).

    States
    ------
    g, h : brainstate.HiddenState, shape ``(batch, *in_size)`` or ``in_size``

    Examples
    --------
    >>> import jax.numpy as jnp, brainstate, saiunit as u, braintrace
    >>> with brainstate.environ.context(dt=1. * u.ms):
    ...     syn = braintrace.nn.Alpha(2, tau=4. * u.ms); syn.init_state()
    ...     g = [float(syn(jnp.ones(2) if t == 0 else jnp.zeros(2))[0]) for t in range(3)]
    >>> [round(v, 4) for v in g]
    [0.0, 0.2212, 0.3445]
    """

    def __init__(
        self,
        in_size: Size,
        tau=8.0 * u.ms,
        g_init=_ZERO_INIT,
        name: Optional[str] = None,
        *,
        g_initializer=None,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        self._setup_size(in_size)
        self.tau = self._tau(tau, "tau")
        self.g_init = pick_alias(g_init, _ZERO_INIT, g_initializer, "g_init", "g_initializer", owner)

    def init_state(self, batch_size: Optional[int] = None, **kwargs):
        self.g = brainstate.HiddenState(self._new(self.g_init, batch_size, "g_init"))
        self.h = brainstate.HiddenState(self._new(self.g_init, batch_size, "g_init"))

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        self.g.value = self._new(self.g_init, batch_size, "g_init")
        self.h.value = self._new(self.g_init, batch_size, "g_init")

    def update(self, x=None):
        g, h = self.g.value, self.h.value
        beta = self._decay(self.tau, g)
        new_g = beta * g + (1 - beta) * h
        new_h = beta * h
        if x is not None:
            self._check_input(x)
            new_h = new_h + x
        self.g.value = new_g
        self.h.value = new_h
        return new_g


class DualExpon(_Synapse):
    r"""Dual-exponential synapse (as ``brainpy.state.DualExpon``): a rise and a decay component fed by
    the same input, their difference scaled to a peak of ``amplitude``.

    .. math::
        r_t = \beta_r r_{t-1} + x_t, \qquad d_t = \beta_d d_{t-1} + x_t, \qquad
        \text{output } A\, c\, (d_t - r_t),

    with :math:`\beta_{r,d} = e^{-\Delta t/\tau_{rise,decay}}`, ``A`` = ``amplitude`` and, when
    ``normalize`` is true, :math:`c = \frac{\tau_d}{\tau_d - \tau_r}
    \left(\frac{\tau_r}{\tau_d}\right)^{\tau_r/(\tau_r - \tau_d)}`, the inverse of the peak of
    :math:`e^{-t/\tau_d} - e^{-t/\tau_r}` (``c = 1`` otherwise).

    Two hidden states per unit (``g_rise`` = ``r``, ``g_decay`` = ``d``), each a leaky unit of its own.

    Parameters
    ----------
    in_size : int or tuple of int
    tau_decay : time constant; default ``10. * u.ms``
    tau_rise : time constant; default ``1. * u.ms``
    amplitude : number, array or quantity; default 1
    normalize : bool
        Scale the waveform to a peak of ``amplitude`` (default True); then ``tau_decay`` must differ
        from ``tau_rise`` (``ValueError``; use :class:`Alpha` for equal time constants).
    g_init : initializer or array
        Initial value of both components; default ``ZeroInit()``.
    name : str, optional
    g_initializer : initializer or array, optional
        Alias of ``g_init`` (the keyword of ``brainpy.state.DualExpon``).

    States
    ------
    g_rise, g_decay : brainstate.HiddenState, shape ``(batch, *in_size)`` or ``in_size``

    Examples
    --------
    >>> import jax.numpy as jnp, brainstate, saiunit as u, braintrace
    >>> with brainstate.environ.context(dt=1. * u.ms):
    ...     syn = braintrace.nn.DualExpon(2, tau_decay=10. * u.ms, tau_rise=1. * u.ms); syn.init_state()
    ...     g = [float(syn(jnp.ones(2) if t == 0 else jnp.zeros(2))[0]) for t in range(3)]
    >>> [round(v, 4) for v in g]
    [0.0, 0.7706, 0.9807]
    """

    def __init__(
        self,
        in_size: Size,
        tau_decay=10.0 * u.ms,
        tau_rise=1.0 * u.ms,
        amplitude=1.0,
        normalize: bool = True,
        g_init=_ZERO_INIT,
        name: Optional[str] = None,
        *,
        g_initializer=None,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        self._setup_size(in_size)
        self.tau_decay = self._tau(tau_decay, "tau_decay")
        self.tau_rise = self._tau(tau_rise, "tau_rise")
        self.amplitude = amplitude
        self.normalize = bool(normalize)
        self.g_init = pick_alias(g_init, _ZERO_INIT, g_initializer, "g_init", "g_initializer", owner)
        if self.normalize:
            ratio = u.get_mantissa(self._ratio())
            if not isinstance(ratio, jax.core.Tracer) and np.any(np.asarray(ratio) == 1.0):
                raise ValueError(
                    f"{owner}: `tau_decay` must differ from `tau_rise` when normalize=True (got "
                    f"{tau_decay} and {tau_rise}); use braintrace.nn.Alpha for equal time constants, "
                    f"or normalize=False."
                )

    def _ratio(self):
        """:math:`\\tau_r / \\tau_d` as a plain number or array."""
        return to_dimensionless(self.tau_rise / self.tau_decay, type(self).__name__, "tau_rise / tau_decay")

    def scale(self, dtype=None):
        """The output scale :math:`A c` (``c`` the peak normalisation, 1 when ``normalize`` is False)."""
        if not self.normalize:
            return self.amplitude
        r = jnp.asarray(self._ratio(), dtype=dtype)
        return self.amplitude * (r ** (r / (r - 1)) / (1 - r))

    def init_state(self, batch_size: Optional[int] = None, **kwargs):
        self.g_rise = brainstate.HiddenState(self._new(self.g_init, batch_size, "g_init"))
        self.g_decay = brainstate.HiddenState(self._new(self.g_init, batch_size, "g_init"))

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        self.g_rise.value = self._new(self.g_init, batch_size, "g_init")
        self.g_decay.value = self._new(self.g_init, batch_size, "g_init")

    def update(self, x=None):
        rise, dec = self.g_rise.value, self.g_decay.value
        rise = self._decay(self.tau_rise, rise, "tau_rise") * rise
        dec = self._decay(self.tau_decay, dec, "tau_decay") * dec
        if x is not None:
            self._check_input(x)
            rise, dec = rise + x, dec + x
        self.g_rise.value = rise
        self.g_decay.value = dec
        return self.scale(u.math.get_dtype(dec)) * (dec - rise)


def _check_fraction(U, owner):
    """``U`` unchanged after checking (when concrete) that it lies in ``[0, 1]``."""
    if isinstance(U, u.Quantity):
        U = to_dimensionless(U, owner, "`U`")
    if isinstance(U, jax.core.Tracer):
        return U
    values = np.asarray(U)
    if not np.issubdtype(values.dtype, np.number) or values.size == 0 or np.any((values < 0) | (values > 1)):
        raise ValueError(f"{owner}: `U` must be a number or array in [0, 1], got {U!r}.")
    return U if isinstance(U, (numbers.Number, jax.Array)) else jnp.asarray(U)


class STD(_Synapse):
    r"""Short-term depression (as ``brainpy.state.STD``): the fraction ``x`` of available resources
    recovers to 1 with time constant ``tau`` and each presynaptic spike ``s`` uses the fraction ``U``.

    .. math::
        \tilde x = 1 - \beta (1 - x_{t-1}), \qquad \text{output } \tilde x\, s_t, \qquad
        x_t = \tilde x - U\, x_{t-1}\, s_t, \qquad \beta = e^{-\Delta t/\tau}.

    (The depletion reads the previous ``x``, as in ``brainpy.state``.) ``x`` starts at 1. The input
    may be any real signal: an ETP op feeding ``s`` gets the exact ``D_RTRL`` trace, with
    :math:`D = \beta - U s_t` per unit.

    Parameters
    ----------
    in_size : int or tuple of int
    tau : time constant; default ``200. * u.ms``
    U : number or array in [0, 1]; default 0.07
    name : str, optional

    States
    ------
    x : brainstate.HiddenState, shape ``(batch, *in_size)`` or ``in_size``

    Examples
    --------
    >>> import jax.numpy as jnp, brainstate, saiunit as u, braintrace
    >>> with brainstate.environ.context(dt=1. * u.ms):
    ...     std = braintrace.nn.STD(2, tau=100. * u.ms, U=0.5); std.init_state()
    ...     out = [float(std(jnp.ones(2))[0]) for _ in range(3)]
    >>> [round(v, 4) for v in out]
    [1.0, 0.505, 0.2624]
    """

    def __init__(self, in_size: Size, tau=200.0 * u.ms, U=0.07, name: Optional[str] = None):
        super().__init__(name=name)
        self._setup_size(in_size)
        self.tau = self._tau(tau, "tau")
        self.U = _check_fraction(U, type(self).__name__)

    def _x0(self, batch_size):
        return self._new(init.Constant(1.0), batch_size, "x")

    def init_state(self, batch_size: Optional[int] = None, **kwargs):
        self.x = brainstate.HiddenState(self._x0(batch_size))

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        self.x.value = self._x0(batch_size)

    def update(self, pre_spike):
        self._check_input(pre_spike)
        x = self.x.value
        beta = self._decay(self.tau, x)
        recovered = 1 - beta * (1 - x)
        self.x.value = recovered - self.U * x * pre_spike
        return recovered * pre_spike


class STP(_Synapse):
    r"""Short-term plasticity with facilitation and depression (Tsodyks & Markram; as
    ``brainpy.state.STP``): utilisation ``u`` (starts at ``U``, decays to 0 with ``tau_f``) and
    available resources ``x`` (start at 1, recover to 1 with ``tau_d``).

    .. math::
        \tilde u &= \beta_f\, u_{t-1}, \qquad \tilde x = 1 - \beta_d (1 - x_{t-1}), \\
        u_t &= \tilde u + U (1 - u_{t-1})\, s_t, \qquad \text{output } u_t\, \tilde x\, s_t, \\
        x_t &= \tilde x - u_t\, x_{t-1}\, s_t, \qquad
        \beta_{f,d} = e^{-\Delta t/\tau_{f,d}}.

    ``u`` and ``x`` form one hidden group per unit (``x`` reads ``u_t``); an ETP op feeding ``s`` gets
    the exact ``D_RTRL`` trace.

    Parameters
    ----------
    in_size : int or tuple of int
    U : number or array in [0, 1]; default 0.15
    tau_f : time constant; default ``1500. * u.ms``
    tau_d : time constant; default ``200. * u.ms``
    name : str, optional

    States
    ------
    u, x : brainstate.HiddenState, shape ``(batch, *in_size)`` or ``in_size``

    Examples
    --------
    >>> import jax.numpy as jnp, brainstate, saiunit as u, braintrace
    >>> with brainstate.environ.context(dt=1. * u.ms):
    ...     stp = braintrace.nn.STP(2, U=0.2); stp.init_state()
    ...     out = [float(stp(jnp.ones(2))[0]) for _ in range(2)]
    >>> [round(v, 4) for v in out]
    [0.3599, 0.313]
    """

    def __init__(
        self, in_size: Size, U=0.15, tau_f=1500.0 * u.ms, tau_d=200.0 * u.ms, name: Optional[str] = None
    ):
        super().__init__(name=name)
        self._setup_size(in_size)
        self.U = _check_fraction(U, type(self).__name__)
        self.tau_f = self._tau(tau_f, "tau_f")
        self.tau_d = self._tau(tau_d, "tau_d")

    def _states0(self, batch_size):
        x = self._new(init.Constant(1.0), batch_size, "x")
        return self._new(jnp.broadcast_to(jnp.asarray(self.U, x.dtype), self.varshape), batch_size, "u"), x

    def init_state(self, batch_size: Optional[int] = None, **kwargs):
        u0, x0 = self._states0(batch_size)
        self.u = brainstate.HiddenState(u0)
        self.x = brainstate.HiddenState(x0)

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        self.u.value, self.x.value = self._states0(batch_size)

    def update(self, pre_spike):
        self._check_input(pre_spike)
        last_u, last_x = self.u.value, self.x.value
        beta_f = self._decay(self.tau_f, last_u, "tau_f")
        beta_d = self._decay(self.tau_d, last_x, "tau_d")
        x_rec = 1 - beta_d * (1 - last_x)
        new_u = beta_f * last_u + self.U * (1 - last_u) * pre_spike
        self.u.value = new_u
        self.x.value = x_rec - new_u * last_x * pre_spike
        return new_u * x_rec * pre_spike
