"""Fused trace operations as primitives with a reference and a kernel lowering.

A fused operation (for example the dense D-RTRL trace update ``eps <- D eps + x (x) df``) is a JAX
primitive whose default lowering is its reference implementation (composed from the op's ETP
rules) and whose lowering under ``set_backend('pallas')`` is a Pallas kernel. Both compute the same
function, so they can be compared element by element. The traces they act on are never
differentiated (the algorithms stop gradients at them), so the primitives define no JVP.

A fused operation states where its operands and results keep the batch axis (``batch_layout``):
on a program whose batch is sharded over several devices, its kernel then runs once per batch shard
(``braintrace/_batch_sharding.py``) instead of on arrays gathered to every device.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import jax

from braintrace._compatible_imports import Primitive, batching, mlir

__all__ = ["fused_op"]


def fused_op(
    name: str,
    reference: Callable,
    kernel: Callable,
    *,
    multiple_results: bool = False,
    batch_layout: Optional["BatchLayout"] = None,  # noqa: F821 - braintrace._batch_sharding
) -> Primitive:
    """A primitive computing ``reference(*arrays, **params)``, lowered to ``kernel`` under 'pallas'.

    ``kernel(*arrays, interpret: bool, **params)`` must compute the same function. ``batch_layout``
    (a :class:`braintrace._batch_sharding.BatchLayout`) says which operand and result axes are the
    batch, and which results sum over it, so that the kernel can run per batch shard.
    """
    from braintrace._backend import install_kernel_lowerings

    p = Primitive(name)
    p.multiple_results = multiple_results
    p.impl_fn = reference
    p.kernel_fn = kernel
    p.def_impl(reference)

    def abstract(*avals, **params):
        shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
        out = jax.eval_shape(partial(reference, **params), *shapes)
        to_aval = lambda o: jax.core.ShapedArray(o.shape, o.dtype)
        return [to_aval(o) for o in out] if multiple_results else to_aval(out)

    p.def_abstract_eval(abstract)
    mlir.register_lowering(p, mlir.lower_fun(reference, multiple_results=multiple_results))
    install_kernel_lowerings(p, batch_layout=batch_layout)

    def batch_rule(args, dims, **params):
        out = jax.vmap(partial(reference, **params), in_axes=tuple(dims))(*args)
        return (out, [0] * len(out)) if multiple_results else (out, 0)

    batching.primitive_batchers[p] = batch_rule
    return p
