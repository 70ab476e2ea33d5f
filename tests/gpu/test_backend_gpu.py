"""GPU checks of the Pallas backend: the step lowers to Triton kernels under 'pallas' only, and the
online gradients equal the reference backend's."""

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace

pytestmark = pytest.mark.gpu


class _DenseRNN(brainstate.nn.Module):
    def __init__(self, n_in=24, n_hid=40):
        super().__init__()
        k = jax.random.split(jax.random.PRNGKey(0), 3)
        self.w_in = brainstate.ParamState(jax.random.normal(k[0], (n_in, n_hid)) / np.sqrt(n_in))
        self.w_rec = brainstate.ParamState(jax.random.normal(k[1], (n_hid, n_hid)) / np.sqrt(n_hid))
        self.b = brainstate.ParamState(jnp.zeros(n_hid))
        self.n_hid = n_hid

    def init_state(self, batch_size=None, **kw):
        self.i = brainstate.HiddenState(jnp.zeros((batch_size, self.n_hid)))
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, self.n_hid)))

    def update(self, x):
        # Two states per unit (a current driving a potential): the dense kernels serve n >= 2.
        rec = braintrace.matmul(self.h.value, self.w_rec.value, self.b.value)
        self.i.value = 0.7 * self.i.value + braintrace.matmul(x, self.w_in.value) + rec
        self.h.value = 0.5 * self.h.value + 0.5 * jnp.tanh(self.i.value)
        return self.h.value


def _grads_and_hlo(backend, xs, ys):
    with braintrace.backend(backend):
        model = _DenseRNN()
        brainstate.nn.init_all_states(model, batch_size=xs.shape[1])
        alg = braintrace.D_RTRL(model)
        alg.compile_graph(xs[0])
        params = model.states(brainstate.ParamState)

        def step(x, y):
            return brainstate.transform.grad(lambda: jnp.mean((alg(x) - y) ** 2), params)()

        jitted = brainstate.transform.jit(step)
        text = jitted.lower(xs[0], ys[0]).as_text()
        total = None
        for t in range(xs.shape[0]):
            g = jitted(xs[t], ys[t])
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        return total, text


def test_pallas_step_lowers_to_triton_and_matches_xla():
    xs = jax.random.normal(jax.random.PRNGKey(1), (6, 17, 24))
    ys = jax.random.normal(jax.random.PRNGKey(2), (6, 17, 40))
    g_ref, hlo_ref = _grads_and_hlo("xla", xs, ys)
    g_pal, hlo_pal = _grads_and_hlo("pallas", xs, ys)
    assert "triton" in hlo_pal.lower()
    assert "triton" not in hlo_ref.lower()
    for k in g_ref:
        a, b = np.asarray(g_pal[k]), np.asarray(g_ref[k])
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5, k


def _sequence_grads_and_hlo(backend, xs, ys, model_fn):
    """``etrace_grad`` (the update and the solve fused per trace) and its lowered text."""
    with braintrace.backend(backend):
        model = model_fn()
        brainstate.nn.init_all_states(model, batch_size=xs.shape[1])
        learner = braintrace.compile(model, "d_rtrl", xs[0])
        loss = lambda out, y: jnp.mean((out - y) ** 2)
        run = brainstate.transform.jit(lambda xs, ys: learner.etrace_grad(xs, ys, step_fn=loss))
        return run(xs, ys), run.lower(xs, ys).as_text()


class _SparseRNN(brainstate.nn.Module):
    """A leaky RNN with a ``SparseLinear`` recurrence (non-zeros in column order)."""

    def __init__(self, n_in=24, n_hid=300, density=0.1):
        super().__init__()
        from saiunit import sparse as ss

        rng = np.random.default_rng(0)
        dense = np.where(rng.random((n_hid, n_hid)) < density, rng.standard_normal((n_hid, n_hid)), 0.0)
        self.inp = braintrace.nn.Linear(n_in, n_hid)
        self.rec = braintrace.nn.SparseLinear(ss.CSR.fromdense(jnp.asarray(dense * 0.3, jnp.float32)))
        self.n_hid = n_hid

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, self.n_hid)))

    def update(self, x):
        self.h.value = 0.8 * self.h.value + 0.2 * jnp.tanh(self.inp(x) + self.rec(self.h.value))
        return self.h.value


@pytest.mark.parametrize("model_fn,n_out", [(_DenseRNN, 40), (_SparseRNN, 300)], ids=["dense", "sparse"])
def test_sequence_driver_lowers_to_triton_and_matches_xla(model_fn, n_out):
    xs = jax.random.normal(jax.random.PRNGKey(3), (8, 16, 24))
    ys = jax.random.normal(jax.random.PRNGKey(4), (8, 16, n_out))
    g_ref, hlo_ref = _sequence_grads_and_hlo("xla", xs, ys, model_fn)
    g_pal, hlo_pal = _sequence_grads_and_hlo("pallas", xs, ys, model_fn)
    assert "triton" in hlo_pal.lower() and "triton" not in hlo_ref.lower()
    for a, b in zip(jax.tree.leaves(g_pal), jax.tree.leaves(g_ref)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5
