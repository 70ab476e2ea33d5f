r"""Hidden perturbations: how the algorithms obtain :math:`\partial L/\partial h_t` inside a step.

A zero-valued perturbation :math:`p_s` is added to the new value of every hidden state ``s``;
then :math:`\partial L/\partial p_s` is the partial derivative of the loss with respect to that
new value *as an output of the step*. The perturbation must not flow into the computation of the
other hidden states of the same step (that path is already part of the eligibility trace), so
the step is evaluated in two passes: the first computes every value; the second recomputes only
what depends on a hidden state's new value, with that value replaced by ``first-pass value + p``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from braintrace._compatible_imports import Literal, consts_of

from .jaxpr_tools import eval_jaxpr_hooked
from .module_info import HiddenLeaf, ModuleInfo

__all__ = ["HiddenPerturbation", "add_hidden_perturbation_in_module"]


@dataclasses.dataclass(frozen=True)
class HiddenPerturbation:
    """The perturbation slots of a step: one per hidden state (``HiddenLeaf``)."""

    hidden_leaves: Tuple[HiddenLeaf, ...]

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
    {"broadcast_in_dim", "reshape", "squeeze", "expand_dims", "concatenate", "stack", "scatter",
     "dynamic_update_slice", "convert_element_type", "copy", "copy_p"}
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


def add_hidden_perturbation_in_module(
    info: ModuleInfo, eqn_hook: Optional[Callable] = None
) -> Tuple[Callable, HiddenPerturbation]:
    """Build ``fn(state_leaves, arg_leaves, perts) -> (out_leaves, new_state_leaves)``.

    ``perts`` is a list with one array per hidden state (see :class:`HiddenPerturbation`); the
    output leaves see ``new value + pert`` for every hidden state, the returned new state values
    do not. ``eqn_hook`` is passed to the first pass (the executor uses it to stop gradients).
    """
    jaxpr = info.jaxpr
    consts = consts_of(info.closed_jaxpr)
    n_out = info.num_out_leaves
    state_out = info.state_outvars()
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
    pert = HiddenPerturbation(info.hidden_leaves)

    def fn(state_leaves, arg_leaves, perts):
        args = [*state_leaves, *arg_leaves]
        _, env1 = eval_jaxpr_hooked(jaxpr, consts, args, eqn_hook=eqn_hook)

        def make_hook(v):
            def hook(_):
                val = env1[v]
                for k, slot in by_var[v]:
                    val = val + perts[k] if slot is None else val.at[..., slot].add(perts[k])
                return val

            return hook

        def reuse(i, eqn, invals):
            if any((not isinstance(v, Literal)) and v in affected for v in eqn.invars):
                return None
            return [env1[v] for v in eqn.outvars]

        outs, _ = eval_jaxpr_hooked(
            jaxpr, consts, args, eqn_hook=reuse, var_hook={v: make_hook(v) for v in by_var}
        )
        new_states = [env1[v] if not isinstance(v, Literal) else v.val for v in state_out]
        return outs[:n_out], new_states

    return fn, pert
