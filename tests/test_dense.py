"""The dense ETP primitives ``etp_mm`` / ``etp_mv``, their four rules and :func:`braintrace.matmul`.

Every rule is checked on random inputs against an independent oracle (``numpy`` einsums in float64,
or ``jax.vjp`` of the primitive's ``impl_fn``), in float32 and float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from _numerics import under_pallas_interpret

import braintrace
from braintrace._etrace_op import (
    BATCHED_PRIMITIVES,
    ETP_TRAINABLE_INVARS_FNS,
    _trace_ops,
    etp_mm_p,
    etp_mv_p,
    get_rule,
)

B, I, O = 3, 5, 4  # batch, in, out: in != out on purpose
PRIMS = {"mm": etp_mm_p, "mv": etp_mv_p}


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)


def make_inputs(rng, kind, has_bias, dtype):
    x = rng.standard_normal((B, I) if kind == "mm" else (I,)).astype(dtype)
    w = rng.standard_normal((I, O)).astype(dtype)
    b = rng.standard_normal((O,)).astype(dtype) if has_bias else None
    return x, w, b


def weights_of(w, b):
    return {"weight": jnp.asarray(w)} if b is None else {"weight": jnp.asarray(w), "bias": jnp.asarray(b)}


def ref_forward(x, w, b):
    y = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    return y if b is None else y + np.asarray(b, np.float64)


def assert_tree_close(got, want, dtype):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(
            np.asarray(got[k]), np.asarray(want[k]), err_msg=f"key {k!r}", **tol(dtype)
        )


kinds = pytest.mark.parametrize("kind", ["mm", "mv"])
biases = pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------


@kinds
@biases
def test_forward_matches_x_at_w(kind, has_bias, dtype, rng, primitive_names):
    x, w, b = make_inputs(rng, kind, has_bias, dtype)
    y = braintrace.matmul(jnp.asarray(x), jnp.asarray(w), bias=None if b is None else jnp.asarray(b))
    assert y.dtype == dtype
    assert y.shape == ((B, O) if kind == "mm" else (O,))
    np.testing.assert_allclose(np.asarray(y), ref_forward(x, w, b), **tol(dtype))

    operands = [x, w] + ([b] if has_bias else [])
    y_bind = PRIMS[kind].bind(*map(jnp.asarray, operands), has_bias=has_bias)
    np.testing.assert_allclose(np.asarray(y_bind), ref_forward(x, w, b), **tol(dtype))

    jaxpr = jax.make_jaxpr(lambda *a: braintrace.matmul(a[0], a[1], *a[2:]))(*operands)
    assert PRIMS[kind].name in primitive_names(jaxpr)


def test_forward_flattens_extra_leading_axes(rng, primitive_names):
    x = jnp.asarray(rng.standard_normal((2, 3, I)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((I, O)), jnp.float32)
    y = braintrace.matmul(x, w)
    assert y.shape == (2, 3, O)
    np.testing.assert_allclose(np.asarray(y), np.einsum("abi,io->abo", x, w), rtol=2e-5, atol=2e-5)
    assert "etp_mm" in primitive_names(jax.make_jaxpr(braintrace.matmul)(x, w))


# --------------------------------------------------------------------------------------------------
# the four rules
# --------------------------------------------------------------------------------------------------


@kinds
@biases
def test_xy_to_dw_equals_vjp_of_impl(kind, has_bias, dtype, rng):
    p = PRIMS[kind]
    x, w, b = make_inputs(rng, kind, has_bias, dtype)
    g = rng.standard_normal(ref_forward(x, w, b).shape).astype(dtype)
    got = get_rule(p, "xy_to_dw")(jnp.asarray(x), jnp.asarray(g), weights_of(w, b), has_bias=has_bias)

    trainables = [jnp.asarray(w)] + ([jnp.asarray(b)] if has_bias else [])
    _, vjp = jax.vjp(lambda *t: p.impl_fn(jnp.asarray(x), *t, has_bias=has_bias), *trainables)
    cts = vjp(jnp.asarray(g))
    assert_tree_close(got, dict(zip(["weight", "bias"], cts)), dtype)

    # Independent closed form: dW = x^T g (summed over the batch), db = sum_b g.
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    want = {"weight": x64.reshape(-1, I).T @ g64.reshape(-1, O)}
    if has_bias:
        want["bias"] = g64.reshape(-1, O).sum(0)
    assert_tree_close(got, want, dtype)
    assert all(v.dtype == dtype for v in got.values())


@kinds
@biases
def test_yw_to_w_chain_rule_identity(kind, has_bias, dtype, rng):
    """``yw_to_w(v, xy_to_dw(x, g, W)) == xy_to_dw(x, v * g, W)`` per key (per batch element)."""
    p = PRIMS[kind]
    x, w, b = make_inputs(rng, kind, has_bias, dtype)
    shape = ref_forward(x, w, b).shape
    g = rng.standard_normal(shape).astype(dtype)
    v = rng.standard_normal(shape).astype(dtype)
    xy, yw = get_rule(p, "xy_to_dw"), get_rule(p, "yw_to_w")
    W = weights_of(w, b)
    if kind == "mv":
        pairs = [(x, g, v, v)]
    else:
        pairs = [(x[i : i + 1], g[i : i + 1], v[i], v[i : i + 1]) for i in range(B)]
    for xb, gb, vb, vb_full in pairs:
        lhs = yw(
            jnp.asarray(vb), xy(jnp.asarray(xb), jnp.asarray(gb), W, has_bias=has_bias), has_bias=has_bias
        )
        rhs = xy(jnp.asarray(xb), jnp.asarray(vb_full * gb), W, has_bias=has_bias)
        assert_tree_close(lhs, rhs, dtype)


@biases
def test_yw_to_w_scales_trace_along_out(has_bias, dtype, rng):
    tr = {"weight": rng.standard_normal((B, I, O)).astype(dtype)}
    if has_bias:
        tr["bias"] = rng.standard_normal((B, O)).astype(dtype)
    d = rng.standard_normal((B, O)).astype(dtype)
    got = get_rule(etp_mm_p, "yw_to_w")(
        jnp.asarray(d), {k: jnp.asarray(t) for k, t in tr.items()}, has_bias=has_bias
    )
    want = {"weight": tr["weight"].astype(np.float64) * d[:, None, :]}
    if has_bias:
        want["bias"] = tr["bias"].astype(np.float64) * d
    assert_tree_close(got, want, dtype)


def _eqn_vars(kind, has_bias, dtype, rng):
    """Real jaxpr variables ``(x_var, y_var, weight_vars, params)`` of one dense equation."""
    x, w, b = make_inputs(rng, kind, has_bias, dtype)
    operands = [x, w] + ([b] if has_bias else [])
    jaxpr = jax.make_jaxpr(lambda *a: PRIMS[kind].bind(*a, has_bias=has_bias))(*map(jnp.asarray, operands))
    (eqn,) = [e for e in jaxpr.eqns if e.primitive is PRIMS[kind]]
    layout = ETP_TRAINABLE_INVARS_FNS[PRIMS[kind]](eqn.params)
    weight_vars = {k: eqn.invars[i] for k, i in layout.items()}
    return eqn.invars[0], eqn.outvars[0], weight_vars, dict(eqn.params)


@kinds
@biases
@pytest.mark.parametrize("n", [1, 3])
def test_init_rules_shapes_and_dtypes(kind, has_bias, n, dtype, rng):
    p = PRIMS[kind]
    x_var, y_var, weight_vars, params = _eqn_vars(kind, has_bias, dtype, rng)
    assert set(weight_vars) == ({"weight", "bias"} if has_bias else {"weight"})

    trace = get_rule(p, "init_drtrl")(x_var, y_var, weight_vars, n)
    lead = (B,) if kind == "mm" else ()
    want = {"weight": (*lead, I, O, n)}
    if has_bias:
        want["bias"] = (*lead, O, n)
    assert {k: v.shape for k, v in trace.items()} == want
    for leaf in trace.values():
        assert leaf.dtype == dtype
        assert not np.any(np.asarray(leaf))

    pp = get_rule(p, "init_pp")(x_var, y_var, weight_vars, n)
    assert pp.shape == (*y_var.aval.shape, n) == (*lead, O, n)
    assert pp.dtype == dtype
    assert not np.any(np.asarray(pp))


# --------------------------------------------------------------------------------------------------
# default D-RTRL trace operations against an einsum oracle
# --------------------------------------------------------------------------------------------------


def _oracle_update(trace, d, x, df, batch):
    """``ε[..., s] = Σ_j d[..., s, j] ε[..., j] + x ⊗ df[..., s]`` in float64."""
    f = lambda a: np.asarray(a, np.float64)
    d, df, x = f(d), f(df), f(x)
    if batch and x.ndim == 1:
        x = np.broadcast_to(x, (df.shape[0], x.shape[0]))  # shared input under a batched model
    new = {
        "weight": np.einsum("...ksj,...ikj->...iks", d, f(trace["weight"]))
        + np.einsum("...i,...ks->...iks", x, df)
    }
    if "bias" in trace:
        new["bias"] = np.einsum("...ksj,...kj->...ks", d, f(trace["bias"])) + df
    return new


def _oracle_solve(trace, ct):
    n = ct.shape[-1]
    ct = np.asarray(ct, np.float64).reshape(-1, O, n)  # leading batch axes (if any) flattened
    out = {
        "weight": np.einsum("bks,biks->ik", ct, np.asarray(trace["weight"], np.float64).reshape(-1, I, O, n))
    }
    if "bias" in trace:
        out["bias"] = np.einsum("bks,bks->k", ct, np.asarray(trace["bias"], np.float64).reshape(-1, O, n))
    return out


TRACE_CASES = [
    ("default", kind, batch_ndim, has_bias, n)
    for kind, batch_ndim in [("mm", 1), ("mv", 0), ("mv", 1)]
    for has_bias in (False, True)
    for n in (1, 3)
] + [
    (source, kind, batch_ndim, has_bias, n)
    for source in ("registered", "registered_pallas")
    for kind, batch_ndim in [("mm", 1), ("mv", 0), ("mv", 1)]
    for has_bias, n in [(True, 3), (False, 1)]
]


@pytest.mark.parametrize("source,kind,batch_ndim,has_bias,n", TRACE_CASES)
def test_trace_ops_update_and_solve(source, kind, batch_ndim, has_bias, n, dtype, rng):
    """The rule-derived default operations (``_default_ops``) and whatever ``get_drtrl_trace_ops``
    returns for the primitive (a registered override: the fused update, solve and update+solve, with
    the XLA reference or the kernels in interpret mode) against einsums."""
    p = PRIMS[kind]
    ops = _trace_ops._default_ops(p) if source == "default" else _trace_ops.get_drtrl_trace_ops(p)
    x_var, y_var, weight_vars, params = _eqn_vars(kind, has_bias, dtype, rng)
    batch_shape = (B,) if batch_ndim else ()
    zeros = ops.init(x_var, y_var, weight_vars, n, batch_shape, params)
    assert zeros["weight"].shape == (*batch_shape, I, O, n)

    x, w, b = make_inputs(rng, kind, has_bias, dtype)
    trace = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in zeros.items()}
    unit_shape = (*batch_shape, O)
    d = rng.standard_normal((*unit_shape, n, n)).astype(dtype)
    df = rng.standard_normal((*unit_shape, n)).astype(dtype)
    ct = rng.standard_normal((*unit_shape, n)).astype(dtype)
    operands = tuple(jax.tree.map(jnp.asarray, (trace, d, x, df, ct, weights_of(w, b))))

    @jax.jit
    def run(trace, d, x, df, ct, weights):
        new = ops.update(trace, d, x, df, weights, params, batch_ndim)
        grads = ops.solve(new, ct, weights, params, batch_ndim)
        return new, grads, ops.update_and_solve(trace, d, x, df, ct, weights, params, batch_ndim)

    if source.endswith("pallas"):
        run = under_pallas_interpret(run)
    new, grads, (new2, grads2) = run(*operands)
    want_new = _oracle_update(trace, d, x, df, batch_ndim)
    want_grads = _oracle_solve(want_new, ct)
    assert_tree_close(new, want_new, dtype)
    assert_tree_close(new2, want_new, dtype)
    assert all(new[k].dtype == dtype for k in new)
    assert_tree_close(grads, want_grads, dtype)
    assert_tree_close(grads2, want_grads, dtype)
    assert grads["weight"].shape == (I, O)


# --------------------------------------------------------------------------------------------------
# JAX transformations against plain jnp
# --------------------------------------------------------------------------------------------------


def _fns(b, c):
    """``(etp_version, plain_version)`` of ``sum(tanh(x @ w + b) * c)``."""

    def etp(x, w):
        return jnp.sum(jnp.tanh(braintrace.matmul(x, w, bias=b)) * c)

    def plain(x, w):
        y = x @ w
        return jnp.sum(jnp.tanh(y if b is None else y + b) * c)

    return etp, plain


def _transformed(mm, loss, x, w, tx, tw, xs, ws):
    """Every transformation under test, applied to ``mm(x, w)`` and ``loss(x, w)``."""
    V = xs.shape[0]
    out = {
        "grad": jax.grad(loss, argnums=(0, 1))(x, w),
        "jvp": jax.jvp(mm, (x, w), (tx, tw)),
        "jacfwd": jax.jacfwd(mm, argnums=(0, 1))(x, w),
        "jacrev": jax.jacrev(mm, argnums=(0, 1))(x, w),
        "vmap_x": jax.vmap(lambda xi: mm(xi, w))(xs),
        "vmap_w": jax.vmap(lambda wi: mm(x, wi))(ws),
        "vmap_xw": jax.vmap(mm)(xs, ws),
        "vmap_x_last": jax.vmap(lambda xi: mm(xi, w), in_axes=-1)(jnp.moveaxis(xs, 0, -1)),
        "per_sample_grad": jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None))(xs, w),
    }
    assert out["per_sample_grad"].shape == (V, *w.shape)
    return out


@kinds
@biases
def test_transformations_agree_with_plain_jnp(kind, has_bias, dtype, rng):
    x, w, b = (None if a is None else jnp.asarray(a) for a in make_inputs(rng, kind, has_bias, dtype))
    c = jnp.asarray(rng.standard_normal(ref_forward(x, w, b).shape).astype(dtype))
    etp, plain = _fns(b, c)
    close = lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), **tol(dtype))
    mm = lambda x_, w_: braintrace.matmul(x_, w_, bias=b)
    mm_ref = lambda x_, w_: x_ @ w_ + (0 if b is None else b)

    # Eager use of the primitive.
    close(mm(x, w), mm_ref(x, w))
    for got, want in zip(jax.grad(etp, argnums=(0, 1))(x, w), jax.grad(plain, argnums=(0, 1))(x, w)):
        close(got, want)
    if has_bias:
        gb = jax.grad(lambda b_: jnp.sum(jnp.tanh(braintrace.matmul(x, w, bias=b_)) * c))(b)
        close(gb, jax.grad(lambda b_: jnp.sum(jnp.tanh(x @ w + b_) * c))(b))

    # Every transformation, both sides compiled together (jit of vmap of grad included).
    V = 2
    args = (
        x,
        w,
        jnp.asarray(rng.standard_normal(x.shape).astype(dtype)),
        jnp.asarray(rng.standard_normal(w.shape).astype(dtype)),
        jnp.asarray(rng.standard_normal((V, *x.shape)).astype(dtype)),
        jnp.asarray(rng.standard_normal((V, *w.shape)).astype(dtype)),
    )
    got, want = jax.jit(lambda *a: (_transformed(mm, etp, *a), _transformed(mm_ref, plain, *a)))(*args)
    assert set(got) == set(want)
    for key in want:
        for g, e in zip(jax.tree.leaves(got[key]), jax.tree.leaves(want[key]), strict=True):
            assert g.shape == e.shape, key
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), err_msg=key, **tol(dtype))


@kinds
@biases
def test_vmap_keeps_the_etp_marker(kind, has_bias, rng, primitive_names):
    """``vmap`` re-binds a batched ETP primitive instead of inlining ``x @ w``."""
    x, w, b = (None if a is None else jnp.asarray(a) for a in make_inputs(rng, kind, has_bias, np.float32))
    xs = jnp.stack([x, 2 * x, -x])
    f = lambda xi: braintrace.matmul(xi, w, bias=b)
    names = primitive_names(jax.make_jaxpr(jax.vmap(f))(xs))
    assert "etp_mm" in names
    assert "dot_general" not in names
    names_last = primitive_names(jax.make_jaxpr(jax.vmap(f, in_axes=-1))(jnp.moveaxis(xs, 0, -1)))
    assert "etp_mm" in names_last
    names_nested = primitive_names(jax.make_jaxpr(jax.vmap(jax.vmap(f)))(xs[None]))
    assert "etp_mm" in names_nested
    np.testing.assert_allclose(
        np.asarray(jax.vmap(f)(xs)), np.asarray(xs @ w + (0 if b is None else b)), rtol=2e-5, atol=2e-5
    )
    assert etp_mm_p in BATCHED_PRIMITIVES and etp_mv_p not in BATCHED_PRIMITIVES


# --------------------------------------------------------------------------------------------------
# saiunit quantities
# --------------------------------------------------------------------------------------------------


def test_quantity_volt_times_siemens_gives_amp(rng):
    x = rng.standard_normal((B, I)).astype(np.float32)
    w = rng.standard_normal((I, O)).astype(np.float32)
    b = rng.standard_normal((O,)).astype(np.float32)
    y = braintrace.matmul(x * u.volt, w * u.siemens, bias=b * u.amp)
    assert u.get_unit(y) == u.amp
    np.testing.assert_allclose(np.asarray(y.to_decimal(u.amp)), ref_forward(x, w, b), rtol=2e-5, atol=2e-5)


def test_quantity_millivolt_input_rescales_amp_bias(rng):
    x = rng.standard_normal((B, I)).astype(np.float32)
    w = rng.standard_normal((I, O)).astype(np.float32)
    b = rng.standard_normal((O,)).astype(np.float32)
    y = braintrace.matmul(x * u.mV, w * u.siemens, bias=b * u.amp)
    assert u.get_unit(y).has_same_dim(u.amp)
    want = (x.astype(np.float64) / 1000.0) @ w.astype(np.float64) + b.astype(np.float64)
    np.testing.assert_allclose(np.asarray(y.to_decimal(u.amp)), want, rtol=2e-5, atol=2e-6)


def test_quantity_unbatched_and_unitless_weight(rng):
    x = rng.standard_normal((I,)).astype(np.float32)
    w = rng.standard_normal((I, O)).astype(np.float32)
    y = braintrace.matmul(x * u.mV, jnp.asarray(w))
    assert u.get_unit(y) == u.mV
    np.testing.assert_allclose(np.asarray(y.to_decimal(u.mV)), ref_forward(x, w, None), rtol=2e-5, atol=2e-5)


def test_quantity_scaled_dimensionless_product_converts_the_bias(dtype, rng):
    """mV x 1/V is the dimensionless unit 10^-3: a plain bias must be rescaled into it."""
    x = rng.standard_normal((B, I)).astype(dtype)
    w = rng.standard_normal((I, O)).astype(dtype)
    b = rng.standard_normal((O,)).astype(dtype)
    want = (x.astype(np.float64) / 1000.0) @ w.astype(np.float64) + b.astype(np.float64)
    for bias in (jnp.asarray(b), jnp.asarray(b) * u.UNITLESS, (jnp.asarray(b) * 1000.0) * (u.mV / u.volt)):
        y = braintrace.matmul(jnp.asarray(x) * u.mV, jnp.asarray(w) / u.volt, bias=bias)
        y = np.asarray(y.to_decimal() if isinstance(y, u.Quantity) else y)
        assert y.dtype == dtype
        np.testing.assert_allclose(y, want, rtol=2e-5 if dtype == np.float32 else 1e-11, atol=1e-6)


@pytest.mark.parametrize(
    "bias",
    [lambda b: b * u.volt, lambda b: jnp.asarray(b)],
    ids=["volt-bias", "unitless-bias"],
)
def test_quantity_bias_with_incompatible_unit_names_bias(bias, rng):
    x = rng.standard_normal((B, I)).astype(np.float32) * u.volt
    w = rng.standard_normal((I, O)).astype(np.float32) * u.siemens
    with pytest.raises(ValueError, match="`bias`"):
        braintrace.matmul(x, w, bias=bias(np.ones(O, np.float32)))


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------


def test_shape_mismatch_names_the_arguments():
    with pytest.raises(ValueError, match=r"`x`.*`weight`"):
        braintrace.matmul(jnp.ones((B, I + 1)), jnp.ones((I, O)))


def test_bias_of_wrong_shape_names_bias():
    with pytest.raises(ValueError, match="`bias`"):
        braintrace.matmul(jnp.ones((B, I)), jnp.ones((I, O)), bias=jnp.ones((O + 1,)))
    with pytest.raises(ValueError, match="`bias`"):
        braintrace.matmul(jnp.ones((B, I)), jnp.ones((I, O)), bias=jnp.ones((1, O)))


@pytest.mark.parametrize("shape", [(I,), (I, O, 2)])
def test_weight_must_be_2d(shape):
    with pytest.raises(ValueError, match="`weight`"):
        braintrace.matmul(jnp.ones((B, I)), jnp.ones(shape))


def test_scalar_x_names_x():
    with pytest.raises(ValueError, match="`x`"):
        braintrace.matmul(jnp.float32(1.0), jnp.ones((I, O)))
