"""Integer and boolean hidden states (spike counters, flags) carry no gradient: the compiler leaves
them out of the hidden leaves, the step carries them like any other state it writes, and the
online gradients equal those of the same model without them."""

from __future__ import annotations

import inspect
import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace
from braintrace._compiler import graph as graph_module
from braintrace._compiler.diagnostics import DiagnosticKind, DiagnosticLevel, ETraceCompilationWarning
from braintrace._compiler.module_info import extract_module_info, record_non_float_hidden_states

B, I, H, T = 3, 4, 5, 12
THRESHOLD = 0.4


class CountingLIF(brainstate.nn.Module):
    """A leaky unit with a soft spike read-out; ``aux`` adds a non-float hidden state beside ``v``:
    ``'count'`` (int32 spike counter), ``'flag'`` (bool, spiked this step) or ``None``."""

    def __init__(self, aux="count", seed=0):
        super().__init__()
        self.aux = aux
        k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
        self.w_in = brainstate.ParamState(jax.random.normal(k1, (I, H)) * 0.6)
        self.w_rec = brainstate.ParamState(jax.random.normal(k2, (H, H)) * 0.3)

    def init_state(self, batch_size=None, **kwargs):
        self.v = brainstate.HiddenState(jnp.zeros((batch_size, H)))
        if self.aux == "count":
            self.n = brainstate.HiddenState(jnp.zeros((batch_size, H), jnp.int32))
        elif self.aux == "flag":
            self.n = brainstate.HiddenState(jnp.zeros((batch_size, H), bool))

    def update(self, x):
        v_prev = self.v.value
        spk_prev = jax.nn.sigmoid(4.0 * (v_prev - THRESHOLD))
        v = (
            0.8 * v_prev
            + braintrace.matmul(x, self.w_in.value)
            + braintrace.matmul(spk_prev, self.w_rec.value)
        )
        fired = v > THRESHOLD
        self.v.value = v - 0.3 * jax.lax.stop_gradient(fired.astype(v.dtype))
        if self.aux == "count":
            self.n.value = self.n.value + fired.astype(jnp.int32)
        elif self.aux == "flag":
            self.n.value = fired
        return jax.nn.sigmoid(4.0 * (self.v.value - THRESHOLD))


def loss(out, y):
    return jnp.mean((out - y) ** 2)


def data(seed=1):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, (T, B, I)), jax.random.uniform(ky, (T, B, H))


ALGORITHMS = {
    "d_rtrl": lambda m: braintrace.D_RTRL(m),
    "pp_prop": lambda m: braintrace.pp_prop(m, decay_or_rank=0.8),
}


def make(aux):
    model = CountingLIF(aux)
    brainstate.nn.init_all_states(model, batch_size=B)
    return model


def per_step_grads(alg, model, xs, ys):
    """Gradients of every step through ``brainstate.transform.grad`` of the per-step call, summed."""
    params = model.states(brainstate.ParamState)
    total = None
    for t in range(T):
        g = brainstate.transform.grad(lambda: loss(alg(xs[t]), ys[t]), params)()
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total


def plain_states(aux, xs):
    """The model run without any algorithm: the final values of its states."""
    model = make(aux)
    for t in range(T):
        model(xs[t])
    return model.v.value, model.n.value


def assert_same_grads(got, want):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(
            np.asarray(got[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-6, err_msg=str(k)
        )


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ETraceCompilationWarning)
        yield


@pytest.mark.parametrize("aux", ["count", "flag"])
def test_non_float_hidden_state_is_not_a_hidden_leaf(aux):
    model = make(aux)
    info = extract_module_info(model, jnp.zeros((B, I)))
    assert [h.name for h in info.hidden_leaves] == ["v"]
    assert info.non_float_hidden == (("n", jnp.dtype(jnp.int32 if aux == "count" else bool)),)
    # still a state the step writes
    n_index = next(i for i, p in enumerate(info.paths) if p == ("n",))
    assert info.written[n_index]

    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an INFO record raises no warning
        record_non_float_hidden_states(info, records)
    (rec,) = records
    assert rec.kind is DiagnosticKind.NON_FLOAT_HIDDEN_STATE
    assert rec.level is DiagnosticLevel.INFO
    assert rec.subject == ("n",) and "'n'" in rec.message


def test_float_only_model_has_no_non_float_record():
    info = extract_module_info(make(None), jnp.zeros((B, I)))
    assert info.non_float_hidden == ()
    records = []
    record_non_float_hidden_states(info, records)
    assert records == []


@pytest.mark.parametrize("name", list(ALGORITHMS))
@pytest.mark.parametrize("aux", ["count", "flag"])
def test_per_step_gradients_equal_the_model_without_the_state(name, aux):
    xs, ys = data()
    with_aux, without = make(aux), make(None)
    alg_a, alg_b = ALGORITHMS[name](with_aux), ALGORITHMS[name](without)
    alg_a.compile_graph(xs[0])
    alg_b.compile_graph(xs[0])
    assert [g.names for g in alg_a.graph.hidden_groups] == [("v",)]
    got = per_step_grads(alg_a, with_aux, xs, ys)
    want = per_step_grads(alg_b, without, xs, ys)
    assert_same_grads({k: v for k, v in got.items()}, want)
    assert all(float(jnp.abs(v).max()) > 0 for v in want.values())

    v_plain, n_plain = plain_states(aux, xs)
    np.testing.assert_allclose(np.asarray(with_aux.v.value), np.asarray(v_plain), rtol=1e-5, atol=1e-6)
    assert with_aux.n.value.dtype == n_plain.dtype
    np.testing.assert_array_equal(np.asarray(with_aux.n.value), np.asarray(n_plain))
    if aux == "count":
        assert int(with_aux.n.value.sum()) > 0  # it counted


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_etrace_grad_equals_the_model_without_the_counter(name):
    xs, ys = data(2)
    with_aux, without = make("count"), make(None)
    learner_a = braintrace.compile(with_aux, ALGORITHMS[name](with_aux), xs[0])
    learner_b = braintrace.compile(without, ALGORITHMS[name](without), xs[0])
    got, losses_a = learner_a.etrace_grad(xs, ys, step_fn=loss, return_value=True)
    want, losses_b = learner_b.etrace_grad(xs, ys, step_fn=loss, return_value=True)
    assert_same_grads(got, want)
    np.testing.assert_allclose(np.asarray(losses_a), np.asarray(losses_b), rtol=1e-6)

    # the counter counted through the scan
    _, n_plain = plain_states("count", xs)
    np.testing.assert_array_equal(np.asarray(with_aux.n.value), np.asarray(n_plain))
    assert int(n_plain.sum()) > 0


@pytest.mark.skipif(
    "record_non_float_hidden_states" not in inspect.getsource(graph_module),
    reason="compile_etrace_graph does not record non-float hidden states yet",
)
def test_compile_etrace_graph_records_the_non_float_state():
    graph = braintrace.compile_etrace_graph(make("count"), jnp.zeros((B, I)))
    recs = [r for r in graph.records if r.kind is DiagnosticKind.NON_FLOAT_HIDDEN_STATE]
    assert [r.subject for r in recs] == [("n",)]
