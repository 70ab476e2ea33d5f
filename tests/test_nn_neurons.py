"""``braintrace.nn`` spiking and leaky layers: LIF, ALIF, Expon, LeakyRateReadout, LeakySpikeReadout.

Forward results equal plain-numpy implementations of the documented updates (batched and
unbatched, float32 and float64); the layers' weights are relations of their own hidden states;
time constants are validated.
"""

from __future__ import annotations

import functools
import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import braintrace
from braintrace import nn
from braintrace.nn import surrogate

STEPS, N = 12, 5


@pytest.fixture
def precision(request):
    with brainstate.environ.context(precision=request.param, dt=0.5 * u.ms):
        yield request.param


@pytest.fixture
def dt_env():
    with brainstate.environ.context(dt=0.5 * u.ms):
        yield


def tol(precision):
    return dict(rtol=2e-5, atol=2e-5) if precision == 32 else dict(rtol=1e-12, atol=1e-12)


cases = pytest.mark.parametrize(
    "precision, batch",
    [(32, 3), (64, None)],
    ids=["float32-batched", "float64-unbatched"],
    indirect=["precision"],
)


def simulate(layer, xs, batch, states):
    """Outputs and the named states after each step, in one jitted call."""
    brainstate.nn.init_all_states(layer, batch_size=batch)

    def step(x):
        return (layer(x), *[getattr(layer, s).value for s in states])

    return brainstate.transform.jit(lambda xs: brainstate.transform.for_loop(step, xs))(xs)


def inputs(batch, n=N, scale=2.5, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(
        rng.random((STEPS, *((batch,) if batch else ()), n)) * scale, brainstate.environ.dftype()
    )


def decay(tau_ms, dt_ms=0.5):
    return np.exp(-dt_ms / tau_ms)


def heaviside(v):
    return (v > 0).astype(np.float64)


# --------------------------------------------------------------------------------------------------
# forward results
# --------------------------------------------------------------------------------------------------


@cases
@pytest.mark.parametrize("reset", ["subtract", "hard"])
def test_lif_forward(precision, batch, reset):
    lif = nn.LIF(N, tau=4.0 * u.ms, V_th=1.0, V_reset=-0.1, V_rest=0.05, R=1.2, spk_reset=reset)
    xs = inputs(batch)
    spikes, V = simulate(lif, xs, batch, ["V"])
    a = decay(4.0)
    v = np.zeros(xs.shape[1:])
    for t in range(STEPS):
        s_prev = heaviside((v - 1.0) / 1.1)
        v = v - (1.1 if reset == "subtract" else v + 0.1) * s_prev
        v = a * v + (1 - a) * (0.05 + 1.2 * np.asarray(xs[t], np.float64))
        np.testing.assert_allclose(V[t], v, **tol(precision))
        np.testing.assert_array_equal(spikes[t], heaviside((v - 1.0) / 1.1))
    assert spikes.dtype == xs.dtype and float(spikes.sum()) > 0


@cases
def test_alif_forward(precision, batch):
    alif = nn.ALIF(N, tau=4.0 * u.ms, tau_a=20.0 * u.ms, beta=0.4, V_th=1.0)
    xs = inputs(batch)
    spikes, V, A = simulate(alif, xs, batch, ["V", "a"])
    av, aa = decay(4.0), decay(20.0)
    v = adapt = np.zeros(xs.shape[1:])
    for t in range(STEPS):
        s_prev = heaviside(v - 1.0 - 0.4 * adapt)
        v = av * (v - s_prev) + (1 - av) * np.asarray(xs[t], np.float64)
        adapt = aa * (adapt + s_prev)
        np.testing.assert_allclose(V[t], v, **tol(precision))
        np.testing.assert_allclose(A[t], adapt, **tol(precision))
        np.testing.assert_array_equal(spikes[t], heaviside(v - 1.0 - 0.4 * adapt))
    assert float(A.max()) > 0  # adaptation was triggered


def test_lif_refractory(dt_env):
    lif = nn.LIF(2, tau=2.0 * u.ms, tau_ref=1.0 * u.ms, spk_reset="hard")  # 1 ms / 0.5 ms = 2 held steps
    xs = jnp.full((STEPS, 2), 20.0)
    spikes, V, left = simulate(lif, xs, None, ["V", "refractory"])
    s = np.asarray(spikes[:, 0])
    first = int(np.argmax(s))
    assert s[first] == 1 and s[first + 1 : first + 3].sum() == 0 and s[first + 3] == 1
    np.testing.assert_allclose(V[first + 1, 0], 0.0)  # reset, then held (no integration)
    np.testing.assert_allclose(V[first + 2, 0], 0.0)
    np.testing.assert_allclose(left[first], 2.0)
    free = nn.LIF(2, tau=2.0 * u.ms, spk_reset="hard")
    s_free = np.asarray(simulate(free, xs, None, ["V"])[0][:, 0])
    assert s_free.sum() > s.sum()


def test_spike_depends_on_new_state(dt_env):
    """The returned spike is spk_fun of the state's new value: d spike / d V_t is the surrogate there."""
    lif = nn.LIF(N, tau=4.0 * u.ms, spk_fun=functools.partial(surrogate.sigmoid, alpha=2.0))
    lif.init_state(batch_size=2)
    x = inputs(2)[0]

    def check(x):
        out = lif(x)
        V = lif.V.value
        grad = jax.grad(lambda v: lif.get_spike(v).sum())(V)
        want = jax.vmap(jax.grad(lambda v: surrogate.sigmoid(v - 1.0, alpha=2.0)))(V.ravel())
        return out, lif.get_spike(V), grad.ravel(), want

    out, from_state, grad, want = brainstate.transform.jit(check)(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(from_state))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-6)


@cases
def test_expon_forward(precision, batch):
    syn = nn.Expon(N, tau=3.0 * u.ms)
    xs = inputs(batch)
    out, G = simulate(syn, xs, batch, ["g"])
    g = np.zeros(xs.shape[1:])
    for t in range(STEPS):
        g = decay(3.0) * g + np.asarray(xs[t], np.float64)
        np.testing.assert_allclose(G[t], g, **tol(precision))
    np.testing.assert_allclose(out, G, rtol=0, atol=0)


@cases
def test_leaky_rate_readout_forward(precision, batch):
    w = np.random.default_rng(1).normal(size=(N, 2))
    ro = nn.LeakyRateReadout(N, 2, tau=6.0 * u.ms, w_init=jnp.asarray(w, brainstate.environ.dftype()))
    xs = inputs(batch)
    out, R = simulate(ro, xs, batch, ["r"])
    r = np.zeros((*((batch,) if batch else ()), 2))
    for t in range(STEPS):
        r = decay(6.0) * r + np.asarray(xs[t], np.float64) @ w
        np.testing.assert_allclose(R[t], r, **tol(precision))


@cases
def test_leaky_spike_readout_forward(precision, batch):
    w = np.random.default_rng(2).normal(1.0, 1.0, size=(N, 3))
    ro = nn.LeakySpikeReadout(
        N, 3, tau=3.0 * u.ms, V_th=0.8, w_init=jnp.asarray(w, brainstate.environ.dftype())
    )
    xs = inputs(batch)
    spikes, V = simulate(ro, xs, batch, ["V"])
    v = np.zeros((*((batch,) if batch else ()), 3))
    a = decay(3.0)
    for t in range(STEPS):
        v = v - 0.8 * heaviside((v - 0.8) / 0.8)
        v = a * v + (1 - a) * (np.asarray(xs[t], np.float64) @ w)
        np.testing.assert_allclose(V[t], v, **tol(precision))
        np.testing.assert_array_equal(spikes[t], heaviside((v - 0.8) / 0.8))
    assert float(spikes.sum()) > 0


def test_time_constants_with_units(dt_env):
    """``tau`` in seconds with ``dt`` in ms gives the same decay as in ms; plain numbers need a plain dt."""
    xs = inputs(None)
    a = simulate(nn.Expon(N, tau=3.0 * u.ms), xs, None, ["g"])[0]
    b = simulate(nn.Expon(N, tau=0.003 * u.second), xs, None, ["g"])[0]
    np.testing.assert_allclose(a, b, rtol=1e-5)
    with brainstate.environ.context(dt=0.5):
        c = simulate(nn.Expon(N, tau=3.0), xs, None, ["g"])[0]
    np.testing.assert_allclose(a, c, rtol=1e-5)
    with pytest.raises(ValueError, match="same dimension"):
        simulate(nn.Expon(N, tau=3.0), xs, None, ["g"])


def test_lif_with_voltage_units(dt_env):
    """Voltages, resistance and currents may carry consistent saiunit units."""
    init = brainstate.nn.init
    with_units = nn.LIF(
        N,
        tau=4.0 * u.ms,
        V_th=-50.0 * u.mV,
        V_reset=-65.0 * u.mV,
        V_rest=-65.0 * u.mV,
        R=2.0 * u.ohm,
        V_init=init.Constant(-65.0 * u.mV),
    )
    plain = nn.LIF(
        N, tau=4.0 * u.ms, V_th=-50.0, V_reset=-65.0, V_rest=-65.0, R=2.0, V_init=init.Constant(-65.0)
    )
    xs = inputs(None, scale=40.0)
    s_units, V_units = simulate(with_units, xs * u.mA, None, ["V"])
    s_plain, V_plain = simulate(plain, xs, None, ["V"])
    assert u.get_unit(V_units).has_same_dim(u.mV)
    np.testing.assert_allclose(u.get_mantissa(V_units.to(u.mV)), V_plain, rtol=1e-5)
    np.testing.assert_array_equal(s_units, s_plain)
    assert float(s_plain.sum()) > 0


# --------------------------------------------------------------------------------------------------
# relations: the neuron's states are the hidden group an input weight drives
# --------------------------------------------------------------------------------------------------


class Driven(brainstate.nn.Module):
    def __init__(self, layer, n_in=4):
        super().__init__()
        self.inp = nn.Linear(n_in, N, w_init=jnp.ones((n_in, N)) * 0.3)
        self.layer = layer

    def update(self, x):
        return self.layer(self.inp(x))


def graph_of(model, x, batch):
    brainstate.nn.init_all_states(model, batch_size=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return braintrace.compile_etrace_graph(model, x)


@pytest.mark.parametrize(
    "make, states",
    [
        (lambda: nn.LIF(N), ["layer.V"]),
        (lambda: nn.LIF(N, tau_ref=2.0 * u.ms), ["layer.V"]),
        (lambda: nn.ALIF(N), ["layer.V", "layer.a"]),
        (lambda: nn.Expon(N), ["layer.g"]),
    ],
    ids=["LIF", "LIF-refractory", "ALIF", "Expon"],
)
@pytest.mark.parametrize("batch", [2, None], ids=["batched", "unbatched"])
def test_input_weight_drives_neuron_states(dt_env, make, states, batch):
    graph = graph_of(Driven(make()), jnp.zeros((*((batch,) if batch else ()), 4)), batch)
    (rel,) = graph.hidden_param_op_relations
    assert rel.primitive.name == ("etp_mm" if batch else "etp_mv")
    assert rel.param_paths["weight"] == ("inp.weight",)
    (group,) = rel.hidden_groups
    assert sorted(group.names) == sorted(states)


@pytest.mark.parametrize("cls", [nn.LeakyRateReadout, nn.LeakySpikeReadout])
@pytest.mark.parametrize("batch", [2, None], ids=["batched", "unbatched"])
def test_readout_weight_is_relation(dt_env, cls, batch):
    ro = cls(4, 3, w_init=jnp.ones((4, 3)) * 0.2)
    graph = graph_of(ro, jnp.zeros((*((batch,) if batch else ()), 4)), batch)
    (rel,) = graph.hidden_param_op_relations
    assert rel.primitive.name == ("etp_mm" if batch else "etp_mv")
    assert rel.param_paths == {"weight": ("weight",)}
    assert rel.hidden_groups[0].names == (("r",) if cls is nn.LeakyRateReadout else ("V",))


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda tau: nn.LIF(3, tau=tau), "tau"),
        (lambda tau: nn.LIF(3, tau_ref=tau), "tau_ref"),
        (lambda tau: nn.ALIF(3, tau_a=tau), "tau_a"),
        (lambda tau: nn.Expon(3, tau=tau), "tau"),
        (lambda tau: nn.LeakyRateReadout(3, 2, tau=tau, w_init=jnp.ones((3, 2))), "tau"),
        (lambda tau: nn.LeakySpikeReadout(3, 2, tau=tau, w_init=jnp.ones((3, 2))), "tau"),
    ],
    ids=["LIF", "LIF-tau_ref", "ALIF-tau_a", "Expon", "LeakyRateReadout", "LeakySpikeReadout"],
)
@pytest.mark.parametrize(
    "tau",
    [0.0 * u.ms, -2.0 * u.ms, jnp.array([1.0, -1.0, 2.0]) * u.ms, -1.0],
    ids=["zero", "negative", "one-negative", "plain-negative"],
)
def test_non_positive_time_constant(make, name, tau):
    with pytest.raises(ValueError, match=rf"`{name}` must be a positive"):
        make(tau)


def test_bad_neuron_arguments(dt_env):
    with pytest.raises(ValueError, match="spk_reset"):
        nn.LIF(3, spk_reset="zero")
    with pytest.raises(TypeError, match="spk_fun"):
        nn.ALIF(3, spk_fun="sigmoid")
    lif = nn.LIF(3)
    lif.init_state(batch_size=2)
    with pytest.raises(
        ValueError, match=r"expected an input of shape \(\.\.\., 3\).*received shape \(2, 4\)"
    ):
        lif(jnp.ones((2, 4)))
    ro = nn.LeakyRateReadout(3, 2, w_init=jnp.ones((3, 2)))
    ro.init_state(batch_size=2)
    with pytest.raises(ValueError, match=r"expected 3 input features.*with 4"):
        ro(jnp.ones((2, 4)))
