"""The CPU lowerings of the trace solves' batch sums (``braintrace/_etrace_op/_cpu_sums.py``): each
form (reduction, unrolled sum, dot) against a numpy oracle, and which form a CPU program holds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from braintrace._etrace_op import _cpu_sums, dense, sparse


def _rng_arrays(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize(
    "shape",
    [(4, 8, 32, 1), (4, 32, 32, 1), (3, 24, 40, 2), (65, 8, 8, 1)],  # reduction, unrolled (2), dot
)
def test_dense_solve_each_form_equals_the_oracle(shape):
    trace, ct = _rng_arrays(0, shape, (shape[0], shape[2], shape[3]))
    got = jax.jit(dense._dense_solve_reference)(trace, ct)
    want = np.einsum("bios,bos->io", trace.astype(np.float64), ct.astype(np.float64))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6


@pytest.mark.parametrize("axes, shape", [((0,), (4, 2048)), ((1, 2), (1024, 2, 4)), ((0,), (3, 100))])
def test_sparse_batch_sum_equals_the_oracle(axes, shape):
    (products,) = _rng_arrays(1, shape)
    got = jax.jit(lambda p: sparse._batch_sum(p, axes))(products)
    want = products.astype(np.float64).sum(axes)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6


def test_which_form_the_cpu_program_holds():
    """Unrolled: no reduce and no dot; small: one reduce; many terms: a dot."""
    assert _cpu_sums.unrolls((4, 32, 32, 1), (0, 3), dense.CPU_UNROLLED_SOLVE_TERMS)
    assert not _cpu_sums.unrolls((4, 8, 32, 1), (0, 3), dense.CPU_UNROLLED_SOLVE_TERMS)
    assert not _cpu_sums.unrolls((65, 8, 8, 1), (0, 3), dense.CPU_UNROLLED_SOLVE_TERMS)

    def ops(shape):
        trace, ct = jnp.ones(shape), jnp.ones((shape[0], shape[2], shape[3]))
        text = jax.jit(dense._dense_solve_reference).lower(trace, ct).as_text()
        return {op: text.count(f"stablehlo.{op}") for op in ("reduce", "dot_general", "case")}

    assert ops((4, 32, 32, 1))["reduce"] == 0 and ops((4, 32, 32, 1))["dot_general"] == 0
    assert ops((4, 8, 32, 1))["reduce"] >= 1
    assert ops((65, 8, 8, 1))["dot_general"] == 1
