"""The CPU forms of the sparse product and SDDMM (``braintrace/_etrace_op/_sparse_cpu.py``).

Each form (batch-major, unit-major and dense product; reduced, unrolled and dense SDDMM) against a
numpy oracle built from the COO entries (duplicates summed), on random patterns with repeated and
unsorted entries, float64; and which form a CPU program holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from braintrace._etrace_op import _cpu_sums, _sparse_cpu


def _pattern(rng, n_in, n_out, nnz):
    rows = rng.integers(0, n_in, nnz).astype(np.int32)
    cols = rng.integers(0, n_out, nnz).astype(np.int32)
    return rows, cols


def _dense(rows, cols, data, n_in, n_out):
    w = np.zeros((n_in, n_out))
    np.add.at(w, (rows, cols), data)
    return w


# (lead shape of x, I, O, nnz): R = 1 and few values (batch-major), sparse (unit-major product,
# unrolled SDDMM), dense (nnz R >= I O), many rows (reduced SDDMM)
CASES = [
    ((), 6, 5, 9),
    ((1,), 6, 5, 9),
    ((3,), 30, 20, 25),
    ((2, 2), 200, 200, 2100),
    ((2, 2), 8, 8, 40),
    ((4,), 8, 8, 40),
    ((40,), 64, 64, 50),
]


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16))
def test_each_form_equals_the_oracle(case, seed):
    lead, n_in, n_out, nnz = case
    with om.float64():
        rng = np.random.default_rng(seed)
        rows, cols = _pattern(rng, n_in, n_out, nnz)
        data = rng.standard_normal(nnz)
        x = rng.standard_normal((*lead, n_in))
        w = _dense(rows, cols, data, n_in, n_out)
        got = jax.jit(lambda x, d, r, c: _sparse_cpu.product(x, d, r, c, n_out=n_out))(x, data, rows, cols)
        np.testing.assert_allclose(got, x @ w, rtol=1e-12, atol=1e-12)

        a = x.reshape(-1, n_in)
        g = rng.standard_normal((a.shape[0], n_out))
        got = jax.jit(_sparse_cpu.sddmm)(a, g, rows, cols)
        np.testing.assert_allclose(got, (a.T @ g)[rows, cols], rtol=1e-12, atol=1e-12)


def _ops(fn, *args):
    text = jax.jit(fn).lower(*args).as_text(dialect="hlo")
    return {op: text.count(f" {op}(") for op in ("dot", "scatter", "gather", "transpose", "reduce")}


def test_which_form_the_cpu_program_holds():
    if jax.default_backend() != "cpu":
        pytest.skip("the program is lowered for the CPU only on a CPU default backend")
    rng = np.random.default_rng(0)

    def product(lead, n_in, n_out, nnz):
        rows, cols = _pattern(rng, n_in, n_out, nnz)
        x = jnp.ones((*lead, n_in))
        fn = lambda x, d, r, c: _sparse_cpu.product(x, d, r, c, n_out=n_out)  # noqa: E731
        return _ops(fn, x, jnp.ones(nnz), rows, cols)

    def sddmm(n_rows, n_in, n_out, nnz):
        rows, cols = _pattern(rng, n_in, n_out, nnz)
        return _ops(_sparse_cpu.sddmm, jnp.ones((n_rows, n_in)), jnp.ones((n_rows, n_out)), rows, cols)

    assert _sparse_cpu.dense_on_cpu(4, 8, 8, 40) and not _sparse_cpu.dense_on_cpu(3, 30, 20, 25)
    assert not _sparse_cpu.dense_on_cpu(10**6, 5000, 5000, 10**6)  # over CPU_DENSE_MAX_ELEMENTS
    dense = product((4,), 8, 8, 40)
    assert dense["dot"] == 1 and dense["gather"] == 0
    assert 4 * 2100 >= _sparse_cpu.CPU_UNIT_MAJOR_MIN_VALUES
    unit_major = product((4,), 200, 200, 2100)
    assert unit_major["dot"] == 0 and unit_major["transpose"] >= 1 and unit_major["scatter"] == 1
    assert product((3,), 30, 20, 25)["transpose"] == 0  # few values: batch-major
    assert product((1,), 200, 200, 9000)["transpose"] == 0  # one row: batch-major
    # dense: the entries of a^T g, in the form outer_sum picks for the shape
    assert _cpu_sums.outer_sum_form(4, 8, 8) == "fusion"
    assert sddmm(4, 8, 8, 40)["dot"] == 0 and sddmm(4, 8, 8, 40)["gather"] == 1
    assert _sparse_cpu.dense_on_cpu(16, 128, 128, 1024) and _cpu_sums.outer_sum_form(16, 128, 128) == "dot"
    assert sddmm(16, 128, 128, 1024)["dot"] == 1
    assert sddmm(3, 30, 20, 25)["reduce"] >= 1  # fewer products than MIN_ELEMENTS: reduced
    assert sddmm(4, 200, 200, 2100)["reduce"] == 0  # unrolled
    assert sddmm(40, 64, 64, 50)["reduce"] >= 1  # more rows than CPU_SDDMM_UNROLLED_ROWS
