"""Global registries of the ETP primitive layer.

The compiler and the online-learning algorithms look a primitive up in these tables at compile
time. They are plain containers keyed by the primitive object itself (type identity, never a
name match).

The query helpers (:func:`is_etp_primitive`, :func:`is_etp_enable_gradient_primitive`,
:func:`is_batched_primitive`, :func:`get_trainable_invars`, :func:`get_x_invar_index`,
:func:`get_y_outvar_index`) answer one question each about one primitive, with the defaults the
compiler itself applies; they are the published names of ``braintrace._etrace_op``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Set

__all__ = [
    "ETP_PRIMITIVES",
    "BATCHED_PRIMITIVES",
    "GRADIENT_ENABLED_PRIMITIVES",
    "ETP_RULES_YW_TO_W",
    "ETP_RULES_XY_TO_DW",
    "ETP_RULES_INIT_DRTRL",
    "ETP_RULES_INIT_PP",
    "ETP_TRAINABLE_INVARS_FNS",
    "ETP_X_INVAR_INDICES",
    "ETP_Y_OUTVAR_INDICES",
    "ETP_PRIMITIVE_SPECS",
    "ETP_PRIMITIVES_BY_NAME",
    "ETP_PP_X_REPR",
    "RULE_REGISTRIES",
    "get_rule",
    "default_trainable_invars",
    "is_etp_primitive",
    "is_etp_enable_gradient_primitive",
    "is_batched_primitive",
    "get_trainable_invars",
    "get_x_invar_index",
    "get_y_outvar_index",
]

#: Every registered ETP primitive.
ETP_PRIMITIVES: Set = set()
#: Primitives whose ``x`` (``invars[x_invar_index]``) and ``y`` carry a leading batch axis.
BATCHED_PRIMITIVES: Set = set()
#: Identity-like primitives the compiler walks through on the ``y -> h`` walk.
GRADIENT_ENABLED_PRIMITIVES: Set = set()
#: ``yw_to_w(hidden_dim, trace: dict, **params) -> dict``.
ETP_RULES_YW_TO_W: Dict = {}
#: ``xy_to_dw(x, hidden_dim, weights: dict, **params) -> dict``.
ETP_RULES_XY_TO_DW: Dict = {}
#: ``init_drtrl(x_var, y_var, weight_vars: dict, num_hidden_state) -> dict``.
ETP_RULES_INIT_DRTRL: Dict = {}
#: ``init_pp(x_var, y_var, weight_vars: dict, num_hidden_state) -> array``.
ETP_RULES_INIT_PP: Dict = {}
#: ``params -> {trainable_key: invar_index}``.
ETP_TRAINABLE_INVARS_FNS: Dict = {}
#: Position of ``x`` in ``eqn.invars`` (``None`` for input-free primitives).
ETP_X_INVAR_INDICES: Dict = {}
#: Position of ``y`` in ``eqn.outvars``.
ETP_Y_OUTVAR_INDICES: Dict = {}
#: Primitive -> :class:`~braintrace.ETPPrimitiveSpec` for spec-registered primitives.
ETP_PRIMITIVE_SPECS: Dict = {}
#: Name -> primitive, to detect re-registration of a name.
ETP_PRIMITIVES_BY_NAME: Dict[str, object] = {}
#: ``pp_x_repr(x, weights: dict) -> array``: what the input trace of pp_prop filters in place of ``x``
#: for a primitive whose ``x`` is not a real-valued input (the one-hot rows of ``embedding``'s integer
#: indices); its ``xy_to_dw`` accepts that representation as ``x``. Absent: ``x`` itself.
ETP_PP_X_REPR: Dict = {}

RULE_REGISTRIES = {
    "yw_to_w": ETP_RULES_YW_TO_W,
    "xy_to_dw": ETP_RULES_XY_TO_DW,
    "init_drtrl": ETP_RULES_INIT_DRTRL,
    "init_pp": ETP_RULES_INIT_PP,
}


def default_trainable_invars(params) -> Dict[str, int]:
    """The single-weight layout ``{'weight': 1}`` used when a primitive declares none."""
    return {"weight": 1}


def get_rule(primitive, rule: str) -> Callable:
    """Look up one of the four ETP rules of ``primitive``.

    Raises
    ------
    KeyError
        If ``rule`` is not one of ``yw_to_w``, ``xy_to_dw``, ``init_drtrl``, ``init_pp``, or the
        primitive has no such rule registered; the message says how to register it.
    """
    if rule not in RULE_REGISTRIES:
        raise KeyError(f"Unknown ETP rule {rule!r}; expected one of {sorted(RULE_REGISTRIES)}.")
    table = RULE_REGISTRIES[rule]
    fn: Optional[Callable] = table.get(primitive)
    if fn is None:
        name = getattr(primitive, "name", primitive)
        raise KeyError(
            f"ETP primitive {name!r} has no {rule!r} rule. Register it with "
            f"`{name}_p.register_{rule}(fn)`, `register_etp_rules({rule}=fn)` or an ETPPrimitiveSpec."
        )
    return fn


def _member(primitive: Any, table: Set) -> bool:
    """``primitive in table``, ``False`` for an object that cannot be a key (unhashable)."""
    try:
        return primitive in table
    except TypeError:
        return False


def is_etp_primitive(primitive: Any) -> bool:
    """Whether ``primitive`` is a registered ETP primitive (an entry of :data:`ETP_PRIMITIVES`).

    Membership is by identity: a primitive made by :func:`~braintrace.register_primitive` or an
    :class:`~braintrace.ETPPrimitiveSpec` counts until it is unregistered; a JAX primitive, or a
    different primitive object with the same name, does not.

    Examples
    --------
    >>> import jax
    >>> from braintrace._etrace_op import etp_mm_p, is_etp_primitive
    >>> is_etp_primitive(etp_mm_p), is_etp_primitive(jax.lax.dot_general_p)
    (True, False)
    """
    return _member(primitive, ETP_PRIMITIVES)


def is_etp_enable_gradient_primitive(primitive: Any) -> bool:
    """Whether ``primitive`` was registered with ``gradient_enabled=True``.

    The members of :data:`GRADIENT_ENABLED_PRIMITIVES` are identity-like (``element_wise``: its output
    is a function of the weight alone): the compiler walks through them on ``y -> h`` and does not
    hold their output fixed when it forms the hidden Jacobian, as it does for a trainable weight
    operation (``etp_mm``). ``False`` for every primitive that is not a registered ETP primitive.

    Examples
    --------
    >>> from braintrace._etrace_op import etp_elemwise_p, etp_mm_p, is_etp_enable_gradient_primitive
    >>> is_etp_enable_gradient_primitive(etp_elemwise_p), is_etp_enable_gradient_primitive(etp_mm_p)
    (True, False)
    """
    return _member(primitive, GRADIENT_ENABLED_PRIMITIVES)


def is_batched_primitive(primitive: Any) -> bool:
    """Whether ``primitive`` was registered with ``batched=True`` (:data:`BATCHED_PRIMITIVES`).

    The ``x`` and ``y`` of a batched primitive carry a leading batch axis (``etp_mm``: ``x`` of shape
    ``(batch, in)``), so its traces do too; an unbatched one (``etp_mv``: ``x`` of shape ``(in,)``)
    gets its batch axes from the hidden states it feeds. ``False`` for every primitive that is not a
    registered ETP primitive.

    Examples
    --------
    >>> from braintrace._etrace_op import etp_mm_p, etp_mv_p, is_batched_primitive
    >>> is_batched_primitive(etp_mm_p), is_batched_primitive(etp_mv_p)
    (True, False)
    """
    return _member(primitive, BATCHED_PRIMITIVES)


def get_trainable_invars(primitive: Any, eqn_params: Mapping) -> Dict[str, int]:
    """``{trainable_key: invar_index}`` of one equation of ``primitive`` with params ``eqn_params``.

    The primitive's ``trainable_invars_fn`` (:data:`ETP_TRAINABLE_INVARS_FNS`) applied to a copy of
    ``eqn_params``, so the layout may depend on static params (``has_bias`` adds ``'bias'``). A
    primitive with no registered layout (every primitive that is not a registered ETP primitive)
    gets the single-weight default ``{'weight': 1}``, the layout the compiler assumes; check
    :func:`is_etp_primitive` first when that matters.

    Parameters
    ----------
    primitive : Primitive
    eqn_params : mapping
        The equation's static params (``eqn.params``).

    Examples
    --------
    >>> from braintrace._etrace_op import etp_lora_mm_p, etp_mm_p, get_trainable_invars
    >>> get_trainable_invars(etp_mm_p, {'has_bias': True})
    {'weight': 1, 'bias': 2}
    >>> get_trainable_invars(etp_lora_mm_p, {'alpha': 1.0, 'has_bias': False})
    {'lora_b': 1, 'lora_a': 2}
    """
    fn = ETP_TRAINABLE_INVARS_FNS.get(primitive, default_trainable_invars)
    return dict(fn(dict(eqn_params)))


def get_x_invar_index(primitive: Any) -> Optional[int]:
    """Position of the input ``x`` in ``eqn.invars`` of ``primitive``; ``None`` for an input-free one.

    An input-free primitive (``etp_elemwise``) has no ``x``: its rules take ``x=None``. A primitive
    with no registered index (every primitive that is not a registered ETP primitive) gets ``0``,
    the index the compiler assumes.

    Examples
    --------
    >>> from braintrace._etrace_op import etp_elemwise_p, etp_mm_p, get_x_invar_index
    >>> get_x_invar_index(etp_mm_p), get_x_invar_index(etp_elemwise_p)
    (0, None)
    """
    return ETP_X_INVAR_INDICES.get(primitive, 0)


def get_y_outvar_index(primitive: Any) -> int:
    """Position of the output ``y`` in ``eqn.outvars`` of ``primitive``.

    ``0`` for the built-in primitives (one output each), and for a primitive with no registered
    index (every primitive that is not a registered ETP primitive).

    Examples
    --------
    >>> from braintrace._etrace_op import etp_sp_mm_p, get_y_outvar_index
    >>> get_y_outvar_index(etp_sp_mm_p)
    0
    """
    return ETP_Y_OUTVAR_INDICES.get(primitive, 0)
