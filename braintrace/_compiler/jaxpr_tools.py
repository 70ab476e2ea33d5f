"""Small, version-tolerant tools over jaxprs: inlining calls, finding sub-jaxprs, and an
interpreter with hooks (the executor's way of cutting ETP outputs and perturbing hidden states).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional

import jax

from braintrace._compatible_imports import Literal, bind_equation, consts_of, jaxpr_of
from braintrace._etrace_op._registries import ETP_PRIMITIVES, GRADIENT_ENABLED_PRIMITIVES

from .diagnostics import NotSupportedError

__all__ = [
    "CALL_PRIMITIVES",
    "CONTROL_FLOW_PRIMITIVES",
    "sub_jaxprs",
    "is_trainable_etp_eqn",
    "contains_etp",
    "inline_calls",
    "eval_jaxpr_hooked",
    "read",
    "live_towards",
]

#: Call-like primitives whose body is inlined so the compiler sees every ETP equation.
CALL_PRIMITIVES = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "remat2"})
#: Control flow inside one step: allowed when it holds no ETP primitive.
CONTROL_FLOW_PRIMITIVES = frozenset({"cond", "while", "scan", "switch"})


def sub_jaxprs(eqn) -> List:
    """Every jaxpr found in ``eqn.params`` (closed or open, possibly inside tuples)."""
    found = []

    def visit(v):
        if hasattr(v, "eqns") or (hasattr(v, "jaxpr") and hasattr(jaxpr_of(v), "eqns")):
            found.append(v)
        elif isinstance(v, (tuple, list)):
            for item in v:
                visit(item)

    for value in eqn.params.values():
        visit(value)
    return found


def is_trainable_etp_eqn(eqn) -> bool:
    """A trainable ETP equation: an ETP primitive that is not ``gradient_enabled``. The compiler
    holds its output fixed when it computes hidden Jacobians (it is a boundary of ``y -> h``)."""
    return eqn.primitive in ETP_PRIMITIVES and eqn.primitive not in GRADIENT_ENABLED_PRIMITIVES


def contains_etp(jaxpr) -> bool:
    """True when ``jaxpr`` (recursively) binds an ETP primitive."""
    for eqn in jaxpr_of(jaxpr).eqns:
        if eqn.primitive in ETP_PRIMITIVES:
            return True
        if any(contains_etp(j) for j in sub_jaxprs(eqn)):
            return True
    return False


def read(env: Dict, v):
    return v.val if isinstance(v, Literal) else env[v]


def _call_body(eqn):
    inner = sub_jaxprs(eqn)
    return inner[0] if len(inner) == 1 else None


def eval_jaxpr_hooked(
    jaxpr,
    consts: Iterable,
    args: Iterable,
    *,
    eqn_hook: Optional[Callable] = None,
    var_hook: Optional[Dict] = None,
    inline: bool = True,
):
    """Evaluate an open ``jaxpr`` with hooks.

    ``eqn_hook(index, eqn, invals)`` may return a list of outputs to use instead of binding the
    equation (``None``: bind as usual). ``var_hook[var](value)`` rewrites a variable's value right
    after it is defined (for invars too). Returns ``(outvals, env)``.
    """
    jaxpr = jaxpr_of(jaxpr)
    var_hook = var_hook or {}
    env: Dict = {}

    def write(v, val):
        if type(v).__name__ == "DropVar":
            return
        hook = var_hook.get(v)
        env[v] = hook(val) if hook is not None else val

    for v, c in zip(jaxpr.constvars, consts):
        write(v, c)
    for v, a in zip(jaxpr.invars, args):
        write(v, a)
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(env, v) for v in eqn.invars]
        outs = eqn_hook(i, eqn, invals) if eqn_hook is not None else None
        if outs is None:
            if inline and eqn.primitive.name in CALL_PRIMITIVES and _call_body(eqn) is not None:
                body = _call_body(eqn)
                outs, _ = eval_jaxpr_hooked(jaxpr_of(body), consts_of(body), invals)
            else:
                outs = bind_equation(eqn, invals)
        for v, val in zip(eqn.outvars, outs):
            write(v, val)
    return [read(env, v) for v in jaxpr.outvars], env


def live_towards(jaxpr, targets, blocks=lambda eqn: False) -> set:
    """Variables from which some variable in ``targets`` can be computed (a backward slice that
    does not pass through equations for which ``blocks(eqn)`` holds)."""
    live = {v for v in targets if not isinstance(v, Literal)}
    for eqn in reversed(jaxpr.eqns):
        if not blocks(eqn) and any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if not isinstance(v, Literal))
    return live


def check_control_flow(jaxpr) -> None:
    """Refuse ETP primitives inside control flow or custom-derivative calls within one step."""
    for eqn in jaxpr_of(jaxpr).eqns:
        inner = sub_jaxprs(eqn)
        if not inner:
            continue
        if eqn.primitive.name in CALL_PRIMITIVES:
            for j in inner:
                check_control_flow(j)
            continue
        if any(contains_etp(j) for j in inner):
            raise NotSupportedError(
                f"An ETP primitive is used inside `{eqn.primitive.name}` within one model step. The "
                f"compiler cannot connect it to hidden states through control flow; move the ETP op "
                f"(braintrace.matmul, ...) out of lax.cond / scan / while_loop / custom derivatives, "
                f"or compute both branches and select with jnp.where."
            )


def inline_calls(closed, in_avals) -> "jax.extend.core.ClosedJaxpr":
    """A closed jaxpr equal to ``closed`` with every call-like equation inlined."""
    jaxpr, consts = jaxpr_of(closed), consts_of(closed)

    def fn(*args):
        outs, _ = eval_jaxpr_hooked(jaxpr, consts, args)
        return outs

    return jax.make_jaxpr(fn)(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in in_avals])
