"""Tests of the LoRA ETP primitives ``etp_lora_mm`` / ``etp_lora_mv`` and :func:`braintrace.lora_matmul`.

References are plain NumPy (float64); the D-RTRL oracle is the exact per-unit-block trace of ``B``
(``(batch, I, r, O, n)``), against which the E layout (``(batch, I, O, n)``, contracted with
``alpha * A`` at solve time) must agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from _numerics import F32, F64, arr, assert_close, assert_vmap_keeps_marker, npy, under_pallas_interpret

import braintrace
from braintrace._compatible_imports import jaxpr_of
from braintrace._etrace_op import etp_lora_mm_p, etp_lora_mv_p, get_rule
from braintrace._etrace_op._trace_ops import ETP_DRTRL_TRACE_OPS, get_drtrl_trace_ops
from braintrace._etrace_op.lora import _lora_b_from_e, _lora_e_term

N_IN, RANK, N_OUT, BATCH, ALPHA = 6, 2, 5, 3, 1.7
# (dtype, batched, has_bias): every flag in both states and both dtypes, without the full product.
COMBOS = [(F64, True, True), (F32, True, False), (F32, False, True), (F64, False, False)]


class Case:
    def __init__(self, dtype, batched=True, has_bias=True, seed=0):
        rng = np.random.default_rng(seed)
        self.dtype, self.batched, self.has_bias = dtype, batched, has_bias
        self.x = arr(rng.standard_normal((BATCH, N_IN) if batched else (N_IN,)), dtype)
        self.b = arr(rng.standard_normal((N_IN, RANK)), dtype)
        self.a = arr(rng.standard_normal((RANK, N_OUT)), dtype)
        self.bias = arr(rng.standard_normal(N_OUT), dtype) if has_bias else None
        self.prim = etp_lora_mm_p if batched else etp_lora_mv_p
        self.params = dict(alpha=ALPHA, has_bias=has_bias)

    @property
    def weights(self):
        return {"lora_b": self.b, "lora_a": self.a, **({"bias": self.bias} if self.has_bias else {})}

    def forward(self, x=None, b=None, a=None):
        return braintrace.lora_matmul(
            self.x if x is None else x,
            self.b if b is None else b,
            self.a if a is None else a,
            alpha=ALPHA,
            bias=self.bias,
        )

    def reference(self, x=None):
        y = ALPHA * (npy(self.x if x is None else x) @ npy(self.b) @ npy(self.a))
        return y if self.bias is None else y + npy(self.bias)

    def closed_dw(self, x, g):
        """``{'lora_b': alpha x^T (g A^T), 'lora_a': alpha (xB)^T g, 'bias': sum_b g}`` in NumPy."""
        xb, gb = np.atleast_2d(npy(x)), np.atleast_2d(npy(g))
        a, b = npy(self.a), npy(self.b)
        return {"lora_b": ALPHA * xb.T @ (gb @ a.T), "lora_a": ALPHA * (xb @ b).T @ gb, "bias": gb.sum(0)}

    def eqn(self):
        jaxpr = jaxpr_of(jax.make_jaxpr(lambda x: self.forward(x))(self.x))
        eqns = [e for e in jaxpr.eqns if e.primitive is self.prim]
        assert len(eqns) == 1
        return eqns[0]

    def weight_vars(self, eqn):
        layout = {"lora_b": 1, "lora_a": 2, **({"bias": 3} if self.has_bias else {})}
        return {k: eqn.invars[i] for k, i in layout.items()}


# ---------------------------------------------------------------------------------------------
# (a) forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,batched,has_bias", COMBOS, indirect=["dtype"])
def test_forward_equals_reference(dtype, batched, has_bias):
    case = Case(dtype, batched, has_bias)
    y = case.forward()
    assert y.dtype == dtype and y.shape == case.x.shape[:-1] + (N_OUT,)
    assert_close(y, case.reference(), dtype)
    eqn = case.eqn()
    assert eqn.params == case.params and isinstance(eqn.params["alpha"], float)


def test_leading_axes_are_flattened():
    case = Case(F32, has_bias=False)
    x = arr(np.random.default_rng(1).standard_normal((2, BATCH, N_IN)), F32)
    y = case.forward(x)
    assert y.shape == (2, BATCH, N_OUT)
    assert_close(y, case.reference(x))


# The notebook cell (etp-primitives-deep-dive.ipynb) and its recorded output `y_lora[0]`.
NOTEBOOK_Y0 = [
    1.2993842e-04,
    2.9886682e-03,
    -5.7171844e-04,
    1.7000248e-03,
    2.8961061e-03,
    -1.4734608e-03,
    1.5826351e-03,
    1.1692893e-04,
    -5.4561032e-04,
    -1.3646147e-03,
    1.0654312e-04,
    2.0160272e-03,
    3.1371990e-03,
    1.8710974e-03,
    2.9124888e-03,
    -8.2047645e-04,
    9.7736251e-04,
    -1.1875220e-03,
    -2.1796541e-03,
    -5.8191392e-05,
    -1.5415263e-03,
    -1.3381819e-03,
    -2.1044153e-03,
    -8.4472442e-04,
    1.6430757e-05,
    -2.9564608e-04,
    4.5550600e-04,
    -1.6011632e-03,
    -1.4516843e-03,
    -1.3209208e-03,
    3.2850087e-04,
    -6.0276774e-04,
]


def test_notebook_cell():
    # Same values as the cell's eager calls; one compiled program instead of eager dispatch.
    b, a = jax.jit(
        lambda: (
            jax.random.normal(jax.random.PRNGKey(0), (64, 4)) * 0.01,
            jax.random.normal(jax.random.PRNGKey(1), (4, 32)) * 0.01,
        )
    )()
    y = braintrace.lora_matmul(jnp.ones((8, 64)), b, a, alpha=2.0)
    assert y.shape == (8, 32) and y.dtype == jnp.float32
    recorded = np.asarray(NOTEBOOK_Y0)
    # Normwise within 1e-6. Element-wise, three entries that are sums with heavy cancellation
    # (|y| ~ 1e-5..1e-4, from 64 terms of size 1e-2 * 1e-2) differ in the last float32 digits: the
    # recorded text came from an XLA CPU matmul with another summation order (it is reproduced
    # bit for bit by 4-way pairwise row sums followed by FMAs), and even the exact float64 result is
    # 2.4e-6 away from it there.
    assert np.linalg.norm(npy(y[0]) - recorded) / np.linalg.norm(recorded) < 1e-6
    np.testing.assert_allclose(npy(y[0]), recorded, rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# (b) xy_to_dw, (c) rule identity, (d) init shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,batched,has_bias", COMBOS, indirect=["dtype"])
def test_xy_to_dw_is_vjp(dtype, batched, has_bias):
    case = Case(dtype, batched, has_bias, seed=2)
    x, weights = case.x, case.weights
    g = arr(np.random.default_rng(3).standard_normal(x.shape[:-1] + (N_OUT,)), dtype)

    def impl(w):
        ops = [x, w["lora_b"], w["lora_a"]] + ([w["bias"]] if has_bias else [])
        return case.prim.impl_fn(*ops, **case.params)

    @jax.jit  # one compiled program per test instead of eager dispatch of every op
    def run(g, weights):
        return get_rule(case.prim, "xy_to_dw")(x, g, weights, **case.params), jax.vjp(impl, weights)[1](g)[0]

    dw, expected = run(g, weights)
    closed = case.closed_dw(x, g)
    assert set(dw) == set(weights)
    for k in weights:
        assert dw[k].shape == weights[k].shape and dw[k].dtype == dtype
        assert_close(dw[k], expected[k], dtype)
        assert_close(dw[k], closed[k], dtype)


@pytest.mark.parametrize("dtype,batched,has_bias", COMBOS, indirect=["dtype"])
def test_rule_identity(dtype, batched, has_bias):
    """Per key: directly for ``lora_a`` / ``bias``; in the E layout for ``lora_b``."""
    case = Case(dtype, batched, has_bias, seed=4)
    x, weights, params = case.x, case.weights, case.params
    yw_to_w, xy_to_dw = get_rule(case.prim, "yw_to_w"), get_rule(case.prim, "xy_to_dw")
    rng = np.random.default_rng(5)
    g = arr(rng.standard_normal(x.shape[:-1] + (N_OUT,)), dtype)
    v = arr(rng.standard_normal(N_OUT), dtype)  # shared by the batch
    vb = arr(rng.standard_normal(g.shape), dtype)  # one per batch element (or per unit for mv)

    @jax.jit
    def run(g, v, vb):
        out = {}
        # Shared v: identity on the rules as they are, for the weight-shaped keys.
        dw = xy_to_dw(x, g, weights, **params)
        trace = dict(dw, lora_b=_lora_e_term(x, g).reshape(-1, N_IN, N_OUT).sum(0))  # E layout for B
        out["shared"] = (yw_to_w(v, trace, **params), xy_to_dw(x, v * g, weights, **params))
        # Per-element v: the E-layout trace of each element, scaled, then contracted with alpha * A.
        per_e = _lora_e_term(x, g)  # (B, I, O) or (I, O)
        zeros = jnp.zeros(per_e.shape[:-2] + (RANK, N_OUT), x.dtype)
        scaled = yw_to_w(vb, {"lora_b": per_e, "lora_a": zeros}, **dict(params, has_bias=False))
        b_lhs = _lora_b_from_e(scaled["lora_b"], weights["lora_a"], ALPHA).reshape(-1, N_IN, RANK).sum(0)
        out["per_element_b"] = (b_lhs, xy_to_dw(x, vb * g, weights, **params)["lora_b"])
        out["contract"] = (_lora_b_from_e(trace["lora_b"], weights["lora_a"], ALPHA), dw["lora_b"])
        return out

    out = run(g, v, vb)
    lhs, rhs = out["shared"]
    for k in weights:
        if k == "lora_b":
            assert_close(_lora_b_from_e(lhs["lora_b"], case.a, ALPHA), rhs["lora_b"], dtype)
        else:
            assert_close(lhs[k], rhs[k], dtype)
    assert_close(*out["per_element_b"], dtype)
    assert_close(*out["contract"], dtype)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dtype,batched,has_bias", COMBOS, indirect=["dtype"])
def test_init_shapes(dtype, batched, has_bias, n):
    case = Case(dtype, batched, has_bias)
    eqn = case.eqn()
    wv = case.weight_vars(eqn)
    lead = (BATCH,) if batched else ()
    expected = {
        "lora_b": lead + (N_IN, N_OUT, n),
        "lora_a": lead + (RANK, N_OUT, n),
        **({"bias": lead + (N_OUT, n)} if has_bias else {}),
    }
    ops = get_drtrl_trace_ops(case.prim)
    assert ops is ETP_DRTRL_TRACE_OPS[case.prim]
    for trace in (
        get_rule(case.prim, "init_drtrl")(eqn.invars[0], eqn.outvars[0], wv, n),
        ops.init(eqn.invars[0], eqn.outvars[0], wv, n, lead, case.params),
    ):
        assert {k: v.shape for k, v in trace.items()} == expected
        assert all(v.dtype == dtype and not np.asarray(v).any() for v in trace.values())
    if not batched:  # etp_lora_mv under a batched model: the algorithms prepend the batch axes
        trace = ops.init(eqn.invars[0], eqn.outvars[0], wv, n, (4,), case.params)
        assert {k: v.shape for k, v in trace.items()} == {k: (4, *s) for k, s in expected.items()}
    pp = get_rule(case.prim, "init_pp")(eqn.invars[0], eqn.outvars[0], wv, n)
    assert pp.shape == (*eqn.outvars[0].aval.shape, n) and pp.dtype == dtype


# ---------------------------------------------------------------------------------------------
# (e) the E-layout DRTRLTraceOps override against the exact per-unit-block trace
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
@pytest.mark.parametrize("which", ["separate", "update_solve", "update_solve_pallas"])
def test_trace_ops_match_per_unit_oracle(dtype, mode, has_bias, n, which):
    """The registered trace operations, as an update then a solve or as one fused update+solve (the
    XLA reference, or the kernels in interpret mode), against the exact per-unit recursion."""
    case = Case(dtype, mode == "mm", has_bias, seed=6)
    batch_shape = () if mode == "mv" else (BATCH,)
    nb = len(batch_shape)
    ops = get_drtrl_trace_ops(case.prim)
    eqn = case.eqn()
    zeros = ops.init(eqn.invars[0], eqn.outvars[0], case.weight_vars(eqn), n, batch_shape, case.params)
    rng = np.random.default_rng(7)
    trace = {k: arr(rng.standard_normal(v.shape), dtype) for k, v in zeros.items()}
    a, b = npy(case.a), npy(case.b)
    xe = np.broadcast_to(npy(case.x), (*batch_shape, N_IN))
    z = xe @ b
    # The exact per-unit-block traces: eps_B[..., i, r, k, s] = dh_{k,s} / dB_{ir} (B reaches every
    # unit through A), eps_A[..., r, k, s], eps_b[..., k, s]. eps_B starts consistent with E.
    e = npy(trace["lora_b"])
    eps_b_full = ALPHA * np.einsum("rk,...iks->...irks", a, e)
    eps_a = npy(trace["lora_a"])
    eps_bias = npy(trace["bias"]) if has_bias else None
    if which == "separate":
        step = jax.jit(
            lambda trace, d, df, ct: (lambda new: (new, ops.solve(new, ct, case.weights, case.params, nb)))(
                ops.update(trace, d, case.x, df, case.weights, case.params, nb)
            )
        )
    else:
        w, kw = case.weights, case.params
        step = jax.jit(lambda trace, d, df, ct: ops.update_and_solve(trace, d, case.x, df, ct, w, kw, nb))
    if which.endswith("pallas"):
        step = under_pallas_interpret(step)
    for _ in range(2):  # two steps of the recursion
        d, df, ct = (
            np.asarray(rng.standard_normal((*batch_shape, N_OUT, *s)), dtype) for s in ((n, n), (n,), (n,))
        )
        trace, grads = step(trace, *map(jax.device_put, (d, df, ct)))
        d, df, ct = npy(d), npy(df), npy(ct)
        e = np.einsum("...ksj,...ikj->...iks", d, e) + np.einsum("...i,...ks->...iks", xe, df)
        eps_b_full = np.einsum("...ksj,...irkj->...irks", d, eps_b_full) + ALPHA * np.einsum(
            "...i,rk,...ks->...irks", xe, a, df
        )
        eps_a = np.einsum("...ksj,...rkj->...rks", d, eps_a) + ALPHA * np.einsum("...r,...ks->...rks", z, df)
        assert_close(trace["lora_b"], e, dtype)
        assert_close(trace["lora_a"], eps_a, dtype)
        sum_batch = lambda t: t.reshape((-1,) + t.shape[nb:]).sum(0)
        assert_close(grads["lora_b"], sum_batch(np.einsum("...ks,...irks->...ir", ct, eps_b_full)), dtype)
        assert_close(grads["lora_a"], sum_batch(np.einsum("...ks,...rks->...rk", ct, eps_a)), dtype)
        if has_bias:
            eps_bias = np.einsum("...ksj,...kj->...ks", d, eps_bias) + df
            assert_close(trace["bias"], eps_bias, dtype)
            assert_close(grads["bias"], sum_batch(ct * eps_bias).sum(-1), dtype)
        assert {k: v.shape for k, v in grads.items()} == {k: v.shape for k, v in case.weights.items()}


# ---------------------------------------------------------------------------------------------
# (f) JAX transformations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64], indirect=True)
def test_jit_grad_jvp_jac(dtype):
    case = Case(dtype, True, True, seed=8)
    rng = np.random.default_rng(9)
    tx, tb, ta = (rng.standard_normal(w.shape) for w in (case.x, case.b, case.a))
    f = lambda x, b, a: case.forward(x, b, a)

    @jax.jit  # one compiled program instead of eager dispatch
    def run(x, b, a):
        loss = lambda x, b, a: jnp.sum(jnp.sin(f(x, b, a)))
        return dict(
            y=f(x, b, a),
            grad=jax.grad(loss, argnums=(0, 1, 2))(x, b, a),
            jvp=jax.jvp(f, (x, b, a), tuple(arr(t, dtype) for t in (tx, tb, ta)))[1],
            jacfwd=jax.jacfwd(f, argnums=2)(x, b, a),
            jacrev=jax.jacrev(f, argnums=2)(x, b, a),
            jac_x=jax.jacrev(f, argnums=0)(x[0], b, a),
        )

    out = run(case.x, case.b, case.a)
    x, b, a = npy(case.x), npy(case.b), npy(case.a)
    y = case.reference()
    cot = np.cos(y)
    closed = case.closed_dw(case.x, cot)
    assert_close(out["y"], y, dtype)
    assert_close(out["grad"][0], ALPHA * cot @ (b @ a).T, dtype)
    assert_close(out["grad"][1], closed["lora_b"], dtype)
    assert_close(out["grad"][2], closed["lora_a"], dtype)
    assert_close(out["jvp"], ALPHA * (tx @ b @ a + x @ tb @ a + x @ b @ ta), dtype)
    jac_a = ALPHA * np.einsum("br,kj->bkrj", x @ b, np.eye(N_OUT))  # dy[b, k] / dA[r, j]
    assert_close(out["jacfwd"], jac_a, dtype)
    assert_close(out["jacrev"], jac_a, dtype)
    assert_close(out["jac_x"], ALPHA * (b @ a).T, dtype)


def test_per_sample_gradients_and_vmap_marker():
    case = Case(F32, True, False, seed=10)
    xs = arr(np.random.default_rng(11).standard_normal((4, BATCH, N_IN)), F32)
    grad = lambda xi: jax.grad(lambda b, a: jnp.sum(case.forward(xi, b, a) ** 2), argnums=(0, 1))(
        case.b, case.a
    )
    gb, ga = jax.jit(jax.vmap(grad))(xs)
    assert gb.shape == (4, N_IN, RANK) and ga.shape == (4, RANK, N_OUT)
    for s in range(4):
        closed = case.closed_dw(xs[s], 2 * case.reference(xs[s]))
        assert_close(gb[s], closed["lora_b"])
        assert_close(ga[s], closed["lora_a"])
    assert_vmap_keeps_marker(lambda x: case.forward(x), xs, case.reference, "etp_lora_mm", "etp_lora_mv")


# ---------------------------------------------------------------------------------------------
# (g) units, (h) errors
# ---------------------------------------------------------------------------------------------


def test_quantities():
    case = Case(F32, True, True, seed=12)
    y = braintrace.lora_matmul(
        case.x * u.mV, case.b * u.siemens, case.a * u.ohm, alpha=ALPHA, bias=case.bias * u.uvolt
    )
    assert u.get_unit(y).has_same_dim(u.mV)
    bias = npy(case.bias)
    assert_close(y.to_decimal(u.mV), case.reference() - bias + bias / 1000.0)
    y = braintrace.lora_matmul(case.x, case.b * u.siemens, case.a, alpha=ALPHA)
    assert u.get_unit(y) == u.siemens
    assert_close(y.to_decimal(u.siemens), ALPHA * npy(case.x) @ npy(case.b) @ npy(case.a))


def test_errors():
    case = Case(F32, True, False)
    x, b, a = case.x, case.b, case.a
    with pytest.raises(ValueError, match="`B`"):
        braintrace.lora_matmul(x, b[:, 0], a)
    with pytest.raises(ValueError, match="`A`"):
        braintrace.lora_matmul(x, b, a[0])
    with pytest.raises(ValueError, match="rank of `B`"):
        braintrace.lora_matmul(x, b, a[:1])
    with pytest.raises(ValueError, match="`x`"):
        braintrace.lora_matmul(x[:, :-1], b, a)
    with pytest.raises(ValueError, match="`bias`"):
        braintrace.lora_matmul(x, b, a, bias=jnp.ones(N_OUT + 1))
    with pytest.raises(ValueError, match="`bias`"):
        braintrace.lora_matmul(x * u.mV, b, a, bias=jnp.ones(N_OUT) * u.second)
    with pytest.raises(TypeError, match="`alpha`"):
        jax.jit(lambda al: braintrace.lora_matmul(x, b, a, alpha=al))(2.0)
