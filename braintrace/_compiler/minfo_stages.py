"""The compiler's stages from a :class:`~braintrace.ModuleInfo`, under the published names.

``compile_etrace_graph`` runs three stages on the traced step: the hidden groups, the hidden-param-op
relations, and the hidden perturbation slots. The published releases expose each as a
``*_from_minfo`` function; these are those functions over this compiler's stages, with the
published signatures. Published keywords for features this compiler does not have (recurrence
scopes beyond the per-unit block, structured descent into scans) are accepted at their defaults and
raise ``NotImplementedError`` naming the keyword otherwise.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Optional, Tuple

from .graph import (
    HiddenGroup,
    HiddenParamOpRelation,
    find_hidden_groups_from_module,
    find_hidden_param_op_relations_from_module,
)
from .module_info import ModuleInfo
from .perturbation import HiddenPerturbation, add_hidden_perturbation_in_module

__all__ = [
    "find_hidden_groups_from_minfo",
    "find_hidden_param_op_relations_from_minfo",
    "add_hidden_perturbation_from_minfo",
]

Path = Tuple[str, ...]


def _check_minfo(fn: str, minfo) -> None:
    if not isinstance(minfo, ModuleInfo):
        raise TypeError(
            f"{fn}: `minfo` must be a braintrace.ModuleInfo (from braintrace.extract_module_info), got "
            f"{type(minfo).__name__}."
        )


def _no_descent(fn: str, **keywords) -> None:
    for key, value in keywords.items():
        if value:
            raise NotImplementedError(
                f"{fn}: `{key}` names scans rewritten for structured descent; this compiler does not "
                f"descend into scans (a loop holding ETP primitives is unrolled up to "
                f"ControlFlowPolicy.scan_unroll_limit or refused). Leave `{key}` empty."
            )


def find_hidden_groups_from_minfo(
    minfo: ModuleInfo,
    include_recurrent_mixing: bool = False,
    sparse_n: Optional[int] = None,
    snap_max_jacobian_elements: int = 16_777_216,
    descended_scan_eqn_ids: FrozenSet[int] = frozenset(),
    descended_hidden_paths: FrozenSet[Path] = frozenset(),
) -> Tuple[Tuple[HiddenGroup, ...], Dict[Path, HiddenGroup]]:
    """The hidden groups of a traced step and the map from each hidden state's path to its group.

    Parameters
    ----------
    minfo : ModuleInfo
    include_recurrent_mixing, sparse_n, snap_max_jacobian_elements
        Published recurrence-scope keywords; only the defaults (per-unit blocks of ``D``) are
        provided, others raise ``NotImplementedError``.
    descended_scan_eqn_ids, descended_hidden_paths
        Published structured-descent keywords; must be empty.

    Returns
    -------
    hidden_groups : tuple of HiddenGroup
    hid_path_to_group : dict
        State path (``('cell', 'h')``) -> :class:`~braintrace.HiddenGroup`. A state whose leaves fall
        into different groups (a ``HiddenTreeState`` with leaves of different shapes) has one key
        per leaf, its path followed by the leaf's position in the state.

    Notes
    -----
    Compiler records (warnings) are raised as Python warnings; :func:`~braintrace.compile_etrace_graph`
    keeps them on the graph.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, braintrace
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
    >>> minfo = braintrace.extract_module_info(model, jnp.zeros((4, 2)))
    >>> groups, by_path = braintrace.find_hidden_groups_from_minfo(minfo)
    >>> list(by_path), by_path[('h',)].shape
    ([('h',)], (4, 3))
    """
    fn = "find_hidden_groups_from_minfo"
    _check_minfo(fn, minfo)
    for key, value, default in (
        ("include_recurrent_mixing", include_recurrent_mixing, False),
        ("sparse_n", sparse_n, None),
    ):
        if value != default:
            raise NotImplementedError(
                f"{fn}: `{key}={value!r}` selects a recurrence scope this compiler does not provide (it "
                f"keeps one block of dh/dh per unit). Leave `{key}` at {default!r}."
            )
    if isinstance(snap_max_jacobian_elements, bool) or not isinstance(snap_max_jacobian_elements, int):
        raise TypeError(
            f"{fn}: `snap_max_jacobian_elements` must be an int, got {snap_max_jacobian_elements!r}."
        )
    _no_descent(
        fn, descended_scan_eqn_ids=descended_scan_eqn_ids, descended_hidden_paths=descended_hidden_paths
    )
    groups = find_hidden_groups_from_module(minfo, [])
    by_state: Dict[int, list] = {}
    for g in groups:
        for h in g.hidden_leaves:
            by_state.setdefault(h.state_index, []).append((h, g))
    mapping: Dict[Path, HiddenGroup] = {}
    for state_index, members in by_state.items():
        path = tuple(minfo.paths[state_index])
        if len({g.index for _, g in members}) == 1:
            mapping[path] = members[0][1]
        else:
            start = minfo.state_leaf_ranges[state_index][0]
            for h, g in members:
                mapping[(*path, h.leaf - start)] = g
    return groups, mapping


def find_hidden_param_op_relations_from_minfo(
    minfo: ModuleInfo,
    hid_path_to_group: Dict[Path, HiddenGroup],
    descended_scan_eqn_ids: FrozenSet[int] = frozenset(),
) -> Tuple[HiddenParamOpRelation, ...]:
    """The hidden-param-op relations of a traced step, given its hidden groups.

    Parameters
    ----------
    minfo : ModuleInfo
    hid_path_to_group : dict
        The map returned by :func:`find_hidden_groups_from_minfo` (every hidden state's group).
    descended_scan_eqn_ids
        Published structured-descent keyword; must be empty.

    Returns
    -------
    tuple of HiddenParamOpRelation

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, braintrace
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
    >>> minfo = braintrace.extract_module_info(model, jnp.zeros((4, 2)))
    >>> _, by_path = braintrace.find_hidden_groups_from_minfo(minfo)
    >>> [r.primitive.name for r in braintrace.find_hidden_param_op_relations_from_minfo(minfo, by_path)]
    ['etp_mm']
    """
    fn = "find_hidden_param_op_relations_from_minfo"
    _check_minfo(fn, minfo)
    _no_descent(fn, descended_scan_eqn_ids=descended_scan_eqn_ids)
    if not isinstance(hid_path_to_group, dict):
        raise TypeError(f"{fn}: `hid_path_to_group` must be a dict, got {type(hid_path_to_group).__name__}.")
    groups = {}
    for key, g in hid_path_to_group.items():
        if not isinstance(g, HiddenGroup):
            raise TypeError(
                f"{fn}: `hid_path_to_group[{key!r}]` must be a HiddenGroup, got {type(g).__name__}."
            )
        groups[g.index] = g
    covered = {(h.leaf, h.slot) for g in groups.values() for h in g.hidden_leaves}
    missing = [h.name for h in minfo.hidden_leaves if (h.leaf, h.slot) not in covered]
    if missing:
        raise ValueError(
            f"{fn}: `hid_path_to_group` has no group for the hidden states {missing}; pass the map "
            f"find_hidden_groups_from_minfo returns for this `minfo`."
        )
    return find_hidden_param_op_relations_from_module(minfo, tuple(groups[i] for i in sorted(groups)), [])


def add_hidden_perturbation_from_minfo(
    minfo: ModuleInfo, descended_scan_eqn_ids: FrozenSet[int] = frozenset()
) -> HiddenPerturbation:
    """The hidden perturbation slots of a traced step (one zero-initialised perturbation per hidden
    state, added to its new value where the outputs read it); see
    :func:`~braintrace.add_hidden_perturbation_in_module`.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, braintrace
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
    >>> minfo = braintrace.extract_module_info(model, jnp.zeros((4, 2)))
    >>> [p.shape for p in braintrace.add_hidden_perturbation_from_minfo(minfo).zeros()]
    [(4, 3)]
    """
    fn = "add_hidden_perturbation_from_minfo"
    _check_minfo(fn, minfo)
    _no_descent(fn, descended_scan_eqn_ids=descended_scan_eqn_ids)
    return add_hidden_perturbation_in_module(minfo)[1]
