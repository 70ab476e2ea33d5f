"""Every JAX-version-sensitive import in one place.

braintrace runs on jax 0.10.x (CPU machines) and jax 0.11.x (GPU machines). JAX 0.11 merged
``ClosedJaxpr`` into ``Jaxpr`` and keeps moving internal names; this module detects capabilities
rather than versions so the rest of the package imports from here only.
"""

from __future__ import annotations

import jax.extend as _jex
from jax.interpreters import ad, batching, mlir

__all__ = [
    "Primitive",
    "ClosedJaxpr",
    "Jaxpr",
    "Var",
    "Literal",
    "ShapedArray",
    "ad",
    "batching",
    "mlir",
    "is_closed_jaxpr",
    "jaxpr_of",
    "consts_of",
    "new_jaxpr_eqn_params",
    "scan_operand_counts",
]

Primitive = _jex.core.Primitive
Jaxpr = _jex.core.Jaxpr
ClosedJaxpr = getattr(_jex.core, "ClosedJaxpr", Jaxpr)
Var = _jex.core.Var
Literal = _jex.core.Literal

try:  # jax >= 0.4.30 exposes ShapedArray from jax.core
    from jax.core import ShapedArray
except ImportError:  # pragma: no cover - future layouts
    from jax._src.core import ShapedArray  # type: ignore


def is_closed_jaxpr(obj) -> bool:
    """True for a closed jaxpr (``ClosedJaxpr`` on jax 0.10, a ``Jaxpr`` with consts on 0.11)."""
    return hasattr(obj, "jaxpr") and hasattr(obj, "consts")


def jaxpr_of(obj):
    """The open jaxpr (with ``eqns``, ``invars``, ``outvars``) of a closed or open jaxpr."""
    inner = getattr(obj, "jaxpr", None)
    return inner if inner is not None and hasattr(inner, "eqns") else obj


def consts_of(obj):
    """The constants of a closed jaxpr (empty for an open one)."""
    return list(getattr(obj, "consts", ()) or ())


def scan_operand_counts(params) -> tuple[int, int]:
    """``(number of consts, number of carries)`` of a ``scan`` equation from its ``params``.

    A ``scan`` equation's operands are ``consts, carry, xs`` and its outputs ``carry, ys``. jax 0.10
    states the counts as ``num_consts`` and ``num_carry``; jax 0.11 as the flat tree ``ft_in`` of
    the three operand groups (and it may move a carry the body passes through unchanged to the
    consts).
    """
    if "num_consts" in params:
        return int(params["num_consts"]), int(params["num_carry"])
    consts, carry, _ = params["ft_in"].unpack()
    return len(consts), len(carry)


def new_jaxpr_eqn_params(eqn) -> dict:
    """A plain dict copy of an equation's params."""
    return dict(eqn.params)


# ``jax.extend.core.Literal`` values: ``.val`` on every version.
def literal_value(lit):
    return lit.val


__all__.append("literal_value")
__all__.append("jax")


def bind_equation(eqn, invals):
    """Bind ``eqn``'s primitive on ``invals`` (``get_bind_params`` returns params alone on new
    jax and ``(subfuns, params)`` on older releases). Always returns a list of outputs."""
    res = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], dict):
        subfuns, params = res
    else:
        subfuns, params = (), res
    with eqn.ctx.manager if hasattr(eqn, "ctx") else _nullcontext():
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


__all__.append("bind_equation")
