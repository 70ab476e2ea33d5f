"""Sums over a few batch rows (and hidden states) as the CPU lowering of the trace solves.

XLA:CPU (jax 0.10) hands a reduction of :data:`MIN_ELEMENTS` elements or more to its YNNPACK
fusion, which is 2-10x slower than a loop fusion on the reductions of the trace solves (a sum of
products over a few batch rows); below that size it keeps the reduction in a loop fusion, which is
the fastest form. The solves therefore lower on the CPU to an unrolled sum of the terms' slices
where the reduction is large and the terms few (one loop fusion, often sharing its pass with the
trace update), and keep the reduction elsewhere and on every other platform.

The weight gradients of the dense products, :math:`x^\top g` summed over the batch rows
(:func:`outer_sum`), are the other case: XLA:CPU lowers such a dot (it contracts the leading axis of
both operands) through Eigen, at about 1 us even for a ``(4, 32)`` by ``(4, 4)`` product and 107 us
for ``(64, 512)`` by ``(64, 8)``. The same sum of outer products in one fusion takes 0.05-0.3 us up
to :data:`OUTER_SUM_MAX_ELEMENTS`, and a row-major GEMM after copying the narrow operand transposed
12 us (:func:`outer_sum_form` chooses).
"""

from __future__ import annotations

from functools import reduce
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MIN_ELEMENTS",
    "OUTER_SUM_FORMS",
    "OUTER_SUM_MAX_ELEMENTS",
    "outer_sum",
    "outer_sum_form",
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
#: lowering of :func:`outer_sum` is a fusion (where no matrix product of :func:`outer_sum_form` is
#: chosen first). Measured on a 2-core AMD EPYC (jax 0.10.2), per step of a scan, fusion against
#: dot: ``(4, 32) x (4, 4)``: 0.2 against 1.3 us; ``(4, 32) x (4, 32)``: 1.2-1.4 against 1.5 us;
#: ``(8, 64) x (8, 64)``: 2.6 against 3.9 us; ``(4, 128) x (4, 128)``: 44 against 7 us.
OUTER_SUM_MAX_ELEMENTS = 32768

#: The CPU forms of :func:`outer_sum` (see :func:`outer_sum_form`).
OUTER_SUM_FORMS = ("fusion", "gemm_gtx", "gemm_xtg", "dot")


def outer_sum_form(rows: int, n_in: int, n_out: int) -> str:
    r"""How :func:`outer_sum` of ``(rows, n_in)`` by ``(rows, n_out)`` is lowered on the CPU.

    XLA:CPU runs a dot that contracts the leading axis of both operands through Eigen, which is at
    its slowest for a narrow ``g``; it runs a product of row-major operands contracted on the
    inner axis (a GEMM) through YNNPACK. The forms:

    - ``'gemm_gtx'``: :math:`(g^\top x)^\top`, the GEMM ``(O, R) @ (R, I)`` after copying ``g``
      transposed, and the ``(O, I)`` result transposed (``O (R + I)`` values moved): for a narrow
      ``g`` and a wide ``x``;
    - ``'gemm_xtg'``: ``x`` copied transposed (``R I`` values), then the GEMM ``(I, R) @ (R, O)``:
      for a narrow ``x`` and a wide ``g``;
    - ``'fusion'``: the sum of the outer products in one loop fusion, for small products;
    - ``'dot'``: the dot itself.

    Measured per step of a scan on a 2-core AMD EPYC (jax 0.10.2), over R in {4, 16, 64, 256},
    I in {8, ..., 2048}, O in {4, ..., 512}: these choices are within 10% of the fastest of the
    four forms on average (the geometric mean of chosen over fastest; it was 1.56 with the fusion
    and the dot alone) and within 2.5x everywhere. Examples, R x I x O, chosen against dot
    (against fusion where that was the choice before): 64 x 512 x 8: 12 against 107 (38) us;
    256 x 2048 x 8: 175 against 1331 us; 256 x 2048 x 32: 370 against 1664 us; 256 x 32 x 512
    (``'gemm_xtg'``): 103 against 134 us; 64 x 512 x 512 (``'dot'``): all three GEMMs 365-393 us.
    """
    if n_out <= 32 and n_in >= 128 and (n_out <= 8 or rows >= 16):
        return "gemm_gtx"
    if n_out <= 8 and n_in >= 32 and rows >= 64:
        return "gemm_gtx"
    if n_out <= 128 and n_in >= 512 and rows * n_in >= 1 << 17:
        return "gemm_gtx"
    if rows * n_in * n_out <= OUTER_SUM_MAX_ELEMENTS:
        return "fusion"
    if n_in <= 32 and n_out >= 128:
        return "gemm_xtg"
    return "dot"


def outer_sum(x, g, precision=None):
    r"""``out[i, o] = sum_b x[b, i] g[b, o]`` over all leading axes ``b`` (the weight gradient of
    ``x @ W`` for the cotangent ``g``).

    ``x``: ``(*batch, I)``, ``g``: ``(*batch, O)`` (the same leading axes, possibly none) ->
    ``(I, O)`` in ``jnp.result_type(x, g)``. A dot (of ``precision``) on every platform but the CPU,
    where :func:`outer_sum_form` chooses between that dot, one fusion of the outer products and two
    GEMMs of a transposed copy. A float narrower than float32 is summed in float32 in every form.

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
    dtype = jnp.result_type(x, g)
    acc = jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype
    n_in, n_out = x.shape[-1], g.shape[-1]

    def product(a, b):
        """``a @ b`` of two row-major matrices, accumulated in ``acc``."""
        return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision, preferred_element_type=acc)

    def dot(x, g):
        return jnp.tensordot(x, g, axes=(lead, lead), precision=precision, preferred_element_type=acc)

    def fusion(x, g):
        products = x.astype(acc)[..., :, None] * g.astype(acc)[..., None, :]
        return jnp.sum(products, axis=lead)

    # A transpose between two barriers is a copy: XLA would fold it into the dimensions of the dot
    # that consumes it, or of a dot that produced its operand (transposing both of that dot's
    # operands: 280 us for the (16, 64) transpose of x @ B of a (64, 1024) x and a rank-16 B).
    barrier = jax.lax.optimization_barrier

    def transposed(a):
        return barrier(barrier(a).T)

    def gemm_gtx(x, g):
        return barrier(product(transposed(g.reshape(-1, n_out)), x.reshape(-1, n_in))).T

    def gemm_xtg(x, g):
        return product(transposed(x.reshape(-1, n_in)), g.reshape(-1, n_out))

    def cast(form):
        return lambda x, g: form(x, g).astype(dtype)

    cpu = {"fusion": fusion, "gemm_gtx": gemm_gtx, "gemm_xtg": gemm_xtg, "dot": dot}[
        outer_sum_form(int(np.prod(x.shape[:-1])), n_in, n_out)
    ]
    if cpu is dot:
        return cast(dot)(x, g)
    # resolved when lowering: a program for one platform holds one of the two, no conditional
    return jax.lax.platform_dependent(x, g, cpu=cast(cpu), default=cast(dot))


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
