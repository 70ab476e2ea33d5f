"""``braintrace.ETraceConfig``: canonical forms, validation, the engines' acceptance of a config,
and the ``temporal_recursion`` coordinates against plain-NumPy recursions (float64)."""

from __future__ import annotations

import dataclasses
import warnings

import brainstate
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace
from braintrace import ETraceConfig

# --------------------------------------------------------------------------------------------------
# canonical forms and validation
# --------------------------------------------------------------------------------------------------


def test_default_and_canonical_forms():
    cfg = ETraceConfig()
    assert (cfg.trace_factorization, cfg.temporal_recursion, cfg.recurrence_scope) == (
        "per_param",
        "jacobian",
        "diagonal",
    )
    assert (cfg.learning_signal, cfg.trace_filter, cfg.update_schedule) == ("symmetric", "none", "per_step")
    assert cfg.describe() == "default"
    io = ETraceConfig(trace_factorization="io_factorized", decay=0.9)
    assert io.temporal_recursion == ("scalar_leak", "jacobian") and io.decay == (0.9, 0.9)
    assert io.is_factorized and not cfg.is_factorized
    pair = ETraceConfig(
        trace_factorization="io_factorized", decay=(0.0, 0.5), temporal_recursion="scalar_leak"
    )
    assert pair.temporal_recursion == ("none", "scalar_leak") and pair.decay == (0.0, 0.5)
    # a Jacobian output side with decay 0 stays: pp_prop's exact keys still follow D
    assert ETraceConfig(trace_factorization="io_factorized", decay=(0.5, 0.0)).temporal_recursion == (
        "scalar_leak",
        "jacobian",
    )
    leak0 = ETraceConfig(temporal_recursion="scalar_leak", decay=0.0)
    assert (leak0.temporal_recursion, leak0.decay) == ("none", 0.0)
    assert ETraceConfig(temporal_recursion="none").decay == 0.0
    k0 = ETraceConfig(trace_filter="kappa", kappa=0.0)
    assert (k0.trace_filter, k0.kappa) == ("none", None) and k0 == ETraceConfig()
    snap1 = ETraceConfig(recurrence_scope="sparse_n", sparse_n=1)
    assert (snap1.recurrence_scope, snap1.sparse_n) == ("coupled", None)
    # canonical configs are equal and hashable; replace re-checks
    assert hash(ETraceConfig(trace_filter="kappa", kappa=0.5)) == hash(
        ETraceConfig(trace_filter="kappa", kappa=0.5)
    )
    assert cfg.replace(trace_filter="kappa", kappa=0.3).kappa == 0.3
    with pytest.raises(ValueError, match="kappa"):
        cfg.replace(kappa=0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kappa = 0.5
    assert "kappa=0.3" in cfg.replace(trace_filter="kappa", kappa=0.3).describe()


BAD = [
    (dict(trace_factorization="dense"), ValueError, "trace_factorization='dense'"),
    (dict(learning_signal="reward"), ValueError, "learning_signal='reward'"),
    (dict(kappa=0.5), ValueError, "`kappa=0.5` is set but `trace_filter` is 'none'"),
    (dict(trace_filter="kappa"), ValueError, "needs its coefficient `kappa`"),
    (dict(trace_filter="kappa", kappa=1.0), ValueError, "kappa"),
    (dict(trace_filter="kappa", kappa=True), TypeError, "kappa"),
    (
        dict(trace_factorization="io_factorized", decay=0.9, trace_filter="kappa", kappa=0.5),
        ValueError,
        "kappa",
    ),
    (dict(decay=0.5), ValueError, "takes no `decay`"),
    (dict(temporal_recursion="scalar_leak"), ValueError, "needs `decay`"),
    (dict(temporal_recursion="none", decay=0.3), ValueError, "no memory"),
    (dict(trace_factorization="io_factorized"), ValueError, "needs `decay`"),
    (dict(trace_factorization="io_factorized", decay=(0.5, 0.5, 0.5)), ValueError, "pair"),
    (
        dict(trace_factorization="io_factorized", decay=0.5, temporal_recursion=("jacobian", "jacobian")),
        ValueError,
        "x-side",
    ),
    (dict(temporal_recursion=("scalar_leak", "jacobian")), ValueError, "pair only under"),
    (dict(decay=(0.5, 0.5), temporal_recursion="scalar_leak"), ValueError, "pair only under"),
    (dict(trace_factorization="random_projection"), ValueError, "random_projection"),
    (dict(recurrence_scope="sparse_n"), ValueError, "sparse_n"),
    (dict(recurrence_scope="sparse_n", sparse_n=0), ValueError, "sparse_n"),
    (dict(recurrence_scope="sparse_n", sparse_n=True), TypeError, "sparse_n"),
    (dict(trace_factorization="io_factorized", decay=0.5, recurrence_scope="full"), ValueError, "per_param"),
    (dict(recurrence_scope="coupled", temporal_recursion="scalar_leak", decay=0.5), ValueError, "diagonal"),
    (dict(sparse_n=2), ValueError, "sparse_n=2"),
    (dict(learning_signal="bootstrapped", recurrence_scope="full"), ValueError, "bootstrapped"),
    (dict(update_schedule="window", window_size=4), NotImplementedError, "update_schedule='window'"),
    (dict(update_schedule="sequence_end"), NotImplementedError, "update_schedule='sequence_end'"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD)
def test_invalid_configs_raise_naming_the_field(kwargs, error, match):
    with pytest.raises(error, match=match.replace("(", r"\(").replace(")", r"\)")):
        ETraceConfig(**kwargs)


# --------------------------------------------------------------------------------------------------
# the engines and a config
# --------------------------------------------------------------------------------------------------
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


@pytest.fixture
def x64():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with brainstate.environ.context(precision=64):
            yield


def leaky_problem(seed=0):
    rng = np.random.default_rng(seed)
    w, b, g = rng.normal(size=(I, H)), rng.normal(size=H), rng.normal(size=H)
    xs, ys = rng.normal(size=(T, B, I)), rng.normal(size=(T, B, H))
    hs, h = [], np.zeros((B, H))
    for t in range(T):
        h = A * h + xs[t] @ w + b
        hs.append(h)
    hs = np.stack(hs)
    ct = 2 * (g * np.tanh(hs) - ys) * g * (1 - np.tanh(hs) ** 2)  # dL_t/dh_t
    g_grad = (2 * (g * np.tanh(hs) - ys) * np.tanh(hs)).sum((0, 1))  # the plain parameter's
    return (w, b, g), jnp.asarray(xs), jnp.asarray(ys), ct, g_grad


def mse(out, y):
    return jnp.sum((out - y) ** 2)


def online(algorithm, wbg, xs, ys, **options):
    learner = braintrace.compile(Leaky(*wbg), algorithm, xs[0], batch_size=B, **options)
    g = learner.etrace_grad(xs, ys, step_fn=mse)
    return {k: np.asarray(g[(k,)]) for k in ("w", "b", "g")}


def test_per_param_scalar_leak_is_its_recursion(x64):
    r"""``temporal_recursion='scalar_leak'``: :math:`\epsilon_t = \lambda\epsilon_{t-1} + x_t`."""
    wbg, xs, ys, ct, g_grad = leaky_problem(1)
    lam = 0.5
    got = online(ETraceConfig(temporal_recursion="scalar_leak", decay=lam), wbg, xs, ys)
    xbar, cbar = np.zeros((B, I)), 0.0
    want_w, want_b = np.zeros((I, H)), np.zeros(H)
    for t in range(T):
        xbar, cbar = lam * xbar + np.asarray(xs[t]), lam * cbar + 1.0
        want_w += xbar.T @ ct[t]
        want_b += cbar * ct[t].sum(0)
    np.testing.assert_allclose(got["w"], want_w, rtol=1e-11)
    np.testing.assert_allclose(got["b"], want_b, rtol=1e-11)
    np.testing.assert_allclose(got["g"], g_grad, rtol=1e-11)


def test_io_factorized_decay_pair_is_its_recursion(x64):
    r"""``decay=(lx, lf)``: :math:`\epsilon_x \leftarrow l_x\epsilon_x + x`,
    :math:`\epsilon_f \leftarrow l_f D \epsilon_f + (1-l_f)df`, bias exact."""
    wbg, xs, ys, ct, _ = leaky_problem(2)
    lx, lf = 0.3, 0.7
    cfg = ETraceConfig(trace_factorization="io_factorized", decay=(lx, lf))
    got = online(cfg, wbg, xs, ys)
    ex, ef, c, eb = np.zeros((B, I)), np.zeros((B, H)), 0.0, np.zeros((B, H))
    want_w, want_b = np.zeros((I, H)), np.zeros(H)
    for t in range(T):
        ex = lx * ex + np.asarray(xs[t])
        ef = lf * A * ef + (1 - lf)
        c = lf * c + (1 - lf)
        eb = A * eb + 1.0
        want_w += ex.T @ (ct[t] * ef / c)
        want_b += (ct[t] * eb).sum(0)
    np.testing.assert_allclose(got["w"], want_w, rtol=1e-11)
    np.testing.assert_allclose(got["b"], want_b, rtol=1e-11)
    # the same coordinates through pp_prop's keyword
    learner = braintrace.pp_prop(Leaky(*wbg), decay_or_rank=(lx, lf))
    assert (learner.decay_x, learner.decay_f) == (lx, lf) and learner.config == cfg
    with pytest.raises(AttributeError, match="decay_x"):
        learner.decay


def test_engines_check_the_config(x64):
    wbg = leaky_problem()[0]
    io = ETraceConfig(trace_factorization="io_factorized", decay=0.5)
    with pytest.raises(ValueError, match="trace_factorization='io_factorized'"):
        braintrace.D_RTRL(Leaky(*wbg), config=io)
    with pytest.raises(ValueError, match="trace_factorization='per_param'"):
        braintrace.pp_prop(Leaky(*wbg), config=ETraceConfig())
    with pytest.raises(NotImplementedError, match="recurrence_scope='coupled'"):
        braintrace.D_RTRL(Leaky(*wbg), config=ETraceConfig(recurrence_scope="coupled"))
    with pytest.raises(ValueError, match="recurrence_scope='full'.*RTRL"):
        braintrace.D_RTRL(Leaky(*wbg), config=ETraceConfig(recurrence_scope="full"))
    with pytest.raises(TypeError, match="ETraceConfig"):
        braintrace.D_RTRL(Leaky(*wbg), config={"learning_signal": "symmetric"})
    with pytest.raises(ValueError, match="random_feedback_key"):
        braintrace.D_RTRL(Leaky(*wbg), config=ETraceConfig(learning_signal="random_feedback"))
    with pytest.raises(TypeError, match="random_feedback_key"):
        braintrace.D_RTRL(Leaky(*wbg), random_feedback_key="seed")
    with pytest.raises(ValueError, match="single-step"):
        braintrace.D_RTRL(
            Leaky(*wbg), vjp_method="multi-step", config=ETraceConfig(learning_signal="modulatory")
        )
    with pytest.raises(ValueError, match="disagrees"):
        braintrace.pp_prop(
            Leaky(*wbg),
            decay_or_rank=0.5,
            config=ETraceConfig(trace_factorization="io_factorized", decay=0.6),
        )
    assert braintrace.D_RTRL(Leaky(*wbg)).config == ETraceConfig()
    assert braintrace.pp_prop(Leaky(*wbg), 3).config.decay == (0.5, 0.5)


def test_a_bootstrapped_config_is_refused_by_the_trace_engines_and_routed_to_dni():
    cfg = ETraceConfig(learning_signal="bootstrapped")
    model = Leaky(np.ones((I, H)), np.zeros(H), np.ones(H))
    brainstate.nn.init_all_states(model, batch_size=B)
    with pytest.raises(ValueError, match="braintrace.DNI"):
        braintrace.D_RTRL(model, config=cfg)
    assert isinstance(braintrace.compile(model, cfg, jnp.zeros((B, I))), braintrace.DNI)
