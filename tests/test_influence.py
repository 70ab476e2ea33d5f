"""The influence-matrix algorithms: RTRL, SnAp-n and UORO (``braintrace/_algorithm/influence.py``).

Oracles, all float64:

* RTRL: BPTT, ``jax.grad`` of the loss summed over the unrolled sequence: a plain-``jnp`` step for
  the dense RNN, the modules themselves called in a Python loop under ``brainstate.transform.grad``
  for the GRU and the spiking network;
* SnAp-n: a plain-``jnp`` recursion ``M_t = mask ⊙ (J_t M_{t-1} + I_t)`` with ``J`` and ``I`` from
  ``jax.jacfwd`` of the plain step per batch row and the mask from the patterns of ``J`` and ``I``
  at random weights (numpy matrix powers);
* UORO: the mean of its gradient over many projection keys against RTRL, within five standard
  errors of the sample.
"""

from __future__ import annotations

import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import braintrace
from braintrace import DiagnosticKind
from braintrace._compiler.diagnostics import ETraceCompilationWarning

B, T = 2, 4


@pytest.fixture(autouse=True)
def _float64():
    old_x64, old_precision = bool(jax.config.jax_enable_x64), brainstate.environ.get_precision()
    jax.config.update("jax_enable_x64", True)
    brainstate.environ.set(precision=64)
    try:
        with brainstate.environ.context(dt=1.0 * u.ms):
            yield
    finally:
        brainstate.environ.set(precision=old_precision)
        jax.config.update("jax_enable_x64", old_x64)


def randn(seed, *shape, scale=1.0):
    """Standard normal values from numpy (no random-number program for XLA to compile)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale)


def rel_err(a, b) -> float:
    a = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def assert_grads_equal(got, want, tol=1e-10, what=""):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        assert rel_err(got[k], want[k]) < tol, f"{what} {k}: relative error {rel_err(got[k], want[k]):.2e}"


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def sq_loss(out, y):
    return jnp.sum((out - y) ** 2)


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------


def dense_step(p, h, x, mm):
    """The dense tanh RNN, with ``mm`` the weight product (braintrace.matmul or a plain one)."""
    return jnp.tanh(mm(h, p["w"]) + mm(x, p["u"], p["b"]))


def plain_mm(x, w, b=None):
    return x @ w if b is None else x @ w + b


class DenseRNN(brainstate.nn.Module):
    """``h = tanh(h W + x U + b)`` (W, U, b traced), ``out = h V`` (V plain: within-step gradient)."""

    def __init__(self, n=4, i=3, o=2, seed=0):
        super().__init__()
        self.w = brainstate.ParamState(randn(seed, n, n, scale=0.7))
        self.u = brainstate.ParamState(randn(seed + 1, i, n, scale=0.7))
        self.b = brainstate.ParamState(randn(seed + 2, n, scale=0.2))
        self.v = brainstate.ParamState(randn(seed + 3, n, o))
        self.n = n

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, self.n)))

    def params(self):
        return {"w": self.w.value, "u": self.u.value, "b": self.b.value, "v": self.v.value}

    def update(self, x):
        self.h.value = dense_step(self.params(), self.h.value, x, braintrace.matmul)
        return self.h.value @ self.v.value


@jax.jit
@jax.grad
def _dense_bptt(p, xs, ys, keep):
    """The loss summed over the sequence, ``h`` multiplied by ``keep[t]`` (per row) before step ``t``."""
    h, total = jnp.zeros((xs.shape[1], p["w"].shape[0])), 0.0
    for t in range(xs.shape[0]):
        h = dense_step(p, h * keep[t][:, None], xs[t], plain_mm)
        total = total + sq_loss(h @ p["v"], ys[t])
    return total


def dense_bptt(model, xs, ys, resets=()):
    """BPTT of the dense RNN in plain jnp; ``resets``: ``(step, row)`` whose hidden value is set to
    zero (by hand, no gradient through it) before that step."""
    keep = np.ones(xs.shape[:2])
    for step, row in resets:
        keep[step, row] = 0.0
    return {(k,): v for k, v in _dense_bptt(model.params(), xs, ys, jnp.asarray(keep)).items()}


class GRUNet(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = braintrace.nn.GRUCell(3, 4, w_init=jnp.zeros((7, 4)))
        for seed, gate in enumerate((self.cell.Wr, self.cell.Wz, self.cell.Wh)):
            gate.weight.value = {"weight": randn(30 + seed, 7, 4, scale=0.6), "bias": randn(33 + seed, 4)}
        self.out = braintrace.nn.Linear(4, 2, w_init=randn(36, 4, 2))

    def update(self, x):
        return self.out(self.cell(x))


class SpikingNet(brainstate.nn.Module):
    """LIF neurons fed by a Linear layer of the input and a Linear layer of their previous spikes."""

    def __init__(self):
        super().__init__()
        brainstate.random.seed(4)
        self.inp = braintrace.nn.Linear(3, 4, w_init=randn(40, 3, 4, scale=1.5))
        self.rec = braintrace.nn.Linear(4, 4, w_init=randn(41, 4, 4))
        self.lif = braintrace.nn.LIF(4, tau=3.0 * u.ms, V_th=0.6)

    def update(self, x):
        spikes = self.lif.get_spike()
        return self.lif(self.inp(x) + self.rec(spikes))


def module_bptt(model, xs, ys):
    """BPTT through the module itself: every step called in one ``brainstate.transform.grad``."""
    brainstate.nn.init_all_states(model, batch_size=xs.shape[1])
    params = model.states(brainstate.ParamState)

    def total():
        return sum(sq_loss(model(xs[t]), ys[t]) for t in range(xs.shape[0]))

    grads = brainstate.transform.jit(brainstate.transform.grad(total, params))()
    brainstate.nn.init_all_states(model, batch_size=xs.shape[1])
    return grads


def data(i, o, seed=1, steps=T, scale=1.0):
    return randn(100 + seed, steps, B, i, scale=scale), randn(200 + seed, steps, B, o)


def per_step_fn(alg):
    """One step of the algorithm under ``brainstate.transform.grad``, ``jit``-compiled."""
    params = alg.model.states(brainstate.ParamState)
    return brainstate.transform.jit(brainstate.transform.grad(lambda x, y: sq_loss(alg(x), y), params))


def per_step_grads(step, xs, ys, before_step=None):
    """``step`` (:func:`per_step_fn`) at every step, summed; ``before_step(t)`` runs first."""
    total = None
    for t in range(xs.shape[0]):
        if before_step is not None:
            before_step(t)
        g = step(xs[t], ys[t])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total


def summed(alg, xs, ys, **kwargs):
    return alg.etrace_grad(xs, ys, step_fn=sq_loss, reduction="sum", **kwargs)


# ------------------------------------------------------------------------------------------------
# RTRL
# ------------------------------------------------------------------------------------------------


def test_rtrl_equals_bptt_on_a_dense_rnn_per_step_through_etrace_grad_and_in_windows():
    model = DenseRNN()
    brainstate.nn.init_all_states(model, batch_size=B)
    xs, ys = data(3, 2)
    want = dense_bptt(model, xs, ys)
    alg = braintrace.RTRL(model).compile_graph(xs[0])
    assert alg.executor.rows == B  # the batch rows are independent: one J per row
    step = per_step_fn(alg)
    assert_grads_equal(per_step_grads(step, xs, ys), want, what="per step")
    assert_grads_equal(summed(alg, xs, ys), want, what="etrace_grad")
    # the multi-step rule: exact inside a window, M at the window's start carries the rest
    assert_grads_equal(
        alg.etrace_grad(xs, ys, step_fn=sq_loss, reduction="sum", window=2), want, what="windows of 2"
    )

    # row 0's hidden value set to zero by hand before step 3: its influence restarts (row 1's not)
    def reset_row_0(t):
        if t == 3:
            model.h.value = model.h.value.at[0].set(0.0)

    model.h.value = jnp.zeros_like(model.h.value)  # the same state objects: `step` keeps them
    alg.reset_state()
    restarted = per_step_grads(step, xs, ys, before_step=reset_row_0)
    assert_grads_equal(restarted, dense_bptt(model, xs, ys, resets=[(3, 0)]), what="restart")
    assert rel_err(restarted[("w",)], want[("w",)]) > 1e-3  # the reset matters


@pytest.mark.parametrize("net, sizes", [(GRUNet, (3, 2)), (SpikingNet, (3, 4))], ids=["gru", "lif"])
def test_rtrl_equals_bptt_on_braintrace_nn_models(net, sizes):
    model = net()
    xs, ys = data(*sizes, seed=2, scale=1.5)
    want = module_bptt(model, xs, ys)
    alg = quiet(braintrace.RTRL(model).compile_graph, xs[0])
    assert_grads_equal(per_step_grads(per_step_fn(alg), xs, ys), want, what="per step")
    brainstate.nn.init_all_states(model, batch_size=B)
    assert_grads_equal(summed(alg, xs, ys), want, what="etrace_grad")
    assert all(float(jnp.abs(v).max()) > 1e-4 for v in jax.tree.leaves(want))  # no trivial gradient


class TwoStates(brainstate.nn.Module):
    """Two states in one ``HiddenGroupState``, each with a traced weight, and an output that reads
    the previous hidden value besides the new one (a path to the loss that avoids ``h_t``)."""

    def __init__(self):
        super().__init__()
        self.w = brainstate.ParamState(randn(13, 3, 3))
        self.u = brainstate.ParamState(randn(14, 3, 3, scale=0.5))

    def init_state(self, batch_size=None, **kw):
        self.s = brainstate.HiddenGroupState(jnp.zeros((batch_size, 3, 2)))

    def update(self, x):
        v, a = self.s.value[..., 0], self.s.value[..., 1]
        v_new = jnp.tanh(braintrace.matmul(v, self.w.value) + x - a)
        a_new = 0.8 * a + 0.3 * v_new + 0.1 * braintrace.matmul(a, self.u.value)
        self.s.value = jnp.stack([v_new, a_new], -1)
        return v_new + 0.5 * v


def test_rtrl_equals_bptt_with_group_states_and_an_output_reading_the_previous_value():
    model = TwoStates()
    xs, ys = data(3, 3, seed=14)
    want = module_bptt(model, xs, ys)
    alg = braintrace.RTRL(model).compile_graph(xs[0])
    assert alg.executor.reads_old and alg.executor.num_hidden == 6
    assert_grads_equal(summed(alg, xs, ys), want)


def test_rtrl_does_not_report_what_a_per_unit_jacobian_leaves_out():
    """D_RTRL records the GRU's cross-layer and recurrent-weight approximations and leaves the reset
    gate's weights untraced; RTRL is exact there: it records none of them and warns only about the
    readout (which no algorithm traces: its within-step gradient is exact)."""
    per_unit = {
        DiagnosticKind.NON_DIAGONAL_PATH,
        DiagnosticKind.CROSS_LAYER_INFLUENCE,
        DiagnosticKind.RECURRENT_ETP_WEIGHT,
        DiagnosticKind.CROSS_GROUP_COUPLING,
    }
    model = GRUNet()
    brainstate.nn.init_all_states(model, batch_size=B)
    x = jnp.zeros((B, 3))
    d_rtrl = quiet(braintrace.D_RTRL(model).compile_graph, x)
    assert {r.kind for r in d_rtrl.graph.records} & per_unit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rtrl = braintrace.RTRL(model).compile_graph(x)
    assert not {r.kind for r in rtrl.graph.records} & per_unit
    untraced = {r.subject for r in rtrl.graph.records if r.kind is DiagnosticKind.PLAIN_PARAMETER}
    assert untraced == {("out.weight",)}
    assert {r.subject for r in d_rtrl.graph.records if r.kind is DiagnosticKind.PLAIN_PARAMETER} == {
        ("cell.Wr.weight",),
        ("out.weight",),
    }
    messages = [str(w.message) for w in caught if issubclass(w.category, ETraceCompilationWarning)]
    assert len(messages) == 1 and "['out.weight']" in messages[0]


# ------------------------------------------------------------------------------------------------
# SnAp-n
# ------------------------------------------------------------------------------------------------


class Chain(brainstate.nn.Module):
    """Three leaky tanh layers, each reading the previous layer's value of the last step: the input
    weights reach layer 1 in one step, layer 2 in two and layer 3 in three (dependency depth 3)."""

    def __init__(self, n=3, i=2, seed=6):
        super().__init__()
        self.u1 = brainstate.ParamState(randn(seed, i, n))
        self.u2 = brainstate.ParamState(randn(seed + 1, n, n))
        self.u3 = brainstate.ParamState(randn(seed + 2, n, n))
        self.n = n

    def init_state(self, batch_size=None, **kw):
        self.h1 = brainstate.HiddenState(jnp.zeros((batch_size, self.n)))
        self.h2 = brainstate.HiddenState(jnp.zeros((batch_size, self.n)))
        self.h3 = brainstate.HiddenState(jnp.zeros((batch_size, self.n)))

    def update(self, x):
        p = {"u1": self.u1.value, "u2": self.u2.value, "u3": self.u3.value}
        h = (self.h1.value, self.h2.value, self.h3.value)
        self.h1.value, self.h2.value, self.h3.value = chain_step(p, h, x, braintrace.matmul)
        return self.h3.value + self.h1.value


def chain_step(p, h, x, mm):
    h1, h2, h3 = h
    return (
        jnp.tanh(mm(x, p["u1"]) + 0.5 * h1),
        jnp.tanh(mm(h1, p["u2"]) + 0.5 * h2),
        jnp.tanh(mm(h2, p["u3"]) + 0.5 * h3),
    )


def snap_oracle(model, xs, ys):
    """The masked influence recursion in plain jnp, per batch row: ``grads(n)`` is the gradient
    summed over the sequence under SnAp-``n``'s mask, ``masks[n - 1]`` that mask."""
    names = ("u1", "u2", "u3")
    p0 = {k: getattr(model, k).value for k in names}
    shapes = [p0[k].shape for k in names]
    parts = np.cumsum([0, *[int(np.prod(s)) for s in shapes]])
    nh, nt = 3 * model.n, int(parts[-1])

    def row_step(h, th, x):  # one batch row: h (3n,), θ (P,), x (i,)
        p = {k: th[parts[j] : parts[j + 1]].reshape(shapes[j]) for j, k in enumerate(names)}
        hs = (h[None, : model.n], h[None, model.n : 2 * model.n], h[None, 2 * model.n :])
        return jnp.concatenate(chain_step(p, hs, x[None], plain_mm), axis=1)[0]

    jac_h = jax.vmap(jax.jacfwd(row_step, argnums=0), in_axes=(0, None, 0))
    jac_th = jax.vmap(jax.jacfwd(row_step, argnums=1), in_axes=(0, None, 0))
    patterns = jax.jit(lambda h, th, x: (jnp.any(jac_h(h, th, x) != 0, 0), jnp.any(jac_th(h, th, x) != 0, 0)))
    rng = np.random.default_rng(0)
    pj, pi = np.zeros((nh, nh), bool), np.zeros((nh, nt), bool)
    for _ in range(2):  # patterns at random values
        j, i = patterns(rng.standard_normal((B, nh)), rng.standard_normal(nt), rng.standard_normal((B, 2)))
        pj, pi = pj | np.asarray(j), pi | np.asarray(i)
    masks = [pi]
    for _ in range(3):
        masks.append(((pj | np.eye(nh, dtype=bool)).astype(float) @ masks[-1].astype(float)) > 0)

    @jax.jit
    def run(th, mask):
        def body(carry, xy):
            h, m, grad = carry
            x, y = xy
            m = mask * (jnp.einsum("rij,rjp->rip", jac_h(h, th, x), m) + jac_th(h, th, x))
            h = jax.vmap(row_step, in_axes=(0, None, 0))(h, th, x)
            dl_dh = jax.grad(lambda hh: sq_loss(hh[:, 2 * model.n :] + hh[:, : model.n], y))(h)
            return (h, m, grad + jnp.einsum("ri,rip->p", dl_dh, m)), None

        init = (jnp.zeros((B, nh)), jnp.zeros((B, nh, nt)), jnp.zeros(nt))
        return jax.lax.scan(body, init, (xs, ys))[0][2]

    th0 = jnp.concatenate([p0[k].ravel() for k in names])

    def grads(n):
        g = run(th0, jnp.asarray(masks[n - 1], th0.dtype))
        return {(k,): g[parts[j] : parts[j + 1]].reshape(shapes[j]) for j, k in enumerate(names)}

    return grads, masks


def test_snap_equals_a_masked_influence_recursion():
    model = Chain()
    brainstate.nn.init_all_states(model, batch_size=B)
    xs, ys = data(2, 3, seed=7, scale=1.0)
    grads, masks = snap_oracle(model, xs, ys)
    assert not np.array_equal(masks[1], masks[2]) and np.array_equal(masks[2], masks[3])  # depth 3
    full = grads(3)
    for n in (1, 2):
        want = grads(n)
        assert rel_err(want[("u1",)], full[("u1",)]) > 1e-3  # the mask drops something on this model
        brainstate.nn.init_all_states(model, batch_size=B)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            alg = braintrace.SnAp(model, n=n).compile_graph(xs[0])
        assert alg.dependency_depth == 3
        np.testing.assert_array_equal(alg.snap_mask, masks[n - 1])
        # stored at the mask's entries where that is smaller (n = 1: one entry per column)
        assert alg.etrace.value["influence"].shape == ((B, 24, 1) if n == 1 else (B, 9, 24))
        assert_grads_equal(summed(alg, xs, ys), want, what=f"SnAp-{n}")
        # one record per parameter whose entries are dropped, one warning for the compile
        dropped = {r.subject for r in alg.graph.records if r.kind is DiagnosticKind.INFLUENCE_APPROXIMATION}
        assert dropped == ({("u1",), ("u2",)} if n == 1 else {("u1",)})
        assert len([w for w in caught if "SnAp-" in str(w.message)]) == 1


def test_snap_at_the_dependency_depth_equals_rtrl_and_records_nothing():
    """A dense recurrent weight reaches every unit in two steps: SnAp-2 keeps every entry."""
    model = DenseRNN()
    xs, ys = data(3, 2, seed=8)
    want = dense_bptt(model, xs, ys)
    brainstate.nn.init_all_states(model, batch_size=B)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        snap = braintrace.SnAp(model, n=2).compile_graph(xs[0])
    assert snap.dependency_depth == 2 and snap.snap_mask.all()
    assert not [r for r in snap.graph.records if r.kind is DiagnosticKind.INFLUENCE_APPROXIMATION]
    assert not [w for w in caught if issubclass(w.category, ETraceCompilationWarning)]
    assert_grads_equal(summed(snap, xs, ys), want)


# ------------------------------------------------------------------------------------------------
# UORO
# ------------------------------------------------------------------------------------------------


def test_uoro_is_unbiased_for_rtrl_and_one_sample_is_not_rtrl():
    """Sixteen identical batch rows, each with its own signs: one run averages sixteen estimates.
    RTRL's gradient is BPTT's (tested above)."""
    rows, steps, keys = 16, 3, 300
    model = DenseRNN(n=3, i=2, seed=9)
    xs = jnp.broadcast_to(randn(10, steps, 1, 2), (steps, rows, 2))
    ys = jnp.broadcast_to(randn(11, steps, 1, 2), (steps, rows, 2))
    want = dense_bptt(model, xs, ys)
    brainstate.nn.init_all_states(model, batch_size=rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alg = braintrace.UORO(model).compile_graph(xs[0])
    records = {r.subject for r in alg.graph.records if r.kind is DiagnosticKind.INFLUENCE_APPROXIMATION}
    assert records == {("w",), ("u",), ("b",)}  # the plain readout v is not estimated
    assert len([w for w in caught if "UORO" in str(w.message)]) == 1
    assert alg.executor.rows == rows
    assert alg.etrace.value["h_tilde"].shape == (rows, 3)
    assert alg.etrace.value["theta_tilde"].shape == (rows, 3 * 3 + 2 * 3 + 3)
    samples = []
    for key in range(keys):
        alg.projection_key = key
        samples.append(summed(alg, xs, ys))
    for k in [("w",), ("u",), ("b",)]:
        a = np.stack([np.asarray(s[k]) for s in samples])
        mean, bound = a.mean(0), 5 * np.linalg.norm(a.std(0, ddof=1)) / np.sqrt(keys)
        exact = np.asarray(want[k])
        assert np.linalg.norm(mean - exact) < bound, (k, np.linalg.norm(mean - exact), bound)
        assert bound < 0.4 * np.linalg.norm(exact)  # a bias of 40% would show
        assert np.linalg.norm(a[0] - exact) > 1e-3 * np.linalg.norm(exact)  # one sample is not RTRL
    np.testing.assert_allclose(samples[0][("v",)], want[("v",)], rtol=1e-12)  # the plain readout is exact

    # called per step under brainstate.transform.grad: the same estimate as the driver's, per key
    alg.projection_key = 7
    driven = summed(alg, xs, ys)
    model.h.value = jnp.zeros_like(model.h.value)
    alg.reset_state()
    assert_grads_equal(per_step_grads(per_step_fn(alg), xs, ys), driven, tol=1e-12)
    assert_grads_equal(summed(alg, xs, ys), driven, tol=1e-15)  # a key repeats its run


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_memory_limit_names_the_memory_needed_and_the_limit():
    model = DenseRNN()
    brainstate.nn.init_all_states(model, batch_size=1)  # one row (and no row probe to compile)
    x = jnp.zeros((1, 3))
    with pytest.raises(ValueError, match=r"max_influence_bytes.=1000 .*UORO") as err:
        braintrace.RTRL(model, max_influence_bytes=1000).compile_graph(x)
    # M: 1 row x 4 hidden x 32 weights x 8 bytes
    assert "1 row(s) x 4 hidden elements x 32 weight elements) needs 1.0 KiB" in str(err.value)
    with pytest.raises(
        ValueError, match=r"SnAp: M at the mask's entries \(1 row\(s\) x 32 weight elements x 1 "
    ):
        braintrace.SnAp(model, n=1, max_influence_bytes=500).compile_graph(x)
    with pytest.raises(ValueError, match=r"J \(1 row\(s\) x 4 x 4 = 16 elements\), more than .*=15"):
        braintrace.RTRL(model, snap_max_jacobian_elements=15).compile_graph(x)


@pytest.mark.parametrize(
    "n, error, match",
    [
        (0, ValueError, "`n` must be an int >= 1"),
        (-2, ValueError, "got -2"),
        (True, TypeError, "bool"),
        (1.5, TypeError, "`n` must be an int"),
        ("2", TypeError, "str"),
    ],
)
def test_bad_n(n, error, match):
    with pytest.raises(error, match=match):
        braintrace.SnAp(DenseRNN(), n=n)


def test_combinations_that_do_not_exist_fail_at_construction():
    model = DenseRNN()
    with pytest.raises(ValueError, match="needs recurrence_scope='full'"):
        braintrace.InfluenceVjpAlgorithm(model, recurrence_scope=2, trace_layout="projection")
    with pytest.raises(ValueError, match="'dense' or 'projection'"):
        braintrace.InfluenceVjpAlgorithm(model, trace_layout="sparse")
    with pytest.raises(ValueError, match="'full' or an int"):
        braintrace.InfluenceVjpAlgorithm(model, recurrence_scope="snap")
    with pytest.raises(TypeError, match="max_influence_bytes"):
        braintrace.RTRL(model, max_influence_bytes=1e9)
    with pytest.raises(TypeError, match="projection_key"):
        braintrace.UORO(model, projection_key="seed")
    with pytest.raises(ValueError, match="projection_eps"):
        braintrace.UORO(model, projection_eps=-1.0)


def test_the_presets_are_points_on_the_learning_rule_axes():
    model = DenseRNN()
    cfg = braintrace.ETraceConfig
    assert braintrace.RTRL(model).config == cfg(recurrence_scope="full")
    assert braintrace.SnAp(model, n=3).config == cfg(recurrence_scope="sparse_n", sparse_n=3)
    assert braintrace.SnAp(model, n=1).config.recurrence_scope == "coupled"  # the per-unit block of J
    assert braintrace.UORO(model).config == cfg(
        trace_factorization="random_projection", recurrence_scope="full"
    )
    with pytest.raises(ValueError, match="not this algorithm's coordinates"):
        braintrace.RTRL(model, config=cfg(recurrence_scope="sparse_n", sparse_n=2))
