"""CSR trace kernels (kernel layout (nnz, n, B)) against their references; GPU twins."""

from __future__ import annotations

import braintrace_kernels as bk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ._util import assert_close, csr_pattern, normals, require_gpu

I, O = 37, 29
# Small blocks: nnz (about 210) spans several blocks and ends in a partial one; block_b=2 splits a
# batch of 3 into a full and a partial lane block.
SMALL = bk.CsrBlockSizes(block_nnz=16, block_b=2)


def _pattern(num_in=I, num_out=O):
    return csr_pattern(num_in, num_out)


def _trace_operands(nnz, B, n, seed=0, num_in=I, num_out=O):
    trace, x_t, df_t, ct_t = normals(seed, (nnz, n, B), (num_in, B), (num_out, n, B), (num_out, n, B))
    (d_t,) = normals(seed + 1, (num_out, n, n, B), scale=0.5)
    return tuple(jnp.asarray(a) for a in (trace, d_t, x_t, df_t, ct_t))


def _check_trace_kernels(B, n, *, block_sizes, interpret, num_in=I, num_out=O):
    rows, cols = _pattern(num_in, num_out)
    trace, d_t, x_t, df_t, ct_t = _trace_operands(rows.shape[0], B, n, num_in=num_in, num_out=num_out)
    kw = dict(block_sizes=block_sizes, interpret=interpret)
    new_ref, dw_ref = bk.csr_trace_update_solve_reference(trace, d_t, x_t, df_t, ct_t, rows, cols)

    new, dw = bk.csr_trace_update_solve(trace, d_t, x_t, df_t, ct_t, rows, cols, **kw)
    assert new.dtype == jnp.float32 and dw.dtype == jnp.float32
    assert_close(new, new_ref, what="update_solve: new trace")
    assert_close(dw, dw_ref, what="update_solve: dw")
    assert_close(bk.csr_trace_update(trace, d_t, x_t, df_t, rows, cols, **kw), new_ref, what="update")
    assert_close(
        bk.csr_trace_solve(trace, ct_t, cols, **kw),
        bk.csr_trace_solve_reference(trace, ct_t, cols),
        what="solve",
    )


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("B", [3, 1], ids=["batched", "B1"])
def test_trace_kernels_match_reference(B, n):
    _check_trace_kernels(B, n, block_sizes=SMALL, interpret=True)


def test_trace_kernels_full_blocks():
    """nnz, B multiples of the blocks: the unmasked code path."""
    rows, cols = _pattern()
    nnz = rows.shape[0] - rows.shape[0] % 16
    rows, cols = rows[:nnz], cols[:nnz]
    trace, d_t, x_t, df_t, ct_t = _trace_operands(nnz, 4, 2)
    new, dw = bk.csr_trace_update_solve(
        trace, d_t, x_t, df_t, ct_t, rows, cols, block_sizes=SMALL, interpret=True
    )
    new_ref, dw_ref = bk.csr_trace_update_solve_reference(trace, d_t, x_t, df_t, ct_t, rows, cols)
    assert_close(new, new_ref, what="new trace")
    assert_close(dw, dw_ref, what="dw")


# --------------------------------------------------------------------------------------------------
# The reference against an independent dense computation, and the layout helpers
# --------------------------------------------------------------------------------------------------


def test_trace_references_against_dense_trace():
    """Scatter the CSR trace into a dense (B, I, O, n) trace, update it densely, gather it back."""
    B, n = 3, 2
    rows, cols = _pattern()
    trace, d_t, x_t, df_t, ct_t = (np.asarray(a, np.float64) for a in _trace_operands(rows.shape[0], B, n))
    r, c = np.asarray(rows), np.asarray(cols)
    dense = np.zeros((B, I, O, n))
    dense[:, r, c, :] = np.transpose(trace, (2, 0, 1))
    d, x, df, ct = (np.moveaxis(a, -1, 0) for a in (d_t, x_t, df_t, ct_t))  # batch first
    dense_new = np.einsum("bosj,bioj->bios", d, dense) + np.einsum("bi,bos->bios", x, df)
    dense_dw = np.einsum("bios,bos->io", dense_new, ct)

    new_ref, dw_ref = bk.csr_trace_update_solve_reference(*_trace_operands(rows.shape[0], B, n), rows, cols)
    assert_close(bk.csr_trace_from_kernel_layout(new_ref), dense_new[:, r, c, :], what="update vs dense")
    assert_close(dw_ref, dense_dw[r, c], what="solve vs dense")


def test_layout_round_trip():
    rows, _ = _pattern()
    nnz = rows.shape[0]
    (rule,) = normals(5, (3, nnz, 2))
    kernel = bk.csr_trace_to_kernel_layout(jnp.asarray(rule))
    assert kernel.shape == (nnz, 2, 3)
    np.testing.assert_array_equal(kernel[7, 1, 2], rule[2, 7, 1])
    np.testing.assert_array_equal(bk.csr_trace_from_kernel_layout(kernel), rule)
    assert bk.csr_unit_major(jnp.zeros((3, O, 2, 2))).shape == (O, 2, 2, 3)


# --------------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------------


def test_block_sizes_must_be_powers_of_two():
    rows, cols = _pattern()
    trace, _, _, _, ct_t = _trace_operands(rows.shape[0], 3, 1)
    for field in ("block_nnz", "block_b"):
        with pytest.raises(ValueError, match=field):
            bk.csr_trace_solve(trace, ct_t, cols, block_sizes=bk.CsrBlockSizes(**{field: 24}), interpret=True)


def test_index_arrays_checked():
    rows, cols = _pattern()
    nnz = rows.shape[0]
    trace, d_t, x_t, df_t, ct_t = _trace_operands(nnz, 3, 1)
    with pytest.raises(TypeError, match="^row_ids has dtype float32"):
        bk.csr_trace_update(trace, d_t, x_t, df_t, rows.astype(jnp.float32), cols, interpret=True)
    with pytest.raises(ValueError, match=f"^col_ids has {nnz - 1} entries, expected {nnz}"):
        bk.csr_trace_solve(trace, ct_t, cols[:-1], interpret=True)
    with pytest.raises(ValueError, match="^row_ids must be 1-D"):
        bk.csr_trace_update(trace, d_t, x_t, df_t, rows[:, None], cols, interpret=True)


def test_int64_indices_are_converted():
    """int64 (under x64) is accepted and converted to int32; results match the int32 call."""
    rows, cols = _pattern()
    trace, _, _, _, ct_t = _trace_operands(rows.shape[0], 3, 1)
    want = bk.csr_trace_solve(trace, ct_t, cols, block_sizes=SMALL, interpret=True)
    with jax.enable_x64(True):
        got = bk.csr_trace_solve(trace, ct_t, cols.astype(jnp.int64), block_sizes=SMALL, interpret=True)
    assert_close(got, want, tol=1e-30, what="int64 indices")


@pytest.mark.parametrize(
    "name, index, shape",
    [("d_t", 1, (O, 2, 1, 3)), ("x_t", 2, (I, 2)), ("df_t", 3, (O, 1, 3)), ("ct_t", 4, (O, 2, 4))],
)
def test_mismatched_shapes_name_the_argument(name, index, shape):
    rows, cols = _pattern()
    ops = list(_trace_operands(rows.shape[0], 3, 2))
    ops[index] = jnp.zeros(shape, jnp.float32)
    with pytest.raises(ValueError, match=rf"^{name} has shape"):
        bk.csr_trace_update_solve(*ops, rows, cols, interpret=True)


def test_trace_layout_checked():
    with pytest.raises(ValueError, match="csr_trace_to_kernel_layout"):
        bk.csr_trace_solve(jnp.zeros((3, 10)), jnp.zeros((O, 1, 3)), jnp.zeros(10, jnp.int32), interpret=True)


# --------------------------------------------------------------------------------------------------
# GPU twins (compiled through Triton)
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("B", [3, 1], ids=["batched", "B1"])
def test_trace_kernels_match_reference_gpu(B, n):
    require_gpu()
    _check_trace_kernels(B, n, block_sizes=SMALL, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 2])
def test_trace_kernels_default_blocks_gpu(n):
    require_gpu()
    _check_trace_kernels(32, n, block_sizes=None, interpret=False, num_in=300, num_out=260)
    _check_trace_kernels(20, n, block_sizes=None, interpret=False, num_in=300, num_out=260)
