"""Tests of the convolution ETP primitive ``etp_conv`` and :func:`braintrace.conv`.

The reference is a NumPy (float64) convolution built from explicit input patches, independent of
``lax.conv_general_dilated``; it gives the forward, the VJP, the per-position terms and the
per-position D-RTRL oracle. JAX compiles only the code under test.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from _numerics import F32, F64, arr, npy
from _numerics import assert_close as _assert_close
from jax import lax

import braintrace
from braintrace._compatible_imports import jaxpr_of
from braintrace._etrace_op import etp_conv_p, get_rule
from braintrace._etrace_op._trace_ops import get_drtrl_trace_ops
from braintrace._etrace_op.conv import _position_terms

# Layouts, strides, paddings, dilations and groups; in_channels != out_channels everywhere.
CONFIGS = {
    "nwc": dict(
        x=(2, 9, 3),
        k=(3, 3, 4),
        strides=(2,),
        padding="SAME",
        rhs_dilation=(2,),
        dimension_numbers=("NWC", "WIO", "NWC"),
    ),
    "nhwc": dict(
        x=(2, 5, 6, 3),
        k=(2, 3, 3, 4),
        strides=(1, 2),
        padding=((1, 0), (0, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ),
    "nchw_lhs_dil": dict(
        x=(2, 3, 4, 4), k=(5, 3, 2, 2), strides=(1, 1), padding=((0, 1), (1, 1)), lhs_dilation=(1, 2)
    ),
    "nchw_groups": dict(
        x=(2, 4, 4, 5), k=(6, 2, 2, 3), strides=(2, 1), padding="SAME", feature_group_count=2
    ),
    "hwcn": dict(
        x=(3, 5, 4, 2),
        k=(6, 4, 2, 2),
        strides=(1, 1),
        padding="SAME",
        dimension_numbers=("HWCN", "OIHW", "CNHW"),
    ),  # batch axis not leading
}
# (config, dtype, has_bias): each config once, both dtypes and both bias states covered.
CASES = [("nwc", F64, True), ("nhwc", F32, False), ("nchw_lhs_dil", F64, False), ("nchw_groups", F32, True)]


def assert_close(actual, expected, dtype=F32):
    """Normwise relative comparison (float32 tolerance 3e-6: convolution sums many terms)."""
    _assert_close(actual, expected, dtype, tol32=3e-6)


class Case:
    """Random x, kernel, bias for one configuration, with a NumPy patch-based reference."""

    def __init__(self, name, dtype, has_bias, seed=0):
        cfg = dict(CONFIGS[name])
        self.x_shape, self.k_shape = cfg.pop("x"), cfg.pop("k")
        self.kwargs = cfg
        self.dtype, self.has_bias = dtype, has_bias
        self.dn = lax.conv_dimension_numbers(self.x_shape, self.k_shape, cfg.get("dimension_numbers"))
        self.groups = cfg.get("feature_group_count", 1)
        self.c_out = self.k_shape[self.dn.rhs_spec[0]]
        rng = np.random.default_rng(seed)
        self.x = arr(rng.standard_normal(self.x_shape), dtype)
        self.kernel = arr(rng.standard_normal(self.k_shape), dtype)
        self.bias = arr(rng.standard_normal(self.c_out), dtype) if has_bias else None
        self.params = dict(
            has_bias=has_bias,
            strides=tuple(cfg["strides"]),
            padding=cfg["padding"] if isinstance(cfg["padding"], str) else tuple(map(tuple, cfg["padding"])),
            lhs_dilation=cfg.get("lhs_dilation"),
            rhs_dilation=cfg.get("rhs_dilation"),
            feature_group_count=self.groups,
            batch_group_count=1,
            dimension_numbers=cfg.get("dimension_numbers"),
        )

    @property
    def weights(self):
        return {"weight": self.kernel, **({"bias": self.bias} if self.has_bias else {})}

    def forward(self, x=None, kernel=None, bias=None):
        return braintrace.conv(
            self.x if x is None else x,
            self.kernel if kernel is None else kernel,
            self.bias if bias is None else bias,
            **self.kwargs,
        )

    # --- NumPy reference (canonical layouts: x (B, C, *S), kernel (O, I, *K), y (B, O, *S_out)) ---

    def patches(self, x):
        """``P[b, *out, ci, *k]``: the input values each output position sees."""
        xc = np.transpose(npy(x), self.dn.lhs_spec)
        nsp = xc.ndim - 2
        kc_shape = [self.k_shape[a] for a in self.dn.rhs_spec[2:]]
        lhs_dil = self.params["lhs_dilation"] or (1,) * nsp
        rhs_dil = self.params["rhs_dilation"] or (1,) * nsp
        strides = self.params["strides"]
        dil_shape = [(n - 1) * d + 1 for n, d in zip(xc.shape[2:], lhs_dil)]
        xd = np.zeros(xc.shape[:2] + tuple(dil_shape))
        xd[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in lhs_dil)] = xc
        pad = self.params["padding"]
        if isinstance(pad, str):
            eff = [(k - 1) * r + 1 for k, r in zip(kc_shape, rhs_dil)]
            pad = lax.padtype_to_pads(xc.shape[2:], eff, strides, pad)
        xp = np.pad(xd, [(0, 0), (0, 0)] + [tuple(p) for p in pad])
        out = [
            (n - ((k - 1) * r + 1)) // s + 1 for n, k, r, s in zip(xp.shape[2:], kc_shape, rhs_dil, strides)
        ]
        p = np.zeros((xc.shape[0], *out, xc.shape[1], *kc_shape))
        for k in itertools.product(*map(range, kc_shape)):
            sl = tuple(
                slice(ki * r, ki * r + (o - 1) * s + 1, s) for ki, r, o, s in zip(k, rhs_dil, out, strides)
            )
            window = xp[(slice(None), slice(None)) + sl]  # (B, C, *out)
            p[(slice(None),) + (slice(None),) * nsp + (slice(None),) + k] = np.moveaxis(window, 1, -1)
        return p

    def kernel_canonical(self, kernel=None):
        return np.transpose(npy(self.kernel if kernel is None else kernel), self.dn.rhs_spec)

    def grouped(self, p):
        """``P`` with the input channels of each output channel's group: ``(B, *out, O, I/G, *k)``."""
        nsp = len(self.x_shape) - 2
        b_out, c_in, k_sp = p.shape[: 1 + nsp], p.shape[1 + nsp], p.shape[2 + nsp :]
        p = p.reshape(b_out + (self.groups, c_in // self.groups) + k_sp)
        p = np.repeat(p, self.c_out // self.groups, axis=1 + nsp)  # (B, *out, O, I/G, *k)
        return p

    def y_canonical_to_layout(self, y_units):
        """``(B, *out, O, ...)`` -> the output layout of ``dimension_numbers``."""
        nsp = len(self.x_shape) - 2
        extra = y_units.ndim - (2 + nsp)
        canon = np.moveaxis(y_units, 1 + nsp, 1)  # (B, O, *out, ...)
        perm = tuple(int(a) for a in np.argsort(self.dn.out_spec)) + tuple(range(2 + nsp, 2 + nsp + extra))
        return np.transpose(canon, perm)

    def y_layout_to_units(self, y):
        """The output layout -> ``(B, *out, O, ...)``."""
        ob, of, *osp = self.dn.out_spec
        n = len(self.x_shape)
        return np.transpose(npy(y), (ob, *osp, of, *range(n, np.ndim(y))))

    def kernel_canonical_to_layout(self, kc, lead):
        perm = np.argsort(self.dn.rhs_spec)
        return np.transpose(
            kc,
            tuple(range(lead)) + tuple(lead + int(a) for a in perm) + tuple(range(lead + len(perm), kc.ndim)),
        )

    def reference(self, x=None, kernel=None):
        x = self.x if x is None else x
        nsp = len(self.x_shape) - 2
        gp = self.grouped(self.patches(x))
        k_axes = "".join("klmn"[:nsp])
        y = np.einsum(f"b...oi{k_axes},oi{k_axes}->b...o", gp, self.kernel_canonical(kernel))
        if self.has_bias:
            y = y + npy(self.bias)
        return self.y_canonical_to_layout(y)

    def position_terms(self, g, x=None):
        """Per-position weight terms ``(B, *out, *K.shape, *extra)`` and bias terms, in NumPy."""
        nsp = len(self.x_shape) - 2
        gp = self.grouped(self.patches(self.x if x is None else x))  # (B, *out, O, I/G, *k)
        gu = self.y_layout_to_units(g)  # (B, *out, O, *extra)
        extra = gu.ndim - (2 + nsp)
        gexp = gu.reshape(gu.shape[: 2 + nsp] + (1,) * (1 + nsp) + gu.shape[2 + nsp :])
        w = gp.reshape(gp.shape + (1,) * extra) * gexp
        return self.kernel_canonical_to_layout(w, 1 + nsp), gu

    def eqn(self):
        jaxpr = jaxpr_of(jax.make_jaxpr(lambda x: self.forward(x))(self.x))
        eqns = [e for e in jaxpr.eqns if e.primitive is etp_conv_p]
        assert len(eqns) == 1
        return eqns[0]


def sum_positions(a, nsp):
    return a.sum(axis=tuple(range(1 + nsp)))


# ---------------------------------------------------------------------------------------------
# (a) forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype,has_bias", [(F64, True), (F32, False)], indirect=["dtype"])
def test_forward_equals_reference(dtype, name, has_bias):
    case = Case(name, dtype, has_bias)
    y = case.forward()
    assert y.dtype == dtype
    assert_close(y, case.reference(), dtype)
    eqn = case.eqn()
    assert all(hash(v) is not None for v in eqn.params.values())
    assert eqn.params == case.params


def test_notebook_examples():
    y = braintrace.conv(
        jnp.ones((2, 16, 3)),
        jnp.ones((4, 3, 8)),
        strides=(1,),
        padding="SAME",
        dimension_numbers=("NWC", "WIO", "NWC"),
    )
    assert y.shape == (2, 16, 8)
    y = braintrace.conv(
        jnp.ones((2, 32, 32, 3)),
        jnp.ones((3, 3, 3, 16)),
        strides=[1, 1],
        padding="SAME",
        dimension_numbers=["NHWC", "HWIO", "NHWC"],
    )
    assert y.shape == (2, 32, 32, 16)


# ---------------------------------------------------------------------------------------------
# (b) xy_to_dw, (c) per-position rule identity, (d) init shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,dtype,has_bias", CASES, indirect=["dtype"])
def test_xy_to_dw_is_vjp(name, dtype, has_bias):
    case = Case(name, dtype, has_bias, seed=1)
    nsp = len(case.x_shape) - 2
    g = arr(np.random.default_rng(2).standard_normal(case.eqn().outvars[0].aval.shape), dtype)

    def impl(w):
        ops = [case.x, w["weight"]] + ([w["bias"]] if has_bias else [])
        return etp_conv_p.impl_fn(*ops, **case.params)

    @jax.jit  # one compiled program per test instead of eager dispatch of every op
    def run(g, weights):
        return get_rule(etp_conv_p, "xy_to_dw")(case.x, g, weights, **case.params), jax.vjp(impl, weights)[1](
            g
        )[0]

    dw, expected = run(g, case.weights)
    w_terms, b_terms = case.position_terms(g)
    closed = {"weight": sum_positions(w_terms, nsp), "bias": sum_positions(b_terms, nsp)}
    assert set(dw) == set(case.weights)
    for k in case.weights:
        assert dw[k].shape == case.weights[k].shape and dw[k].dtype == dtype
        assert_close(dw[k], expected[k], dtype)
        assert_close(dw[k], closed[k], dtype)


@pytest.mark.parametrize("name,dtype,has_bias", CASES, indirect=["dtype"])
def test_per_position_rule_identity(name, dtype, has_bias):
    """``sum_{b,p} yw_to_w(v, inst(x, g)) == xy_to_dw(x, v * g)`` per key (clarification 8)."""
    case = Case(name, dtype, has_bias, seed=3)
    nsp = len(case.x_shape) - 2
    rng = np.random.default_rng(4)
    y_shape = case.eqn().outvars[0].aval.shape
    g = arr(rng.standard_normal(y_shape), dtype)
    v = arr(rng.standard_normal(y_shape), dtype)

    @jax.jit
    def run(g, v, weights):
        inst = _position_terms(case.x, g, case.k_shape, case.params)
        lhs = get_rule(etp_conv_p, "yw_to_w")(v, {k: inst[k] for k in weights}, **case.params)
        return inst, lhs, get_rule(etp_conv_p, "xy_to_dw")(case.x, v * g, weights, **case.params)

    inst, lhs, rhs = run(g, v, case.weights)
    w_terms, b_terms = case.position_terms(g)
    assert_close(inst["weight"], w_terms, dtype)
    assert_close(inst["bias"], b_terms, dtype)
    for k in case.weights:
        assert_close(sum_positions(lhs[k], nsp), rhs[k], dtype)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("name,dtype,has_bias", CASES[:2], indirect=["dtype"])
def test_init_shapes(name, dtype, has_bias, n):
    case = Case(name, dtype, has_bias)
    eqn = case.eqn()
    layout = {"weight": 1, **({"bias": 2} if has_bias else {})}
    wv = {k: eqn.invars[i] for k, i in layout.items()}
    y_units = case.y_layout_to_units(np.zeros(eqn.outvars[0].aval.shape)).shape  # (B, *out, O)
    expected = {
        "weight": y_units[:-1] + case.k_shape + (n,),
        **({"bias": y_units + (n,)} if has_bias else {}),
    }
    ops = get_drtrl_trace_ops(etp_conv_p)
    for trace in (
        get_rule(etp_conv_p, "init_drtrl")(eqn.invars[0], eqn.outvars[0], wv, n, **eqn.params),
        ops.init(eqn.invars[0], eqn.outvars[0], wv, n, (y_units[0],), dict(eqn.params)),
    ):
        assert {k: v.shape for k, v in trace.items()} == expected
        assert all(v.dtype == dtype and not np.asarray(v).any() for v in trace.values())
    with pytest.raises(TypeError, match="dimension_numbers"):
        get_rule(etp_conv_p, "init_drtrl")(eqn.invars[0], eqn.outvars[0], wv, n)
    pp = get_rule(etp_conv_p, "init_pp")(eqn.invars[0], eqn.outvars[0], wv, n)
    assert pp.shape == (*eqn.outvars[0].aval.shape, n) and pp.dtype == dtype


# ---------------------------------------------------------------------------------------------
# (e) the per-position DRTRLTraceOps override
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("name,dtype,has_bias", CASES, indirect=["dtype"])
def test_trace_ops_match_per_position_oracle(name, dtype, has_bias, n):
    case = Case(name, dtype, has_bias, seed=5)
    nsp = len(case.x_shape) - 2
    ops = get_drtrl_trace_ops(etp_conv_p)
    eqn = case.eqn()
    layout = {"weight": 1, **({"bias": 2} if has_bias else {})}
    wv = {k: eqn.invars[i] for k, i in layout.items()}
    y_shape = eqn.outvars[0].aval.shape
    zeros = ops.init(eqn.invars[0], eqn.outvars[0], wv, n, (case.x_shape[0],), dict(eqn.params))
    rng = np.random.default_rng(6)
    trace = {k: arr(rng.standard_normal(v.shape), dtype) for k, v in zeros.items()}
    eps = {k: npy(v) for k, v in trace.items()}
    o_axis = case.dn.rhs_spec[0]
    kb = tuple(case.c_out if a == o_axis else 1 for a in range(len(case.k_shape)))
    params = dict(eqn.params)
    step = jax.jit(
        lambda trace, d, df, ct: (lambda new: (new, ops.solve(new, ct, case.weights, params, 1)))(
            ops.update(trace, d, case.x, df, case.weights, params, 1)
        )
    )
    for _ in range(2):  # two steps of the recursion
        d, df, ct = (arr(rng.standard_normal((*y_shape, *s)), dtype) for s in ((n, n), (n,), (n,)))
        trace, grads = step(trace, d, df, ct)
        # Oracle: eps[b, p, K, s] = sum_j d[b, p, c(K), s, j] eps[b, p, K, j] + P g; in NumPy.
        du, ctu = case.y_layout_to_units(d), case.y_layout_to_units(ct)  # (B, *out, O, n[, n])
        lead = du.shape[: 1 + nsp]
        dk = du.reshape(lead + kb + (n, n))
        w_terms, b_terms = case.position_terms(df)
        eps["weight"] = np.einsum("...sj,...j->...s", dk, eps["weight"]) + w_terms
        grad_w = (ctu.reshape(lead + kb + (n,)) * eps["weight"]).sum(axis=tuple(range(1 + nsp)) + (-1,))
        assert_close(trace["weight"], eps["weight"], dtype)
        assert_close(grads["weight"], grad_w, dtype)
        if has_bias:
            eps["bias"] = np.einsum("...sj,...j->...s", du, eps["bias"]) + b_terms
            assert_close(trace["bias"], eps["bias"], dtype)
            assert_close(grads["bias"], (ctu * eps["bias"]).sum(axis=tuple(range(1 + nsp)) + (-1,)), dtype)
        assert {k: v.shape for k, v in grads.items()} == {k: v.shape for k, v in case.weights.items()}


def test_batch_groups_primitive_works_but_trace_ops_refuse():
    x = arr(np.random.default_rng(7).standard_normal((4, 3, 6)), F32)
    k = arr(np.random.default_rng(8).standard_normal((4, 3, 2)), F32)
    kw = dict(strides=(1,), padding="VALID", batch_group_count=2)
    y = braintrace.conv(x, k, **kw)
    assert_close(y, lax.conv_general_dilated(x, k, (1,), "VALID", batch_group_count=2))
    eqn = jaxpr_of(jax.make_jaxpr(lambda x: braintrace.conv(x, k, **kw))(x)).eqns[0]
    with pytest.raises(NotImplementedError, match="batch_group_count"):
        get_drtrl_trace_ops(etp_conv_p).init(
            eqn.invars[0], eqn.outvars[0], {"weight": eqn.invars[1]}, 1, (2,), dict(eqn.params)
        )
    g = jax.grad(lambda k: jnp.sum(braintrace.conv(x, k, **kw) ** 2))(k)
    g_ref = jax.grad(
        lambda k: jnp.sum(lax.conv_general_dilated(x, k, (1,), "VALID", batch_group_count=2) ** 2)
    )(k)
    assert_close(g, g_ref)


# ---------------------------------------------------------------------------------------------
# (f) JAX transformations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64], indirect=True)
def test_jit_grad_jvp_jac(dtype):
    case = Case("nwc", dtype, True, seed=9)
    rng = np.random.default_rng(15)
    tx, tk, tb = (rng.standard_normal(a.shape) for a in (case.x, case.kernel, case.bias))
    f = lambda x, k, b: case.forward(x, k, b)

    @jax.jit  # one compiled program instead of eager dispatch
    def run(x, k, b):
        loss = lambda x, k, b: jnp.sum(jnp.sin(f(x, k, b)))
        return dict(
            y=f(x, k, b),
            grad=jax.grad(loss, argnums=(0, 1, 2))(x, k, b),
            jvp=jax.jvp(f, (x, k, b), tuple(arr(t, dtype) for t in (tx, tk, tb)))[1],
            jacfwd=jax.jacfwd(f, argnums=1)(x, k, b),
            jacrev=jax.jacrev(f, argnums=1)(x, k, b),
        )

    out = run(case.x, case.kernel, case.bias)
    y = case.reference()
    cot = np.cos(y)
    w_terms, b_terms = case.position_terms(cot)
    assert_close(out["y"], y, dtype)
    assert_close(out["grad"][1], sum_positions(w_terms, 1), dtype)
    assert_close(out["grad"][2], sum_positions(b_terms, 1), dtype)
    # The reference is linear in x and in the kernel: its JVP is ref(tx, k) + ref(x, tk) + tb.
    bias = npy(case.bias)
    jvp = (case.reference(x=tx) - bias) + (case.reference(kernel=tk) - bias) + tb
    assert_close(out["jvp"], jvp, dtype)
    # <grad_x, tx> is the directional derivative of the loss along tx.
    assert abs(np.sum(npy(out["grad"][0]) * tx) - np.sum(cot * (case.reference(x=tx) - bias))) < 1e-10
    # Jacobians w.r.t. the kernel: contracting the output axes with cos(y) gives the kernel gradient.
    for jac in (out["jacfwd"], out["jacrev"]):
        assert jac.shape == y.shape + case.k_shape
        assert_close(np.tensordot(cot, npy(jac), axes=y.ndim), sum_positions(w_terms, 1), dtype)


def test_per_sample_gradients_and_vmap_marker():
    case = Case("nhwc", F32, False, seed=10)
    xs = arr(np.random.default_rng(11).standard_normal((3, *case.x_shape)), F32)
    per_sample = jax.jit(
        jax.vmap(lambda xi: jax.grad(lambda k: jnp.sum(case.forward(xi, k) ** 2))(case.kernel))
    )
    got = per_sample(xs)
    assert got.shape == (3, *case.k_shape)
    for s in range(3):
        w_terms, _ = case.position_terms(2 * case.reference(xs[s]), x=xs[s])
        assert_close(got[s], sum_positions(w_terms, 2))
    f = lambda x: case.forward(x)
    assert "etp_conv" in str(jax.make_jaxpr(jax.vmap(f))(xs))
    ys = jax.vmap(f)(xs)
    for s in range(3):
        assert_close(ys[s], case.reference(xs[s]))


def test_vmap_keeps_marker_for_non_leading_batch_layout():
    case = Case("hwcn", F32, True, seed=12)
    xs = arr(np.random.default_rng(13).standard_normal((2, *case.x_shape)), F32)
    f = lambda x: case.forward(x)
    assert "etp_conv" in str(jax.make_jaxpr(jax.vmap(f, out_axes=2))(xs))
    ys = jax.vmap(f, out_axes=2)(xs)  # folded at the conv's own batch axis (axis 1 of CNHW)
    assert_close(ys, np.stack([case.reference(xs[0]), case.reference(xs[1])], axis=2))


# ---------------------------------------------------------------------------------------------
# (g) units, (h) errors
# ---------------------------------------------------------------------------------------------


def test_quantities():
    case = Case("nwc", F32, True, seed=14)
    y = braintrace.conv(case.x * u.mV, case.kernel * u.siemens, case.bias * u.uA, **case.kwargs)
    assert u.get_unit(y).has_same_dim(u.mV * u.siemens)
    assert_close(y.to_decimal(u.mA), case.reference() - npy(case.bias) + npy(case.bias) / 1000.0)
    y = braintrace.conv(case.x * u.mV, case.kernel, **case.kwargs)
    assert u.get_unit(y) == u.mV


def test_errors():
    case = Case("nhwc", F32, False)
    x, k, kw = case.x, case.kernel, case.kwargs
    with pytest.raises(ValueError, match="batch axis"):
        braintrace.conv(x[0], k, **kw)
    with pytest.raises(ValueError, match="input channels"):
        braintrace.conv(x[..., :2], k, **kw)
    with pytest.raises(ValueError, match="`bias`"):
        braintrace.conv(x, k, jnp.ones(case.c_out + 1), **kw)
    with pytest.raises(ValueError, match="`bias`"):
        braintrace.conv(x * u.mV, k * u.siemens, jnp.ones(case.c_out) * u.second, **kw)
    with pytest.raises(ValueError, match="`strides`"):
        braintrace.conv(x, k, **{**kw, "strides": (1,)})
    with pytest.raises(ValueError, match="`padding`"):
        braintrace.conv(x, k, **{**kw, "padding": ((1, 1),)})
    with pytest.raises(ValueError, match="`kernel`"):
        braintrace.conv(x, k[0, 0], **kw)
    with pytest.raises(ValueError, match="dimension_numbers"):
        braintrace.conv(x, k, **{**kw, "dimension_numbers": ("NHWC", "HWIO")})
    with pytest.raises(ValueError, match="feature_group_count"):
        braintrace.conv(x, k, **{**kw, "feature_group_count": 0})
