"""``braintrace.nn`` recurrent cells: forward equals ``brainstate.nn`` (weights copied over) or the
published formula, batched and unbatched; relation counts follow the compiler's rule."""

from __future__ import annotations

import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import braintrace
from braintrace import nn

I, H, STEPS = 3, 4, 3


@pytest.fixture
def precision(request):
    with brainstate.environ.context(precision=request.param, dt=1.0 * u.ms):
        yield request.param


def tol(precision):
    return dict(rtol=1e-5, atol=1e-5) if precision == 32 else dict(rtol=1e-12, atol=1e-12)


def np_init(seed):
    rng = np.random.default_rng(seed)
    return lambda shape: jnp.asarray(rng.normal(size=shape) * 0.6, brainstate.environ.dftype())


def split_linear(ref_linear, k):
    """brainstate's fused ``(I + H, kH)`` Linear as k ``{'weight', 'bias'}`` dicts, in order."""
    w, b = ref_linear.weight.value["weight"], ref_linear.weight.value["bias"]
    return [{"weight": w[:, i * H : (i + 1) * H], "bias": b[i * H : (i + 1) * H]} for i in range(k)]


def copy_from_brainstate(name, ours, ref):
    if name == "ValinaRNNCell":
        ours.W.weight.value = ref.W.weight.value
    elif name == "GRUCell":
        ours.Wr.weight.value, ours.Wz.weight.value = split_linear(ref.Wrz, 2)
        ours.Wh.weight.value = ref.Wh.weight.value
    elif name == "MGUCell":
        ours.Wf.weight.value, ours.Wh.weight.value = ref.Wf.weight.value, ref.Wh.weight.value
    elif name == "LSTMCell":
        parts = split_linear(ref.W, 4)
        for lin, p in zip((ours.Wi, ours.Wg, ours.Wf, ours.Wo), parts):
            lin.weight.value = p


def run(cell, xs, batch):
    """Outputs of ``STEPS`` steps from the initial state, in one jitted call."""
    brainstate.nn.init_all_states(cell, batch_size=batch)
    return brainstate.transform.jit(lambda xs: brainstate.transform.for_loop(cell, xs))(xs)


BRAINSTATE_CELLS = ["ValinaRNNCell", "GRUCell", "MGUCell", "LSTMCell"]


@pytest.mark.parametrize(
    "precision, batch",
    [(32, 2), (64, None)],
    ids=["float32-batched", "float64-unbatched"],
    indirect=["precision"],
)
@pytest.mark.parametrize("name", BRAINSTATE_CELLS)
def test_cell_matches_brainstate(precision, batch, name):
    ref = getattr(brainstate.nn, name)(I, H, w_init=np_init(1), b_init=np_init(2))
    ours = getattr(nn, name)(I, H, w_init=np_init(3), b_init=np_init(4))
    copy_from_brainstate(name, ours, ref)
    xs = jnp.asarray(
        np.random.default_rng(0).normal(size=(STEPS, *((batch,) if batch else ()), I)),
        brainstate.environ.dftype(),
    )
    got, want = run(ours, xs, batch), run(ref, xs, batch)
    assert got.dtype == want.dtype == xs.dtype
    np.testing.assert_allclose(got, want, **tol(precision))


@pytest.mark.parametrize("precision", [32], indirect=True)
@pytest.mark.parametrize("batch", [2, None], ids=["batched", "unbatched"])
def test_minimal_rnn_formula(precision, batch):
    cell = nn.MinimalRNNCell(I, H, w_init=np_init(5), b_init=np_init(6))
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.normal(size=(STEPS, *((batch,) if batch else ()), I)), jnp.float32)
    got = run(cell, xs, batch)
    px = jax.tree.map(np.asarray, cell.phi.weight.value)
    pu = jax.tree.map(np.asarray, cell.W_u.weight.value)
    sig = lambda v: 1 / (1 + np.exp(-v))
    h = np.zeros((*((batch,) if batch else ()), H))
    for t in range(STEPS):
        z = np.tanh(np.asarray(xs[t]) @ px["weight"] + px["bias"])
        gate = sig(np.concatenate([z, h], -1) @ pu["weight"] + pu["bias"])
        h = gate * h + (1 - gate) * z
        np.testing.assert_allclose(got[t], h, rtol=1e-5, atol=1e-5)


# relation count, the hidden group's states, and the weights without a trace
RELATIONS = {
    "ValinaRNNCell": (["W.weight"], ["h"], []),
    "GRUCell": (["Wz.weight", "Wh.weight"], ["h"], ["Wr.weight"]),
    "MGUCell": (["Wf.weight", "Wh.weight"], ["h"], []),
    "LSTMCell": (["Wi.weight", "Wg.weight", "Wf.weight", "Wo.weight"], ["h", "c"], []),
    "MinimalRNNCell": (["phi.weight", "W_u.weight"], ["h"], []),
}


@pytest.mark.parametrize("name", list(RELATIONS))
@pytest.mark.parametrize("batch", [2, None], ids=["batched", "unbatched"])
def test_cell_relations(name, batch):
    cell = getattr(nn, name)(I, H, w_init=np_init(7))
    brainstate.nn.init_all_states(cell, batch_size=batch)
    x = jnp.zeros((*((batch,) if batch else ()), I))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = braintrace.compile_etrace_graph(cell, x)
    want_params, want_states, no_trace = RELATIONS[name]
    rels = graph.hidden_param_op_relations
    assert len(rels) == len(want_params)
    assert [r.param_paths["weight"][0] for r in rels] == want_params
    assert all(set(r.trainable_vars) == {"weight", "bias"} for r in rels)
    assert all(r.primitive.name == ("etp_mm" if batch else "etp_mv") for r in rels)
    (group,) = graph.hidden_groups
    assert sorted(group.names) == sorted(want_states)
    assert all(r.hidden_groups == (group,) for r in rels)
    untraced = [rec for rec in graph.records if rec.kind.name == "WEIGHT_NOT_REACHING_HIDDEN"]
    assert [p for rec in untraced for p in rec.subject] == no_trace


@pytest.mark.parametrize("name", list(RELATIONS))
def test_cell_state_and_input_checks(name):
    cell = getattr(nn, name)(I, H, w_init=np_init(8))
    cell.init_state(batch_size=5)
    states = [cell.h] + ([cell.c] if name == "LSTMCell" else [])
    assert all(isinstance(s, brainstate.HiddenState) and s.value.shape == (5, H) for s in states)
    cell.h.value = jnp.ones((5, H))
    cell.reset_state(batch_size=5)
    assert float(jnp.abs(cell.h.value).sum()) == 0.0
    with pytest.raises(ValueError, match=rf"expected {I} input features.*with {I + 1}"):
        cell(jnp.ones((5, I + 1)))
    with pytest.raises(ValueError, match="activation"):
        getattr(nn, name)(I, H, activation="no_such_function")
