"""``ETraceVmap`` (``braintrace.compile(..., vmap=True)``): one unbatched learner per example gives the
gradients of the batched learner and of BPTT where D-RTRL is exact; the published sequence drivers on
the wrapper; ``GradExpon``."""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from _numerics import assert_close
from online_models import float64

import braintrace
from braintrace._algorithm.vmap import compile_vmap

B, I, H, T = 3, 2, 4, 5


class Leaky(brainstate.nn.Module):
    """``h <- a * tanh(h) + x W_in + tanh(h) W_rec``: per-unit intrinsic dynamics plus a recurrent ETP
    weight (whose own path the traces leave out by definition, the same for both learners)."""

    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w_in = brainstate.ParamState(jnp.asarray(rng.normal(0, 0.5, (I, H))))
        self.w_rec = brainstate.ParamState(jnp.asarray(rng.normal(0, 0.3, (H, H))))
        self.a = jnp.asarray(rng.uniform(0.3, 0.9, H))

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((H,) if batch_size is None else (batch_size, H)))

    def update(self, x):
        r = jnp.tanh(self.h.value)
        self.h.value = (
            self.a * r + braintrace.matmul(x, self.w_in.value) + braintrace.matmul(r, self.w_rec.value)
        )
        return self.h.value


@pytest.fixture
def data():
    with float64():
        rng = np.random.default_rng(1)
        yield jnp.asarray(rng.standard_normal((T, B, I))), jnp.asarray(rng.standard_normal((T, B, H)))


def _batched_grads(make_alg, xs, ys, mask):
    """Per-step gradients of the batched learner weighted by ``mask`` and summed (each step's online
    rule under grad)."""
    model = Leaky()
    alg = make_alg(model)
    params = model.states(brainstate.ParamState)
    step = brainstate.transform.jit(
        lambda x, y: brainstate.transform.grad(lambda: jnp.sum((alg(x) - y) ** 2), params)()
    )
    total = None
    for t in range(T):
        g = jax.tree.map(lambda a: mask[t] * a, step(xs[t], ys[t]))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total


@pytest.mark.parametrize("name,options", [("d_rtrl", {}), ("pp_prop", {"decay_or_rank": 0.7})])
def test_vmapped_learner_equals_the_batched_one(data, name, options):
    xs, ys = data
    learner = braintrace.compile(Leaky(), name, xs[0], batch_size=B, vmap=True, **options)
    assert isinstance(learner, braintrace.ETraceVmap) and isinstance(learner, brainstate.nn.Vmap)
    assert isinstance(learner, braintrace.SequenceDriverMixin)
    assert learner.module.model.h.value.shape == (B, H)  # per-example states, B lanes
    mask = jnp.asarray([1.0, 0.0, 2.0, 0.5, 1.0])
    grads, losses = learner.etrace_grad(
        xs, ys, step_fn=lambda x, y: jnp.sum((learner(x) - y) ** 2), mask=mask, return_value=True
    )
    make_alg = lambda m: braintrace.compile(m, name, xs[0], batch_size=B, **options)  # noqa: E731
    want = jax.tree.map(lambda g: g / mask.sum(), _batched_grads(make_alg, xs, ys, mask))  # 'mean'
    assert set(grads) == set(want) == {("w_in",), ("w_rec",)}
    for k in want:
        assert float(jnp.abs(want[k]).max()) > 0
        assert_close(grads[k], want[k], np.float64)
    assert losses.shape == (T,)


def test_vmapped_d_rtrl_evolves_and_equals_bptt_where_exact(data):
    """``etrace_evolve`` runs the model per example; then, without the recurrent weight's own path
    (held fixed by D-RTRL's definition), the input weight's online gradient is BPTT's (mean over
    the steps of etrace_grad, the traces carried over from the evolved steps)."""
    xs, ys = data
    model = Leaky()
    model.w_rec.value = jnp.zeros((H, H))
    learner = compile_vmap(braintrace.D_RTRL(model), xs[0], batch_size=B)
    ref = Leaky()
    ref.w_rec.value = jnp.zeros((H, H))
    brainstate.nn.init_all_states(ref, batch_size=B)
    outs = learner.etrace_evolve(xs, return_outputs=True)
    assert_close(outs, jnp.stack([ref(xs[t]) for t in range(T)]), np.float64)
    f = lambda x, y: jnp.sum((learner(x) - y) ** 2)  # noqa: E731
    with pytest.raises(ValueError, match="vmapped learner"):
        learner.etrace_grad(xs[:4], ys[:4], step_fn=f, chunk_size=2)
    with pytest.raises(ValueError, match=r"`mask` must have shape \(5,\)"):
        learner.etrace_grad(xs, ys, step_fn=f, mask=jnp.ones(4))
    with pytest.raises(ValueError, match="`reduction`"):
        learner.etrace_grad(xs, ys, step_fn=f, reduction="max")
    with pytest.raises(ValueError, match="leading time axis"):
        learner.etrace_grad(xs, ys[:4], step_fn=f)
    grads = learner.etrace_grad(xs, ys, step_fn=f)

    def loss(w):  # the traces remember the evolved steps: BPTT over both passes, losses on the second
        def body(h, inp):
            h = model.a * jnp.tanh(h) + inp[0] @ w
            return h, jnp.sum((h - inp[1]) ** 2)

        both = (jnp.concatenate([xs, xs]), jnp.concatenate([ys, ys]))
        return jax.lax.scan(body, jnp.zeros((B, H)), both)[1][T:].sum() / T

    assert_close(grads[("w_in",)], jax.grad(loss)(model.w_in.value), np.float64)


def test_compile_vmap_errors(data):
    xs, _ = data
    with pytest.raises(ValueError, match="needs batch_size"):
        compile_vmap(braintrace.D_RTRL(Leaky()), xs[0])
    with pytest.raises(ValueError, match=r"batch axis \(batch_size=4\) first, got a leaf of shape \(3, 2\)"):
        compile_vmap(braintrace.D_RTRL(Leaky()), xs[0], batch_size=4)
    with pytest.raises(TypeError, match="ETraceAlgorithm"):
        compile_vmap(Leaky(), xs[0], batch_size=B)


def test_grad_expon():
    acc = braintrace.GradExpon({"w": jnp.zeros((2,)), "b": jnp.zeros(())}, 0.5)
    g1 = {"w": jnp.asarray([1.0, -2.0]), "b": jnp.asarray(3.0)}
    g2 = {"w": jnp.asarray([0.5, 4.0]), "b": jnp.asarray(-1.0)}
    acc.update(g1)
    acc.update(g2)
    for k in g1:
        np.testing.assert_allclose(acc.gradients.value[k], 0.5 * g1[k] + g2[k], rtol=1e-6)
    with brainstate.environ.context(dt=0.1 * u.ms):
        tau = braintrace.GradExpon(jnp.zeros(1), 2.0 * u.ms)
    np.testing.assert_allclose(tau.decay, np.exp(-0.1 / 2.0), rtol=1e-6)
    for bad, err in ((1.0, ValueError), (0.0, ValueError), (1, TypeError), ("0.5", TypeError)):
        with pytest.raises(err, match="tau_or_decay"):
            braintrace.GradExpon(jnp.zeros(1), bad)
    with pytest.raises(ValueError, match="pytree structure"):
        acc.update(jnp.zeros(2))
