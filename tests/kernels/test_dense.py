"""Dense trace kernels against their references (interpret mode here, compiled on a GPU)."""

from __future__ import annotations

import dataclasses

import braintrace_kernels as bk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ._util import assert_close, normals, require_gpu

# Small blocks so that every dimension spans several blocks and ends in a partial one.
SMALL = bk.DenseBlockSizes(block_i=16, block_o=8, block_b=2, min_programs=1)
# (B, I, O): I=37, O=29 leave partial tiles; B=3 leaves a partial batch chunk with block_b=2.
RAGGED = [(3, 37, 29), (1, 37, 29)]
# Shapes that are multiples of SMALL's blocks: the unmasked code path.
EVEN = (4, 32, 16)


def _operands(B, I, O, n, seed=0, dtype=np.float32):
    trace, x, df, ct = normals(seed, (B, I, O, n), (B, I), (B, O, n), (B, O, n), dtype=dtype)
    (d,) = normals(seed + 1, (B, O, n, n), dtype=dtype, scale=0.5)
    return tuple(jnp.asarray(a) for a in (trace, d, x, df, ct))


def _check_all_kernels(B, I, O, n, *, block_sizes, interpret, fused_only=False):
    trace, d, x, df, ct = _operands(B, I, O, n)
    kw = dict(block_sizes=block_sizes, interpret=interpret)
    new_ref, dw_ref = bk.dense_trace_update_solve_reference(trace, d, x, df, ct)

    new, dw = bk.dense_trace_update_solve(trace, d, x, df, ct, **kw)
    assert new.dtype == trace.dtype and dw.dtype == jnp.float32
    assert_close(new, new_ref, what="update_solve: new trace")
    assert_close(dw, dw_ref, what="update_solve: dW")
    if fused_only:
        return
    assert_close(bk.dense_trace_update(trace, d, x, df, **kw), new_ref, what="update")
    assert_close(
        bk.dense_trace_solve(trace, ct, **kw), bk.dense_trace_solve_reference(trace, ct), what="solve"
    )
    # The inputs are untouched although the kernel writes the new trace in place of the old one.
    assert_close(trace, _operands(B, I, O, n)[0], tol=1e-30, what="input trace preserved")


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("shape", RAGGED, ids=["batched", "B1"])
def test_kernels_match_reference(shape, n):
    _check_all_kernels(*shape, n, block_sizes=SMALL, interpret=True)


def test_kernels_match_reference_full_blocks():
    # min_programs=264 also splits the batch into one row per program (4 tiles only).
    bs = dataclasses.replace(SMALL, min_programs=264)
    _check_all_kernels(*EVEN, 2, block_sizes=bs, interpret=True, fused_only=True)


# Prefetching the next row: chunks of 3 rows over B = 7 end in a partial chunk of one row.
PREFETCH = dataclasses.replace(SMALL, block_b=3, prefetch=True)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("shape", [(7, 37, 29), (7, 32, 16), (1, 37, 29)], ids=["ragged", "full-tiles", "B1"])
def test_prefetching_kernels_match_reference(shape, n):
    """Two rows in flight per program: partial tiles, full tiles with a partial batch chunk (a
    tile-wide row mask), and a single row (the prefetch past it is masked off)."""
    _check_all_kernels(*shape, n, block_sizes=PREFETCH, interpret=True, fused_only=n == 3)


# Whole-state tiles: n = 2 (a power of two) and n = 3 (padded to 4, the fourth state masked off).
# Interpret mode bounds each dimension on its own, so a missing mask on the padding state would go
# unseen here; compiled, it would touch the next unit's first state: the GPU twin checks that.
VECTOR_STATES = dataclasses.replace(SMALL, vector_states=True)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize(
    "block_sizes",
    [VECTOR_STATES, dataclasses.replace(PREFETCH, vector_states=True)],
    ids=["vector_states", "vector_states+prefetch"],
)
def test_vector_states_kernels_match_reference(block_sizes, n):
    _check_all_kernels(7, 37, 29, n, block_sizes=block_sizes, interpret=True, fused_only=block_sizes.prefetch)


# One program per thin (i, o) tile over the whole batch: a single chunk, so dW is written once with no
# partials to sum (the configuration the tuning sweep compares with the batch chunks).
WHOLE_BATCH = bk.DenseBlockSizes(block_i=1, block_o=16, block_b=64, min_programs=1, prefetch=True)


@pytest.mark.parametrize("n", [1, 2])
def test_whole_batch_programs_match_reference(n):
    _check_all_kernels(7, 37, 29, n, block_sizes=WHOLE_BATCH, interpret=True, fused_only=True)


@pytest.mark.parametrize("field", ["prefetch", "vector_states"])
def test_flags_must_be_bools(field):
    trace, _, _, _, ct = _operands(1, 3, 2, 1)
    with pytest.raises(ValueError, match=field):
        bk.dense_trace_solve(trace, ct, block_sizes=bk.DenseBlockSizes(**{field: 1}), interpret=True)


def test_rows_per_program():
    bs = bk.DenseBlockSizes()  # block_b=8, min_programs=264
    assert bs.rows_per_program(64, 64) == 8  # 64 tiles x 8 chunks = 512 programs
    assert bs.rows_per_program(64, 2) == 1  # a rank-16 LoRA factor: 2 tiles, split the batch fully
    assert bs.rows_per_program(64, 16) == 3  # 16 tiles need 17 chunks
    assert bs.rows_per_program(3, 1000) == 3
    assert bk.DenseBlockSizes(min_programs=1).rows_per_program(64, 2) == 8


def test_bias_trace_is_the_I1_case():
    """A bias trace (B, O, n) is the dense op with I = 1 and x = ones."""
    B, O, n = 3, 29, 2
    trace, d, _, df, ct = _operands(B, 1, O, n)
    new = bk.dense_trace_update(trace, d, jnp.ones((B, 1)), df, block_sizes=SMALL, interpret=True)
    expected = jnp.einsum("bosj,boj->bos", d, trace[:, 0]) + df
    assert_close(new[:, 0], expected, what="bias trace")


def test_float64_interpret():
    with jax.enable_x64(True):
        trace, d, x, df, ct = _operands(3, 37, 29, 2, dtype=np.float64)
        new, dw = bk.dense_trace_update_solve(trace, d, x, df, ct, block_sizes=SMALL, interpret=True)
        new_ref, dw_ref = bk.dense_trace_update_solve_reference(trace, d, x, df, ct)
        assert new.dtype == jnp.float64 and dw.dtype == jnp.float64
        assert_close(new, new_ref, tol=1e-13, what="float64 new trace")
        assert_close(dw, dw_ref, tol=1e-13, what="float64 dW")


def test_bfloat16_storage_interpret():
    ops = [a.astype(jnp.bfloat16) for a in _operands(3, 37, 29, 2)]
    new, dw = bk.dense_trace_update_solve(*ops, block_sizes=SMALL, interpret=True)
    new_ref, dw_ref = bk.dense_trace_update_solve_reference(*ops)
    assert new.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    assert_close(new.astype(jnp.float32), new_ref.astype(jnp.float32), tol=1e-2, what="bf16 new trace")
    assert_close(dw, dw_ref, tol=1e-5, what="bf16 dW (float32 accumulation)")


def test_reference_against_independent_einsum():
    B, I, O, n = 3, 5, 4, 3
    trace, d, x, df, ct = (np.asarray(a, np.float64) for a in _operands(B, I, O, n))
    new = np.zeros_like(trace)
    for s in range(n):
        for j in range(n):
            new[..., s] += d[:, None, :, s, j] * trace[..., j]
        new[..., s] += x[:, :, None] * df[:, None, :, s]
    dw = np.einsum("bios,bos->io", new, ct)
    new_ref, dw_ref = bk.dense_trace_update_solve_reference(*_operands(B, I, O, n))
    assert_close(new_ref, new, what="reference update")
    assert_close(dw_ref, dw, what="reference solve of the new trace")
    assert_close(
        bk.dense_trace_solve_reference(*(jnp.asarray(a, jnp.float32) for a in (trace, ct))),
        np.einsum("bios,bos->io", trace, ct),
        what="reference solve",
    )


# --------------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["block_i", "block_o"])
def test_block_sizes_must_be_powers_of_two(field):
    trace, d, x, df, _ = _operands(1, 3, 2, 1)
    bad = bk.DenseBlockSizes(**{field: 12})
    with pytest.raises(ValueError, match=field):
        bk.dense_trace_update(trace, d, x, df, block_sizes=bad, interpret=True)


def test_block_b_must_be_positive():
    trace, _, _, _, ct = _operands(1, 3, 2, 1)
    with pytest.raises(ValueError, match="block_b"):
        bk.dense_trace_solve(trace, ct, block_sizes=bk.DenseBlockSizes(block_b=0), interpret=True)


@pytest.mark.parametrize(
    "name, index, shape",
    [("d", 1, (3, 29, 2, 3)), ("x", 2, (3, 36)), ("df", 3, (3, 29, 1)), ("ct", 4, (2, 29, 2))],
)
def test_mismatched_shapes_name_the_argument(name, index, shape):
    ops = list(_operands(3, 37, 29, 2))
    ops[index] = jnp.zeros(shape, jnp.float32)
    with pytest.raises(ValueError, match=rf"^{name} has shape"):
        bk.dense_trace_update_solve(*ops, interpret=True)


def test_trace_rank_checked():
    with pytest.raises(ValueError, match="trace must be 4-D"):
        bk.dense_trace_solve(jnp.zeros((3, 4, 5)), jnp.zeros((3, 5, 1)), interpret=True)


def test_dtypes_checked():
    trace, d, x, df, ct = _operands(1, 3, 2, 1)
    with pytest.raises(TypeError, match="^x has dtype int32"):
        bk.dense_trace_update(trace, d, x.astype(jnp.int32), df, interpret=True)
    with pytest.raises(TypeError, match="^trace has dtype float16"):
        bk.dense_trace_solve(trace.astype(jnp.float16), ct, interpret=True)
    with pytest.raises(TypeError, match="^ct has dtype bfloat16 but trace has dtype float32"):
        bk.dense_trace_solve(trace, ct.astype(jnp.bfloat16), interpret=True)
    with jax.enable_x64(True):
        with pytest.raises(TypeError, match="float64 only in interpret mode"):
            bk.dense_trace_solve(trace.astype(jnp.float64), ct.astype(jnp.float64), interpret=False)


# --------------------------------------------------------------------------------------------------
# GPU twins (compiled through Triton)
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("shape", RAGGED, ids=["batched", "B1"])
def test_kernels_match_reference_gpu(shape, n):
    require_gpu()
    _check_all_kernels(*shape, n, block_sizes=SMALL, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 3])
def test_kernels_match_reference_default_blocks_gpu(n):
    require_gpu()
    _check_all_kernels(16, 64, 512, n, block_sizes=None, interpret=False)  # full blocks: unmasked
    _check_all_kernels(13, 50, 300, n, block_sizes=None, interpret=False)  # partial blocks


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 3])
def test_prefetching_kernels_match_reference_gpu(n):
    require_gpu()
    _check_all_kernels(7, 37, 29, n, block_sizes=PREFETCH, interpret=False)
    _check_all_kernels(13, 50, 300, n, block_sizes=bk.DenseBlockSizes(prefetch=True), interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2, 3])
def test_vector_states_kernels_match_reference_gpu(n):
    require_gpu()
    _check_all_kernels(7, 37, 29, n, block_sizes=VECTOR_STATES, interpret=False)
    bs = bk.DenseBlockSizes(block_i=8, vector_states=True, prefetch=True)
    _check_all_kernels(13, 50, 300, n, block_sizes=bs, interpret=False)


@pytest.mark.gpu
def test_bfloat16_storage_gpu():
    require_gpu()
    ops = [a.astype(jnp.bfloat16) for a in _operands(3, 37, 29, 2)]
    new, dw = bk.dense_trace_update_solve(*ops, block_sizes=SMALL)
    new_ref, dw_ref = bk.dense_trace_update_solve_reference(*ops)
    assert_close(new.astype(jnp.float32), new_ref.astype(jnp.float32), tol=1e-2, what="bf16 new trace")
    assert_close(dw, dw_ref, tol=1e-5, what="bf16 dW")
