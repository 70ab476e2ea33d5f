"""A custom ETP primitive, registered from an ``ETPPrimitiveSpec``, trained online with D-RTRL.

The primitive is a scaled matmul ``y = scale * x W`` with its four ETP rules:

* ``xy_to_dw(x, g, weights)``: the VJP of the op for the cotangent ``g = dh/dy``: ``scale * x^T g``;
* ``yw_to_w(d, trace)``: the ``y -> W`` link. ``y_k`` depends on ``W[:, k]`` only, so a per-unit factor
  ``d_k`` scales column ``k`` of the trace. The constant ``scale`` is NOT applied here: it is already in
  ``xy_to_dw``, and the trace update ``eps <- yw_to_w(D, eps) + xy_to_dw(x, df)`` would otherwise multiply
  the trace by ``scale`` at every step (``scale^t`` after ``t`` steps);
* ``init_drtrl`` / ``init_pp``: zero traces of shape ``(batch, I, O, n)`` and ``(batch, O, n)``.

A layer of leaky units ``h_t = a h_{t-1} + scale * x_t W`` (each unit's recurrence is its own leak, so
D-RTRL is exact here) learns to imitate a teacher of the same form. The script checks the rules,
compares the online gradient with BPTT (and shows what a ``scale`` in ``yw_to_w`` would do), then trains
with Adam.

    python examples/custom_primitive.py            # a few seconds on a CPU
    python examples/custom_primitive.py --tiny     # (used by the tests)
"""

from __future__ import annotations

import argparse
import dataclasses

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import braintrace

LEAK = 0.8  # a in h_t = a h_{t-1} + y_t
SCALE = 0.5


# --------------------------------------------------------------------------------------------------
# the primitive: implementation and the four ETP rules
# --------------------------------------------------------------------------------------------------


def scaled_impl(x, w, *, scale=1.0):
    """``y = scale * x @ w``; ``x`` is ``(batch, I)``, ``w`` is ``(I, O)``."""
    return scale * (x @ w)


def xy_to_dw(x, g, weights, *, scale=1.0):
    """``dh/dW = scale * x^T g`` summed over the batch (``g = dh/dy``, shape ``(batch, O)``)."""
    return {"weight": scale * (x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1]))}


def yw_to_w(d, trace, *, scale=1.0):
    """Scale column ``k`` of the ``(..., I, O)`` trace by ``d[..., k]``; ``scale`` stays in ``xy_to_dw``."""
    return {"weight": trace["weight"] * jnp.expand_dims(d, -2)}


def init_drtrl(x_var, y_var, weight_vars, n):
    """The parameter-dimension trace ``(batch, I, O, n)``."""
    w = weight_vars["weight"].aval
    return {"weight": jnp.zeros((x_var.aval.shape[0], *w.shape, n), w.dtype)}


def init_pp(x_var, y_var, weight_vars, n):
    """The output-side trace of pp_prop, ``(batch, O, n)``."""
    return jnp.zeros((*y_var.aval.shape, n), y_var.aval.dtype)


SPEC = braintrace.ETPPrimitiveSpec(
    name="etp_scaled_mm",
    impl=scaled_impl,
    yw_to_w=yw_to_w,
    xy_to_dw=xy_to_dw,
    init_drtrl=init_drtrl,
    init_pp=init_pp,
    trainable_invars_fn=lambda params: {"weight": 1},  # {trainable key: invar index}
    x_invar_index=0,
    batched=True,
)
# replace=True lets the script run twice in one interpreter (a notebook); a second registration of
# the same name without it raises ValueError.
scaled_mm_p = braintrace.register_primitive_spec(SPEC, replace=True)


def _compounding_yw_to_w(d, trace, *, scale=1.0):
    """The mistake the rules must avoid: ``scale`` applied in the trace link as well."""
    return {"weight": scale * trace["weight"] * jnp.expand_dims(d, -2)}


# The same op with the mistaken link, to show its effect on the gradient.
wrong_mm_p = braintrace.register_primitive_spec(
    dataclasses.replace(SPEC, name="etp_scaled_mm_compounding", yw_to_w=_compounding_yw_to_w), replace=True
)


# --------------------------------------------------------------------------------------------------
# a model that uses it
# --------------------------------------------------------------------------------------------------


class LeakyLayer(brainstate.nn.Module):
    """``h_t = LEAK * h_{t-1} + SCALE * x_t W`` through ``primitive``."""

    def __init__(self, w, primitive=scaled_mm_p):
        super().__init__()
        self.primitive = primitive
        self.n_out = w.shape[1]
        self.w = brainstate.ParamState(jnp.asarray(w))

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, self.n_out)))

    def update(self, x):
        self.h.value = LEAK * self.h.value + self.primitive.bind(x, self.w.value, scale=SCALE)
        return self.h.value


def mse(out, target):
    return jnp.mean((out - target) ** 2)


def bptt_loss(w, xs, targets):
    """The summed loss of the same model in plain ``jax.numpy`` (the oracle for the gradient)."""

    def body(h, xy):
        h = LEAK * h + SCALE * xy[0] @ w
        return h, mse(h, xy[1])

    return jax.lax.scan(body, jnp.zeros((xs.shape[1], w.shape[1])), (xs, targets))[1].sum()


def rel_err(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training iterations (default 300)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (used by the tests)")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (40 if args.tiny else 300)
    n_in, n_out, T, B = 6, 4, 30, args.batch
    rng = np.random.default_rng(args.seed)
    w_teacher = jnp.asarray(rng.normal(0.0, 1.0, (n_in, n_out)), jnp.float32)
    w_student = jnp.asarray(rng.normal(0.0, 0.3, (n_in, n_out)), jnp.float32)

    def batch_of(key):
        xs = jax.random.normal(key, (T, B, n_in))
        _, hs = jax.lax.scan(lambda h, x: (LEAK * h + SCALE * x @ w_teacher,) * 2, jnp.zeros((B, n_out)), xs)
        return xs, hs

    print("1. The primitive against plain JAX, and the rule identity")
    x, g, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(B, n_in), (B, n_out), (n_out,)])
    y = scaled_mm_p.bind(x, w_student, scale=SCALE)
    print(f"   forward error {rel_err(y, SCALE * x @ w_student):.1e}")
    vjp = jax.vjp(lambda w: scaled_impl(x, w, scale=SCALE), w_student)[1](g)[0]
    print(
        f"   xy_to_dw against jax.vjp of impl: {rel_err(xy_to_dw(x, g, {}, scale=SCALE)['weight'], vjp):.1e}"
    )
    lhs = yw_to_w(v, xy_to_dw(x, g, {}, scale=SCALE), scale=SCALE)["weight"]
    rhs = xy_to_dw(x, v * g, {}, scale=SCALE)["weight"]
    print(f"   yw_to_w(v, xy_to_dw(x, g)) == xy_to_dw(x, v * g): error {rel_err(lhs, rhs):.1e}")

    print("2. The online D-RTRL gradient against BPTT over", T, "steps")
    xs, targets = batch_of(jax.random.PRNGKey(args.seed))
    want = jax.grad(bptt_loss)(w_student, xs, targets)
    for primitive in (scaled_mm_p, wrong_mm_p):
        model = LeakyLayer(w_student, primitive)
        learner = braintrace.compile(model, braintrace.D_RTRL, xs[0], batch_size=B)
        (relation,) = learner.graph.hidden_param_op_relations
        got = learner.etrace_grad(xs, targets, step_fn=mse)[("w",)]
        print(f"   {relation.primitive.name:<26} relative error to BPTT {rel_err(got, want):.1e}")

    print("3. Online training with D-RTRL and Adam (the student imitates a teacher)")
    model = LeakyLayer(w_student)
    learner = braintrace.compile(model, braintrace.D_RTRL, xs[0], batch_size=B)
    params = model.states(brainstate.ParamState)
    optimizer = optax.adam(2e-2)
    opt_state = brainstate.ShortTermState(optimizer.init({k: s.value for k, s in params.items()}))

    @brainstate.transform.jit
    def train_step(key):
        xs, targets = batch_of(key)
        grads, losses = learner.etrace_grad(xs, targets, step_fn=mse, return_value=True)
        values = {k: s.value for k, s in params.items()}
        updates, opt_state.value = optimizer.update(grads, opt_state.value, values)
        for k, val in optax.apply_updates(values, updates).items():
            params[k].value = val
        return losses.mean()

    key = jax.random.PRNGKey(args.seed + 1)
    losses = []
    bar = tqdm(range(steps), desc="d_rtrl", unit="it")
    for step in bar:
        losses.append(float(train_step(jax.random.fold_in(key, step))))
        bar.set_postfix(step=step + 1, loss=f"{losses[-1]:.4f}")
    bar.close()
    print(
        f"final: loss {losses[-1]:.3g} (first iteration {losses[0]:.3g}); distance to the teacher's weight "
        f"{rel_err(params[('w',)].value, w_teacher):.3f} (relative)"
    )
    return losses[-1]


if __name__ == "__main__":
    main()
