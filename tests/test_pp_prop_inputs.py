"""pp_prop's input trace filters a real-valued input: an embedding's one-hot rows (not its integer
indices), and integer or boolean inputs in a floating dtype."""

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

import braintrace
from tests._numerics import assert_close
from tests.online_models import float64

B, V, H, T = 3, 5, 4, 6


class Net(brainstate.nn.Module):
    """``h' = 0.7 h + 0.3 tanh(T[i] + h W)``, the lookup an embedding or a one-hot matmul."""

    def __init__(self, one_hot: bool):
        super().__init__()
        rng = np.random.default_rng(0)
        self.one_hot = one_hot
        self.table = brainstate.ParamState(jnp.asarray(rng.normal(0, 0.5, (V, H))))
        self.w = brainstate.ParamState(jnp.asarray(rng.normal(0, 0.4, (H, H))))

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

    def update(self, i):
        if self.one_hot:
            e = braintrace.matmul(jax.nn.one_hot(i, V, dtype=self.table.value.dtype), self.table.value)
        else:
            e = braintrace.embedding(i, self.table.value)
        self.h.value = 0.7 * self.h.value + 0.3 * jnp.tanh(e + braintrace.matmul(self.h.value, self.w.value))
        return self.h.value


def _grads(one_hot, xs, ys):
    model = Net(one_hot)
    brainstate.nn.init_all_states(model, batch_size=B)
    learner = braintrace.pp_prop(model, decay_or_rank=0.8)
    learner.compile_graph(xs[0])
    return learner.etrace_grad(xs, ys, step_fn=lambda out, y: jnp.sum((out - y) ** 2))


def test_embedding_input_trace_filters_one_hot_rows():
    with float64():
        rng = np.random.default_rng(1)
        xs = jnp.asarray(rng.integers(0, V, (T, B)), jnp.int32)
        ys = jnp.asarray(rng.normal(size=(T, B, H)))
        expected = _grads(True, xs, ys)
        got = _grads(False, xs, ys)
        assert_close(got[("table",)], expected[("table",)], np.float64)
        assert_close(got[("w",)], expected[("w",)], np.float64)
