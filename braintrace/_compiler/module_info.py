"""Trace one model step into a flat jaxpr over state values and inputs.

The step ``model(*inputs)`` reads and writes ``brainstate`` states. :func:`extract_module_info`
turns it into a pure closed jaxpr

    (state leaves..., input leaves...) -> (output leaves..., new state leaves...)

with every call-like equation (``jit``) inlined, so each ETP equation is visible, and records
which states are hidden states, parameters, or other states.

Only floating-point leaves of a hidden state are hidden leaves: an integer or boolean leaf (a spike
counter, a refractory flag) carries no gradient, so it is carried through the step like any other
non-hidden state and listed in :attr:`ModuleInfo.non_float_hidden`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Tuple

import brainstate
import jax
import jax.numpy as jnp

from braintrace._compatible_imports import jaxpr_of

from .control_flow import DEFAULT_SCAN_UNROLL_LIMIT, lower_etp_control_flow
from .diagnostics import CompilationError, DiagnosticKind, DiagnosticLevel, emit
from .jaxpr_tools import check_control_flow, inline_calls
from .rule_check import check_equation_layouts

__all__ = [
    "ModuleInfo",
    "HiddenLeaf",
    "extract_module_info",
    "hidden_state_types",
    "record_non_float_hidden_states",
]


def hidden_state_types() -> Tuple[type, ...]:
    """The hidden-state classes of the installed brainstate."""
    names = ("HiddenState", "HiddenGroupState", "HiddenTreeState")
    return tuple(getattr(brainstate, n) for n in names if hasattr(brainstate, n))


@dataclasses.dataclass(frozen=True)
class HiddenLeaf:
    """One hidden state as the algorithms see it: an array leaf of a ``brainstate`` hidden state.

    ``leaf`` indexes the flat state-leaf list; ``slot`` is the index along the last axis for a
    ``HiddenGroupState`` (whose last axis enumerates its states), ``None`` otherwise.
    """

    state_index: int
    leaf: int
    slot: Optional[int]
    name: str
    shape: Tuple[int, ...]
    dtype: Any


@dataclasses.dataclass
class ModuleInfo:
    """The traced step of a model.

    Attributes
    ----------
    model : brainstate.nn.Module
    states : tuple of brainstate.State
        Every state the step reads or writes, in trace order.
    paths : tuple of tuple of str
        Each state's path in the model (``('<external>', i)`` for states outside it).
    written : tuple of bool
    state_treedef : PyTreeDef of the list of state values
    state_leaf_ranges : list of (start, stop) into the flat state-leaf list, per state
    arg_treedef, out_treedef : PyTreeDef
    closed_jaxpr : the flat step jaxpr (see the module docstring)
    hidden_leaves : tuple of HiddenLeaf
    param_states : tuple of int
        Indices (into ``states``) of ``brainstate.ParamState`` objects.
    arg_avals : tuple of jax.ShapeDtypeStruct
        The input leaves the step was traced with.
    non_float_hidden : tuple of (str, dtype)
        Leaves of hidden states whose dtype is not floating point (integer or boolean), by name:
        they are not hidden leaves (no gradient flows through them) and are carried like any other
        state the step writes.
    """

    model: Any
    states: Tuple
    paths: Tuple[Tuple[str, ...], ...]
    written: Tuple[bool, ...]
    state_treedef: Any
    state_leaf_ranges: List[Tuple[int, int]]
    arg_treedef: Any
    out_treedef: Any
    closed_jaxpr: Any
    hidden_leaves: Tuple[HiddenLeaf, ...]
    param_states: Tuple[int, ...]
    arg_avals: Tuple
    non_float_hidden: Tuple[Tuple[str, Any], ...] = ()

    @property
    def jaxpr(self):
        return jaxpr_of(self.closed_jaxpr)

    @property
    def num_state_leaves(self) -> int:
        return self.state_leaf_ranges[-1][1] if self.state_leaf_ranges else 0

    @property
    def num_out_leaves(self) -> int:
        return self.out_treedef.num_leaves

    def state_invars(self):
        return self.jaxpr.invars[: self.num_state_leaves]

    def state_outvars(self):
        return self.jaxpr.outvars[self.num_out_leaves :]

    def leaf_owner(self, leaf: int) -> int:
        for i, (a, b) in enumerate(self.state_leaf_ranges):
            if a <= leaf < b:
                return i
        raise IndexError(leaf)

    def path_of(self, state_index: int) -> str:
        return ".".join(map(str, self.paths[state_index]))


def _state_paths(model) -> dict:
    try:
        return {id(s): tuple(map(str, p)) for p, s in model.states().items()}
    except Exception:  # pragma: no cover - a model without a state tree
        return {}


def extract_module_info(model, *inputs, control_flow=None) -> ModuleInfo:
    """Trace ``model(*inputs)`` once and return its :class:`ModuleInfo`.

    ETP primitives inside ``cond`` / ``switch`` and inside ``scan`` / ``fori_loop`` sub-steps are
    brought to the top level of the step (:func:`~braintrace._compiler.control_flow.lower_etp_control_flow`;
    ``control_flow.scan_unroll_limit`` bounds the loops unrolled, 16 by default).

    Raises
    ------
    CompilationError
        If the model is not callable or states change shape within the step.
    NotSupportedError
        If an ETP primitive sits inside control flow that cannot be rewritten (``while_loop``, a
        loop longer than the unroll limit, a custom-derivative function).
    """
    if not callable(model):
        raise CompilationError(
            f"The model must be a callable brainstate.nn.Module, got {type(model).__name__}."
        )
    with brainstate.StateTraceStack() as trace:
        jax.eval_shape(lambda *a: model(*a), *inputs)
    trace.recovery_original_values()
    states = tuple(trace.states)
    written = tuple(bool(w) for w in trace.been_writen)

    values = [s.value for s in states]
    state_leaves, state_treedef = jax.tree.flatten(values)
    ranges, start = [], 0
    for v in values:
        n = len(jax.tree.leaves(v))
        ranges.append((start, start + n))
        start += n
    arg_leaves, arg_treedef = jax.tree.flatten(inputs)
    out_tree_box = {}

    def step(state_flat, arg_flat):
        old = [s.value for s in states]
        try:
            for s, v in zip(states, jax.tree.unflatten(state_treedef, state_flat)):
                s.restore_value(v)
            with brainstate.StateTraceStack():
                out = model(*jax.tree.unflatten(arg_treedef, arg_flat))
            out_flat, out_tree_box["tree"] = jax.tree.flatten(out)
            new_flat = jax.tree.leaves([s.value for s in states])
        finally:
            for s, v in zip(states, old):
                s.restore_value(v)
        return out_flat + new_flat

    state_avals = [jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x)) for x in state_leaves]
    arg_avals = [jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x)) for x in arg_leaves]
    closed = jax.make_jaxpr(lambda s, a: step(list(s), list(a)))(state_avals, arg_avals)
    n_out = out_tree_box["tree"].num_leaves
    new_avals = [v.aval for v in jaxpr_of(closed).outvars[n_out:]]
    for i, (old, new) in enumerate(zip(state_avals, new_avals)):
        if tuple(old.shape) != tuple(new.shape):
            owner = next(k for k, (a, b) in enumerate(ranges) if a <= i < b)
            raise CompilationError(
                f"State {owner} ({type(states[owner]).__name__}) changes shape within one step: "
                f"{tuple(old.shape)} -> {tuple(new.shape)}. Initialise states with the batch size you "
                f"run with (brainstate.nn.init_all_states(model, batch_size=...))."
            )
    closed = inline_calls(closed, [*state_avals, *arg_avals])
    limit = getattr(control_flow, "scan_unroll_limit", DEFAULT_SCAN_UNROLL_LIMIT)
    closed = lower_etp_control_flow(closed, [*state_avals, *arg_avals], scan_unroll_limit=limit)
    check_control_flow(closed)
    check_equation_layouts(jaxpr_of(closed))

    paths_by_id = _state_paths(model)
    paths = tuple(paths_by_id.get(id(s), ("<external>", str(i))) for i, s in enumerate(states))
    hidden_types = hidden_state_types()
    group_type = getattr(brainstate, "HiddenGroupState", None)
    hidden: List[HiddenLeaf] = []
    non_float: List[Tuple[str, Any]] = []
    for i, s in enumerate(states):
        if not isinstance(s, hidden_types):
            continue
        a, b = ranges[i]
        for leaf in range(a, b):
            aval = state_avals[leaf]
            base = ".".join(paths[i])
            if not jnp.issubdtype(aval.dtype, jnp.inexact):
                non_float.append((base if b - a == 1 else f"{base}#{leaf - a}", jnp.dtype(aval.dtype)))
                continue
            if group_type is not None and isinstance(s, group_type):
                for slot in range(aval.shape[-1]):
                    hidden.append(
                        HiddenLeaf(i, leaf, slot, f"{base}[{slot}]", tuple(aval.shape[:-1]), aval.dtype)
                    )
            else:
                name = base if b - a == 1 else f"{base}#{leaf - a}"
                hidden.append(HiddenLeaf(i, leaf, None, name, tuple(aval.shape), aval.dtype))
    params = tuple(i for i, s in enumerate(states) if isinstance(s, brainstate.ParamState))
    return ModuleInfo(
        model=model,
        states=states,
        paths=paths,
        written=written,
        state_treedef=state_treedef,
        state_leaf_ranges=ranges,
        arg_treedef=arg_treedef,
        out_treedef=out_tree_box["tree"],
        closed_jaxpr=closed,
        hidden_leaves=tuple(hidden),
        param_states=params,
        arg_avals=tuple(arg_avals),
        non_float_hidden=tuple(non_float),
    )


def record_non_float_hidden_states(info: ModuleInfo, records: list) -> None:
    """Add one ``NON_FLOAT_HIDDEN_STATE`` record (level INFO) per leaf of ``info.non_float_hidden``."""
    for name, dtype in info.non_float_hidden:
        emit(
            records,
            DiagnosticKind.NON_FLOAT_HIDDEN_STATE,
            DiagnosticLevel.INFO,
            f"Hidden state {name!r} has dtype {dtype}, which carries no gradient: it gets no eligibility "
            f"trace and is carried through the step like a non-hidden state.",
            (name,),
        )
