"""Algorithms whose gradient arrives through a ``custom_vjp`` step: the trace bookkeeping they
share (restarts after a reset, ``D``'s preparation, the single-step and multi-step rules, the step
of the sequence driver); D-RTRL and pp_prop define their trace layouts on top of it."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import brainstate
import jax
import jax.numpy as jnp

from braintrace._compiler.diagnostics import CompilationError
from braintrace._input_data import (
    MultiStepData,
    get_single_step_data,
    has_multistep_data,
    split_window,
    window_length,
)

from .base import EligibilityTrace, ETraceAlgorithm, add_param_grads
from .executor import ETraceVjpGraphExecutor, StepValues, _zero_cotangent, add_relation_grads

__all__ = ["ETraceVjpAlgorithm"]


def _spectral_radius(d):
    """Per unit, the spectral radius of the ``n x n`` blocks ``d`` ``(..., n, n)``: exact for
    ``n <= 2`` (closed form), the spectral norm (an upper bound) above."""
    n = d.shape[-1]
    if n == 1:
        return jnp.abs(d[..., 0, 0])
    if n == 2:
        half = 0.5 * (d[..., 0, 0] + d[..., 1, 1])
        det = d[..., 0, 0] * d[..., 1, 1] - d[..., 0, 1] * d[..., 1, 0]
        disc = half * half - det
        root = jnp.sqrt(jnp.abs(disc))
        real = jnp.maximum(jnp.abs(half + root), jnp.abs(half - root))
        return jnp.where(disc >= 0, real, jnp.sqrt(jnp.abs(det)))
    return jnp.linalg.norm(d, ord=2, axis=(-2, -1))


def _scaled(traces: Dict, keep) -> Dict:
    """Every leaf of ``traces`` (but the ``epoch`` counter) times ``keep`` (0 or 1)."""
    return {
        k: v if k == "epoch" else jax.tree.map(lambda t: t * keep.astype(t.dtype), v)
        for k, v in traces.items()
    }


def _through_traces(alg, hidden, weights, traces, aux, keep):
    r"""``hidden`` unchanged; in reverse mode, its cotangent (``dL/dh`` at a window's start) is
    contracted with ``traces`` (the algorithm's :math:`\partial h/\partial\theta`, masked by a
    restart's ``keep``) and sent to the relations' trainable operands ``weights``."""

    @jax.custom_vjp
    def identity(hidden, weights, traces, aux, keep):
        return hidden

    def fwd(hidden, weights, traces, aux, keep):
        return hidden, (weights, traces, aux, keep)

    def bwd(res, cts):
        weights, traces, aux, keep = res
        info = alg.graph.module_info
        per_leaf = dict(zip(alg._hidden_leaf_ids, cts))
        per_hidden = [
            per_leaf[h.leaf] if h.slot is None else per_leaf[h.leaf][..., h.slot] for h in info.hidden_leaves
        ]
        grads = alg._solve(traces, alg.executor.group_cotangents(per_hidden, keep), weights, aux)
        zeros = lambda tree: jax.tree.map(_zero_cotangent, tree)
        return cts, alg.executor._operand_cotangents(grads, weights), zeros(traces), zeros(aux), zeros(keep)

    identity.defvjp(fwd, bwd)
    return identity(hidden, weights, traces, aux, keep)


class ETraceVjpAlgorithm(ETraceAlgorithm):
    r"""An algorithm whose gradient arrives through a ``custom_vjp`` step (see the executor).

    Subclasses define the trace layout: :meth:`_init_trace_values`, :meth:`_update_traces`
    (returns the new traces, passed to :meth:`_solve` in the backward pass) and :meth:`_solve`.

    Parameters
    ----------
    model : brainstate.nn.Module
    name : str, optional
    vjp_method : ``'single-step'`` or ``'multi-step'``
        How the learning signal reaches the traces. ``'single-step'``: each step's
        :math:`\partial L_t/\partial h_t` is contracted with that step's traces. ``'multi-step'``:
        the algorithm is called with a window of ``K`` steps (``alg(braintrace.MultiStepData(xs))``,
        ``xs`` of shape ``(K, ...)``); the gradient of the window's loss is exact inside the window
        (reverse mode through its ``K`` steps, every parameter) and the credit from before the
        window is the exact :math:`\partial L_{window}/\partial h_{t_0}` contracted with the traces
        at the window's start :math:`t_0`. A window covering the sequence gives BPTT; ``K = 1``
        gives the single-step gradient where the intrinsic dynamics ``D`` are the whole recurrence
        (with recurrent ETP weights, ``K = 1`` also counts their one-step path, which the
        single-step rule drops).
    fast_solve : bool
        Accepted for code written for the 0.2 releases; the closed-form contractions of the built-in
        primitives are always used here, so it changes nothing.
    normalize_matrix_spectrum : bool
        Rescale each unit's hidden Jacobian block to spectral radius at most 1 before it multiplies
        the traces: :math:`D \leftarrow D / \max(1, \rho(D))` with :math:`\rho` exact for one or two
        states per unit and the spectral norm (an upper bound of it) for more. Keeps the traces
        bounded for unstable dynamics; the gradient is then no longer the algorithm's exact one
        where :math:`\rho(D) > 1`.
    mode : brainstate.mixin.Mode, optional
        Accepted for code written for the 0.2 releases (``brainstate.mixin.Batching()``).
    control_flow, config, random_feedback_key
        Keywords of newer published releases; ``None`` (the default) is accepted, anything else
        raises ``NotImplementedError`` naming the keyword.
    """

    def __init__(
        self,
        model,
        name: Optional[str] = None,
        vjp_method: str = "single-step",
        fast_solve: bool = True,
        normalize_matrix_spectrum: bool = False,
        mode=None,
        control_flow=None,
        config=None,
        random_feedback_key=None,
    ):
        super().__init__(model, name=name, mode=mode)
        for key, value in (
            ("control_flow", control_flow),
            ("config", config),
            ("random_feedback_key", random_feedback_key),
        ):
            if value is not None:
                raise NotImplementedError(
                    f"{type(self).__name__}: `{key}` selects a control-flow policy or learning-rule axes of "
                    f"newer published releases, which this package does not provide; leave it None."
                )
        if vjp_method not in ("single-step", "multi-step"):
            raise ValueError(f"`vjp_method` must be 'single-step' or 'multi-step', got {vjp_method!r}.")
        for key, value in (
            ("fast_solve", fast_solve),
            ("normalize_matrix_spectrum", normalize_matrix_spectrum),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"`{key}` must be a bool, got {value!r}.")
        self.vjp_method = vjp_method
        self.fast_solve = fast_solve
        self.normalize_matrix_spectrum = normalize_matrix_spectrum

    def _build(self):
        self.executor = self._make_executor()
        self.etrace = EligibilityTrace({**self._init_trace_values(), "epoch": jnp.zeros((), jnp.int32)})
        info = self.graph.module_info
        self._hidden_leaf_ids = tuple(sorted({h.leaf for h in info.hidden_leaves}))
        leaves = jax.tree.leaves([s.value for s in info.states])
        #: The hidden values this algorithm last wrote: a step that finds other values (the model
        #: was reset, ``brainstate.nn.reset_all_states``, or its states were set by hand) restarts
        #: the traces, which describe how the old values depended on the parameters.
        self.hidden_seen = brainstate.ShortTermState([leaves[i] for i in self._hidden_leaf_ids])

    def _make_executor(self) -> ETraceVjpGraphExecutor:
        """The executor of the compiled graph; algorithms that evaluate the step differently (the
        influence-matrix algorithms differentiate the whole step) return their own subclass."""
        return ETraceVjpGraphExecutor(self.graph, self._solve)

    def _restart_if_reset(self, traces, state_leaves, step: Optional[StepValues] = None):
        """``(traces, keep)`` at the start of a step, where the hidden states may differ from the
        values the previous step wrote (a reset, values set by hand): such a state no longer depends
        on the parameters as its traces say, so they restart.

        ``keep`` maps each hidden group's index to a 0/1 array broadcastable to its unit shape. With
        :attr:`_restarts_per_unit` it is per unit: 0 exactly where a state of the group changed (a
        reset of some batch rows restarts those rows only); otherwise it is one scalar, 0 when any
        hidden value changed. Traces that propagate through ``D`` restart through ``D`` (scaled by
        ``keep`` in ``step``), with no pass over them; the other leaves are scaled by
        :meth:`_restart_undecayed` (with the scalar). Without ``step`` (a window's start), the caller
        scales its first step's ``D`` and masks the cotangents it contracts with the traces
        (``executor.group_cotangents(..., keep)``).
        """
        stale = jnp.zeros((), bool)
        if self._epoch:  # the model's states were re-created since the traces were last written
            stale = traces["epoch"] != self._epoch
            traces = {**traces, "epoch": jnp.asarray(self._epoch, jnp.int32)}
        changed = {}
        for leaf, seen in zip(self._hidden_leaf_ids, self.hidden_seen.value):
            now = jax.lax.stop_gradient(state_leaves[leaf])
            changed[leaf] = (now != seen) & ~(jnp.isnan(now) & jnp.isnan(seen))
        any_changed = stale | jnp.any(jnp.stack([jnp.any(c) for c in changed.values()]))
        keep_all = 1 - any_changed.astype(jnp.int32)
        keep = {}
        for g in self.graph.hidden_groups:
            if self._restarts_per_unit():
                unit = stale
                for h in g.hidden_leaves:
                    c = changed[h.leaf]
                    unit = unit | (c if h.slot is None else c[..., h.slot])
                keep[g.index] = 1 - unit.astype(jnp.int32)
            else:
                keep[g.index] = keep_all
        if step is not None:
            self._prepare_jacobians(step, keep)
        body = self._restart_undecayed({k: v for k, v in traces.items() if k != "epoch"}, keep_all)
        return {**body, "epoch": traces["epoch"]}, keep

    def _restarts_per_unit(self) -> bool:
        """Whether every trace leaf propagates through ``D``, so that a restart can be per unit
        (scaling ``D`` per unit); otherwise one changed state restarts every trace."""
        return False

    def _prepare_jacobians(self, step: StepValues, keep=None):
        """``step.d`` as the traces use it: with ``normalize_matrix_spectrum``, rescaled to spectral
        radius at most 1 per unit, and times ``keep`` (a restart, see :meth:`_restart_if_reset`)."""
        d = step.d
        if self.normalize_matrix_spectrum:
            d = {g: v / jnp.maximum(1.0, _spectral_radius(v))[..., None, None] for g, v in d.items()}
        if keep is not None:
            d = {g: v * jnp.asarray(keep[g], v.dtype)[..., None, None] for g, v in d.items()}
        step.d = d

    def _restart_undecayed(self, traces: Dict, keep) -> Dict:
        """``traces`` with the leaves that do not propagate through ``D`` multiplied by ``keep``;
        this default multiplies every leaf (algorithms whose large traces all go through ``D``
        override it, so a restart check adds no pass over them)."""
        return _scaled(traces, keep)

    def _remember_hidden(self, new_state_leaves):
        self.hidden_seen.value = [jax.lax.stop_gradient(new_state_leaves[i]) for i in self._hidden_leaf_ids]

    def _reset_traces(self):
        self.etrace.value = {
            **jax.tree.map(jnp.zeros_like, self.etrace.value),
            "epoch": jnp.asarray(self._epoch, jnp.int32),
        }

    def _init_trace_values(self) -> Dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update_traces(self, traces: Dict, step: StepValues) -> Dict:  # pragma: no cover
        raise NotImplementedError

    def _solve(self, traces, cts, weights, aux):  # pragma: no cover - abstract
        raise NotImplementedError

    def _update_and_solve(self, traces: Dict, step: StepValues, cts) -> Tuple[Dict, Dict]:
        """``(new traces, relation gradients)``: :meth:`_update_traces`, then :meth:`_solve` of the
        new traces. Algorithms with fused trace operations override it (one pass per trace)."""
        new = self._update_traces(traces, step)
        return new, self._solve(new, cts, step.weights, step.aux)

    def _write_states(self, states, new_state_leaves):
        info = self.graph.module_info
        new_values = jax.tree.unflatten(info.state_treedef, new_state_leaves)
        for s, v, w in zip(states, new_values, info.written):
            if w:
                s.value = v

    def _step(self, *inputs):
        info = self.graph.module_info
        states, state_leaves = self._current_states()
        arg_leaves = jax.tree.leaves(inputs)
        step = self.executor.step_values(state_leaves, arg_leaves)
        old, keep = self._restart_if_reset(self.etrace.value, state_leaves, step)
        new_traces = jax.lax.stop_gradient(self._update_traces(old, step))
        new_traces["epoch"] = old["epoch"]
        old_traces = (jax.lax.stop_gradient(old), keep) if self.executor.reads_old else None
        outs, new_state_leaves = self.executor.call(state_leaves, arg_leaves, new_traces, step, old_traces)
        self.etrace.value = new_traces
        self._remember_hidden(new_state_leaves)
        self._write_states(states, new_state_leaves)
        return jax.tree.unflatten(info.out_treedef, outs)

    def update(self, *inputs):
        """Run one step (or, with :class:`~braintrace.MultiStepData`, a window of steps).

        Under ``vjp_method='multi-step'`` every call is a window (of one step for inputs without
        :class:`~braintrace.MultiStepData`, whose output is then not stacked), see the class
        docstring; under ``'single-step'`` a window is ``K`` single steps."""
        if self.vjp_method == "single-step" or not self.is_compiled:
            return super().update(*inputs)
        self._count_call()
        windowed = has_multistep_data(*inputs)
        if windowed:
            window_length(*inputs)  # one length for every MultiStepData leaf
        one = get_single_step_data(*inputs)
        self.follow_shapes(*one)
        self._check_inputs(one)
        if windowed:
            return self._window(inputs, stacked=True)
        return self._window((MultiStepData(jax.tree.map(lambda a: a[None], one)),), stacked=False)

    def _window(self, inputs, stacked: bool):
        r"""``K`` steps whose gradient is exact inside the window (the multi-step rule).

        The steps are evaluated as plain functions of the states (every path differentiable); the
        hidden values at the window's start enter through an identity whose backward pass sends
        :math:`\partial L/\partial h_{t_0}` through the traces at :math:`t_0` to the parameters
        (:meth:`_solve`). The traces advance by the ``K`` steps' updates on the side.
        """
        info = self.graph.module_info
        ex = self.executor
        leaves, stepped = split_window(*inputs)
        seq = [leaf for leaf, s in zip(leaves, stepped) if s]
        fixed = [leaf for leaf, s in zip(leaves, stepped) if not s]

        def args_at(seq_t):
            it_s, it_f = iter(seq_t), iter(fixed)
            return [next(it_s) if s else next(it_f) for s in stepped]

        states, state_leaves = self._current_states()
        traces0, keep = self._restart_if_reset(self.etrace.value, state_leaves)
        traces0 = jax.lax.stop_gradient(traces0)
        first = args_at([a[0] for a in seq])
        weights, aux = ex.relation_operands(state_leaves, first)
        hidden_ids = self._hidden_leaf_ids
        start = _through_traces(self, [state_leaves[i] for i in hidden_ids], weights, traces0, aux, keep)
        leaves0 = list(state_leaves)
        for i, v in zip(hidden_ids, start):
            leaves0[i] = v

        def body(carry, seq_t):
            cur, traces, keep_t = carry  # the restart's keep at the first step, ones after it
            args_t = args_at(seq_t)
            outs, new, env = ex.evaluate(cur, args_t)
            step = ex.step_values(cur, args_t, env=env)
            self._prepare_jacobians(step, keep_t)
            new_traces = jax.lax.stop_gradient(self._update_traces(traces, step))
            new_traces["epoch"] = traces["epoch"]
            return (new, new_traces, jax.tree.map(jnp.ones_like, keep_t)), outs

        (final, traces, _), outs = jax.lax.scan(body, (leaves0, traces0, keep), seq)
        self.etrace.value = traces
        self._remember_hidden(final)
        self._write_states(states, final)
        if not stacked:
            outs = [o[0] for o in outs]
        return jax.tree.unflatten(info.out_treedef, outs)

    def _step_grad(self, step_fn, params, inputs, targets, factored=False):
        r"""One step of the sequence driver: ``(gradients keyed like params, loss)``; with
        ``factored``, ``(gradients, factors, loss)`` where the gradients of
        :meth:`_factored_relations` are left out and returned as factors (see
        :meth:`_factored_param_grads`).

        Equal to ``brainstate.transform.grad`` of ``step_fn(self(*inputs), *targets)`` with respect
        to ``params``, computed in another order: :math:`\partial L_t/\partial h_t` comes first (the
        gradient with respect to the hidden perturbations, together with the within-step gradient of
        the parameters), so the trace update and the solve of the new trace run together, in one pass
        over each trace, instead of the update in the forward pass and the solve in the backward.
        """
        self._check_inputs(inputs)
        info = self.graph.module_info
        ex = self.executor
        arg_leaves = jax.tree.leaves(inputs)

        def loss_fn(perturbations):
            states, state_leaves = self._current_states()
            outs, new_state_leaves, env = ex.perturbed(
                state_leaves, arg_leaves, *perturbations, return_env=True
            )
            step = ex.step_values(state_leaves, arg_leaves, env=env)  # no second evaluation of the step
            self._write_states(states, new_state_leaves)
            loss = step_fn(jax.tree.unflatten(info.out_treedef, outs), *targets)
            return loss, (step.as_tuple(), [jax.lax.stop_gradient(v) for v in state_leaves])

        grad_fn = brainstate.transform.grad(loss_fn, params, argnums=0, has_aux=True, return_value=True)
        zeros_old = ex.perturbation.zeros() if ex.reads_old else None
        (grads, (d_perturbation, d_old)), loss, (step, state_leaves) = grad_fn(
            (ex.perturbation.zeros(), zeros_old)
        )
        step = StepValues(*step)
        old, keep = self._restart_if_reset(self.etrace.value, state_leaves, step)
        cts = ex.group_cotangents(d_perturbation)
        if factored:
            new_traces, relation_grads, factors = self._update_solve_factored(old, step, cts)
        else:
            new_traces, relation_grads = self._update_and_solve(old, step, cts)
        if ex.reads_old:  # paths h_(t-1) -> L_t that avoid h_t: the previous traces, in full
            relation_grads = add_relation_grads(
                relation_grads,
                self._solve(old, ex.group_cotangents(d_old, keep), step.weights, step.aux),
            )
        new_traces = jax.lax.stop_gradient(new_traces)
        new_traces["epoch"] = old["epoch"]
        self.etrace.value = new_traces
        routed = ex.route_to_states(state_leaves, arg_leaves, relation_grads, step.weights)
        states, new_state_leaves = self._current_states()
        self._remember_hidden(new_state_leaves)
        grads = add_param_grads(grads, self._param_cotangents(states, params, routed))
        return (grads, factors, loss) if factored else (grads, loss)

    # weight gradients formed once per block of steps -------------------------------------------
    def _factored_relations(self) -> Tuple:
        """Relations whose gradient the algorithm can form once from factors stacked over many
        steps (``etrace_grad(..., solve_every=K)``); none by default."""
        return ()

    def _update_solve_factored(self, traces, step: StepValues, cts):  # pragma: no cover - abstract
        raise NotImplementedError

    def _solve_factors(self, relations, factors, weights, aux):  # pragma: no cover - abstract
        raise NotImplementedError

    def _factored_param_grads(self, params, factors) -> Dict:
        """Gradients keyed like ``params`` from ``factors`` stacked over steps (leading axis)."""
        relations = [r for r in self._factored_relations() if r.index in factors]
        if not relations:
            return {}
        states, state_leaves = self._current_states()
        weights, aux, route = self.executor.constant_operands(state_leaves, relations)
        relation_grads = self._solve_factors(relations, factors, weights, aux)
        return self._param_cotangents(states, params, route(relation_grads))

    def _param_cotangents(self, states, params, leaf_cts):
        """Cotangents of the state leaves, regrouped per parameter of ``params`` (by key)."""
        info = self.graph.module_info
        key_of = {id(s): k for k, s in params.items()}
        per_state = {}
        for leaf, ct in enumerate(leaf_cts):
            per_state.setdefault(info.leaf_owner(leaf), []).append(ct)
        out = {}
        for i, cts in per_state.items():
            key = key_of.get(id(states[i]))
            if key is not None and not any(getattr(c, "dtype", None) == jax.dtypes.float0 for c in cts):
                out[key] = jax.tree.unflatten(jax.tree.structure(states[i].value), cts)
        return out

    def relation_weight_vars(self, relation):
        return {k: v for k, v in relation.trainable_vars.items()}

    def _check_graph(self):
        if not self.graph.hidden_param_op_relations:  # pragma: no cover - compile raises first
            raise CompilationError("no relation")
