"""Tests of the sparse ETP primitives ``etp_sp_mm`` / ``etp_sp_mv`` and :func:`braintrace.sparse_matmul`.

References are plain NumPy (float64) on the dense matrix built from the pattern, so JAX compiles
only the code under test; all cases share one pattern so JAX's op caches stay warm.
"""

import re
import time

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from _numerics import F32, F64, arr, assert_close, assert_vmap_keeps_marker, npy, under_pallas_interpret
from saiunit import sparse as ss

import braintrace
from braintrace._compatible_imports import jaxpr_of
from braintrace._etrace_op import etp_sp_mm_p, etp_sp_mv_p, get_rule
from braintrace._etrace_op._trace_ops import (
    ETP_DRTRL_TRACE_OPS,
    _default_ops,
    rule_kwargs,
)
from braintrace._etrace_op.sparse import SparsePattern, bind_sparse_matmul, sparse_pattern

N_IN, N_OUT, BATCH = 7, 5, 3
FORMATS = {"csr": ss.CSR, "csc": ss.CSC, "coo": ss.COO}
# (dtype, batched, has_bias): every flag in both states and both dtypes, without the full product.
COMBOS = [(F64, True, True), (F32, True, False), (F32, False, True), (F64, False, False)]


MASK = np.random.default_rng(0).random((N_IN, N_OUT)) < 0.4
MASK[0, 0] = MASK[-1, -1] = True


def random_dense(seed, dtype):
    """Random values on one fixed random pattern."""
    return arr(np.where(MASK, np.random.default_rng(seed).standard_normal(MASK.shape), 0.0), dtype)


def build(fmt, dtype, seed=0):
    """``(matrix, dense)``: the pattern ``MASK`` in ``fmt`` built on the host (COO in a shuffled order)
    and the float64 dense matrix it stores."""
    rows, cols = np.nonzero(MASK)  # row-major: the CSR order
    if fmt == "csc":
        order = np.lexsort((rows, cols))
    elif fmt == "coo":
        order = np.random.default_rng(seed).permutation(rows.size)
    else:
        order = np.arange(rows.size)
    rows, cols = rows[order], cols[order]
    values = np.asarray(np.random.default_rng(seed).standard_normal(rows.size), dtype)
    dense = np.zeros(MASK.shape)
    dense[rows, cols] = values
    data = arr(values, dtype)
    if fmt == "csr":
        mat = ss.CSR(
            (data, arr(cols, np.int32), arr(np.searchsorted(rows, np.arange(N_IN + 1)), np.int32)),
            shape=MASK.shape,
        )
    elif fmt == "csc":
        mat = ss.CSC(
            (data, arr(rows, np.int32), arr(np.searchsorted(cols, np.arange(N_OUT + 1)), np.int32)),
            shape=MASK.shape,
        )
    else:
        mat = ss.COO((data, arr(rows, np.int32), arr(cols, np.int32)), shape=MASK.shape)
    return mat, dense


class Case:
    """A random pattern in one format, data, x, bias, and NumPy one-hot selectors of the pattern."""

    def __init__(self, dtype, fmt="csr", batched=True, has_bias=True, seed=0):
        self.dtype, self.batched, self.has_bias = dtype, batched, has_bias
        self.mat, _ = build(fmt, dtype, seed)
        self.pattern, self.rows, self.cols = sparse_pattern(self.mat)
        rng = np.random.default_rng(seed + 1)
        self.nnz = self.pattern.nnz
        self.data = arr(rng.standard_normal(self.nnz), dtype)
        self.x = arr(rng.standard_normal((BATCH, N_IN) if batched else (N_IN,)), dtype)
        self.bias = arr(rng.standard_normal(N_OUT), dtype) if has_bias else None
        self.r1 = np.eye(N_IN)[np.asarray(self.rows)]  # (nnz, I)
        self.c1 = np.eye(N_OUT)[np.asarray(self.cols)]  # (nnz, O)
        self.prim = etp_sp_mm_p if batched else etp_sp_mv_p
        self.params = dict(sparse_mat=self.pattern, has_bias=has_bias)
        self.kw = rule_kwargs(self.params, (self.rows, self.cols))

    @property
    def weights(self):
        return {"weight": self.data, **({"bias": self.bias} if self.has_bias else {})}

    def dense(self, data=None):
        return np.einsum(
            "p,pi,pk->ik", np.asarray(self.data if data is None else data, F64), self.r1, self.c1
        )

    def reference(self, x, data=None):
        y = np.asarray(x, F64) @ self.dense(data)
        return y if self.bias is None else y + np.asarray(self.bias, F64)

    def forward(self, x, data=None):
        data = self.data if data is None else data
        return braintrace.sparse_matmul(x, data, sparse_mat=self.mat, bias=self.bias)

    def eqn(self):
        jaxpr = jaxpr_of(jax.make_jaxpr(self.forward)(self.x))
        eqns = [e for e in jaxpr.eqns if e.primitive is self.prim]
        assert len(eqns) == 1, jaxpr
        return eqns[0]


# ---------------------------------------------------------------------------------------------
# (a) forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,batched,has_bias,fmt",
    [(*c, "csr") for c in COMBOS] + [(F32, True, True, "csc"), (F64, False, True, "coo")],
    indirect=["dtype"],
)
def test_forward_equals_dense(dtype, batched, has_bias, fmt):
    case = Case(dtype, fmt, batched, has_bias)
    y = case.forward(case.x)
    assert y.dtype == dtype and y.shape == case.x.shape[:-1] + (N_OUT,)
    assert_close(y, case.reference(case.x), dtype)  # the pattern's dense matrix, new values
    # A CSC matrix is in column order: its pointers travel as a third index operand.
    pattern = SparsePattern((N_IN, N_OUT), int(MASK.sum()), fmt, col_sorted=fmt == "csc")
    assert case.eqn().params["sparse_mat"] == pattern
    assert len(case.eqn().invars) == 2 + has_bias + 2 + (fmt == "csc")


@pytest.fixture
def csr_matmul_calls(monkeypatch):
    """Counts the calls of the column segment-sum kernel (``kernels/csr_matmul.py``)."""
    from braintrace._kernel_import import kernel_module

    module = kernel_module("csr_matmul")
    calls = []
    original = module.csr_matmul

    def spy(*args, **kwargs):
        calls.append(kwargs.get("interpret"))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "csr_matmul", spy)
    return calls


@pytest.mark.parametrize(
    "dtype,batched,has_bias,fmt",
    [
        (F32, True, True, "csc"),
        (F64, False, False, "csc"),
        (F32, True, False, "csr"),
        (F32, False, True, "coo"),
    ],
    indirect=["dtype"],
)
def test_forward_under_pallas_interpret(dtype, batched, has_bias, fmt, csr_matmul_calls):
    """A column-ordered (CSC) pattern lowers to the segment-sum kernel under 'pallas'; the others keep
    the XLA product. Both equal the dense product."""
    case = Case(dtype, fmt, batched, has_bias)
    y = under_pallas_interpret(jax.jit(case.forward))(case.x)
    assert y.dtype == dtype and y.shape == case.x.shape[:-1] + (N_OUT,)
    assert_close(y, case.reference(case.x), dtype)
    assert csr_matmul_calls == ([True] if fmt == "csc" else [])


def test_sparse_layer_product_runs_the_segment_sum_kernel(csr_matmul_calls):
    """``nn.SparseLinear`` keeps its non-zeros in column order, so under 'pallas' its product is the
    kernel; gradients of a loss through it agree with the XLA backend."""
    mat, dense = build("csr", F32, seed=9)
    layer = braintrace.nn.SparseLinear(mat, b_init=jnp.ones(N_OUT))
    assert np.all(np.diff(np.asarray(layer.indices.value["col"])) >= 0)
    x = arr(np.random.default_rng(9).standard_normal((BATCH, N_IN)), F32)
    params = layer.states(brainstate.ParamState)
    step = lambda x: brainstate.transform.grad(
        lambda: jnp.sum(jnp.sin(layer(x))), params, return_value=True
    )()
    grads, value = under_pallas_interpret(brainstate.transform.jit(step))(x)
    assert csr_matmul_calls and all(csr_matmul_calls)
    want_grads, want_value = brainstate.transform.jit(step)(x)
    assert_close(value, want_value)
    assert_close(value, np.sum(np.sin(npy(x) @ dense + 1.0)))
    for k in want_grads:
        assert_close(grads[k]["weight"], want_grads[k]["weight"])


def test_column_pointer_operand_is_checked():
    case = Case(F32, "csc", True, False)
    pattern = SparsePattern((N_IN, N_OUT), case.nnz, "csc", col_sorted=True)
    with pytest.raises(ValueError, match="3 index arrays"):
        bind_sparse_matmul(case.x, case.data, pattern, [case.rows, case.cols])
    with pytest.raises(ValueError, match="col_ptr.*shape"):
        bind_sparse_matmul(case.x, case.data, pattern, [case.rows, case.cols, jnp.zeros(N_OUT, jnp.int32)])
    with pytest.raises(TypeError, match="col_sorted"):
        SparsePattern((N_IN, N_OUT), case.nnz, "csc", col_sorted=1)


def test_forward_matches_sparse_mat_itself():
    """With ``weight_data = sparse_mat.data`` the product is ``x @ todense(sparse_mat)`` (any format)."""
    dense = random_dense(3, F32)
    x = arr(np.random.default_rng(3).standard_normal((BATCH, N_IN)), F32)
    cases = [(ss.CSR.fromdense(dense), npy(dense))] + [build(fmt, F32, seed=3) for fmt in FORMATS]
    for mat, dense_np in cases:
        assert_close(braintrace.sparse_matmul(x, mat.data, sparse_mat=mat), npy(x) @ dense_np)


def test_brainevent_csr_and_csc():
    brainevent = pytest.importorskip("brainevent")
    x = arr(np.random.default_rng(4).standard_normal((BATCH, N_IN)), F32)
    for fmt in ("csr", "csc"):
        cls = getattr(brainevent, fmt.upper(), None)
        if cls is None:
            continue
        ref, dense = build(fmt, F32, seed=4)
        mat = cls(ref.data, ref.indices, ref.indptr, shape=ref.shape)
        assert_close(braintrace.sparse_matmul(x, mat.data, sparse_mat=mat), npy(x) @ dense)


def test_leading_axes_are_flattened():
    case = Case(F32, has_bias=False)
    x = arr(np.random.default_rng(5).standard_normal((2, BATCH, N_IN)), F32)
    y = case.forward(x)
    assert y.shape == (2, BATCH, N_OUT)
    assert_close(y, case.reference(x))


def test_sparse_pattern_is_hashable_and_validated():
    p = SparsePattern(shape=[4, 5], nnz=3, format="csr")
    assert p.shape == (4, 5) and hash(p) == hash(SparsePattern((4, 5), 3, "csr"))
    with pytest.raises(ValueError, match="format"):
        SparsePattern((4, 5), 3, "bsr")
    with pytest.raises(ValueError, match="shape"):
        SparsePattern((4, 5, 6), 3, "coo")


# ---------------------------------------------------------------------------------------------
# (b) xy_to_dw, (c) rule identity, (d) init shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret"])
@pytest.mark.parametrize("dtype,batched,has_bias", COMBOS, indirect=["dtype"])
def test_xy_to_dw_is_vjp(dtype, batched, has_bias, backend):
    """The rule (an SDDMM: the ``csr_sddmm`` fused operation, a kernel under 'pallas') against the VJP
    of the implementation and the closed form."""
    case = Case(dtype, "csr", batched, has_bias, seed=7)
    x, weights = case.x, case.weights
    g = arr(np.random.default_rng(8).standard_normal(x.shape[:-1] + (N_OUT,)), dtype)

    def impl(w):
        ops = [x, w["weight"]] + ([w["bias"]] if has_bias else []) + [case.rows, case.cols]
        return case.prim.impl_fn(*ops, **case.params)

    @jax.jit  # one compiled program per test instead of eager dispatch of every op
    def run(g, weights):
        return get_rule(case.prim, "xy_to_dw")(x, g, weights, **case.kw), jax.vjp(impl, weights)[1](g)[0]

    dw, expected = (under_pallas_interpret(run) if backend != "xla" else run)(g, weights)
    # Closed form: dw_p = sum_b x[b, r_p] g[b, c_p] (an SDDMM), db = sum_b g.
    xb, gb = np.atleast_2d(npy(x)), np.atleast_2d(npy(g))
    closed = {"weight": np.einsum("bi,bk,pi,pk->p", xb, gb, case.r1, case.c1), "bias": gb.sum(0)}
    assert set(dw) == set(weights)
    for k in weights:
        assert dw[k].shape == weights[k].shape and dw[k].dtype == dtype
        assert_close(dw[k], expected[k], dtype)
        assert_close(dw[k], closed[k], dtype)


@pytest.mark.parametrize("dtype,batched,has_bias", COMBOS, indirect=["dtype"])
def test_rule_identity(dtype, batched, has_bias):
    """``yw_to_w(v, xy_to_dw(x, g)) == xy_to_dw(x, v * g)`` per key (clarification 8)."""
    case = Case(dtype, "coo", batched, has_bias, seed=9)
    x, weights, kw = case.x, case.weights, case.kw
    yw_to_w, xy_to_dw = get_rule(case.prim, "yw_to_w"), get_rule(case.prim, "xy_to_dw")
    rng = np.random.default_rng(10)
    g = arr(rng.standard_normal(x.shape[:-1] + (N_OUT,)), dtype)
    v = arr(rng.standard_normal(N_OUT), dtype)  # shared by the batch
    vb = arr(rng.standard_normal(g.shape), dtype)  # one v per batch element

    @jax.jit
    def run(g, v, vb):
        pairs = [(yw_to_w(v, xy_to_dw(x, g, weights, **kw), **kw), xy_to_dw(x, v * g, weights, **kw))]
        if batched:  # the identity holds per batch element
            lhs = [
                yw_to_w(vb[b], xy_to_dw(x[b : b + 1], g[b : b + 1], weights, **kw), **kw)
                for b in range(BATCH)
            ]
            rhs = [xy_to_dw(x[b : b + 1], vb[b : b + 1] * g[b : b + 1], weights, **kw) for b in range(BATCH)]
            pairs += list(zip(lhs, rhs))
        return pairs

    for lhs, rhs in run(g, v, vb):
        for k in weights:
            assert_close(lhs[k], rhs[k], dtype)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dtype,batched,has_bias", COMBOS, indirect=["dtype"])
def test_init_shapes(dtype, batched, has_bias, n):
    case = Case(dtype, "csr", batched, has_bias)
    eqn = case.eqn()
    layout = {"weight": 1, **({"bias": 2} if has_bias else {})}
    wv = {k: eqn.invars[i] for k, i in layout.items()}
    trace = get_rule(case.prim, "init_drtrl")(eqn.invars[0], eqn.outvars[0], wv, n)
    lead = (BATCH,) if batched else ()
    expected = {"weight": lead + (case.nnz, n), **({"bias": lead + (N_OUT, n)} if has_bias else {})}
    assert {k: v.shape for k, v in trace.items()} == expected
    assert all(v.dtype == dtype and not np.asarray(v).any() for v in trace.values())
    pp = get_rule(case.prim, "init_pp")(eqn.invars[0], eqn.outvars[0], wv, n)
    assert pp.shape == (*eqn.outvars[0].aval.shape, n) and pp.dtype == dtype
    # The index arrays are int32 operands after the trainable invars.
    assert len(eqn.invars) == 2 + has_bias + 2
    assert [v.aval.dtype for v in eqn.invars[-2:]] == [jnp.int32, jnp.int32]


# ---------------------------------------------------------------------------------------------
# (e) D-RTRL trace ops: the rule-derived default, against a dense masked-RTRL oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,mode,has_bias,n",
    [
        (F64, "mm", True, 3),
        (F32, "mm", False, 1),
        (F64, "mv", True, 1),
        (F32, "mv", False, 3),
        (F64, "mv_batched_model", True, 3),
        (F64, "mv_batched_model", False, 1),
    ],
    indirect=["dtype"],
)
@pytest.mark.parametrize("which", ["default", "fused", "fused_update_solve", "fused_update_solve_pallas"])
def test_default_trace_ops_match_dense_oracle(dtype, mode, has_bias, n, which):
    """The rule-derived trace operations (rule layout ``(*batch, nnz, n)``) and the registered fused
    CSR operations (kernel layout ``(nnz, n, B)``; the update then the solve, or both in one
    operation, with the XLA reference or the kernel in interpret mode) all follow the dense
    masked-RTRL recursion restricted to the pattern."""
    case = Case(dtype, "csr", mode == "mm", has_bias, seed=11)
    x, weights = case.x, case.weights
    batch_shape = () if mode == "mv" else (BATCH,)
    fused = which != "default"
    ops = ETP_DRTRL_TRACE_OPS[case.prim] if fused else _default_ops(case.prim)
    eqn = case.eqn()
    layout = {"weight": 1, **({"bias": 2} if has_bias else {})}
    wv = {k: eqn.invars[i] for k, i in layout.items()}
    trace = ops.init(eqn.invars[0], eqn.outvars[0], wv, n, batch_shape, case.kw)
    nb = int(np.prod(batch_shape)) if batch_shape else 1
    if fused:
        assert trace["weight"].shape == (case.nnz, n, nb)
    else:
        assert trace["weight"].shape == (*batch_shape, case.nnz, n)

    def rule_layout(w):
        """The weight trace in the rule layout ``(*batch, nnz, n)``."""
        w = npy(w)
        return np.moveaxis(w, -1, 0).reshape((*batch_shape, case.nnz, n)) if fused else w

    rng = np.random.default_rng(12)
    trace = {k: arr(rng.standard_normal(v.shape), dtype) for k, v in trace.items()}
    # Dense masked-RTRL oracle: the (I, O) trace restricted to the pattern.
    e = np.einsum("...ps,pi,pk->...iks", rule_layout(trace["weight"]), case.r1, case.c1)
    eb = npy(trace["bias"]) if has_bias else None
    xe = np.broadcast_to(npy(x), (*batch_shape, N_IN))
    nbd = len(batch_shape)
    if which.startswith("fused_update_solve"):
        kw = case.kw
        step = jax.jit(lambda trace, d, df, ct: ops.update_and_solve(trace, d, x, df, ct, weights, kw, nbd))
    else:
        step = jax.jit(
            lambda trace, d, df, ct: (lambda new: (new, ops.solve(new, ct, weights, case.kw, nbd)))(
                ops.update(trace, d, x, df, weights, case.kw, nbd)
            )
        )
    if which.endswith("pallas"):
        step = under_pallas_interpret(step)
    for _ in range(2):  # two steps of the recursion
        d, df, ct = (
            rng.standard_normal((*batch_shape, N_OUT, n, n)),
            rng.standard_normal((*batch_shape, N_OUT, n)),
            rng.standard_normal((*batch_shape, N_OUT, n)),
        )
        d, df, ct = (np.asarray(a, dtype) for a in (d, df, ct))
        trace, grads = step(trace, *map(jax.device_put, (d, df, ct)))
        d, df, ct = npy(d), npy(df), npy(ct)
        e = np.einsum("...ksj,...ikj->...iks", d, e) + np.einsum("...i,...ks->...iks", xe, df)
        expected = np.einsum("...iks,pi,pk->...ps", e, case.r1, case.c1)
        assert_close(rule_layout(trace["weight"]), expected, dtype)
        dense_grad = np.einsum("...ks,...iks->...ik", ct, e).reshape(-1, N_IN, N_OUT).sum(0)
        assert_close(grads["weight"], np.einsum("ik,pi,pk->p", dense_grad, case.r1, case.c1), dtype)
        if has_bias:
            eb = np.einsum("...ksj,...kj->...ks", d, eb) + df
            assert_close(grads["bias"], (ct * eb).reshape(-1, N_OUT, n).sum((0, 2)), dtype)
        assert {k: v.shape for k, v in grads.items()} == {k: v.shape for k, v in weights.items()}


# ---------------------------------------------------------------------------------------------
# (f) JAX transformations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64], indirect=True)
def test_jit_grad_jvp_jac(dtype):
    case = Case(dtype, "csr", True, True, seed=13)
    x, data = case.x, case.data
    f = lambda x, d: case.forward(x, d)
    tx, td = jnp.cos(x), jnp.sin(data)

    @jax.jit
    def derivatives(x, d):  # one compiled program instead of eager dispatch
        loss = lambda x, d: jnp.sum(jnp.sin(f(x, d)))
        return dict(
            y=f(x, d),
            grad=jax.grad(loss, argnums=(0, 1))(x, d),
            jvp=jax.jvp(f, (x, d), (tx, td))[1],
            jacfwd_d=jax.jacfwd(f, argnums=1)(x, d),
            jacrev_d=jax.jacrev(f, argnums=1)(x, d),
            jacfwd_x=jax.jacfwd(f, argnums=0)(x[0], d),
            jacrev_x=jax.jacrev(f, argnums=0)(x[0], d),
        )

    out = derivatives(x, data)
    xn, w = npy(x), case.dense()
    y = case.reference(x)
    cot = np.cos(y)
    assert_close(out["y"], y, dtype)
    assert_close(out["grad"][0], cot @ w.T, dtype)
    assert_close(out["grad"][1], np.einsum("bi,bk,pi,pk->p", xn, cot, case.r1, case.c1), dtype)
    assert_close(out["jvp"], npy(tx) @ w + xn @ case.dense(td), dtype)
    jac_d = np.einsum("bi,pi,pk->bkp", xn, case.r1, case.c1)  # dy[b, k] / dw_p
    assert_close(out["jacfwd_d"], jac_d, dtype)
    assert_close(out["jacrev_d"], jac_d, dtype)
    assert_close(out["jacfwd_x"], w.T, dtype)
    assert_close(out["jacrev_x"], w.T, dtype)


def test_per_sample_gradients_and_vmap_marker():
    case = Case(F32, "csr", True, False, seed=14)
    data = case.data
    xs = arr(np.random.default_rng(15).standard_normal((4, BATCH, N_IN)), F32)
    per_sample = jax.jit(jax.vmap(lambda xi: jax.grad(lambda d: jnp.sum(case.forward(xi, d) ** 2))(data)))
    got = per_sample(xs)
    assert got.shape == (4, case.nnz)
    for s in range(4):
        xn = npy(xs[s])
        expected = np.einsum("bi,bk,pi,pk->p", xn, 2 * case.reference(xs[s]), case.r1, case.c1)
        assert_close(got[s], expected)
    # vmap keeps the marker: sp_mm folds the mapped axis into its batch, sp_mv becomes sp_mm.
    assert_vmap_keeps_marker(lambda x: case.forward(x), xs, case.reference, "etp_sp_mm", "etp_sp_mv")


# ---------------------------------------------------------------------------------------------
# (g) units, (h) errors
# ---------------------------------------------------------------------------------------------


def test_quantities():
    case = Case(F32, "csr", True, True, seed=16)
    x, data, bias = case.x, case.data, case.bias
    y = braintrace.sparse_matmul(x * u.mV, data * u.siemens, sparse_mat=case.mat, bias=bias * u.uA)
    assert u.get_unit(y).has_same_dim(u.mV * u.siemens)
    assert_close(y.to_decimal(u.mA), case.reference(x) - npy(bias) + npy(bias) / 1000.0)
    y1 = braintrace.sparse_matmul(x[0] * u.mV, data, sparse_mat=case.mat)
    assert u.get_unit(y1) == u.mV
    assert_close(y1.to_decimal(u.mV), npy(x[0]) @ case.dense())


def test_errors():
    case = Case(F32, "csr", True, True)
    mat, x, data = case.mat, case.x, case.data
    with pytest.raises(ValueError, match="weight_data.*nnz"):
        braintrace.sparse_matmul(x, data[:-1], sparse_mat=mat)
    with pytest.raises(ValueError, match="`x`"):
        braintrace.sparse_matmul(x[:, :-1], data, sparse_mat=mat)
    with pytest.raises(ValueError, match="`bias`"):
        braintrace.sparse_matmul(x, data, sparse_mat=mat, bias=jnp.ones(N_OUT + 1))
    with pytest.raises(ValueError, match="`bias`"):
        braintrace.sparse_matmul(x * u.mV, data * u.siemens, sparse_mat=mat, bias=jnp.ones(N_OUT) * u.second)
    with pytest.raises(TypeError, match="sparse_mat.*CSR"):
        braintrace.sparse_matmul(x, data, sparse_mat=np.zeros((N_IN, N_OUT)))
    bad = ss.CSR((mat.data, mat.indices.astype(F32), mat.indptr), shape=mat.shape)
    with pytest.raises(TypeError, match="sparse_mat.indices.*integer"):
        braintrace.sparse_matmul(x, data, sparse_mat=bad)
    bad = ss.COO((mat.data, jnp.zeros(3, jnp.int32), jnp.zeros(4, jnp.int32)), shape=mat.shape)
    with pytest.raises(ValueError, match="sparse_mat.row"):
        braintrace.sparse_matmul(x, data, sparse_mat=bad)


# ---------------------------------------------------------------------------------------------
# (i) index arrays stay operands at nnz = 10^6
# ---------------------------------------------------------------------------------------------


def _largest_constant(hlo_text):
    largest = 0
    for line in hlo_text.splitlines():
        if "constant" in line:
            for dims in re.findall(r"tensor<((?:\d+x)+)[a-z]", line):
                largest = max(largest, int(np.prod([int(s) for s in dims.rstrip("x").split("x")])))
    return largest


def _random_csr_arrays(n_in, n_out, nnz, seed=0):
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.integers(0, n_in, nnz))
    indices = rng.integers(0, n_out, nnz).astype(np.int32)
    indptr = np.searchsorted(rows, np.arange(n_in + 1)).astype(np.int32)
    return jnp.asarray(rng.standard_normal(nnz).astype(F32)), jnp.asarray(indices), jnp.asarray(indptr)


def test_constant_detector_sees_closed_over_indices():
    data, indices, indptr = _random_csr_arrays(200, 200, 20_000)
    mat = ss.CSR((data, indices, indptr), shape=(200, 200))
    text = (
        jax.jit(lambda x, d: braintrace.sparse_matmul(x, d, sparse_mat=mat))
        .lower(jnp.ones((2, 200)), data)
        .as_text()
    )
    assert _largest_constant(text) >= 20_000


def test_no_index_constants_at_one_million_nonzeros():
    n, nnz = 4000, 10**6
    data, indices, indptr = _random_csr_arrays(n, n, nnz)
    x = jnp.ones((8, n), F32)

    def step(x, d, indices, indptr):  # the CSR's arrays are jit arguments, hence traced
        return braintrace.sparse_matmul(x, d, sparse_mat=ss.CSR((d, indices, indptr), shape=(n, n)))

    loss = lambda x, d, i, p: jnp.sum(step(x, d, i, p) ** 2)
    for fn in (step, jax.grad(loss, argnums=(0, 1))):  # forward, and the JVP + transpose rules
        wall, cpu = time.perf_counter(), time.process_time()
        lowered = jax.jit(fn).lower(x, data, indices, indptr)
        text = lowered.as_text()
        lowered.compile()
        # The smaller of wall and process CPU time: robust both to other processes competing for
        # the cores (wall grows) and to a multi-threaded compile (CPU time grows).
        elapsed = min(time.perf_counter() - wall, time.process_time() - cpu)
        assert _largest_constant(text) <= 10**4
        assert elapsed < 5.0, f"lower + compile took {elapsed:.2f} s"


def test_reverse_mode_through_a_scan_keeps_no_batch_by_nnz_residual():
    """BPTT through ``sparse_matmul`` saves ``x`` per step, not the gathered ``(batch, nnz)`` array
    (the primitives differentiate a rematerialised implementation); gradients are unchanged."""
    B, n, T = 8, 400, 40
    rng = np.random.default_rng(3)
    dense = np.where(rng.random((n, n)) < 0.1, rng.standard_normal((n, n)) * 0.05, 0.0).astype(F32)
    mat = ss.CSR.fromdense(jnp.asarray(dense))
    xs = jnp.asarray(rng.standard_normal((T, B, n)).astype(F32))

    def loss(data, xs, matmul):
        def body(h, x):
            h = jnp.tanh(matmul(h, data) + x)
            return h, jnp.sum(h**2)

        return jax.lax.scan(body, jnp.zeros((B, n), F32), xs)[1].sum()

    with_data = lambda d: ss.CSR((d, mat.indices, mat.indptr), shape=mat.shape)
    etp = lambda h, d: braintrace.sparse_matmul(h, d, sparse_mat=with_data(d))
    plain = lambda h, d: h @ with_data(d).todense()
    grad = jax.jit(jax.grad(loss), static_argnums=2)
    residual_per_step = B * mat.data.shape[0] * 4
    temp = grad.lower(mat.data, xs, etp).compile().memory_analysis().temp_size_in_bytes
    assert temp < T * residual_per_step / 4, (temp, T * residual_per_step)
    assert_close(grad(mat.data, xs, etp), grad(mat.data, xs, plain), F32, tol32=1e-5)
