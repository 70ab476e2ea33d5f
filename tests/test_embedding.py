"""``braintrace.embedding`` and ``braintrace.nn.Embedding`` through it: forward, errors, rules
against ``jax.vjp`` / ``jax.grad``, the marker under ``vmap``, and D-RTRL of a model whose hidden
state is driven by the looked-up rows against BPTT (float64)."""

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

emb_mod = importlib.import_module("braintrace._etrace_op.embedding")
V, D, B, T = 6, 3, 4, 5


@pytest.fixture(autouse=True, scope="module")
def _unregister_embedding():
    """The embedding primitives register on first use: leave the registries as this module found them."""
    from braintrace._etrace_op import unregister_primitive

    before = {n: ETP_PRIMITIVES_BY_NAME.get(n) for n in ("etp_emb", "etp_emb_v")}
    yield
    for name, p in before.items():
        if p is None and name in ETP_PRIMITIVES_BY_NAME:
            unregister_primitive(ETP_PRIMITIVES_BY_NAME[name])


@pytest.fixture
def f64():
    with float64():
        yield


@pytest.fixture
def table(rng):
    return jnp.asarray(rng.standard_normal((V, D)))


def test_forward_is_the_lookup(f64, rng, table, primitive_names):
    idx = jnp.asarray([0, 5, 2, 2, -1, -6, 7, -9])  # negative and out-of-range indices as T[i] reads them
    np.testing.assert_array_equal(braintrace.embedding(idx, table), table[idx])
    np.testing.assert_array_equal(braintrace.embedding(jnp.asarray(3), table), table[3])
    names = primitive_names(jax.make_jaxpr(braintrace.embedding)(idx, table))
    assert "etp_emb" in names and "etp_emb_v" not in names
    assert "etp_emb_v" in primitive_names(jax.make_jaxpr(braintrace.embedding)(idx[0], table))
    from braintrace._etrace_op._registries import ETP_PP_X_REPR

    assert all(ETP_PP_X_REPR.get(p) is emb_mod._emb_pp_x_repr for p in emb_mod.embedding_primitives())
    y = braintrace.embedding(idx[:3], table * u.mV)
    np.testing.assert_array_equal(y.to_decimal(u.mV), table[idx[:3]])
    np.testing.assert_array_equal(
        braintrace.embedding(idx[:3], table, weight_fn=jnp.tanh), jnp.tanh(table)[idx[:3]]
    )


def test_errors(table):
    with pytest.raises(TypeError, match="`indices` must have an integer dtype"):
        braintrace.embedding(jnp.ones(3), table)
    with pytest.raises(NotImplementedError, match=r"scalar or a \(batch,\) vector"):
        braintrace.embedding(jnp.zeros((2, 3), int), table)
    with pytest.raises(ValueError, match=r"\(num_embeddings, features\)"):
        braintrace.embedding(jnp.zeros(3, int), table[0])


def test_gradient_equals_jax_grad_of_the_lookup(f64, rng, table):
    idx = jnp.asarray(rng.integers(-V, V, 8))
    c = jnp.asarray(rng.standard_normal((8, D)))
    got = jax.grad(lambda w: jnp.sum(c * jnp.sin(braintrace.embedding(idx, w))))(table)
    want = jax.grad(lambda w: jnp.sum(c * jnp.sin(w[idx])))(table)
    assert_close(got, want, np.float64)


def test_rules(f64, rng, table):
    idx = jnp.asarray(rng.integers(0, V, B))
    g, v = jnp.asarray(rng.standard_normal((B, D))), jnp.asarray(rng.standard_normal((B, D)))
    w = {"weight": table}
    _, vjp = jax.vjp(lambda t: t[idx], table)
    assert_close(emb_mod._emb_xy_to_dw(idx, g, w)["weight"], vjp(g)[0], np.float64)
    # pp_prop's representation of the indices: their one-hot rows (as T[i] reads them), and the
    # float form of xy_to_dw is the dense layer fed by it
    onehot = emb_mod._emb_pp_x_repr(idx, w)
    np.testing.assert_array_equal(onehot, jax.nn.one_hot(idx, V, dtype=table.dtype))
    np.testing.assert_array_equal(
        emb_mod._emb_pp_x_repr(jnp.asarray([-1, V + 3]), w), np.eye(V)[[V - 1, V - 1]]
    )
    assert_close(emb_mod._emb_xy_to_dw(onehot, g, w)["weight"], vjp(g)[0], np.float64)
    # yw_to_w(v, xy_to_dw(x, g)) == xy_to_dw(x, v * g), per batch element
    inst = jax.vmap(lambda i, gb: emb_mod._emb_xy_to_dw(i[None], gb[None], w)["weight"])(idx, g)
    got = emb_mod._emb_yw_to_w(v, {"weight": inst})["weight"]
    want = jax.vmap(lambda i, gb: emb_mod._emb_xy_to_dw(i[None], gb[None], w)["weight"])(idx, v * g)
    assert_close(got, want, np.float64)


def test_vmap_keeps_the_marker(f64, rng, table, primitive_names):
    idx = jnp.asarray(rng.integers(0, V, (3, B)))
    names = primitive_names(jax.make_jaxpr(jax.vmap(lambda i: braintrace.embedding(i, table)))(idx))
    assert "etp_emb" in names and "gather" not in names
    np.testing.assert_array_equal(jax.vmap(lambda i: braintrace.embedding(i, table))(idx), table[idx])
    names = primitive_names(jax.make_jaxpr(jax.vmap(lambda i: braintrace.embedding(i, table)))(idx[0]))
    assert "etp_emb" in names and "etp_emb_v" not in names


def _leaky(lookup, decay, h_shape):
    """``h <- decay * tanh(h) + lookup(i)``: per-unit intrinsic dynamics, so D-RTRL is exact."""

    class Model(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = lookup

        def init_state(self, batch_size=None, **kw):
            self.h = brainstate.HiddenState(jnp.zeros(h_shape))

        def update(self, i):
            self.h.value = decay * jnp.tanh(self.h.value) + self.emb(i)
            return self.h.value

    model = Model()
    brainstate.nn.init_all_states(model)
    return model


@pytest.mark.parametrize("batched", [True, False])
def test_d_rtrl_of_nn_embedding_equals_bptt(f64, rng, table, batched):
    h_shape = (B, D) if batched else (D,)
    decay = jnp.asarray(rng.uniform(0.3, 0.9, h_shape))
    idx = jnp.asarray(rng.integers(0, V, (T, *h_shape[:-1])))
    ys = jnp.asarray(rng.standard_normal((T, *h_shape)))
    layer = braintrace.nn.Embedding(V, D, embedding_init=table)
    model = _leaky(layer, decay, h_shape)
    alg = braintrace.D_RTRL(model)
    alg.compile_graph(idx[0])
    assert [r.primitive.name for r in alg.graph.hidden_param_op_relations] == [
        "etp_emb" if batched else "etp_emb_v"
    ]
    params = model.states(brainstate.ParamState)
    step = brainstate.transform.jit(
        lambda i, y: brainstate.transform.grad(lambda: jnp.sum((alg(i) - y) ** 2), params)()
    )
    total = sum(step(idx[t], ys[t])[("emb", "weight")] for t in range(T))

    def loss(w):
        def body(h, inp):
            h = decay * jnp.tanh(h) + w[inp[0]]
            return h, jnp.sum((h - inp[1]) ** 2)

        return jax.lax.scan(body, jnp.zeros(h_shape), (idx, ys))[1].sum()

    assert_close(total, jax.grad(loss)(table), np.float64)


def test_nn_embedding_shapes_and_options(f64, rng, table, primitive_names):
    layer = braintrace.nn.Embedding(V, D, embedding_init=table)
    idx = jnp.asarray(rng.integers(0, V, (2, 3)))
    np.testing.assert_array_equal(layer(idx), table[idx])  # any index rank: flattened for the op
    assert "etp_emb" in primitive_names(jax.make_jaxpr(layer)(idx))
    wide = braintrace.nn.Embedding(V, (2, 3), embedding_init=jnp.asarray(rng.standard_normal((V, 2, 3))))
    assert wide(idx[0]).shape == (3, 2, 3)
    np.testing.assert_array_equal(wide(idx[0]), wide.weight.value[idx[0]])
    # brainstate's lookup options keep brainstate's lookup (a plain gather)
    pad = braintrace.nn.Embedding(V, D, padding_idx=0)
    names = primitive_names(jax.make_jaxpr(pad)(idx))
    assert "etp_emb" not in names
    np.testing.assert_array_equal(pad(jnp.asarray([0])), jnp.zeros((1, D)))
    with pytest.raises(TypeError, match="integer dtype"):
        layer(jnp.ones(3))
