"""The 0.2 op-object layer (``ETraceParam`` + ``MatMulOp`` / ``ConvOp`` / ``SpMatMulOp`` / ``LoraOp`` /
``ElemWiseOp``, ``NonTempParam``, ``Fake*``), in float64.

* Signatures: every class constructs with the published parameter names, order and defaults.
* Forward values: each op's ``xw_to_y`` (through the ETP wrapper) and ``raw_xw_to_y`` (plain JAX)
  equal a plain ``jnp`` computation; ``xy_to_dw`` equals the hand-written weight cotangent.
* Online gradients: leaky units ``h <- 0.9 h + param.execute(x)`` fed by a masked ``|W|`` dense op,
  a sparse op, a LoRA op and a conv op, and a learned element-wise decay, under ``braintrace.D_RTRL``
  over ``T = 4`` steps, equal BPTT of an unrolled plain-``jnp`` loop written here (``D`` is the
  whole recurrence in these models, so D-RTRL is exact).
* ``NonTempParam`` is a plain parameter (``PLAIN_PARAMETER`` record) and receives the sum of its
  within-step gradients; ``Fake*`` weights are not states and receive none.
"""

from __future__ import annotations

import inspect
import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest
from saiunit import sparse as ss

import braintrace

B, I, H, T = 2, 3, 4, 4
TOL = 1e-10
IDENTITY = object()  # stands for the published ``lambda w: w`` defaults


@pytest.fixture(scope="module", autouse=True)
def f64():
    with om.float64(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def rng(seed=0):
    return np.random.default_rng(seed)


def arr(r, *shape, scale=1.0):
    return jnp.asarray(scale * r.standard_normal(shape))


def loss(out, target):
    return 0.5 * jnp.sum((out - target) ** 2)


# --------------------------------------------------------------------------------------------------
# signatures
# --------------------------------------------------------------------------------------------------

# published __init__ parameters (after self): (name, default) with inspect.Parameter.empty for none
E = inspect.Parameter.empty
PUBLISHED = {
    "ETraceParam": [("weight", E), ("op", E), ("grad", None), ("name", None)],
    "ElemWiseParam": [("weight", E), ("op", IDENTITY), ("name", None)],
    "NonTempParam": [("value", E), ("op", E), ("name", None)],
    "FakeETraceParam": [("value", E), ("op", E)],
    "FakeElemWiseParam": [("weight", E), ("op", IDENTITY), ("name", None)],
    "ETraceOp": [("is_diagonal", False), ("name", None)],
    "MatMulOp": [("weight_mask", None), ("weight_fn", IDENTITY), ("apply_weight_fn_before_mask", False)],
    "ElemWiseOp": [("fn", IDENTITY)],
    "ConvOp": [
        ("xinfo", E),
        ("window_strides", E),
        ("padding", E),
        ("lhs_dilation", None),
        ("rhs_dilation", None),
        ("feature_group_count", 1),
        ("batch_group_count", 1),
        ("dimension_numbers", None),
        ("weight_mask", None),
        ("weight_fn", IDENTITY),
    ],
    "SpMatMulOp": [("sparse_mat", E), ("weight_fn", IDENTITY)],
    "LoraOp": [("alpha", None)],
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_signature(name):
    params = list(inspect.signature(getattr(braintrace, name).__init__).parameters.values())[1:]
    got = [(p.name, p.default) for p in params]
    assert [n for n, _ in got] == [n for n, _ in PUBLISHED[name]], got
    for (n, default), (_, want) in zip(got, PUBLISHED[name]):
        if want is IDENTITY:
            assert callable(default) and default(3.5) == 3.5, n
        else:
            assert default == want, (name, n, default, want)
    assert name in braintrace.__all__


def test_states_and_plain_objects():
    w = {"weight": jnp.ones((I, H))}
    assert isinstance(braintrace.ETraceParam(w, braintrace.MatMulOp()), brainstate.ParamState)
    assert isinstance(braintrace.ElemWiseParam(jnp.ones(H)), brainstate.ParamState)
    assert isinstance(braintrace.NonTempParam(w, braintrace.MatMulOp()), brainstate.ParamState)
    assert not isinstance(braintrace.FakeETraceParam(w, braintrace.MatMulOp()), brainstate.State)
    assert not isinstance(braintrace.FakeElemWiseParam(jnp.ones(H)), brainstate.State)
    p = braintrace.ETraceParam(w, braintrace.MatMulOp(), grad="full", name="w")
    assert p.gradient == "full" and p.name == "w"
    assert braintrace.ETraceParam(w, braintrace.MatMulOp()).gradient == "adaptive"
    assert isinstance(braintrace.ElemWiseParam(jnp.ones(H), jnp.exp).op, braintrace.ElemWiseOp)


def test_argument_errors():
    w = {"weight": jnp.ones((I, H))}
    with pytest.raises(TypeError, match="must be an ETraceOp"):
        braintrace.ETraceParam(w, lambda x, w: x)
    with pytest.raises(ValueError, match="`grad`"):
        braintrace.ETraceParam(w, braintrace.MatMulOp(), grad="exact")
    with pytest.raises(TypeError, match="ElemWiseOp or a callable"):
        braintrace.ElemWiseParam(jnp.ones(H), braintrace.MatMulOp())
    with pytest.raises(TypeError, match="weight_fn"):
        braintrace.MatMulOp(weight_fn=3)
    with pytest.raises(TypeError, match="apply_weight_fn_before_mask"):
        braintrace.MatMulOp(apply_weight_fn_before_mask=1)
    with pytest.raises(TypeError, match="sparse_mat"):
        braintrace.SpMatMulOp(np.ones((I, H)))
    with pytest.raises(TypeError, match="alpha"):
        braintrace.LoraOp(alpha=jnp.ones(2))
    op = braintrace.MatMulOp(weight_mask=jnp.ones((H, I)))
    with pytest.raises(ValueError, match="does not broadcast"):
        op(jnp.ones((B, I)), w)
    with pytest.raises(ValueError, match="unknown \\['b'\\]"):
        braintrace.MatMulOp()(jnp.ones((B, I)), {"weight": w["weight"], "b": jnp.ones(H)})
    with pytest.raises(TypeError, match="must be a dict"):
        braintrace.MatMulOp()(jnp.ones((B, I)), w["weight"])
    with pytest.raises(ValueError, match="missing \\['A'\\]"):
        braintrace.LoraOp()(jnp.ones((B, I)), {"B": jnp.ones((I, 2))})
    with pytest.raises(NotImplementedError, match="xw_to_y"):
        braintrace.ETraceOp()(jnp.ones(I), w)


# --------------------------------------------------------------------------------------------------
# forward values
# --------------------------------------------------------------------------------------------------


def _sparse(r, density=0.5):
    mask = r.random((I, H)) < density
    mask[0, 0] = True
    dense = np.where(mask, r.standard_normal((I, H)), 0.0)
    return ss.CSR.fromdense(jnp.asarray(dense)), mask


def _dense_of(mask, data):
    rows, cols = np.nonzero(mask)  # row-major: CSR data order
    return jnp.zeros(mask.shape, data.dtype).at[rows, cols].set(data)


CONV_DN = ("NWC", "WIO", "NWC")


def _conv_plain(x, k, b):
    return jax.lax.conv_general_dilated(x, k, (1,), "VALID", dimension_numbers=CONV_DN) + b


def _cases():
    """``name -> (op, weights, x, plain forward)``."""
    r = rng(1)
    x = arr(r, B, I)
    mask = jnp.asarray(r.random((I, H)) < 0.6, dtype=jnp.float64)
    w = {"weight": arr(r, I, H), "bias": arr(r, H)}
    csr, smask = _sparse(r)
    sw = {"weight": arr(r, csr.nse), "bias": arr(r, H)}
    lw = {"B": arr(r, I, 2), "A": arr(r, 2, H), "bias": arr(r, H)}
    xc = arr(r, B, 6, I)
    kmask = jnp.asarray(r.random((3, I, H)) < 0.7, dtype=jnp.float64)
    cw = {"weight": arr(r, 3, I, H), "bias": arr(r, H)}
    conv_op = braintrace.ConvOp(
        jax.ShapeDtypeStruct(xc.shape, xc.dtype), (1,), "VALID", dimension_numbers=CONV_DN, weight_mask=kmask
    )
    xf = arr(r, B, I, 6)
    fw = {"weight": arr(r, H, I, 3), "bias": arr(r, H)}
    return {
        "matmul": (braintrace.MatMulOp(), w, x, x @ w["weight"] + w["bias"]),
        "matmul_mask_fn": (
            braintrace.MatMulOp(weight_mask=mask, weight_fn=jnp.tanh),
            w,
            x,
            x @ jnp.tanh(w["weight"] * mask) + w["bias"],
        ),
        "matmul_fn_before_mask": (
            braintrace.MatMulOp(weight_mask=mask, weight_fn=jnp.exp, apply_weight_fn_before_mask=True),
            {"weight": w["weight"]},
            x,
            x @ (jnp.exp(w["weight"]) * mask),
        ),
        "sparse": (
            braintrace.SpMatMulOp(csr, weight_fn=jnp.abs),
            sw,
            x,
            x @ _dense_of(smask, jnp.abs(sw["weight"])) + sw["bias"],
        ),
        "lora": (braintrace.LoraOp(alpha=0.5), lw, x, 0.5 * x @ lw["B"] @ lw["A"] + lw["bias"]),
        "lora_default_alpha": (braintrace.LoraOp(), lw, x, x @ lw["B"] @ lw["A"] + lw["bias"]),
        "conv": (conv_op, cw, xc, _conv_plain(xc, cw["weight"] * kmask, cw["bias"])),
        "conv_channel_first": (  # default layout (NCW, OIW): the bias goes along axis 1
            braintrace.ConvOp(None, (1,), [(1, 1)]),
            fw,
            xf,
            jax.lax.conv_general_dilated(xf, fw["weight"], (1,), [(1, 1)]) + fw["bias"][:, None],
        ),
    }


CASES = [
    "matmul",
    "matmul_mask_fn",
    "matmul_fn_before_mask",
    "sparse",
    "lora",
    "lora_default_alpha",
    "conv",
    "conv_channel_first",
]


@pytest.fixture(scope="module")
def cases(f64):
    return _cases()


@pytest.mark.parametrize("case", CASES)
def test_forward_values(cases, case):
    op, w, x, want = cases[case]
    np.testing.assert_allclose(op.xw_to_y(x, w), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(op(x, w), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(op.raw_xw_to_y(x, w), want, rtol=1e-12, atol=1e-12)
    # the ETP form binds a primitive, the plain form does not
    etp = {e.primitive.name for e in jax.make_jaxpr(op.xw_to_y)(x, w).eqns}
    raw = {e.primitive.name for e in jax.make_jaxpr(op.raw_xw_to_y)(x, w).eqns}
    assert any(n.startswith("etp_") for n in etp), etp
    assert not any(n.startswith("etp_") for n in raw), raw


@pytest.mark.parametrize("case", ["matmul", "matmul_mask_fn", "lora", "conv"])
def test_xy_to_dw(cases, case):
    op, w, x, want = cases[case]
    g = arr(rng(2), *want.shape)
    got = op.xy_to_dw(x, g, w)
    ref = jax.grad(lambda w_: jnp.sum(op.raw_xw_to_y(x, w_) * g))(w)
    for k in w:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-12, atol=1e-12)
    if case == "matmul":  # by hand: x^T g and the batch sum of g
        np.testing.assert_allclose(got["weight"], x.T @ g, rtol=1e-12)
        np.testing.assert_allclose(got["bias"], g.sum(0), rtol=1e-12)
    with pytest.raises(ValueError, match="hidden_dim_arr"):
        op.xy_to_dw(x, g[..., :-1], w)


def test_elemwise_values():
    w = arr(rng(3), H)
    op = braintrace.ElemWiseOp(jax.nn.sigmoid)
    np.testing.assert_allclose(op(w), jax.nn.sigmoid(w), rtol=1e-14)
    np.testing.assert_allclose(op.raw_xw_to_y(None, w), jax.nn.sigmoid(w), rtol=1e-14)
    np.testing.assert_allclose(braintrace.ElemWiseParam(w, op).execute(), jax.nn.sigmoid(w), rtol=1e-14)
    np.testing.assert_allclose(braintrace.ElemWiseParam(w, jnp.exp).execute(), jnp.exp(w), rtol=1e-14)
    np.testing.assert_allclose(braintrace.FakeElemWiseParam(w, op).execute(), jax.nn.sigmoid(w), rtol=1e-14)
    np.testing.assert_allclose(braintrace.FakeElemWiseParam(w).execute(), w)
    assert "etp_elemwise" in str(jax.make_jaxpr(op)(w))
    assert "etp_" not in str(jax.make_jaxpr(braintrace.FakeElemWiseParam(w, op).op)(w))


def test_plain_params_use_plain_ops(cases):
    op, w, x, want = cases["matmul_mask_fn"]
    for p in (braintrace.NonTempParam(w, op), braintrace.FakeETraceParam(w, op)):
        np.testing.assert_allclose(p.execute(x), want, rtol=1e-12)
        assert p.etrace_op is op
        assert "etp_" not in str(jax.make_jaxpr(p.execute)(x))
    fn = lambda x_, w_: x_ @ w_["weight"]
    np.testing.assert_allclose(braintrace.NonTempParam(w, fn).execute(x), x @ w["weight"], rtol=1e-12)
    np.testing.assert_allclose(braintrace.FakeETraceParam(w, fn).execute(x), x @ w["weight"], rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# online gradients: D_RTRL against BPTT of a plain loop
# --------------------------------------------------------------------------------------------------


class Leaky(brainstate.nn.Module):
    """``h <- decay * h + param.execute(x)``; ``decay`` is 0.9 or an :class:`ElemWiseParam`."""

    def __init__(self, param, h_shape, decay=None, extra=None):
        super().__init__()
        self.param = param
        self.decay = decay
        self.extra = extra
        self.h_shape = h_shape

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, *self.h_shape)))

    def update(self, x):
        decay = 0.9 if self.decay is None else self.decay.execute()
        drive = self.param.execute(x)
        if self.extra is not None:
            drive = drive + self.extra.execute(x)
        self.h.value = decay * self.h.value + drive
        return self.h.value


def online(model, xs, ys):
    brainstate.nn.init_all_states(model, batch_size=B)
    alg = braintrace.D_RTRL(model)
    alg.compile_graph(xs[0])
    grads = alg.etrace_grad(xs, ys, step_fn=loss)
    return {k[-1]: v for k, v in grads.items()}, alg.graph


def bptt(drive, decay, params, xs, ys, h_shape):
    """``jax.grad`` of ``Σ_t L_t`` over an unrolled loop ``h <- decay(p) * h + drive(p, x_t)``."""

    def total(p):
        h, out = jnp.zeros((B, *h_shape)), 0.0
        for t in range(T):
            h = decay(p) * h + drive(p, xs[t])
            out = out + loss(h, ys[t])
        return out

    return jax.grad(total)(params)


def _close(got, want, what):
    for k in want:
        err = om.rel_err(got[k], want[k])
        assert np.linalg.norm(np.asarray(want[k]).ravel()) > 0, (what, k)
        assert err < TOL, f"{what}[{k!r}]: relative error {err:.2e}"


@pytest.mark.parametrize("before_mask", [False, True])
def test_dense_masked_abs_matches_bptt(before_mask):
    r = rng(10)
    mask = jnp.asarray(r.random((I, H)) < 0.6, dtype=jnp.float64)
    w = {"weight": arr(r, I, H), "bias": arr(r, H, scale=0.3)}
    xs, ys = arr(r, T, B, I), arr(r, T, B, H)
    op = braintrace.MatMulOp(weight_mask=mask, weight_fn=jnp.abs, apply_weight_fn_before_mask=before_mask)
    grads, graph = online(Leaky(braintrace.ETraceParam(dict(w), op), (H,)), xs, ys)
    assert len(graph.hidden_param_op_relations) == 1
    want = bptt(lambda p, x: x @ (jnp.abs(p["weight"]) * mask) + p["bias"], lambda p: 0.9, w, xs, ys, (H,))
    _close(grads["param"], want, "dense")


def test_sparse_matches_bptt():
    r = rng(11)
    csr, smask = _sparse(r, density=0.6)
    w = {"weight": arr(r, csr.nse), "bias": arr(r, H, scale=0.3)}
    xs, ys = arr(r, T, B, I), arr(r, T, B, H)
    op = braintrace.SpMatMulOp(csr, weight_fn=jnp.tanh)
    grads, _ = online(Leaky(braintrace.ETraceParam(dict(w), op), (H,)), xs, ys)
    want = bptt(
        lambda p, x: x @ _dense_of(smask, jnp.tanh(p["weight"])) + p["bias"], lambda p: 0.9, w, xs, ys, (H,)
    )
    _close(grads["param"], want, "sparse")


def test_lora_matches_bptt():
    r = rng(12)
    w = {"B": arr(r, I, 2), "A": arr(r, 2, H), "bias": arr(r, H, scale=0.3)}
    xs, ys = arr(r, T, B, I), arr(r, T, B, H)
    grads, _ = online(Leaky(braintrace.ETraceParam(dict(w), braintrace.LoraOp(alpha=0.5)), (H,)), xs, ys)
    want = bptt(lambda p, x: 0.5 * x @ p["B"] @ p["A"] + p["bias"], lambda p: 0.9, w, xs, ys, (H,))
    _close(grads["param"], want, "lora")


def test_conv_matches_bptt():
    r = rng(13)
    W = 6
    kmask = jnp.asarray(r.random((3, I, H)) < 0.7, dtype=jnp.float64)
    w = {"weight": arr(r, 3, I, H, scale=0.5), "bias": arr(r, H, scale=0.3)}
    xs, ys = arr(r, T, B, W, I), arr(r, T, B, W - 2, H)
    op = braintrace.ConvOp(
        jax.ShapeDtypeStruct((B, W, I), jnp.float64),
        (1,),
        "VALID",
        dimension_numbers=CONV_DN,
        weight_mask=kmask,
        weight_fn=jnp.tanh,
    )
    grads, _ = online(Leaky(braintrace.ETraceParam(dict(w), op), (W - 2, H)), xs, ys)
    want = bptt(
        lambda p, x: _conv_plain(x, jnp.tanh(p["weight"] * kmask), p["bias"]),
        lambda p: 0.9,
        w,
        xs,
        ys,
        (W - 2, H),
    )
    _close(grads["param"], want, "conv")


def test_elemwise_decay_matches_bptt():
    r = rng(14)
    params = {"w": {"weight": arr(r, I, H)}, "decay": arr(r, H)}
    xs, ys = arr(r, T, B, I), arr(r, T, B, H)
    model = Leaky(
        braintrace.ETraceParam(dict(params["w"]), braintrace.MatMulOp()),
        (H,),
        decay=braintrace.ElemWiseParam(params["decay"], jax.nn.sigmoid),
    )
    grads, graph = online(model, xs, ys)
    assert len(graph.hidden_param_op_relations) == 2
    want = bptt(lambda p, x: x @ p["w"]["weight"], lambda p: jax.nn.sigmoid(p["decay"]), params, xs, ys, (H,))
    _close(grads["param"], want["w"], "dense beside a learned decay")
    _close({"decay": grads["decay"]}, {"decay": want["decay"]}, "element-wise decay")


def test_nontemp_param_gets_its_within_step_gradient():
    r = rng(15)
    w = {"weight": arr(r, I, H)}
    v = {"weight": arr(r, I, H), "bias": arr(r, H)}
    xs, ys = arr(r, T, B, I), arr(r, T, B, H)
    model = Leaky(
        braintrace.ETraceParam(dict(w), braintrace.MatMulOp()),
        (H,),
        extra=braintrace.NonTempParam(dict(v), braintrace.MatMulOp(weight_fn=jnp.tanh)),
    )
    grads, graph = online(model, xs, ys)
    plain = [r_ for r_ in graph.records if r_.kind is braintrace.DiagnosticKind.PLAIN_PARAMETER]
    assert [r_.subject for r_ in plain] == [("extra",)]
    assert len(graph.hidden_param_op_relations) == 1

    def drive_v(p, x):
        return x @ jnp.tanh(p["weight"]) + p["bias"]

    # the traced weight: exact (its path through h is the leak D = 0.9)
    want_w = bptt(lambda p, x: x @ p["weight"] + drive_v(v, x), lambda p: 0.9, w, xs, ys, (H,))
    _close(grads["param"], want_w, "ETraceParam beside a NonTempParam")
    # the plain parameter: Σ_t ∂L_t/∂v with h_{t-1} held at its value from the forward pass
    h, want_v = jnp.zeros((B, H)), jax.tree.map(jnp.zeros_like, v)
    for t in range(T):
        step = lambda p, h_prev=h, t=t: 0.9 * h_prev + xs[t] @ w["weight"] + drive_v(p, xs[t])
        want_v = jax.tree.map(jnp.add, want_v, jax.grad(lambda p: loss(step(p), ys[t]))(v))
        h = step(v)
    _close(grads["extra"], want_v, "NonTempParam")
    full = bptt(lambda p, x: x @ w["weight"] + drive_v(p, x), lambda p: 0.9, v, xs, ys, (H,))
    assert om.rel_err(grads["extra"]["weight"], full["weight"]) > 1e-3  # within-step, not BPTT


def test_fake_params_get_no_gradient():
    r = rng(16)
    w = {"weight": arr(r, I, H)}
    fw = {"weight": arr(r, I, H), "bias": arr(r, H)}
    fdecay = arr(r, H)
    xs, ys = arr(r, T, B, I), arr(r, T, B, H)
    fake = braintrace.FakeETraceParam(fw, braintrace.MatMulOp(weight_fn=jnp.abs))
    model = Leaky(
        braintrace.ETraceParam(dict(w), braintrace.MatMulOp()),
        (H,),
        decay=braintrace.FakeElemWiseParam(fdecay, braintrace.ElemWiseOp(jax.nn.sigmoid)),
        extra=fake,
    )
    assert list(model.states(brainstate.ParamState).keys()) == [("param",)]
    grads, graph = online(model, xs, ys)
    assert set(grads) == {"param"}
    assert len(graph.hidden_param_op_relations) == 1
    want = bptt(
        lambda p, x: x @ p["weight"] + x @ jnp.abs(fw["weight"]) + fw["bias"],
        lambda p: jax.nn.sigmoid(fdecay),
        w,
        xs,
        ys,
        (H,),
    )
    _close(grads["param"], want, "ETraceParam beside fixed weights")
