"""The CPU lowerings of the batch sums (``braintrace/_etrace_op/_cpu_sums.py``): the trace solves,
the weight gradients ``x^T g`` (``outer_sum``) and the bias gradients (``row_sum``); each form
(reduction, unrolled sum, fusion, dot) against a numpy oracle, and which form a CPU program holds."""

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


#: One shape of each CPU form of outer_sum, leading axes and all.
OUTER_SUM_CASES = [
    ((4, 32), 4, "fusion"),
    ((5,), 3, "fusion"),
    ((2, 3, 8), 6, "fusion"),
    ((64, 512), 8, "gemm_gtx"),  # many rows, narrow g
    ((4, 4, 1024), 16, "gemm_gtx"),
    ((8, 16), 512, "gemm_xtg"),  # narrow x, wide g
    ((4, 128), 128, "dot"),
    ((2, 32, 64), 64, "dot"),
]


@pytest.mark.parametrize("xshape, n_out, form", OUTER_SUM_CASES)
def test_outer_sum_equals_the_oracle(xshape, n_out, form):
    x, g = _rng_arrays(2, xshape, (*xshape[:-1], n_out))
    assert _cpu_sums.outer_sum_form(int(np.prod(xshape[:-1])), xshape[-1], n_out) == form
    got = jax.jit(_cpu_sums.outer_sum)(x, g)
    lead = "".join("abc"[: len(xshape) - 1])
    want = np.einsum(f"{lead}i,{lead}o->io", x.astype(np.float64), g.astype(np.float64))
    assert got.shape == (xshape[-1], n_out)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6


def _lowered_ops(xshape, n_out):
    """The CPU lowering of outer_sum (``platform_dependent`` resolved): its dots' contracting
    dimensions and its optimisation barriers."""
    x, g = jnp.ones(xshape), jnp.ones((*xshape[:-1], n_out))
    text = jax.jit(_cpu_sums.outer_sum).lower(x, g).as_text(dialect="hlo")
    dots = [
        line.split("lhs_contracting_dims=")[1].split(", metadata")[0]
        for line in text.splitlines()
        if " dot(" in line
    ]
    return dots, text.count("opt-barrier(")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU lowering")
@pytest.mark.parametrize("xshape, n_out, form", OUTER_SUM_CASES)
def test_outer_sum_cpu_program_holds_its_form(xshape, n_out, form):
    """The fusion holds no dot; the GEMMs contract the inner axis of a transposed copy held between
    two barriers (and g^T x a third for its result); the dot contracts the leading axes."""
    dots, barriers = _lowered_ops(xshape, n_out)
    lead = len(xshape) - 1
    want = {
        "fusion": ([], 0),
        "gemm_gtx": (["{1}, rhs_contracting_dims={0}"], 3),
        "gemm_xtg": (["{1}, rhs_contracting_dims={0}"], 2),
        "dot": (["{%s}, rhs_contracting_dims={%s}" % ((",".join(map(str, range(lead))),) * 2)], 0),
    }[form]
    assert (dots, barriers) == want


def test_outer_sum_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="leading axes"):
        _cpu_sums.outer_sum(jnp.ones((4, 3)), jnp.ones((2, 5)))


@pytest.mark.parametrize("shape", [(4, 32), (3, 2, 5), (64, 512), (2, 40, 128)])  # reduce (2), dot (2)
def test_row_sum_equals_the_oracle_and_its_cpu_form(shape):
    (a,) = _rng_arrays(3, shape)
    got = jax.jit(_cpu_sums.row_sum)(a)
    want = a.astype(np.float64).reshape(-1, shape[-1]).sum(0)
    assert got.shape == (shape[-1],)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6
    if jax.default_backend() == "cpu":
        text = jax.jit(_cpu_sums.row_sum).lower(jnp.ones(shape)).as_text(dialect="hlo")
        large = int(np.prod(shape)) >= _cpu_sums.MIN_ELEMENTS
        assert (" dot(" in text) == large and (" reduce(" in text) == (not large)


@pytest.mark.parametrize(
    "shape_x, n_out", [((256, 16), 4), ((256, 512), 8), ((256, 16), 512), ((256, 64), 64)]
)
def test_outer_sum_of_bfloat16_accumulates_in_float32(shape_x, n_out):
    """A narrow float is summed in float32 in every form (fusion, both GEMMs, dot), as the dot does:
    closer to the float64 sum than bfloat16 accumulation over 256 rows would be."""
    x, g = _rng_arrays(4, shape_x, (shape_x[0], n_out))
    want = x.astype(np.float64).T @ g.astype(np.float64)
    xb, gb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16)
    got = jax.jit(_cpu_sums.outer_sum)(xb, gb)
    assert got.dtype == jnp.bfloat16
    exact_inputs = np.asarray(xb, np.float64).T @ np.asarray(gb, np.float64)
    # the only error left is the final rounding to bfloat16 (relative 2^-8 per entry)
    np.testing.assert_allclose(np.asarray(got, np.float64), exact_inputs, rtol=2**-8, atol=1e-6)
    assert np.abs(np.asarray(got, np.float64) - want).max() < 0.1 * np.abs(want).max()
