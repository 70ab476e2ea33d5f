"""Bad inputs get a clear error (or a compilation record), and ``docs/reliability.md`` stays true.

* pp_prop's bias correction ``1 - lambda^t`` is exact in the trace dtype for ``lambda`` close to 1
  (at ``T = 1`` pp_prop is the exact one-step gradient), in float32 and float64.
* Malformed sparse structures (indices outside the shape, bad ``indptr``) raise ``ValueError`` naming
  the array whenever the index values are known: eager calls, layer construction, and constants
  closed over by a jitted function (checked when it is traced).
* ``braintrace.conv`` rejects non-positive strides and dilations and unknown padding names.
* The table of ``docs/reliability.md``: every row names a case id of :data:`CASES`; the case runs the
  bad input and returns ``(kind, message)``; the row's first code span in "what you get" is the kind
  (an exception class or a ``CompilationRecord`` kind) and every further code span must appear in
  the message. A row with an unknown case id fails, and so does a case with no row.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest
from saiunit import sparse as ss

import braintrace
from braintrace._etrace_op.sparse import SparsePattern, bind_sparse_matmul

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


# ---------------------------------------------------------------------------------------------
# pp_prop: the bias correction for a decay close to 1
# ---------------------------------------------------------------------------------------------


class _Leaky(brainstate.nn.Module):
    """``h_t = a h_{t-1} + x_t W``: ``D = a`` and ``df = 1`` for every unit."""

    def __init__(self, w, a):
        super().__init__()
        self.a = a
        self.w = brainstate.ParamState(jnp.asarray(w))

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, self.w.value.shape[1]), self.w.value.dtype))

    def update(self, x):
        self.h.value = self.a * self.h.value + braintrace.matmul(x, self.w.value)
        return self.h.value


def _leaky_pp_oracle(w, a, lam, xs, ys):
    r"""Per-step pp_prop gradients of ``0.5 sum (h_t - y_t)^2`` for :class:`_Leaky`, in float64 and
    without cancellation: ``eps_x = sum_k lam^k x_{t-k}`` and, since ``D = a`` and ``df = 1``,
    ``eps_f / (1 - lam^t) = sum_{k<t} (lam a)^k / sum_{k<t} lam^k``. At ``t = 1`` it is ``x_1 (x) ct_1``,
    the exact one-step gradient."""
    w, xs, ys = (np.asarray(v, np.float64) for v in (w, xs, ys))
    h = np.zeros((xs.shape[1], w.shape[1]))
    out = []
    for t in range(xs.shape[0]):
        h = a * h + xs[t] @ w
        ct = h - ys[t]
        eps_x = sum(lam**k * xs[t - k] for k in range(t + 1))
        ratio = sum((lam * a) ** k for k in range(t + 1)) / sum(lam**k for k in range(t + 1))
        out.append(eps_x.T @ (ct * ratio))
    return np.stack(out)


@pytest.fixture(params=["float32", "float64"])
def precision(request):
    """float32 as is, or float64 everywhere (x64 and brainstate's precision), restored afterwards."""
    if request.param == "float64":
        with om.float64():
            yield np.float64
    else:
        yield np.float32


NEAR_ONE = {
    "0.999999": (0.999999, 0.999999),
    "0.99999999": (0.99999999, 0.99999999),
    "1-1e-13": (1 - 1e-13, 1 - 1e-13),
    "rank 10**8": (10**8, (10**8 - 1) / (10**8 + 1)),
}


@pytest.mark.parametrize("decay", list(NEAR_ONE))
def test_pp_prop_decay_close_to_one_is_exact(precision, decay):
    decay_or_rank, lam = NEAR_ONE[decay]
    rng = np.random.default_rng(11)
    steps, batch, n_in, n_out, a = 4, 2, 3, 2, 0.8
    w = rng.standard_normal((n_in, n_out)).astype(precision)
    xs = rng.standard_normal((steps, batch, n_in)).astype(precision)
    ys = rng.standard_normal((steps, batch, n_out)).astype(precision)
    module = _Leaky(w, a)
    brainstate.nn.init_all_states(module, batch_size=batch)
    alg = braintrace.pp_prop(module, decay_or_rank=decay_or_rank)
    got, _ = om.run_online(alg, module, jnp.asarray(xs), jnp.asarray(ys))
    got = np.asarray(got["w"], np.float64)
    want = _leaky_pp_oracle(w, a, lam, xs, ys)
    assert np.all(np.isfinite(got)), got
    tol = 1e-5 if precision == np.float32 else 1e-11
    for t in range(steps):  # t = 0: the exact one-step gradient
        err = np.linalg.norm(got[t] - want[t]) / np.linalg.norm(want[t])
        assert err < tol, f"step {t + 1}, decay_or_rank={decay_or_rank!r}: relative error {err:.3g}"


def test_pp_prop_first_step_is_the_one_step_gradient():
    """float32, ``lambda = 0.999999``: step 1 equals ``jax.grad`` of the one-step loss."""
    rng = np.random.default_rng(12)
    w = rng.standard_normal((3, 2)).astype(np.float32)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    y = rng.standard_normal((2, 2)).astype(np.float32)
    module = _Leaky(w, 0.8)
    brainstate.nn.init_all_states(module, batch_size=2)
    alg = braintrace.pp_prop(module, decay_or_rank=0.999999)
    got, _ = om.run_online(alg, module, jnp.asarray(x)[None], jnp.asarray(y)[None])
    want = jax.grad(lambda w_: 0.5 * jnp.sum((x @ w_ - y) ** 2))(jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(got["w"][0]), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [2**56, 10**17])
def test_rank_whose_lambda_rounds_to_one_is_refused(rank):
    with pytest.raises(ValueError, match=r"decay_or_rank.*rounds to 1\.0"):
        braintrace.pp_prop(_Leaky(np.ones((3, 2)), 0.9), decay_or_rank=rank)


# ---------------------------------------------------------------------------------------------
# Sparse structures
# ---------------------------------------------------------------------------------------------

_DATA = jnp.array([1.0, 2.0, 3.0])
_X = jnp.ones((1, 2))


def _csr(indices, indptr):
    return ss.CSR((_DATA, jnp.asarray(indices, jnp.int32), jnp.asarray(indptr, jnp.int32)), shape=(2, 3))


def _csc(indices, indptr):
    return ss.CSC((_DATA, jnp.asarray(indices, jnp.int32), jnp.asarray(indptr, jnp.int32)), shape=(2, 3))


def _coo(row, col):
    return ss.COO((_DATA, jnp.asarray(row, jnp.int32), jnp.asarray(col, jnp.int32)), shape=(2, 3))


# (matrix, pattern of the expected message)
BAD_SPARSE = {
    "csr column >= n_cols": (lambda: _csr([1, 0, 3], [0, 1, 3]), r"`sparse_mat.indices`.*\[0, 3\).*= 3"),
    "csr negative column": (lambda: _csr([1, 0, -1], [0, 1, 3]), r"`sparse_mat.indices`.*\[0, 3\).*= -1"),
    "csr indptr decreasing": (
        lambda: _csr([1, 0, 2], [0, 2, 1]),
        r"`sparse_mat.indptr` must be non-decreasing",
    ),
    "csr indptr[-1] != nnz": (lambda: _csr([1, 0, 2], [0, 1, 2]), r"`sparse_mat.indptr\[-1\]`.*\(3\), got 2"),
    "csr indptr[0] != 0": (lambda: _csr([1, 0, 2], [1, 1, 3]), r"`sparse_mat.indptr` must start at 0"),
    "csr indptr wrong length": (lambda: _csr([1, 0, 2], [0, 1, 2, 3]), r"`sparse_mat.indptr`.*shape \(3,\)"),
    "csc row >= n_rows": (lambda: _csc([0, 2, 1], [0, 1, 2, 3]), r"`sparse_mat.indices`.*row.*\[0, 2\)"),
    "coo row >= n_rows": (lambda: _coo([0, 2, 1], [1, 0, 2]), r"`sparse_mat.row`.*\[0, 2\).*= 2"),
    "coo col >= n_cols": (lambda: _coo([0, 1, 1], [1, 0, 5]), r"`sparse_mat.col`.*\[0, 3\).*= 5"),
    "coo negative col": (lambda: _coo([0, 1, 1], [1, -2, 0]), r"`sparse_mat.col`.*= -2"),
}


@pytest.mark.parametrize("case", list(BAD_SPARSE))
def test_malformed_sparse_raises_eagerly(case):
    make, pattern = BAD_SPARSE[case]
    with pytest.raises(ValueError, match=r"^sparse_matmul: " + pattern):
        braintrace.sparse_matmul(_X, _DATA, sparse_mat=make())


@pytest.mark.parametrize("case", list(BAD_SPARSE))
def test_malformed_sparse_raises_at_layer_construction(case):
    """Not a ``col_ptr`` length error, nor an error deep in NumPy: the offending array is named."""
    make, pattern = BAD_SPARSE[case]
    with pytest.raises(ValueError, match=r"^SparseLinear: sparse_matmul: " + pattern):
        braintrace.nn.SparseLinear(make())


@pytest.mark.parametrize("case", ["csr column >= n_cols", "csr indptr decreasing", "coo row >= n_rows"])
def test_malformed_sparse_closed_over_by_jit_raises_when_traced(case):
    make, pattern = BAD_SPARSE[case]
    mat = make()
    with pytest.raises(ValueError, match=pattern):
        jax.jit(lambda x: braintrace.sparse_matmul(x, _DATA, sparse_mat=mat))(_X)


def test_traced_indices_are_not_checked():
    """Inside ``jit`` the index values are unknown: no error (validation belongs outside)."""
    indptr = jnp.array([0, 1, 3], jnp.int32)
    f = jax.jit(
        lambda idx: braintrace.sparse_matmul(_X, _DATA, sparse_mat=ss.CSR((_DATA, idx, indptr), shape=(2, 3)))
    )
    assert f(jnp.array([1, 0, 2], jnp.int32)).shape == (1, 3)
    assert f(jnp.array([1, 0, 7], jnp.int32)).shape == (1, 3)  # out of range: unchecked


def test_valid_structures_still_pass():
    dense = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]], np.float32)
    for mat in (
        ss.CSR.fromdense(jnp.asarray(dense)),
        ss.CSC.fromdense(jnp.asarray(dense)),
        _coo([0, 1, 1], [1, 0, 2]),
    ):
        y = braintrace.sparse_matmul(_X, mat.data, sparse_mat=mat)
        np.testing.assert_allclose(np.asarray(y), np.ones((1, 2)) @ dense)
        np.testing.assert_allclose(np.asarray(braintrace.nn.SparseLinear(mat)(_X)), np.ones((1, 2)) @ dense)
    # an empty row and an empty column
    mat = _csr([0, 0, 2], [0, 3, 3])
    assert braintrace.sparse_matmul(_X, _DATA, sparse_mat=mat).shape == (1, 3)


def test_index_operands_are_checked_against_the_pattern():
    rows, cols = jnp.array([1, 0, 1], jnp.int32), jnp.array([0, 1, 2], jnp.int32)
    pattern = SparsePattern((2, 3), 3, "csc", col_sorted=True)
    with pytest.raises(ValueError, match=r"`row_ids` must have shape \(3,\)"):
        bind_sparse_matmul(_X, _DATA, pattern, [rows[:2], cols, jnp.array([0, 1, 2, 3], jnp.int32)])
    with pytest.raises(ValueError, match=r"`col_ids` holds column indices .*\[0, 3\)"):
        bind_sparse_matmul(_X, _DATA, pattern, [rows, cols.at[2].set(3), jnp.array([0, 1, 2, 3], jnp.int32)])
    with pytest.raises(ValueError, match=r"`col_ptr\[-1\]` must equal"):
        bind_sparse_matmul(_X, _DATA, pattern, [rows, cols, jnp.array([0, 1, 2, 2], jnp.int32)])
    with pytest.raises(ValueError, match=r"column order.*col_ids\[1\] = 1, expected 0"):
        bind_sparse_matmul(_X, _DATA, pattern, [rows, cols, jnp.array([0, 2, 2, 3], jnp.int32)])
    y = bind_sparse_matmul(_X, _DATA, pattern, [rows, cols, jnp.array([0, 1, 2, 3], jnp.int32)])
    np.testing.assert_allclose(np.asarray(y), [[1.0, 2.0, 3.0]])


# ---------------------------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------------------------


def _conv(**kw):
    kw = {"strides": (1,), "padding": "SAME", **kw}
    x, k = jnp.ones((2, 16, 3)), jnp.ones((4, 3, 8))
    return braintrace.conv(x, k, dimension_numbers=("NWC", "WIO", "NWC"), **kw)


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"strides": (0,)}, r"`strides` must be positive ints.*\(0,\)"),
        ({"strides": (-2,)}, r"`strides` must be positive ints.*\(-2,\)"),
        ({"strides": (1, 1)}, r"`strides` must have one entry per spatial dimension \(1\)"),
        ({"rhs_dilation": (0,)}, r"`rhs_dilation` must be positive ints"),
        ({"lhs_dilation": (-1,)}, r"`lhs_dilation` must be positive ints"),
        ({"padding": "FULL"}, r"string `padding` must be one of"),
        ({"padding": ((1, 1), (1, 1))}, r"`padding` must have one \(low, high\) pair per spatial dimension"),
    ],
)
def test_conv_rejects_bad_geometry(kw, pattern):
    with pytest.raises(ValueError, match=r"^conv: " + pattern):
        _conv(**kw)


def test_conv_lowercase_padding_name_is_accepted():
    assert _conv(padding="same").shape == (2, 16, 8)


@pytest.mark.parametrize("cls, in_size", [(braintrace.nn.Conv1d, (16, 3)), (braintrace.nn.Conv2d, (8, 8, 3))])
@pytest.mark.parametrize("name", ["stride", "lhs_dilation", "rhs_dilation"])
@pytest.mark.parametrize("value", [0, -1])
def test_nn_conv_rejects_non_positive(cls, in_size, name, value):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: `{name}` must be a positive int"):
        cls(in_size, 4, 3, **{name: value})


# ---------------------------------------------------------------------------------------------
# docs/reliability.md: one case per row
# ---------------------------------------------------------------------------------------------


def _outcome(fn):
    """``(exception class name, message)`` of what ``fn()`` raises; fails when it raises nothing."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the table documents which one
        return type(err).__name__, str(err)
    pytest.fail("the bad input raised nothing")


def _leaky():
    return _Leaky(np.ones((3, 2), np.float32), 0.9)


#: case id -> a callable that runs the row's input and returns ``(kind, message)``.
CASES = {
    "pp_prop_rank_rounds_to_one": lambda: _outcome(
        lambda: braintrace.pp_prop(_leaky(), decay_or_rank=10**17)
    ),
    "pp_prop_decay_not_below_one": lambda: _outcome(lambda: braintrace.pp_prop(_leaky(), decay_or_rank=1.0)),
    "pp_prop_rank_not_positive": lambda: _outcome(lambda: braintrace.pp_prop(_leaky(), decay_or_rank=0)),
    "sparse_csr_column_out_of_range": lambda: _outcome(
        lambda: braintrace.sparse_matmul(_X, _DATA, sparse_mat=BAD_SPARSE["csr column >= n_cols"][0]())
    ),
    "sparse_csr_negative_index": lambda: _outcome(
        lambda: braintrace.sparse_matmul(_X, _DATA, sparse_mat=BAD_SPARSE["csr negative column"][0]())
    ),
    "sparse_indptr_decreasing": lambda: _outcome(
        lambda: braintrace.sparse_matmul(_X, _DATA, sparse_mat=BAD_SPARSE["csr indptr decreasing"][0]())
    ),
    "sparse_indptr_end_not_nnz": lambda: _outcome(
        lambda: braintrace.sparse_matmul(_X, _DATA, sparse_mat=BAD_SPARSE["csr indptr[-1] != nnz"][0]())
    ),
    "sparse_indptr_start_not_zero": lambda: _outcome(
        lambda: braintrace.sparse_matmul(_X, _DATA, sparse_mat=BAD_SPARSE["csr indptr[0] != 0"][0]())
    ),
    "sparse_indptr_wrong_length": lambda: _outcome(
        lambda: braintrace.sparse_matmul(_X, _DATA, sparse_mat=BAD_SPARSE["csr indptr wrong length"][0]())
    ),
    "sparse_coo_row_out_of_range": lambda: _outcome(
        lambda: braintrace.sparse_matmul(_X, _DATA, sparse_mat=BAD_SPARSE["coo row >= n_rows"][0]())
    ),
    "sparse_layer_coo_column_out_of_range": lambda: _outcome(
        lambda: braintrace.nn.SparseLinear(BAD_SPARSE["coo col >= n_cols"][0]())
    ),
    "conv_zero_stride": lambda: _outcome(lambda: _conv(strides=(0,))),
    "conv_strides_wrong_length": lambda: _outcome(lambda: _conv(strides=(1, 1))),
    "conv_non_positive_dilation": lambda: _outcome(lambda: _conv(rhs_dilation=(0,))),
    "conv_unknown_padding_name": lambda: _outcome(lambda: _conv(padding="FULL")),
    "nn_conv_zero_stride": lambda: _outcome(lambda: braintrace.nn.Conv2d((8, 8, 3), 4, 3, stride=0)),
}


class _Step(brainstate.nn.Module):
    """``h`` of shape ``(2, 3)`` with ``h <- body(self, h, x)``; ``self.w`` is ``(3, 3)``."""

    def __init__(self, body, counter=False):
        super().__init__()
        self.w = brainstate.ParamState(jnp.full((3, 3), 0.3))
        self.w2 = brainstate.ParamState(jnp.full((3, 3), 0.2))
        self._body, self._counter = body, counter

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, 3)))
        self.h2 = brainstate.HiddenState(jnp.zeros((batch_size, 3)))
        if self._counter:
            self.n = brainstate.HiddenState(jnp.zeros((batch_size, 3), jnp.int32))

    def update(self, x):
        self._body(self, x)
        if self._counter:
            self.n.value = self.n.value + (self.h.value > 0.5)
        return self.h.value + self.h2.value


def _record(body, kind, counter=False):
    """``(kind, message)`` of the first ``kind`` record of the graph of ``_Step(body)``."""
    model = _Step(body, counter)
    brainstate.nn.init_all_states(model, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = braintrace.compile_etrace_graph(model, jnp.zeros((2, 3)))
    found = [r for r in graph.records if r.kind.name == kind]
    if not found:
        pytest.fail(f"no {kind} record: {graph.summary()}")
    return found[0].kind.name, found[0].message


def _set(state, value):
    state.value = value


def _leaky_step(m, x):
    _set(m.h, 0.9 * m.h.value + braintrace.matmul(x, m.w.value))
    _set(m.h2, 0.8 * m.h2.value + braintrace.matmul(x, m.w2.value))


def _compiled_d_rtrl(**kw):
    model = _Step(_leaky_step)
    brainstate.nn.init_all_states(model, batch_size=2)
    return braintrace.D_RTRL(model, **kw).compile_graph(jnp.zeros((2, 3)))


def _traced_call_at_another_batch():
    alg = _compiled_d_rtrl()
    brainstate.nn.init_all_states(alg.model, batch_size=5)
    params = alg.model.states(brainstate.ParamState)
    brainstate.transform.grad(lambda: alg(jnp.zeros((5, 3))).sum(), params)()


def _states_do_not_fit():
    alg = _compiled_d_rtrl()
    brainstate.nn.init_all_states(alg.model, batch_size=7)
    alg.etrace_grad(
        jnp.zeros((4, 5, 3)), jnp.zeros((4, 5, 3)), step_fn=lambda o, y: jnp.sum(o - y), reset=False
    )


CASES.update(
    {
        "intrinsic_unit_mixing": lambda: _record(
            lambda m, x: (
                _set(m.h, 0.9 * m.h.value + 0.1 * m.h.value[:, :1] + braintrace.matmul(x, m.w.value)),
                _set(m.h2, 0.8 * m.h2.value + braintrace.matmul(x, m.w2.value)),
            ),
            "NON_DIAGONAL_PATH",
        ),
        "output_unit_mixing": lambda: _record(
            lambda m, x: (
                _set(m.h, 0.9 * m.h.value + braintrace.matmul(x, m.w.value)[:, ::-1]),
                _set(m.h2, 0.8 * m.h2.value + braintrace.matmul(x, m.w2.value)),
            ),
            "NON_DIAGONAL_PATH",
        ),
        "weight_also_plain": lambda: _record(
            lambda m, x: (
                _set(m.h, 0.9 * m.h.value + braintrace.matmul(x, m.w.value) + 0.5 * (x @ m.w.value)),
                _set(m.h2, 0.8 * m.h2.value + braintrace.matmul(x, m.w2.value)),
            ),
            "WEIGHT_ALSO_PLAIN",
        ),
        "stacked_recurrent_layer": lambda: _record(
            lambda m, x: (
                _set(m.h, 0.9 * m.h.value + braintrace.matmul(x, m.w.value)),
                _set(m.h2, 0.8 * m.h2.value + braintrace.matmul(jnp.tanh(m.h.value), m.w2.value)),
            ),
            "CROSS_LAYER_INFLUENCE",
        ),
        "gate_into_recurrent_matmul": lambda: _record(
            lambda m, x: (
                _set(m.h2, jnp.tanh(braintrace.matmul(x, m.w2.value))),
                _set(
                    m.h, 0.5 * m.h.value + m.h2.value + braintrace.matmul(m.h2.value * m.h.value, m.w.value)
                ),
            ),
            "CROSS_LAYER_INFLUENCE",
        ),
        "recurrent_etp_weight": lambda: _record(
            lambda m, x: (
                _set(m.h, jnp.tanh(braintrace.matmul(m.h.value, m.w.value) + x)),
                _set(m.h2, 0.8 * m.h2.value + braintrace.matmul(x, m.w2.value)),
            ),
            "RECURRENT_ETP_WEIGHT",
        ),
        "integer_hidden_state": lambda: _record(_leaky_step, "NON_FLOAT_HIDDEN_STATE", counter=True),
        "vjp_method_unknown": lambda: _outcome(lambda: braintrace.D_RTRL(_leaky(), vjp_method="two-step")),
        "mode_not_a_mode": lambda: _outcome(lambda: braintrace.pp_prop(_leaky(), mode="batching")),
        "trace_dtype_not_float": lambda: _outcome(lambda: braintrace.D_RTRL(_leaky(), trace_dtype=jnp.int32)),
        "window_lengths_differ": lambda: _outcome(
            lambda: _compiled_d_rtrl(vjp_method="multi-step")(
                braintrace.MultiStepData(jnp.zeros((4, 2, 3))), braintrace.MultiStepData(jnp.zeros((3, 2, 3)))
            )
        ),
        "window_and_solve_every": lambda: _outcome(
            lambda: _compiled_d_rtrl().etrace_grad(
                jnp.zeros((4, 2, 3)),
                jnp.zeros((4, 2, 3)),
                step_fn=lambda o, y: jnp.sum(o),
                window=2,
                solve_every=2,
            )
        ),
        "batch_size_changed_inside_grad": lambda: _outcome(_traced_call_at_another_batch),
        "states_do_not_fit_the_inputs": lambda: _outcome(_states_do_not_fit),
    }
)

_HEADER = ("case", "input", "what you get")
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")


def _cells(line):
    """The cells of a Markdown table row (``|`` inside a cell must be escaped as ``\\|``)."""
    line = line.strip()
    if not line.startswith("|"):
        return None
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip("|"))]


def _code_spans(cell):
    """The contents of a cell's inline code spans (CommonMark: one space each side is stripped)."""
    spans = []
    for match in _CODE_SPAN.finditer(cell):
        text = match.group(2)
        if len(text) > 2 and text.startswith(" ") and text.endswith(" "):
            text = text[1:-1]
        spans.append(text)
    return spans


def doc_rows():
    """``[(case id, what-you-get code spans), ...]`` from every ``case | input | what you get`` table."""
    lines = DOC.read_text().splitlines()
    rows, i = [], 0
    while i < len(lines):
        cells = _cells(lines[i])
        if cells and tuple(c.lower() for c in cells) == _HEADER:
            i += 2  # the header and the delimiter row
            while i < len(lines) and _cells(lines[i]):
                cells = _cells(lines[i])
                assert len(cells) == 3, f"docs/reliability.md: a row needs 3 cells: {lines[i]!r}"
                case = _code_spans(cells[0])
                assert len(case) == 1, (
                    f"docs/reliability.md: the case cell must be one code span: {lines[i]!r}"
                )
                rows.append((case[0], _code_spans(cells[2])))
                i += 1
        else:
            i += 1
    return rows


_ROWS = doc_rows()


def test_reliability_page_has_rows_and_every_case_is_documented():
    ids = [case for case, _ in _ROWS]
    assert ids, "docs/reliability.md has no `case | input | what you get` table"
    assert len(ids) == len(set(ids)), f"duplicate case ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    missing = sorted(set(CASES) - set(ids))
    assert not missing, f"cases without a row in docs/reliability.md: {missing}"


@pytest.mark.parametrize("case, spans", _ROWS, ids=[case for case, _ in _ROWS])
def test_reliability_row_is_true(case, spans):
    assert case in CASES, (
        f"docs/reliability.md names case {case!r}, which tests/test_input_validation.py does not know: "
        f"add a callable for it to CASES"
    )
    assert spans, f"row {case!r}: 'what you get' needs a code span with the kind"
    kind, message = CASES[case]()
    assert kind == spans[0], f"row {case!r}: documented {spans[0]!r}, got {kind!r}: {message}"
    for fragment in spans[1:]:
        assert fragment in message, f"row {case!r}: {fragment!r} is not in the message {message!r}"
