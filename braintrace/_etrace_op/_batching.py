"""Batching rules that keep the ETP marker under ``vmap``.

A batching rule derived as ``jax.vmap(impl)`` inlines the op, so ``make_jaxpr(vmap(f))`` would show
plain ``dot_general`` and the compiler would find no ETP relation. When only ``x`` is mapped, the
built-ins re-bind a batched ETP primitive instead: an unbatched primitive (``etp_mv``) becomes its
batched twin (``etp_mm``), and a batched one folds the mapped axis into its batch axis.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

__all__ = ["make_x_batching_rule"]


def make_x_batching_rule(get_self, get_batched, x_index: int = 0):
    """A batching rule for a primitive whose ``x`` sits at ``invars[x_index]``.

    ``get_self()`` / ``get_batched()`` return the primitive and its batched twin (called lazily
    because the primitives are created after the rule).
    """

    def rule(args, dims, **params):
        self_p, batched_p = get_self(), get_batched()
        others_mapped = any(d is not None for i, d in enumerate(dims) if i != x_index)
        if others_mapped or dims[x_index] is None:
            out = jax.vmap(partial(self_p.impl_fn, **params), in_axes=tuple(dims))(*args)
            return out, 0
        x = jnp.moveaxis(args[x_index], dims[x_index], 0)
        new_args = list(args)
        if self_p is batched_p:
            # Fold the mapped axis into the primitive's own batch axis.
            v, b = x.shape[0], x.shape[1]
            new_args[x_index] = x.reshape((v * b,) + x.shape[2:])
            y = batched_p.bind(*new_args, **params)
            return y.reshape((v, b) + y.shape[1:]), 0
        new_args[x_index] = x
        return batched_p.bind(*new_args, **params), 0

    return rule
