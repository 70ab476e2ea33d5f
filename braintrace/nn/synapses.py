r"""Synapse dynamics: the exponential synapse :class:`Expon`."""

from __future__ import annotations

from typing import Optional

import brainstate
import saiunit as u

from ._common import Size, check_time_constant, check_trailing_shape, decay_factor, init_state, to_size

__all__ = ["Expon"]

init = brainstate.nn.init


class Expon(brainstate.nn.Module):
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

    def __init__(self, in_size: Size, tau=8.0 * u.ms, g_init=init.ZeroInit(), name: Optional[str] = None):
        super().__init__(name=name)
        owner = type(self).__name__
        self.in_size = to_size(in_size, "in_size", owner)
        self.out_size = self.varshape = self.in_size
        self.tau = check_time_constant(tau, "tau", owner)
        self.g_init = g_init

    def _new_g(self, batch_size):
        return init_state(self.g_init, self.varshape, batch_size, type(self).__name__, "g_init")

    def init_state(self, batch_size: Optional[int] = None, **kwargs):
        self.g = brainstate.HiddenState(self._new_g(batch_size))

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        self.g.value = self._new_g(batch_size)

    def update(self, x=None):
        g = self.g.value
        g = decay_factor(self.tau, u.math.get_dtype(g), type(self).__name__) * g
        if x is not None:
            check_trailing_shape(x, self.varshape, type(self).__name__)
            g = g + x
        self.g.value = g
        return g
