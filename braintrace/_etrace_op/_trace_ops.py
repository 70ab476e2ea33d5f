r"""Per-relation D-RTRL trace operations: initialise, update, solve.

The online algorithms never touch a trace except through these three functions, so a primitive
(or a fused GPU kernel) can replace them as a unit. The default operations are derived from the
four ETP rules; a primitive whose trace is not weight-shaped registers its own
(:data:`ETP_DRTRL_TRACE_OPS`).

Shapes. A relation drives a hidden group of ``n`` states whose per-state shape is ``unit_shape``
(``batch_shape + y_unit_shape``; ``batch_shape`` is ``(B,)`` for a batched model, ``()`` otherwise).

* ``x``: the primitive's ``x`` operand as bound (``None`` for input-free primitives).
* ``df``: ``(*unit_shape, n)``, ``df[..., s] = \partial h_s / \partial y`` (per unit).
* ``d``: ``(*unit_shape, n, n)``, the per-unit hidden Jacobian block ``\partial h_t/\partial h_{t-1}``.
* ``ct``: ``(*unit_shape, n)``, ``\partial L/\partial h_t`` for the group's states.
* a trace leaf: ``(*batch_shape, *leaf_shape, n)``.

Default update (``yw_to_w`` applied as the y->θ link, ``xy_to_dw`` per batch element):

.. math::
    \epsilon_t[\dots, s] = \sum_j \mathrm{yw\_to\_w}(d[\dots, s, j], \epsilon_{t-1}[\dots, j])
                           + \mathrm{xy\_to\_dw}(x_b, df_b[\dots, s])

Default solve: :math:`\nabla\theta = \sum_{b} \sum_s \mathrm{yw\_to\_w}(ct[\dots, s], \epsilon[\dots, s])`,
valid whenever ``yw_to_w(v, xy_to_dw(x, g)) == xy_to_dw(x, v * g)``.

Rules receive the equation's static params as keywords; operands that are neither ``x`` nor
trainable (sparse index arrays) arrive as the keyword ``aux``, a tuple in invar order, when the
primitive has any.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from ._registries import BATCHED_PRIMITIVES, get_rule

__all__ = [
    "DRTRLTraceOps",
    "ETP_DRTRL_TRACE_OPS",
    "get_drtrl_trace_ops",
    "rule_kwargs",
    "param_trace_zeros",
    "output_trace_zeros",
]


@dataclasses.dataclass(frozen=True)
class DRTRLTraceOps:
    """The three trace operations of one primitive under D-RTRL.

    ``init(x_var, y_var, weight_vars, n, batch_shape, params) -> trace``;
    ``update(trace, d, x, df, weights, params, batch_ndim) -> trace``;
    ``solve(trace, ct, weights, params, batch_ndim) -> {key: grad}``;
    ``update_solve(trace, d, x, df, ct, weights, params, batch_ndim) -> (trace, grads)`` (optional,
    a fused update followed by the solve on the new trace).
    """

    init: Callable
    update: Callable
    solve: Callable
    update_solve: Optional[Callable] = None

    def update_and_solve(self, trace, d, x, df, ct, weights, params, batch_ndim):
        if self.update_solve is not None:
            return self.update_solve(trace, d, x, df, ct, weights, params, batch_ndim)
        new = self.update(trace, d, x, df, weights, params, batch_ndim)
        return new, self.solve(new, ct, weights, params, batch_ndim)


#: Primitive -> :class:`DRTRLTraceOps` overriding the rule-derived default.
ETP_DRTRL_TRACE_OPS: Dict = {}


def param_trace_zeros(batch_shape, weight_vars, n) -> Dict:
    """A zero weight-shaped trace per trainable key: ``{key: zeros(*batch_shape, *key_shape, n)}``."""
    return {
        k: jnp.zeros((*batch_shape, *v.aval.shape, n), dtype=v.aval.dtype) for k, v in weight_vars.items()
    }


def output_trace_zeros(x_var, y_var, weight_vars, num_hidden_state):
    """The ``init_pp`` rule of an op with an output-shaped df trace: ``zeros(*y.shape, n)``."""
    return jnp.zeros((*y_var.aval.shape, num_hidden_state), dtype=y_var.aval.dtype)


def rule_kwargs(params: dict, aux: Tuple) -> dict:
    """Keyword arguments for a rule call: static params, plus ``aux`` when there are aux operands."""
    kw = dict(params)
    if aux:
        kw["aux"] = tuple(aux)
    return kw


def _default_ops(primitive) -> DRTRLTraceOps:
    batched_prim = primitive in BATCHED_PRIMITIVES

    def init(x_var, y_var, weight_vars, n, batch_shape, params):
        trace = get_rule(primitive, "init_drtrl")(x_var, y_var, weight_vars, n)
        if batched_prim or not batch_shape:
            return trace
        return jax.tree.map(lambda t: jnp.zeros((*batch_shape, *t.shape), t.dtype), trace)

    def instantaneous(x, df_s, weights, params, batch_ndim):
        """Per-batch-element ``xy_to_dw`` for one hidden state: leaves ``(*batch, *leaf)``."""
        xy_to_dw = get_rule(primitive, "xy_to_dw")
        if batched_prim:
            # x: (B, ...), df_s: (B, ...) -> one weight-shaped term per batch element.
            return jax.vmap(lambda xb, gb: xy_to_dw(xb[None], gb[None], weights, **params))(x, df_s)
        # An unbatched primitive under a batched model: y broadcasts over the batch axes of h.
        fn = lambda g: xy_to_dw(x, g, weights, **params)
        for _ in range(batch_ndim):
            fn = jax.vmap(fn)
        return fn(df_s)

    def update(trace, d, x, df, weights, params, batch_ndim):
        yw_to_w = get_rule(primitive, "yw_to_w")
        n = df.shape[-1]
        keys = list(trace)
        new = {k: [] for k in keys}
        for s in range(n):
            acc = None
            for j in range(n):
                term = yw_to_w(d[..., s, j], {k: trace[k][..., j] for k in keys}, **params)
                acc = term if acc is None else jax.tree.map(jnp.add, acc, term)
            inst = instantaneous(x, df[..., s], weights, params, batch_ndim)
            for k in keys:
                new[k].append((acc[k] + inst[k]).astype(trace[k].dtype))
        return {k: jnp.stack(v, axis=-1) for k, v in new.items()}

    def solve(trace, ct, weights, params, batch_ndim):
        yw_to_w = get_rule(primitive, "yw_to_w")
        n = ct.shape[-1]
        out = None
        for s in range(n):
            term = yw_to_w(ct[..., s], {k: v[..., s] for k, v in trace.items()}, **params)
            out = term if out is None else jax.tree.map(jnp.add, out, term)
        return {k: v.sum(axis=tuple(range(batch_ndim))) if batch_ndim else v for k, v in out.items()}

    return DRTRLTraceOps(init=init, update=update, solve=solve)


def get_drtrl_trace_ops(primitive) -> DRTRLTraceOps:
    """The registered override for ``primitive``, else the rule-derived default."""
    ops = ETP_DRTRL_TRACE_OPS.get(primitive)
    return ops if ops is not None else _default_ops(primitive)
