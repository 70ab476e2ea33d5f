r"""Compile-time checks of the ETP primitives in a step: layouts and rule shapes.

The online algorithms call a primitive's rules with arrays whose shapes follow from the relation
(see :mod:`braintrace._etrace_op._trace_ops`). A rule that returns the wrong keys or a wrong but
broadcastable shape (``(1, O)`` for an ``(I, O)`` weight) would silently broadcast, and a layout
that points outside the equation's operands would fail deep inside the compiler. These checks run
every rule once with :func:`jax.eval_shape` (abstract evaluation: no FLOPs) against the shapes it
must produce, and raise one :class:`~braintrace.CompilationError` listing every problem.

What is checked, for a relation ``y = f(x, \theta)`` driving a hidden group of ``n`` states with
unit shape ``U`` (``U == y.shape`` for a batched primitive, ``U == (*batch, *y.shape)`` otherwise):

* ``xy_to_dw(x, g, weights, **params)`` with ``g`` of ``y``'s shape returns ``{key: weight}``,
  one leaf of each trainable operand's exact shape per trainable key (pp_prop, and D-RTRL for an
  unbatched primitive); for a batched primitive under the rule-derived D-RTRL trace operations also
  with a batch of one (``x[:1]``, ``g[:1]``).
* Under the rule-derived D-RTRL trace operations (primitives without their own
  :data:`~braintrace._etrace_op._trace_ops.ETP_DRTRL_TRACE_OPS`):
  ``init_drtrl(x_var, y_var, weight_vars, n)`` returns ``{key: (B, *weight, n)}`` for a batched
  primitive (``B = y.shape[0]``) and ``{key: (*weight, n)}`` otherwise, in a floating dtype; and
  ``yw_to_w(d, trace, **params)`` with ``d`` of shape ``U`` and one trace slice per key
  (``(B, *weight)`` or ``(*batch, *weight)``) returns the trace slice's keys and shapes.
* ``init_pp(x_var, y_var, weight_vars, n)`` (where pp_prop calls it: a primitive with ``x`` and a
  key other than ``bias``) returns one array of a floating dtype.

A rule that is not registered is not checked: the algorithm that needs it says so by name.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import List, Optional

import jax
import jax.numpy as jnp

from braintrace._etrace_op._registries import (
    BATCHED_PRIMITIVES,
    ETP_PRIMITIVES,
    ETP_RULES_INIT_DRTRL,
    ETP_RULES_INIT_PP,
    ETP_RULES_XY_TO_DW,
    ETP_RULES_YW_TO_W,
    ETP_TRAINABLE_INVARS_FNS,
    ETP_X_INVAR_INDICES,
    ETP_Y_OUTVAR_INDICES,
    default_trainable_invars,
)
from braintrace._etrace_op._trace_ops import ETP_DRTRL_TRACE_OPS, rule_kwargs

from .diagnostics import CompilationError

__all__ = [
    "check_equation_layouts",
    "check_relation_rules",
    "equation_layout_problems",
    "relation_rule_problems",
]

_SPEC_HINT = (
    "Each rule's signature and result are listed in the documentation of custom ETP primitives "
    "(register_primitive)."
)


# ----------------------------------------------------------------------------------------------
# layouts: trainable_invars_fn, x_invar_index, y_outvar_index against one equation
# ----------------------------------------------------------------------------------------------


def _as_index(value) -> Optional[int]:
    """``value`` as a Python int when it is an integer (not a bool), else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def equation_layout_problems(eqn, eqn_index: int) -> List[str]:
    """What is wrong with the declared operand layout of one ETP equation (empty when nothing)."""
    prim = eqn.primitive
    n_in, n_out = len(eqn.invars), len(eqn.outvars)
    where = f"{prim.name} (equation {eqn_index}, {n_in} operand(s))"
    problems = []
    xi = ETP_X_INVAR_INDICES.get(prim, 0)
    if xi is not None and not 0 <= xi < n_in:
        problems.append(f"{where}: x_invar_index={xi} is not a position in its {n_in} operand(s).")
    yi = ETP_Y_OUTVAR_INDICES.get(prim, 0)
    if not 0 <= yi < n_out:
        problems.append(f"{where}: y_outvar_index={yi} is not a position in its {n_out} output(s).")
    fn = ETP_TRAINABLE_INVARS_FNS.get(prim, default_trainable_invars)
    try:
        layout = fn(dict(eqn.params))
    except Exception as e:  # the layout function itself is broken
        return problems + [
            f"{where}: trainable_invars_fn(params) raised {type(e).__name__}: {e} "
            f"(params: {sorted(eqn.params)})."
        ]
    if not isinstance(layout, Mapping):
        return problems + [
            f"{where}: trainable_invars_fn must return a dict {{key: operand position}}, got "
            f"{type(layout).__name__} {layout!r}."
        ]
    seen = {}
    for key, idx in layout.items():
        pos = _as_index(idx)
        if not isinstance(key, str):
            problems.append(f"{where}: trainable_invars_fn returned the key {key!r}; keys must be str.")
        if pos is None:
            problems.append(
                f"{where}: trainable_invars_fn maps {key!r} to {idx!r} ({type(idx).__name__}); "
                f"positions must be ints."
            )
        elif not 0 <= pos < n_in:
            problems.append(
                f"{where}: trainable_invars_fn maps {key!r} to operand {pos}, out of range: the "
                f"equation has operands 0..{n_in - 1} (layout {dict(layout)!r})."
            )
        elif pos == xi:
            problems.append(f"{where}: trainable_invars_fn maps {key!r} to operand {pos}, which is x.")
        elif pos in seen:
            problems.append(
                f"{where}: trainable_invars_fn maps both {seen[pos]!r} and {key!r} to operand {pos}."
            )
        else:
            seen[pos] = key
    return problems


def check_equation_layouts(jaxpr) -> None:
    """Check the operand layout every ETP equation of ``jaxpr`` declares (``trainable_invars_fn``,
    ``x_invar_index``, ``y_outvar_index`` of :func:`~braintrace.register_primitive`) against the
    equation's operands.

    Raises
    ------
    CompilationError
        Listing every equation whose layout names a position it does not have, a non-int position,
        a non-str key, the same operand twice or ``x`` as a trainable operand.
    """
    problems = []
    for i, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive in ETP_PRIMITIVES:
            problems += equation_layout_problems(eqn, i)
    if problems:
        raise CompilationError(
            "The operand layout declared for an ETP primitive does not fit its equation:\n  - "
            + "\n  - ".join(problems)
            + "\nFix the arguments given to register_primitive (trainable_invars_fn maps eqn.params to "
            "{key: position in eqn.invars})."
        )


# ----------------------------------------------------------------------------------------------
# rules: abstract evaluation against the shapes the algorithms need
# ----------------------------------------------------------------------------------------------


class _RuleFailed(Exception):
    """A rule raised while it was evaluated abstractly."""


def _struct(v) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(v.aval.shape), v.aval.dtype)


def _fmt(a) -> str:
    if a is None:
        return "None"
    if isinstance(a, Mapping):
        return "{" + ", ".join(f"{k!r}: {_fmt(v)}" for k, v in a.items()) + "}"
    shape = getattr(a, "shape", None)
    dtype = getattr(a, "dtype", None)
    if shape is None or dtype is None:
        return type(a).__name__
    return f"{jnp.dtype(dtype).name}{list(shape)}"


class _Checker:
    """The checks of one relation; problems accumulate in ``self.problems``."""

    def __init__(self, relation):
        r = relation
        self.r = r
        self.prim = r.primitive
        self.batched = self.prim in BATCHED_PRIMITIVES
        self.keys = list(r.trainable_vars)
        self.x = _struct(r.x_var) if r.x_var is not None else None
        self.y = _struct(r.y_var)
        self.weights = {k: _struct(v) for k, v in r.trainable_vars.items()}
        self.aux = tuple(_struct(v) for v in getattr(r, "aux_vars", ()))
        self.params = dict(r.params)
        paths = sorted({p for ps in getattr(r, "param_paths", {}).values() for p in ps})
        self.where = f"{self.prim.name} (equation {getattr(r, 'eqn_index', '?')}" + (
            f", weight(s) {paths})" if paths else ")"
        )
        self.problems: List[str] = []
        self.cause: Optional[BaseException] = None

    # -- helpers ------------------------------------------------------------------------------
    def _eval(self, rule_name, call, fn, *args):
        try:
            return jax.eval_shape(fn, *args)
        except Exception as e:
            self.cause = self.cause or e
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.problems.append(
                f"{self.where}: rule {rule_name!r} raised {type(e).__name__}"
                + (f" ({msg[:300]})" if msg else "")
                + f" when called as {call}."
            )
            raise _RuleFailed from e

    def _leaves(self, rule_name, call, out, expected: dict, what: str) -> None:
        """``out`` must be a dict with exactly ``expected``'s keys and shapes."""
        if not isinstance(out, Mapping):
            self.problems.append(
                f"{self.where}: rule {rule_name!r} must return a dict {{key: array}} over the trainable "
                f"keys {self.keys}, got {type(out).__name__} {_fmt(out)} (called as {call})."
            )
            return
        if set(out) != set(expected):
            self.problems.append(
                f"{self.where}: rule {rule_name!r} returned the keys {sorted(map(str, out))}; expected "
                f"exactly the trainable keys {sorted(expected)} declared by trainable_invars_fn "
                f"(called as {call})."
            )
        for k in self.keys:
            if k not in out or k not in expected:
                continue
            got = out[k]
            shape = getattr(got, "shape", None)
            if shape is None:
                self.problems.append(
                    f"{self.where}: rule {rule_name!r}, key {k!r}: expected an array of shape "
                    f"{tuple(expected[k])} ({what}), got {type(got).__name__} (called as {call})."
                )
            elif tuple(shape) != tuple(expected[k]):
                self.problems.append(
                    f"{self.where}: rule {rule_name!r}, key {k!r}: expected shape {tuple(expected[k])} "
                    f"({what}), got {tuple(shape)} (called as {call})."
                )

    def _kw(self, aux):
        return rule_kwargs(self.params, aux)

    # -- xy_to_dw -----------------------------------------------------------------------------
    def xy_to_dw(self, default_ops: bool) -> None:
        rule = ETP_RULES_XY_TO_DW.get(self.prim)
        if rule is None:
            return
        g = jax.ShapeDtypeStruct(self.y.shape, self.y.dtype)
        forms = [(self.x, g, "with x and y as bound, as pp_prop calls it")]
        if self.batched and default_ops and len(self.y.shape) > 0:
            x1 = None if self.x is None else jax.ShapeDtypeStruct((1, *self.x.shape[1:]), self.x.dtype)
            g1 = jax.ShapeDtypeStruct((1, *self.y.shape[1:]), self.y.dtype)
            forms.append((x1, g1, "with one batch element, as the D-RTRL trace update calls it"))
        expected = {k: w.shape for k, w in self.weights.items()}
        for x, gg, how in forms:
            call = (
                f"xy_to_dw(x={_fmt(x)}, hidden_dim={_fmt(gg)}, weights={_fmt(self.weights)}"
                f"{self._params_text()}) {how}"
            )
            fn = lambda x_, g_, w_, a_: rule(x_, g_, w_, **self._kw(a_))
            before = len(self.problems)
            try:
                out = self._eval("xy_to_dw", call, fn, x, gg, self.weights, self.aux)
            except _RuleFailed:
                return
            self._leaves("xy_to_dw", call, out, expected, "the shape of the trainable operand")
            if len(self.problems) > before:
                return  # the next form would repeat the same problem

    # -- init_drtrl and yw_to_w (rule-derived D-RTRL trace operations) -------------------------
    def init_drtrl(self, n: int) -> None:
        rule = ETP_RULES_INIT_DRTRL.get(self.prim)
        if rule is None:
            return
        lead = tuple(self.y.shape[:1]) if self.batched else ()
        call = (
            f"init_drtrl(x_var={_fmt(self.x)}, y_var={_fmt(self.y)}, weight_vars={_fmt(self.weights)}, "
            f"num_hidden_state={n})"
        )
        r = self.r
        try:
            out = self._eval("init_drtrl", call, lambda: rule(r.x_var, r.y_var, dict(r.trainable_vars), n))
        except _RuleFailed:
            return
        what = (
            "(y.shape[0], *weight.shape, num_hidden_state) for a batched primitive"
            if self.batched
            else "(*weight.shape, num_hidden_state) for an unbatched primitive"
        )
        expected = {k: (*lead, *w.shape, n) for k, w in self.weights.items()}
        before = len(self.problems)
        self._leaves("init_drtrl", call, out, expected, what)
        if len(self.problems) == before and isinstance(out, Mapping):
            for k, leaf in out.items():
                if not jnp.issubdtype(leaf.dtype, jnp.inexact):
                    self.problems.append(
                        f"{self.where}: rule 'init_drtrl', key {k!r}: the trace must have a floating "
                        f"dtype, got {jnp.dtype(leaf.dtype).name} (called as {call})."
                    )

    def yw_to_w(self, group, batch_ndim: int) -> None:
        rule = ETP_RULES_YW_TO_W.get(self.prim)
        if rule is None:
            return
        if self.batched:
            lead = tuple(self.y.shape[:1])
        else:
            lead = tuple(group.shape[:batch_ndim])
        d = jax.ShapeDtypeStruct(tuple(group.shape), group.dtype)
        trace = {k: jax.ShapeDtypeStruct((*lead, *w.shape), w.dtype) for k, w in self.weights.items()}
        call = f"yw_to_w(hidden_dim={_fmt(d)}, trace={_fmt(trace)}{self._params_text()})"
        fn = lambda d_, t_, a_: rule(d_, t_, **self._kw(a_))
        try:
            out = self._eval("yw_to_w", call, fn, d, trace, self.aux)
        except _RuleFailed:
            return
        expected = {k: t.shape for k, t in trace.items()}
        self._leaves("yw_to_w", call, out, expected, "the shape of the trace it propagates")

    # -- init_pp ------------------------------------------------------------------------------
    def init_pp(self, n: int) -> None:
        rule = ETP_RULES_INIT_PP.get(self.prim)
        if rule is None or self.x is None or all(k == "bias" for k in self.keys):
            return  # pp_prop does not call it
        call = (
            f"init_pp(x_var={_fmt(self.x)}, y_var={_fmt(self.y)}, weight_vars={_fmt(self.weights)}, "
            f"num_hidden_state={n})"
        )
        r = self.r
        try:
            out = self._eval("init_pp", call, lambda: rule(r.x_var, r.y_var, dict(r.trainable_vars), n))
        except _RuleFailed:
            return
        dtype = getattr(out, "dtype", None)
        if dtype is None or isinstance(out, Mapping):
            self.problems.append(
                f"{self.where}: rule 'init_pp' must return one array (its dtype is the df trace's), got "
                f"{type(out).__name__} {_fmt(out)} (called as {call})."
            )
        elif not jnp.issubdtype(dtype, jnp.inexact):
            self.problems.append(
                f"{self.where}: rule 'init_pp' must return a floating array, got dtype "
                f"{jnp.dtype(dtype).name} (called as {call})."
            )

    def _params_text(self) -> str:
        names = sorted(self.params) + (["aux"] if self.aux else [])
        return f", **{{{', '.join(names)}}}" if names else ""

    def run(self) -> List[str]:
        default_ops = self.prim not in ETP_DRTRL_TRACE_OPS
        self.xy_to_dw(default_ops)
        done_n = set()
        for gi, group in enumerate(self.r.hidden_groups):
            n = group.num_state
            if default_ops:
                if n not in done_n:
                    self.init_drtrl(n)
                self.yw_to_w(group, self.r.batch_ndims[gi])
            if n not in done_n:
                self.init_pp(n)
            done_n.add(n)
        return self.problems


def relation_rule_problems(relation) -> List[str]:
    """The problems :func:`check_relation_rules` finds in one relation (empty when none)."""
    return _Checker(relation).run()


def check_relation_rules(graph_or_relations) -> None:
    """Evaluate every ETP rule of every relation abstractly against the shapes it must produce.

    Parameters
    ----------
    graph_or_relations : ETraceGraph or iterable of HiddenParamOpRelation

    Raises
    ------
    CompilationError
        One error listing, per problem, the primitive, the rule, the trainable key, and the
        expected and received shapes (or the exception the rule raised and how it was called).

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, braintrace
    >>> from braintrace._compiler.rule_check import check_relation_rules
    >>> class Leaky(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = brainstate.ParamState(jnp.ones((2, 3)))
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 3)))
    ...     def update(self, x):
    ...         self.h.value = 0.9 * self.h.value + braintrace.matmul(x, self.w.value)
    ...         return self.h.value
    >>> model = Leaky(); _ = brainstate.nn.init_all_states(model, batch_size=4)
    >>> check_relation_rules(braintrace.compile_etrace_graph(model, jnp.zeros((4, 2))))
    """
    relations = getattr(graph_or_relations, "hidden_param_op_relations", graph_or_relations)
    problems, cause = [], None
    for r in relations:
        checker = _Checker(r)
        problems += checker.run()
        cause = cause or checker.cause
    if problems:
        raise CompilationError(
            "The ETP rules of a primitive do not produce what the online algorithms need:\n  - "
            + "\n  - ".join(problems)
            + "\n"
            + _SPEC_HINT
        ) from cause
