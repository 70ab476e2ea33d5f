"""``braintrace.EProp`` against a plain-``jnp`` implementation of the e-prop equations (float64).

Networks: ``braintrace.nn.Linear`` (input, with bias) and a recurrent ``Linear`` on the previous
spikes drive ``braintrace.nn.LIF`` or ``braintrace.nn.ALIF`` neurons; a
``braintrace.nn.LeakyRateReadout`` reads the spikes; loss ``sum_t |r_t - y_t|^2``.

The oracle (Bellec et al. 2020, in the notation of ``EProp``'s docstring), written from the
neuron equations alone:

* eligibility vectors :math:`\\epsilon_t = D_t \\epsilon_{t-1} + \\partial h_t/\\partial W` with
  :math:`D_t` the neuron's own Jacobian (the recurrent input held fixed), per state;
* the optional filter :math:`\\bar\\epsilon_t = \\kappa\\bar\\epsilon_{t-1} + \\epsilon_t`;
* the learning signal :math:`L_t = e_t B` with the output error :math:`e_t = \\partial L_t/\\partial r_t`
  and :math:`B = W_{out}^\\top` (symmetric) or the learner's fixed random matrix;
* :math:`\\nabla W = \\sum_t L_t\\,(\\partial z_t/\\partial h_t) \\cdot \\bar\\epsilon_t` with the
  pseudo-derivative of the surrogate spike function;
* the read-out weights: :math:`\\sum_t e_t\\,\\mathcal F_\\alpha(z)_t` (the read-out's own leak).
"""

from __future__ import annotations

import functools
import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import braintrace
from braintrace import nn

DT = 1.0 * u.ms
TAU, TAU_A, TAU_R = 5.0, 20.0, 4.0
BETA_A = 0.3
T, B, I, H, O = 7, 2, 3, 4, 2


@pytest.fixture(autouse=True)
def _env64():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with brainstate.environ.context(precision=64, dt=DT):
            yield


def spk(v):
    return nn.surrogate.sigmoid(v)


def psi(v):
    """The pseudo-derivative: the surrogate's derivative, element by element."""
    return jax.vmap(jax.grad(lambda s: spk(s)))(v.ravel()).reshape(v.shape)


class RSNN(brainstate.nn.Module):
    def __init__(self, p, neuron):
        super().__init__()
        self.inp = nn.Linear(I, H, w_init=p["w_in"], b_init=p["b_in"])
        self.rec = nn.Linear(H, H, w_init=p["w_rec"], b_init=None)
        if neuron == "lif":
            self.neu = nn.LIF(H, tau=TAU * u.ms, spk_fun=spk)
        else:
            self.neu = nn.ALIF(H, tau=TAU * u.ms, tau_a=TAU_A * u.ms, beta=BETA_A, spk_fun=spk)
        self.ro = nn.LeakyRateReadout(H, O, tau=TAU_R * u.ms, w_init=p["w_out"])

    def update(self, x):
        z_prev = self.neu.get_spike()
        return self.ro(self.neu(self.inp(x) + self.rec(z_prev)))


def params(seed):
    rng = np.random.default_rng(seed)
    return {
        "w_in": jnp.asarray(rng.normal(size=(I, H)) * 2.0),
        "b_in": jnp.asarray(rng.normal(size=H)),
        "w_rec": jnp.asarray(rng.normal(size=(H, H))),
        "w_out": jnp.asarray(rng.normal(size=(H, O))),
    }


def data(seed):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(T, B, I)) * 2.0), jnp.asarray(rng.normal(size=(T, B, O)))


def mse(out, y):
    return jnp.sum((out - y) ** 2)


@functools.partial(jax.jit, static_argnums=(3,))
def _oracle(p, xs, ys, neuron, kappa, fb):
    beta, alpha, rho = np.exp(-1.0 / TAU), np.exp(-1.0 / TAU_R), np.exp(-1.0 / TAU_A)
    n = 1 if neuron == "lif" else 2
    sens = jnp.array([1.0]) if n == 1 else jnp.array([1.0, -BETA_A])  # dz/dh over psi

    def step(carry, xy):
        V, a, r, eps, bar, eps_out, grads = carry
        x, y = xy
        u_prev = V - 1.0 - (BETA_A * a if n == 2 else 0.0)  # V_th = 1, V_th - V_reset = 1
        z_prev, psi_prev = spk(u_prev), psi(u_prev)
        current = x @ p["w_in"] + p["b_in"] + z_prev @ p["w_rec"]
        V = beta * (V - z_prev) + (1 - beta) * current
        if n == 1:
            D = (beta * (1 - psi_prev))[..., None, None]
        else:
            a = rho * (a + z_prev)
            D = jnp.stack(
                [
                    jnp.stack([beta * (1 - psi_prev), beta * BETA_A * psi_prev], -1),
                    jnp.stack([rho * psi_prev, rho * (1 - BETA_A * psi_prev)], -1),
                ],
                -2,
            )
        df = jnp.zeros((B, H, n)).at[..., 0].set(1 - beta)  # only V sees the input current
        u_t = V - 1.0 - (BETA_A * a if n == 2 else 0.0)
        z = spk(u_t)
        r = alpha * r + z @ p["w_out"]
        err = 2 * (r - y)  # the output error dL_t/dr_t
        signal = (err @ fb)[..., None] * psi(u_t)[..., None] * sens  # L_t dz/dh, (B, H, n)
        eps = {
            "w_in": jnp.einsum("bjsk,bijk->bijs", D, eps["w_in"]) + x[:, :, None, None] * df[:, None],
            "w_rec": jnp.einsum("bjsk,bijk->bijs", D, eps["w_rec"]) + z_prev[:, :, None, None] * df[:, None],
            "b_in": jnp.einsum("bjsk,bjk->bjs", D, eps["b_in"]) + df,
        }
        bar = {k: kappa * bar[k] + eps[k] for k in eps}
        eps_out = alpha * eps_out + z[:, :, None]
        grads = {
            "w_in": grads["w_in"] + jnp.einsum("bjs,bijs->ij", signal, bar["w_in"]),
            "w_rec": grads["w_rec"] + jnp.einsum("bjs,bijs->ij", signal, bar["w_rec"]),
            "b_in": grads["b_in"] + jnp.einsum("bjs,bjs->j", signal, bar["b_in"]),
            "w_out": grads["w_out"] + jnp.einsum("bk,bjk->jk", err, eps_out),
        }
        return (V, a, r, eps, bar, eps_out, grads), None

    eps = {k: jnp.zeros(s + (n,)) for k, s in (("w_in", (B, I, H)), ("b_in", (B, H)), ("w_rec", (B, H, H)))}
    zeros = {k: jnp.zeros_like(v) for k, v in p.items()}
    init = (jnp.zeros((B, H)), jnp.zeros((B, H)), jnp.zeros((B, O)), eps, eps, jnp.zeros((B, H, O)), zeros)
    return jax.lax.scan(step, init, (xs, ys))[0][-1]


def eprop_oracle(p, xs, ys, neuron, kappa, feedback):
    """The e-prop gradient of every weight, in plain jnp (see the module docstring); ``feedback``
    ``None`` is the symmetric signal (``B = W_out^T``)."""
    fb = p["w_out"].T if feedback is None else feedback  # (O, H)
    return _oracle(p, xs, ys, neuron, jnp.asarray(kappa, jnp.float64), jnp.asarray(fb))


def as_named(g):
    return {
        "w_in": g[("inp", "weight")]["weight"],
        "b_in": g[("inp", "weight")]["bias"],
        "w_rec": g[("rec", "weight")]["weight"],
        "w_out": g[("ro", "weight")],
    }


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def readout_feedback(learner):
    """The fixed random matrix ``B`` ``(O, H)`` the learner drew for the read-out's weight."""
    (rel,) = [r for r in learner.graph.hidden_param_op_relations if r.y_var.aval.shape == (B, O)]
    return learner.random_feedback[rel.eqn_index]["weight"].B


def per_step_grads(learner, model, xs, ys):
    """The per-step rule under ``brainstate.transform.grad`` (the custom_vjp path), summed."""
    params_ = model.states(brainstate.ParamState)
    step = brainstate.transform.jit(
        lambda x, y: brainstate.transform.grad(lambda: mse(learner(x), y), params_)()
    )
    total = None
    for t in range(T):
        g = step(xs[t], ys[t])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total


CASES = [
    ("lif", 0.6, "symmetric"),
    ("lif", 0.6, "random"),
    ("alif", 0.0, "symmetric"),
    ("alif", 0.5, "random"),
]


@pytest.mark.parametrize("neuron, kappa, feedback", CASES)
def test_eprop_equals_the_eprop_equations(neuron, kappa, feedback):
    p = params(0)
    xs, ys = data(1)
    model = RSNN(p, neuron)
    options = {"feedback": feedback, "kappa_filter_decay": kappa}
    if feedback == "random":
        options["random_feedback_key"] = 7
    learner = braintrace.compile(model, braintrace.EProp, xs[0], batch_size=B, **options)
    fb = readout_feedback(learner) if feedback == "random" else None
    if fb is not None:  # the random matrix is not the read-out's weight, and it is used
        assert fb.shape == (O, H) and rel_err(fb, p["w_out"].T) > 0.5
    got = as_named(learner.etrace_grad(xs, ys, step_fn=mse))
    want = eprop_oracle(p, xs, ys, neuron, kappa, fb)
    for k in want:
        assert np.linalg.norm(np.asarray(want[k])) > 0, k
        assert rel_err(got[k], want[k]) < 1e-10, (k, rel_err(got[k], want[k]))
    if neuron == "lif" and kappa > 0:  # the filter changes the gradient of the weights behind the read-out
        plain = eprop_oracle(p, xs, ys, neuron, 0.0, fb)
        assert rel_err(plain["w_in"], want["w_in"]) > 1e-2
        assert rel_err(plain["w_out"], want["w_out"]) == 0.0
    if kappa == 0 and feedback == "symmetric":  # e-prop without the filter is D-RTRL, exactly
        d_rtrl = braintrace.compile(RSNN(p, neuron), "d_rtrl", xs[0], batch_size=B)
        d_rtrl = as_named(d_rtrl.etrace_grad(xs, ys, step_fn=mse))
        for k in want:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(d_rtrl[k]))


def test_random_feedback_per_step_path_equals_the_driver():
    """``learner(x)`` under ``brainstate.transform.grad`` (the step's custom_vjp) gives the same
    random-feedback gradient as ``etrace_grad``, and it differs from the symmetric one."""
    p = params(2)
    xs, ys = data(3)
    kw = dict(feedback="random", random_feedback_key=jax.random.PRNGKey(4), kappa_filter_decay=0.3)
    model = RSNN(p, "lif")
    learner = braintrace.compile(model, "eprop", xs[0], batch_size=B, **kw)
    stepped = as_named(per_step_grads(learner, model, xs, ys))
    want = eprop_oracle(p, xs, ys, "lif", 0.3, readout_feedback(learner))
    for k in want:
        assert rel_err(stepped[k], want[k]) < 1e-10, k
    symmetric = eprop_oracle(p, xs, ys, "lif", 0.3, None)
    assert rel_err(symmetric["w_in"], want["w_in"]) > 1e-2


def test_a_reset_restarts_the_filtered_traces():
    """After ``reset_all_states`` the filtered traces restart with the traces: the gradient of the
    steps after the reset equals that of a fresh learner over the same steps."""
    p = params(8)
    xs, ys = data(9)
    kw = dict(kappa_filter_decay=0.7)
    model = RSNN(p, "lif")
    learner = braintrace.compile(model, "e_prop", xs[0], batch_size=B, **kw)
    warm_up = brainstate.transform.jit(learner)
    for t in range(4):
        warm_up(xs[t])
    brainstate.nn.reset_all_states(model, batch_size=B)
    after = per_step_grads(learner, model, xs, ys)
    fresh_model = RSNN(p, "lif")
    fresh = braintrace.compile(fresh_model, "e_prop", xs[0], batch_size=B, **kw)
    want = per_step_grads(fresh, fresh_model, xs, ys)
    for k, v in as_named(want).items():
        assert rel_err(as_named(after)[k], v) < 1e-12, k
