"""Every kernel lowers to Triton for CUDA, on any machine.

Interpret mode (the other kernel tests) accepts programs that Triton rejects: tensors whose sizes
are not powers of two, operations without a Triton lowering. Lowering for the ``cuda`` platform needs
no GPU, so these tests run the Pallas-to-Triton lowering of every public kernel here, at odd sizes,
the benchmark sizes, float32 and bfloat16 storage and several states per unit, and check which
kernels each function launches. What they cannot check (the Triton IR compiled to GPU code, and the
results) is covered by the ``gpu`` twins of the kernel tests.
"""

from __future__ import annotations

import functools

import braintrace_kernels as bk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from braintrace_kernels.triton_calls import TritonCall, lowered_for_cuda, triton_calls
from jax.experimental import pallas as pl

from ._util import triton_kernel_names

S = jax.ShapeDtypeStruct
I32 = jnp.int32
SMALL_DENSE = bk.DenseBlockSizes(block_i=16, block_o=8, block_b=2, min_programs=1)
PREFETCH_DENSE = bk.DenseBlockSizes(prefetch=True, vector_states=True)
SMALL_CSR = bk.CsrBlockSizes(block_nnz=16, block_b=2)
SMALL_MATMUL = bk.CsrMatmulBlockSizes(block_nnz=16, block_b=2)

# (B, I, O): odd sizes (partial tiles), full small tiles with a partial batch chunk (a row mask over
# the whole tile), a single row, the dense benchmark, a LoRA rank-16 factor.
DENSE_SHAPES = [(3, 37, 29), (3, 32, 16), (1, 37, 29), (64, 512, 512), (64, 16, 1024)]
DTYPES = [jnp.float32, jnp.bfloat16]


def _dense_operands(B, I, O, n, dtype):
    return dict(
        trace=S((B, I, O, n), dtype),
        d=S((B, O, n, n), dtype),
        x=S((B, I), dtype),
        df=S((B, O, n), dtype),
        ct=S((B, O, n), dtype),
    )


@pytest.mark.parametrize(
    "dtype,block_sizes",
    [
        (jnp.float32, None),
        (jnp.bfloat16, None),
        (jnp.float32, SMALL_DENSE),
        (jnp.float32, PREFETCH_DENSE),
        (jnp.bfloat16, PREFETCH_DENSE),
    ],
    ids=["f32", "bf16", "f32-small", "f32-prefetch+vector_states", "bf16-prefetch+vector_states"],
)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dense_kernels_lower(shape, n, dtype, block_sizes):
    ops = _dense_operands(*shape, n, dtype)
    kw = dict(block_sizes=block_sizes)
    update = functools.partial(bk.dense_trace_update, **kw)
    solve = functools.partial(bk.dense_trace_solve, **kw)
    fused = functools.partial(bk.dense_trace_update_solve, **kw)
    t, d, x, df, ct = (ops[k] for k in ("trace", "d", "x", "df", "ct"))
    assert triton_kernel_names(update, t, d, x, df) == ["dense_trace_update"]
    assert triton_kernel_names(solve, t, ct) == ["dense_trace_solve"]
    assert triton_kernel_names(fused, t, d, x, df, ct) == ["dense_trace_update_solve"]


@pytest.mark.parametrize("block_i,block_o,prefetch", [(1, 256, True), (8, 128, False)])
def test_whole_batch_tiles_lower(block_i, block_o, prefetch):
    """The thin tiles of ``ci/tune_kernels.py`` that cover the whole batch (one chunk, no partials)."""
    bs = bk.DenseBlockSizes(
        block_i=block_i, block_o=block_o, block_b=64, min_programs=1, num_warps=2, prefetch=prefetch
    )
    ops = _dense_operands(64, 512, 512, 1, jnp.float32)
    fused = functools.partial(bk.dense_trace_update_solve, block_sizes=bs)
    assert triton_kernel_names(fused, *ops.values()) == ["dense_trace_update_solve"]


@pytest.mark.parametrize("n,padded", [(3, True), (2, False)])
def test_vector_states_masks_the_padded_state(n, padded):
    """With ``vector_states`` a row's ``(block_i, block_o, n)`` tile is accessed as ``n`` padded to a
    power of two; the padded state lies in the next unit, so the compiled kernel must mask it (interpret
    mode bounds each dimension separately and would not notice). Full tiles and batch chunks: the state
    mask is the only one, and ``n = 2`` needs none (the control)."""
    ops = _dense_operands(64, 512, 512, n, jnp.float32)
    block_sizes = bk.DenseBlockSizes(vector_states=True)
    fused = functools.partial(bk.dense_trace_update_solve, block_sizes=block_sizes)
    [call] = triton_calls(lowered_for_cuda(fused, *ops.values()))
    tile = f"tensor<16x256x{pl.next_power_of_2(n)}x!tt.ptr<f32>>"
    accesses = [
        line.split("=")[-1].strip()
        for line in call.ir_text().splitlines()
        if tile in line and ("tt.load" in line or "tt.store" in line)
    ]
    # The row's load, then the store (which Pallas lowers as a load of the old values, unused and
    # removed by Triton, and the store). Operands: tt.load ptr[, mask, other]; tt.store ptr, value[, mask].
    assert [a.split()[0] for a in accesses] == ["tt.load", "tt.load", "tt.store"], accesses
    operands = [a.split(":")[0].count("%") for a in accesses]
    assert operands == ([3, 3, 3] if padded else [1, 1, 2]), accesses


def _csr_operands(nnz, B, n, num_in, num_out, dtype):
    return dict(
        trace=S((nnz, n, B), dtype),
        d_t=S((num_out, n, n, B), dtype),
        x_t=S((num_in, B), dtype),
        df_t=S((num_out, n, B), dtype),
        ct_t=S((num_out, n, B), dtype),
        rows=S((nnz,), I32),
        cols=S((nnz,), I32),
    )


# (nnz, B, I, O): odd sizes, B = 1, the CSR benchmark (4096 units, 205 per row, batch 32).
CSR_SHAPES = [(211, 3, 37, 29), (211, 1, 37, 29), (4096 * 205, 32, 4096, 4096)]


@pytest.mark.parametrize(
    "dtype,block_sizes",
    [(jnp.float32, None), (jnp.bfloat16, None), (jnp.float32, SMALL_CSR)],
    ids=["f32", "bf16", "f32-small"],
)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("shape", CSR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_csr_trace_kernels_lower(shape, n, dtype, block_sizes):
    o = _csr_operands(*shape[:2], n, *shape[2:], dtype)
    kw = dict(block_sizes=block_sizes)
    update = functools.partial(bk.csr_trace_update, **kw)
    solve = functools.partial(bk.csr_trace_solve, **kw)
    fused = functools.partial(bk.csr_trace_update_solve, **kw)
    names = triton_kernel_names(update, o["trace"], o["d_t"], o["x_t"], o["df_t"], o["rows"], o["cols"])
    assert names == ["csr_trace_update"]
    assert triton_kernel_names(solve, o["trace"], o["ct_t"], o["cols"]) == ["csr_trace_solve"]
    args = (o["trace"], o["d_t"], o["x_t"], o["df_t"], o["ct_t"], o["rows"], o["cols"])
    assert triton_kernel_names(fused, *args) == ["csr_trace_update_solve"]


# (nnz, B, I, O): odd sizes, B = 1, the spiking benchmark's recurrence (50k neurons, 25M synapses).
MATMUL_SHAPES = [(211, 3, 37, 29), (211, 1, 37, 29), (25_000_000, 8, 50_000, 50_000)]


@pytest.mark.parametrize(
    "dtype,block_sizes",
    [(jnp.float32, None), (jnp.bfloat16, None), (jnp.float32, SMALL_MATMUL)],
    ids=["f32", "bf16", "f32-small"],
)
@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_csr_products_lower(shape, dtype, block_sizes):
    nnz, B, I, O = shape
    x, g, data = S((B, I), dtype), S((B, O), dtype), S((nnz,), dtype)
    rows, cols, col_ptr = S((nnz,), I32), S((nnz,), I32), S((O + 1,), I32)
    kw = dict(block_sizes=block_sizes)

    def forward_in_column_order(x, data, rows, cols, col_ptr):
        return bk.csr_matmul(x, data, rows, cols, (I, O), csc=(None, col_ptr), **kw)

    def forward_with_permutation(x, data, rows, cols, perm, col_ptr):
        return bk.csr_matmul(x, data, rows, cols, (I, O), csc=(perm, col_ptr), **kw)

    def gradients(x, data, rows, cols, col_ptr):
        def loss(x, data):
            y = forward_in_column_order(x, data, rows, cols, col_ptr)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1))(x, data)

    transpose = functools.partial(bk.csr_matmul_transpose, shape=(I, O), **kw)
    sddmm = functools.partial(bk.csr_sddmm, **kw)
    assert triton_kernel_names(forward_in_column_order, x, data, rows, cols, col_ptr) == ["csr_segment_sum"]
    perm = S((nnz,), I32)
    assert triton_kernel_names(forward_with_permutation, x, data, rows, cols, perm, col_ptr) == [
        "csr_segment_sum"
    ]
    # Backward: the forward again (its residuals are the operands), then the transpose and the SDDMM.
    assert sorted(triton_kernel_names(gradients, x, data, rows, cols, col_ptr)) == [
        "csr_sddmm",
        "csr_segment_sum",
        "csr_segment_sum",
    ]
    assert triton_kernel_names(lambda g, d, r, c: transpose(g, d, r, c), g, data, rows, cols) == [
        "csr_segment_sum"
    ]
    assert triton_kernel_names(sddmm, x, g, rows, cols) == ["csr_sddmm"]


def test_sddmm_over_stacked_steps_lowers():
    """(d)'s weight gradient over 32 stacked steps of batch 8: 256 rows, four lane blocks walked
    inside one kernel (no partial gradients, no second launch to sum them)."""
    nnz, B, I, O = 25_000_000, 256, 50_000, 50_000
    args = S((B, I), jnp.float32), S((B, O), jnp.float32), S((nnz,), I32), S((nnz,), I32)
    assert triton_kernel_names(bk.csr_sddmm, *args) == ["csr_sddmm"]
    assert "stablehlo.reduce" not in lowered_for_cuda(bk.csr_sddmm, *args)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("B", [64, 3, 1])
def test_lora_kernels_lower(B, n, dtype):
    I, O, R = (1024, 1024, 16) if B == 64 else (37, 29, 5)
    E, TA = S((B, I, O, n), dtype), S((B, R, O, n), dtype)
    d, x, z = S((B, O, n, n), dtype), S((B, I), dtype), S((B, R), dtype)
    df, ct, A = S((B, O, n), dtype), S((B, O, n), dtype), S((R, O), dtype)
    update = functools.partial(bk.lora_trace_update, alpha=0.5)
    solve = functools.partial(bk.lora_trace_solve, alpha=0.5)
    fused = functools.partial(bk.lora_trace_update_solve, alpha=0.5)
    assert triton_kernel_names(update, E, TA, d, x, z, df) == ["dense_trace_update"] * 2
    assert triton_kernel_names(solve, E, TA, ct, A) == ["dense_trace_solve"] * 2
    assert triton_kernel_names(fused, E, TA, d, x, z, df, ct, A) == ["dense_trace_update_solve"] * 2


def test_the_lowering_rejects_what_interpret_mode_accepts():
    """The check can fail: a kernel building a tensor of 3 elements runs in interpret mode but has
    no Triton lowering."""
    from braintrace_kernels._common import compiler_params, load, store, whole_array_spec

    def kernel(x_ref, o_ref):
        store(o_ref.at[pl.ds(0, 3)], 2.0 * load(x_ref.at[pl.ds(0, 3)]))

    def fn(x, interpret=False):
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
            in_specs=[whole_array_spec()],
            out_specs=whole_array_spec(),
            compiler_params=compiler_params(4, 1, interpret),
            interpret=interpret,
        )(x)

    x = jnp.arange(8.0)
    assert float(fn(x, interpret=True)[2]) == 4.0
    with pytest.raises(Exception, match="power of 2"):
        triton_kernel_names(fn, S((8,), jnp.float32))


def test_triton_calls_reads_the_attributes_and_fails_on_a_changed_format():
    line = (
        "%0 = stablehlo.custom_call @__gpu$xla.gpu.triton(%arg0) {backend_config = {grid_x = 1 : i32, "
        'ir = "ML\\EFR\\\\x\\22y", name = "k", num_stages = 2 : i32, num_warps = 8 : i32}}'
    )
    assert triton_calls("other\n" + line) == [TritonCall("k", 8, 2, b'ML\xefR\\x"y')]
    with pytest.raises(ValueError, match="without name"):
        triton_calls(line.replace('name = "k"', 'kernel = "k"'))


def test_cuda_target_names_the_gpu_the_lowering_asks_for():
    """Without a GPU, ``cuda_target`` puts an abstract GPU (with the mesh's axes) in the context the
    Pallas-to-Triton lowering reads, and restores the context after; with a GPU it changes nothing."""
    from braintrace_kernels.triton_calls import ABSTRACT_GPU, cuda_target

    before = jax.sharding.get_abstract_mesh()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
    for given, axes in ((None, ()), (mesh, ("batch",))):
        with cuda_target(given):
            inside = jax.sharding.get_abstract_mesh()
        if jax.default_backend() == "gpu":
            assert inside == before
            continue
        assert inside.abstract_device.device_kind == ABSTRACT_GPU
        assert inside.abstract_device.platform == "gpu"
        assert tuple(inside.axis_names) == axes
    assert jax.sharding.get_abstract_mesh() == before
