r"""The sparse product and its weight gradient (an SDDMM), with the forms XLA:CPU runs fastest.

``W`` is ``(I, O)`` with ``nnz`` entries ``w_p`` at ``(r_p, c_p)``; ``x`` is ``(..., I)`` with ``R``
rows (the product of the leading axes).

* :func:`product` :math:`y_{\dots c} = \sum_{p: c_p = c} x_{\dots r_p} w_p`. Every platform but the
  CPU: a gather of ``x`` along its last axis and a scatter-add into ``y`` (batch-major, the layout of
  ``x``). On the CPU, whose gathers and scatters move one element at a time: where the pattern is
  dense enough (:func:`dense_on_cpu`), the matrix made dense and one matrix product; else, for at
  least :data:`CPU_UNIT_MAJOR_MIN_VALUES` gathered values ``nnz R``, the gather and scatter in
  unit-major layout (``x^T`` gathered by row, ``R`` contiguous values per entry, scattered into
  ``y^T``); below that, the batch-major form (the two transposes would cost more than they save).
* :func:`sddmm` :math:`v_p = \sum_b a_{b r_p} g_{b c_p}` (``a`` ``(R, I)``, ``g`` ``(R, O)``).
  Every platform but the CPU: the gathered products reduced over the rows. On the CPU: the entries
  of :math:`a^\top g` (:func:`~braintrace._etrace_op._cpu_sums.outer_sum`, which picks that
  product's CPU form by shape) where the pattern is dense enough; else the products summed over the rows
  unrolled (up to :data:`CPU_SDDMM_UNROLLED_ROWS` rows: one loop fusion), else reduced; and
  reduced below :data:`~braintrace._etrace_op._cpu_sums.MIN_ELEMENTS` products, where the reduction
  is itself one loop fusion.

Measured on a 2-core AMD EPYC (jax 0.10.2), ms per call, ``I = O = H``, ``R`` rows, density ``d``
(batch-major / unit-major / dense; for the SDDMM reduced / unrolled / dense):

=================  ===========================  ===========================
H, R, d            product                      SDDMM
=================  ===========================  ===========================
64, 4, 10%         0.032 / 0.035 / 0.029        0.014 / 0.023 / 0.011
256, 2, 8%         0.031 / 0.025 / 0.034        0.11 / 0.041 / 0.020
512, 8, 5%         0.11 / 0.071 / 0.15          0.35 / 0.068 / 0.18
1024, 32, 5%       11.8 / 1.9 / 0.70            3.3 / 2.2 / 0.45
4096, 8, 5%        8.1 / 3.7 / 30               30 / 2.3 / 31
4096, 32, 1%       36 / 5.8 / 32                19 / 8.1 / 27
4096, 32, 5%       224 / 59 / 38                100 / 64 / 27
=================  ===========================  ===========================

The dense form costs about a pass over the ``I x O`` matrix whatever ``R``; the sparse ones about a
pass over ``nnz x R`` gathered values: dense wins once ``nnz R >= I O``
(:func:`dense_on_cpu`), and is never used above :data:`CPU_DENSE_MAX_ELEMENTS` elements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _cpu_sums

__all__ = [
    "CPU_DENSE_MAX_ELEMENTS",
    "CPU_SDDMM_UNROLLED_ROWS",
    "CPU_UNIT_MAJOR_MIN_VALUES",
    "IN_BOUNDS",
    "dense_on_cpu",
    "product",
    "sddmm",
    "take",
]

#: Gathers and scatters by the index operands promise in-bounds indices: the indices are checked
#: where they have values (see :func:`braintrace.sparse_matmul`), and the default ``'fill'`` mode of
#: ``jnp.take`` would add a bounds test and a select to every gathered element of every step.
IN_BOUNDS = "promise_in_bounds"

#: The largest ``I x O`` the CPU forms make dense (64 MiB of float32).
CPU_DENSE_MAX_ELEMENTS = 1 << 24

#: Gathered values ``nnz R`` from which the CPU's product is unit-major (see the table above).
CPU_UNIT_MAJOR_MIN_VALUES = 8192

#: Rows up to which the CPU's SDDMM sums the gathered products unrolled (see the table above).
CPU_SDDMM_UNROLLED_ROWS = 32


def take(a, ids, axis, *, indices_are_sorted=False):
    """``jnp.take(a, ids, axis)`` for in-bounds ``ids``."""
    where = (Ellipsis, ids) if axis == -1 else (slice(None),) * axis + (ids,)
    return a.at[where].get(mode=IN_BOUNDS, indices_are_sorted=indices_are_sorted)


def dense_on_cpu(rows: int, n_in: int, n_out: int, nnz: int) -> bool:
    """Whether the CPU forms of :func:`product` and :func:`sddmm` make ``W`` dense: ``nnz rows >=
    n_in n_out`` and ``n_in n_out <= CPU_DENSE_MAX_ELEMENTS``."""
    size = n_in * n_out
    return size <= CPU_DENSE_MAX_ELEMENTS and nnz * rows >= size


def _product_batch_major(x, data, row_ids, col_ids, n_out, col_sorted):
    contrib = take(x, row_ids, -1) * data  # (..., nnz)
    y = jnp.zeros(x.shape[:-1] + (n_out,), contrib.dtype)
    return y.at[..., col_ids].add(contrib, mode=IN_BOUNDS, indices_are_sorted=col_sorted)


def product(x, data, row_ids, col_ids, *, n_out: int, col_sorted: bool = False):
    """``y (..., n_out)`` of the module docstring; ``data`` ``(nnz,)``, ids ``(nnz,)`` int32."""
    lead = x.shape[:-1]
    rows, n_in, nnz = int(np.prod(lead)), x.shape[-1], row_ids.shape[0]
    batch_major = lambda x, data, r, c: _product_batch_major(x, data, r, c, n_out, col_sorted)  # noqa: E731
    dense = dense_on_cpu(rows, n_in, n_out, nnz)
    if rows < 2 or data.ndim != 1 or nnz == 0 or not (dense or nnz * rows >= CPU_UNIT_MAJOR_MIN_VALUES):
        return batch_major(x, data, row_ids, col_ids)
    dtype = jnp.result_type(x, data)

    def cpu(x, data, row_ids, col_ids):
        flat = x.reshape(rows, n_in).astype(dtype)
        if dense:
            w = jnp.zeros((n_in, n_out), dtype).at[row_ids, col_ids].add(data.astype(dtype), mode=IN_BOUNDS)
            y = jnp.matmul(flat, w, precision=jax.lax.Precision.HIGHEST)
        else:
            contrib = take(flat.T, row_ids, 0) * data[:, None].astype(dtype)  # (nnz, rows)
            yt = (
                jnp.zeros((n_out, rows), dtype)
                .at[col_ids]
                .add(contrib, mode=IN_BOUNDS, indices_are_sorted=col_sorted)
            )
            y = yt.T
        return y.reshape(*lead, n_out)

    # resolved when lowering: a program for one platform holds one of the two, no conditional
    return jax.lax.platform_dependent(x, data, row_ids, col_ids, cpu=cpu, default=batch_major)


def sddmm(a, g, row_ids, col_ids):
    """``v (nnz,)`` of the module docstring: ``a`` ``(R, I)``, ``g`` ``(R, O)``."""
    rows, n_in = a.shape
    n_out, nnz = g.shape[1], row_ids.shape[0]

    def reduction(a, g, row_ids, col_ids):
        return jnp.sum(take(a, row_ids, 1) * take(g, col_ids, 1), axis=0)

    if nnz == 0 or rows == 0:
        return reduction(a, g, row_ids, col_ids)
    dense = dense_on_cpu(rows, n_in, n_out, nnz)

    def cpu(a, g, row_ids, col_ids):
        if dense:
            full = _cpu_sums.outer_sum(a, g, precision=jax.lax.Precision.HIGHEST)  # (I, O)
            return full.at[row_ids, col_ids].get(mode=IN_BOUNDS)
        products = take(a, row_ids, 1) * take(g, col_ids, 1)  # (rows, nnz)
        if _cpu_sums.unrolls(products.shape, (0,), CPU_SDDMM_UNROLLED_ROWS):
            return _cpu_sums.unrolled_sum(products, (0,))
        return jnp.sum(products, axis=0)

    # resolved when lowering: a program for one platform holds one of the two, no conditional
    return jax.lax.platform_dependent(a, g, row_ids, col_ids, cpu=cpu, default=reduction)
