"""The multi-step rule (``vjp_method='multi-step'``, ``MultiStepData``, ``etrace_grad(window=K)``)
and the constructor keywords of the 0.2 releases, against independent references (float64).

* A window covering the sequence equals BPTT (``jax.grad`` through ``lax.scan`` of the plain step)
  for D-RTRL and pp_prop on dense, CSR and LoRA recurrences and a leaky layer.
* Windows of ``K`` steps on a tanh RNN with input and recurrent ETP weights equal a plain-``jnp``
  formula written here: exact BPTT inside each window plus ``dL_window/dh_(t0)`` contracted with
  the masked D-RTRL trace at the window's start.
* ``K = 1`` equals the single-step rule where ``D`` is the whole recurrence.
* ``MultiStepData`` under the single-step rule is ``K`` single steps (outputs stacked, gradients
  summed); ``SingleStepData`` / plain arrays are fed at every step of a window.
* ``normalize_matrix_spectrum`` rescales ``D`` to spectral radius at most 1 (checked against
  ``numpy.linalg.eigvals`` and against a plain recursion with the rescaled ``D``).
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest

import braintrace
from braintrace._algorithm.vjp_algorithm import _spectral_radius

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ALGORITHMS = {
    "d_rtrl": lambda m, **kw: braintrace.D_RTRL(m, **kw),
    "pp_prop": lambda m, **kw: braintrace.pp_prop(m, decay_or_rank=0.7, **kw),
}


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with om.float64():
        yield


MODELS = {
    "dense": lambda: om.dense_rnn(batch=2),
    "sparse": lambda: om.sparse_rnn(batch=2),
    "lora": lambda: om.lora_rnn(batch=2),
    "leaky": lambda: om.leaky_ff(batch=2),
}


def _named(grads):
    return {str(k[-1]): v for k, v in grads.items()}


@pytest.mark.parametrize("alg", list(ALGORITHMS))
@pytest.mark.parametrize("model", list(MODELS))
def test_window_over_the_sequence_is_bptt(model, alg):
    spec = MODELS[model]()
    module = om.build_module(spec)
    xs, ys = om.make_data(spec, 5)
    learner = ALGORITHMS[alg](module, vjp_method="multi-step")
    learner.compile_graph(braintrace.MultiStepData(xs))
    params = module.states(brainstate.ParamState)
    grads = brainstate.transform.grad(
        lambda: jax.vmap(om.loss_fn)(learner(braintrace.MultiStepData(xs)), ys).sum(), params
    )()
    om.assert_grads_close(_named(grads), om.bptt_grads(spec, xs, ys), tol=1e-10, what=f"{alg} {model}")
    # the sequence driver with one window equals it too
    brainstate.nn.init_all_states(module, batch_size=spec.batch)
    learner = ALGORITHMS[alg](module)
    learner.compile_graph(xs[0])
    driver = learner.etrace_grad(xs, ys, step_fn=om.loss_fn, window=xs.shape[0])
    om.assert_grads_close(_named(driver), om.bptt_grads(spec, xs, ys), tol=1e-10, what="etrace_grad window=T")


B, I, H, T = 2, 3, 4, 6


class _TanhRNN(brainstate.nn.Module):
    def __init__(self, w, u):
        super().__init__()
        self.w = brainstate.ParamState(w)
        self.u = brainstate.ParamState(u)

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

    def update(self, x):
        pre = braintrace.matmul(x, self.w.value) + braintrace.matmul(self.h.value, self.u.value)
        self.h.value = jnp.tanh(pre)
        return self.h.value


def _rnn_data(seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((I, H)) * 0.5)
    u = jnp.asarray(rng.standard_normal((H, H)) * 0.5)
    xs = jnp.asarray(rng.standard_normal((T, B, I)))
    ys = jnp.asarray(rng.standard_normal((T, B, H)))
    return w, u, xs, ys


def _window_formula(w, u, xs, ys, k):
    """Exact BPTT inside windows of ``k`` steps plus ``dL/dh_(t0)`` times the masked D-RTRL trace
    at the window's start (``D = 0`` here: every path from ``h_(t-1)`` passes an ETP op)."""
    h = jnp.zeros((B, H))
    ew, eu = jnp.zeros((B, I, H)), jnp.zeros((B, H, H))
    gw, gu = jnp.zeros_like(w), jnp.zeros_like(u)
    steps = xs.shape[0]
    for s in range(0, steps, k):
        stop = min(s + k, steps)

        def window_loss(w_, u_, h0):
            h_, acc = h0, 0.0
            for t in range(s, stop):
                h_ = jnp.tanh(xs[t] @ w_ + h_ @ u_)
                acc = acc + om.loss_fn(h_, ys[t])
            return acc

        dw, du, dh0 = jax.grad(window_loss, (0, 1, 2))(w, u, h)
        gw = gw + dw + jnp.einsum("bo,bio->io", dh0, ew)
        gu = gu + du + jnp.einsum("bo,bjo->jo", dh0, eu)
        for t in range(s, stop):
            new = jnp.tanh(xs[t] @ w + h @ u)
            df = 1 - new**2
            ew = xs[t][:, :, None] * df[:, None, :]
            eu = h[:, :, None] * df[:, None, :]
            h = new
    return gw, gu


@pytest.mark.parametrize("k", [1, 2, 4])
def test_windows_equal_the_plain_formula(k):
    w, u, xs, ys = _rnn_data()
    model = _TanhRNN(w, u)
    brainstate.nn.init_all_states(model, batch_size=B)
    alg = braintrace.D_RTRL(model, vjp_method="multi-step")
    alg.compile_graph(xs[0])
    params = model.states(brainstate.ParamState)
    total = {key: 0.0 for key in params}
    for s in range(0, T, k):
        window = braintrace.MultiStepData(xs[s : s + k])
        g = brainstate.transform.grad(
            lambda: jax.vmap(om.loss_fn)(alg(window), ys[s : s + k]).sum(), params
        )()
        total = {key: total[key] + g[key] for key in params}
    gw, gu = _window_formula(w, u, xs, ys, k)
    assert om.rel_err(total[("w",)], gw) < 1e-10
    assert om.rel_err(total[("u",)], gu) < 1e-10
    # the sequence driver, with a remainder window when k does not divide T
    model = _TanhRNN(w, u)
    brainstate.nn.init_all_states(model, batch_size=B)
    alg = braintrace.D_RTRL(model, vjp_method="multi-step" if k == 1 else "single-step")
    alg.compile_graph(xs[0])
    driver = alg.etrace_grad(xs, ys, step_fn=om.loss_fn, window=k)
    assert om.rel_err(driver[("w",)], gw) < 1e-10 and om.rel_err(driver[("u",)], gu) < 1e-10


def test_windows_with_a_remainder():
    w, u, xs, ys = _rnn_data(1)
    alg = braintrace.D_RTRL(_fresh(w, u))
    alg.compile_graph(xs[0])
    got = alg.etrace_grad(xs, ys, step_fn=om.loss_fn, window=4)  # windows of 4 and 2
    gw, gu = _window_formula(w, u, xs, ys, 4)
    assert om.rel_err(got[("w",)], gw) < 1e-10 and om.rel_err(got[("u",)], gu) < 1e-10


def _fresh(w, u):
    model = _TanhRNN(w, u)
    brainstate.nn.init_all_states(model, batch_size=B)
    return model


def test_one_step_windows_equal_the_single_step_rule_where_d_is_the_recurrence():
    spec = om.leaky_ff(batch=2)
    xs, ys = om.make_data(spec, 5)
    module = om.build_module(spec)
    single, _ = om.run_online(braintrace.D_RTRL(module), module, xs, ys)
    module = om.build_module(spec)
    multi, _ = om.run_online(braintrace.D_RTRL(module, vjp_method="multi-step"), module, xs, ys)
    om.assert_grads_close(multi, single, tol=1e-10, what="K=1 vs single-step")


def test_multistep_data_under_the_single_step_rule_is_k_single_steps():
    w, u, xs, ys = _rnn_data(2)
    alg = braintrace.D_RTRL(_fresh(w, u))
    alg.compile_graph(xs[0])
    params = alg.model.states(brainstate.ParamState)
    got = brainstate.transform.grad(
        lambda: jax.vmap(om.loss_fn)(alg(braintrace.MultiStepData(xs)), ys).sum(), params, return_value=True
    )
    grads, value = got()
    ref = braintrace.D_RTRL(_fresh(w, u)).compile_graph(xs[0])
    want, losses = ref.etrace_grad(xs, ys, step_fn=om.loss_fn, return_value=True)
    assert om.rel_err(grads[("w",)], want[("w",)]) < 1e-12 and om.rel_err(grads[("u",)], want[("u",)]) < 1e-12
    assert abs(float(value) - float(losses.sum())) < 1e-10


class _TwoInputs(brainstate.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = brainstate.ParamState(w)

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

    def update(self, x, drive):
        self.h.value = 0.8 * self.h.value + braintrace.matmul(x, self.w.value) + drive
        return self.h.value


@pytest.mark.parametrize("wrap", [lambda a: a, braintrace.SingleStepData], ids=["plain", "SingleStepData"])
def test_single_step_arguments_are_fed_at_every_step(wrap):
    w, _, xs, ys = _rnn_data(3)
    drive = jnp.linspace(-1, 1, B * H).reshape(B, H)
    model = _TwoInputs(w)
    brainstate.nn.init_all_states(model, batch_size=B)
    alg = braintrace.D_RTRL(model, vjp_method="multi-step")
    alg.compile_graph(braintrace.MultiStepData(xs), wrap(drive))
    out = alg(braintrace.MultiStepData(xs), wrap(drive))
    h, want = jnp.zeros((B, H)), []
    for t in range(T):
        h = 0.8 * h + xs[t] @ w + drive
        want.append(h)
    assert out.shape == (T, B, H)
    assert om.rel_err(out, jnp.stack(want)) < 1e-12


def test_window_inputs_of_different_lengths_are_refused():
    w, u, xs, _ = _rnn_data()
    model = _TwoInputs(w)
    brainstate.nn.init_all_states(model, batch_size=B)
    alg = braintrace.D_RTRL(model, vjp_method="multi-step")
    alg.compile_graph(xs[0], xs[0] @ w)
    with pytest.raises(ValueError, match="same number of steps"):
        alg(braintrace.MultiStepData(xs), braintrace.MultiStepData((xs @ w)[:3]))


# ------------------------------------------------------------------------------------------------
# Constructor keywords
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", list(ALGORITHMS))
def test_published_keywords_are_accepted(alg):
    w, u, xs, ys = _rnn_data()
    kw = dict(name="learner", fast_solve=False, mode=brainstate.mixin.Batching(), vjp_method="single-step")
    learner = ALGORITHMS[alg](_fresh(w, u), **kw)
    assert learner.vjp_method == "single-step" and isinstance(learner.mode, brainstate.mixin.Batching)
    learner.compile_graph(xs[0])
    fast = ALGORITHMS[alg](_fresh(w, u)).compile_graph(xs[0])
    a = learner.etrace_grad(xs, ys, step_fn=om.loss_fn)
    b = fast.etrace_grad(xs, ys, step_fn=om.loss_fn)
    assert all(om.rel_err(a[k], b[k]) < 1e-12 for k in a)  # fast_solve changes nothing here
    with pytest.raises(ValueError, match="vjp_method"):
        ALGORITHMS[alg](_fresh(w, u), vjp_method="two-step")
    with pytest.raises(TypeError, match="mode"):
        ALGORITHMS[alg](_fresh(w, u), mode="batching")
    with pytest.raises(TypeError, match="normalize_matrix_spectrum"):
        ALGORITHMS[alg](_fresh(w, u), normalize_matrix_spectrum="yes")


def test_d_rtrl_accepts_the_published_positional_order():
    w, u, xs, _ = _rnn_data()
    alg = braintrace.D_RTRL(_fresh(w, u), "name", "multi-step", True, None, True)
    assert alg.vjp_method == "multi-step" and alg.trace_dtype is None


def test_spectral_radius_matches_eigvals():
    rng = np.random.default_rng(0)
    for n in (1, 2):
        d = rng.standard_normal((50, n, n)) * 1.5
        want = np.abs(np.linalg.eigvals(d)).max(-1)
        assert np.allclose(np.asarray(_spectral_radius(jnp.asarray(d))), want, rtol=1e-12)
    d = rng.standard_normal((20, 3, 3))
    bound = np.asarray(_spectral_radius(jnp.asarray(d)))
    assert np.all(bound >= np.abs(np.linalg.eigvals(d)).max(-1) - 1e-12)


class _Unstable(brainstate.nn.Module):
    def __init__(self, w, a):
        super().__init__()
        self.w = brainstate.ParamState(w)
        self.a = a

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

    def update(self, x):
        self.h.value = self.a * self.h.value + braintrace.matmul(x, self.w.value)
        return self.h.value


@pytest.mark.parametrize("a", [0.5, -1.5, 2.0])
def test_normalize_matrix_spectrum_rescales_d(a):
    w, _, xs, ys = _rnn_data(4)
    model = _Unstable(w, a)
    brainstate.nn.init_all_states(model, batch_size=B)
    alg = braintrace.D_RTRL(model, normalize_matrix_spectrum=True)
    alg.compile_graph(xs[0])
    got = alg.etrace_grad(xs, ys, step_fn=om.loss_fn)[("w",)]
    d = a / max(1.0, abs(a))  # the rescaled per-unit Jacobian
    h, eps, want = jnp.zeros((B, H)), jnp.zeros((B, I, H)), jnp.zeros_like(w)
    for t in range(T):
        h = a * h + xs[t] @ w
        eps = d * eps + xs[t][:, :, None]
        want = want + jnp.einsum("bo,bio->io", h - ys[t], eps)
    assert om.rel_err(got, want) < 1e-12


def test_compiler_and_algorithm_keywords_of_newer_releases():
    w, u, xs, _ = _rnn_data()
    model = _fresh(w, u)
    graph = braintrace.compile_etrace_graph(
        model, xs[0], include_hidden_perturb=True, snap_max_jacobian_elements=10
    )
    assert isinstance(graph.hidden_perturb, braintrace.HiddenPerturbation)
    assert braintrace.compile_etrace_graph(model, xs[0], include_hidden_perturb=False).hidden_perturb is None
    for key, value in (("include_recurrent_mixing", True), ("sparse_n", 2)):
        with pytest.raises(NotImplementedError, match=key):
            braintrace.compile_etrace_graph(model, xs[0], **{key: value})
    for key in ("control_flow", "config", "random_feedback_key"):
        for alg in ALGORITHMS.values():
            with pytest.raises(TypeError, match=key):  # each is implemented; a wrong type is named
                alg(_fresh(w, u), **{key: object()})
    policy = braintrace.ControlFlowPolicy(scan_unroll_limit=4)
    assert braintrace.D_RTRL(_fresh(w, u), control_flow=policy).compile_graph(xs[0]).is_compiled
    assert (
        braintrace.D_RTRL(_fresh(w, u), snap_max_jacobian_elements=10, control_flow=None).vjp_method
        == "single-step"
    )
