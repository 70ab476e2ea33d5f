"""``etrace_train``: the online gradient applied inside the sequence, against independent loops.

* ``update_every`` at least the sequence's length equals ``etrace_grad`` followed by one update.
* ``update_every=1`` equals a Python loop of per-step gradients (the algorithm under
  ``brainstate.transform.grad``) and updates, in float64.
* A stream fed in chunks of any lengths gives the same parameters and losses as one long call.
* A target that drifts during the stream is tracked by learning inside the sequence, which a model
  updated only at the end cannot do.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest

import braintrace

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

B, I, H = 2, 3, 4


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with om.float64():
        yield


class SGD:
    """A GradientTransformation with the optax interface (no optax needed): momentum SGD."""

    def __init__(self, lr, momentum=0.0):
        self.lr, self.momentum = lr, momentum

    def init(self, params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(self, grads, state, params=None):
        state = jax.tree.map(lambda m, g: self.momentum * m + g, state, grads)
        return jax.tree.map(lambda m: -self.lr * m, state), state


class _RNN(brainstate.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w = brainstate.ParamState(jnp.asarray(rng.standard_normal((I, H)) * 0.5))
        self.u = brainstate.ParamState(jnp.asarray(rng.standard_normal((H, H)) * 0.3))

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

    def update(self, x):
        pre = (
            0.6 * self.h.value
            + braintrace.matmul(x, self.w.value)
            + braintrace.matmul(self.h.value, self.u.value)
        )
        self.h.value = jnp.tanh(pre)
        return self.h.value


def _learner(alg="d_rtrl", seed=0):
    model = _RNN(seed)
    brainstate.nn.init_all_states(model, batch_size=B)
    make = braintrace.D_RTRL if alg == "d_rtrl" else (lambda m: braintrace.pp_prop(m, decay_or_rank=0.8))
    learner = make(model)
    learner.compile_graph(jnp.zeros((B, I)))
    return learner


def _data(steps, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((steps, B, I))), jnp.asarray(rng.standard_normal((steps, B, H)))


def _params(learner):
    return {k: np.asarray(v.value) for k, v in learner.model.states(brainstate.ParamState).items()}


@pytest.mark.parametrize("alg", ["d_rtrl", "pp_prop"])
def test_one_update_after_the_sequence_equals_etrace_grad(alg):
    xs, ys = _data(6)
    ref = _learner(alg)
    before = _params(ref)
    grads, want_losses = ref.etrace_grad(xs, ys, step_fn=om.loss_fn, return_value=True)
    learner = _learner(alg)
    _, losses = learner.etrace_train(
        xs, ys, step_fn=om.loss_fn, optimizer=SGD(0.05), update_every=6, losses="all"
    )
    after = _params(learner)
    assert np.allclose(np.asarray(losses), np.asarray(want_losses), rtol=1e-12)
    for k in before:
        assert np.allclose(after[k], before[k] - 0.05 * np.asarray(grads[k]), rtol=1e-12, atol=1e-14), k


@pytest.mark.parametrize("alg", ["d_rtrl", "pp_prop"])
def test_an_update_every_step_equals_a_python_loop(alg):
    xs, ys = _data(5)
    opt = SGD(0.1, momentum=0.5)
    learner = _learner(alg)
    _, losses = learner.etrace_train(xs, ys, step_fn=om.loss_fn, optimizer=opt, update_every=1, losses="all")
    ref = _learner(alg)
    params = ref.model.states(brainstate.ParamState)
    state = opt.init({k: v.value for k, v in params.items()})
    want = []
    for t in range(xs.shape[0]):
        grads, value = brainstate.transform.grad(
            lambda: om.loss_fn(ref(xs[t]), ys[t]), params, return_value=True
        )()
        updates, state = opt.update(grads, state)
        for k, s in params.items():
            s.value = s.value + updates[k]
        want.append(value)
    assert np.allclose(np.asarray(losses), np.asarray(want), rtol=1e-10)
    for k, v in _params(ref).items():
        assert om.rel_err(_params(learner)[k], v) < 1e-10, k


def test_chunks_equal_one_long_call():
    xs, ys = _data(13)
    opt = SGD(0.05, momentum=0.9)
    one = _learner()
    _, long_losses = one.etrace_train(xs, ys, step_fn=om.loss_fn, optimizer=opt, update_every=4, losses="all")
    chunked = _learner()
    state, parts = None, []
    for a, b in ((0, 3), (3, 10), (10, 13)):  # chunk ends fall inside update blocks
        state, part = chunked.etrace_train(
            xs[a:b], ys[a:b], step_fn=om.loss_fn, optimizer=opt, opt_state=state, update_every=4, losses="all"
        )
        parts.append(part)
    np.testing.assert_array_equal(np.concatenate([np.asarray(p) for p in parts]), np.asarray(long_losses))
    for k, v in _params(one).items():
        np.testing.assert_array_equal(_params(chunked)[k], v)


def test_a_drifting_target_is_tracked_online():
    """``y_t = x_t W*_t`` with ``W*`` switching halfway: updated every few steps, a leaky linear
    model follows the switch; the same model updated once at the end cannot fit both halves."""

    class Linear(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = brainstate.ParamState(jnp.zeros((I, H)))

        def init_state(self, batch_size=None, **kw):
            self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

        def update(self, x):
            self.h.value = 0.2 * self.h.value + braintrace.matmul(x, self.w.value)
            return self.h.value

    rng = np.random.default_rng(3)
    steps = 400
    xs = jnp.asarray(rng.standard_normal((steps, B, I)))
    w1, w2 = jnp.asarray(rng.standard_normal((I, H))), jnp.asarray(rng.standard_normal((I, H)))
    h, ys = jnp.zeros((B, H)), []
    for t in range(steps):
        h = 0.2 * h + xs[t] @ (w1 if t < steps // 2 else w2)
        ys.append(h)
    ys = jnp.stack(ys)
    results = {}
    for every in (5, steps):
        model = Linear()
        brainstate.nn.init_all_states(model, batch_size=B)
        learner = braintrace.D_RTRL(model).compile_graph(xs[0])
        _, losses = learner.etrace_train(
            xs, ys, step_fn=om.loss_fn, optimizer=SGD(0.05), update_every=every, losses="all"
        )
        results[every] = float(np.mean(np.asarray(losses)[-50:]))
    assert results[5] < 0.05 * results[steps], results


def test_bad_arguments():
    xs, ys = _data(3)
    learner = _learner()
    with pytest.raises(TypeError, match="optimizer"):
        learner.etrace_train(xs, ys, step_fn=om.loss_fn, optimizer=object())
    with pytest.raises(ValueError, match="update_every"):
        learner.etrace_train(xs, ys, step_fn=om.loss_fn, optimizer=SGD(0.1), update_every=0)
    with pytest.raises(ValueError, match="losses"):
        learner.etrace_train(xs, ys, step_fn=om.loss_fn, optimizer=SGD(0.1), losses="sum")


def test_optax_optimizer():
    optax = pytest.importorskip("optax")  # the `examples` extra
    xs, ys = _data(8)
    learner = _learner()
    state, loss = learner.etrace_train(xs, ys, step_fn=om.loss_fn, optimizer=optax.adam(1e-2), update_every=2)
    assert np.isfinite(float(loss)) and state is not None


@pytest.mark.parametrize("alg", ["d_rtrl", "pp_prop"])
def test_evolve_then_learn_equals_one_longer_sequence(alg):
    """``etrace_evolve`` over the first steps, then ``etrace_grad`` without reset, equals the
    gradient of the same steps in one run whose first losses are zero (traces carried on)."""
    xs, ys = _data(7)
    evolved = _learner(alg)
    outs = evolved.etrace_evolve(xs[:3], return_outputs=True)
    assert outs.shape == (3, B, H)
    got = evolved.etrace_grad(xs[3:], ys[3:], step_fn=om.loss_fn, reset=False)
    ref = _learner(alg)
    weights = jnp.concatenate([jnp.zeros(3), jnp.ones(4)])
    want = ref.etrace_grad(xs, ys, weights, step_fn=lambda o, y, w: w * om.loss_fn(o, y))
    for k in want:
        assert om.rel_err(got[k], want[k]) < 1e-10, k
