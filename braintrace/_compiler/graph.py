"""Hidden groups, hidden-param-op relations, and the compiled eligibility-trace graph.

Semantics (from the primitive layer's specification):

* A **hidden group** is a set of hidden states of the same shape that drive each other within
  one step through the intrinsic dynamics (every non-``gradient_enabled`` ETP output held fixed).
  Its Jacobian ``D = dh_t/dh_{t-1}`` is kept as one ``n x n`` block per unit.
* A **relation** is an ETP equation whose output ``y`` reaches at least one hidden state without
  passing through another trainable (non-``gradient_enabled``) ETP equation, and whose trainable
  operands are computed from ``ParamState`` values only.
* Every ETP equation that consumes a parameter but is not a relation, and every approximation
  the compiler must make, is reported as a :class:`~braintrace.CompilationRecord` (and a warning).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from braintrace._compatible_imports import Literal
from braintrace._etrace_op._registries import (
    BATCHED_PRIMITIVES,
    ETP_PRIMITIVES,
    ETP_TRAINABLE_INVARS_FNS,
    ETP_X_INVAR_INDICES,
    ETP_Y_OUTVAR_INDICES,
    default_trainable_invars,
)

from .control_flow_policy import DESCENT_NOT_PROVIDED, check_control_flow_policy
from .diagnostics import (
    CompilationError,
    CompilationRecord,
    DiagnosticKind,
    DiagnosticLevel,
    NotSupportedError,
    emit,
)
from .jaxpr_tools import is_trainable_etp_eqn
from .module_info import HiddenLeaf, ModuleInfo, extract_module_info, record_non_float_hidden_states
from .perturbation import add_hidden_perturbation_in_module
from .rule_check import check_relation_rules
from .unit_map import MIXED, identity_map, is_diagonal, propagate_unit_maps

__all__ = [
    "HiddenGroup",
    "HiddenParamOpRelation",
    "ETraceGraph",
    "find_hidden_groups_from_module",
    "find_hidden_param_op_relations_from_module",
    "compile_etrace_graph",
]


@dataclasses.dataclass(frozen=True)
class HiddenGroup:
    """``n`` hidden states of one shape that drive each other within a step.

    ``shape`` is the per-state shape (the group's *unit* shape, batch axis included).
    """

    index: int
    hidden_leaves: Tuple[HiddenLeaf, ...]
    shape: Tuple[int, ...]
    dtype: object

    @property
    def num_state(self) -> int:
        return len(self.hidden_leaves)

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(h.name for h in self.hidden_leaves)

    def __repr__(self):
        return f"HiddenGroup(index={self.index}, states={list(self.names)}, shape={self.shape})"


@dataclasses.dataclass(frozen=True)
class HiddenParamOpRelation:
    """One ETP equation connected to the hidden groups its output drives.

    Attributes
    ----------
    primitive : ETPPrimitive
    eqn_index : int
        Position of the equation in the step jaxpr.
    params : dict
        The equation's static params.
    trainable_vars : dict
        Trainable key -> jaxpr variable (``trainable_invars_fn`` of the primitive).
    trainable_invar_indices : dict
        Trainable key -> position in ``eqn.invars``.
    x_var, y_var : jaxpr variables (``x_var`` is ``None`` for input-free primitives)
    aux_vars : tuple
        Operands that are neither ``x`` nor trainable (sparse index arrays), in invar order.
    hidden_groups : tuple of HiddenGroup
    batch_ndims : tuple of int
        Per group, the number of leading batch axes of the group's unit shape that ``y`` does not
        index itself (0 or 1 for a batched primitive's own batch axis handled by the rules).
    param_paths : dict
        Trainable key -> tuple of owning ``ParamState`` paths.
    """

    index: int
    primitive: object
    eqn_index: int
    params: dict
    trainable_vars: Dict[str, object]
    trainable_invar_indices: Dict[str, int]
    x_var: Optional[object]
    y_var: object
    aux_vars: Tuple
    hidden_groups: Tuple[HiddenGroup, ...]
    batch_ndims: Tuple[int, ...]
    param_paths: Dict[str, Tuple[str, ...]]

    def __repr__(self):
        return (
            f"HiddenParamOpRelation(primitive={self.primitive.name}, keys={list(self.trainable_vars)}, "
            f"params={dict(self.param_paths)}, groups={[g.index for g in self.hidden_groups]})"
        )


@dataclasses.dataclass
class ETraceGraph:
    """The compiled graph of one model step.

    Attributes
    ----------
    module_info : ModuleInfo
    hidden_groups : tuple of HiddenGroup
    hidden_param_op_relations : tuple of HiddenParamOpRelation
    records : list of CompilationRecord
    relation_param_states : tuple of int
        Indices of parameter states that own at least one relation's trainable operand.
    """

    module_info: ModuleInfo
    hidden_groups: Tuple[HiddenGroup, ...]
    hidden_param_op_relations: Tuple[HiddenParamOpRelation, ...]
    records: List[CompilationRecord]
    relation_param_states: Tuple[int, ...]
    #: The step's hidden perturbation slots (``compile_etrace_graph(..., include_hidden_perturb=True)``).
    hidden_perturb: Optional[object] = None

    def summary(self) -> str:
        lines = [
            f"ETraceGraph: {len(self.hidden_groups)} hidden group(s), "
            f"{len(self.hidden_param_op_relations)} relation(s)"
        ]
        lines += [f"  {g!r}" for g in self.hidden_groups]
        lines += [f"  {r!r}" for r in self.hidden_param_op_relations]
        lines += [f"  {rec}" for rec in self.records]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# dependency propagation
# ----------------------------------------------------------------------------------------------


def _propagate(jaxpr, seeds: Dict, blocks) -> Dict:
    """Forward label propagation: ``labels[var]`` is the union of its inputs' labels.

    ``seeds``: var -> set of labels (also applied to equation outputs). ``blocks(eqn)`` True: the
    equation's outputs get no labels from its inputs (they keep only their seeds).
    """
    labels: Dict = {}
    for v in jaxpr.invars:
        labels[v] = set(seeds.get(v, ()))
    for v in jaxpr.constvars:
        labels[v] = set()
    for eqn in jaxpr.eqns:
        incoming = set()
        if not blocks(eqn):
            for v in eqn.invars:
                if not isinstance(v, Literal):
                    incoming |= labels.get(v, set())
        for v in eqn.outvars:
            labels[v] = incoming | set(seeds.get(v, ()))
    return labels


def _labels_of(labels, v):
    return set() if isinstance(v, Literal) else labels.get(v, set())


def _unit_maps(jaxpr, seeds):
    """:func:`propagate_unit_maps` with trainable ETP outputs held fixed, and the primitives that
    turned a source's map :data:`MIXED` (``{source: {primitive names}}``)."""
    culprits: Dict = {}

    def on_eqn(eqn, ins, outs):
        for out in outs:
            for src, m in out.items():
                if m is MIXED and all(lab.get(src, None) is not MIXED for lab in ins):
                    culprits.setdefault(src, set()).add(eqn.primitive.name)

    maps = propagate_unit_maps(jaxpr, seeds, is_trainable_etp_eqn, on_eqn)
    return maps, culprits


def _map_of(maps, v, src):
    return None if isinstance(v, Literal) else maps.get(v, {}).get(src)


def find_hidden_groups_from_module(
    info: ModuleInfo, records: Optional[list] = None
) -> Tuple[HiddenGroup, ...]:
    """Group the hidden states of ``info`` by their within-step intrinsic coupling."""
    records = [] if records is None else records
    jaxpr = info.jaxpr
    leaves = info.hidden_leaves
    in_vars = info.state_invars()
    out_vars = info.state_outvars()
    seeds = {}
    for k, h in enumerate(leaves):
        seeds.setdefault(in_vars[h.leaf], set()).add(k)
    labels = _propagate(jaxpr, seeds, is_trainable_etp_eqn)
    unit_seeds: Dict = {}
    for k, h in enumerate(leaves):
        unit_seeds.setdefault(in_vars[h.leaf], {})[k] = identity_map(len(h.shape), h.slot is not None)
    maps, culprits = _unit_maps(jaxpr, unit_seeds)
    mixing = set()
    parent = list(range(len(leaves)))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    reported = set()
    for i, h in enumerate(leaves):
        for j in _labels_of(labels, out_vars[h.leaf]):
            if leaves[j].shape == h.shape:
                parent[find(i)] = find(j)
                m = _map_of(maps, out_vars[h.leaf], j)
                if m is not None and not is_diagonal(m, len(h.shape)):
                    mixing |= culprits.get(j, {"<unknown>"})
            elif (i, j) not in reported:
                reported.add((i, j))
                emit(
                    records,
                    DiagnosticKind.CROSS_GROUP_COUPLING,
                    DiagnosticLevel.WARNING,
                    f"Hidden state {h.name!r} {h.shape} depends on {leaves[j].name!r} {leaves[j].shape} "
                    f"within one step, but their shapes differ, so they cannot share per-unit blocks; "
                    f"the coupling is dropped from the eligibility traces.",
                    (h.name, leaves[j].name),
                    hidden_paths=_paths_of(info, (h, leaves[j])),
                )
    if mixing:
        emit(
            records,
            DiagnosticKind.NON_DIAGONAL_PATH,
            DiagnosticLevel.WARNING,
            f"The intrinsic hidden dynamics mix units (through {', '.join(sorted(mixing))}); "
            f"D-RTRL keeps one block of dh_t/dh_(t-1) per unit, and with mixing that block is the sum "
            f"of the unit's Jacobian row, not its diagonal. Mark mixing weights with an ETP primitive "
            f"(braintrace.matmul) so the traces hold them fixed.",
        )
    members: Dict[int, List[int]] = {}
    for i in range(len(leaves)):
        members.setdefault(find(i), []).append(i)
    groups = []
    for idx in sorted(members.values(), key=min):
        hl = tuple(leaves[i] for i in idx)
        groups.append(HiddenGroup(len(groups), hl, hl[0].shape, hl[0].dtype))
    return tuple(groups)


def _param_sources(jaxpr, info: ModuleInfo):
    """Label every var with the flat input positions it depends on."""
    seeds = {v: {i} for i, v in enumerate(jaxpr.invars)}
    return _propagate(jaxpr, seeds, lambda eqn: False)


def find_hidden_param_op_relations_from_module(
    info: ModuleInfo, groups: Tuple[HiddenGroup, ...], records: Optional[list] = None
) -> Tuple[HiddenParamOpRelation, ...]:
    """The relations of ``info``'s step (see the module docstring), with diagnostics."""
    records = [] if records is None else records
    jaxpr = info.jaxpr
    out_vars = info.state_outvars()
    group_of = {}
    for g in groups:
        for h in g.hidden_leaves:
            group_of[(h.leaf, h.slot)] = g
    etp_eqns = [(i, e) for i, e in enumerate(jaxpr.eqns) if e.primitive in ETP_PRIMITIVES]

    # y -> h reach, blocked by trainable ETP equations (their own y is a fresh seed).
    seeds = {}
    for i, e in etp_eqns:
        y = e.outvars[ETP_Y_OUTVAR_INDICES.get(e.primitive, 0)]
        seeds.setdefault(y, set()).add(i)
    reach_labels = _propagate(jaxpr, seeds, is_trainable_etp_eqn)
    y_seeds = {}
    for i, e in etp_eqns:
        y = e.outvars[ETP_Y_OUTVAR_INDICES.get(e.primitive, 0)]
        y_seeds.setdefault(y, {})[i] = identity_map(len(y.aval.shape))
    y_maps, y_culprits = _unit_maps(jaxpr, y_seeds)
    mixing: Dict[int, set] = {}
    reached: Dict[int, List[HiddenLeaf]] = {}
    for h in info.hidden_leaves:
        for i in _labels_of(reach_labels, out_vars[h.leaf]):
            reached.setdefault(i, []).append(h)

    sources = _param_sources(jaxpr, info)
    n_state_leaves = info.num_state_leaves
    param_leaf_owner = {}
    for si in info.param_states:
        a, b = info.state_leaf_ranges[si]
        for leaf in range(a, b):
            param_leaf_owner[leaf] = si

    def describe(var):
        owners = sorted({param_leaf_owner[s] for s in _labels_of(sources, var) if s in param_leaf_owner})
        return tuple(info.path_of(o) for o in owners)

    def fields(prim, names, hidden=()):
        """The published record fields: the primitive, the one weight's path, the hidden paths."""
        path = _weight_path(info, names)
        return dict(primitive=prim, weight_path=path, hidden_paths=_paths_of(info, hidden))

    relations = []
    for i, e in etp_eqns:
        prim = e.primitive
        layout = ETP_TRAINABLE_INVARS_FNS.get(prim, default_trainable_invars)(dict(e.params))
        tvars = {k: e.invars[idx] for k, idx in layout.items()}
        names = sorted({p for v in tvars.values() for p in describe(v)})
        label = f"{prim.name} (equation {i}) with weight(s) {names or '[constant]'}"
        if i not in reached:
            if names:
                emit(
                    records,
                    DiagnosticKind.WEIGHT_NOT_REACHING_HIDDEN,
                    DiagnosticLevel.WARNING,
                    f"Weight(s) {names} of {prim.name} get no eligibility trace: the op's output reaches "
                    f"no hidden state, or reaches one only through another trainable ETP op. They are "
                    f"learned with their within-step gradient.",
                    tuple(names),
                    **fields(prim, names),
                )
            continue
        bad = []
        for k, v in tvars.items():
            if isinstance(v, Literal):
                continue
            src = _labels_of(sources, v)
            if any((s >= n_state_leaves) or (s not in param_leaf_owner) for s in src):
                bad.append(k)
        if bad:
            emit(
                records,
                DiagnosticKind.TRAINABLE_DEPENDS_ON_STATE,
                DiagnosticLevel.WARNING,
                f"{label}: trainable operand(s) {bad} depend on inputs or non-parameter states, so the "
                f"op cannot carry an eligibility trace; its weights use the within-step gradient.",
                tuple(names),
                **fields(prim, names),
            )
            continue
        if not names:
            continue
        y = e.outvars[ETP_Y_OUTVAR_INDICES.get(prim, 0)]
        gs, bnds = [], []
        ok = True
        for h in reached[i]:
            g = group_of[(h.leaf, h.slot)]
            if g in gs:
                continue
            yshape = tuple(y.aval.shape)
            if prim in BATCHED_PRIMITIVES:
                fits, bnd = yshape == g.shape, 1
            else:
                k = len(g.shape) - len(yshape)
                fits, bnd = k >= 0 and g.shape[k:] == yshape, k
            if not fits:
                emit(
                    records,
                    DiagnosticKind.SHAPE_MISMATCH,
                    DiagnosticLevel.WARNING,
                    f"{label}: output shape {yshape} does not match the shape {g.shape} of the hidden "
                    f"states {list(g.names)} it drives (they must be equal, or y may lack leading batch "
                    f"axes); the weights use the within-step gradient.",
                    tuple(names),
                    **fields(prim, names, g.hidden_leaves),
                )
                ok = False
                break
            gs.append(g)
            bnds.append(bnd)
        for h in reached[i]:
            g = group_of[(h.leaf, h.slot)]
            m = _map_of(y_maps, out_vars[h.leaf], i)
            if (
                g in gs
                and m is not None
                and not is_diagonal(m, len(g.shape), len(g.shape) - len(y.aval.shape))
            ):
                mixing.setdefault(i, set()).update(y_culprits.get(i, {"<unknown>"}))
        if not ok:
            continue
        if i in mixing:
            emit(
                records,
                DiagnosticKind.NON_DIAGONAL_PATH,
                DiagnosticLevel.WARNING,
                f"{label}: the path from its output to the hidden states uses unit-mixing operations "
                f"(through {', '.join(sorted(mixing[i]))}); the trace keeps one value of dh/dy per unit (the "
                f"sum of the unit's Jacobian row, not its diagonal).",
                tuple(names),
                **fields(prim, names, reached[i]),
            )
        xi = ETP_X_INVAR_INDICES.get(prim, 0)
        used = set(layout.values()) | ({xi} if xi is not None else set())
        aux = tuple(v for j, v in enumerate(e.invars) if j not in used)
        relations.append(
            HiddenParamOpRelation(
                index=len(relations),
                primitive=prim,
                eqn_index=i,
                params=dict(e.params),
                trainable_vars=tvars,
                trainable_invar_indices=dict(layout),
                x_var=e.invars[xi] if xi is not None else None,
                y_var=y,
                aux_vars=aux,
                hidden_groups=tuple(gs),
                batch_ndims=tuple(bnds),
                param_paths={k: describe(v) for k, v in tvars.items()},
            )
        )
    return tuple(relations)


def compile_etrace_graph(
    model,
    *inputs,
    include_hidden_perturb: bool = True,
    include_recurrent_mixing: bool = False,
    sparse_n: Optional[int] = None,
    snap_max_jacobian_elements: int = 16_777_216,
    control_flow=None,
) -> ETraceGraph:
    """Trace one step ``model(*inputs)`` and build its :class:`ETraceGraph`.

    Parameters
    ----------
    model : brainstate.nn.Module
    *inputs
        One step's inputs (their shapes and dtypes are used).
    include_hidden_perturb : bool
        Also build the step's hidden perturbation slots (``graph.hidden_perturb``, a
        :class:`~braintrace.HiddenPerturbation`); the algorithms build their own and pass ``False``.
    include_recurrent_mixing, sparse_n, snap_max_jacobian_elements
        Keywords of the published releases for recurrence scopes beyond the per-unit block of ``D``.
        The defaults (per-unit blocks) are what this compiler does; any other value raises
        ``NotImplementedError`` naming the keyword.
    control_flow : ControlFlowPolicy, optional
        How ETP primitives inside control flow are treated (``None``: the policy's defaults); see
        :class:`~braintrace.ControlFlowPolicy` for the values this compiler provides.

    Raises
    ------
    CompilationError
        If the step has no hidden state or no ETP relation (the message says what to change).
    NotSupportedError
        For ETP primitives inside control flow within the step.

    Examples
    --------
    >>> import brainstate, jax, jax.numpy as jnp, braintrace
    >>> class RNN(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = brainstate.ParamState(jnp.eye(3) * 0.5)
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 3)))
    ...     def update(self, x):
    ...         self.h.value = jnp.tanh(braintrace.matmul(self.h.value, self.w.value) + x)
    ...         return self.h.value
    >>> model = RNN(); _ = brainstate.nn.init_all_states(model, batch_size=2)
    >>> g = braintrace.compile_etrace_graph(model, jnp.zeros((2, 3)))
    >>> [r.primitive.name for r in g.hidden_param_op_relations]
    ['etp_mm']
    """
    for key, value, default in (
        ("include_recurrent_mixing", include_recurrent_mixing, False),
        ("sparse_n", sparse_n, None),
    ):
        if value != default:
            raise NotImplementedError(
                f"compile_etrace_graph: `{key}={value!r}` selects a recurrence scope or control-flow policy "
                f"this compiler does not provide; it keeps one block of dh/dh per unit and analyses "
                f"control flow through its bodies. Leave `{key}` at {default!r}."
            )
    if isinstance(snap_max_jacobian_elements, bool) or not isinstance(snap_max_jacobian_elements, int):
        raise TypeError(f"`snap_max_jacobian_elements` must be an int, got {snap_max_jacobian_elements!r}.")
    if not isinstance(include_hidden_perturb, bool):
        raise TypeError(f"`include_hidden_perturb` must be a bool, got {include_hidden_perturb!r}.")
    check_control_flow_policy(control_flow)
    info = _extract_with_policy(model, inputs, control_flow)
    records: List[CompilationRecord] = []
    record_non_float_hidden_states(info, records)
    if not info.hidden_leaves:
        raise CompilationError(
            f"{type(model).__name__} has no hidden state: online learning needs brainstate.HiddenState "
            f"(or HiddenGroupState / HiddenTreeState) values written in update(). Did you call "
            f"brainstate.nn.init_all_states(model) before compiling?"
        )
    groups = find_hidden_groups_from_module(info, records)
    relations = find_hidden_param_op_relations_from_module(info, groups, records)
    if not relations:
        raise CompilationError(
            f"{type(model).__name__} has no ETP relation: no parameter reaches a hidden state through an "
            f"ETP primitive. Mark trainable ops with braintrace.matmul / element_wise / conv / "
            f"sparse_matmul / lora_matmul."
            + (f" Diagnostics: {'; '.join(map(str, records))}" if records else "")
        )
    check_relation_rules(relations)
    driven = {(h.leaf, h.slot) for r in relations for g in r.hidden_groups for h in g.hidden_leaves}
    for h in info.hidden_leaves:
        if (h.leaf, h.slot) not in driven:
            emit(
                records,
                DiagnosticKind.HIDDEN_WITHOUT_RELATION,
                DiagnosticLevel.INFO,
                f"Hidden state {h.name!r} is driven by no ETP relation.",
                (h.name,),
                hidden_paths=_paths_of(info, (h,)),
            )
    rel_params = set()
    for r in relations:
        for paths in r.param_paths.values():
            rel_params.update(paths)
    rel_state_idx = tuple(i for i in info.param_states if info.path_of(i) in rel_params)
    for i in info.param_states:
        if i not in rel_state_idx:
            emit(
                records,
                DiagnosticKind.PLAIN_PARAMETER,
                DiagnosticLevel.INFO,
                f"Parameter {info.path_of(i)!r} is not used by an ETP relation; it receives its "
                f"within-step gradient.",
                (info.path_of(i),),
                weight_path=info.paths[i],
            )
    _check_plain_uses(info, relations, rel_state_idx, records)
    _check_cross_layer(info, groups, relations, records)
    _check_recurrent_weights(info, groups, relations, records)
    perturb = add_hidden_perturbation_in_module(info)[1] if include_hidden_perturb else None
    return ETraceGraph(info, groups, relations, records, rel_state_idx, perturb)


def _extract_with_policy(model, inputs, control_flow):
    """:func:`extract_module_info` under a :class:`~braintrace.ControlFlowPolicy` (``None``: the
    defaults); a loop the policy would descend into is refused with a note saying so."""
    if control_flow is None:
        return extract_module_info(model, *inputs)
    limit = max(0, control_flow.scan_unroll_limit)  # published: 0 or less unrolls nothing
    try:
        return extract_module_info(
            model, *inputs, control_flow=dataclasses.replace(control_flow, scan_unroll_limit=limit)
        )
    except NotSupportedError as err:
        if control_flow.scan_descent != "auto":
            raise
        raise NotSupportedError(f"{err}{DESCENT_NOT_PROVIDED}") from err


def _weight_path(info: ModuleInfo, names):
    """The ``ParamState`` path (a tuple) of the one parameter named in ``names``; ``None`` otherwise."""
    if len(names) != 1:
        return None
    by_name = {info.path_of(i): info.paths[i] for i in info.param_states}
    return by_name.get(names[0])


def _paths_of(info: ModuleInfo, leaves):
    """The state paths (tuples, without repeats) of hidden leaves."""
    out = []
    for h in leaves:
        path = tuple(info.paths[h.state_index])
        if path not in out:
            out.append(path)
    return tuple(out)


def _hidden_out_vars(info: ModuleInfo):
    out_vars = info.state_outvars()
    return {out_vars[h.leaf]: h for h in info.hidden_leaves if not isinstance(out_vars[h.leaf], Literal)}


def _check_plain_uses(info: ModuleInfo, relations, rel_state_idx, records) -> None:
    """Record every traced weight that also reaches a hidden state's new value by a path that does
    not enter a relation as its trainable operand (``matmul(x, W) + 0.5 * (x @ W)``): the step
    differentiates that path, but its recurrence through the hidden state is in no trace."""
    jaxpr = info.jaxpr
    trainable_slots = {(r.eqn_index, j) for r in relations for j in r.trainable_invar_indices.values()}
    hidden_out = _hidden_out_vars(info)
    in_vars = info.state_invars()
    for si in rel_state_idx:
        a, b = info.state_leaf_ranges[si]
        reached = {in_vars[leaf] for leaf in range(a, b)}
        for i, eqn in enumerate(jaxpr.eqns):
            if any(
                (not isinstance(v, Literal)) and v in reached and (i, j) not in trainable_slots
                for j, v in enumerate(eqn.invars)
            ):
                reached.update(eqn.outvars)
        hit = sorted({hidden_out[v].name for v in reached if v in hidden_out})
        if hit:
            path = info.path_of(si)
            emit(
                records,
                DiagnosticKind.WEIGHT_ALSO_PLAIN,
                DiagnosticLevel.WARNING,
                f"Parameter {path!r} is traced through an ETP op but also reaches the hidden state(s) "
                f"{hit} through plain JAX ops; the step differentiates that use, but its effect carried "
                f"by the hidden states to later steps is in no trace, so the online gradient of "
                f"{path!r} is approximate. Route every use of the weight through the ETP op.",
                (path,),
                weight_path=info.paths[si],
                hidden_paths=_paths_of(info, [h for h in info.hidden_leaves if h.name in hit]),
            )


def _check_recurrent_weights(info: ModuleInfo, groups, relations, records) -> None:
    """Record (at info level) every relation whose input ``x`` or trainable operands read the
    previous value of a hidden group that its own output moves, directly or through other groups
    (a recurrent weight, the gates of an RNN cell): the traces hold ETP outputs fixed in ``D``, so
    the weight's effect through its own input at later steps is left out by design."""
    jaxpr = info.jaxpr
    in_vars, out_vars = info.state_invars(), info.state_outvars()
    group_of = {(h.leaf, h.slot): g.index for g in groups for h in g.hidden_leaves}
    seeds = {}
    for h in info.hidden_leaves:
        seeds.setdefault(in_vars[h.leaf], set()).add(group_of[(h.leaf, h.slot)])
    old_reach = _propagate(jaxpr, seeds, lambda eqn: False)
    moves = {g.index: set() for g in groups}  # group a -> groups whose new values read a's old value
    for h in info.hidden_leaves:
        for a in _labels_of(old_reach, out_vars[h.leaf]):
            moves[a].add(group_of[(h.leaf, h.slot)])
    y_seeds = {}
    for r in relations:
        y_seeds.setdefault(r.y_var, set()).add(r.index)
    y_reach = _propagate(jaxpr, y_seeds, lambda eqn: False)
    for r in relations:
        moved = {
            group_of[(h.leaf, h.slot)]
            for h in info.hidden_leaves
            if r.index in _labels_of(y_reach, out_vars[h.leaf])
        }
        frontier = list(moved)
        while frontier:  # every group the weights move at later steps
            for b in moves[frontier.pop()]:
                if b not in moved:
                    moved.add(b)
                    frontier.append(b)
        operands = [v for v in (r.x_var, *r.trainable_vars.values()) if v is not None]
        read = set().union(*(_labels_of(old_reach, v) for v in operands))
        if read & moved:
            names = sorted({p for paths in r.param_paths.values() for p in paths})
            emit(
                records,
                DiagnosticKind.RECURRENT_ETP_WEIGHT,
                DiagnosticLevel.INFO,
                f"Weight(s) {names} of {r.primitive.name} (equation {r.eqn_index}) act on hidden values "
                f"that they themselves move at earlier steps (a recurrent weight); the traces hold ETP "
                f"outputs fixed in D, so this path is left out of their online gradient by design "
                f"(D-RTRL's and pp_prop's definition; BPTT or the multi-step rule include it).",
                tuple(names),
                primitive=r.primitive,
                weight_path=_weight_path(info, names),
            )


def _check_cross_layer(info: ModuleInfo, groups, relations, records) -> None:
    """Record every relation whose output moves hidden states, within the step, through another
    trainable ETP op (a stacked layer, a gate feeding a recurrent matmul), when those states depend
    on their own previous value: the step differentiates that path exactly, but the traces carry
    a weight's effect through ``df`` (its paths that avoid trainable ETP ops) only, so its effect
    carried by those states to later steps is missing."""
    jaxpr = info.jaxpr
    in_vars, out_vars = info.state_invars(), info.state_outvars()
    group_of = {(h.leaf, h.slot): g for g in groups for h in g.hidden_leaves}
    seeds = {}
    for k, h in enumerate(info.hidden_leaves):
        seeds.setdefault(in_vars[h.leaf], set()).add(group_of[(h.leaf, h.slot)].index)
    own = _propagate(jaxpr, seeds, is_trainable_etp_eqn)
    recurrent = {
        g.index for g in groups for h in g.hidden_leaves if g.index in _labels_of(own, out_vars[h.leaf])
    }
    via = _reach_through_etp(jaxpr, {r.y_var: r.index for r in relations})
    for r in relations:
        moved = sorted(
            {
                h.name
                for h in info.hidden_leaves
                if r.index in via.get(out_vars[h.leaf], ()) and group_of[(h.leaf, h.slot)].index in recurrent
            }
        )
        if moved:
            names = sorted({p for paths in r.param_paths.values() for p in paths})
            emit(
                records,
                DiagnosticKind.CROSS_LAYER_INFLUENCE,
                DiagnosticLevel.WARNING,
                f"Weight(s) {names} of {r.primitive.name} (equation {r.eqn_index}) move the hidden "
                f"state(s) {moved} within a step through another trainable ETP op (a stacked layer, "
                f"or a gate feeding a recurrent matmul), and those states keep part of their value to "
                f"the next step; the traces carry only the weights' paths that avoid trainable ETP ops, "
                f"so the online gradient misses that later effect (approximate). The current step's "
                f"effect is exact.",
                tuple(names),
                primitive=r.primitive,
                weight_path=_weight_path(info, names),
                hidden_paths=_paths_of(info, [h for h in info.hidden_leaves if h.name in moved]),
            )


def _reach_through_etp(jaxpr, seeds) -> Dict:
    """``{var: {seed labels}}`` for the variables a seed (an ETP output ``y`` -> label) reaches by a
    path that passes through at least one other trainable ETP equation."""
    direct: Dict = {v: {lab} for v, lab in seeds.items()}
    via: Dict = {}
    for eqn in jaxpr.eqns:
        ins_d = set().union(*(direct.get(v, set()) for v in eqn.invars if not isinstance(v, Literal)))
        ins_v = set().union(*(via.get(v, set()) for v in eqn.invars if not isinstance(v, Literal)))
        if is_trainable_etp_eqn(eqn):
            ins_v, ins_d = ins_v | ins_d, set()
        for v in eqn.outvars:
            if ins_d:
                direct[v] = direct.get(v, set()) | ins_d
            if ins_v:
                via[v] = via.get(v, set()) | ins_v
    return via
