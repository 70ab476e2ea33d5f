"""The presets on the learning-rule axes: ``ThreeFactor`` (against symmetric ``D_RTRL`` with the
modulator set to ``dL_t/dh_t``, and zero), ``OSTLRecurrent`` / ``OSTLFeedforward`` (records and a
plain-NumPy oracle), ``braintrace.compile``'s names and configs, the helpers
``FixedRandomFeedback`` / ``KappaFilter``, and every preset's errors (float64)."""

from __future__ import annotations

import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace
from braintrace import ETraceConfig
from braintrace._algorithm.compiling import resolve_algorithm

B, I, H, T, A = 2, 3, 4, 6, 0.8


class Leaky(brainstate.nn.Module):
    """``h_t = A h_{t-1} + x_t W + b``, output ``g * tanh(h_t)`` (``g`` a plain parameter)."""

    def __init__(self, w, b, g):
        super().__init__()
        self.w, self.b = brainstate.ParamState(jnp.asarray(w)), brainstate.ParamState(jnp.asarray(b))
        self.g = brainstate.ParamState(jnp.asarray(g))

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

    def update(self, x):
        self.h.value = A * self.h.value + braintrace.matmul(x, self.w.value, self.b.value)
        return self.g.value * jnp.tanh(self.h.value)


class Recurrent(brainstate.nn.Module):
    """``h_t = tanh(h_{t-1} W_rec + x_t W_in)``: a recurrent ETP weight."""

    def __init__(self, w_in, w_rec):
        super().__init__()
        self.w_in, self.w_rec = (
            brainstate.ParamState(jnp.asarray(w_in)),
            brainstate.ParamState(jnp.asarray(w_rec)),
        )

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

    def update(self, x):
        self.h.value = jnp.tanh(
            braintrace.matmul(self.h.value, self.w_rec.value) + braintrace.matmul(x, self.w_in.value)
        )
        return self.h.value


@pytest.fixture(autouse=True)
def x64():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with brainstate.environ.context(precision=64):
            yield


def problem(seed=0):
    rng = np.random.default_rng(seed)
    w, b, g = rng.normal(size=(I, H)), rng.normal(size=H), rng.normal(size=H)
    xs, ys = rng.normal(size=(T, B, I)), rng.normal(size=(T, B, H))
    hs, h = [], np.zeros((B, H))
    for t in range(T):
        h = A * h + xs[t] @ w + b
        hs.append(h)
    hs = np.stack(hs)
    dldh = 2 * (g * np.tanh(hs) - ys) * g * (1 - np.tanh(hs) ** 2)  # dL_t/dh_t, plain NumPy
    return (w, b, g), jnp.asarray(xs), jnp.asarray(ys), dldh


def mse(out, y):
    return jnp.sum((out - y) ** 2)


def as_np(g):
    return {k[0]: np.asarray(v) for k, v in g.items()}


# --------------------------------------------------------------------------------------------------
# ThreeFactor
# --------------------------------------------------------------------------------------------------


def test_three_factor_with_dl_dh_is_d_rtrl_and_zero_gives_zero():
    wbg, xs, ys, dldh = problem(1)
    want = as_np(
        braintrace.compile(Leaky(*wbg), "d_rtrl", xs[0], batch_size=B).etrace_grad(xs, ys, step_fn=mse)
    )
    learner = braintrace.compile(Leaky(*wbg), "three_factor", xs[0], batch_size=B)
    assert isinstance(learner, braintrace.ThreeFactor) and learner.learning_signal == "modulatory"

    def step(x, m, y):
        return mse(learner(x, modulator=m), y)

    got = as_np(learner.etrace_grad(xs, jnp.asarray(dldh), ys, step_fn=step, reduction="sum", reset=True))
    for k in ("w", "b", "g"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-14)
    zero = as_np(learner.etrace_grad(xs, jnp.zeros((T,)), ys, step_fn=step, reduction="sum", reset=True))
    np.testing.assert_array_equal(zero["w"], 0.0)
    np.testing.assert_array_equal(zero["b"], 0.0)
    np.testing.assert_allclose(zero["g"], want["g"], rtol=1e-12)  # a plain parameter: its own gradient
    # a scalar, broadcast to every unit: the traces themselves, summed
    scalar = as_np(learner.etrace_grad(xs, jnp.ones((T,)), ys, step_fn=step, reduction="sum", reset=True))
    x_sum = np.asarray(xs).sum(1)  # (T, I): the standing traces summed over the batch
    eps_sum = np.zeros((I,))
    want_w = np.zeros((I, H))
    for t in range(T):
        eps_sum = A * eps_sum + x_sum[t]
        want_w += np.outer(eps_sum, np.ones(H))
    np.testing.assert_allclose(scalar["w"], want_w, rtol=1e-12)


def test_the_modulatory_signal_on_the_factored_layout():
    """The learning-signal axis is the engines' own: pp_prop with ``learning_signal='modulatory'``
    and the modulator ``dL_t/dh_t`` is pp_prop."""
    wbg, xs, ys, dldh = problem(8)
    want = as_np(
        braintrace.compile(Leaky(*wbg), "pp_prop", xs[0], batch_size=B).etrace_grad(xs, ys, step_fn=mse)
    )
    cfg = ETraceConfig(trace_factorization="io_factorized", decay=0.9, learning_signal="modulatory")
    learner = braintrace.compile(Leaky(*wbg), cfg, xs[0], batch_size=B)
    step = lambda x, m, y: mse(learner(x, modulator=m), y)  # noqa: E731
    got = as_np(learner.etrace_grad(xs, jnp.asarray(dldh), ys, step_fn=step, reduction="sum", reset=True))
    for k in ("w", "b", "g"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-14)


def test_three_factor_standing_modulator_is_read_at_every_call():
    wbg, xs, ys, _ = problem(2)
    learner = braintrace.ThreeFactor(Leaky(*wbg))
    brainstate.nn.init_all_states(learner.model, batch_size=B)
    learner.compile_graph(xs[0])
    with pytest.raises(ValueError, match="needs a modulator"):
        learner(xs[0])
    learner.modulator = 1.0
    one = as_np(learner.etrace_grad(xs, ys, step_fn=mse))
    learner.modulator = 2.5  # the compiled loop reads the new value
    other = as_np(learner.etrace_grad(xs, ys, step_fn=mse))
    np.testing.assert_allclose(other["w"], 2.5 * one["w"], rtol=1e-12)
    assert np.linalg.norm(one["w"]) > 0
    with pytest.raises(ValueError, match="modulator"):
        learner.modulator = jnp.ones((B, H + 1))
    with pytest.raises(ValueError, match="single-step"):
        braintrace.ThreeFactor(Leaky(*wbg), vjp_method="multi-step")
    plain = braintrace.compile(Leaky(*wbg), "d_rtrl", xs[0], batch_size=B)
    with pytest.raises(ValueError, match="learning_signal='modulatory'"):
        plain(xs[0], modulator=1.0)
    with pytest.raises(ValueError, match="learning_signal='modulatory'"):
        plain.modulator = 1.0


# --------------------------------------------------------------------------------------------------
# OSTL
# --------------------------------------------------------------------------------------------------


def test_ostl_recurrent_is_d_rtrl_and_records_recurrent_weights():
    rng = np.random.default_rng(3)
    w_in, w_rec = rng.normal(size=(I, H)), 0.5 * rng.normal(size=(H, H))
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ostl = braintrace.compile(Recurrent(w_in, w_rec), "ostl_recurrent", xs[0], batch_size=B)
    ours = [w for w in caught if "OSTLRecurrent" in str(w.message)]
    assert len(ours) == 1 and "w_rec" in str(ours[0].message)
    recs = [r for r in ostl.graph.records if "OSTLRecurrent" in r.message]
    assert [r.subject for r in recs] == [("w_rec",)]
    assert recs[0].level is braintrace.DiagnosticLevel.WARNING
    assert recs[0].kind is braintrace.DiagnosticKind.RECURRENT_ETP_WEIGHT
    assert ostl.config == braintrace.D_RTRL(Recurrent(w_in, w_rec)).config  # D-RTRL's coordinates
    # no recurrent ETP weight: nothing to record
    wbg, xs2, _, _ = problem(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = braintrace.compile(Leaky(*wbg), braintrace.OSTLRecurrent, xs2[0], batch_size=B)
    assert not [w for w in caught if "OSTLRecurrent" in str(w.message)]
    assert plain.regime == "with-H" and not [r for r in plain.graph.records if "OSTLRecurrent" in r.message]


def test_ostl_feedforward_is_the_memoryless_factored_trace():
    wbg, xs, ys, dldh = problem(5)
    learner = braintrace.compile(Leaky(*wbg), "ostl_feedforward", xs[0], batch_size=B)
    assert learner.regime == "without-H" and learner.decay == 1e-6
    exact = braintrace.compile(Leaky(*wbg), braintrace.OSTLFeedforward, xs[0], batch_size=B, decay_or_rank=1)
    got = as_np(exact.etrace_grad(xs, ys, step_fn=mse))
    want_w, eb, want_b = np.zeros((I, H)), np.zeros((B, H)), np.zeros(H)
    for t in range(T):
        want_w += np.asarray(xs[t]).T @ dldh[t]  # lambda = 0: the within-step factor only
        eb = A * eb + 1.0  # the bias keeps pp_prop's exact trace
        want_b += (dldh[t] * eb).sum(0)
    np.testing.assert_allclose(got["w"], want_w, rtol=1e-11)
    np.testing.assert_allclose(got["b"], want_b, rtol=1e-11)


# --------------------------------------------------------------------------------------------------
# EProp errors (its gradients: tests/test_e_prop.py)
# --------------------------------------------------------------------------------------------------


def test_eprop_errors_name_the_preset():
    wbg, xs, _, _ = problem(6)
    with pytest.raises(ValueError, match="EProp: `feedback`"):
        braintrace.EProp(Leaky(*wbg), feedback="alignment")
    with pytest.raises(ValueError, match="EProp: feedback='random'.*random_feedback_key"):
        braintrace.EProp(Leaky(*wbg), feedback="random")
    with pytest.raises(ValueError, match="kappa_filter_decay"):
        braintrace.EProp(Leaky(*wbg), kappa_filter_decay=1.0)
    with pytest.raises(TypeError, match="EProp.*config"):
        braintrace.EProp(Leaky(*wbg), config=ETraceConfig())
    # the output is the hidden state through plain ops: no trainable op to give a random feedback
    with pytest.raises(ValueError, match="EProp: learning_signal='random_feedback'.*Leaky"):
        braintrace.compile(
            Leaky(*wbg), "eprop", xs[0], batch_size=B, feedback="random", random_feedback_key=0
        )
    # the only hidden group is a read-out: nothing for the filter
    with pytest.raises(ValueError, match="EProp: trace_filter='kappa'.*nothing to filter"):
        braintrace.compile(Leaky(*wbg), "eprop", xs[0], batch_size=B, kappa_filter_decay=0.5)


# --------------------------------------------------------------------------------------------------
# braintrace.compile
# --------------------------------------------------------------------------------------------------


def test_compile_names_configs_and_classes(monkeypatch):
    wbg, xs, _, _ = problem(7)
    names = {
        "d_rtrl": braintrace.D_RTRL,
        "pp_prop": braintrace.IODimVjpAlgorithm,
        "ES_D_RTRL": braintrace.IODimVjpAlgorithm,
        "esd_rtrl": braintrace.IODimVjpAlgorithm,
        "eprop": braintrace.EProp,
        "E_Prop": braintrace.EProp,
        "three_factor": braintrace.ThreeFactor,
        "ostl_recurrent": braintrace.OSTLRecurrent,
        "ostl_feedforward": braintrace.OSTLFeedforward,
    }
    for name, cls in names.items():
        assert type(braintrace.compile(Leaky(*wbg), name, xs[0], batch_size=B)) is cls, name
    cfg = ETraceConfig(trace_factorization="io_factorized", decay=(0.2, 0.6))
    alg = braintrace.compile(Leaky(*wbg), cfg, xs[0], batch_size=B)
    assert type(alg) is braintrace.IODimVjpAlgorithm and alg.config == cfg
    assert (
        type(braintrace.compile(Leaky(*wbg), ETraceConfig(), xs[0], batch_size=B))
        is braintrace.ParamDimVjpAlgorithm
    )
    with pytest.raises(TypeError, match="twice"):
        braintrace.compile(Leaky(*wbg), cfg, xs[0], batch_size=B, config=cfg)
    with pytest.raises(NotImplementedError, match="coupled"):
        braintrace.compile(Leaky(*wbg), ETraceConfig(recurrence_scope="coupled"), xs[0], batch_size=B)
    assert resolve_algorithm("dni")[0] is braintrace.DNI
    with pytest.raises(ValueError, match="unknown algorithm 'bptt'.*e_prop.*rtrl"):
        braintrace.compile(Leaky(*wbg), "bptt", xs[0], batch_size=B)
    with pytest.raises(TypeError, match="ETraceConfig"):
        braintrace.compile(Leaky(*wbg), 3, xs[0], batch_size=B)

    # the influence-matrix algorithms from their names and their configs
    snap = braintrace.compile(
        Leaky(*wbg), ETraceConfig(recurrence_scope="sparse_n", sparse_n=3), xs[0], batch_size=B
    )
    assert type(snap) is braintrace.SnAp and snap.recurrence_scope == 3
    full = ETraceConfig(recurrence_scope="full")
    assert type(braintrace.compile(Leaky(*wbg), full, xs[0], batch_size=B)) is braintrace.RTRL
    uoro = ETraceConfig(trace_factorization="random_projection", recurrence_scope="full")
    assert type(braintrace.compile(Leaky(*wbg), uoro, xs[0], batch_size=B)) is braintrace.UORO
    with pytest.raises(NotImplementedError, match="learning_signal='modulatory'"):
        braintrace.compile(Leaky(*wbg), full.replace(learning_signal="modulatory"), xs[0], batch_size=B)

    # the influence-matrix names are looked up on the package when compiling
    class FullScope(braintrace.ParamDimVjpAlgorithm):
        _scopes = ("full",)

    monkeypatch.setattr(braintrace, "RTRL", FullScope, raising=False)
    assert type(braintrace.compile(Leaky(*wbg), "rtrl", xs[0], batch_size=B)) is FullScope
    assert braintrace.compile(Leaky(*wbg), full, xs[0], batch_size=B).config == full
    for name in ("RTRL", "SnAp", "UORO"):
        monkeypatch.delattr(braintrace, name, raising=False)
    for name, attr in (("rtrl", "RTRL"), ("snap", "SnAp"), ("uoro", "UORO")):
        with pytest.raises(NotImplementedError, match=f"braintrace.{attr}"):
            braintrace.compile(Leaky(*wbg), name, xs[0], batch_size=B)
    with pytest.raises(NotImplementedError, match="braintrace.SnAp"):
        braintrace.compile(
            Leaky(*wbg), ETraceConfig(recurrence_scope="sparse_n", sparse_n=2), xs[0], batch_size=B
        )


# --------------------------------------------------------------------------------------------------
# FixedRandomFeedback and KappaFilter
# --------------------------------------------------------------------------------------------------


def test_fixed_random_feedback():
    fb = braintrace.FixedRandomFeedback(60, 50, jax.random.PRNGKey(0), init_scale=0.2)
    assert fb.B.shape == (60, 50) and (fb.n_target, fb.n_layer) == (60, 50)
    b = np.asarray(fb.B)
    assert abs(b.std() - 0.2) < 0.01 and abs(b.mean()) < 0.01
    again = braintrace.FixedRandomFeedback(60, 50, 0, init_scale=0.2)  # an int seeds PRNGKey(int)
    np.testing.assert_array_equal(np.asarray(again.B), b)
    e = jnp.asarray(np.random.default_rng(0).normal(size=(5, 60)))
    np.testing.assert_allclose(np.asarray(fb.project(e)), np.asarray(e) @ np.asarray(fb.B), rtol=1e-12)
    with pytest.raises(ValueError, match="n_target"):
        braintrace.FixedRandomFeedback(0, 3, 0)
    with pytest.raises(ValueError, match="init_scale"):
        braintrace.FixedRandomFeedback(2, 3, 0, init_scale=-1.0)
    with pytest.raises(TypeError, match="key"):
        braintrace.FixedRandomFeedback(2, 3, "zero")
    with pytest.raises(ValueError, match="n_target=60"):
        fb.project(jnp.ones((5, 3)))


def test_kappa_filter():
    filt = braintrace.KappaFilter(jnp.zeros(3), kappa=0.25)
    x1, x2 = jnp.asarray([1.0, -2.0, 0.5]), jnp.asarray([0.0, 4.0, 1.0])
    np.testing.assert_allclose(np.asarray(filt.update(x1)), 0.75 * np.asarray(x1))
    np.testing.assert_allclose(
        np.asarray(filt.update(x2)), 0.75 * np.asarray(x2) + 0.25 * 0.75 * np.asarray(x1)
    )
    filt.reset_state(batch_size=4)
    assert filt.value.shape == (4,) and float(jnp.abs(filt.value).sum()) == 0.0
    filt2 = braintrace.KappaFilter(jnp.ones((2, 3)), kappa=0.0)
    np.testing.assert_array_equal(np.asarray(filt2.update(jnp.full((2, 3), 7.0))), 7.0)
    filt2.reset_state(batch_size=5)
    assert filt2.value.shape == (5, 3)
    with pytest.raises(ValueError, match="kappa"):
        braintrace.KappaFilter(jnp.zeros(3), kappa=1.0)
    with pytest.raises(TypeError, match="kappa"):
        braintrace.KappaFilter(jnp.zeros(3), kappa=None)


@pytest.mark.parametrize(
    "name,options,expected",
    [
        ("d_rtrl", {}, None),
        ("three_factor", {}, "modulator"),
        ("ostl_feedforward", {}, "temporal term"),
        ("e_prop", {"feedback": "random", "random_feedback_key": jax.random.PRNGKey(0)}, "random feedback"),
    ],
)
def test_a_rule_that_differs_from_bptt_by_definition_is_recorded(name, options, expected):
    """Clarification of the record policy: one record per traced parameter and one warning."""
    rng = np.random.default_rng(0)
    if name == "e_prop":  # random feedback replaces a trainable op that reads the hidden states
        model = Recurrent(rng.normal(size=(I, H)), 0.5 * rng.normal(size=(H, H)))
        traced = [("w_in",), ("w_rec",)]
    else:
        model, traced = Leaky(rng.normal(size=(I, H)), np.zeros(H), np.ones(H)), [("b",), ("w",)]
    brainstate.nn.init_all_states(model, batch_size=B)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner = braintrace.compile(model, name, jnp.zeros((B, I)), **options)
    recs = [r for r in learner.graph.records if r.kind.value == "learning_rule_approximation"]
    if expected is None:
        assert not recs
        return
    assert sorted(r.subject for r in recs) == traced
    assert all(expected in r.message for r in recs)
    assert sum(expected in str(w.message) for w in caught) == 1
