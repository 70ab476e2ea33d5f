r"""Hidden perturbations: how the algorithms obtain :math:`\partial L/\partial h_t` inside a step.

A zero-valued perturbation :math:`p_s` is added to the new value of every hidden state ``s``;
then :math:`\partial L/\partial p_s` is the partial derivative of the loss with respect to that
new value *as an output of the step*.

Paths from ``h_s`` to another hidden state of the same step that avoid trainable ETP ops are
already inside the eligibility traces (they are part of ``df``: ``y -> h_s -> h_r``), so the
perturbation must not flow along them. Paths through a trainable ETP op (``h_1 -> W_2 -> h_2``
in a stacked network) are in no trace, so it must. The step is therefore evaluated with two
environments: the *dynamics* one, which a perturbation reaches only through trainable ETP
outputs, and the *perturbed* one seen by the outputs and by ETP inputs, in which every hidden
state's new value is its dynamics value plus the perturbation.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from braintrace._compatible_imports import Literal, bind_equation, consts_of

from .jaxpr_tools import eval_jaxpr_hooked, is_trainable_etp_eqn
from .module_info import HiddenLeaf, ModuleInfo

__all__ = ["HiddenPerturbation", "add_hidden_perturbation_in_module"]


@dataclasses.dataclass(frozen=True)
class HiddenPerturbation:
    """The perturbation slots of a step: one per hidden state (``HiddenLeaf``)."""

    hidden_leaves: Tuple[HiddenLeaf, ...]
    #: Whether the step's outputs read a hidden state's previous value other than through its new
    #: value (a spike of the pre-reset potential, ``return h_old + ...``).
    reads_old: bool = False

    def zeros(self) -> List[jax.Array]:
        return [jnp.zeros(h.shape, h.dtype) for h in self.hidden_leaves]


def _downstream(jaxpr, roots) -> set:
    affected = set(roots)
    for eqn in jaxpr.eqns:
        if any((not isinstance(v, Literal)) and v in affected for v in eqn.invars):
            affected.update(eqn.outvars)
    return affected


#: Pure data-movement primitives through which a group state's slot is traced back to the value
#: the step computed for it (``jnp.stack`` and ``.at[..., i].set`` build group values this way).
_MOVES = frozenset(
    {
        "broadcast_in_dim",
        "reshape",
        "squeeze",
        "expand_dims",
        "concatenate",
        "stack",
        "scatter",
        "dynamic_update_slice",
        "convert_element_type",
        "copy",
        "copy_p",
    }
)


def _slot_components(info: ModuleInfo) -> Dict[int, object]:
    """For hidden states stored as slots of one array (``HiddenGroupState`` / ``HiddenTreeState``),
    the variable holding the slot's new value *before* it was packed into the array.

    The step usually returns that unpacked value, so the perturbation must be added there to
    reach the output. Candidates are found by walking back from the packed array through
    data-movement equations; the one equal to the slot on a random evaluation is taken.
    """
    slots = [(k, h) for k, h in enumerate(info.hidden_leaves) if h.slot is not None]
    if not slots:
        return {}
    jaxpr = info.jaxpr
    producer = {v: e for e in jaxpr.eqns for v in e.outvars}
    rng = np.random.default_rng(0)

    def sample(aval):
        if jnp.issubdtype(aval.dtype, jnp.inexact):
            return jnp.asarray(rng.standard_normal(aval.shape), aval.dtype)
        return jnp.zeros(aval.shape, aval.dtype)

    _, env = eval_jaxpr_hooked(jaxpr, consts_of(info.closed_jaxpr), [sample(v.aval) for v in jaxpr.invars])
    state_out = info.state_outvars()
    found = {}
    for k, h in slots:
        final = state_out[h.leaf]
        if isinstance(final, Literal):
            continue
        target = np.asarray(env[final][..., h.slot])
        stack, seen, candidates = [final], set(), []
        while stack:
            v = stack.pop()
            if isinstance(v, Literal) or v in seen:
                continue
            seen.add(v)
            if v is not final and tuple(v.aval.shape) == tuple(h.shape):
                candidates.append(v)
                continue
            eqn = producer.get(v)
            if eqn is not None and eqn.primitive.name in _MOVES:
                stack.extend(eqn.invars)
        for c in candidates:
            if np.array_equal(np.asarray(env[c]), target):
                found[k] = c
                break
    return found


def _reach(jaxpr, seeds, blocked) -> set:
    """Variables computed from ``seeds`` by paths that do not pass through ``blocked`` variables
    (a blocked variable gets its value from elsewhere, so nothing flows through it)."""
    reached = {v for v in seeds if not isinstance(v, Literal)}
    for eqn in jaxpr.eqns:
        if any((not isinstance(v, Literal)) and v in reached for v in eqn.invars):
            reached.update(v for v in eqn.outvars if v not in blocked)
    return reached


def _live_avoiding(jaxpr, targets, blocked) -> set:
    """Variables from which a variable in ``targets`` is computed by a path that does not pass
    through ``blocked`` variables."""
    live = {v for v in targets if not isinstance(v, Literal)}
    for eqn in reversed(jaxpr.eqns):
        if any(v in live and v not in blocked for v in eqn.outvars):
            live.update(v for v in eqn.invars if not isinstance(v, Literal))
    return live


def add_hidden_perturbation_in_module(
    info: ModuleInfo, eqn_hook: Optional[Callable] = None, relation_eqns=()
) -> Tuple[Callable, HiddenPerturbation]:
    r"""Build ``fn(state_leaves, arg_leaves, perts, old_perts=None) -> (out_leaves, new_state_leaves)``.

    ``perts`` is a list with one array per hidden state (see :class:`HiddenPerturbation`); the
    output leaves see ``new value + pert`` for every hidden state, the returned new state values
    do not. ``fn(..., return_env=True)`` also returns the dynamics environment (every variable of
    the step's jaxpr -> its value), so a caller can read the step's intermediate values without
    evaluating the step again. ``eqn_hook(index, eqn, invals)`` may replace the binding of a
    trainable ETP equation (the executor uses it to stop gradients at the trainable operands of
    relations, the equations at ``relation_eqns``).

    The outputs are evaluated in a third environment in which (a) every hidden state's new value
    is the perturbed one, so nothing reaches an output through a stored new value except through
    the perturbation; (b) the relations are bound *without* ``eqn_hook``, so their trainable
    operands reach an output directly (``return h + y``, a spike of the pre-reset potential): the
    within-step gradient of those paths is ordinary reverse mode; and (c) the previous value of
    every hidden state carries a second perturbation ``old_perts`` (same shapes as ``perts``):
    ``\partial L/\partial`` ``old_perts`` is the gradient of the step's loss with respect to
    ``h_{t-1}`` along paths that avoid the new stored values, which an algorithm contracts with
    its traces of the previous step. ``HiddenPerturbation.reads_old`` says whether any such path
    exists (when not, ``old_perts`` may be omitted and its gradient is zero).
    """
    jaxpr = info.jaxpr
    consts = consts_of(info.closed_jaxpr)
    n_out = info.num_out_leaves
    state_out = info.state_outvars()
    state_in = info.state_invars()
    components = _slot_components(info)
    by_var: Dict = {}
    for k, h in enumerate(info.hidden_leaves):
        if k in components:
            by_var.setdefault(components[k], []).append((k, None))
            continue
        v = state_out[h.leaf]
        if isinstance(v, Literal):
            continue
        by_var.setdefault(v, []).append((k, h.slot))
    affected = _downstream(jaxpr, by_var.keys())
    relation_eqns = frozenset(relation_eqns)
    outs_needed = _live_avoiding(jaxpr, jaxpr.outvars[:n_out], by_var.keys())
    old_vars: Dict = {}
    for k, h in enumerate(info.hidden_leaves):
        old_vars.setdefault(state_in[h.leaf], []).append((k, h.slot))
    reads_old = bool(_reach(jaxpr, old_vars.keys(), by_var.keys()) & set(jaxpr.outvars[:n_out]))
    rel_outs = {v for i in relation_eqns for v in jaxpr.eqns[i].outvars}
    seeds_o = rel_outs | (set(old_vars) if reads_old else set())
    # variables whose output-environment value differs from the perturbed one, on a path to an output
    differs_o = _reach(jaxpr, seeds_o, by_var.keys()) & outs_needed
    # variables on a path from a relation's output into another trainable ETP op's operands (a
    # gate feeding a recurrent matmul): they are evaluated once more with the relations' trainable
    # operands not stopped, so the step differentiates that path (the traces do not carry it)
    etp_operands = [v for e in jaxpr.eqns if is_trainable_etp_eqn(e) for v in e.invars]
    differs_u = _reach(jaxpr, rel_outs, by_var.keys()) & _live_avoiding(jaxpr, etp_operands, by_var.keys())
    pert = HiddenPerturbation(info.hidden_leaves, reads_old)

    def fn(state_leaves, arg_leaves, perts, old_perts=None, return_env=False):
        # env_d: the step's dynamics; a perturbation reaches it only through trainable ETP outputs.
        # env_p: what trainable ETP inputs see: each hidden state's new value is its dynamics value
        # plus the perturbation. env_o: what the outputs see (see the docstring).
        env_d, env_p, env_o = {}, {}, {}
        env_u = {}  # the values of ``differs_u``; every other variable reads env_p there

        def read(env, v):
            return v.val if isinstance(v, Literal) else env[v]

        def read_u(v):
            return v.val if isinstance(v, Literal) else env_u.get(v, env_p.get(v))

        def define(v, val_d, val_p, val_o):
            if type(v).__name__ == "DropVar":
                return
            env_d[v] = val_d
            if v in by_var:
                for k, slot in by_var[v]:
                    val_d = val_d + perts[k] if slot is None else val_d.at[..., slot].add(perts[k])
                env_p[v] = env_o[v] = val_d
            else:
                env_p[v] = val_p
                env_o[v] = val_o

        for v, c in zip(jaxpr.constvars, consts):
            define(v, c, c, c)
        for v, a in zip(jaxpr.invars, [*state_leaves, *arg_leaves]):
            a_o = a
            if reads_old and old_perts is not None and v in old_vars:
                for k, slot in old_vars[v]:
                    a_o = a_o + old_perts[k] if slot is None else a_o.at[..., slot].add(old_perts[k])
            define(v, a, a, a_o)

        def run(i, eqn, invals):
            outs = eqn_hook(i, eqn, invals) if eqn_hook is not None else None
            return outs if outs is not None else bind_equation(eqn, invals)

        for i, eqn in enumerate(jaxpr.eqns):
            if any(v in differs_u for v in eqn.outvars):
                invals_u = [read_u(v) for v in eqn.invars]
                outs_u = bind_equation(eqn, invals_u) if i in relation_eqns else run(i, eqn, invals_u)
                env_u.update((v, val) for v, val in zip(eqn.outvars, outs_u) if v in differs_u)
            if is_trainable_etp_eqn(eqn):
                outs_d = outs_p = run(i, eqn, [read_u(v) for v in eqn.invars])
            else:
                outs_d = run(i, eqn, [read(env_d, v) for v in eqn.invars])
                if any((not isinstance(v, Literal)) and v in affected for v in eqn.invars):
                    outs_p = run(i, eqn, [read(env_p, v) for v in eqn.invars])
                else:
                    outs_p = outs_d
            if any(v in differs_o for v in eqn.outvars):
                invals_o = [read(env_o, v) for v in eqn.invars]
                # a relation's trainable operands are not stopped here: its direct paths count
                outs_o = bind_equation(eqn, invals_o) if i in relation_eqns else run(i, eqn, invals_o)
            else:
                outs_o = outs_p
            for v, a, b, c in zip(eqn.outvars, outs_d, outs_p, outs_o):
                define(v, a, b, c)
        outs = [read(env_o, v) for v in jaxpr.outvars[:n_out]]
        new_states = [read(env_d, v) for v in state_out]
        return (outs, new_states, env_d) if return_env else (outs, new_states)

    return fn, pert
