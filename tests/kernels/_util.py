"""Comparison helpers shared by the kernel tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from braintrace_kernels.triton_calls import lowered_for_cuda, triton_calls

#: Normwise relative tolerance of kernel against reference in float32.
TOL_F32 = 1e-6


def rel_err(actual, expected) -> float:
    a = np.asarray(actual, np.float64)
    b = np.asarray(expected, np.float64)
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


def assert_close(actual, expected, tol: float = TOL_F32, what: str = "") -> None:
    """Whole-array check: same shape, every element finite, ``||a - b|| / ||b|| < tol``.

    Interpret mode starts fresh outputs as NaN and in-place outputs as the old (random) trace, so an
    element a kernel fails to write shows up here as non-finite or as a large error.
    """
    a = np.asarray(actual, np.float64)
    b = np.asarray(expected, np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != expected {b.shape}"
    bad = np.argwhere(~np.isfinite(a))
    assert bad.size == 0, f"{what}: {len(bad)} non-finite elements, first at {bad[:5].tolist()}"
    err = rel_err(a, b)
    if not err < tol:
        diff = np.abs(a - b)
        worst = np.argsort(diff.ravel())[::-1][:5]
        rows = [f"  {np.unravel_index(i, a.shape)}: {a.ravel()[i]!r} vs {b.ravel()[i]!r}" for i in worst]
        raise AssertionError(
            f"{what}: relative error {err:.3e} >= {tol:.0e}; worst elements:\n" + "\n".join(rows)
        )


def require_gpu() -> None:
    """Skip (not fail) where JAX sees no CUDA GPU."""
    try:
        has_gpu = any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        has_gpu = False
    if not has_gpu:
        pytest.skip("needs a CUDA GPU (compiled Pallas-Triton kernels)")


def normals(seed: int, *shapes, dtype=np.float32, scale: float = 1.0):
    """Independent standard-normal arrays of the given shapes (numpy, so no JAX RNG differences)."""
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal(shape)).astype(dtype) for shape in shapes]


def csr_pattern(num_in: int, num_out: int, density: float = 0.2, seed: int = 0):
    """A random pattern as COO in CSR order (sorted by row), unique (row, col) pairs, int32."""
    mask = np.random.default_rng(seed).random((num_in, num_out)) < density
    mask[0, 0] = mask[num_in - 1, num_out - 1] = True  # the first and last row and column are used
    rows, cols = np.nonzero(mask)
    return jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32)


def triton_kernel_names(fn, *args) -> list[str]:
    """Names of the Triton kernels in ``jax.jit(fn)(*args)`` lowered for CUDA, in program order.

    Lowering for another platform needs no device: on a CPU machine this runs the Pallas-to-Triton
    lowering, which rejects what interpret mode accepts (tensors whose sizes are not powers of two,
    operations Triton has no lowering for). ``args`` may be ``jax.ShapeDtypeStruct``.
    Compiling the Triton IR to GPU code still needs a GPU.
    """
    return [call.name for call in triton_calls(lowered_for_cuda(fn, *args))]
