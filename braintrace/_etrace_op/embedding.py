r"""Embedding (trainable gather) ETP primitives ``etp_emb`` (batched) and ``etp_emb_v`` (unbatched).

Forward: :math:`y_{b d} = T_{i_b, d}` with integer indices ``i`` of shape ``(B,)`` (``etp_emb``)
or ``()`` (``etp_emb_v``) and a table ``T`` of shape ``(V, D)``; ``y`` has shape ``(B, D)`` or
``(D,)``. Indices follow JAX indexing: a negative index counts from the end, and an index outside
``[-V, V)`` is clamped to the nearest row (as ``T[i]`` does).

Invars: ``indices, T`` (the indices are ``x``; they are never differentiated); no static params;
trainable layout ``{'weight': 1}``.

ETP rules (``g = \partial h/\partial y`` for one hidden state, shape of ``y``). Since
:math:`\partial y_{bd}/\partial T_{vd'} = \delta_{v i_b}\,\delta_{d d'}`, the lookup is
:math:`y = \mathrm{onehot}(i)\,T`, a dense layer whose input is the one-hot row selector:

* ``xy_to_dw(x, g, {T})`` — the VJP: the scatter-add :math:`\partial h/\partial T_{vd} = \sum_b
  [i_b = v]\, g_{bd}` for integer ``x`` (the indices); for a floating ``x`` of shape ``(..., V)``
  (a one-hot representation, or an input trace filtering it) the dense form :math:`x^\top g`.
* ``yw_to_w(d, trace)`` — the dense ``y -> T`` link: the trace ``(..., V, D)`` is scaled by ``d``
  ``(..., D)`` along ``D``, broadcast along ``V``.
* ``init_drtrl`` — ``{'weight': zeros(B, V, D, n)}`` (``etp_emb``), ``zeros(V, D, n)``
  (``etp_emb_v``): the D-RTRL trace grows with the vocabulary.
* ``init_pp`` — the output-shaped df trace ``(*y.shape, n)``.
* ``pp_x_repr`` (:data:`~braintrace._etrace_op._registries.ETP_PP_X_REPR`) — ``one_hot(i, V)``: what
  an input trace filters (pp_prop's :math:`\epsilon_x` of shape ``(B, V)``).

The D-RTRL trace operations are the rule-derived ones (:mod:`braintrace._etrace_op._trace_ops`):


.. math::
    \epsilon_t[b, v, d, s] = \sum_j D_t[b, d, s, j]\,\epsilon_{t-1}[b, v, d, j] + [i_b = v]\, df_t[b, d, s].

Registration: the two primitives are registered on first use (the first call of :func:`embedding`),
as the grouped ones are (see :mod:`braintrace._etrace_op.grouped`).
"""

from __future__ import annotations

import jax.numpy as jnp

from . import _trace_ops
from ._batching import make_x_batching_rule
from ._registries import ETP_PP_X_REPR, ETP_PRIMITIVES
from ._spec import ETPPrimitiveSpec, register_primitive_spec
from ._units import attach, split
from .dense import apply_operand_fn

__all__ = ["embedding", "embedding_primitives"]


def _rows(indices, num_rows):
    """The table rows ``T[indices]`` reads: negative indices wrapped once, the rest clamped."""
    indices = jnp.where(indices < 0, indices + num_rows, indices)
    return jnp.clip(indices, 0, num_rows - 1)


def _emb_impl(indices, weight):
    return jnp.take(weight, _rows(indices, weight.shape[0]), axis=0)


def _emb_trainable_invars(params):
    return {"weight": 1}


def _emb_xy_to_dw(x, hidden_dim, weights):
    """``{'weight': dT}``: the scatter-add of ``g`` at the rows ``x`` selects (integer ``x``), or
    ``x^T g`` for a floating one-hot representation ``x`` of shape ``(..., V)``."""
    table = weights["weight"]
    x = jnp.asarray(x)
    g = jnp.asarray(hidden_dim, dtype=table.dtype)
    if jnp.issubdtype(x.dtype, jnp.integer):
        rows = _rows(x, table.shape[0]).reshape(-1)
        return {"weight": jnp.zeros_like(table).at[rows].add(g.reshape((-1, table.shape[1])))}
    x = x.astype(table.dtype).reshape((-1, table.shape[0]))
    return {"weight": x.T @ g.reshape((-1, table.shape[1]))}


def _emb_yw_to_w(hidden_dim, trace):
    """Scale the table-shaped trace ``(..., V, D)`` by ``hidden_dim`` ``(..., D)`` along ``D``."""
    return {"weight": trace["weight"] * jnp.expand_dims(hidden_dim, axis=-2)}


def _emb_pp_x_repr(x, weights):
    """The one-hot rows ``(..., V)`` of the indices, in the table's dtype: the lookup is the dense
    layer ``one_hot(i) @ T``, so an input trace filters these rows (a decayed sum of indices would
    mean nothing)."""
    table = weights["weight"]
    return jnp.asarray(
        _rows(jnp.asarray(x), table.shape[0])[..., None] == jnp.arange(table.shape[0]), table.dtype
    )


def _emb_init_drtrl(x_var, y_var, weight_vars, num_hidden_state):
    """``{'weight': zeros(B, V, D, n)}``."""
    return _trace_ops.param_trace_zeros(x_var.aval.shape[:1], weight_vars, num_hidden_state)


def _emb_v_init_drtrl(x_var, y_var, weight_vars, num_hidden_state):
    """``{'weight': zeros(V, D, n)}``."""
    return _trace_ops.param_trace_zeros((), weight_vars, num_hidden_state)


_SPECS = {
    name: ETPPrimitiveSpec(
        name=name,
        impl=_emb_impl,
        yw_to_w=_emb_yw_to_w,
        xy_to_dw=_emb_xy_to_dw,
        init_drtrl=init_drtrl,
        init_pp=_trace_ops.output_trace_zeros,
        trainable_invars_fn=_emb_trainable_invars,
        x_invar_index=0,
        batched=batched,
        batching_rule=make_x_batching_rule(lambda n=name: _registered(n), lambda: _registered("etp_emb")),
    )
    for name, batched, init_drtrl in (
        ("etp_emb", True, _emb_init_drtrl),
        ("etp_emb_v", False, _emb_v_init_drtrl),
    )
}
_live = {}


def _registered(name):
    """The primitive ``name`` (``'etp_emb'`` or ``'etp_emb_v'``), registered now if it is not."""
    p = _live.get(name)
    if p is None or p not in ETP_PRIMITIVES:
        p = _live[name] = register_primitive_spec(_SPECS[name])
        ETP_PP_X_REPR[p] = _emb_pp_x_repr
    return p


def embedding_primitives():
    """``(etp_emb_p, etp_emb_v_p)``, registering them on first use."""
    return _registered("etp_emb"), _registered("etp_emb_v")


def __getattr__(name):
    if name in ("etp_emb_p", "etp_emb_v_p"):
        return _registered(name[:-2])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def embedding(indices, weight, *, weight_fn=None):
    r"""ETP-marked embedding lookup :math:`y = f(T)[i]` (a trainable gather).

    Binds ``etp_emb`` for a ``(batch,)`` index vector and ``etp_emb_v`` for a scalar index; the table
    then carries a D-RTRL eligibility trace like a dense layer fed by ``one_hot(i)``, of shape
    ``(batch, num_embeddings, features, n)`` (it grows with the vocabulary). Indices follow JAX
    indexing (negative indices count from the end; out-of-range ones are clamped).

    Parameters
    ----------
    indices : integer array, shape ``()`` or ``(batch,)``
        Never differentiated. Flatten more axes outside the op (``braintrace.nn.Embedding`` does).
    weight : array or Quantity, shape ``(num_embeddings, features)``
    weight_fn : callable, optional
        Shape-preserving transform of the table's mantissa, applied with plain JAX ops before the
        primitive (the online gradient of ``weight`` is the chain rule through it).

    Returns
    -------
    array or Quantity of shape ``(features,)`` or ``(batch, features)``, in the unit of ``weight``.

    Raises
    ------
    TypeError
        If ``indices`` is not of an integer dtype.
    NotImplementedError
        If ``indices`` has more than one axis.
    ValueError
        If ``weight`` is not 2-D or has no row.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> table = jnp.arange(12.0).reshape(4, 3)
    >>> braintrace.embedding(jnp.array([0, 2]), table)
    Array([[0., 1., 2.],
           [6., 7., 8.]], dtype=float32)
    >>> braintrace.embedding(jnp.array(-1), table)
    Array([ 9., 10., 11.], dtype=float32)
    """
    idx = jnp.asarray(indices)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"embedding: `indices` must have an integer dtype, got {idx.dtype}.")
    if idx.ndim > 1:
        raise NotImplementedError(
            f"embedding: `indices` must be a scalar or a (batch,) vector, got shape {idx.shape}; "
            f"flatten the leading axes outside the op (braintrace.nn.Embedding accepts any shape)."
        )
    w_m, w_u = split(weight)
    w_m = apply_operand_fn(weight_fn, jnp.asarray(w_m), name="weight_fn", op="embedding")
    if w_m.ndim != 2 or w_m.shape[0] == 0:
        raise ValueError(
            f"embedding: `weight` must be a (num_embeddings, features) table with at least one row, got "
            f"shape {w_m.shape}."
        )
    p = _registered("etp_emb" if idx.ndim == 1 else "etp_emb_v")
    return attach(p.bind(idx, w_m), w_u)
