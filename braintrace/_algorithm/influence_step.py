r"""The step as a function of every hidden value and every traced weight: what the influence-matrix
algorithms (RTRL, SnAp-n, UORO) differentiate.

Notation, per *row* ``r`` (below):

* ``h``: every floating hidden state element of the model, concatenated in the order of
  ``module_info.hidden_leaves``, ``N`` per row;
* ``θ``: the trainable operands of the ETP relations and of the other ETP ops whose output moves a
  hidden state through further ETP ops (a gate feeding a recurrent matmul), when those operands are
  computed from parameters only; each operand variable of the step once, flattened, ``P`` in all;
* ``J_t = ∂h_t/∂h_{t-1}`` (``(R, N, N)``): the full one-step Jacobian, every path included (an ETP
  output is *not* held fixed, so a traced weight's own recurrence is in it);
* ``I_t = ∂h_t/∂θ`` (``(R, N, P)``): the immediate influence, ``h_{t-1}`` held fixed, every
  within-step path included (a stacked layer's weights reach the layers above it).

A weight operand is replaced as a variable of the step: every use of that variable sees ``θ``, the
relation's and any plain op's that reads the same variable.

**Rows.** When every hidden state has the same leading axis and the step never moves a value from
one entry of that axis to another, each entry is a row with its own ``J`` and ``I`` (a batch of
``B`` independent sequences: ``R = B``); otherwise the whole hidden vector is one row (``R = 1``).
Independence is established once, when the graph is compiled, by a forward-mode probe at random
values of the states, the weights and the inputs: a tangent in row ``b`` only must leave every
other row's new hidden values exactly zero, for every ``b``. The per-row form is exact whenever it
applies, also when the rows are units (an unbatched model whose units do not interact).

The step the algorithms run (:meth:`InfluenceGraphExecutor._perturbed_step`) adds a perturbation
``p`` to every hidden state's new value *as the outputs see it* and nowhere else, so
``∂L/∂p = ∂L_t/∂h_t`` counts each path from ``h_t`` to the outputs once (a perturbation never moves
another hidden state: ``I_t`` already carries the within-step paths between them). The traced
weights are cut from the gradient in the dynamics and live in the outputs (their direct paths).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from braintrace._compatible_imports import Literal, bind_equation
from braintrace._compiler.diagnostics import CompilationError
from braintrace._compiler.graph import ETraceGraph
from braintrace._compiler.jaxpr_tools import eval_jaxpr_hooked
from braintrace._compiler.perturbation import HiddenPerturbation, _slot_components
from braintrace._etrace_op._registries import (
    ETP_PRIMITIVES,
    ETP_TRAINABLE_INVARS_FNS,
    default_trainable_invars,
)

from .executor import ETraceVjpGraphExecutor, StepValues, _read, _StoppedEnv

__all__ = ["InfluenceGraphExecutor"]


def _reach(jaxpr, seeds, blocked) -> set:
    """Variables computed from ``seeds`` by paths that avoid the ``blocked`` variables."""
    reached = {v for v in seeds if not isinstance(v, Literal)}
    for eqn in jaxpr.eqns:
        if any((not isinstance(v, Literal)) and v in reached for v in eqn.invars):
            reached.update(v for v in eqn.outvars if v not in blocked)
    return reached


def _live_avoiding(jaxpr, targets, blocked) -> set:
    """Variables from which some of ``targets`` is computed by a path avoiding ``blocked``."""
    live = {v for v in targets if not isinstance(v, Literal)}
    for eqn in reversed(jaxpr.eqns):
        if any(v in live and v not in blocked for v in eqn.outvars):
            live.update(v for v in eqn.invars if not isinstance(v, Literal))
    return live


def _is_drop(v) -> bool:
    return type(v).__name__ == "DropVar"


def _extra_weight_ops(graph: ETraceGraph) -> List:
    """``(index, equation index, {key: variable}, parameter paths)`` of every ETP equation that is not
    a relation but whose output moves a hidden state (through another trainable ETP op: a gate that
    feeds a recurrent matmul) and whose trainable operands are computed from parameters only; their
    ``index`` continues the relations' (a pseudo-relation). The influence carries them like a
    relation's operands."""
    info = graph.module_info
    jaxpr = info.jaxpr
    in_vars = info.state_invars()
    param_leaves = {leaf for si in info.param_states for leaf in range(*info.state_leaf_ranges[si])}
    other = [v for i, v in enumerate(jaxpr.invars) if i not in param_leaves]
    varying = _reach(jaxpr, other, set())  # computed from an input or a state that is no parameter
    hidden_out = {info.state_outvars()[h.leaf] for h in info.hidden_leaves}
    reach_of = {
        si: _reach(jaxpr, [in_vars[leaf] for leaf in range(*info.state_leaf_ranges[si])], set())
        for si in info.param_states
    }
    relation_eqns = {r.eqn_index for r in graph.hidden_param_op_relations}
    found = []
    for i, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive not in ETP_PRIMITIVES or i in relation_eqns:
            continue
        layout = ETP_TRAINABLE_INVARS_FNS.get(eqn.primitive, default_trainable_invars)(dict(eqn.params))
        tvars = {k: eqn.invars[j] for k, j in layout.items() if not isinstance(eqn.invars[j], Literal)}
        paths = sorted({info.path_of(si) for si, r in reach_of.items() for v in tvars.values() if v in r})
        if (
            not tvars
            or not paths
            or any(v in varying for v in tvars.values())
            or not (_reach(jaxpr, eqn.outvars, set()) & hidden_out)
        ):
            continue
        found.append((len(graph.hidden_param_op_relations) + len(found), i, tvars, tuple(paths)))
    return found


class InfluenceGraphExecutor(ETraceVjpGraphExecutor):
    """Evaluates a compiled step for the influence-matrix algorithms (see the module docstring).

    Attributes
    ----------
    rows, num_hidden, num_theta : int
        ``R``, ``N`` and ``P``.
    theta_vars : tuple
        The step's variables that hold the traced weights (the relations' trainable operands and
        those of :attr:`extra_ops`), one slot each of ``θ``.
    extra_ops : list
        ``(index, equation index, {key: variable}, parameter paths)`` of the ETP ops that are not
        relations but move hidden states through other ETP ops; ``index`` continues the relations'
        in the operand and gradient dicts.
    dtype : numpy dtype
        The dtype ``h``, ``θ`` and the influence are kept in (the result type of both).
    """

    def __init__(self, graph: ETraceGraph, solve, probe_seed: int = 0):
        info = graph.module_info
        self.extra_ops = _extra_weight_ops(graph)
        owners: Dict = {}
        for r in graph.hidden_param_op_relations:
            for k, v in r.trainable_vars.items():
                if not isinstance(v, Literal) and r.param_paths.get(k):
                    owners.setdefault(v, []).append((r.index, k))
        for index, _, tvars, _ in self.extra_ops:
            for k, v in tvars.items():
                owners.setdefault(v, []).append((index, k))
        #: variable -> the (relation, key) pairs whose trainable operand it is (the first one gets
        #: the gradient; the others get zeros, so routing to the parameters counts it once); the
        #: indices past the relations' are :attr:`extra_ops`
        self.theta_owners = owners
        self.theta_vars = tuple(owners)
        self._theta_shapes = [tuple(v.aval.shape) for v in self.theta_vars]
        self._theta_sizes = [int(np.prod(s, dtype=np.int64)) for s in self._theta_shapes]
        self.num_theta = int(sum(self._theta_sizes))
        if not self.num_theta:
            raise CompilationError(
                f"{type(info.model).__name__}: no ETP op that moves a hidden state has a trainable operand "
                f"computed from parameters, so there is no influence to trace."
            )
        self._hidden_shapes = [tuple(h.shape) for h in info.hidden_leaves]
        dtypes = [h.dtype for h in info.hidden_leaves] + [v.aval.dtype for v in self.theta_vars]
        self.dtype = np.dtype(jnp.result_type(*dtypes))
        self._group_of = {(h.leaf, h.slot): g.index for g in graph.hidden_groups for h in g.hidden_leaves}
        leads = {s[0] if s else None for s in self._hidden_shapes}
        lead = leads.pop() if len(leads) == 1 else None
        self.rows = lead if (lead is not None and lead > 1) else 1
        super().__init__(graph, solve)
        if self.rows > 1 and not self._rows_independent(probe_seed):
            self.rows = 1

    # -- layout of h and θ --------------------------------------------------------------------
    @property
    def num_hidden(self) -> int:
        return int(sum(int(np.prod(s, dtype=np.int64)) for s in self._hidden_shapes)) // self.rows

    def flatten_hidden(self, values: List) -> jax.Array:
        """Per-hidden-leaf values (each of its shape) -> ``(R, N)``."""
        r = self.rows
        return jnp.concatenate([jnp.reshape(v, (r, -1)).astype(self.dtype) for v in values], axis=1)

    def unflatten_hidden(self, flat) -> List:
        """``(R, N)`` -> per-hidden-leaf values, each of its shape and dtype."""
        out, start = [], 0
        for h, shape in zip(self.info.hidden_leaves, self._hidden_shapes):
            n = int(np.prod(shape, dtype=np.int64)) // self.rows
            out.append(jnp.reshape(flat[:, start : start + n], shape).astype(h.dtype))
            start += n
        return out

    def hidden_of(self, state_leaves) -> jax.Array:
        """``h`` ``(R, N)`` read from the state leaves."""
        vals = []
        for h in self.info.hidden_leaves:
            v = state_leaves[h.leaf]
            vals.append(v if h.slot is None else v[..., h.slot])
        return self.flatten_hidden(vals)

    def theta_of(self, weights) -> jax.Array:
        """``θ`` ``(P,)`` from the relations' trainable operands ``{relation: {key: value}}``."""
        parts = []
        for v in self.theta_vars:
            ri, k = self.theta_owners[v][0]
            parts.append(jnp.ravel(weights[ri][k]).astype(self.dtype))
        return jnp.concatenate(parts)

    def _theta_values(self, flat) -> List:
        out, start = [], 0
        for v, shape, n in zip(self.theta_vars, self._theta_shapes, self._theta_sizes):
            out.append(jnp.reshape(flat[start : start + n], shape).astype(v.aval.dtype))
            start += n
        return out

    def theta_grads(self, flat) -> Dict:
        """``{relation: {key: gradient}}`` from a gradient ``(P,)`` of ``θ`` (each operand variable's
        gradient goes to the first relation and key it belongs to)."""
        out: Dict = {}
        for v, val in zip(self.theta_vars, self._theta_values(flat)):
            ri, k = self.theta_owners[v][0]
            out.setdefault(ri, {})[k] = val
        return out

    def hidden_mask(self, per_group) -> jax.Array:
        """``(R, N)``: each hidden element's value of ``per_group[group index]`` (broadcast to the
        group's unit shape), as a restart's ``keep`` sees it."""
        vals = []
        for h, shape in zip(self.info.hidden_leaves, self._hidden_shapes):
            k = per_group[self._group_of[(h.leaf, h.slot)]]
            vals.append(jnp.broadcast_to(jnp.asarray(k), shape))
        return self.flatten_hidden(vals)

    def group_cotangents(self, d_perturbation, keep=None):
        """``∂L/∂h`` ``(R, N)`` from the per-hidden-leaf gradients of the perturbations; with
        ``keep`` (group index -> 0/1 per unit, a restart), times ``keep``."""
        flat = self.flatten_hidden(list(d_perturbation))
        return flat if keep is None else flat * self.hidden_mask(keep).astype(flat.dtype)

    # -- the step as a function of (h, θ) -------------------------------------------------------
    def new_hidden(self, point, hidden, theta) -> jax.Array:
        """``h_t`` ``(R, N)`` of the step at ``point = (state_leaves, arg_leaves)`` with its hidden
        values replaced by ``hidden`` ``(R, N)`` and its traced weights by ``theta`` ``(P,)``."""
        state_leaves, arg_leaves = point
        leaves = list(state_leaves)
        for h, v in zip(self.info.hidden_leaves, self.unflatten_hidden(hidden)):
            leaves[h.leaf] = v if h.slot is None else leaves[h.leaf].at[..., h.slot].set(v)
        hooks = {var: (lambda _, t=t: t) for var, t in zip(self.theta_vars, self._theta_values(theta))}
        _, env = eval_jaxpr_hooked(self.jaxpr, self.consts, [*leaves, *arg_leaves], var_hook=hooks)
        new = [_read(env, v) for v in self.state_out]
        vals = []
        for h in self.info.hidden_leaves:
            v = new[h.leaf]
            vals.append(v if h.slot is None else v[..., h.slot])
        return self.flatten_hidden(vals)

    def _linear_maps(self, step: StepValues):
        """``(v -> J v, u -> I u)`` at the step (each a linearisation of the step)."""
        point = step.point
        h0, th0 = self.hidden_of(point[0]), self.theta_of(step.weights)
        _, lin_h = jax.linearize(lambda h: self.new_hidden(point, h, th0), h0)
        _, lin_th = jax.linearize(lambda th: self.new_hidden(point, h0, th), th0)
        return lin_h, lin_th

    def _columns_of_i(self, lin_th, pick):
        """``pick(j, I[:, :, j])`` for every column ``j`` of ``I``, stacked on a leading axis: ``P``
        forward-mode products, in chunks whose basis is no larger than one column block of ``I``."""
        p, chunk = self.num_theta, max(1, min(self.num_theta, self.rows * self.num_hidden))
        one_hot = lambda j: jax.nn.one_hot(j, p, dtype=self.dtype)
        return jax.lax.map(lambda j: pick(j, lin_th(one_hot(j))), jnp.arange(p), batch_size=chunk)

    def hidden_jacobian(self, step: StepValues, lin_h=None) -> jax.Array:
        """``J`` ``(R, N, N)``: ``N`` forward-mode products, one basis vector per hidden element, the
        same in every row."""
        lin_h = self._linear_maps(step)[0] if lin_h is None else lin_h
        n, r = self.num_hidden, self.rows
        basis = jnp.broadcast_to(jnp.eye(n, dtype=self.dtype)[:, None, :], (n, r, n))
        return jnp.transpose(jax.vmap(lin_h)(basis), (1, 2, 0))

    def jacobians(self, step: StepValues) -> Tuple[jax.Array, jax.Array]:
        """``(J (R, N, N), I (R, N, P))`` at the step."""
        lin_h, lin_th = self._linear_maps(step)
        imm = self._columns_of_i(lin_th, lambda j, col: col)
        return self.hidden_jacobian(step, lin_h), jnp.transpose(imm, (1, 2, 0))

    def jacobian_and_columns(self, step: StepValues, index) -> Tuple[jax.Array, jax.Array]:
        """``(J (R, N, N), I[r, index[j, a], j] (R, P, k))``: ``I`` at ``k`` hidden elements per column
        (``index`` ``(P, k)``), never formed whole."""
        lin_h, lin_th = self._linear_maps(step)
        index = jnp.asarray(index)
        cols = self._columns_of_i(lin_th, lambda j, col: col[:, index[j]])
        return self.hidden_jacobian(step, lin_h), jnp.transpose(cols, (1, 0, 2))

    def jvp_hidden(self, step: StepValues, tangent) -> jax.Array:
        """``J_t tangent`` ``(R, N)`` (one forward-mode product)."""
        point = step.point
        h0, th0 = self.hidden_of(point[0]), self.theta_of(step.weights)
        return jax.jvp(lambda h: self.new_hidden(point, h, th0), (h0,), (tangent,))[1]

    def vjp_theta_rows(self, step: StepValues, cotangent) -> jax.Array:
        """``cotangent[r]ᵀ I_t[r]`` for every row, ``(R, P)``: one reverse-mode product per row."""
        point = step.point
        h0, th0 = self.hidden_of(point[0]), self.theta_of(step.weights)
        _, vjp = jax.vjp(lambda th: self.new_hidden(point, h0, th), th0)
        if self.rows == 1:
            return vjp(cotangent)[0][None]
        rows = jnp.arange(self.rows)
        return jax.vmap(lambda r: vjp(jnp.where((rows == r)[:, None], cotangent, 0))[0])(rows)

    # -- structure (compile time) -------------------------------------------------------------
    def random_point(self, seed: int):
        """``(state_leaves, arg_leaves)`` at random values: every floating state leaf (weights
        included) ``v exp(0.3 ξ) + 0.5 ξ'`` (its sign and scale kept, zeros moved off zero), every
        floating input ``ξ``, other leaves zeros of their dtype; ``ξ ~ N(0, 1)``."""
        rng = np.random.default_rng(seed)
        leaves = [s.value for s in self.info.states]
        state = []
        for leaf, var in zip(jax.tree.leaves(leaves), self.info.state_invars()):
            a = np.asarray(leaf)
            if jnp.issubdtype(var.aval.dtype, jnp.inexact):
                a = a * np.exp(0.3 * rng.standard_normal(a.shape)) + 0.5 * rng.standard_normal(a.shape)
            state.append(np.asarray(a, var.aval.dtype))
        args = []
        for aval in self.info.arg_avals:
            if jnp.issubdtype(aval.dtype, jnp.inexact):
                args.append(np.asarray(rng.standard_normal(aval.shape), aval.dtype))
            else:
                args.append(np.zeros(aval.shape, aval.dtype))
        return state, args

    def _at(self, state, args) -> StepValues:
        weights, aux = self.relation_operands(state, args)
        return StepValues({}, weights, aux, {}, {}, point=(list(state), list(args)))

    def _rows_independent(self, seed: int) -> bool:
        """Whether a tangent in one row of ``h_{t-1}`` leaves the other rows of ``h_t`` exactly zero,
        for every row, at two random points (non-finite values count as a coupling)."""
        rng = np.random.default_rng(seed + 1)
        rows = jnp.arange(self.rows)

        @jax.jit
        def leak(state, args, tangent):
            step = self._at(state, args)

            def one(b):
                out = self.jvp_hidden(step, jnp.where((rows == b)[:, None], tangent, 0))
                return jnp.any(jnp.where((rows != b)[:, None], out != 0, False))

            return jnp.any(jax.lax.map(one, rows))

        for draw in range(2):
            tangent = np.asarray(rng.standard_normal((self.rows, self.num_hidden)), self.dtype)
            if bool(leak(*self.random_point(seed + draw), tangent)):
                return False
        return True

    def structural_patterns(self, seed: int, draws: int = 2) -> Tuple[np.ndarray, np.ndarray]:
        """``(pattern of J (N, N), pattern of I (N, P))`` as boolean arrays: the entries that are not
        zero in some row at some of ``draws`` random points (see :meth:`random_point`; a non-finite
        entry counts as non-zero). Random weights make the pattern the step's structure rather than
        its current values; a derivative that is exactly zero over a whole region (``relu`` below
        zero) may hide an entry at a point, which the second draw makes unlikely."""
        pat_j = np.zeros((self.num_hidden, self.num_hidden), bool)
        pat_i = np.zeros((self.num_hidden, self.num_theta), bool)

        @jax.jit
        def patterns(state, args):
            step = self._at(state, args)
            lin_h, lin_th = self._linear_maps(step)
            jac = jnp.any(self.hidden_jacobian(step, lin_h) != 0, axis=0)
            return jac, self._columns_of_i(lin_th, lambda j, col: jnp.any(col != 0, axis=0)).T

        for draw in range(draws):
            j, i = patterns(*self.random_point(seed + 10 + draw))
            pat_j |= np.asarray(j)
            pat_i |= np.asarray(i)
        return pat_j, pat_i

    def plain_weight_paths(self) -> List[str]:
        """Paths of the parameters owning a traced operand that also reach a hidden state's new value
        by a path avoiding every operand variable of ``θ`` (``x @ W.T`` beside ``matmul(x, W)``): that
        path is in no influence entry, the step differentiates it within the step only."""
        info = self.info
        in_vars = info.state_invars()
        theta = set(self.theta_vars)
        hidden_out = {self.state_out[h.leaf] for h in info.hidden_leaves}
        found = []
        traced = {p for paths in self.theta_paths() for p in paths}
        for si in (si for si in info.param_states if info.path_of(si) in traced):
            a, b = info.state_leaf_ranges[si]
            seeds = {in_vars[leaf] for leaf in range(a, b)} - theta
            if _reach(self.jaxpr, seeds, theta) & hidden_out:
                found.append(info.path_of(si))
        return found

    # -- the step the algorithms run -----------------------------------------------------------
    def _operands(self, env):
        relations = self.graph.hidden_param_op_relations
        weights = {r.index: {k: _read(env, v) for k, v in r.trainable_vars.items()} for r in relations}
        aux = {r.index: tuple(_read(env, v) for v in r.aux_vars) for r in relations}
        for index, _, tvars, _ in self.extra_ops:
            weights[index] = {k: _read(env, v) for k, v in tvars.items()}
            aux[index] = ()
        return weights, aux

    def relation_operands(self, state_leaves, arg_leaves):
        """``(weights, aux)`` of the relations and of :attr:`extra_ops` (indices past the relations')."""
        _, _, env = self.evaluate(state_leaves, arg_leaves)
        return self._operands(env)

    def _operand_cotangents(self, relation_grads, weights, relations=None):
        out = super()._operand_cotangents(relation_grads, weights, relations)
        if relations is None:
            for index, _, tvars, _ in self.extra_ops:
                got = relation_grads.get(index, {})
                out[index] = {
                    k: jnp.zeros_like(weights[index][k])
                    if got.get(k) is None
                    else jnp.asarray(got[k], jnp.result_type(weights[index][k]))
                    for k in tvars
                }
        return out

    def step_values(self, state_leaves, arg_leaves, env=None) -> StepValues:
        """The operands of ``θ`` and the step's point (gradients stopped); the algorithm forms the
        derivatives it needs from the point."""
        state_leaves = [jax.lax.stop_gradient(s) for s in state_leaves]
        arg_leaves = [jax.lax.stop_gradient(a) for a in arg_leaves]
        if env is None:
            _, _, env = self.evaluate(state_leaves, arg_leaves)
        else:
            env = _StoppedEnv(env)
        weights, aux = self._operands(env)
        return StepValues({}, weights, aux, {}, {}, point=(state_leaves, arg_leaves))

    def _perturbed_step(self):
        """``(perturbed, perturbation)``: the step seen by the outputs through ``h_t + p`` (``p``
        reaches no other hidden state), the previous hidden values seen by the outputs along paths
        that avoid ``h_t`` through ``h_{t-1} + q`` (``q``: ``old_perts``, present when the outputs
        read them, :attr:`reads_old`); ``θ`` is stopped in the dynamics and live in the outputs."""
        info, jaxpr, consts = self.info, self.jaxpr, self.consts
        n_out = info.num_out_leaves
        state_in, state_out = info.state_invars(), info.state_outvars()
        components = _slot_components(info)
        by_var: Dict = {}  # variable holding a hidden state's new value -> [(hidden index, slot)]
        for k, h in enumerate(info.hidden_leaves):
            if k in components:
                by_var.setdefault(components[k], []).append((k, None))
            elif not isinstance(state_out[h.leaf], Literal):
                by_var.setdefault(state_out[h.leaf], []).append((k, h.slot))
        old_vars: Dict = {}
        for k, h in enumerate(info.hidden_leaves):
            old_vars.setdefault(state_in[h.leaf], []).append((k, h.slot))
        theta = set(self.theta_vars)
        outs = jaxpr.outvars[:n_out]
        reads_old = bool(_reach(jaxpr, old_vars, by_var) & set(outs))
        # the variables whose value the outputs see differently from the dynamics
        seeds = theta | set(by_var) | (set(old_vars) if reads_old else set())
        differs = _reach(jaxpr, seeds, by_var) & _live_avoiding(jaxpr, outs, by_var)

        def add(val, pairs, perts):
            for k, slot in pairs:
                val = val + perts[k] if slot is None else val.at[..., slot].add(perts[k])
            return val

        def fn(state_leaves, arg_leaves, perts, old_perts=None, return_env=False):
            env_d, env_o = {}, {}  # the dynamics; what the outputs see

            def define(v, raw_d, raw_o):
                if _is_drop(v):
                    return
                env_d[v] = jax.lax.stop_gradient(raw_d) if v in theta else raw_d
                env_o[v] = add(env_d[v], by_var[v], perts) if v in by_var else raw_o

            for v, c in zip(jaxpr.constvars, consts):
                define(v, c, c)
            for v, a in zip(jaxpr.invars, [*state_leaves, *arg_leaves]):
                use_q = reads_old and old_perts is not None and v in old_vars
                define(v, a, add(a, old_vars[v], old_perts) if use_q else a)
            for eqn in jaxpr.eqns:
                raw_d = bind_equation(eqn, [_read(env_d, v) for v in eqn.invars])
                if any(v in differs for v in eqn.outvars):
                    raw_o = bind_equation(eqn, [_read(env_o, v) for v in eqn.invars])
                else:
                    raw_o = raw_d
                for v, a, b in zip(eqn.outvars, raw_d, raw_o):
                    define(v, a, b)
            out_vals = [_read(env_o, v) for v in outs]
            new_states = [_read(env_d, v) for v in state_out]
            return (out_vals, new_states, env_d) if return_env else (out_vals, new_states)

        return fn, HiddenPerturbation(info.hidden_leaves, reads_old)

    def theta_paths(self) -> List[Tuple[str, ...]]:
        """The parameter paths owning each slot of ``θ`` (:attr:`theta_vars` order)."""
        paths = {r.index: r.param_paths for r in self.graph.hidden_param_op_relations}
        extra = {index: ps for index, _, _, ps in self.extra_ops}
        out = []
        for v in self.theta_vars:
            ri, k = self.theta_owners[v][0]
            out.append(tuple(paths[ri].get(k) or ()) if ri in paths else extra[ri])
        return out

    def theta_slices(self) -> List[slice]:
        """The slice of ``θ`` each operand variable occupies, in :attr:`theta_vars` order."""
        out, start = [], 0
        for n in self._theta_sizes:
            out.append(slice(start, start + n))
            start += n
        return out
