r"""ETP primitives inside control flow: rewrite one step's jaxpr so that every ETP equation sits at
its top level, where the compiler connects it to hidden states.

* ``lax.cond`` / ``lax.switch`` whose branches hold an ETP primitive: every branch is evaluated
  and the result is chosen with ``select_n`` on the (clamped) branch index. A jaxpr is pure, so
  this computes the same values; the unselected branch's ETP outputs reach no hidden state (their
  ``\partial h/\partial y`` is zero at that step), exactly as for a model written with
  ``jnp.where``. Each ETP equation of each branch becomes a relation of its own.
* ``lax.scan`` / ``lax.fori_loop`` with a static trip count of at most ``scan_unroll_limit`` whose
  body holds an ETP primitive (integration sub-steps within one time step): the body is unrolled.
  The sub-steps' intrinsic Jacobians then compose into the step's ``D``; each sub-step's ETP
  equation is a relation, and a sub-step's ETP output that feeds a later sub-step's ETP input is a
  path through another trainable op, which the compiler records like any other.
* ``lax.while_loop`` whose body or predicate holds an ETP primitive, and a scan longer than the
  limit, are refused with :class:`NotSupportedError` naming the construct. Control flow without
  ETP primitives is left as it is (the unit analysis reads it through its bodies).

Nested constructs are rewritten from the inside out by the same interpreter.
"""

from __future__ import annotations

from typing import List, Sequence

import jax
import jax.numpy as jnp

from braintrace._compatible_imports import consts_of, jaxpr_of, scan_operand_counts

from .diagnostics import NotSupportedError
from .jaxpr_tools import contains_etp, eval_jaxpr_hooked, sub_jaxprs

__all__ = ["DEFAULT_SCAN_UNROLL_LIMIT", "lower_etp_control_flow"]

#: Longest ``scan`` / ``fori_loop`` holding an ETP primitive that is unrolled into the step.
DEFAULT_SCAN_UNROLL_LIMIT = 16


def _holds_etp(eqn) -> bool:
    return any(contains_etp(j) for j in sub_jaxprs(eqn))


def _eval_closed(closed, args: Sequence, hook) -> List:
    outs, _ = eval_jaxpr_hooked(jaxpr_of(closed), consts_of(closed), list(args), eqn_hook=hook)
    return outs


def _select(index, branch_outs: List[List]) -> List:
    n = len(branch_outs)
    index = jnp.clip(index, 0, n - 1).astype(jnp.int32)
    out = []
    for values in zip(*branch_outs):
        if n == 1:
            out.append(values[0])
        else:
            out.append(jax.lax.select_n(index, *[jnp.asarray(v) for v in values]))
    return out


def _unrolled_scan(eqn, invals, hook, limit: int) -> List:
    p = eqn.params
    length = int(p["length"])
    if length > limit:
        raise NotSupportedError(
            f"An ETP primitive is used inside a `scan` (or `fori_loop`) of {length} iterations within "
            f"one model step; sub-step loops holding ETP primitives are unrolled up to "
            f"scan_unroll_limit={limit} iterations. Raise the limit "
            f"(braintrace.ControlFlowPolicy(scan_unroll_limit=...)) or move the ETP op out of the loop."
        )
    n_c, n_carry = scan_operand_counts(p)
    consts, carry, xs = invals[:n_c], list(invals[n_c : n_c + n_carry]), invals[n_c + n_carry :]
    ys_steps = []
    order = range(length - 1, -1, -1) if p.get("reverse", False) else range(length)
    for i in order:
        outs = _eval_closed(p["jaxpr"], [*consts, *carry, *[x[i] for x in xs]], hook)
        carry, ys = list(outs[:n_carry]), outs[n_carry:]
        ys_steps.append((i, ys))
    ys_steps.sort(key=lambda item: item[0])
    n_ys = len(eqn.outvars) - n_carry
    stacked = []
    for k in range(n_ys):
        if length == 0:
            aval = eqn.outvars[n_carry + k].aval
            stacked.append(jnp.zeros(aval.shape, aval.dtype))
        else:
            stacked.append(jnp.stack([ys[k] for _, ys in ys_steps]))
    return [*carry, *stacked]


def lower_etp_control_flow(closed, in_avals, scan_unroll_limit: int = DEFAULT_SCAN_UNROLL_LIMIT):
    """A closed jaxpr computing the same values as ``closed`` with every ETP primitive at top level.

    Parameters
    ----------
    closed : ClosedJaxpr
        One model step (calls already inlined).
    in_avals : sequence of abstract values
        Its inputs' shapes and dtypes.
    scan_unroll_limit : int
        The longest ``scan`` holding an ETP primitive that is unrolled.

    Returns
    -------
    ``closed`` itself when no control flow holds an ETP primitive, else the rewritten closed jaxpr.

    Raises
    ------
    NotSupportedError
        An ETP primitive inside ``while_loop``, or inside a ``scan`` longer than the limit.
    """
    if isinstance(scan_unroll_limit, bool) or not isinstance(scan_unroll_limit, int) or scan_unroll_limit < 0:
        raise ValueError(f"`scan_unroll_limit` must be an int >= 0, got {scan_unroll_limit!r}.")
    jaxpr = jaxpr_of(closed)
    if not any(_holds_etp(e) for e in jaxpr.eqns):
        return closed

    def hook(_, eqn, invals):
        if not _holds_etp(eqn):
            return None
        name = eqn.primitive.name
        if name == "cond":
            branch_outs = [_eval_closed(b, invals[1:], hook) for b in eqn.params["branches"]]
            return _select(invals[0], branch_outs)
        if name == "scan":
            return _unrolled_scan(eqn, invals, hook, scan_unroll_limit)
        if name == "while":
            raise NotSupportedError(
                "An ETP primitive is used inside a `while_loop` within one model step. Its trip count "
                "is not static, so it cannot be unrolled into the step; use `lax.fori_loop` with a "
                "static trip count (unrolled up to ControlFlowPolicy.scan_unroll_limit iterations) or "
                "move the ETP op out of the loop."
            )
        raise NotSupportedError(
            f"An ETP primitive is used inside `{name}` within one model step, which the compiler "
            f"cannot rewrite; move the ETP op (braintrace.matmul, ...) out of it."
        )

    def fn(*args):
        outs, _ = eval_jaxpr_hooked(jaxpr, consts_of(closed), args, eqn_hook=hook)
        return outs

    return jax.make_jaxpr(fn)(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in in_avals])
