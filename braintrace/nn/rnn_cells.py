r"""Recurrent cells whose every linear map is an ETP op (:class:`~braintrace.nn.Linear`).

Formulas follow ``brainstate.nn`` (``[x, h]`` is the concatenation along the feature axis,
:math:`\sigma` the logistic sigmoid, :math:`\phi` the activation). Hidden states are
``brainstate.HiddenState`` of shape ``(batch, H)`` or ``(H,)``.

Which weights get eligibility traces follows from the compiler's rule: *a parameter participates
iff an ETP primitive consumes it and the primitive's output reaches a hidden state without passing
through another trainable ETP primitive*. Gates are therefore separate ``Linear`` layers of
output size ``H`` (a fused ``(I + H, kH)`` layer would produce an output of a different shape
than the hidden state, which the compiler cannot map onto per-unit traces). Each class docstring
states its count of relations. Weights that are not relations (the GRU reset gate) are learned with
their within-step gradient.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import brainstate
import jax
import jax.numpy as jnp

from ._common import Size, check_features, get_activation, init_state, to_size
from .linear import Linear

__all__ = ["ValinaRNNCell", "GRUCell", "LSTMCell", "MGUCell", "MinimalRNNCell"]

init = brainstate.nn.init


class _Cell(brainstate.nn.Module):
    """Shared size handling and the single-state ``h`` init/reset."""

    def _setup(self, in_size, out_size, state_init, activation=None):
        owner = type(self).__name__
        self.in_size = to_size(in_size, "in_size", owner)
        self.out_size = to_size(out_size, "out_size", owner)
        self.num_in, self.num_out = self.in_size[-1], self.out_size[-1]
        self._state_init = state_init
        if activation is not None:
            self.activation = get_activation(activation, owner)

    def _new_h(self, batch_size):
        return init_state(self._state_init, (self.num_out,), batch_size, type(self).__name__, "state_init")

    def init_state(self, batch_size: Optional[int] = None, **kwargs):
        self.h = brainstate.HiddenState(self._new_h(batch_size))

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        self.h.value = self._new_h(batch_size)

    def _check(self, x):
        check_features(x, self.num_in, type(self).__name__)


def _concat(a, b):
    return jnp.concatenate([a, b], axis=-1)


class ValinaRNNCell(_Cell):
    r"""Vanilla RNN cell: :math:`h_t = \phi(W [x_t, h_{t-1}] + b)`.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        ``I`` and ``H`` (last entries).
    state_init : initializer or array
        Initial ``h``; default ``ZeroInit()``.
    w_init, b_init : initializers of ``W`` ``(I + H, H)`` and ``b`` ``(H,)``
        Defaults ``XavierNormal()`` and ``ZeroInit()``.
    activation : str or callable
        Default ``'relu'`` (as ``brainstate.nn.ValinaRNNCell``).
    name : str, optional

    Relations: 1 (``W``), one hidden group ``{h}``.

    Examples
    --------
    >>> import jax.numpy as jnp, brainstate, braintrace
    >>> cell = braintrace.nn.ValinaRNNCell(3, 5); cell.init_state(batch_size=2)
    >>> cell(jnp.ones((2, 3))).shape
    (2, 5)
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        state_init=init.ZeroInit(),
        w_init=init.XavierNormal(),
        b_init=init.ZeroInit(),
        activation: Union[str, Callable] = "relu",
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._setup(in_size, out_size, state_init, activation)
        self.W = Linear(self.num_in + self.num_out, self.num_out, w_init=w_init, b_init=b_init)

    def update(self, x):
        self._check(x)
        self.h.value = self.activation(self.W(_concat(x, self.h.value)))
        return self.h.value


class GRUCell(_Cell):
    r"""Gated recurrent unit (Cho et al., 2014), as ``brainstate.nn.GRUCell``:

    .. math::
        r_t &= \sigma(W_r [x_t, h_{t-1}] + b_r), \qquad z_t = \sigma(W_z [x_t, h_{t-1}] + b_z), \\
        \tilde h_t &= \phi(W_h [x_t, r_t \odot h_{t-1}] + b_h), \qquad
        h_t = (1 - z_t) \odot h_{t-1} + z_t \odot \tilde h_t.

    Three ``Linear`` layers ``Wr``, ``Wz``, ``Wh`` (each ``(I + H, H)``), **two relations**:
    ``Wz`` and ``Wh`` reach ``h`` directly; ``Wr``'s output reaches ``h`` only through ``Wh`` (a
    trainable ETP op), so ``Wr`` gets no eligibility trace and is learned with its within-step
    gradient. (``brainstate.nn.GRUCell`` fuses ``W_r`` and ``W_z`` into one ``(I + H, 2H)`` layer,
    ``r`` first; copy ``Wrz[:, :H]`` to ``Wr`` and ``Wrz[:, H:]`` to ``Wz``.)

    Parameters
    ----------
    in_size, out_size : int or tuple of int
    w_init, b_init : initializers; defaults ``Orthogonal()`` and ``ZeroInit()``
    state_init : initializer or array; default ``ZeroInit()``
    activation : str or callable; default ``'tanh'``
    name : str, optional
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        w_init=init.Orthogonal(),
        b_init=init.ZeroInit(),
        state_init=init.ZeroInit(),
        activation: Union[str, Callable] = "tanh",
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._setup(in_size, out_size, state_init, activation)
        n = self.num_in + self.num_out
        self.Wr = Linear(n, self.num_out, w_init=w_init, b_init=b_init)
        self.Wz = Linear(n, self.num_out, w_init=w_init, b_init=b_init)
        self.Wh = Linear(n, self.num_out, w_init=w_init, b_init=b_init)

    def update(self, x):
        self._check(x)
        old_h = self.h.value
        xh = _concat(x, old_h)
        r = jax.nn.sigmoid(self.Wr(xh))
        z = jax.nn.sigmoid(self.Wz(xh))
        cand = self.activation(self.Wh(_concat(x, r * old_h)))
        self.h.value = (1 - z) * old_h + z * cand
        return self.h.value


class MGUCell(_Cell):
    r"""Minimal gated unit (Zhou et al., 2016), as ``brainstate.nn.MGUCell``:

    .. math::
        f_t = \sigma(W_f [x_t, h_{t-1}] + b_f), \quad
        \tilde h_t = \phi(W_h [x_t, f_t \odot h_{t-1}] + b_h), \quad
        h_t = (1 - f_t) \odot h_{t-1} + f_t \odot \tilde h_t.

    Two ``Linear`` layers ``Wf``, ``Wh``; **two relations** (``f`` also reaches ``h`` directly).

    Parameters
    ----------
    in_size, out_size : int or tuple of int
    w_init, b_init : defaults ``Orthogonal()`` and ``ZeroInit()``
    state_init : default ``ZeroInit()``
    activation : default ``'tanh'``
    name : str, optional
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        w_init=init.Orthogonal(),
        b_init=init.ZeroInit(),
        state_init=init.ZeroInit(),
        activation: Union[str, Callable] = "tanh",
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._setup(in_size, out_size, state_init, activation)
        n = self.num_in + self.num_out
        self.Wf = Linear(n, self.num_out, w_init=w_init, b_init=b_init)
        self.Wh = Linear(n, self.num_out, w_init=w_init, b_init=b_init)

    def update(self, x):
        self._check(x)
        old_h = self.h.value
        f = jax.nn.sigmoid(self.Wf(_concat(x, old_h)))
        cand = self.activation(self.Wh(_concat(x, f * old_h)))
        self.h.value = (1 - f) * old_h + f * cand
        return self.h.value


class LSTMCell(_Cell):
    r"""Long short-term memory cell, as ``brainstate.nn.LSTMCell`` (forget bias +1):

    .. math::
        i_t, g_t, f_t, o_t &= W_{i,g,f,o} [x_t, h_{t-1}] + b_{i,g,f,o}, \\
        c_t &= \sigma(f_t + 1) \odot c_{t-1} + \sigma(i_t) \odot \phi(g_t), \qquad
        h_t = \sigma(o_t) \odot \phi(c_t).

    Four ``Linear`` layers ``Wi``, ``Wg``, ``Wf``, ``Wo`` (each ``(I + H, H)``); **four
    relations**, all on one hidden group ``{h, c}`` of two states per unit (``h_t`` depends on
    ``c_{t-1}`` through ``c_t``). ``brainstate.nn.LSTMCell`` fuses them into one ``(I + H, 4H)``
    layer split in the order ``i, g, f, o``.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
    w_init, b_init : defaults ``XavierNormal()`` and ``ZeroInit()``
    state_init : initial ``h`` and ``c``; default ``ZeroInit()``
    activation : default ``'tanh'``
    name : str, optional
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        w_init=init.XavierNormal(),
        b_init=init.ZeroInit(),
        state_init=init.ZeroInit(),
        activation: Union[str, Callable] = "tanh",
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._setup(in_size, out_size, state_init, activation)
        n = self.num_in + self.num_out
        self.Wi = Linear(n, self.num_out, w_init=w_init, b_init=b_init)
        self.Wg = Linear(n, self.num_out, w_init=w_init, b_init=b_init)
        self.Wf = Linear(n, self.num_out, w_init=w_init, b_init=b_init)
        self.Wo = Linear(n, self.num_out, w_init=w_init, b_init=b_init)

    def init_state(self, batch_size: Optional[int] = None, **kwargs):
        self.c = brainstate.HiddenState(self._new_h(batch_size))
        self.h = brainstate.HiddenState(self._new_h(batch_size))

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        self.c.value = self._new_h(batch_size)
        self.h.value = self._new_h(batch_size)

    def update(self, x):
        self._check(x)
        xh = _concat(x, self.h.value)
        i, g, f, o = self.Wi(xh), self.Wg(xh), self.Wf(xh), self.Wo(xh)
        c = jax.nn.sigmoid(f + 1.0) * self.c.value + jax.nn.sigmoid(i) * self.activation(g)
        h = jax.nn.sigmoid(o) * self.activation(c)
        self.c.value = c
        self.h.value = h
        return h


class MinimalRNNCell(_Cell):
    r"""MinimalRNN (Chen, 2017):

    .. math::
        z_t = \phi(W_x x_t + b_x), \quad
        u_t = \sigma(W_u [z_t, h_{t-1}] + b_u), \quad
        h_t = u_t \odot h_{t-1} + (1 - u_t) \odot z_t.

    Two ``Linear`` layers ``phi`` ``(I, H)`` and ``W_u`` ``(2H, H)``; **two relations**: ``z``
    reaches ``h`` directly (besides feeding ``W_u``), ``u`` drives ``h``.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
    w_init, b_init : defaults ``Orthogonal()`` and ``ZeroInit()``
    state_init : default ``ZeroInit()``
    activation : :math:`\phi`; default ``'tanh'``
    name : str, optional
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        w_init=init.Orthogonal(),
        b_init=init.ZeroInit(),
        state_init=init.ZeroInit(),
        activation: Union[str, Callable] = "tanh",
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._setup(in_size, out_size, state_init, activation)
        self.phi = Linear(self.num_in, self.num_out, w_init=w_init, b_init=b_init)
        self.W_u = Linear(2 * self.num_out, self.num_out, w_init=w_init, b_init=b_init)

    def update(self, x):
        self._check(x)
        old_h = self.h.value
        z = self.activation(self.phi(x))
        gate = jax.nn.sigmoid(self.W_u(_concat(z, old_h)))
        self.h.value = gate * old_h + (1 - gate) * z
        return self.h.value
