"""Fused trace operations as primitives with a reference and a kernel lowering.

A fused operation (for example the dense D-RTRL trace update ``eps <- D eps + x (x) df``) is a JAX
primitive whose default lowering is its reference implementation (composed from the op's ETP
rules) and whose lowering under ``set_backend('pallas')`` is a Pallas kernel. Both compute the same
function, so they can be compared element by element. The traces they act on are never
differentiated (the algorithms stop gradients at them), so the primitives define no JVP.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax

from braintrace._compatible_imports import Primitive, batching, mlir

__all__ = ["fused_op"]


def fused_op(
    name: str, reference: Callable, kernel: Callable, *, multiple_results: bool = False
) -> Primitive:
    """A primitive computing ``reference(*arrays, **params)``, lowered to ``kernel`` under 'pallas'.

    ``kernel(*arrays, interpret: bool, **params)`` must compute the same function.
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
    install_kernel_lowerings(p)

    def batch_rule(args, dims, **params):
        out = jax.vmap(partial(reference, **params), in_axes=tuple(dims))(*args)
        return (out, [0] * len(out)) if multiple_results else (out, 0)

    batching.primitive_batchers[p] = batch_rule
    return p
