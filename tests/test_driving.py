"""``etrace_grad`` / ``etrace_evolve`` with a ``step_fn`` that runs the learner itself (the form of
the published 0.2 releases), against a Python loop of per-step gradients (float64)."""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest

import braintrace

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

B, I, H, T = 2, 3, 4, 6


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with om.float64():
        yield


class _RNN(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.w = brainstate.ParamState(jnp.asarray(rng.standard_normal((I, H)) * 0.5))
        self.u = brainstate.ParamState(jnp.asarray(rng.standard_normal((H, H)) * 0.3))

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((H,) if batch_size is None else (batch_size, H)))

    def update(self, x):
        pre = braintrace.matmul(x, self.w.value) + braintrace.matmul(self.h.value, self.u.value)
        self.h.value = jnp.tanh(pre)
        return self.h.value


def _learner(**kw):
    model = _RNN()
    brainstate.nn.init_all_states(model, batch_size=B)
    return braintrace.D_RTRL(model, **kw).compile_graph(jnp.zeros((B, I)))


def _data():
    rng = np.random.default_rng(1)
    return jnp.asarray(rng.standard_normal((T, B, I))), jnp.asarray(rng.standard_normal((T, B, H)))


def _loop(mask):
    """Per-step gradients of the learner under brainstate.transform.grad, weighted and summed."""
    xs, ys = _data()
    alg = _learner()
    params = alg.model.states(brainstate.ParamState)
    total, losses = None, []
    for t in range(T):
        g, value = brainstate.transform.grad(
            lambda: om.loss_fn(alg(xs[t]), ys[t]), params, return_value=True
        )()
        g = jax.tree.map(lambda a: mask[t] * a, g)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        losses.append(value)
    return total, jnp.stack(losses)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_step_fn_that_runs_the_learner(reduction):
    xs, ys = _data()
    mask = jnp.asarray([1.0, 0.0, 1.0, 0.5, 1.0, 1.0])
    alg = _learner()
    step = lambda x, y: om.loss_fn(alg(x), y)  # noqa: E731
    grads, losses = alg.etrace_grad(xs, ys, step_fn=step, mask=mask, reduction=reduction, return_value=True)
    want, want_losses = _loop(mask)
    denom = float(mask.sum()) if reduction == "mean" else 1.0
    for k in want:
        assert om.rel_err(grads[k], want[k] / denom) < 1e-12, k
    assert np.allclose(np.asarray(losses), np.asarray(want_losses), rtol=1e-12)
    scalar = alg.etrace_grad(xs, ys, step_fn=step, mask=mask, return_value=True, loss_output="scalar")[1]
    assert scalar.shape == ()


def test_aux_and_default_mean():
    xs, ys = _data()
    alg = _learner()

    def step(x, y):
        out = alg(x)
        return om.loss_fn(out, y), jnp.mean(out)

    grads, aux = alg.etrace_grad(xs, ys, step_fn=step, has_aux=True)
    want, _ = _loop(jnp.ones(T))
    assert aux.shape == (T,)
    for k in want:
        assert om.rel_err(grads[k], want[k] / T) < 1e-12, k


def test_windows_with_chunk_size_equal_the_multi_step_rule():
    xs, ys = _data()
    alg = _learner(vjp_method="multi-step")
    step = lambda x, y: jax.vmap(om.loss_fn)(alg(braintrace.MultiStepData(x)), y)  # noqa: E731
    grads = alg.etrace_grad(xs, ys, step_fn=step, chunk_size=2, reduction="sum")
    want = _learner().etrace_grad(xs, ys, step_fn=om.loss_fn, window=2)
    for k in want:
        assert om.rel_err(grads[k], want[k]) < 1e-12, k
    single = _learner()
    with pytest.raises(ValueError, match="multi-step"):
        single.etrace_grad(xs, ys, step_fn=lambda x, y: om.loss_fn(single(x), y), chunk_size=2)


def test_the_two_forms_are_told_apart_and_their_options_checked():
    xs, ys = _data()
    alg = _learner()
    ours = alg.etrace_grad(xs, ys, step_fn=om.loss_fn)  # the output form
    want, _ = _loop(jnp.ones(T))
    for k in want:
        assert om.rel_err(ours[k], want[k]) < 1e-12, k
    with pytest.raises(ValueError, match="weights"):  # mask, lengths, resets, has_aux: both forms
        alg.etrace_grad(xs, ys, step_fn=om.loss_fn, weights=alg.model.states(brainstate.ParamState))
    with pytest.raises(ValueError, match="chunk_size"):
        alg.etrace_grad(xs, ys, step_fn=lambda x, y: om.loss_fn(alg(x), y), window=2)


def test_evolve_with_a_step_fn_and_windows():
    xs, _ = _data()
    alg = _learner()
    outs = alg.etrace_evolve(xs, step_fn=lambda x: alg(x), return_outputs=True)
    assert outs.shape == (T, B, H)
    assert alg.etrace_evolve(xs) is None
    windows = _learner().etrace_evolve(xs, chunk_size=3, return_outputs=True)
    assert windows.shape == (2, 3, B, H)
    direct = _learner().etrace_evolve(xs, return_outputs=True)
    assert om.rel_err(windows.reshape(direct.shape), direct) < 1e-12


def test_compile_takes_the_published_keywords():
    model = _RNN()  # states not initialised: compile initialises them (unbatched)
    learner = braintrace.compile(model, "d_rtrl", jnp.zeros((I,)), seed=3, verbose=0)
    assert learner.is_compiled and model.h.value.shape == (H,)
    mapped = braintrace.compile(_RNN(), "d_rtrl", jnp.zeros((2, I)), vmap=True, batch_size=2)
    assert isinstance(mapped, braintrace.ETraceVmap)  # tests/test_vmap_learner.py checks its gradients


def test_a_parameter_the_step_does_not_read_gets_a_zero_gradient():
    """Both driver forms and etrace_train: an unused ParamState (a layer switched off, a parameter
    read only by evaluation code) gets zeros, the others their gradient."""
    optax = pytest.importorskip("optax")

    class Net(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = brainstate.ParamState(jnp.full((3, 3), 0.1))
            self.unused = brainstate.ParamState(jnp.ones((2,)))

        def init_state(self, batch_size=None, **kw):
            self.h = brainstate.HiddenState(jnp.zeros((batch_size, 3)))

        def update(self, x):
            self.h.value = jnp.tanh(braintrace.matmul(self.h.value, self.w.value) + x)
            return self.h.value

    model = Net()
    brainstate.nn.init_all_states(model, batch_size=2)
    learner = braintrace.D_RTRL(model)
    learner.compile_graph(jnp.zeros((2, 3)))
    xs = jnp.ones((4, 2, 3))
    ours = learner.etrace_grad(xs, xs, step_fn=lambda out, y: jnp.sum((out - y) ** 2))
    theirs = learner.etrace_grad(xs, xs, step_fn=lambda x, y: jnp.sum((learner(x) - y) ** 2), reset=True)
    for grads in (ours, theirs):
        assert np.all(np.asarray(grads[("unused",)]) == 0.0)
        assert np.abs(np.asarray(grads[("w",)])).sum() > 0
    learner.etrace_train(xs, xs, step_fn=lambda out, y: jnp.sum((out - y) ** 2), optimizer=optax.sgd(0.1))
    assert np.all(np.asarray(model.unused.value) == 1.0)


@pytest.mark.parametrize("form", ["output", "runs_the_learner"])
def test_etrace_grad_writes_no_parameter(form):
    """Telling the two forms of step_fn apart evaluates it once and restores what it wrote, and only
    that: a parameter written there would be an output of an enclosing jit's compiled call (a copy of
    every weight per call)."""
    xs, ys = _data()
    alg = _learner()
    if form == "output":
        step_fn = om.loss_fn
    else:
        step_fn = lambda x, y: om.loss_fn(alg(x), y)  # noqa: E731
    with brainstate.StateTraceStack() as trace:
        alg.etrace_grad(xs, ys, step_fn=step_fn)
    written = [type(s).__name__ for s in trace.get_write_states()]
    assert written and "ParamState" not in written
