"""Custom ETP primitives: ``register_primitive`` (class API), ``ETPPrimitiveSpec`` (spec API), the
registries, and the errors of the registration layer.

Every primitive created here has a unique name and is unregistered when its test ends (the
``temp_primitives`` fixture), so the global registries hold only the built-ins between tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace
from braintrace import _compatible_imports
from braintrace._etrace_op import (
    BATCHED_PRIMITIVES,
    ETP_PRIMITIVE_SPECS,
    ETP_PRIMITIVES,
    ETP_RULES_INIT_DRTRL,
    ETP_RULES_INIT_PP,
    ETP_RULES_XY_TO_DW,
    ETP_RULES_YW_TO_W,
    ETP_TRAINABLE_INVARS_FNS,
    ETP_X_INVAR_INDICES,
    ETP_Y_OUTVAR_INDICES,
    GRADIENT_ENABLED_PRIMITIVES,
    ETPPrimitive,
    _trace_ops,
    get_rule,
    unregister_primitive,
)
from braintrace._etrace_op._trace_ops import get_drtrl_trace_ops

B, I, O = 3, 4, 2
SCALE = 1.7

ALL_REGISTRIES = {
    "ETP_PRIMITIVES": ETP_PRIMITIVES,
    "BATCHED_PRIMITIVES": BATCHED_PRIMITIVES,
    "GRADIENT_ENABLED_PRIMITIVES": GRADIENT_ENABLED_PRIMITIVES,
    "ETP_RULES_YW_TO_W": ETP_RULES_YW_TO_W,
    "ETP_RULES_XY_TO_DW": ETP_RULES_XY_TO_DW,
    "ETP_RULES_INIT_DRTRL": ETP_RULES_INIT_DRTRL,
    "ETP_RULES_INIT_PP": ETP_RULES_INIT_PP,
    "ETP_TRAINABLE_INVARS_FNS": ETP_TRAINABLE_INVARS_FNS,
    "ETP_X_INVAR_INDICES": ETP_X_INVAR_INDICES,
    "ETP_Y_OUTVAR_INDICES": ETP_Y_OUTVAR_INDICES,
    "ETP_PRIMITIVE_SPECS": ETP_PRIMITIVE_SPECS,
}


# --------------------------------------------------------------------------------------------------
# A scaled matmul y = scale * (x @ W) (+ b), written for these tests. Following the design notes,
# ``scale`` enters ``xy_to_dw`` only; ``yw_to_w`` is the plain y -> W link.
# --------------------------------------------------------------------------------------------------


def scaled_impl(*args, scale=1.0, has_bias=False):
    y = scale * (args[0] @ args[1])
    return y + args[2] if has_bias else y


def scaled_layout(params):
    return {"weight": 1, "bias": 2} if params.get("has_bias", False) else {"weight": 1}


def scaled_yw_to_w(hidden, trace, *, scale=1.0, has_bias=False):
    out = {"weight": trace["weight"] * jnp.expand_dims(hidden, -2)}
    if has_bias:
        out["bias"] = trace["bias"] * hidden
    return out


def scaled_xy_to_dw(x, hidden, weights, *, scale=1.0, has_bias=False):
    x2, g2 = jnp.reshape(x, (-1, x.shape[-1])), jnp.reshape(hidden, (-1, hidden.shape[-1]))
    out = {"weight": scale * (x2.T @ g2)}
    if has_bias:
        out["bias"] = g2.sum(0)
    return out


def scaled_init_drtrl(x_var, y_var, weight_vars, n):
    lead = x_var.aval.shape[:1]
    return {k: jnp.zeros((*lead, *v.aval.shape, n), v.aval.dtype) for k, v in weight_vars.items()}


def scaled_init_pp(x_var, y_var, weight_vars, n):
    return jnp.zeros((*y_var.aval.shape, n), y_var.aval.dtype)


RULES = dict(
    yw_to_w=scaled_yw_to_w, xy_to_dw=scaled_xy_to_dw, init_drtrl=scaled_init_drtrl, init_pp=scaled_init_pp
)


def _class_api_all_at_once(name):
    p = braintrace.register_primitive(
        name, scaled_impl, batched=True, trainable_invars_fn=scaled_layout, x_invar_index=0
    )
    p.register_etp_rules(**RULES)
    return p


def _class_api_one_by_one(name):
    p = braintrace.register_primitive(name, scaled_impl, batched=True, trainable_invars_fn=scaled_layout)
    p.register_yw_to_w(scaled_yw_to_w)
    p.register_xy_to_dw(scaled_xy_to_dw)
    p.register_init_drtrl(scaled_init_drtrl)
    p.register_init_pp(scaled_init_pp)
    return p


def _spec_api(name):
    spec = braintrace.ETPPrimitiveSpec(
        name=name, impl=scaled_impl, trainable_invars_fn=scaled_layout, x_invar_index=0, batched=True, **RULES
    )
    p = braintrace.register_primitive_spec(spec)
    assert braintrace.get_primitive_spec(p) is spec
    assert spec.resolve_trainable_invars({"has_bias": True, "scale": 2.0}) == {"weight": 1, "bias": 2}
    return p


REGISTRATIONS = {
    "class": _class_api_all_at_once,
    "class_one_by_one": _class_api_one_by_one,
    "spec": _spec_api,
}


@pytest.fixture(params=list(REGISTRATIONS))
def scaled_p(request, temp_primitives, unique_name):
    p = REGISTRATIONS[request.param](unique_name("etp_test_scaled"))
    temp_primitives.append(p)
    return p


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)


# --------------------------------------------------------------------------------------------------
# transformations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scaled_p,has_bias",
    [("class", False), ("class", True), ("class_one_by_one", True), ("spec", False), ("spec", True)],
    indirect=["scaled_p"],
)
def test_custom_primitive_under_jax_transformations(scaled_p, has_bias, dtype, rng):
    assert isinstance(scaled_p, ETPPrimitive)
    assert isinstance(scaled_p, _compatible_imports.Primitive)
    assert repr(scaled_p) == scaled_p.name

    r = lambda *s: jnp.asarray(rng.standard_normal(s).astype(dtype))
    x, w, b, c = r(B, I), r(I, O), r(O), r(B, O)
    bias = (b,) if has_bias else ()
    op = lambda x_, w_: scaled_p.bind(x_, w_, *bias, scale=SCALE, has_bias=has_bias)
    op_ref = lambda x_, w_: SCALE * (x_ @ w_) + (b if has_bias else 0)
    loss = lambda x_, w_: jnp.sum(jnp.sin(op(x_, w_)) * c)
    loss_ref = lambda x_, w_: jnp.sum(jnp.sin(op_ref(x_, w_)) * c)

    y = op(x, w)
    assert y.dtype == dtype
    np.testing.assert_allclose(np.asarray(y), np.asarray(op_ref(x, w)), **tol(dtype))

    tx, tw, xs = r(B, I), r(I, O), r(2, B, I)

    def transformed(op, loss):
        return {
            "value": op(x, w),
            "grad": jax.grad(loss, argnums=(0, 1))(x, w),
            "vmap": jax.vmap(lambda xi: op(xi, w))(xs),
            "jvp": jax.jvp(op, (x, w), (tx, tw)),
            "jacfwd": jax.jacfwd(op, argnums=1)(x, w),
            "jacrev": jax.jacrev(op, argnums=(0, 1))(x, w),
            "per_sample_grad": jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None))(xs, w),
        }

    eager_grad = jax.grad(loss, argnums=(0, 1))(x, w)
    got, want = jax.jit(lambda: (transformed(op, loss), transformed(op_ref, loss_ref)))()
    want["eager_grad"], got["eager_grad"] = want["grad"], eager_grad
    for key in want:
        for g, e in zip(jax.tree.leaves(got[key]), jax.tree.leaves(want[key]), strict=True):
            assert g.shape == e.shape, key
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), err_msg=key, **tol(dtype))


@pytest.mark.parametrize("scaled_p", ["class", "spec"], indirect=True)
def test_custom_rules_against_vjp_and_trace_ops(scaled_p, dtype, rng):
    """The custom rules satisfy the identities the algorithms rely on."""
    r = lambda *s: rng.standard_normal(s).astype(dtype)
    x, w, b, g, v = r(B, I), r(I, O), r(O), r(B, O), r(B, O)
    params = {"scale": SCALE, "has_bias": True}
    weights = {"weight": jnp.asarray(w), "bias": jnp.asarray(b)}
    xy, yw = get_rule(scaled_p, "xy_to_dw"), get_rule(scaled_p, "yw_to_w")

    got = xy(jnp.asarray(x), jnp.asarray(g), weights, **params)
    _, vjp = jax.vjp(
        lambda w_, b_: scaled_p.impl_fn(jnp.asarray(x), w_, b_, **params), weights["weight"], weights["bias"]
    )
    for key, want in zip(("weight", "bias"), vjp(jnp.asarray(g))):
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want), **tol(dtype))
    for i in range(B):
        lhs = yw(
            jnp.asarray(v[i]),
            xy(jnp.asarray(x[i : i + 1]), jnp.asarray(g[i : i + 1]), weights, **params),
            **params,
        )
        rhs = xy(jnp.asarray(x[i : i + 1]), jnp.asarray(v[i : i + 1] * g[i : i + 1]), weights, **params)
        for key in lhs:
            np.testing.assert_allclose(np.asarray(lhs[key]), np.asarray(rhs[key]), **tol(dtype))

    # The rule-derived default D-RTRL update with one hidden state, against an einsum.
    ops = get_drtrl_trace_ops(scaled_p)
    tr = {"weight": r(B, I, O, 1), "bias": r(B, O, 1)}
    d, df = r(B, O, 1, 1), r(B, O, 1)
    new = ops.update(
        jax.tree.map(jnp.asarray, tr), jnp.asarray(d), jnp.asarray(x), jnp.asarray(df), weights, params, 1
    )
    want_w = d[:, None, :, :, 0] * tr["weight"] + SCALE * np.einsum("bi,bks->biks", x, df)
    np.testing.assert_allclose(np.asarray(new["weight"]), want_w, **tol(dtype))
    np.testing.assert_allclose(np.asarray(new["bias"]), d[..., 0] * tr["bias"] + df, **tol(dtype))


# --------------------------------------------------------------------------------------------------
# registries
# --------------------------------------------------------------------------------------------------


def test_registry_membership(scaled_p):
    assert scaled_p in ETP_PRIMITIVES
    assert scaled_p in BATCHED_PRIMITIVES
    assert scaled_p not in GRADIENT_ENABLED_PRIMITIVES
    assert ETP_X_INVAR_INDICES[scaled_p] == 0
    assert ETP_Y_OUTVAR_INDICES[scaled_p] == 0
    assert ETP_TRAINABLE_INVARS_FNS[scaled_p]({"has_bias": True}) == {"weight": 1, "bias": 2}
    for rule, table in (
        ("yw_to_w", ETP_RULES_YW_TO_W),
        ("xy_to_dw", ETP_RULES_XY_TO_DW),
        ("init_drtrl", ETP_RULES_INIT_DRTRL),
        ("init_pp", ETP_RULES_INIT_PP),
    ):
        assert table[scaled_p] is RULES[rule]
        assert get_rule(scaled_p, rule) is RULES[rule]


def test_registration_defaults_and_flags(temp_primitives, unique_name):
    p = braintrace.register_primitive(unique_name("etp_test_defaults"), lambda x, w: x * w)
    temp_primitives.append(p)
    assert p in ETP_PRIMITIVES
    assert p not in BATCHED_PRIMITIVES and p not in GRADIENT_ENABLED_PRIMITIVES
    assert ETP_TRAINABLE_INVARS_FNS[p]({}) == {"weight": 1}
    assert ETP_X_INVAR_INDICES[p] == 0 and ETP_Y_OUTVAR_INDICES[p] == 0
    assert p not in ETP_PRIMITIVE_SPECS
    for table in (ETP_RULES_YW_TO_W, ETP_RULES_XY_TO_DW, ETP_RULES_INIT_DRTRL, ETP_RULES_INIT_PP):
        assert p not in table

    q = braintrace.register_primitive(
        unique_name("etp_test_flags"),
        lambda y: y,
        gradient_enabled=True,
        x_invar_index=None,
        trainable_invars_fn=lambda params: {"weight": 0},
    )
    temp_primitives.append(q)
    assert q in GRADIENT_ENABLED_PRIMITIVES and q not in BATCHED_PRIMITIVES
    assert ETP_X_INVAR_INDICES[q] is None
    assert ETP_TRAINABLE_INVARS_FNS[q]({}) == {"weight": 0}


def test_spec_registration_records_the_spec(temp_primitives, unique_name):
    spec = braintrace.ETPPrimitiveSpec(
        name=unique_name("etp_test_spec"),
        impl=scaled_impl,
        trainable_invars_fn=scaled_layout,
        gradient_enabled=True,
        x_invar_index=2,
        y_outvar_index=0,
        **RULES,
    )
    p = braintrace.register_primitive_spec(spec)
    temp_primitives.append(p)
    assert ETP_PRIMITIVE_SPECS[p] is spec and braintrace.get_primitive_spec(p) is spec
    assert p in GRADIENT_ENABLED_PRIMITIVES and p not in BATCHED_PRIMITIVES
    assert ETP_X_INVAR_INDICES[p] == 2
    assert spec.resolve_trainable_invars({}) == {"weight": 1}
    with pytest.raises(dataclass_frozen_error()):
        spec.name = "other"


def dataclass_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_multiple_results_and_y_outvar_index(temp_primitives, unique_name, rng):
    """A primitive returning ``(aux, y)`` with ``y_outvar_index=1`` works under jit, grad and vmap."""

    def impl(x, w):
        return jnp.sum(x), x @ w

    p = braintrace.register_primitive(
        unique_name("etp_test_multi"), impl, multiple_results=True, y_outvar_index=1
    )
    temp_primitives.append(p)
    assert ETP_Y_OUTVAR_INDICES[p] == 1
    x = jnp.asarray(rng.standard_normal((I,)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((I, O)), jnp.float32)
    s, y = jax.jit(lambda x_, w_: p.bind(x_, w_))(x, w)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w), rtol=1e-5)
    np.testing.assert_allclose(float(s), float(jnp.sum(x)), rtol=1e-5)
    gw = jax.grad(lambda w_: jnp.sum(p.bind(x, w_)[1] ** 2))(w)
    np.testing.assert_allclose(
        np.asarray(gw), np.asarray(jax.grad(lambda w_: jnp.sum((x @ w_) ** 2))(w)), rtol=1e-5
    )
    ys = jax.vmap(lambda xi: p.bind(xi, w)[1])(jnp.stack([x, -x]))
    np.testing.assert_allclose(np.asarray(ys), np.asarray(jnp.stack([x, -x]) @ w), rtol=1e-5)


def test_integer_operand_gets_a_float0_tangent(temp_primitives, unique_name, rng):
    """Non-differentiable (integer) operands, like sparse index arrays, work under grad and jvp."""

    def impl(x, w, idx):
        return x @ w[idx]

    p = braintrace.register_primitive(unique_name("etp_test_gather"), impl)
    temp_primitives.append(p)
    x = jnp.asarray(rng.standard_normal((3,)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((5, O)), jnp.float32)
    idx = jnp.array([4, 0, 2])
    gw = jax.grad(lambda w_: jnp.sum(jnp.tanh(p.bind(x, w_, idx))))(w)
    want = jax.grad(lambda w_: jnp.sum(jnp.tanh(x @ w_[idx])))(w)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(want), rtol=1e-5, atol=1e-6)
    _, t = jax.jvp(lambda x_: p.bind(x_, w, idx), (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(np.asarray(t), np.asarray(jnp.ones_like(x) @ w[idx]), rtol=1e-5)


def test_jvp_differentiates_only_operands_with_nonzero_tangents(temp_primitives, unique_name):
    """A symbolic-zero tangent (here of ``x``) must not become a dense zero matmul."""
    p = braintrace.register_primitive(unique_name("etp_test_jvp_zero"), lambda x, w: x @ w)
    temp_primitives.append(p)
    x, w = jnp.ones((3, 4)), jnp.ones((4, 2))
    count = lambda jaxpr: sum(e.primitive.name == "dot_general" for e in jaxpr.eqns)
    jvp_w = jax.make_jaxpr(lambda w_, t: jax.jvp(lambda v: p.bind(x, v), (w_,), (t,)))(w, w)
    assert count(jvp_w) == 2  # the primal and the w-tangent, nothing for x
    jvp_both = jax.make_jaxpr(lambda x_, w_: jax.jvp(p.bind, (x_, w_), (x_, w_)))(x, w)
    assert count(jvp_both) == 3
    _, t = jax.jvp(lambda v: p.bind(x, v), (w,), (2 * w,))
    np.testing.assert_allclose(np.asarray(t), np.asarray(x @ (2 * w)))


def test_remat_jvp_keeps_gradients_and_marks_the_tangent_for_recomputation(temp_primitives, unique_name, rng):
    impl = lambda x, w: jnp.tanh(x @ w) * 2.0
    plain = braintrace.register_primitive(unique_name("etp_test_plain_jvp"), impl)
    remat = braintrace.register_primitive(unique_name("etp_test_remat_jvp"), impl, remat_jvp=True)
    temp_primitives.extend([plain, remat])
    x, w = jnp.asarray(rng.standard_normal((3, 4))), jnp.asarray(rng.standard_normal((4, 2)))
    loss = lambda p: lambda x_, w_: jnp.sum(jnp.sin(p.bind(x_, w_)))
    for a, b in zip(jax.grad(loss(remat), (0, 1))(x, w), jax.grad(loss(plain), (0, 1))(x, w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    names = lambda p: str(jax.make_jaxpr(jax.grad(loss(p), (0, 1)))(x, w))
    assert "checkpoint" in names(remat) or "remat" in names(remat)
    assert "checkpoint" not in names(plain) and "remat" not in names(plain)


def test_derived_batching_inlines_and_custom_batching_keeps_marker(
    temp_primitives, unique_name, primitive_names, rng
):
    """The documented caveat: the derived ``vmap(impl)`` rule drops the marker; a
    ``batching_rule`` that re-binds the primitive keeps it."""
    impl = lambda x, w: x * w
    plain = braintrace.register_primitive(unique_name("etp_test_vmap_plain"), impl)
    temp_primitives.append(plain)

    def rule(args, dims, **params):
        x, w = args
        if dims[1] is not None:
            return jax.vmap(impl, in_axes=dims)(x, w), 0
        return kept.bind(jnp.moveaxis(x, dims[0], 0), w), 0

    kept = braintrace.register_primitive(unique_name("etp_test_vmap_kept"), impl, batching_rule=rule)
    temp_primitives.append(kept)
    xs = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4,)), jnp.float32)
    assert plain.name not in primitive_names(jax.make_jaxpr(jax.vmap(lambda x: plain.bind(x, w)))(xs))
    assert kept.name in primitive_names(jax.make_jaxpr(jax.vmap(lambda x: kept.bind(x, w)))(xs))
    for p in (plain, kept):
        np.testing.assert_allclose(np.asarray(jax.vmap(lambda x: p.bind(x, w))(xs)), np.asarray(xs * w))


# --------------------------------------------------------------------------------------------------
# re-registration and errors
# --------------------------------------------------------------------------------------------------


def test_registering_an_existing_name_raises(temp_primitives, unique_name):
    name = unique_name("etp_test_dup")
    p = braintrace.register_primitive(name, scaled_impl)
    temp_primitives.append(p)
    with pytest.raises(ValueError, match=name):
        braintrace.register_primitive(name, scaled_impl)
    with pytest.raises(ValueError, match=name):
        braintrace.register_primitive_spec(
            braintrace.ETPPrimitiveSpec(
                name=name, impl=scaled_impl, trainable_invars_fn=scaled_layout, **RULES
            )
        )
    assert p in ETP_PRIMITIVES


def test_replace_true_unregisters_the_old_primitive(temp_primitives, unique_name):
    name = unique_name("etp_test_replace")
    old = braintrace.register_primitive_spec(
        braintrace.ETPPrimitiveSpec(
            name=name,
            impl=scaled_impl,
            trainable_invars_fn=scaled_layout,
            batched=True,
            gradient_enabled=True,
            **RULES,
        )
    )
    temp_primitives.append(old)
    assert all(old in table for table in ALL_REGISTRIES.values())

    new = braintrace.register_primitive(name, scaled_impl, batched=True, replace=True)
    temp_primitives.append(new)
    new.register_etp_rules(**RULES)
    leftovers = [reg for reg, table in ALL_REGISTRIES.items() if old in table]
    assert leftovers == []
    assert new in ETP_PRIMITIVES and new in BATCHED_PRIMITIVES and new in ETP_RULES_YW_TO_W
    assert new is not old and new.name == old.name
    # The old object still binds (its JAX rules stay attached), it is just no longer an ETP primitive.
    np.testing.assert_allclose(np.asarray(old.bind(jnp.ones((1, 2)), jnp.ones((2, 3)))), np.full((1, 3), 2.0))

    newer = braintrace.register_primitive_spec(
        braintrace.ETPPrimitiveSpec(name=name, impl=scaled_impl, trainable_invars_fn=scaled_layout, **RULES),
        replace=True,
    )
    temp_primitives.append(newer)
    assert [reg for reg, table in ALL_REGISTRIES.items() if new in table] == []
    assert braintrace.get_primitive_spec(newer).name == name


def test_unregister_removes_from_every_registry(unique_name):
    p = braintrace.register_primitive_spec(
        braintrace.ETPPrimitiveSpec(
            name=unique_name("etp_test_unreg"),
            impl=scaled_impl,
            trainable_invars_fn=scaled_layout,
            batched=True,
            gradient_enabled=True,
            **RULES,
        )
    )
    _trace_ops.ETP_DRTRL_TRACE_OPS[p] = _trace_ops._default_ops(p)  # an override, as fused ops install
    unregister_primitive(p)
    assert [reg for reg, table in ALL_REGISTRIES.items() if p in table] == []
    assert p not in _trace_ops.ETP_DRTRL_TRACE_OPS
    # The name is free again.
    q = braintrace.register_primitive(p.name, scaled_impl)
    unregister_primitive(q)


def test_spec_without_trainable_invars_fn_raises():
    with pytest.raises(ValueError, match="trainable_invars_fn"):
        braintrace.ETPPrimitiveSpec(name="etp_test_no_layout", impl=scaled_impl, **RULES)


@pytest.mark.parametrize("rule", list(RULES))
def test_non_callable_rule_raises_type_error(rule, scaled_p):
    with pytest.raises(TypeError, match=rule):
        getattr(scaled_p, f"register_{rule}")(42)
    with pytest.raises(TypeError, match=rule):
        scaled_p.register_etp_rules(**{rule: "not a function"})
    with pytest.raises(TypeError, match=rule):
        braintrace.ETPPrimitiveSpec(
            name="etp_test_bad_rule",
            impl=scaled_impl,
            trainable_invars_fn=scaled_layout,
            **{**RULES, rule: 1.0},
        )
    assert get_rule(scaled_p, rule) is RULES[rule]  # the failed calls changed nothing


def test_non_callable_impl_or_layout_raises_type_error(unique_name):
    with pytest.raises(TypeError, match="impl_fn"):
        braintrace.register_primitive(unique_name("etp_test_bad_impl"), "x @ w")
    with pytest.raises(TypeError, match="trainable_invars_fn"):
        braintrace.register_primitive(
            unique_name("etp_test_bad_layout"), scaled_impl, trainable_invars_fn={"weight": 1}
        )
    for arg in ("batching_rule", "kernel_fn"):
        name = unique_name("etp_test_bad_" + arg)
        with pytest.raises(TypeError, match=arg):
            braintrace.register_primitive(name, scaled_impl, **{arg: "not a function"})
        assert name not in {p.name for p in ETP_PRIMITIVES}


def test_get_rule_without_a_rule_raises_key_error(temp_primitives, unique_name):
    name = unique_name("etp_test_norule")
    p = braintrace.register_primitive(name, scaled_impl)
    temp_primitives.append(p)
    with pytest.raises(KeyError, match=rf"{name}.*yw_to_w"):
        get_rule(p, "yw_to_w")
    p.register_xy_to_dw(scaled_xy_to_dw)
    assert get_rule(p, "xy_to_dw") is scaled_xy_to_dw
    with pytest.raises(KeyError, match="init_pp"):
        get_rule(p, "init_pp")
    with pytest.raises(KeyError, match="no_such_rule"):
        get_rule(p, "no_such_rule")


def test_get_primitive_spec_of_a_class_registered_primitive_raises(temp_primitives, unique_name):
    name = unique_name("etp_test_nospec")
    p = braintrace.register_primitive(name, scaled_impl)
    temp_primitives.append(p)
    with pytest.raises(KeyError, match=name):
        braintrace.get_primitive_spec(p)


def test_builtins_are_spec_or_class_registered():
    from braintrace._etrace_op import etp_elemwise_p, etp_mm_p, etp_mv_p

    assert braintrace.get_primitive_spec(etp_mm_p).name == "etp_mm"
    assert braintrace.get_primitive_spec(etp_mv_p).name == "etp_mv"
    with pytest.raises(KeyError, match="etp_elemwise"):
        braintrace.get_primitive_spec(etp_elemwise_p)
