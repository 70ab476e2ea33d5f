"""Sums over a few batch rows (and hidden states) as the CPU lowering of the trace solves.

XLA:CPU (jax 0.10) hands a reduction of :data:`MIN_ELEMENTS` elements or more to its YNNPACK
fusion, which is 2-10x slower than a loop fusion on the reductions of the trace solves (a sum of
products over a few batch rows); below that size it keeps the reduction in a loop fusion, which is
the fastest form. The solves therefore lower on the CPU to an unrolled sum of the terms' slices
where the reduction is large and the terms few (one loop fusion, often sharing its pass with the
trace update), and keep the reduction elsewhere and on every other platform.

The weight gradients of the dense products, :math:`x^\top g` summed over the batch rows
(:func:`outer_sum`), are the other case: XLA:CPU lowers such a dot (it contracts the leading axis of
both operands) through Eigen, at about 1 us even for a ``(4, 32)`` by ``(4, 4)`` product, while the
same sum of outer products in one fusion takes 0.05-0.3 us up to :data:`OUTER_SUM_MAX_ELEMENTS`.
"""

from __future__ import annotations

from functools import reduce
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MIN_ELEMENTS",
    "OUTER_SUM_MAX_ELEMENTS",
    "fuses_outer_sum",
    "outer_sum",
    "row_sum",
    "unrolls",
    "unrolled_sum",
]

#: The size from which XLA:CPU lowers a reduction through YNNPACK (measured with jax 0.10.2:
#: ``(4, 32, 32)`` summed over the first axis is a YNNPACK fusion, ``(3, 32, 32)`` a loop fusion).
MIN_ELEMENTS = 4096


def unrolls(shape: Sequence[int], axes: Sequence[int], max_terms: int) -> bool:
    """Whether a sum of an array of ``shape`` over ``axes`` is lowered unrolled on the CPU: at least
    :data:`MIN_ELEMENTS` elements, and at most ``max_terms`` terms (the product of the summed axes'
    lengths; each term is a strided pass over the array)."""
    terms = int(np.prod([shape[a] for a in axes]))
    return terms <= max_terms and int(np.prod(shape)) >= MIN_ELEMENTS


def unrolled_sum(products, axes: Sequence[int]):
    """``products`` summed over ``axes`` as a sum of slices (``axes`` sorted, non-negative)."""
    axes = tuple(axes)
    kept = [a for a in range(products.ndim) if a not in axes]
    terms = jnp.transpose(products, (*axes, *kept))
    terms = terms.reshape((-1, *[products.shape[a] for a in kept]))
    return reduce(jnp.add, [terms[i] for i in range(terms.shape[0])])


#: Size of the product ``x[..., :, None] * g[..., None, :]`` (rows R x I x O) up to which the CPU
#: lowering of :func:`outer_sum` is a fusion rather than a dot. Measured on a 2-core AMD EPYC (jax
#: 0.10.2), per step of a scan, fusion against dot: ``(4, 32) x (4, 4)``: 0.2 against 1.3 us;
#: ``(4, 32) x (4, 32)``: 1.2-1.4 against 1.5 us; ``(8, 64) x (8, 64)``: 2.6 against 3.9 us;
#: ``(4, 128) x (4, 128)``: 44 against 7 us.
OUTER_SUM_MAX_ELEMENTS = 32768

#: Larger products that are still a fusion on the CPU: at least :data:`OUTER_SUM_MANY_ROWS` rows, at
#: most :data:`OUTER_SUM_NARROW_O` columns of ``g`` and :data:`OUTER_SUM_NARROW_MAX_ELEMENTS` elements,
#: where XLA:CPU's dot of two row-major operands contracted on their first axis is at its slowest.
#: Measured as above, fusion against dot, ``R x I x O``: 64 x 512 x 8: 25 against 40 us; 64 x 1024 x
#: 8: 59 against 169 us; 64 x 1024 x 16: 86-97 against 170-205 us; 64 x 2048 x 8: 126 against
#: 200 us; 64 x 256 x 4: 7.7 against 10.4 us. With fewer rows or a wider ``g`` the dot wins or ties:
#: 32 x 4096 x 8: 175 against 93 us; 16 x 1024 x 16: 49 against 23 us; 64 x 1024 x 32: 137
#: against 126 us; 64 x 8 x 1024: 44 against 27 us.
OUTER_SUM_MANY_ROWS, OUTER_SUM_NARROW_O, OUTER_SUM_NARROW_MAX_ELEMENTS = 64, 16, 1 << 21


def fuses_outer_sum(rows: int, n_in: int, n_out: int) -> bool:
    """Whether :func:`outer_sum` of ``(rows, n_in)`` by ``(rows, n_out)`` is one fusion on the CPU."""
    size = rows * n_in * n_out
    if size <= OUTER_SUM_MAX_ELEMENTS:
        return True
    narrow = n_out <= OUTER_SUM_NARROW_O and size <= OUTER_SUM_NARROW_MAX_ELEMENTS
    return rows >= OUTER_SUM_MANY_ROWS and narrow


def outer_sum(x, g, precision=None):
    r"""``out[i, o] = sum_b x[b, i] g[b, o]`` over all leading axes ``b`` (the weight gradient of
    ``x @ W`` for the cotangent ``g``).

    ``x``: ``(*batch, I)``, ``g``: ``(*batch, O)`` (the same leading axes, possibly none) ->
    ``(I, O)`` in ``jnp.result_type(x, g)``. A dot (of ``precision``) on every platform except where
    :func:`fuses_outer_sum` holds on the CPU, where it is one fusion of the outer products (exact
    float products, which every precision of the CPU's dot also computes).

    >>> import jax.numpy as jnp
    >>> x, g = jnp.ones((2, 3)), jnp.arange(8.0).reshape(2, 4)
    >>> outer_sum(x, g).shape
    (3, 4)
    >>> bool(jnp.allclose(outer_sum(x, g), x.T @ g))
    True
    """
    if x.shape[:-1] != g.shape[:-1]:
        raise ValueError(f"outer_sum: x and g must share their leading axes, got x {x.shape} and g {g.shape}")
    lead = tuple(range(x.ndim - 1))

    def dot(x, g):
        return jnp.tensordot(x, g, axes=(lead, lead), precision=precision)

    def fused(x, g):
        # at least float32 accumulation, as the CPU's dot has for a narrower float
        dtype = jnp.result_type(x, g)
        acc = jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype
        products = x.astype(acc)[..., :, None] * g.astype(acc)[..., None, :]
        return jnp.sum(products, axis=lead).astype(dtype)

    if not fuses_outer_sum(int(np.prod(x.shape[:-1])), x.shape[-1], g.shape[-1]):
        return dot(x, g)
    # resolved when lowering: a program for one platform holds one of the two, no conditional
    return jax.lax.platform_dependent(x, g, cpu=fused, default=dot)


def row_sum(a):
    """``a`` summed over its leading axes: ``(*rows, O)`` -> ``(O,)`` (a bias gradient).

    A reduction on every platform; on the CPU, from :data:`MIN_ELEMENTS` elements (where XLA:CPU
    hands a reduction to YNNPACK), a product with a vector of ones, which YNNPACK runs 3-5x faster:
    the sum over 64 rows of a product of two ``(64, 512)`` arrays, per step of a scan on a 2-core
    AMD EPYC (jax 0.10.2), 11 against 54 us; ``(64, 1024)``: 20 against 110 us.

    >>> import jax.numpy as jnp
    >>> print(row_sum(jnp.ones((2, 3, 4))))
    [6. 6. 6. 6.]
    """
    lead = tuple(range(a.ndim - 1))

    def reduction(a):
        return jnp.sum(a, axis=lead)

    if a.size < MIN_ELEMENTS or not lead:
        return reduction(a)

    def cpu(a):
        flat = a.reshape(-1, a.shape[-1])
        return jnp.matmul(jnp.ones(flat.shape[0], flat.dtype), flat, precision=jax.lax.Precision.HIGHEST)

    # resolved when lowering: a program for one platform holds one of the two, no conditional
    return jax.lax.platform_dependent(a, cpu=cpu, default=reduction)
