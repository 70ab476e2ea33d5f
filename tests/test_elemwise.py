"""The element-wise ETP primitive ``etp_elemwise`` and :func:`braintrace.element_wise`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import braintrace
from braintrace._etrace_op import (
    BATCHED_PRIMITIVES,
    ETP_TRAINABLE_INVARS_FNS,
    ETP_X_INVAR_INDICES,
    GRADIENT_ENABLED_PRIMITIVES,
    etp_elemwise_p,
    get_rule,
)
from braintrace._etrace_op._trace_ops import get_drtrl_trace_ops

B, H = 3, 5

FNS = {
    "identity": (None, lambda w: w),
    "sigmoid": (jax.nn.sigmoid, jax.nn.sigmoid),
    "abs": (jnp.abs, jnp.abs),
    "softplus_scaled": (lambda w: 2.0 * jax.nn.softplus(w), lambda w: 2.0 * jax.nn.softplus(w)),
}


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-12)


def call(w, fn):
    return braintrace.element_wise(w) if fn is None else braintrace.element_wise(w, fn=fn)


@pytest.mark.parametrize("name", list(FNS))
def test_forward_and_gradient_through_fn(name, dtype, rng, primitive_names):
    fn, ref = FNS[name]
    w = jnp.asarray(rng.standard_normal((H,)).astype(dtype))
    c = jnp.asarray(rng.standard_normal((H,)).astype(dtype))
    close = lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), **tol(dtype))

    y = call(w, fn)
    assert y.dtype == dtype and y.shape == (H,)
    close(y, ref(w))
    loss = lambda w_: jnp.sum(jnp.tanh(call(w_, fn)) * c)
    loss_ref = lambda w_: jnp.sum(jnp.tanh(ref(w_)) * c)
    close(jax.grad(loss)(w), jax.grad(loss_ref)(w))
    assert "etp_elemwise" in primitive_names(jax.make_jaxpr(lambda w_: call(w_, fn))(w))

    t = jnp.asarray(rng.standard_normal((H,)).astype(dtype))
    ws = jnp.asarray(rng.standard_normal((4, H)).astype(dtype))

    def transformed(f, l):
        return {
            "jvp": jax.jvp(f, (w,), (t,)),
            "jacfwd": jax.jacfwd(f)(w),
            "jacrev": jax.jacrev(f)(w),
            "vmap": jax.vmap(f)(ws),
            "per_sample_grad": jax.vmap(jax.grad(l))(ws),
        }

    got, want = jax.jit(lambda: (transformed(lambda w_: call(w_, fn), loss), transformed(ref, loss_ref)))()
    for key in want:
        for g, e in zip(jax.tree.leaves(got[key]), jax.tree.leaves(want[key]), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), err_msg=key, **tol(dtype))
    assert "etp_elemwise" in primitive_names(jax.make_jaxpr(jax.vmap(lambda w_: call(w_, fn)))(ws))


def test_registration_flags():
    assert etp_elemwise_p in GRADIENT_ENABLED_PRIMITIVES
    assert etp_elemwise_p not in BATCHED_PRIMITIVES
    assert ETP_X_INVAR_INDICES[etp_elemwise_p] is None
    assert ETP_TRAINABLE_INVARS_FNS[etp_elemwise_p]({}) == {"weight": 0}


def test_rules_as_documented(dtype, rng):
    g = rng.standard_normal((H,)).astype(dtype)
    d = rng.standard_normal((B, H)).astype(dtype)
    tr = rng.standard_normal((B, H)).astype(dtype)
    w = {"weight": jnp.asarray(rng.standard_normal((H,)).astype(dtype))}

    dw = get_rule(etp_elemwise_p, "xy_to_dw")(None, jnp.asarray(g), w)
    assert set(dw) == {"weight"}
    np.testing.assert_array_equal(np.asarray(dw["weight"]), g)
    prop = get_rule(etp_elemwise_p, "yw_to_w")(jnp.asarray(d), {"weight": jnp.asarray(tr)})
    assert set(prop) == {"weight"}
    np.testing.assert_allclose(np.asarray(prop["weight"]), d.astype(np.float64) * tr, **tol(dtype))

    # Chain-rule identity: yw_to_w(v, xy_to_dw(x, g)) == xy_to_dw(x, v * g).
    v = rng.standard_normal((H,)).astype(dtype)
    lhs = get_rule(etp_elemwise_p, "yw_to_w")(jnp.asarray(v), dw)
    rhs = get_rule(etp_elemwise_p, "xy_to_dw")(None, jnp.asarray(v * g), w)
    np.testing.assert_allclose(np.asarray(lhs["weight"]), np.asarray(rhs["weight"]), **tol(dtype))


@pytest.mark.parametrize("n", [1, 3])
def test_init_rules_shapes_and_dtypes(n, dtype, rng):
    w = jnp.asarray(rng.standard_normal((H,)).astype(dtype))
    jaxpr = jax.make_jaxpr(braintrace.element_wise)(w)
    (eqn,) = [e for e in jaxpr.eqns if e.primitive is etp_elemwise_p]
    weight_vars = {k: eqn.invars[i] for k, i in ETP_TRAINABLE_INVARS_FNS[etp_elemwise_p](eqn.params).items()}
    trace = get_rule(etp_elemwise_p, "init_drtrl")(None, eqn.outvars[0], weight_vars, n)
    assert set(trace) == {"weight"}
    assert trace["weight"].shape == (H, n) and trace["weight"].dtype == dtype
    pp = get_rule(etp_elemwise_p, "init_pp")(None, eqn.outvars[0], weight_vars, n)
    assert pp.shape == (H, n) and pp.dtype == dtype
    assert not np.any(np.asarray(pp)) and not np.any(np.asarray(trace["weight"]))


@pytest.mark.parametrize("n", [1, 3])
def test_default_trace_ops_under_a_batched_model(n, dtype, rng):
    """a ``(H,)`` weight on ``(B, H)`` states keeps a ``(B, H, n)`` trace."""
    ops = get_drtrl_trace_ops(etp_elemwise_p)
    w = jnp.asarray(rng.standard_normal((H,)).astype(dtype))
    jaxpr = jax.make_jaxpr(braintrace.element_wise)(w)
    (eqn,) = jaxpr.eqns
    weight_vars = {"weight": eqn.invars[0]}
    zeros = ops.init(None, eqn.outvars[0], weight_vars, n, (B,), {})
    assert zeros["weight"].shape == (B, H, n) and zeros["weight"].dtype == dtype

    tr = rng.standard_normal((B, H, n)).astype(dtype)
    d = rng.standard_normal((B, H, n, n)).astype(dtype)
    df = rng.standard_normal((B, H, n)).astype(dtype)
    ct = rng.standard_normal((B, H, n)).astype(dtype)
    run = jax.jit(
        lambda tr, d, df, ct: (lambda new: (new, ops.solve(new, ct, {"weight": w}, {}, 1)))(
            ops.update({"weight": tr}, d, None, df, {"weight": w}, {}, 1)
        )
    )
    new, grads = run(*map(jnp.asarray, (tr, d, df, ct)))
    f = lambda a: np.asarray(a, np.float64)
    want = np.einsum("bhsj,bhj->bhs", f(d), f(tr)) + f(df)
    np.testing.assert_allclose(np.asarray(new["weight"]), want, **tol(dtype))
    np.testing.assert_allclose(
        np.asarray(grads["weight"]), np.einsum("bhs,bhs->h", f(ct), want), **tol(dtype)
    )


def test_units_are_kept(rng):
    w = rng.standard_normal((H,)).astype(np.float32)
    y = braintrace.element_wise(w * u.mV)
    assert u.get_unit(y) == u.mV
    np.testing.assert_allclose(np.asarray(y.to_decimal(u.mV)), w)
    y2 = braintrace.element_wise(w * u.ms, fn=lambda t: 2.0 * t)
    assert u.get_unit(y2) == u.ms
    np.testing.assert_allclose(np.asarray(y2.to_decimal(u.ms)), 2.0 * w, rtol=1e-6)
    y3 = braintrace.element_wise(w * u.ms, fn=lambda t: t / u.ms)  # fn may remove the unit
    assert not isinstance(y3, u.Quantity)
    np.testing.assert_allclose(np.asarray(y3), w, rtol=1e-6)


@pytest.mark.parametrize("fn", [None, 3.0, "abs"])
def test_non_callable_fn_raises_type_error(fn):
    with pytest.raises(TypeError, match="`fn`"):
        braintrace.element_wise(jnp.ones(3), fn=fn)
