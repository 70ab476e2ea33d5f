"""Global registries of the ETP primitive layer.

The compiler and the online-learning algorithms look a primitive up in these tables at compile
time. They are plain containers keyed by the primitive object itself (type identity, never a
name match).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Set

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
    "RULE_REGISTRIES",
    "get_rule",
    "default_trainable_invars",
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
