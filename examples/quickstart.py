"""braintrace quickstart: the five ETP wrappers, a custom ETP primitive, and one online step.

Each wrapper computes an ordinary JAX op and marks it in the jaxpr, so that braintrace's compiler
can find the trainable parameter behind it. Every result is checked against plain ``jax.numpy``.
The last section hands a small recurrent network to ``braintrace.D_RTRL``.

Run from a clone:  python examples/quickstart.py   (a few seconds on a CPU)
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u
from saiunit import sparse as ss

import braintrace


def check(label: str, got, want) -> None:
    """Print ``label`` with the result's shape and whether it equals the plain-JAX value."""
    ok = np.allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    print(f"  {label:<44} shape={tuple(np.shape(got))!s:<14} matches plain JAX: {ok}")
    if not ok:
        raise SystemExit(f"{label}: result differs from the plain-JAX reference")


def ops_in_jaxpr(fn, *args) -> list[str]:
    """The names of the ETP primitives in ``fn``'s jaxpr."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return sorted({e.primitive.name for e in jaxpr.eqns if e.primitive.name.startswith("etp_")})


class TinyRNN(brainstate.nn.Module):
    """``h <- tanh(x @ W_in + h @ W_rec)``; only ``W_rec`` goes through an ETP primitive."""

    def __init__(self, in_dim=4, hid_dim=6):
        super().__init__()
        self.hid_dim = hid_dim
        self.W_rec = brainstate.ParamState(0.1 * jax.random.normal(jax.random.PRNGKey(0), (hid_dim, hid_dim)))
        self.W_in = brainstate.ParamState(0.1 * jax.random.normal(jax.random.PRNGKey(1), (in_dim, hid_dim)))

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size or 1, self.hid_dim)))

    def update(self, x):
        rec = braintrace.matmul(self.h.value, self.W_rec.value)  # marked: eligibility trace
        self.h.value = jnp.tanh(x @ self.W_in.value + rec)  # plain op: within-step gradient
        return self.h.value


def main() -> None:
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    x = jax.random.normal(keys[0], (4, 16))  # batch of 4, 16 features

    print("1. The five wrappers")
    w = jax.random.normal(keys[1], (16, 8))
    b = jax.random.normal(keys[2], (8,))
    check("matmul(x, w, bias=b)", braintrace.matmul(x, w, bias=b), x @ w + b)
    check("matmul(x[0], w)  (unbatched)", braintrace.matmul(x[0], w), x[0] @ w)

    tau = jax.random.uniform(keys[3], (8,), minval=5.0, maxval=20.0)
    check("element_wise(tau, fn=jnp.log)", braintrace.element_wise(tau, fn=jnp.log), jnp.log(tau))

    img = jax.random.normal(keys[4], (2, 10, 10, 3))
    kernel = jax.random.normal(keys[5], (3, 3, 3, 4))
    dn = ("NHWC", "HWIO", "NHWC")
    y_conv = braintrace.conv(img, kernel, strides=(1, 1), padding="SAME", dimension_numbers=dn)
    ref_conv = jax.lax.conv_general_dilated(img, kernel, (1, 1), "SAME", dimension_numbers=dn)
    check("conv(img, kernel, padding='SAME')", y_conv, ref_conv)

    dense = jnp.where(jax.random.uniform(keys[6], (16, 8)) < 0.25, w, 0.0)
    csr = ss.CSR.fromdense(dense)
    check(
        "sparse_matmul(x, csr.data, sparse_mat=csr)",
        braintrace.sparse_matmul(x, csr.data, sparse_mat=csr),
        x @ dense,
    )

    lora_b = 0.1 * jax.random.normal(keys[7], (16, 2))
    lora_a = 0.1 * jax.random.normal(keys[1], (2, 8))
    check(
        "lora_matmul(x, B, A, alpha=2.0)",
        braintrace.lora_matmul(x, lora_b, lora_a, alpha=2.0),
        2.0 * (x @ lora_b @ lora_a),
    )

    print("\n2. Physical units (saiunit)")
    current = braintrace.matmul(x * u.mV, w * u.siemens, bias=b * u.amp)
    print(f"  matmul(mV, S, bias in A) has unit {u.get_unit(current)}")
    check("  ... value in amperes", current.to_decimal(u.amp), (x / 1000.0) @ w + b)

    print("\n3. JAX transformations keep working")
    loss = lambda w_: jnp.sum(jnp.tanh(braintrace.matmul(x, w_, bias=b)))
    loss_ref = lambda w_: jnp.sum(jnp.tanh(x @ w_ + b))
    check("jax.grad", jax.grad(loss)(w), jax.grad(loss_ref)(w))
    per_sample = jax.jit(
        jax.vmap(jax.grad(lambda w_, xi: jnp.sum(braintrace.matmul(xi, w_) ** 2)), (None, 0))
    )
    check(
        "jit(vmap(grad)) per-sample gradients",
        per_sample(w, x),
        jax.vmap(lambda xi: 2 * jnp.outer(xi, xi @ w))(x),
    )
    marked = ops_in_jaxpr(jax.vmap(lambda xi: braintrace.matmul(xi, w)), x)
    print(f"  ETP ops in make_jaxpr(vmap(matmul on vectors)): {marked}")

    print("\n4. A custom ETP primitive: y = scale * (x @ W)")

    def scaled_impl(x, w, *, scale=1.0):
        return scale * (x @ w)

    def scaled_xy_to_dw(x, g, weights, *, scale=1.0):
        # dh/dW for one hidden state: scale * x^T g (summed over the batch).
        return {"weight": scale * (x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1]))}

    def scaled_yw_to_w(d, trace, *, scale=1.0):
        # The y -> W link: y_k depends on W[:, k] only, so the trace is scaled along `out`.
        return {"weight": trace["weight"] * jnp.expand_dims(d, -2)}

    spec = braintrace.ETPPrimitiveSpec(
        name="etp_quickstart_scaled_mm",
        impl=scaled_impl,
        yw_to_w=scaled_yw_to_w,
        xy_to_dw=scaled_xy_to_dw,
        init_drtrl=lambda x_var, y_var, wv, n: {
            "weight": jnp.zeros((x_var.aval.shape[0], *wv["weight"].aval.shape, n), wv["weight"].aval.dtype)
        },
        init_pp=lambda x_var, y_var, wv, n: jnp.zeros((*y_var.aval.shape, n), y_var.aval.dtype),
        trainable_invars_fn=lambda params: {"weight": 1},
        x_invar_index=0,
        batched=True,
    )
    scaled_mm_p = braintrace.register_primitive_spec(spec, replace=True)
    check("scaled_mm_p.bind(x, w, scale=0.5)", scaled_mm_p.bind(x, w, scale=0.5), 0.5 * (x @ w))
    g_w = jax.grad(lambda w_: jnp.sum(scaled_mm_p.bind(x, w_, scale=0.5)))(w)
    check("jax.grad through the custom primitive", g_w, 0.5 * x.T @ jnp.ones((4, 8)))
    dw = scaled_xy_to_dw(x, jnp.ones((4, 8)), {"weight": w}, scale=0.5)["weight"]
    check("its xy_to_dw rule equals that gradient", dw, g_w)
    recorded = braintrace.get_primitive_spec(scaled_mm_p) is spec
    print(f"  registered: {scaled_mm_p.name}; spec recorded: {recorded}")

    print("\n5. Online learning with D-RTRL")
    model = TinyRNN()
    brainstate.nn.init_all_states(model, batch_size=2)
    alg = braintrace.D_RTRL(model)
    alg.compile_graph(jnp.zeros((2, 4)))
    for rel in alg.graph.hidden_param_op_relations:
        print(f"  relation: primitive={rel.primitive.name}, trainable keys={list(rel.trainable_vars)}")
    params = model.states(brainstate.ParamState)
    for t in range(3):
        x_t = jax.random.normal(jax.random.PRNGKey(10 + t), (2, 4))
        grads = brainstate.transform.grad(lambda x_: jnp.sum(alg(x_) ** 2), params)(x_t)
        shapes = {"/".join(map(str, k)): tuple(g.shape) for k, g in grads.items()}
        print(f"  step {t}: gradients {shapes}")

    print("\nDone.")


if __name__ == "__main__":
    main()
