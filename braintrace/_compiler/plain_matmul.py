r"""The plain matrix products of a model step, with a weight cotangent that suits the CPU.

A plain (non-ETP) product ``y = x @ W`` in a model (a read-out, a gate) gets its gradient from
ordinary reverse mode within the step, where JAX transposes it into
:math:`\partial L/\partial W = \sum_b x_b^\top g_b`: a dot that contracts the leading (batch) axis
of both operands. XLA:CPU runs that dot through Eigen, at about 1 us per step even for a
``(4, 32)`` by ``(4, 4)`` product, several times the cost of the rest of a small model's read-out.
The learners therefore evaluate such equations through :func:`bind_plain_matmul`: the same forward
product, and a VJP whose weight cotangent is :func:`braintrace._etrace_op._cpu_sums.outer_sum` (one
fusion of outer products for a small product on the CPU, the same dot as JAX's everywhere else)
and whose input cotangent is JAX's :math:`g W^\top`.

Only a matrix product proper is rewritten (:func:`is_plain_matmul`): a 2-D right operand contracted
on its first axis with the last axis of the left one, no batch dimensions, one real floating dtype
throughout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from braintrace._compatible_imports import bind_equation
from braintrace._etrace_op._cpu_sums import outer_sum

__all__ = ["is_plain_matmul", "bind_plain_matmul"]


def is_plain_matmul(eqn) -> bool:
    """Whether ``eqn`` is ``x @ W`` (``x`` ``(..., I)``, ``W`` ``(I, O)``) in one real float dtype."""
    if eqn.primitive is not jax.lax.dot_general_p or len(eqn.invars) != 2:
        return False
    x, w = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
    preferred = eqn.params.get("preferred_element_type")
    return (
        w.ndim == 2
        and x.ndim >= 1
        and tuple(lhs_c) == (x.ndim - 1,)
        and tuple(rhs_c) == (0,)
        and not tuple(lhs_b)
        and not tuple(rhs_b)
        and jnp.issubdtype(out.dtype, jnp.floating)
        and x.dtype == w.dtype == out.dtype
        and (preferred is None or jnp.dtype(preferred) == out.dtype)
    )


def bind_plain_matmul(eqn, invals):
    """``[x @ W]`` for an equation accepted by :func:`is_plain_matmul`, bound as the equation binds
    it, with the VJP of the module docstring. Returns the equation's output list."""
    precision = eqn.params.get("precision")

    @jax.custom_vjp
    def product(x, w):
        return bind_equation(eqn, [x, w])[0]

    def fwd(x, w):
        return product(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        dx = jnp.matmul(g, w.T, precision=precision).astype(x.dtype)
        return dx, outer_sum(x, g, precision=precision).astype(w.dtype)

    product.defvjp(fwd, bwd)
    return [product(*invals)]
