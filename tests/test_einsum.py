"""``braintrace.einsum``: forward, rules against ``jax.vjp`` and closed forms, the marker under
``vmap``, and D-RTRL / pp_prop of recurrent models written with it against BPTT and against the same
models written with ``braintrace.matmul`` (float64)."""

from __future__ import annotations

import importlib

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from _numerics import assert_close
from online_models import float64

import braintrace
from braintrace._etrace_op._registries import ETP_PRIMITIVES_BY_NAME

T = 5
einsum_mod = importlib.import_module("braintrace._etrace_op.einsum")


@pytest.fixture(autouse=True, scope="module")
def _unregister_einsum():
    """The einsum primitives register on first use: leave the registries as this module found them."""
    from braintrace._etrace_op import unregister_primitive

    before = {n: ETP_PRIMITIVES_BY_NAME.get(n) for n in ("etp_einsum", "etp_einsum_v")}
    yield
    for name, p in before.items():
        if p is None and name in ETP_PRIMITIVES_BY_NAME:
            unregister_primitive(ETP_PRIMITIVES_BY_NAME[name])


@pytest.fixture
def f64():
    with float64():
        yield


def _rand(rng, shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale)


# -------------------------------------------------------------------------------------------------
# forward, validation, units, vmap
# -------------------------------------------------------------------------------------------------

FORMS = [
    ("bi,io->bo", (4, 3), (3, 2), "etp_einsum"),
    ("...i,io->...o", (2, 4, 3), (3, 2), "etp_einsum"),
    ("...i,io->...o", (3,), (3, 2), "etp_einsum_v"),
    ("bhi, hio -> bho", (4, 2, 3), (2, 3, 5), "etp_einsum"),  # spaces are ignored
    ("bti,io->bto", (4, 6, 3), (3, 2), "etp_einsum"),
    ("hi,hio->ho", (2, 3), (2, 3, 5), "etp_einsum_v"),
]


@pytest.mark.parametrize("eq,xs,ws,prim", FORMS)
def test_forward_equals_jnp_einsum(f64, rng, primitive_names, eq, xs, ws, prim):
    x, w = _rand(rng, xs), _rand(rng, ws)
    y = braintrace.einsum(eq, x, w)
    np.testing.assert_allclose(y, jnp.einsum(eq.replace(" ", ""), x, w), rtol=1e-12)
    assert prim in primitive_names(jax.make_jaxpr(lambda a, b: braintrace.einsum(eq, a, b))(x, w))


def test_weight_fn_is_applied_before_the_primitive(f64, rng):
    """The gradient of ``weight`` is the chain rule through ``weight_fn``."""
    x, w = _rand(rng, (4, 2, 3)), _rand(rng, (2, 3, 5))
    g = jax.grad(lambda v: braintrace.einsum("bhi,hio->bho", x, v, weight_fn=jnp.tanh).sum())(w)
    g_ref = jax.grad(lambda v: jnp.einsum("bhi,hio->bho", x, jnp.tanh(v)).sum())(w)
    np.testing.assert_allclose(g, g_ref, rtol=1e-12)


@pytest.mark.parametrize(
    "eq,match",
    [
        ("bi,io", "explicit"),
        ("bi,io,oz->bz", "two"),
        ("bi,...io->bo", "ellipsis"),
        ("i...,io->...o", "ellipsis"),
        ("b1,1o->bo", "letters"),
        ("bii,io->bo", "repeats"),
        ("bi,io->bz", "appear in no operand"),
        ("bi,iok->bo", "neither in x nor in the output"),
    ],
)
def test_unsupported_equations_name_equation(eq, match):
    with pytest.raises(ValueError, match="`equation`") as err:
        braintrace.einsum(eq, jnp.ones((2, 3)), jnp.ones((3, 4)))
    assert match in str(err.value)
    with pytest.raises(TypeError, match="`equation` must be a str"):
        braintrace.einsum(3, jnp.ones((2, 3)), jnp.ones((3, 4)))


def test_operand_errors():
    with pytest.raises(ValueError, match="`x` has shape"):
        braintrace.einsum("bi,io->bo", jnp.ones((3,)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="`weight` has shape"):
        braintrace.einsum("bi,io->bo", jnp.ones((2, 3)), jnp.ones((3,)))
    with pytest.raises(ValueError, match="axis 'i'.*size 3 in `x`.*but 5 in `weight`"):
        braintrace.einsum("bi,io->bo", jnp.ones((2, 3)), jnp.ones((5, 4)))
    with pytest.raises(ValueError, match="fewer than"):
        braintrace.einsum("...ij,jo->...io", jnp.ones((3,)), jnp.ones((3, 4)))


def test_units(f64, rng):
    x, w = _rand(rng, (4, 3)), _rand(rng, (3, 2))
    y = braintrace.einsum("bi,io->bo", x * u.mV, w * u.siemens)
    np.testing.assert_allclose(y.to_decimal(u.uA), 1e3 * (x @ w), rtol=1e-12)


def test_vmap_keeps_the_marker(f64, rng, primitive_names):
    w = _rand(rng, (3, 2))
    xs = _rand(rng, (5, 4, 3))
    f = lambda x: braintrace.einsum("bi,io->bo", x, w)
    names = primitive_names(jax.make_jaxpr(jax.vmap(f))(xs))
    assert "etp_einsum" in names and "dot_general" not in names
    np.testing.assert_allclose(jax.vmap(f)(xs), jnp.einsum("vbi,io->vbo", xs, w), rtol=1e-12)
    g = lambda x: braintrace.einsum("i,io->o", x, w)  # etp_einsum_v gains a batch letter
    names = primitive_names(jax.make_jaxpr(jax.vmap(g))(xs[0]))
    assert "etp_einsum" in names and "etp_einsum_v" not in names
    np.testing.assert_allclose(jax.vmap(g)(xs[0]), xs[0] @ w, rtol=1e-12)
    # a mapped weight: the implementation is vmapped (the marker is lost, the values are right)
    ws = _rand(rng, (5, 3, 2))
    np.testing.assert_allclose(
        jax.vmap(lambda v: braintrace.einsum("i,io->o", xs[0, 0], v))(ws),
        jnp.einsum("i,vio->vo", xs[0, 0], ws),
    )


# -------------------------------------------------------------------------------------------------
# rules
# -------------------------------------------------------------------------------------------------

RULE_FORMS = [
    ("bi,io->bo", (4, 3), (3, 2)),
    ("bhi,hio->bho", (4, 2, 3), (2, 3, 5)),
    ("hi,hio->ho", (2, 3), (2, 3, 5)),
    ("bik,io->bo", (4, 3, 2), (3, 5)),
    ("bti,io->bto", (4, 6, 3), (3, 2)),
]


@pytest.mark.parametrize("eq,xs,ws", RULE_FORMS)
def test_xy_to_dw_is_the_vjp(f64, rng, eq, xs, ws):
    x, w = _rand(rng, xs), _rand(rng, ws)
    y = jnp.einsum(eq, x, w)
    g = _rand(rng, y.shape)
    _, vjp = jax.vjp(lambda v: jnp.einsum(eq, x, v), w)
    got = einsum_mod._einsum_xy_to_dw(x, g, {"weight": w}, equation=eq)["weight"]
    assert_close(got, vjp(g)[0], np.float64)


@pytest.mark.parametrize("eq,xs,ws", RULE_FORMS[:4])
def test_rule_identity(f64, rng, eq, xs, ws):
    """``yw_to_w(v, xy_to_dw(x, g)) == xy_to_dw(x, v * g)`` (per batch element when batched)."""
    x, w = _rand(rng, xs), _rand(rng, ws)
    e, _ = einsum_mod.parse_einsum_equation(eq)
    g = _rand(rng, jnp.einsum(eq, x, w).shape)
    v = _rand(rng, g.shape)
    dw = lambda a, b: einsum_mod._einsum_xy_to_dw(a, b, {"weight": w}, equation=eq)["weight"]
    if e.has_batch_form:
        inst = jax.vmap(lambda a, b: dw(a[None], b[None]))(x, g)
        want = jax.vmap(lambda a, b: dw(a[None], b[None]))(x, v * g)
    else:
        inst, want = dw(x, g), dw(x, v * g)
    got = einsum_mod._einsum_yw_to_w(v, {"weight": inst}, equation=eq)["weight"]
    assert_close(got, want, np.float64)


def test_trace_update_and_solve_per_position(f64, rng):
    """A shared axis keeps one trace slice per position: update and solve against explicit loops."""
    eq = "bti,io->bto"
    B, Tn, I, O, n = 2, 3, 4, 2, 2
    x, w = _rand(rng, (B, Tn, I)), _rand(rng, (I, O))
    tr = _rand(rng, (B, Tn, I, O, n))
    d, df, ct = _rand(rng, (B, Tn, O, n, n)), _rand(rng, (B, Tn, O, n)), _rand(rng, (B, Tn, O, n))
    params = {"equation": eq}
    new = einsum_mod._trace_update({"weight": tr}, d, x, df, {"weight": w}, params, 1)["weight"]
    want = np.zeros_like(np.asarray(tr))
    for b in range(B):
        for t in range(Tn):
            for i in range(I):
                for o in range(O):
                    want[b, t, i, o] = (
                        np.asarray(d[b, t, o]) @ np.asarray(tr[b, t, i, o]) + x[b, t, i] * df[b, t, o]
                    )
    assert_close(new, want, np.float64)
    dw = einsum_mod._trace_solve({"weight": new}, ct, {"weight": w}, params, 1)["weight"]
    assert_close(dw, np.einsum("btos,btios->io", ct, want), np.float64)


# -------------------------------------------------------------------------------------------------
# online learning: D-RTRL equals BPTT where D is the whole recurrence, and equals matmul
# -------------------------------------------------------------------------------------------------


def _leaky_model(op, w, decay, h_shape):
    """``h <- decay * tanh(h) + op(x, W)``: the intrinsic dynamics are per unit, so D-RTRL is exact."""

    class Leaky(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = brainstate.ParamState(w)

        def init_state(self, batch_size=None, **kw):
            self.h = brainstate.HiddenState(jnp.zeros(h_shape))

        def update(self, x):
            self.h.value = decay * jnp.tanh(self.h.value) + op(x, self.w.value)
            return self.h.value

    model = Leaky()
    brainstate.nn.init_all_states(model)
    return model


def _online_sum(alg, model, xs, ys):
    alg.compile_graph(xs[0])
    params = model.states(brainstate.ParamState)
    step = brainstate.transform.jit(
        lambda x, y: brainstate.transform.grad(lambda: jnp.sum((alg(x) - y) ** 2), params)()
    )
    total = None
    for t in range(xs.shape[0]):
        g = step(xs[t], ys[t])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total[("w",)]


def _bptt(eq, w, decay, h_shape, xs, ys):
    def loss(v):
        def body(h, inp):
            h = decay * jnp.tanh(h) + jnp.einsum(eq, inp[0], v)
            return h, jnp.sum((h - inp[1]) ** 2)

        return jax.lax.scan(body, jnp.zeros(h_shape), (xs, ys))[1].sum()

    return jax.grad(loss)(w)


ONLINE_FORMS = [  # the dense form is compared with braintrace.matmul below
    ("bhi,hio->bho", (3, 2, 2), (2, 2, 4), (3, 2, 4)),  # per-head weights
    ("bti,io->bto", (3, 4, 2), (2, 4), (3, 4, 4)),  # a weight shared along t, D varying over t
    ("hi,hio->ho", (2, 3), (2, 3, 4), (2, 4)),  # unbatched, per-head
]


@pytest.mark.parametrize("eq,xs_shape,w_shape,h_shape", ONLINE_FORMS)
def test_d_rtrl_equals_bptt(f64, rng, eq, xs_shape, w_shape, h_shape):
    w = _rand(rng, w_shape, 0.5)
    decay = jnp.asarray(rng.uniform(0.3, 0.9, h_shape))  # a different D for every unit and position
    xs, ys = _rand(rng, (T, *xs_shape)), _rand(rng, (T, *h_shape))
    model = _leaky_model(lambda x, v: braintrace.einsum(eq, x, v), w, decay, h_shape)
    got = _online_sum(braintrace.D_RTRL(model), model, xs, ys)
    assert_close(got, _bptt(eq, w, decay, h_shape, xs, ys), np.float64)


def test_unbatched_einsum_under_a_batched_model(f64, rng):
    """``y`` of ``'i,io->o'`` broadcasts over the batch axis of the hidden state: a trace per batch row."""
    B, I, O = 3, 2, 4
    w = _rand(rng, (I, O), 0.5)
    decay = jnp.asarray(rng.uniform(0.3, 0.9, (B, O)))
    xs, ys = _rand(rng, (T, I)), _rand(rng, (T, B, O))
    model = _leaky_model(lambda x, v: braintrace.einsum("i,io->o", x, v), w, decay, (B, O))
    alg = braintrace.D_RTRL(model)
    got = _online_sum(alg, model, xs, ys)
    assert [r.primitive.name for r in alg.graph.hidden_param_op_relations] == ["etp_einsum_v"]

    def loss(v):
        def body(h, inp):
            h = decay * jnp.tanh(h) + inp[0] @ v
            return h, jnp.sum((h - inp[1]) ** 2)

        return jax.lax.scan(body, jnp.zeros((B, O)), (xs, ys))[1].sum()

    assert_close(got, jax.grad(loss)(w), np.float64)


@pytest.mark.parametrize("algorithm", ["d_rtrl", "pp_prop"])
def test_equals_the_model_written_with_matmul(f64, rng, algorithm):
    """A tanh RNN (recurrent and input weights through the op) gives the gradients of the same model
    written with braintrace.matmul, under D_RTRL and pp_prop (whose gradients differ from BPTT)."""
    B, I, H = 3, 2, 4
    w_in, w_rec = _rand(rng, (I, H), 0.5), _rand(rng, (H, H), 0.5)
    xs, ys = _rand(rng, (T, B, I)), _rand(rng, (T, B, H))

    def build(op):
        class RNN(brainstate.nn.Module):
            def __init__(self):
                super().__init__()
                self.w_in = brainstate.ParamState(w_in)
                self.w = brainstate.ParamState(w_rec)

            def init_state(self, batch_size=None, **kw):
                self.h = brainstate.HiddenState(jnp.zeros((B, H)))

            def update(self, x):
                self.h.value = jnp.tanh(
                    op("bi,io->bo", self.h.value, self.w.value) + op("...i,io->...o", x, self.w_in.value)
                )
                return self.h.value

        model = RNN()
        brainstate.nn.init_all_states(model)
        return model

    def grads(op):
        model = build(op)
        alg = (
            braintrace.D_RTRL(model)
            if algorithm == "d_rtrl"
            else braintrace.pp_prop(model, decay_or_rank=0.8)
        )
        alg.compile_graph(xs[0])
        params = model.states(brainstate.ParamState)
        step = brainstate.transform.jit(
            lambda x, y: brainstate.transform.grad(lambda: jnp.sum((alg(x) - y) ** 2), params)()
        )
        out = []
        for t in range(T):
            g = step(xs[t], ys[t])
            out.append(jnp.concatenate([g[("w",)].ravel(), g[("w_in",)].ravel()]))
        return jnp.stack(out)

    with_einsum = grads(braintrace.einsum)
    with_matmul = grads(lambda eq, x, v: braintrace.matmul(x, v))
    assert float(jnp.abs(with_matmul).max()) > 0
    assert_close(with_einsum, with_matmul, np.float64)
