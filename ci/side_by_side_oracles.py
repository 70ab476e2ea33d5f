"""The online algorithms' definitions in plain ``jnp`` (float64) for the models of
``side_by_side_models.build_workload``: independent oracles that say which package is right where
this package and the published braintrace differ.

* :func:`d_rtrl_oracle`: the masked-RTRL recursion with the hidden Jacobian ``D_t`` of the step
  with every ETP output held fixed, per unit and per hidden group. Per step, ``J_t`` is the Jacobian
  of the group's states in its trainable weights with the previous states held fixed,
  ``eps_t = D_t eps_{t-1} + J_t``, and the gradient is ``sum_t dL_t/dh_t . eps_t``.
* :func:`pp_prop_oracle`: ``eps_x <- lam eps_x + x_t`` per op input, ``eps_f <- lam D_t eps_f +
  (1 - lam) df_t`` per group (a contraction over the unit's states), weight gradient
  ``eps_x^T (dL_t/dh_t . eps_f) / (1 - lam^(t+1))`` (its SDDMM for a sparse weight); a bias keeps the
  exact trace ``eps_b <- D_t eps_b + df_t``. Every parameter of the models except the LoRA factors.

The RNNs have one group, ``h``, with ``D = (1 - a) I``. The LIF network has two: ``(g, v)``, two states
per unit fed by ``w_in`` and ``w_rec`` (``D_t`` per unit is the 2 x 2 Jacobian of ``(g_t, v_t)`` in
``(g_{t-1}, v_{t-1})`` with the synaptic drive held fixed, taken in forward mode with all-ones
tangents since the map is per unit), and ``r``, fed by ``w_out`` (``D = OUT_DECAY``). A plain
parameter (the RNNs' ``w_out``) gets its within-step gradient. ``dL_t/dv_t`` includes the path
through the step's read-out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from side_by_side_models import (
    LEAK,
    OUT_DECAY,
    csr_product,
    initial_weights,
    make_sequences,
    rnn_preactivation,
    rnn_step,
    snn_intrinsic,
    snn_step,
    spike,
)

__all__ = ["d_rtrl_oracle", "pp_prop_oracle"]


def _x64():
    jax.config.update("jax_enable_x64", True)  # the caller computes nothing else with jax


def _tolist(tree):
    return {k: np.asarray(v).tolist() for k, v in tree.items()}


def d_rtrl_oracle(spec: dict, T: int) -> dict:
    """D_RTRL's summed gradients over ``T`` steps from zero states (see the module docstring)."""
    _x64()
    return _snn_d_rtrl(spec, T) if spec["name"] == "snn" else _rnn_d_rtrl(spec, T)


def pp_prop_oracle(spec: dict, T: int, lam: float) -> dict:
    """pp_prop's summed gradients with decay ``lam`` (for the LoRA RNN, all but the LoRA factors)."""
    _x64()
    return _snn_pp_prop(spec, T, lam) if spec["name"] == "snn" else _rnn_pp_prop(spec, T, lam)


# --------------------------------------------------------------------------------------------------
# RNNs
# --------------------------------------------------------------------------------------------------


def _rnn_parts(spec, T):
    w = initial_weights(spec)
    fixed = {k: w[k] for k in ("indices", "indptr") if k in w}
    trainable = {k: jnp.asarray(v) for k, v in w.items() if k not in fixed and k != "w_out"}
    xs, ys = make_sequences(spec, T, np.float64)
    return fixed, trainable, jnp.asarray(w["w_out"]), xs, ys


def _mse(h, w_out, y):
    return jnp.mean((h @ w_out - y) ** 2)


def _rnn_d_rtrl(spec, T):
    kind = spec["name"]
    fixed, trainable, w_out, xs, ys = _rnn_parts(spec, T)
    theta, unravel = ravel_pytree(trainable)

    @jax.jit
    def step(h, eps, x, y):
        def new_h(th):
            return rnn_step(kind, {**unravel(th), **fixed, "w_out": w_out}, h, x)[0]

        eps = (1.0 - LEAK) * eps + jax.jacfwd(new_h)(theta)  # (B, H, P)
        h = new_h(theta)
        g_h, g_out = jax.grad(_mse, argnums=(0, 1))(h, w_out, y)
        return h, eps, jnp.einsum("bh,bhp->p", g_h, eps), g_out

    B, H = spec["batch"], spec["n_hid"]  # noqa: N806
    h, eps = jnp.zeros((B, H)), jnp.zeros((B, H, theta.size))
    g_theta, g_out = jnp.zeros_like(theta), jnp.zeros_like(w_out)
    for t in range(T):
        h, eps, gt, go = step(h, eps, jnp.asarray(xs[t]), jnp.asarray(ys[t]))
        g_theta, g_out = g_theta + gt, g_out + go
    return {**_tolist(unravel(g_theta)), "w_out": np.asarray(g_out).tolist()}


def _rnn_pp_prop(spec, T, lam):
    kind = spec["name"]
    fixed, ws, w_out, xs, ys = _rnn_parts(spec, T)
    B, H = spec["batch"], spec["n_hid"]  # noqa: N806
    all_ws = {**ws, **fixed, "w_out": w_out}
    indptr = np.asarray(fixed.get("indptr", [0]))
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))

    def rec_grad(ex, signal):
        if kind == "dense":
            return ex.T @ signal
        return jnp.sum(ex[:, rows] * signal[:, np.asarray(fixed["indices"])], axis=0)  # SDDMM

    @jax.jit
    def step(carry, x, y, corr):
        h, ex_in, ex_rec, ef, eb = carry
        df = LEAK * (1.0 - jnp.tanh(rnn_preactivation(kind, all_ws, h, x)) ** 2)  # dh_t/dy_t per unit
        ex_in, ex_rec = lam * ex_in + x, lam * ex_rec + h
        ef = lam * (1.0 - LEAK) * ef + (1.0 - lam) * df
        eb = (1.0 - LEAK) * eb + df
        h_new = rnn_step(kind, all_ws, h, x)[0]
        g_h, g_out = jax.grad(_mse, argnums=(0, 1))(h_new, w_out, y)
        signal = g_h * ef / corr
        grads = {"w_in": ex_in.T @ signal, "b_in": jnp.sum(g_h * eb, 0), "w_out": g_out}
        if kind != "lora":  # the LoRA factors' rule is not written out here
            grads["w_rec"] = rec_grad(ex_rec, signal)
        return (h_new, ex_in, ex_rec, ef, eb), grads

    zeros = jnp.zeros((B, H))
    carry = (zeros, jnp.zeros((B, spec["n_in"])), zeros, zeros, zeros)
    total = None
    for t in range(T):
        carry, grads = step(carry, jnp.asarray(xs[t]), jnp.asarray(ys[t]), 1.0 - lam ** (t + 1))
        total = grads if total is None else {k: total[k] + grads[k] for k in total}
    return _tolist(total)


# --------------------------------------------------------------------------------------------------
# The LIF network
# --------------------------------------------------------------------------------------------------


def _snn_parts(spec, T):
    w = initial_weights(spec)
    fixed = {"indices": w["indices"], "indptr": w["indptr"]}
    ws = {"w_in": jnp.asarray(w["w_in"]), "w_rec": jnp.asarray(w["w_rec"]), "w_out": jnp.asarray(w["w_out"])}
    xs, ys = make_sequences(spec, T, np.float64)
    return fixed, ws, xs, ys


def _snn_local(ws, fixed, state, x, y, H):  # noqa: N803
    """One step's per-unit pieces: the new state, the drive, ``D`` (four per-unit vectors), ``df``
    (two), ``dL_t/dv_t`` and ``dL_t/dr_t``."""
    g0, v0, r0 = state
    drive = x @ ws["w_in"] + csr_product(spike(v0), ws["w_rec"], fixed["indices"], fixed["indptr"], H)
    ones = jnp.ones_like(g0)
    _, (dg_dg, dv_dg) = jax.jvp(lambda g: snn_intrinsic(g, v0, drive), (g0,), (ones,))
    _, (dg_dv, dv_dv) = jax.jvp(lambda v: snn_intrinsic(g0, v, drive), (v0,), (ones,))
    _, (df_g, df_v) = jax.jvp(lambda d: snn_intrinsic(g0, v0, d), (drive,), (ones,))
    g1, v1, r1 = snn_step({**ws, **fixed}, state, x)

    def loss_of(v):
        return jnp.mean((OUT_DECAY * r0 + spike(v) @ ws["w_out"] - y) ** 2)

    dl_dv = jax.grad(loss_of)(v1)
    dl_dr = jax.grad(lambda r: jnp.mean((r - y) ** 2))(r1)
    return (g1, v1, r1), (dg_dg, dg_dv, dv_dg, dv_dv), (df_g, df_v), dl_dv, dl_dr


def _apply_d(d, eg, ev):
    """``D eps`` per unit, ``D = [[dg_dg, dg_dv], [dv_dg, dv_dv]]``; ``eps`` may carry trailing axes."""
    dg_dg, dg_dv, dv_dg, dv_dv = (a.reshape(a.shape + (1,) * (eg.ndim - a.ndim)) for a in d)
    return dg_dg * eg + dg_dv * ev, dv_dg * eg + dv_dv * ev


def _snn_d_rtrl(spec, T):
    fixed, ws, xs, ys = _snn_parts(spec, T)
    B, H = spec["batch"], spec["n_hid"]  # noqa: N806
    theta, unravel = ravel_pytree({"w_in": ws["w_in"], "w_rec": ws["w_rec"]})

    @jax.jit
    def step(state, eps_g, eps_v, eps_r, x, y):
        g0, v0, r0 = state
        new, d, _, dl_dv, dl_dr = _snn_local(ws, fixed, state, x, y, H)

        def gv(th):
            g1, v1, _ = snn_step({**ws, **unravel(th), **fixed}, (g0, v0, r0), x)
            return g1, v1

        jg, jv = jax.jacfwd(gv)(theta)  # (B, H, P) each
        eps_g, eps_v = _apply_d(d, eps_g, eps_v)
        eps_g, eps_v = eps_g + jg, eps_v + jv
        eps_r = OUT_DECAY * eps_r + spike(new[1])[:, :, None]  # (B, H, O): w_out[:, k] feeds r_k
        return (
            new,
            eps_g,
            eps_v,
            eps_r,
            jnp.einsum("bh,bhp->p", dl_dv, eps_v),
            jnp.einsum("bk,bik->ik", dl_dr, eps_r),
        )

    state = (jnp.zeros((B, H)), jnp.zeros((B, H)), jnp.zeros((B, spec["n_out"])))
    eps_g = eps_v = jnp.zeros((B, H, theta.size))
    eps_r = jnp.zeros((B, H, spec["n_out"]))
    g_theta, g_out = jnp.zeros_like(theta), jnp.zeros_like(ws["w_out"])
    for t in range(T):
        x, y = jnp.asarray(xs[t]), jnp.asarray(ys[t])
        state, eps_g, eps_v, eps_r, gt, go = step(state, eps_g, eps_v, eps_r, x, y)
        g_theta, g_out = g_theta + gt, g_out + go
    return {**_tolist(unravel(g_theta)), "w_out": np.asarray(g_out).tolist()}


def _snn_pp_prop(spec, T, lam):
    fixed, ws, xs, ys = _snn_parts(spec, T)
    B, H, O = spec["batch"], spec["n_hid"], spec["n_out"]  # noqa: N806
    indptr = np.asarray(fixed["indptr"])
    rows, cols = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)), np.asarray(fixed["indices"])

    @jax.jit
    def step(carry, x, y, corr):
        state, ex_in, ex_rec, ex_out, ef_g, ef_v, ef_r = carry
        new, d, (df_g, df_v), dl_dv, dl_dr = _snn_local(ws, fixed, state, x, y, H)
        ex_in, ex_rec, ex_out = lam * ex_in + x, lam * ex_rec + spike(state[1]), lam * ex_out + spike(new[1])
        ef_g, ef_v = _apply_d(d, ef_g, ef_v)
        ef_g, ef_v = lam * ef_g + (1.0 - lam) * df_g, lam * ef_v + (1.0 - lam) * df_v
        ef_r = lam * OUT_DECAY * ef_r + (1.0 - lam)
        signal = dl_dv * ef_v / corr  # dL_t/dg_t is zero
        grads = {
            "w_in": ex_in.T @ signal,
            "w_rec": jnp.sum(ex_rec[:, rows] * signal[:, cols], axis=0),
            "w_out": ex_out.T @ (dl_dr * ef_r / corr),
        }
        return (new, ex_in, ex_rec, ex_out, ef_g, ef_v, ef_r), grads

    zeros = jnp.zeros((B, H))
    state = (zeros, zeros, jnp.zeros((B, O)))
    carry = (state, jnp.zeros((B, spec["n_in"])), zeros, zeros, zeros, zeros, jnp.zeros((B, O)))
    total = {k: jnp.zeros_like(v) for k, v in ws.items()}
    for t in range(T):
        carry, grads = step(carry, jnp.asarray(xs[t]), jnp.asarray(ys[t]), 1.0 - lam ** (t + 1))
        total = {k: total[k] + grads[k] for k in total}
    return _tolist(total)
