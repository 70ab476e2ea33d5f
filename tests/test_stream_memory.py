"""Constant memory on long streams.

``etrace_train`` and ``etrace_grad`` over a packed stream (``lengths``, ``resets``, the loss
reduced in the loop) are lowered and compiled, never run, for T = 1,000 and T = 100,000 steps
from abstract shapes (``jax.ShapeDtypeStruct``); their temporary memory (the compiled program's
``memory_analysis().temp_size_in_bytes``, which leaves out the inputs and outputs) is the same. The
BPTT control, ``jax.grad`` through a ``scan`` of the same step, keeps every hidden state and grows
by at least one ``(B, H)`` state per step, so the measurement can see growth.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

B, I, H = 2, 3, 8
SHORT, LONG = 1_000, 100_000


class _RNN(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.w = brainstate.ParamState(jnp.asarray(rng.standard_normal((I, H)) * 0.5, jnp.float32))
        self.u = brainstate.ParamState(jnp.asarray(rng.standard_normal((H, H)) * 0.3, jnp.float32))

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H), jnp.float32))

    def update(self, x):
        h = self.h.value
        self.h.value = jnp.tanh(
            0.5 * h + braintrace.matmul(x, self.w.value) + braintrace.matmul(h, self.u.value)
        )
        return self.h.value


def row_loss(out, y):
    return jnp.mean((out - y) ** 2, axis=-1)


class SGD:
    init = staticmethod(lambda params: ())
    update = staticmethod(lambda g, s, p=None: (jax.tree.map(lambda v: -0.01 * v, g), s))


def _abstract(steps):
    f32 = jnp.float32
    return (
        jax.ShapeDtypeStruct((steps, B, I), f32),
        jax.ShapeDtypeStruct((steps, B, H), f32),
        jax.ShapeDtypeStruct((B,), jnp.int32),
        jax.ShapeDtypeStruct((steps, B), jnp.bool_),
    )


def _temp_bytes(fn, steps):
    compiled = brainstate.transform.jit(fn).lower(*_abstract(steps)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _online(algorithm, driver):
    learner = braintrace.compile(_RNN(), algorithm, jnp.zeros((B, I), jnp.float32), batch_size=B)
    if driver == "etrace_train":
        # update_every=7 leaves a remainder at both lengths (1000 = 142 * 7 + 6, 100000 = 14285 * 7 + 5)
        return lambda xs, ys, lengths, resets: learner.etrace_train(
            xs,
            ys,
            step_fn=row_loss,
            optimizer=SGD(),
            update_every=7,
            lengths=lengths,
            resets=resets,
            reduction="mean",
        )[1]
    return lambda xs, ys, lengths, resets: learner.etrace_grad(
        xs,
        ys,
        step_fn=row_loss,
        lengths=lengths,
        resets=resets,
        reduction="mean",
        return_value=True,
        loss_output="scalar",
    )


def _bptt(xs, ys, lengths, resets):
    rng = np.random.default_rng(0)
    params = tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((I, H), (H, H)))

    def total(params):
        w, u = params

        def body(carry, data):
            h, t = carry
            x, y, r = data
            h = jnp.where(r[:, None], 0.0, h)
            h = jnp.tanh(0.5 * h + x @ w + h @ u)
            return (h, t + 1), jnp.sum((t < lengths) * row_loss(h, y))

        _, losses = jax.lax.scan(body, (jnp.zeros((B, H), jnp.float32), 0), (xs, ys, resets))
        return losses.sum()

    return jax.grad(total)(params)


def test_bptt_control_grows_with_the_stream():
    short, long = _temp_bytes(_bptt, SHORT), _temp_bytes(_bptt, LONG)
    assert long - short >= (LONG - SHORT) * B * H * 4, (short, long)


@pytest.mark.parametrize("algorithm,driver", [("d_rtrl", "etrace_train"), ("pp_prop", "etrace_grad")])
def test_online_memory_is_the_same_for_a_hundred_times_longer_stream(algorithm, driver):
    short = _temp_bytes(_online(algorithm, driver), SHORT)
    long = _temp_bytes(_online(algorithm, driver), LONG)
    assert long <= short + 1024, (algorithm, driver, short, long)
