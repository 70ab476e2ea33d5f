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


def _params(dtype=jnp.float64):
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    return {
        "w_in": jax.random.normal(k[0], (I, H), dtype) * 0.5,
        "lora_b": jax.random.normal(k[1], (H, R), dtype) * 0.5,
        "lora_a": jax.random.normal(k[2], (R, H), dtype) * 0.5,
    }


class _LoraRNN(brainstate.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.w_in = brainstate.ParamState(params["w_in"])
        self.lora_b = brainstate.ParamState(params["lora_b"])
        self.lora_a = brainstate.ParamState(params["lora_a"])

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H), self.w_in.value.dtype))

    def update(self, x):
        y = braintrace.lora_matmul(self.h.value, self.lora_b.value, self.lora_a.value, alpha=ALPHA)
        self.h.value = LEAK * self.h.value + (1 - LEAK) * jnp.tanh(y + x @ self.w_in.value)
        return self.h.value


def _step(p, h, x):
    return LEAK * h + (1 - LEAK) * jnp.tanh(ALPHA * (h @ p["lora_b"]) @ p["lora_a"] + x @ p["w_in"])


def _online_grads(p, xs, ys, lam, h0=None):
    """Summed per-step gradients of ``D_RTRL(lora_factored=True)`` on ``_LoraRNN(p)``."""
    model = _LoraRNN(p)
    brainstate.nn.init_all_states(model, batch_size=B)
    if h0 is not None:
        model.h.value = h0
    alg = braintrace.D_RTRL(model, lora_factored=True, decay_or_rank=lam)
    alg.compile_graph(xs[0])
    params = model.states(brainstate.ParamState)
    step = brainstate.transform.jit(
        lambda x, y: brainstate.transform.grad(lambda: jnp.sum((alg(x) - y) ** 2), params)()
    )
    total = None
    for t in range(xs.shape[0]):
        g = step(xs[t], ys[t])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return {k[0]: np.asarray(v) for k, v in total.items()}, alg


def _rel_err(got, want):
    want = np.asarray(want, np.float64)
    return np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)


def _oracle(p, xs, ys, lam=LAM):
    """Plain-jnp factored-B / exact-A D-RTRL of the model above; returns summed gradients."""
    h = jnp.zeros((B, H))
    eps_x, eps_f, ta = jnp.zeros((B, H)), jnp.zeros((B, H)), jnp.zeros((B, R, H))
    g_b, g_a = jnp.zeros((H, R)), jnp.zeros((R, H))
    for t in range(xs.shape[0]):
        z = h @ p["lora_b"]
        u = ALPHA * z @ p["lora_a"] + xs[t] @ p["w_in"]
        h_new = LEAK * h + (1 - LEAK) * jnp.tanh(u)
        df = (1 - LEAK) * (1 - jnp.tanh(u) ** 2)  # dh/dy per unit; D = LEAK
        eps_x = lam * eps_x + h
        eps_f = lam * LEAK * eps_f + (1 - lam) * df
        ta = LEAK * ta + z[:, :, None] * (ALPHA * df)[:, None, :]
        ct = 2 * (h_new - ys[t])
        g = ct * eps_f / (1 - lam ** (t + 1))
        g_b += ALPHA * (eps_x.T @ g) @ p["lora_a"].T
        g_a += jnp.einsum("bk,brk->rk", ct, ta)
        h = h_new
    return {"lora_b": g_b, "lora_a": g_a}


def test_factored_lora_equals_plain_jnp_recursion():
    p = _params()
    xs = jax.random.normal(jax.random.PRNGKey(4), (T, B, I), jnp.float64)
    ys = jax.random.normal(jax.random.PRNGKey(5), (T, B, H), jnp.float64)
    total, alg = _online_grads(p, xs, ys, LAM)
    want = _oracle(p, xs, ys)
    for k in ("lora_b", "lora_a"):
        err = _rel_err(total[k], want[k])
        assert err < 1e-10, (k, err)
    # The factored trace holds no (B, I, O, n) leaf, and its normaliser is a float scalar.
    leaves = jax.tree.leaves(alg.etrace.value)
    assert (B, H, H, 1) not in [np.shape(v) for v in leaves]
    trace = next(v for v in alg.etrace.value.values() if isinstance(v, dict) and "eps_f" in v)
    assert "count" not in trace
    assert trace["eps_f_norm"].shape == () and trace["eps_f_norm"].dtype == trace["eps_f"].dtype


def _float32_data(steps):
    p = _params(jnp.float32)
    xs = jax.random.normal(jax.random.PRNGKey(4), (steps, B, I), jnp.float32)
    ys = jax.random.normal(jax.random.PRNGKey(5), (steps, B, H), jnp.float32)
    return p, xs, ys


def test_decay_within_ulps_of_one_gives_finite_float32_gradients():
    # 0.99999999 rounds to 1.0 in float32: 1 - lam ** t would be 0 and the lora_b gradient infinite.
    # The normaliser makes the float32 trace a running mean, which the float64 recursion matches.
    jax.config.update("jax_enable_x64", False)
    lam = 0.99999999
    p, xs, ys = _float32_data(T)
    total, alg = _online_grads(p, xs, ys, lam)
    for k, v in total.items():
        assert v.dtype == np.float32, k
        assert np.all(np.isfinite(v)), k
    jax.config.update("jax_enable_x64", True)
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p)
    want = _oracle(p64, xs.astype(jnp.float64), ys.astype(jnp.float64), lam=lam)
    for k in ("lora_b", "lora_a"):
        err = _rel_err(total[k], want[k])
        assert err < 1e-4, (k, err)


def test_decay_near_one_is_exact_at_the_first_step_float32():
    # At T = 1 the factored trace is exact: eps_x = h0, eps_f / c = df. With lam = 0.999999 in
    # float32, 1 - lam differs from the (1 - lam) that scales eps_f by about 1%; the normaliser does not.
    jax.config.update("jax_enable_x64", False)
    p, xs, ys = _float32_data(1)
    h0 = jax.random.normal(jax.random.PRNGKey(6), (B, H), jnp.float32)
    total, _ = _online_grads(p, xs, ys, 0.999999, h0=h0)
    exact = jax.grad(lambda q: jnp.sum((_step(q, h0, xs[0]) - ys[0]) ** 2))(p)
    for k in ("lora_b", "lora_a", "w_in"):
        assert np.all(np.isfinite(total[k])), k
        err = _rel_err(total[k], exact[k])
        assert err < 1e-5, (k, err)


def test_factored_option_validates_decay():
    model = _LoraRNN(_params())
    with pytest.raises(ValueError, match="decay_or_rank"):
        braintrace.D_RTRL(model, lora_factored=True, decay_or_rank=1.5)
