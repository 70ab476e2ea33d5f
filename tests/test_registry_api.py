"""The registry query helpers of ``braintrace._etrace_op`` (the published names ``is_etp_primitive``,
``is_etp_enable_gradient_primitive``, ``is_batched_primitive``, ``get_trainable_invars``,
``get_x_invar_index``, ``get_y_outvar_index``): their answers for the built-in primitives, for a
custom registered primitive before and after it is unregistered, and for primitives that are not
ETP primitives.

Every primitive registered here has a unique name and is unregistered when its test ends.
"""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import pytest

import braintrace
from braintrace import _compatible_imports
from braintrace._etrace_op import (
    BATCHED_PRIMITIVES,
    ETP_PRIMITIVES,
    ETP_TRAINABLE_INVARS_FNS,
    ETP_X_INVAR_INDICES,
    ETP_Y_OUTVAR_INDICES,
    GRADIENT_ENABLED_PRIMITIVES,
    ETPPrimitiveSpec,
    _registries,
    etp_conv_p,
    etp_elemwise_p,
    etp_lora_mm_p,
    etp_lora_mv_p,
    etp_mm_p,
    etp_mv_p,
    etp_sp_mm_p,
    etp_sp_mv_p,
    get_trainable_invars,
    get_x_invar_index,
    get_y_outvar_index,
    is_batched_primitive,
    is_etp_enable_gradient_primitive,
    is_etp_primitive,
    register_primitive,
    register_primitive_spec,
    unregister_primitive,
)

HELPERS = (
    "is_etp_primitive",
    "is_etp_enable_gradient_primitive",
    "is_batched_primitive",
    "get_trainable_invars",
    "get_x_invar_index",
    "get_y_outvar_index",
)

BUILTINS = {
    # primitive: (batched, gradient_enabled, x index, layout without bias, layout with bias)
    etp_mm_p: (True, False, 0, {"weight": 1}, {"weight": 1, "bias": 2}),
    etp_mv_p: (False, False, 0, {"weight": 1}, {"weight": 1, "bias": 2}),
    etp_conv_p: (True, False, 0, {"weight": 1}, {"weight": 1, "bias": 2}),
    etp_sp_mm_p: (True, False, 0, {"weight": 1}, {"weight": 1, "bias": 2}),
    etp_sp_mv_p: (False, False, 0, {"weight": 1}, {"weight": 1, "bias": 2}),
    etp_lora_mm_p: (True, False, 0, {"lora_b": 1, "lora_a": 2}, {"lora_b": 1, "lora_a": 2, "bias": 3}),
    etp_lora_mv_p: (False, False, 0, {"lora_b": 1, "lora_a": 2}, {"lora_b": 1, "lora_a": 2, "bias": 3}),
    etp_elemwise_p: (False, True, None, {"weight": 0}, {"weight": 0}),
}


def test_helpers_are_exported_with_doctested_examples():
    import braintrace._etrace_op as op

    for name in HELPERS:
        assert name in op.__all__, name
        fn = getattr(op, name)
        assert fn is getattr(_registries, name), name
        assert "Examples" in fn.__doc__ and ">>>" in fn.__doc__, name
    # The examples only look primitives up: running them here registers nothing.
    before = set(ETP_PRIMITIVES)
    result = doctest.testmod(_registries, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= len(HELPERS), result
    assert set(ETP_PRIMITIVES) == before


@pytest.mark.parametrize("prim", list(BUILTINS), ids=lambda p: p.name)
def test_builtin_primitives(prim):
    batched, grad_enabled, x_index, layout, layout_bias = BUILTINS[prim]
    assert is_etp_primitive(prim) is True
    assert is_batched_primitive(prim) is batched
    assert is_etp_enable_gradient_primitive(prim) is grad_enabled
    assert get_x_invar_index(prim) == x_index
    assert get_y_outvar_index(prim) == 0
    assert get_trainable_invars(prim, {"has_bias": False}) == layout
    assert get_trainable_invars(prim, {"has_bias": True}) == layout_bias


def test_helpers_agree_with_the_registries():
    for prim in ETP_PRIMITIVES:
        assert is_etp_primitive(prim)
        assert is_batched_primitive(prim) == (prim in BATCHED_PRIMITIVES)
        assert is_etp_enable_gradient_primitive(prim) == (prim in GRADIENT_ENABLED_PRIMITIVES)
        assert get_x_invar_index(prim) == ETP_X_INVAR_INDICES[prim]
        assert get_y_outvar_index(prim) == ETP_Y_OUTVAR_INDICES[prim]
        assert get_trainable_invars(prim, {}) == ETP_TRAINABLE_INVARS_FNS[prim]({})


@pytest.mark.parametrize("has_bias", [False, True])
def test_layout_locates_the_operands_of_a_traced_equation(has_bias):
    x, w, b = jnp.ones((4, 3)), jnp.ones((3, 5)), jnp.ones((5,))
    fn = lambda x, w, b: braintrace.matmul(x, w, bias=b if has_bias else None)
    jaxpr = jax.make_jaxpr(fn)(x, w, b).jaxpr
    (eqn,) = [e for e in jaxpr.eqns if is_etp_primitive(e.primitive)]
    assert eqn.primitive is etp_mm_p
    assert eqn.invars[get_x_invar_index(eqn.primitive)].aval.shape == x.shape
    assert eqn.outvars[get_y_outvar_index(eqn.primitive)].aval.shape == (4, 5)
    layout = get_trainable_invars(eqn.primitive, eqn.params)
    assert sorted(layout) == (["bias", "weight"] if has_bias else ["weight"])
    assert eqn.invars[layout["weight"]].aval.shape == w.shape
    if has_bias:
        assert eqn.invars[layout["bias"]].aval.shape == b.shape


def test_trainable_invars_returns_a_fresh_dict_and_leaves_params_alone():
    params = {"has_bias": True}
    layout = get_trainable_invars(etp_mm_p, params)
    layout["extra"] = 7
    assert get_trainable_invars(etp_mm_p, params) == {"weight": 1, "bias": 2}
    assert params == {"has_bias": True}


def _pair_impl(gain, x, w, *, shift=0.0):
    y = x @ w * gain + shift
    return y.sum(-1), y


def _pair_layout(params):
    return {"gain": 0, "w": 2}


def test_custom_registered_primitive(temp_primitives, unique_name):
    # x is the second operand and y the second output: both indices are the primitive's own.
    p = register_primitive(
        unique_name("etp_pair"),
        _pair_impl,
        batched=True,
        trainable_invars_fn=_pair_layout,
        x_invar_index=1,
        y_outvar_index=1,
        multiple_results=True,
    )
    temp_primitives.append(p)
    assert is_etp_primitive(p) and is_batched_primitive(p)
    assert not is_etp_enable_gradient_primitive(p)
    assert get_trainable_invars(p, {"shift": 1.0}) == {"gain": 0, "w": 2}
    assert (get_x_invar_index(p), get_y_outvar_index(p)) == (1, 1)

    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    jaxpr = jax.make_jaxpr(lambda g, x, w: p.bind(g, x, w, shift=0.5))(2.0, x, w).jaxpr
    (eqn,) = jaxpr.eqns
    assert eqn.invars[get_x_invar_index(eqn.primitive)].aval.shape == x.shape
    assert eqn.outvars[get_y_outvar_index(eqn.primitive)].aval.shape == (2, 4)

    # Unregistered, the same object is an ordinary JAX primitive with the defaults.
    unregister_primitive(p)
    assert not is_etp_primitive(p) and not is_batched_primitive(p)
    assert get_trainable_invars(p, {}) == {"weight": 1}
    assert (get_x_invar_index(p), get_y_outvar_index(p)) == (0, 0)


def test_custom_spec_primitive_identity_like(temp_primitives, unique_name):
    spec = ETPPrimitiveSpec(
        name=unique_name("etp_gain"),
        impl=lambda w: w * 2.0,
        yw_to_w=lambda hidden, trace: {"weight": trace["weight"] * hidden},
        xy_to_dw=lambda x, hidden, weights: {"weight": 2.0 * hidden},
        init_drtrl=lambda x_var, y_var, weight_vars, n: {"weight": jnp.zeros((*y_var.aval.shape, n))},
        init_pp=lambda x_var, y_var, weight_vars, n: jnp.zeros((*y_var.aval.shape, n)),
        trainable_invars_fn=lambda params: {"weight": 0},
        x_invar_index=None,
        gradient_enabled=True,
    )
    p = register_primitive_spec(spec)
    temp_primitives.append(p)
    assert is_etp_primitive(p) and is_etp_enable_gradient_primitive(p)
    assert not is_batched_primitive(p)
    assert get_x_invar_index(p) is None
    assert get_trainable_invars(p, {}) == {"weight": 0}


def test_non_etp_primitives():
    # A JAX primitive, and a primitive object that only shares a built-in's name (identity counts).
    impostor = _compatible_imports.Primitive(etp_mm_p.name)
    for prim in (jax.lax.add_p, jax.lax.dot_general_p, impostor):
        assert is_etp_primitive(prim) is False
        assert is_batched_primitive(prim) is False
        assert is_etp_enable_gradient_primitive(prim) is False
        # the defaults the compiler assumes for a primitive without registered layout
        assert get_trainable_invars(prim, {}) == {"weight": 1}
        assert get_x_invar_index(prim) == 0
        assert get_y_outvar_index(prim) == 0


@pytest.mark.parametrize("obj", [None, "etp_mm", [etp_mm_p], {"p": etp_mm_p}])
def test_predicates_answer_false_for_other_objects(obj):
    assert is_etp_primitive(obj) is False
    assert is_batched_primitive(obj) is False
    assert is_etp_enable_gradient_primitive(obj) is False
