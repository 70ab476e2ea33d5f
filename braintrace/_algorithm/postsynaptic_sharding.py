"""Model-parallel placement of a learner whose sparse layers are split into postsynaptic blocks.

:func:`shard_postsynaptic` puts a compiled learner's states on a mesh so that device ``p`` of one
mesh axis owns block ``p`` of every blocked sparse layer (``SparsePattern.blocks = P``; see
:func:`braintrace.partition_postsynaptic` and ``braintrace.nn.SparseLinear(...,
postsynaptic_blocks=P)``): the synapses that end on its units (their weights and index arrays),
their eligibility traces, and the hidden states of those units. Everything else is replicated. It
only places arrays (``jax.device_put`` with ``NamedSharding``): XLA's SPMD partitioner does the rest,
and because the sparse primitives compute per block (a ``vmap`` over the block axis), it keeps each
block's work local and all-gathers only the presynaptic activity, once per step.
"""

from __future__ import annotations

from typing import Dict, List

import brainstate
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from braintrace._etrace_op.sparse import SparsePattern, etp_sp_mm_p, etp_sp_mv_p

from .d_rtrl import ParamDimVjpAlgorithm, _bar, _key
from .pp_prop import IODimVjpAlgorithm, _exact_keys

__all__ = ["shard_postsynaptic"]

_WHERE = "shard_postsynaptic"


def _axis_spec(ndim: int, axis: int, name: str) -> P:
    """The partition spec sharding ``axis`` of an ``ndim``-dimensional array over mesh axis ``name``."""
    return P(*[name if i == axis % ndim else None for i in range(ndim)])


def _blocked_relations(learner, blocks: int):
    """The relations of sparse layers of ``blocks`` postsynaptic blocks (the mesh axis size; on an
    axis of one device, every sparse layer is one block), checked against it."""
    found = []
    for r in learner.graph.hidden_param_op_relations:
        pattern = r.params.get("sparse_mat")
        if r.primitive not in (etp_sp_mm_p, etp_sp_mv_p) or not isinstance(pattern, SparsePattern):
            continue
        if pattern.blocks == 1 and blocks > 1:
            continue
        if pattern.blocks != blocks:
            raise ValueError(
                f"{_WHERE}: the sparse layer {sorted(p for ps in r.param_paths.values() for p in ps)} has "
                f"{pattern.blocks} postsynaptic blocks, but the mesh axis has {blocks} devices; the axis "
                f"size must equal the layer's blocks (one block per device)."
            )
        found.append(r)
    if not found:
        raise ValueError(
            f"{_WHERE}: {type(learner.model).__name__} has no sparse layer split into {blocks} postsynaptic "
            f"blocks whose output drives a hidden state; build its recurrence with "
            f"braintrace.nn.SparseLinear(..., postsynaptic_blocks={blocks}) (or a pattern from "
            f"braintrace.partition_postsynaptic)."
        )
    return found


class _Placement:
    """Per state (by ``id``), the leaves to shard: ``{leaf position: axis}``."""

    def __init__(self):
        self.axes: Dict[int, Dict[int, int]] = {}

    def shard(self, state, position: int, axis: int):
        self.axes.setdefault(id(state), {})[position] = axis


def _unit_axis(r, g, gi) -> int:
    """The axis of the group's unit shape that indexes the layer's output units."""
    axis = len(g.shape) - 1
    n_out = r.params["sparse_mat"].shape[1]
    if g.shape[axis] != n_out:
        raise ValueError(
            f"{_WHERE}: the hidden group {list(g.names)} driven by the sparse layer "
            f"{sorted(p for ps in r.param_paths.values() for p in ps)} has shape {g.shape}, whose last "
            f"axis is not the layer's {n_out} output units; shard_postsynaptic needs the units along "
            f"the last axis of the hidden states."
        )
    return axis


def _model_placement(learner, relations, place: _Placement):
    """The weights and index arrays of the blocked layers, and the hidden states they drive."""
    info = learner.graph.module_info
    by_path = {".".join(map(str, p)): i for i, p in enumerate(info.paths)}
    state_invars = info.state_invars()
    leaf_owner = {}
    for i, (a, b) in enumerate(info.state_leaf_ranges):
        for leaf in range(a, b):
            leaf_owner[leaf] = (i, leaf - a)
    group_shapes = {}
    for r in relations:
        pattern: SparsePattern = r.params["sparse_mat"]
        sizes = (pattern.nnz, pattern.shape[1])
        for path in {p for ps in r.param_paths.values() for p in ps}:
            i = by_path[path]
            for pos, leaf in enumerate(jax.tree.leaves(info.states[i].value)):
                if leaf.ndim >= 1 and leaf.shape[0] in sizes:  # (nnz,) weights, (O,) bias
                    place.shard(info.states[i], pos, 0)
        for var in r.aux_vars[:2]:  # row_ids, col_ids (nnz,); col_ptr (O + 1,) stays replicated
            leaf = next((k for k, v in enumerate(state_invars) if v is var), None)
            if leaf is not None:
                i, pos = leaf_owner[leaf]
                place.shard(info.states[i], pos, 0)
        for gi, g in enumerate(r.hidden_groups):
            axis = _unit_axis(r, g, gi)
            group_shapes[tuple(g.shape)] = axis
            for h in g.hidden_leaves:
                i, pos = leaf_owner[h.leaf]
                place.shard(info.states[i], pos, axis)
    # states the step writes with the driven units' shape but no gradient (integer or boolean
    # hidden states, e.g. refractory counters) follow the units
    for i, state in enumerate(info.states):
        if not info.written[i] or isinstance(state, brainstate.ParamState):
            continue
        for pos, leaf in enumerate(jax.tree.leaves(state.value)):
            axis = group_shapes.get(tuple(getattr(leaf, "shape", ())))
            if axis is not None:
                place.shard(state, pos, axis)
    return {h.leaf for r in relations for g in r.hidden_groups for h in g.hidden_leaves}


def _trace_axes(learner, relations) -> Dict[str, object]:
    """``{trace key: axis or {leaf name: axis}}`` of the blocked layers' traces."""
    axes = {}
    for r in relations:
        for gi, g in enumerate(r.hidden_groups):
            unit = _unit_axis(r, g, gi)
            if isinstance(learner, ParamDimVjpAlgorithm):
                # the sparse trace operations keep (nnz, n, B) and the bias's (*batch, O, n)
                leaves = {"weight": 0, "bias": -2}
                axes[_key(r.index, gi)] = leaves
                axes[_bar(_key(r.index, gi))] = leaves
            else:  # pp_prop: the output-shaped traces (*unit shape, n); the input trace is replicated
                if learner._needs_x(r):
                    axes[learner._f_key(r, gi)] = unit
                if _exact_keys(r):
                    axes[learner._e_key(r, gi)] = unit
    return axes


def _put(value, shardings: List):
    leaves, tree = jax.tree.flatten(value)
    return jax.tree.unflatten(tree, [jax.device_put(x, s) for x, s in zip(leaves, shardings)])


def shard_postsynaptic(learner, mesh: Mesh, axis: str = "model"):
    r"""Place a compiled D_RTRL or pp_prop learner on ``mesh`` in the postsynaptic-block form.

    Along mesh axis ``axis`` (``P`` devices), device ``p`` receives block ``p`` of every sparse layer
    split into ``P`` postsynaptic blocks: its weights and row/column ids (sharded along the ``nnz``
    axis), the bias of its units, their eligibility traces (D_RTRL's ``(P K, n, B)`` along its first
    axis; pp_prop's output-shaped traces ``(B, O, n)`` and the bias traces along ``O``), and the
    hidden states of the units the layer drives (along their last axis, with the learner's copy of
    them). Every other state (other layers' weights and traces, pp_prop's input traces) is
    replicated. The learner is changed in place and returned.

    The per-step program then all-gathers the presynaptic activity (the ``x`` of each blocked
    product) and nothing per synapse. Other ETP layers that drive the partitioned units (a dense
    input projection) keep replicated traces, which costs an all-gather of their ``df`` per step:
    make them blocked sparse layers too to avoid it.

    ``braintrace.compile`` creates the traces on the default device; for traces larger than one
    device, compile under ``jax.default_device(jax.devices('cpu')[0])`` (host memory) and let this
    function place them, so that no accelerator holds a whole trace.

    Parameters
    ----------
    learner : ParamDimVjpAlgorithm (D_RTRL and its presets) or IODimVjpAlgorithm (pp_prop)
        Compiled (``braintrace.compile`` or ``compile_graph``).
    mesh : jax.sharding.Mesh
    axis : str
        The mesh axis to shard over; its size must equal the layers' ``postsynaptic_blocks``.

    Returns
    -------
    The learner.

    Raises
    ------
    TypeError
        For another learner, an uncompiled one, or a ``mesh`` that is not a ``jax.sharding.Mesh``.
    ValueError
        For an ``axis`` not in the mesh, a model without blocked sparse layers, or blocks that differ
        from the axis size.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpy as np, brainstate, braintrace
    >>> from saiunit import sparse as ss
    >>> class Net(brainstate.nn.Module):
    ...     def __init__(self, n, blocks):
    ...         super().__init__()
    ...         rng = np.random.default_rng(0)
    ...         w = jnp.asarray(rng.normal(0, 0.3, (n, n)) * (rng.random((n, n)) < 0.3), jnp.float32)
    ...         self.rec = braintrace.nn.SparseLinear(ss.CSR.fromdense(w), postsynaptic_blocks=blocks)
    ...         self.n = n
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, self.n)))
    ...     def update(self, x):
    ...         self.h.value = 0.9 * self.h.value + jnp.tanh(self.rec(self.h.value) + x)
    ...         return self.h.value
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('model',))  # P devices; one here
    >>> P = mesh.shape['model']
    >>> learner = braintrace.compile(Net(8, P), 'd_rtrl', jnp.zeros((2, 8)), batch_size=2)
    >>> learner = braintrace.shard_postsynaptic(learner, mesh, axis='model')
    >>> tuple(learner.model.rec.weight.value['weight'].sharding.spec)  # the synapses
    ('model',)
    >>> tuple(learner.model.h.value.sharding.spec)  # the units
    (None, 'model')
    >>> tuple(learner.etrace.value['r0_g0']['weight'].sharding.spec)  # (P K, n, B)
    ('model', None, None)
    """
    if not isinstance(learner, (ParamDimVjpAlgorithm, IODimVjpAlgorithm)):
        raise TypeError(
            f"{_WHERE}: `learner` must be a D_RTRL (ParamDimVjpAlgorithm) or pp_prop (IODimVjpAlgorithm) "
            f"learner, got {type(learner).__name__}."
        )
    if not learner.is_compiled:
        raise TypeError(f"{_WHERE}: compile the learner first (braintrace.compile or learner.compile_graph).")
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{_WHERE}: `mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis not in mesh.axis_names:
        raise ValueError(f"{_WHERE}: `axis` {axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}.")
    relations = _blocked_relations(learner, int(mesh.shape[axis]))
    place = _Placement()
    sharded_leaves = _model_placement(learner, relations, place)
    replicated = NamedSharding(mesh, P())

    def shardings(state, value):
        axes = place.axes.get(id(state), {})
        leaves = jax.tree.leaves(value)
        return [
            NamedSharding(mesh, _axis_spec(leaf.ndim, axes[i], axis)) if i in axes else replicated
            for i, leaf in enumerate(leaves)
        ]

    # the learner's own states: the traces, and its copy of the hidden values
    trace_axes = _trace_axes(learner, relations)
    traces = dict(learner.etrace.value)
    for key, value in traces.items():
        spec = trace_axes.get(key)
        if isinstance(spec, dict):
            sh = {k: NamedSharding(mesh, _axis_spec(v.ndim, spec[k], axis)) for k, v in value.items()}
            traces[key] = {k: jax.device_put(v, sh[k]) for k, v in value.items()}
        elif spec is not None:
            traces[key] = jax.device_put(value, NamedSharding(mesh, _axis_spec(value.ndim, spec, axis)))
        else:
            traces[key] = jax.device_put(value, replicated)
    learner.etrace.value = traces
    if isinstance(learner, IODimVjpAlgorithm):
        learner.input_trace_sharding = replicated
    seen = learner.hidden_seen
    leaf_axis = {
        h.leaf: len(g.shape) - 1 for r in relations for g in r.hidden_groups for h in g.hidden_leaves
    }
    for pos, leaf in enumerate(learner._hidden_leaf_ids):
        if leaf in sharded_leaves:
            place.shard(seen, pos, leaf_axis[leaf])
    done = {id(learner.etrace)}
    for state in learner.states().values():
        if id(state) in done:
            continue
        done.add(id(state))
        state.value = _put(state.value, shardings(state, state.value))
    _place_snapshot(learner, shardings)
    return learner


def _place_snapshot(learner, shardings):
    """The compile-time state values the learner keeps (restored by ``etrace_grad(reset=True)``)
    placed like the states, so that no device keeps a whole copy of the blocked layers' arrays."""
    info = learner.graph.module_info
    old = getattr(learner, "_initial_values", None)
    if old is None or len(old) != len(info.states):
        return
    new = []
    for state, value in zip(info.states, old):
        same = [jnp.shape(a) for a in jax.tree.leaves(value)] == [
            jnp.shape(a) for a in jax.tree.leaves(state.value)
        ]
        new.append(_put(value, shardings(state, value)) if same else value)
    learner._initial_values = new
    snapshots = learner.__dict__.get("_initial_by_inputs", {})
    for key, values in snapshots.items():
        if values is old:
            snapshots[key] = new
