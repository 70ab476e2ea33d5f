"""D_RTRL with ``lora_factored=True``: the LoRA ``B`` factor's trace is factored as in ES-D-RTRL
while ``A`` keeps its exact trace. Checked against an independent plain-jnp recursion."""

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace

B, I, H, R, T, ALPHA, LAM, LEAK = 3, 4, 6, 2, 8, 1.5, 0.7, 0.8


@pytest.fixture(autouse=True)
def _x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def _params():
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    return {
        "w_in": jax.random.normal(k[0], (I, H), jnp.float64) * 0.5,
        "lora_b": jax.random.normal(k[1], (H, R), jnp.float64) * 0.5,
        "lora_a": jax.random.normal(k[2], (R, H), jnp.float64) * 0.5,
    }


class _LoraRNN(brainstate.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.w_in = brainstate.ParamState(params["w_in"])
        self.lora_b = brainstate.ParamState(params["lora_b"])
        self.lora_a = brainstate.ParamState(params["lora_a"])

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H), jnp.float64))

    def update(self, x):
        y = braintrace.lora_matmul(self.h.value, self.lora_b.value, self.lora_a.value, alpha=ALPHA)
        self.h.value = LEAK * self.h.value + (1 - LEAK) * jnp.tanh(y + x @ self.w_in.value)
        return self.h.value


def _oracle(p, xs, ys):
    """Plain-jnp factored-B / exact-A D-RTRL of the model above; returns summed gradients."""
    h = jnp.zeros((B, H))
    eps_x, eps_f, ta = jnp.zeros((B, H)), jnp.zeros((B, H)), jnp.zeros((B, R, H))
    g_b, g_a = jnp.zeros((H, R)), jnp.zeros((R, H))
    for t in range(xs.shape[0]):
        z = h @ p["lora_b"]
        u = ALPHA * z @ p["lora_a"] + xs[t] @ p["w_in"]
        h_new = LEAK * h + (1 - LEAK) * jnp.tanh(u)
        df = (1 - LEAK) * (1 - jnp.tanh(u) ** 2)  # dh/dy per unit; D = LEAK
        eps_x = LAM * eps_x + h
        eps_f = LAM * LEAK * eps_f + (1 - LAM) * df
        ta = LEAK * ta + z[:, :, None] * (ALPHA * df)[:, None, :]
        ct = 2 * (h_new - ys[t])
        g = ct * eps_f / (1 - LAM ** (t + 1))
        g_b += ALPHA * (eps_x.T @ g) @ p["lora_a"].T
        g_a += jnp.einsum("bk,brk->rk", ct, ta)
        h = h_new
    return {"lora_b": g_b, "lora_a": g_a}


def test_factored_lora_equals_plain_jnp_recursion():
    p = _params()
    xs = jax.random.normal(jax.random.PRNGKey(4), (T, B, I), jnp.float64)
    ys = jax.random.normal(jax.random.PRNGKey(5), (T, B, H), jnp.float64)
    model = _LoraRNN(p)
    brainstate.nn.init_all_states(model, batch_size=B)
    alg = braintrace.D_RTRL(model, lora_factored=True, decay_or_rank=LAM)
    alg.compile_graph(xs[0])
    params = model.states(brainstate.ParamState)
    step = brainstate.transform.jit(
        lambda x, y: brainstate.transform.grad(lambda: jnp.sum((alg(x) - y) ** 2), params)()
    )
    total = None
    for t in range(T):
        g = step(xs[t], ys[t])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    want = _oracle(p, xs, ys)
    for k in ("lora_b", "lora_a"):
        got = np.asarray(total[(k,)])
        err = np.linalg.norm(got - np.asarray(want[k])) / np.linalg.norm(np.asarray(want[k]))
        assert err < 1e-10, (k, err)
    # The factored trace holds no (B, I, O, n) leaf.
    shapes = [np.shape(v) for v in jax.tree.leaves(alg.etrace.value)]
    assert (B, H, H, 1) not in shapes


def test_factored_option_validates_decay():
    model = _LoraRNN(_params())
    with pytest.raises(ValueError, match="decay_or_rank"):
        braintrace.D_RTRL(model, lora_factored=True, decay_or_rank=1.5)
