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

from braintrace._etrace_op import element_wise

from ._common import Size, check_features, get_activation, init_state, to_size
from .linear import Linear

__all__ = [
    "ValinaRNNCell",
    "GRUCell",
    "LSTMCell",
    "MGUCell",
    "MinimalRNNCell",
    "MiniGRU",
    "MiniLSTM",
    "URLSTMCell",
    "CFNCell",
    "LRUCell",
]

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
    phi : callable, optional
        The whole input map :math:`z_t = \Phi(x_t)`, replacing ``activation(Linear(x))`` (the
        keyword of braintrace 0.2, whose default map is the ``Linear`` layer without activation).
        It must return ``(..., H)``; its weights are relations when it computes them through ETP
        ops (e.g. a :class:`~braintrace.nn.Linear`).
    name : str, optional
    activation : :math:`\phi`; default ``'tanh'``

    The positional order is that of braintrace 0.2 (``phi`` sixth); ``activation`` follows ``name``.
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        w_init=init.Orthogonal(),
        b_init=init.ZeroInit(),
        state_init=init.ZeroInit(),
        phi: Optional[Callable] = None,
        name: Optional[str] = None,
        activation: Union[str, Callable] = "tanh",
    ):
        super().__init__(name=name)
        self._setup(in_size, out_size, state_init, activation)
        if phi is not None and not callable(phi):
            raise TypeError(
                f"MinimalRNNCell: `phi` must be callable (x -> z of shape (..., H)), got {phi!r}."
            )
        self._custom_phi = phi is not None
        self.phi = phi if phi is not None else Linear(self.num_in, self.num_out, w_init=w_init, b_init=b_init)
        self.W_u = Linear(2 * self.num_out, self.num_out, w_init=w_init, b_init=b_init)

    def update(self, x):
        self._check(x)
        old_h = self.h.value
        z = self.phi(x) if self._custom_phi else self.activation(self.phi(x))
        gate = jax.nn.sigmoid(self.W_u(_concat(z, old_h)))
        self.h.value = gate * old_h + (1 - gate) * z
        return self.h.value


class MiniGRU(_Cell):
    r"""Minimal GRU cell, as ``braintrace.nn.MiniGRU`` of braintrace 0.2:

    .. math::
        z_t = \sigma(W_z [x_t, h_{t-1}] + b_z), \qquad
        h_t = (1 - z_t) \odot h_{t-1} + z_t \odot (W_x x_t + b_x).

    The candidate is linear in :math:`x_t` and the gate also reads :math:`h_{t-1}` (the minGRU of
    Feng et al., 2024, gates on :math:`x_t` alone).

    Two ``Linear`` layers ``W_x`` ``(I, H)`` and ``W_z`` ``(I + H, H)``; **two relations** on the
    hidden group ``{h}``, whose hidden Jacobian is :math:`1 - z_t` per unit.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        ``I`` and ``H`` (last entries).
    w_init, b_init : initializers of the weights and biases
        Defaults ``Orthogonal()`` and ``ZeroInit()``.
    state_init : initializer or array
        Initial ``h``; default ``ZeroInit()``.
    name : str, optional

    Input ``x_t``: ``(batch, I)`` or ``(I,)``; returns ``h_t``: ``(batch, H)`` or ``(H,)``.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> cell = braintrace.nn.MiniGRU(in_size=3, out_size=5); cell.init_state(batch_size=2)
    >>> cell(jnp.ones((2, 3))).shape
    (2, 5)
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        w_init=init.Orthogonal(),
        b_init=init.ZeroInit(),
        state_init=init.ZeroInit(),
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._setup(in_size, out_size, state_init)
        self.W_x = Linear(self.num_in, self.num_out, w_init=w_init, b_init=b_init)
        self.W_z = Linear(self.num_in + self.num_out, self.num_out, w_init=w_init, b_init=b_init)

    def update(self, x):
        self._check(x)
        old_h = self.h.value
        z = jax.nn.sigmoid(self.W_z(_concat(x, old_h)))
        self.h.value = (1 - z) * old_h + z * self.W_x(x)
        return self.h.value


class MiniLSTM(_Cell):
    r"""Minimal LSTM cell, as ``braintrace.nn.MiniLSTM`` of braintrace 0.2:

    .. math::
        f_t = \sigma(W_f [x_t, h_{t-1}] + b_f), \quad
        i_t = \sigma(W_i [x_t, h_{t-1}] + b_i), \quad
        h_t = f_t \odot h_{t-1} + i_t \odot (W_x x_t + b_x).

    The gates are not normalised to :math:`f_t + i_t = 1` (as they are in the minLSTM of Feng et
    al., 2024) and read :math:`h_{t-1}`.

    Three ``Linear`` layers ``W_x`` ``(I, H)``, ``W_f`` and ``W_i`` ``(I + H, H)``; **three
    relations** on the hidden group ``{h}``, whose hidden Jacobian is :math:`f_t` per unit.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        ``I`` and ``H`` (last entries).
    w_init, b_init : initializers of the weights and biases
        Defaults ``Orthogonal()`` and ``ZeroInit()``.
    state_init : initializer or array
        Initial ``h``; default ``ZeroInit()``.
    name : str, optional

    Input ``x_t``: ``(batch, I)`` or ``(I,)``; returns ``h_t``: ``(batch, H)`` or ``(H,)``.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> cell = braintrace.nn.MiniLSTM(in_size=3, out_size=5); cell.init_state(batch_size=2)
    >>> cell(jnp.ones((2, 3))).shape
    (2, 5)
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        w_init=init.Orthogonal(),
        b_init=init.ZeroInit(),
        state_init=init.ZeroInit(),
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._setup(in_size, out_size, state_init)
        n = self.num_in + self.num_out
        self.W_x = Linear(self.num_in, self.num_out, w_init=w_init, b_init=b_init)
        self.W_f = Linear(n, self.num_out, w_init=w_init, b_init=b_init)
        self.W_i = Linear(n, self.num_out, w_init=w_init, b_init=b_init)

    def update(self, x):
        self._check(x)
        old_h = self.h.value
        xh = _concat(x, old_h)
        f = jax.nn.sigmoid(self.W_f(xh))
        i = jax.nn.sigmoid(self.W_i(xh))
        self.h.value = f * old_h + i * self.W_x(x)
        return self.h.value


class URLSTMCell(_Cell):
    r"""LSTM with the uniform gate initialisation and refine gate of Gu et al. (2020), "Improving the
    gating mechanism of recurrent neural networks", as ``braintrace.nn.URLSTMCell`` of braintrace 0.2:

    .. math::
        f_t &= \sigma(W_f [x_t, h_{t-1}] + b), \qquad r_t = \sigma(W_r [x_t, h_{t-1}] - b), \\
        g_t &= 2 r_t f_t + (1 - 2 r_t) f_t^2, \\
        c_t &= g_t \odot c_{t-1} + (1 - g_t) \odot \phi(W_u [x_t, h_{t-1}]), \qquad
        h_t = \sigma(W_o [x_t, h_{t-1}]) \odot \phi(c_t).

    Four bias-free ``Linear`` layers ``Wu``, ``Wf``, ``Wr``, ``Wo`` (each ``(I + H, H)``) and one
    shared gate bias ``bias`` ``(H,)``, initialised as :math:`b = \mathrm{logit}(u)` with
    :math:`u \sim U(1/H, 1 - 1/H)` (``0`` when ``H <= 2``) and read through
    :func:`braintrace.element_wise`. **Five relations** (the four layers and the bias), all on one
    hidden group ``{h, c}`` of two states per unit.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        ``I`` and ``H`` (last entries).
    w_init : initializer of the four weights; default ``XavierNormal()``
    state_init : initializer or array
        Initial ``h`` and ``c``; default ``ZeroInit()``.
    activation : str or callable
        :math:`\phi`; default ``'tanh'``.
    name : str, optional

    Attributes
    ----------
    bias : brainstate.ParamState, shape ``(H,)``
    h, c : brainstate.HiddenState, shape ``(batch, H)`` or ``(H,)``

    Input ``x_t``: ``(batch, I)`` or ``(I,)``; returns ``h_t``.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> cell = braintrace.nn.URLSTMCell(in_size=3, out_size=5); cell.init_state(batch_size=2)
    >>> cell(jnp.ones((2, 3))).shape
    (2, 5)
    >>> cell.bias.value.shape
    (5,)
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        w_init=init.XavierNormal(),
        state_init=init.ZeroInit(),
        activation: Union[str, Callable] = "tanh",
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._setup(in_size, out_size, state_init, activation)
        n = self.num_in + self.num_out
        self.Wu = Linear(n, self.num_out, w_init=w_init, b_init=None)
        self.Wf = Linear(n, self.num_out, w_init=w_init, b_init=None)
        self.Wr = Linear(n, self.num_out, w_init=w_init, b_init=None)
        self.Wo = Linear(n, self.num_out, w_init=w_init, b_init=None)
        self.bias = brainstate.ParamState(self._forget_bias())

    def _forget_bias(self):
        H = self.num_out
        low, high = (1.0 / H, 1.0 - 1.0 / H) if H > 2 else (0.5, 0.5)
        u = brainstate.random.uniform(low, high, (H,), dtype=brainstate.environ.dftype())
        return -jnp.log(1.0 / u - 1.0)

    def init_state(self, batch_size: Optional[int] = None, **kwargs):
        self.c = brainstate.HiddenState(self._new_h(batch_size))
        self.h = brainstate.HiddenState(self._new_h(batch_size))

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        self.c.value = self._new_h(batch_size)
        self.h.value = self._new_h(batch_size)

    def update(self, x):
        self._check(x)
        xh = _concat(x, self.h.value)
        b = element_wise(self.bias.value)
        f = jax.nn.sigmoid(self.Wf(xh) + b)
        r = jax.nn.sigmoid(self.Wr(xh) - b)
        g = 2 * r * f + (1 - 2 * r) * f**2
        c = g * self.c.value + (1 - g) * self.activation(self.Wu(xh))
        h = jax.nn.sigmoid(self.Wo(xh)) * self.activation(c)
        self.c.value = c
        self.h.value = h
        return h


class CFNCell(_Cell):
    r"""Chaos-free network cell (Laurent & von Brecht, 2017, "A recurrent neural network without
    chaos"), as ``braintrace.nn.CFNCell`` of braintrace 0.2:

    .. math::
        f_t = \sigma(W_f [x_t, h_{t-1}] + b_f), \quad
        i_t = \sigma(W_i [x_t, h_{t-1}] + b_i), \quad
        h_t = f_t \odot \phi(h_{t-1}) + i_t \odot \phi(W_h x_t + b_h).

    Three ``Linear`` layers ``Wf``, ``Wi`` ``(I + H, H)`` and ``Wh`` ``(I, H)`` (braintrace 0.2
    declares ``Wh`` as ``(H, H)`` and so runs only when ``I == H``); **three relations** on the
    hidden group ``{h}``, whose hidden Jacobian is :math:`f_t \odot \phi'(h_{t-1})` per unit.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        ``I`` and ``H`` (last entries).
    w_init, b_init : initializers of the weights and biases
        Defaults ``Orthogonal()`` and ``ZeroInit()``.
    state_init : initializer or array
        Initial ``h``; default ``ZeroInit()``.
    activation : str or callable
        :math:`\phi`; default ``'tanh'``.
    name : str, optional

    Input ``x_t``: ``(batch, I)`` or ``(I,)``; returns ``h_t``: ``(batch, H)`` or ``(H,)``.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> cell = braintrace.nn.CFNCell(in_size=3, out_size=5); cell.init_state(batch_size=2)
    >>> cell(jnp.ones((2, 3))).shape
    (2, 5)
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
        self.Wi = Linear(n, self.num_out, w_init=w_init, b_init=b_init)
        self.Wh = Linear(self.num_in, self.num_out, w_init=w_init, b_init=b_init)

    def update(self, x):
        self._check(x)
        old_h = self.h.value
        xh = _concat(x, old_h)
        f = jax.nn.sigmoid(self.Wf(xh))
        i = jax.nn.sigmoid(self.Wi(xh))
        self.h.value = f * self.activation(old_h) + i * self.activation(self.Wh(x))
        return self.h.value


def _lru_glorot(shape):
    """``randn(shape) / sqrt(shape[0])``: the LRU's input/output projection initialiser."""
    return brainstate.random.randn(*shape, dtype=brainstate.environ.dftype()) / jnp.sqrt(shape[0])


class LRUCell(brainstate.nn.Module):
    r"""Linear recurrent unit (Orvieto et al., 2023, "Resurrecting recurrent neural networks for long
    sequences"), as ``braintrace.nn.LRUCell`` of braintrace 0.2. A diagonal complex recurrence kept
    as its real and imaginary parts ``h_re``, ``h_im`` (``H = d_hidden`` units, ``M = d_model``):

    .. math::
        \lambda &= e^{-e^{\nu}} e^{i e^{\theta}}, \qquad \gamma = e^{\gamma_{\log}}, \\
        h_t &= \lambda \odot h_{t-1} + \gamma \odot (B_{re} + i B_{im})\, x_t, \\
        y_t &= C_{re}\, \mathrm{Re}\, h_t - C_{im}\, \mathrm{Im}\, h_t + D \odot x_t,

    i.e. with :math:`a = e^{-e^{\nu}}\cos e^{\theta}` and :math:`b = e^{-e^{\nu}}\sin e^{\theta}`:
    :math:`\mathrm{Re}\,h_t = a\,\mathrm{Re}\,h_{t-1} - b\,\mathrm{Im}\,h_{t-1} + \gamma\, x_t B_{re}`
    and :math:`\mathrm{Im}\,h_t = b\,\mathrm{Re}\,h_{t-1} + a\,\mathrm{Im}\,h_{t-1} + \gamma\, x_t B_{im}`.

    Parameters ``nu_log``, ``theta_log``, ``gamma_log`` ``(H,)`` go through
    :func:`braintrace.element_wise`, ``B_re``, ``B_im`` ``(M, H)`` and ``C_re``, ``C_im`` ``(H, M)`` are
    bias-free :class:`~braintrace.nn.Linear` layers, ``D`` ``(M,)`` is a plain parameter. **Five
    relations** (``B_re``, ``B_im``, ``nu_log``, ``theta_log``, ``gamma_log``) on one hidden group
    ``{h_re, h_im}`` of two states per unit; the unit's hidden Jacobian is the rotation
    :math:`\begin{pmatrix} a & -b \\ b & a \end{pmatrix}`, the whole recurrence, so ``D_RTRL`` is
    exact here (equal to BPTT). ``C_re``, ``C_im`` and ``D`` only read the new state and are learned
    with their within-step gradient (the compiler notes that ``C_re`` and ``C_im`` reach no hidden
    state).

    Parameters
    ----------
    d_model : int
        ``M``, the input and output size.
    d_hidden : int
        ``H``, the number of complex units.
    r_min, r_max : float
        Range of :math:`|\lambda|` at initialisation, ``0 <= r_min <= r_max <= 1``; defaults 0 and 1.
    max_phase : float
        Largest phase :math:`e^{\theta}` at initialisation; default 6.28.
    name : str, optional

    Notes
    -----
    Initialisation (random, from ``brainstate.random``): :math:`|\lambda|^2 \sim
    U(r_{min}^2, r_{max}^2)`, phase :math:`\sim U(0, \text{max\_phase})`,
    :math:`\gamma = \sqrt{1 - |\lambda|^2}`, ``B`` and ``C`` normal with variance ``1 / fan_in``,
    ``D`` standard normal.

    Attributes
    ----------
    h_re, h_im : brainstate.HiddenState, shape ``(batch, H)`` or ``(H,)``
    in_size, out_size : tuple of int
        ``(M,)`` both (braintrace 0.2 sets ``out_size`` to ``d_hidden``, though the cell returns
        ``(..., M)``).

    Input ``x_t``: ``(batch, M)`` or ``(M,)``; returns ``y_t`` of the same shape.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> cell = braintrace.nn.LRUCell(d_model=3, d_hidden=8); cell.init_state(batch_size=2)
    >>> cell(jnp.ones((2, 3))).shape
    (2, 3)
    >>> cell.h_re.value.shape
    (2, 8)
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        r_min: float = 0.0,
        r_max: float = 1.0,
        max_phase: float = 6.28,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        (self.d_model,) = to_size(d_model, "d_model", owner)
        (self.d_hidden,) = to_size(d_hidden, "d_hidden", owner)
        try:
            r_min, r_max, max_phase = float(r_min), float(r_max), float(max_phase)
        except TypeError:
            raise TypeError(f"{owner}: `r_min`, `r_max` and `max_phase` must be Python numbers.") from None
        if not 0.0 <= r_min <= r_max <= 1.0:
            raise ValueError(f"{owner}: need 0 <= r_min <= r_max <= 1, got r_min={r_min}, r_max={r_max}.")
        if not max_phase > 0.0:
            raise ValueError(f"{owner}: `max_phase` must be positive, got {max_phase}.")
        self.r_min, self.r_max, self.max_phase = r_min, r_max, max_phase
        self.in_size = self.out_size = (self.d_model,)
        H, dtype = self.d_hidden, brainstate.environ.dftype()
        theta_log = jnp.log(max_phase * brainstate.random.uniform(size=(H,), dtype=dtype))
        radius_sq = brainstate.random.uniform(size=(H,), dtype=dtype) * (r_max**2 - r_min**2) + r_min**2
        nu_log = jnp.log(-0.5 * jnp.log(radius_sq))
        self.theta_log = brainstate.ParamState(theta_log)
        self.nu_log = brainstate.ParamState(nu_log)
        self.gamma_log = brainstate.ParamState(jnp.log(jnp.sqrt(1.0 - jnp.exp(-2.0 * jnp.exp(nu_log)))))
        self.B_re = Linear(self.d_model, H, w_init=_lru_glorot, b_init=None)
        self.B_im = Linear(self.d_model, H, w_init=_lru_glorot, b_init=None)
        self.C_re = Linear(H, self.d_model, w_init=_lru_glorot, b_init=None)
        self.C_im = Linear(H, self.d_model, w_init=_lru_glorot, b_init=None)
        self.D = brainstate.ParamState(brainstate.random.randn(self.d_model, dtype=dtype))

    def _zeros(self, batch_size):
        return init_state(init.ZeroInit(), (self.d_hidden,), batch_size, type(self).__name__, "state")

    def init_state(self, batch_size: Optional[int] = None, **kwargs):
        self.h_re = brainstate.HiddenState(self._zeros(batch_size))
        self.h_im = brainstate.HiddenState(self._zeros(batch_size))

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        self.h_re.value = self._zeros(batch_size)
        self.h_im.value = self._zeros(batch_size)

    def update(self, x):
        check_features(x, self.d_model, type(self).__name__)
        modulus = element_wise(self.nu_log.value, lambda v: jnp.exp(-jnp.exp(v)))
        phase = element_wise(self.theta_log.value, jnp.exp)
        gamma = element_wise(self.gamma_log.value, jnp.exp)
        a, b = modulus * jnp.cos(phase), modulus * jnp.sin(phase)
        re, im = self.h_re.value, self.h_im.value
        new_re = a * re - b * im + gamma * self.B_re(x)
        new_im = b * re + a * im + gamma * self.B_im(x)
        self.h_re.value = new_re
        self.h_im.value = new_im
        return self.C_re(new_re) - self.C_im(new_im) + x * self.D.value
