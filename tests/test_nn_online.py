"""Online learning with ``braintrace.nn`` layers: exact gradients against BPTT, and an SNN that learns.

* Exact parts (per-unit dynamics fed by an ETP weight, loss on the same group's states): the
  online ``D_RTRL`` gradient summed over 20 steps equals BPTT through an independent plain-``jnp``
  re-implementation to 1e-10 (relative, float64).
* A recurrent LIF network (``Linear`` -> ``Expon`` -> ``LIF``, recurrent ``SparseLinear``,
  ``LeakyRateReadout``) compiles under ``D_RTRL`` and ``pp_prop`` and learns a temporal task online
  (``braintrace.compile(...).etrace_grad`` + plain SGD); with zero gradients it does not.
"""

from __future__ import annotations

import re
import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from saiunit import sparse as ss

import braintrace
from braintrace import nn
from braintrace.nn import surrogate

DT = 1.0 * u.ms


@pytest.fixture
def env64():
    """float64 everywhere (brainstate precision and jax x64) and ``dt = 1 ms``."""
    with brainstate.environ.context(precision=64, dt=DT):
        yield


@pytest.fixture
def env32():
    with brainstate.environ.context(precision=32, dt=DT):
        yield


@pytest.fixture(autouse=True)
def _quiet_compiler():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)


def decay(tau_ms):
    return float(np.exp(-1.0 / tau_ms))


def online_grads(model, xs, targets, step_fn, batch_size):
    brainstate.nn.init_all_states(model, batch_size=batch_size)
    learner = braintrace.compile(model, "d_rtrl", xs[0])
    return learner.etrace_grad(xs, *targets, step_fn=step_fn)


def mse(out, y):
    return jnp.sum((out - y) ** 2)


# --------------------------------------------------------------------------------------------------
# exact parts: online D-RTRL == BPTT (float64)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [3, None], ids=["batched", "unbatched"])
def test_leaky_rate_readout_drtrl_equals_bptt(env64, batch):
    rng = np.random.default_rng(0)
    T, I, O = 20, 4, 3
    lead = () if batch is None else (batch,)
    w = rng.normal(size=(I, O))
    xs = jnp.asarray(rng.normal(size=(T, *lead, I)))
    ys = jnp.asarray(rng.normal(size=(T, *lead, O)))
    model = nn.LeakyRateReadout(I, O, tau=7.0 * u.ms, w_init=jnp.asarray(w))
    grads = online_grads(model, xs, (ys,), mse, batch)

    a = decay(7.0)

    def bptt(w):
        def body(r, xy):
            r = a * r + xy[0] @ w
            return r, jnp.sum((r - xy[1]) ** 2)

        return jax.lax.scan(body, jnp.zeros((*lead, O)), (xs, ys))[1].sum()

    want = jax.grad(bptt)(jnp.asarray(w))
    assert grads[("weight",)].dtype == jnp.float64
    assert rel_err(grads[("weight",)], want) < 1e-10


class LinearExpon(brainstate.nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.inp = nn.Linear(w.shape[0], w.shape[1], w_init=jnp.asarray(w), b_init=jnp.asarray(b))
        self.syn = nn.Expon(w.shape[1], tau=6.0 * u.ms)

    def update(self, x):
        return self.syn(self.inp(x))


def test_linear_into_expon_drtrl_equals_bptt(env64):
    rng = np.random.default_rng(1)
    T, B, I, H = 20, 2, 5, 4
    w, b = rng.normal(size=(I, H)), rng.normal(size=H)
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    ys = jnp.asarray(rng.normal(size=(T, B, H)))
    grads = online_grads(LinearExpon(w, b), xs, (ys,), mse, B)
    a = decay(6.0)

    def bptt(p):
        def body(g, xy):
            g = a * g + xy[0] @ p["weight"] + p["bias"]
            return g, jnp.sum((g - xy[1]) ** 2)

        return jax.lax.scan(body, jnp.zeros((B, H)), (xs, ys))[1].sum()

    want = jax.grad(bptt)({"weight": jnp.asarray(w), "bias": jnp.asarray(b)})
    got = grads[("inp", "weight")]
    assert rel_err(got["weight"], want["weight"]) < 1e-10
    assert rel_err(got["bias"], want["bias"]) < 1e-10


class SpikingColumn(brainstate.nn.Module):
    """``Linear -> Expon -> LIF/ALIF`` without recurrence: every unit is a closed 2- or 3-state system."""

    def __init__(self, w, b, neuron):
        super().__init__()
        H = w.shape[1]
        self.inp = nn.Linear(w.shape[0], H, w_init=jnp.asarray(w), b_init=jnp.asarray(b))
        self.syn = nn.Expon(H, tau=5.0 * u.ms)
        spk = lambda x: surrogate.sigmoid(x, alpha=2.0)
        if neuron == "LIF":
            self.neu = nn.LIF(H, tau=8.0 * u.ms, V_th=1.0, V_reset=0.0, V_rest=0.1, R=1.5, spk_fun=spk)
        elif neuron == "LIF-hard":
            self.neu = nn.LIF(H, tau=8.0 * u.ms, V_th=1.0, V_reset=-0.2, R=1.5, spk_fun=spk, spk_reset="hard")
        else:
            self.neu = nn.ALIF(H, tau=8.0 * u.ms, tau_a=30.0 * u.ms, beta=0.3, V_th=1.0, R=1.5, spk_fun=spk)

    def update(self, x):
        return self.neu(self.syn(self.inp(x)))


def _spiking_bptt(p, xs, cs, neuron):
    """Plain-jnp BPTT loss of :class:`SpikingColumn` with loss ``sum_t sum(c_t * spikes_t)``."""
    a_syn, a_v, a_a = decay(5.0), decay(8.0), decay(30.0)
    spk = lambda x: surrogate.sigmoid(x, alpha=2.0)
    V_reset = -0.2 if neuron == "LIF-hard" else 0.0
    V_rest = 0.1 if neuron == "LIF" else 0.0
    beta = 0.3 if neuron == "ALIF" else 0.0

    def body(carry, xc):
        g, V, adapt = carry
        x, c = xc
        g = a_syn * g + x @ p["weight"] + p["bias"]
        s_prev = spk((V - 1.0 - beta * adapt) / (1.0 - V_reset))
        if neuron == "LIF-hard":
            V = V - (jax.lax.stop_gradient(V) - V_reset) * s_prev
        else:
            V = V - (1.0 - V_reset) * s_prev
        V = a_v * V + (1 - a_v) * (V_rest + 1.5 * g)
        if neuron == "ALIF":
            adapt = a_a * (adapt + s_prev)
        return (g, V, adapt), jnp.sum(c * spk((V - 1.0 - beta * adapt) / (1.0 - V_reset)))

    zeros = jnp.zeros((xs.shape[1], p["weight"].shape[1]))
    return jax.lax.scan(body, (zeros, zeros, zeros), (xs, cs))[1].sum()


@pytest.mark.parametrize("neuron", ["LIF", "LIF-hard", "ALIF"])
def test_spiking_column_drtrl_equals_bptt(env64, neuron):
    rng = np.random.default_rng(2)
    T, B, I, H = 20, 2, 3, 4
    w, b = rng.normal(0.0, 1.5, size=(I, H)), rng.normal(0.3, 0.2, size=H)
    xs = jnp.asarray(rng.random((T, B, I)) * 2.0)
    cs = jnp.asarray(rng.normal(size=(T, B, H)))
    model = SpikingColumn(w, b, neuron)
    grads = online_grads(model, xs, (cs,), lambda out, c: jnp.sum(out * c), B)
    p = {"weight": jnp.asarray(w), "bias": jnp.asarray(b)}
    want = jax.grad(_spiking_bptt)(p, xs, cs, neuron)
    spikes = jax.lax.stop_gradient(_spiking_bptt(p, xs, jnp.ones_like(cs), neuron))
    assert float(spikes) > 1.0  # the neurons do fire: the reset enters the hidden Jacobian
    got = grads[("inp", "weight")]
    assert np.linalg.norm(np.asarray(want["weight"])) > 1e-3
    assert rel_err(got["weight"], want["weight"]) < 1e-10
    assert rel_err(got["bias"], want["bias"]) < 1e-10


class LinearReadout(brainstate.nn.Module):
    def __init__(self, w_in, w_out):
        super().__init__()
        self.inp = nn.Linear(w_in.shape[0], w_in.shape[1], w_init=jnp.asarray(w_in), b_init=None)
        self.out = nn.LeakyRateReadout(
            w_out.shape[0], w_out.shape[1], tau=4.0 * u.ms, w_init=jnp.asarray(w_out)
        )

    def update(self, x):
        return self.out(self.inp(x))


def test_linear_into_leaky_readout(env64):
    """The readout weight is exact; the Linear feeds the readout through another trainable ETP op, so it
    is not a relation (the compiler says so) and receives its within-step gradient, summed over steps."""
    rng = np.random.default_rng(3)
    T, B, I, H, O = 20, 2, 3, 5, 2
    w_in, w_out = rng.normal(size=(I, H)), rng.normal(size=(H, O))
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    ys = jnp.asarray(rng.normal(size=(T, B, O)))
    model = LinearReadout(w_in, w_out)
    brainstate.nn.init_all_states(model, batch_size=B)
    graph = braintrace.compile_etrace_graph(model, xs[0])
    assert [r.param_paths["weight"] for r in graph.hidden_param_op_relations] == [("out.weight",)]
    assert any(
        "inp.weight" in rec.message and rec.kind.name == "WEIGHT_NOT_REACHING_HIDDEN" for rec in graph.records
    )

    grads = online_grads(model, xs, (ys,), mse, B)
    a = decay(4.0)

    def loss(w_in, w_out, hold):  # hold: the within-step gradient (r_{t-1} held at its true value)
        def body(r, xy):
            r = a * (jax.lax.stop_gradient(r) if hold else r) + (xy[0] @ w_in) @ w_out
            return r, jnp.sum((r - xy[1]) ** 2)

        return jax.lax.scan(body, jnp.zeros((B, O)), (xs, ys))[1].sum()

    want_in, want_out = jax.grad(loss, argnums=(0, 1))(jnp.asarray(w_in), jnp.asarray(w_out), False)
    local_in = jax.grad(loss)(jnp.asarray(w_in), jnp.asarray(w_out), True)
    assert rel_err(grads[("out", "weight")], want_out) < 1e-10
    assert rel_err(grads[("inp", "weight")]["weight"], local_in) < 1e-10
    assert rel_err(local_in, want_in) > 1e-3  # (and that is not BPTT)


# --------------------------------------------------------------------------------------------------
# a recurrent spiking network learns online
# --------------------------------------------------------------------------------------------------

T_TASK, B_TASK, N_IN, N_REC = 25, 32, 2, 32


class SNN(brainstate.nn.Module):
    """``x -> Linear -> Expon -> LIF -> LeakyRateReadout`` with a recurrent ``SparseLinear`` on the spikes."""

    def __init__(self, seed=0, n_rec=N_REC):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.inp = nn.Linear(
            N_IN, n_rec, w_init=jnp.asarray(rng.normal(0.0, 3.0, (N_IN, n_rec)), jnp.float32)
        )
        dense = (rng.random((n_rec, n_rec)) < 0.2) * rng.normal(0.0, 0.5, (n_rec, n_rec))
        self.rec = nn.SparseLinear(ss.CSR.fromdense(jnp.asarray(dense, jnp.float32)))
        self.syn = nn.Expon(n_rec, tau=5.0 * u.ms)
        self.lif = nn.LIF(n_rec, tau=10.0 * u.ms, V_th=1.0)
        self.out = nn.LeakyRateReadout(
            n_rec, 2, tau=10.0 * u.ms, w_init=jnp.asarray(rng.normal(0.0, 0.1, (n_rec, 2)), jnp.float32)
        )

    def update(self, x):
        spk_prev = self.lif.get_spike()
        g = self.syn(self.inp(x) + self.rec(spk_prev))
        return self.out(self.lif(g))


def make_task(seed):
    """Two Poisson channels; the label is the channel with the higher rate (0.5 vs 0.15 per step)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, B_TASK)
    p = np.where(label[:, None] == np.arange(2)[None, :], 0.5, 0.15)
    xs = (rng.random((T_TASK, B_TASK, 2)) < p[None]).astype(np.float32)
    return jnp.asarray(xs), jnp.asarray(np.broadcast_to(label, (T_TASK, B_TASK)).astype(np.int32))


LOSS_MASK = jnp.asarray((np.arange(T_TASK) >= T_TASK - 10).astype(np.float32))


def task_loss(out, label, mask):
    """Cross-entropy over the last 10 steps (``mask``), averaged over the batch and the steps."""
    return mask * -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(out.shape[0]), label]) / 10.0


def compile_snn(algorithm):
    with brainstate.environ.context(precision=32, dt=DT):
        model = SNN()
        alg = (
            braintrace.D_RTRL(model)
            if algorithm == "d_rtrl"
            else braintrace.pp_prop(model, decay_or_rank=0.9)
        )
        learner = braintrace.compile(model, alg, jnp.zeros((B_TASK, N_IN)), batch_size=B_TASK)
    assert learner is alg and learner.is_compiled
    return model, learner


@pytest.fixture(scope="module")
def snn_drtrl():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_snn("d_rtrl")


def check_snn_graph(model, graph):
    rels = {r.param_paths["weight"][0]: r for r in graph.hidden_param_op_relations}
    assert set(rels) == {"inp.weight", "rec.weight", "out.weight"}
    assert rels["rec.weight"].primitive.name == "etp_sp_mm"
    assert rels["inp.weight"].primitive.name == rels["out.weight"].primitive.name == "etp_mm"
    groups = {frozenset(g.names) for g in graph.hidden_groups}
    assert groups == {frozenset({"syn.g", "lif.V"}), frozenset({"out.r"})}
    # the sparse index arrays are traced inputs of the step (a non-trainable state), not constants
    assert len(rels["rec.weight"].aux_vars) == 3  # row, col, col_ptr
    assert all(v in graph.module_info.jaxpr.invars for v in rels["rec.weight"].aux_vars)
    assert not isinstance(model.rec.indices, brainstate.ParamState)
    assert ("rec", "indices") not in model.states(brainstate.ParamState)


@pytest.mark.parametrize("algorithm", ["d_rtrl", "pp_prop"])
def test_snn_compiles_and_learns_online(env32, snn_drtrl, algorithm):
    model, learner = snn_drtrl if algorithm == "d_rtrl" else compile_snn(algorithm)
    check_snn_graph(model, learner.graph)
    params = model.states(brainstate.ParamState)
    x_eval, y_eval = make_task(1)

    def eval_loss():
        return float(
            learner.etrace_grad(x_eval, y_eval, LOSS_MASK, step_fn=task_loss, return_value=True)[1].sum()
        )

    def sgd_steps(iterations, lr, zero_grads=False, seed=100):
        for it in range(iterations):
            xs, ys = make_task(seed + it)
            grads, _ = learner.etrace_grad(xs, ys, LOSS_MASK, step_fn=task_loss, return_value=True)
            for key, state in params.items():
                g = jax.tree.map(jnp.zeros_like, grads[key]) if zero_grads else grads[key]
                state.value = jax.tree.map(lambda p, d: p - lr * d, state.value, g)
        return grads

    initial = eval_loss()
    # control: the same loop with the gradients replaced by zeros does not meet the bound
    sgd_steps(3, lr=0.02, zero_grads=True, seed=50)
    control = eval_loss()
    assert control == pytest.approx(initial, rel=1e-6) and not control < 0.6 * initial

    grads = sgd_steps(40, lr=0.02)
    final = eval_loss()
    assert float(jnp.linalg.norm(grads[("out", "weight")])) > 0
    assert np.isfinite(final) and final < 0.6 * initial, (initial, final)


def test_snn_input_and_recurrent_weights_get_gradients(env32, snn_drtrl):
    model, learner = snn_drtrl
    xs, ys = make_task(5)
    grads, _ = learner.etrace_grad(xs, ys, LOSS_MASK, step_fn=task_loss, return_value=True)
    assert float(jnp.linalg.norm(grads[("inp", "weight")]["weight"])) > 0
    assert float(jnp.linalg.norm(grads[("rec", "weight")]["weight"])) > 0


# --------------------------------------------------------------------------------------------------
# sparse indices stay out of the compiled program as constants
# --------------------------------------------------------------------------------------------------


def _largest_constant(hlo_text):
    largest = 0
    for line in hlo_text.splitlines():
        if "constant" not in line:
            continue
        for dims in re.findall(r"tensor<([0-9x]+)x[a-z]", line):
            largest = max(largest, int(np.prod([int(d) for d in dims.split("x")])))
    return largest


def test_sparse_linear_indices_are_operands(env32):
    n, nnz_per_row = 2000, 50  # nnz = 10^5
    rng = np.random.default_rng(4)
    cols = np.sort(np.stack([rng.choice(n, nnz_per_row, replace=False) for _ in range(n)]), axis=1)
    indptr = np.arange(0, n * nnz_per_row + 1, nnz_per_row)
    data = rng.normal(size=n * nnz_per_row).astype(np.float32)
    csr = ss.CSR((jnp.asarray(data), jnp.asarray(cols.ravel()), jnp.asarray(indptr)), shape=(n, n))
    layer = nn.SparseLinear(csr)
    x = jnp.asarray(rng.normal(size=(4, n)), jnp.float32)
    step = brainstate.transform.jit(lambda x: layer(x))
    text = (
        step.lower(x).as_text() if hasattr(step, "lower") else jax.jit(lambda x: layer(x)).lower(x).as_text()
    )
    assert _largest_constant(text) <= 10**4
    np.testing.assert_allclose(
        np.asarray(step(x)), np.asarray(x) @ np.asarray(csr.todense()), rtol=2e-4, atol=2e-4
    )
