r"""Executors: evaluate one compiled step and the quantities the eligibility traces need.

For every relation ``r`` (``y_r = f_r(x_r, \theta_r)``) and hidden group ``g`` of ``n`` states:

* ``df[r, g]``: shape ``(*unit_shape, n)``, ``df[..., s] = \partial h_s/\partial y_r`` per unit,
  the JVP of the step with respect to ``y_r`` in the direction of ones, along every within-step
  path from ``y_r`` to the group's states that avoids the other trainable ETP ops (a path through
  one is differentiated within the step by the perturbed step, and recorded by the compiler);
* ``D[g]``: shape ``(*unit_shape, n, n)``, ``D[..., s, j] = \partial h_{t,s}/\partial h_{t-1,j}``
  with every trainable ETP output held fixed (the intrinsic dynamics), one block per unit.

Both are exact per-unit blocks when the intrinsic dynamics and the ``y -> h`` paths are
element-wise (the compiler warns otherwise; a mixing path contributes its row sums).

:class:`ETraceVjpGraphExecutor` adds the step as a ``jax.custom_vjp`` function whose backward
pass hands ``\partial L/\partial h_t`` to an algorithm-specific *solve* and routes the result to
the parameters that own each relation's trainable operands; the step's outputs see the direct
paths (an ETP output or a previous hidden value read without the stored new state) as described
in :func:`~braintrace.add_hidden_perturbation_in_module`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from braintrace._compatible_imports import Literal, bind_equation, consts_of
from braintrace._compiler.graph import ETraceGraph, HiddenGroup
from braintrace._compiler.jaxpr_tools import eval_jaxpr_hooked, is_trainable_etp_eqn, live_towards
from braintrace._compiler.perturbation import add_hidden_perturbation_in_module
from braintrace._compiler.plain_matmul import bind_plain_matmul, is_plain_matmul

__all__ = ["ETraceGraphExecutor", "ETraceVjpGraphExecutor", "StepValues", "add_relation_grads"]


def _read(env, v):
    return v.val if isinstance(v, Literal) else env[v]


class StepValues:
    """Per-step values of the relations: ``x``, ``y``, trainable operands, ``df`` and ``D``.

    ``point`` is ``(state_leaves, arg_leaves)`` of the step (gradients stopped) for algorithms that
    differentiate the whole step themselves (the influence-matrix algorithms); ``None`` otherwise.
    """

    def __init__(self, xs, weights, aux, df, d, point=None):
        self.xs = xs  # relation -> x value (or None)
        self.weights = weights  # relation -> {key: value}
        self.aux = aux  # relation -> tuple of aux operands (sparse index arrays)
        self.df = df  # (relation, group position) -> (*unit, n)
        self.d = d  # group index -> (*unit, n, n)
        self.point = point  # (state_leaves, arg_leaves) or None

    def as_tuple(self):
        """The fields as a pytree (``StepValues(*values.as_tuple())`` rebuilds it)."""
        return (self.xs, self.weights, self.aux, self.df, self.d, self.point)


class ETraceGraphExecutor:
    """Evaluates the step of an :class:`~braintrace.ETraceGraph` and its hidden Jacobians."""

    def __init__(self, graph: ETraceGraph):
        self.graph = graph
        info = graph.module_info
        self.info = info
        self.jaxpr = info.jaxpr
        self.consts = consts_of(info.closed_jaxpr)
        self.cut_eqns = [i for i, e in enumerate(self.jaxpr.eqns) if is_trainable_etp_eqn(e)]
        self.state_out = info.state_outvars()

    # -- plain evaluation ---------------------------------------------------------------------
    def evaluate(self, state_leaves, arg_leaves, eqn_hook=None):
        """``(out_leaves, new_state_leaves, env)`` of one step."""
        outs, env = eval_jaxpr_hooked(
            self.jaxpr, self.consts, [*state_leaves, *arg_leaves], eqn_hook=eqn_hook
        )
        n = self.info.num_out_leaves
        return outs[:n], outs[n:], env

    def _hidden_values(self, outs_states, group: HiddenGroup):
        vals = []
        for h in group.hidden_leaves:
            v = outs_states[h.leaf]
            vals.append(v if h.slot is None else v[..., h.slot])
        return vals

    # -- Jacobians ----------------------------------------------------------------------------
    def step_values(self, state_leaves, arg_leaves, env=None) -> StepValues:
        """Everything the trace updates need, computed without gradients.

        ``env`` (variable -> value) is an evaluation of this step at the same inputs that the caller
        already has (the perturbed pass's); without it the step is evaluated here.
        """
        graph = self.graph
        state_leaves = [jax.lax.stop_gradient(s) for s in state_leaves]
        arg_leaves = [jax.lax.stop_gradient(a) for a in arg_leaves]
        if env is None:
            _, _, env = self.evaluate(state_leaves, arg_leaves)
        else:
            env = _StoppedEnv(env)
        cut_vals = [env[self.jaxpr.eqns[i].outvars[0]] for i in self.cut_eqns]
        hidden_in = [state_leaves[h.leaf] for h in self.info.hidden_leaves]
        leaf_ids = [(h.leaf, h.slot) for h in self.info.hidden_leaves]
        cut_pos = {eqn_i: k for k, eqn_i in enumerate(self.cut_eqns)}

        def g_fn(hidden_vals, ys):
            # state leaves with hidden values substituted (slots of a group state share a leaf).
            leaves = list(state_leaves)
            for (leaf, slot), val in zip(leaf_ids, hidden_vals):
                leaves[leaf] = val if slot is None else leaves[leaf].at[..., slot].set(val[..., slot])

            def hook(i, eqn, invals):
                k = cut_pos.get(i)
                if k is None:
                    return None
                outs = bind_equation(eqn, invals)
                outs[0] = ys[k]
                return outs

            _, new_states, _ = self.evaluate(leaves, arg_leaves, eqn_hook=hook)
            return new_states

        primals = (hidden_in, cut_vals)
        _, lin = jax.linearize(g_fn, *primals)
        zero_h = [jnp.zeros_like(h) for h in hidden_in]
        zero_y = [jnp.zeros_like(y) for y in cut_vals]

        d = {}
        for g in graph.hidden_groups:
            cols = []
            for hj in g.hidden_leaves:
                k = self.info.hidden_leaves.index(hj)
                th = list(zero_h)
                one = jnp.ones(hj.shape, hj.dtype)
                th[k] = one if hj.slot is None else jnp.zeros_like(hidden_in[k]).at[..., hj.slot].set(one)
                # every hidden leaf sharing the same state leaf carries the same tangent slot
                for k2, hk in enumerate(self.info.hidden_leaves):
                    if k2 != k and hk.leaf == hj.leaf:
                        th[k2] = th[k]
                out = lin(th, zero_y)
                cols.append(jnp.stack(self._hidden_values(out, g), axis=-1))  # (*unit, n) over s
            d[g.index] = jnp.stack(cols, axis=-1)  # (*unit, n_s, n_j)

        df, xs, weights, aux = {}, {}, {}, {}
        for r in graph.hidden_param_op_relations:
            k = cut_pos.get(r.eqn_index)
            if k is None:  # a gradient-enabled relation (element_wise): perturb its output
                ty = self._jvp_gradient_enabled(state_leaves, arg_leaves, r, env)
            else:
                ty_list = list(zero_y)
                ty_list[k] = jnp.ones_like(cut_vals[k])
                ty = lin(zero_h, ty_list)
            for gi, g in enumerate(r.hidden_groups):
                df[(r.index, gi)] = jnp.stack(self._hidden_values(ty, g), axis=-1)
            xs[r.index] = _read(env, r.x_var) if r.x_var is not None else None
            weights[r.index] = {key: _read(env, v) for key, v in r.trainable_vars.items()}
            aux[r.index] = tuple(_read(env, v) for v in r.aux_vars)
        return StepValues(xs, weights, aux, df, d)

    def _jvp_gradient_enabled(self, state_leaves, arg_leaves, relation, env):
        """``dh/dy`` for a relation whose primitive is walked through (its y is not cut)."""
        y0 = env[relation.y_var]
        cut = set(self.cut_eqns)
        cut_outs = {i: env[self.jaxpr.eqns[i].outvars[0]] for i in cut}

        def fn(y):
            def hook(i, eqn, invals):
                if i == relation.eqn_index:
                    outs = bind_equation(eqn, invals)
                    outs[0] = y
                    return outs
                if i in cut:
                    outs = bind_equation(eqn, invals)
                    outs[0] = cut_outs[i]
                    return outs
                return None

            _, new_states, _ = self.evaluate(state_leaves, arg_leaves, eqn_hook=hook)
            return new_states

        return jax.jvp(fn, (y0,), (jnp.ones_like(y0),))[1]


class ETraceVjpGraphExecutor(ETraceGraphExecutor):
    """Adds :meth:`call`: the step as a ``custom_vjp`` function with an online backward pass.

    ``solve(trace_data, cts, weights, aux) -> {relation index: {key: grad}}`` receives
    ``cts[(relation, group position)]`` of shape ``(*unit, n)`` (``dL/dh`` of the group's states).
    """

    def __init__(self, graph: ETraceGraph, solve: Callable):
        super().__init__(graph)
        self.solve = solve
        #: ``perturbed(state_leaves, arg_leaves, perturbation) -> (out_leaves, new_state_leaves)``:
        #: the step with a perturbation added to every hidden state's new value and the trainable
        #: operands of the relations cut from the gradient (the traces carry their paths).
        self.perturbed, self.perturbation = self._perturbed_step()
        self._call = self._make_call()

    def _perturbed_step(self):
        """``(perturbed, perturbation)`` as :func:`~braintrace.add_hidden_perturbation_in_module`
        returns them: a perturbation reaches other hidden states of the same step only through
        trainable ETP ops (the per-unit traces carry the other paths). Algorithms whose traces
        carry every path of the step override it. The step's plain matrix products are bound with
        the VJP of :func:`~braintrace._compiler.plain_matmul.bind_plain_matmul` (the same gradient;
        on the CPU, the weight's in one fusion)."""
        rel_eqns = {r.eqn_index: r for r in self.graph.hidden_param_op_relations}

        def stop_trainables(i, eqn, invals):
            r = rel_eqns.get(i)
            if r is None:  # not a relation; a plain x @ W gets the VJP of bind_plain_matmul
                return bind_plain_matmul(eqn, invals) if is_plain_matmul(eqn) else None
            invals = list(invals)
            for idx in r.trainable_invar_indices.values():
                invals[idx] = jax.lax.stop_gradient(invals[idx])
            return bind_equation(eqn, invals)

        return add_hidden_perturbation_in_module(self.info, stop_trainables, rel_eqns.keys())

    def _trainable_values(self, state_leaves, arg_leaves):
        return self.relation_operands(state_leaves, arg_leaves)[0]

    @property
    def reads_old(self) -> bool:
        """Whether the step's outputs read a hidden state's previous value other than through its
        new value: then the gradient also contracts the previous step's traces (see
        :func:`~braintrace.add_hidden_perturbation_in_module`)."""
        return self.perturbation.reads_old

    def relation_operands(self, state_leaves, arg_leaves):
        """``(weights, aux)``: every relation's trainable and auxiliary operands at these inputs
        (differentiable with respect to ``state_leaves``)."""
        _, _, env = self.evaluate(state_leaves, arg_leaves)
        relations = self.graph.hidden_param_op_relations
        weights = {r.index: {k: _read(env, v) for k, v in r.trainable_vars.items()} for r in relations}
        return weights, {r.index: tuple(_read(env, v) for v in r.aux_vars) for r in relations}

    def group_cotangents(self, d_perturbation, keep=None):
        """``{(relation, group position): dL/dh (*unit, n)}`` from the perturbations' gradients;
        with ``keep`` (group index -> 0/1 per unit, see the algorithms' restart), times ``keep``:
        the cotangents contracted with traces from before a restart."""
        hidden = self.info.hidden_leaves
        out = {}
        for r in self.graph.hidden_param_op_relations:
            for gi, g in enumerate(r.hidden_groups):
                ct = jnp.stack([d_perturbation[hidden.index(h)] for h in g.hidden_leaves], axis=-1)
                if keep is not None:
                    ct = ct * jnp.asarray(keep[g.index], ct.dtype)[..., None]
                out[(r.index, gi)] = ct
        return out

    def route_to_states(self, state_leaves, arg_leaves, relation_grads, weights):
        """Pull the relations' operand gradients back to the state leaves they are computed from."""
        _, vjp_t = jax.vjp(lambda s: self._trainable_values(s, arg_leaves), list(state_leaves))
        return vjp_t(self._operand_cotangents(relation_grads, weights))[0]

    def _operand_cotangents(self, relation_grads, weights, relations=None):
        """``relation_grads`` in the dtype of each trainable operand, for every relation and key (of
        ``relations``, default all); a key without a gradient gets zeros."""
        relations = self.graph.hidden_param_op_relations if relations is None else relations
        out = {}
        for r in relations:
            got = relation_grads.get(r.index, {})
            out[r.index] = {}
            for k in r.trainable_vars:
                w = weights[r.index][k]
                g = got.get(k)
                out[r.index][k] = jnp.zeros_like(w) if g is None else jnp.asarray(g, jnp.result_type(w))
        return out

    # -- operands that stay fixed over a sequence ---------------------------------------------
    def constant_operand_relations(self):
        """The relations whose trainable and auxiliary operands depend only on states the step
        never writes (parameters, index arrays) and on no input: over one sequence they are the
        same at every step, so gradients with respect to them can be summed over steps before
        they are routed to the states (:meth:`constant_operands`)."""
        if not hasattr(self, "_constant_operand_relations"):
            info = self.info
            fixed = {
                v for leaf, v in enumerate(info.state_invars()) if not info.written[info.leaf_owner(leaf)]
            }
            invars = set(self.jaxpr.invars)
            found = []
            for r in self.graph.hidden_param_op_relations:
                targets = [*r.trainable_vars.values(), *r.aux_vars]
                slice_ = live_towards(self.jaxpr, targets)
                if all(v in fixed for v in slice_ if v in invars):
                    found.append(r)
            self._constant_operand_relations = tuple(found)
        return self._constant_operand_relations

    def constant_operands(self, state_leaves, relations):
        """``(weights, aux, route)`` of ``relations`` (see :meth:`constant_operand_relations`),
        computed from ``state_leaves`` alone by evaluating only the equations they depend on.
        ``route(relation_grads)`` is :meth:`route_to_states` for these operands: since they are the
        same at every step, ``relation_grads`` may be a sum over many steps."""
        targets = [v for r in relations for v in (*r.trainable_vars.values(), *r.aux_vars)]
        live = live_towards(self.jaxpr, targets)

        def skip(i, eqn, invals):  # equations the operands do not need are not evaluated
            return None if any(v in live for v in eqn.outvars) else [None] * len(eqn.outvars)

        def operands(leaves):
            args = [None] * (len(self.jaxpr.invars) - len(leaves))
            _, env = eval_jaxpr_hooked(self.jaxpr, self.consts, [*leaves, *args], eqn_hook=skip)
            weights = {r.index: {k: _read(env, v) for k, v in r.trainable_vars.items()} for r in relations}
            return weights, {r.index: tuple(_read(env, v) for v in r.aux_vars) for r in relations}

        weights, vjp_t, aux = jax.vjp(operands, list(state_leaves), has_aux=True)

        def route(relation_grads):
            return vjp_t(self._operand_cotangents(relation_grads, weights, relations))[0]

        return weights, aux, route

    def _make_call(self):
        perturbed = self.perturbed
        reads_old = self.reads_old
        zeros_old = lambda: self.perturbation.zeros() if reads_old else None

        @jax.custom_vjp
        def call(state_leaves, arg_leaves, trace_data, weights, aux):
            return perturbed(state_leaves, arg_leaves, self.perturbation.zeros(), zeros_old())

        def fwd(state_leaves, arg_leaves, trace_data, weights, aux):
            (outs, new_states), vjp_f = jax.vjp(
                lambda s, a, p, q: perturbed(s, a, p, q),
                state_leaves,
                arg_leaves,
                self.perturbation.zeros(),
                zeros_old(),
            )
            _, vjp_t = jax.vjp(lambda s: self._trainable_values(s, arg_leaves), state_leaves)
            return (outs, new_states), (vjp_f, vjp_t, trace_data, weights, aux)

        def bwd(res, cts):
            vjp_f, vjp_t, (new_traces, old), weights, aux = res
            ct_states, ct_args, ct_perts, ct_old = vjp_f(cts)
            grads = self.solve(new_traces, self.group_cotangents(ct_perts), weights, aux)
            if reads_old:
                old_traces, keep = old
                grads = add_relation_grads(
                    grads, self.solve(old_traces, self.group_cotangents(ct_old, keep), weights, aux)
                )
            (ct_from_relations,) = vjp_t(self._operand_cotangents(grads, weights))
            ct_states = [_add_ct(a, b) for a, b in zip(ct_states, ct_from_relations)]
            zeros = lambda tree: jax.tree.map(_zero_cotangent, tree)
            return ct_states, ct_args, zeros((new_traces, old)), zeros(weights), zeros(aux)

        call.defvjp(fwd, bwd)
        return call

    def call(self, state_leaves, arg_leaves, trace_data, step: StepValues, old_trace_data=None):
        """``(out_leaves, new_state_leaves)`` with the online backward pass attached.

        ``trace_data`` holds the traces after this step's update; ``old_trace_data`` is
        ``(traces before it, keep)``, needed when :attr:`reads_old` (the gradient along paths from
        ``h_{t-1}`` to the outputs that avoid ``h_t`` is their contraction, masked by the restart's
        ``keep``, see :meth:`group_cotangents`).
        """
        traces = (trace_data, old_trace_data if self.reads_old else None)
        return self._call(list(state_leaves), list(arg_leaves), traces, step.weights, step.aux)


def add_relation_grads(a, b):
    """``{relation: {key: gradient}}`` sums: ``a + b``, key by key (either may lack keys)."""
    out = {r: dict(g) for r, g in a.items()}
    for r, g in b.items():
        target = out.setdefault(r, {})
        for k, v in g.items():
            target[k] = v if k not in target else jax.tree.map(jnp.add, target[k], v)
    return out


class _StoppedEnv:
    """A read-only view of an environment whose values are read through ``stop_gradient``."""

    def __init__(self, env):
        self._env = env

    def __getitem__(self, v):
        return jax.lax.stop_gradient(self._env[v])


def _zero_cotangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    import numpy as np

    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def _add_ct(a, b):
    if getattr(a, "dtype", None) == jax.dtypes.float0:
        return a
    if getattr(b, "dtype", None) == jax.dtypes.float0:
        return a
    return a + b
