"""CSR layer products (csr_matmul and its gradient, csr_matmul_transpose, csr_sddmm); GPU twins."""

from __future__ import annotations

import braintrace_kernels as bk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ._util import assert_close, csr_pattern, normals, require_gpu

I, O = 37, 29
# Small blocks: I, O and nnz span several blocks and end in partial ones; segments (about 7 entries)
# take several steps of block_k; block_b=2 splits a batch of 3 into a full and a partial lane block.
SMALL = bk.CsrMatmulBlockSizes(block_units=8, block_k=4, block_nnz=16, block_b=2)


def _pattern():
    return csr_pattern(I, O)


def _product_operands(B, nnz, seed=3):
    x, g, data = normals(seed, (B, I), (B, O), (nnz,))
    return jnp.asarray(x), jnp.asarray(g), jnp.asarray(data)


def _check_products(B, *, block_sizes, interpret):
    rows, cols = _pattern()
    x, g, data = _product_operands(B, rows.shape[0])
    kw = dict(block_sizes=block_sizes, interpret=interpret)
    assert_close(
        bk.csr_matmul(x, data, rows, cols, (I, O), **kw),
        bk.csr_matmul_reference(x, data, rows, cols, (I, O)),
        what="csr_matmul",
    )
    csc = bk.csr_to_csc(rows, cols, O)
    assert_close(
        bk.csr_matmul(x, data, rows, cols, (I, O), csc=csc, **kw),
        bk.csr_matmul_reference(x, data, rows, cols, (I, O)),
        what="csr_matmul with csc",
    )
    # The same non-zeros stored in column order: the segments need no permutation.
    perm, col_ptr = csc
    assert_close(
        bk.csr_matmul(x, data[perm], rows[perm], cols[perm], (I, O), csc=(None, col_ptr), **kw),
        bk.csr_matmul_reference(x, data, rows, cols, (I, O)),
        what="csr_matmul of column-ordered non-zeros",
    )
    assert_close(
        bk.csr_matmul_transpose(g, data, rows, cols, (I, O), **kw),
        bk.csr_matmul_transpose_reference(g, data, rows, cols, (I, O)),
        what="csr_matmul_transpose",
    )
    assert_close(
        bk.csr_sddmm(x, g, rows, cols, **kw), bk.csr_sddmm_reference(x, g, rows, cols), what="csr_sddmm"
    )


@pytest.mark.parametrize("B", [3, 1], ids=["batched", "B1"])
def test_products_match_reference(B):
    _check_products(B, block_sizes=SMALL, interpret=True)


def test_sddmm_walks_a_batch_larger_than_its_lanes():
    """B = 150 with the default 64 lanes: three lane blocks, the last one partial, summed within
    each program (the steps stacked by ``etrace_grad(..., solve_every=K)`` make such batches)."""
    rows, cols = _pattern()
    x, g, _ = _product_operands(150, rows.shape[0])
    assert_close(
        bk.csr_sddmm(x, g, rows, cols, interpret=True),
        bk.csr_sddmm_reference(x, g, rows, cols),
        what="csr_sddmm, B=150",
    )


def test_csr_matmul_gradient_matches_reference():
    rows, cols = _pattern()
    x, _, data = _product_operands(3, rows.shape[0])

    def loss(fn, **kw):
        return lambda x, data: jnp.sum(jnp.sin(fn(x, data, rows, cols, (I, O), **kw)))

    got = jax.grad(loss(bk.csr_matmul, block_sizes=SMALL, interpret=True), argnums=(0, 1))(x, data)
    want = jax.grad(loss(bk.csr_matmul_reference), argnums=(0, 1))(x, data)
    assert_close(got[0], want[0], what="d/dx")
    assert_close(got[1], want[1], what="d/ddata")


# --------------------------------------------------------------------------------------------------
# References against an independent dense matrix, and the segment structure
# --------------------------------------------------------------------------------------------------


def test_product_references_against_dense_matrix():
    rows, cols = _pattern()
    x, g, data = (np.asarray(a, np.float64) for a in _product_operands(3, rows.shape[0]))
    W = np.zeros((I, O))
    W[np.asarray(rows), np.asarray(cols)] = data
    xj, gj, dj = _product_operands(3, rows.shape[0])
    assert_close(bk.csr_matmul_reference(xj, dj, rows, cols, (I, O)), x @ W, what="matmul")
    assert_close(bk.csr_matmul_transpose_reference(gj, dj, rows, cols, (I, O)), g @ W.T, what="transpose")
    assert_close(
        bk.csr_sddmm_reference(xj, gj, rows, cols),
        (x.T @ g)[np.asarray(rows), np.asarray(cols)],
        what="sddmm",
    )


def test_segment_structure():
    rows, cols = _pattern()
    perm, col_ptr = bk.csr_to_csc(rows, cols, O)
    sorted_cols = np.asarray(cols)[np.asarray(perm)]
    assert np.all(np.diff(sorted_cols) >= 0)
    np.testing.assert_array_equal(col_ptr, np.searchsorted(sorted_cols, np.arange(O + 1)))
    want = np.searchsorted(np.asarray(rows), np.arange(I + 1))
    np.testing.assert_array_equal(bk.csr_row_pointers(rows, I), want)


# --------------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------------


def test_block_sizes_must_be_powers_of_two():
    rows, cols = _pattern()
    x, g, data = _product_operands(3, rows.shape[0])
    for field in ("block_units", "block_k", "block_nnz", "block_b"):
        with pytest.raises(ValueError, match=field):
            bad = bk.CsrMatmulBlockSizes(**{field: 24})
            bk.csr_matmul(x, data, rows, cols, (I, O), block_sizes=bad, interpret=True)


def test_index_arrays_checked():
    rows, cols = _pattern()
    nnz = rows.shape[0]
    x, g, data = _product_operands(3, nnz)
    with pytest.raises(ValueError, match="^row_ids has"):
        bk.csr_matmul(x, data, rows[1:], cols, (I, O), interpret=True)
    with pytest.raises(ValueError, match="^col_ids must be 1-D"):
        bk.csr_sddmm(x, g, rows, cols[:, None], interpret=True)
    with pytest.raises(TypeError, match="^col_ids has dtype float32"):
        bk.csr_matmul_transpose(g, data, rows, cols.astype(jnp.float32), (I, O), interpret=True)


def test_product_shapes_checked():
    rows, cols = _pattern()
    x, g, data = _product_operands(3, rows.shape[0])
    with pytest.raises(ValueError, match="^x has shape"):
        bk.csr_matmul(x[:, 1:], data, rows, cols, (I, O), interpret=True)
    with pytest.raises(ValueError, match="^g has shape"):
        bk.csr_matmul_transpose(g[:, 1:], data, rows, cols, (I, O), interpret=True)
    with pytest.raises(TypeError, match="^data has dtype int32"):
        bk.csr_matmul(x, data.astype(jnp.int32), rows, cols, (I, O), interpret=True)


# --------------------------------------------------------------------------------------------------
# GPU twins (compiled through Triton)
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("B", [3, 1], ids=["batched", "B1"])
def test_products_match_reference_gpu(B):
    require_gpu()
    _check_products(B, block_sizes=SMALL, interpret=False)
    _check_products(B, block_sizes=None, interpret=False)
