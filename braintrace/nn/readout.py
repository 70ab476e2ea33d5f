r"""Read-out layers with a trainable input weight: :class:`LeakyRateReadout`, :class:`LeakySpikeReadout`.

Both compute their input current through :func:`braintrace.matmul`, so the weight is a relation
of the read-out's own hidden state (exact under ``D_RTRL``: each read-out unit is a one-state
leaky unit).
"""

from __future__ import annotations

from typing import Callable, Optional

import brainstate
import jax
import saiunit as u

from braintrace._etrace_op import matmul

from . import surrogate
from ._common import (
    Size,
    check_features,
    check_time_constant,
    decay_factor,
    init_state,
    init_weight,
    shape_of,
    to_dimensionless,
    to_size,
)
from .neurons import _reset_mode

__all__ = ["LeakyRateReadout", "LeakySpikeReadout"]

init = brainstate.nn.init


class _Readout(brainstate.nn.Module):
    def _setup(self, in_size, out_size, tau, w_init):
        owner = type(self).__name__
        self.in_size = to_size(in_size, "in_size", owner)
        self.out_size = to_size(out_size, "out_size", owner)
        self.in_features, self.out_features = self.in_size[-1], self.out_size[-1]
        tau = check_time_constant(tau, "tau", owner)
        try:
            self.tau = u.math.broadcast_to(tau, (self.out_features,))
        except ValueError:
            raise ValueError(
                f"{owner}: `tau` of shape {shape_of(tau)} does not broadcast to out_size "
                f"({self.out_features},)."
            ) from None
        self.weight = brainstate.ParamState(
            init_weight(w_init, (self.in_features, self.out_features), owner, "w_init")
        )

    @property
    def W(self) -> brainstate.ParamState:
        """The weight state ``(I, O)`` (the name used by braintrace 0.2; the same object as ``weight``)."""
        return self.weight

    @property
    def decay(self):
        r""":math:`e^{-\Delta t/\tau}`, shape ``(O,)``, with the current ``dt``
        (``brainstate.environ.get_dt()``, read again at every step)."""
        return decay_factor(self.tau, brainstate.environ.dftype(), type(self).__name__)

    def _current(self, x):
        check_features(x, self.in_features, type(self).__name__)
        return matmul(x, self.weight.value)

    def _decay(self, state):
        return decay_factor(self.tau, u.math.get_dtype(state), type(self).__name__)


class LeakyRateReadout(_Readout):
    r"""Leaky rate read-out: :math:`r_t = e^{-\Delta t/\tau}\, r_{t-1} + x_t W`
    (as ``brainstate.nn.LeakyRateReadout``).

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        ``I`` and ``O`` (last entries).
    tau : time constant
        Default ``5. * u.ms``; scalar or of shape ``(O,)``.
    w_init : initializer or array of shape ``(I, O)``; default ``KaimingNormal()``
    r_init : initializer or array; default ``ZeroInit()``
    name : str, optional

    Attributes
    ----------
    weight : brainstate.ParamState, shape ``(I, O)``; also available as ``W``
    r : brainstate.HiddenState, shape ``(batch, O)`` or ``(O,)``
    tau : time constant broadcast to ``(O,)``
    decay : :math:`e^{-\Delta t/\tau}`, shape ``(O,)`` (computed from the current ``dt``; braintrace 0.2
        fixes it at construction)
    in_size, out_size : tuple of int
    r_init

    Examples
    --------
    >>> import jax.numpy as jnp, brainstate, saiunit as u, braintrace
    >>> with brainstate.environ.context(dt=1. * u.ms):
    ...     ro = braintrace.nn.LeakyRateReadout(4, 2, tau=5. * u.ms); ro.init_state(batch_size=3)
    ...     out = ro(jnp.ones((3, 4)))
    >>> out.shape
    (3, 2)
    >>> with brainstate.environ.context(dt=1. * u.ms):
    ...     print(ro.decay.tolist() == [float(jnp.exp(-0.2))] * 2)
    True
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        tau=5.0 * u.ms,
        w_init=init.KaimingNormal(),
        r_init=init.ZeroInit(),
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._setup(in_size, out_size, tau, w_init)
        self.r_init = r_init

    def _new_r(self, batch_size):
        return init_state(self.r_init, (self.out_features,), batch_size, type(self).__name__, "r_init")

    def init_state(self, batch_size: Optional[int] = None, **kwargs):
        self.r = brainstate.HiddenState(self._new_r(batch_size))

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        self.r.value = self._new_r(batch_size)

    def update(self, x):
        current = self._current(x)
        self.r.value = self._decay(self.r.value) * self.r.value + current
        return self.r.value


class LeakySpikeReadout(_Readout):
    r"""Spiking read-out: a LIF layer of ``O`` neurons driven by :math:`x_t W`.

    .. math::
        \hat V = \text{reset of } V_{t-1} \text{ by } s_{t-1}, \qquad
        V_t = \beta \hat V + (1 - \beta)\, x_t W, \qquad
        s_t = \mathrm{spk}\!\left(\frac{V_t - V_{th}}{V_{th}}\right),

    with :math:`\beta = e^{-\Delta t/\tau}`, :math:`s_{t-1} = \mathrm{spk}((V_{t-1} - V_{th})/V_{th})`
    and the reset ``'subtract'`` (:math:`\hat V = V_{t-1} - V_{th} s_{t-1}`) or ``'hard'``
    (:math:`\hat V = V_{t-1} - \mathrm{sg}(V_{t-1}) s_{t-1}`), as ``brainstate.nn.LeakySpikeReadout``.
    Returns the spikes :math:`s_t` (a function of the new state :math:`V_t`).

    Parameters
    ----------
    in_size, out_size : int or tuple of int
    tau : time constant; default ``5. * u.ms``
    V_th : number or array; default 1
    w_init : initializer or array of shape ``(I, O)``; default ``KaimingNormal()``
    V_init : initializer or array; default ``ZeroInit()``
    spk_fun : callable; default :func:`braintrace.nn.surrogate.relu_grad`
    spk_reset : ``'subtract'`` (alias ``'soft'``) or ``'hard'``
    name : str, optional

    Attributes
    ----------
    weight : brainstate.ParamState, shape ``(I, O)``; also available as ``W``
    V : brainstate.HiddenState, shape ``(batch, O)`` or ``(O,)``
    spike : the spikes of the current state, ``get_spike(V)``
    tau : time constant broadcast to ``(O,)``
    decay : :math:`e^{-\Delta t/\tau}`, shape ``(O,)``, from the current ``dt``
    V_th, V_init, spk_fun
    spk_reset : ``'subtract'`` or ``'hard'`` (``'soft'`` is stored as ``'subtract'``)
    in_size, out_size, varshape : tuple of int (``varshape`` is ``out_size``)

    Examples
    --------
    >>> import jax.numpy as jnp, brainstate, saiunit as u, braintrace
    >>> with brainstate.environ.context(dt=1. * u.ms):
    ...     ro = braintrace.nn.LeakySpikeReadout(4, 2, tau=5. * u.ms); ro.init_state(batch_size=3)
    ...     spikes = ro(jnp.ones((3, 4)))
    >>> spikes.shape, ro.spike.shape, ro.varshape
    ((3, 2), (3, 2), (2,))
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        tau=5.0 * u.ms,
        V_th=1.0,
        w_init=init.KaimingNormal(),
        V_init=init.ZeroInit(),
        spk_fun: Callable = surrogate.relu_grad,
        spk_reset: str = "subtract",
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._setup(in_size, out_size, tau, w_init)
        owner = type(self).__name__
        if not callable(spk_fun):
            raise TypeError(f"{owner}: `spk_fun` must be callable, got {spk_fun!r}.")
        self.V_th = V_th
        self.V_init = V_init
        self.spk_fun = spk_fun
        self.spk_reset = _reset_mode(spk_reset, owner)

    def _new_V(self, batch_size):
        return init_state(self.V_init, (self.out_features,), batch_size, type(self).__name__, "V_init")

    def init_state(self, batch_size: Optional[int] = None, **kwargs):
        self.V = brainstate.HiddenState(self._new_V(batch_size))

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        self.V.value = self._new_V(batch_size)

    @property
    def varshape(self):
        return self.out_size

    @property
    def spike(self):
        """``get_spike(V)`` of the current state."""
        return self.get_spike()

    def get_spike(self, V=None):
        """``spk_fun((V - V_th) / V_th)`` (default: the current state)."""
        V = self.V.value if V is None else V
        return self.spk_fun(
            to_dimensionless((V - self.V_th) / self.V_th, type(self).__name__, "the scaled voltage")
        )

    def update(self, x):
        current = self._current(x)
        last_V = self.V.value
        spk = self.get_spike(last_V)
        if self.spk_reset == "subtract":
            V = last_V - self.V_th * spk
        else:
            V = last_V - jax.lax.stop_gradient(last_V) * spk
        decay = self._decay(last_V)
        V = decay * V + (1 - decay) * current
        self.V.value = V
        return self.get_spike(V)
