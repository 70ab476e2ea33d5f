"""Algorithms whose gradient arrives through a ``custom_vjp`` step: the trace bookkeeping they
share (restarts after a reset, ``D``'s preparation, the single-step and multi-step rules, the step
of the sequence driver); D-RTRL and pp_prop define their trace layouts on top of it."""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Optional, Tuple

import brainstate
import jax
import jax.numpy as jnp
import saiunit as u

from braintrace._compatible_imports import Literal
from braintrace._compiler.control_flow_policy import check_control_flow_policy
from braintrace._compiler.diagnostics import (
    CompilationError,
    CompilationRecord,
    DiagnosticKind,
    DiagnosticLevel,
    ETraceCompilationWarning,
)
from braintrace._etrace_op._registries import ETP_X_INVAR_INDICES
from braintrace._input_data import (
    MultiStepData,
    get_single_step_data,
    has_multistep_data,
    split_window,
    window_length,
)

from .axes import ETraceConfig
from .base import EligibilityTrace, ETraceAlgorithm, _set_rows, add_param_grads
from .executor import ETraceVjpGraphExecutor, StepValues, _zero_cotangent, add_relation_grads
from .learning_signal import (
    as_prng_key,
    check_modulator,
    expand_modulator,
    feedback_alignment_step,
    random_feedback_operands,
)

__all__ = ["ETraceVjpAlgorithm"]

#: The key of the modulator a step stores with the traces it hands to the backward pass.
_SIGNAL = "signal"


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


def _random_feedback_tap(alg, outs, new_states, state_leaves, arg_leaves, traces, old, weights, aux):
    r"""``(outs, new_states)`` unchanged; in reverse mode, their cotangents are sent through the
    random-feedback step (:func:`~braintrace._algorithm.learning_signal.feedback_alignment_step`),
    the resulting learning signal of the hidden states is contracted with ``traces`` (and, where
    the outputs read previous hidden values, with ``old = (previous traces, keep)``) and the
    relation gradients reach the parameters through ``state_leaves``."""

    @jax.custom_vjp
    def tap(outs, new_states, state_leaves, arg_leaves, traces, old, weights, aux):
        return outs, new_states

    def fwd(outs, new_states, state_leaves, arg_leaves, traces, old, weights, aux):
        return (outs, new_states), (state_leaves, arg_leaves, traces, old, weights, aux)

    def bwd(res, cts):
        state_leaves, arg_leaves, traces, old, weights, aux = res
        ex = alg.executor
        d_new, d_old = alg._feedback_cotangents(state_leaves, arg_leaves, *cts)
        grads = alg._solve(traces, ex.group_cotangents(d_new), weights, aux)
        if old is not None:
            old_traces, keep = old
            old_grads = alg._solve(old_traces, ex.group_cotangents(d_old, keep), weights, aux)
            grads = add_relation_grads(grads, old_grads)
        routed = ex.route_to_states(state_leaves, arg_leaves, grads, weights)
        zeros = lambda tree: jax.tree.map(_zero_cotangent, tree)
        return (*cts, routed, zeros(arg_leaves), zeros(traces), zeros(old), zeros(weights), zeros(aux))

    tap.defvjp(fwd, bwd)
    return tap(outs, new_states, state_leaves, arg_leaves, traces, old, weights, aux)


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
    control_flow : ControlFlowPolicy, optional
        How the compiler treats control flow inside one step (see :class:`~braintrace.ControlFlowPolicy`;
        ``None``: its defaults). Values this compiler does not provide raise ``NotImplementedError``
        naming the field.
    config : ETraceConfig, optional
        The rule's coordinates on the learning-rule axes (see :class:`~braintrace.ETraceConfig`);
        by default the engine's own (symmetric signal, no filter). Its ``trace_factorization``
        must be this engine's (``ValueError`` otherwise; :func:`braintrace.compile` picks the
        engine from a config). ``recurrence_scope='coupled'`` raises ``NotImplementedError``;
        ``'sparse_n'`` and ``'full'`` are the influence-matrix algorithms' (``ValueError``).
    random_feedback_key : JAX PRNG key or int, optional
        The key the fixed random feedback operands are drawn from; required by
        ``learning_signal='random_feedback'`` (and read by it only).

    Notes
    -----
    **Learning signal.** The traces are contracted, in the backward pass of each step, with
    :math:`\partial L_t/\partial h_t` (``'symmetric'``), with the signal of the random-feedback
    backward pass (``'random_feedback'``: every trainable ETP op between the hidden states and the
    outputs uses a fixed random operand, drawn per op from ``random_feedback_key``, in place of
    its weight; :attr:`random_feedback` holds them), or with a modulator (``'modulatory'``:
    ``alg.update(x, modulator=m)`` / ``alg(x, modulator=m)`` for one call, or the standing
    :attr:`modulator`; one array broadcast to every hidden group, see
    :func:`~braintrace._algorithm.learning_signal.expand_modulator`). Under ``'modulatory'`` the
    modulator is the whole learning signal: the contraction of the previous step's traces (for
    outputs reading earlier hidden values) is dropped. The within-step gradient of the
    parameters (every path that does not pass an earlier step) stays exact under every signal.
    Signals other than ``'symmetric'`` need ``vjp_method='single-step'``.
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
        check_control_flow_policy(control_flow)
        #: The :class:`~braintrace.ControlFlowPolicy` the graph is compiled under (``None``: defaults).
        self.control_flow = control_flow
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
        if config is None:
            config = self._default_config()
        self._check_config(config)
        #: The rule's coordinates (:class:`~braintrace.ETraceConfig`).
        self.config = config
        #: ``'symmetric'``, ``'random_feedback'`` or ``'modulatory'``.
        self.learning_signal = config.learning_signal
        if self.learning_signal != "symmetric" and vjp_method != "single-step":
            raise ValueError(
                f"{type(self).__name__}: learning_signal={self.learning_signal!r} needs "
                f"vjp_method='single-step' (the multi-step rule differentiates a window exactly), got "
                f"{vjp_method!r}."
            )
        if self.learning_signal == "random_feedback" and random_feedback_key is None:
            raise ValueError(
                f"{type(self).__name__}: learning_signal='random_feedback' draws its fixed feedback from "
                f"`random_feedback_key`; pass one (jax.random.PRNGKey(0), brainstate.random.split_key())."
            )
        self.random_feedback_key = None if random_feedback_key is None else as_prng_key(random_feedback_key)
        #: ``{equation index: {trainable key: random operand}}`` after compiling, under
        #: ``learning_signal='random_feedback'`` (see :func:`random_feedback_operands`).
        self.random_feedback = None
        self._modulator_state = None
        self._call_modulator = None

    #: The ``trace_factorization`` of the engine's traces.
    _factorization = "per_param"
    #: The ``recurrence_scope`` values the engine computes (the first is its default).
    _scopes = ("diagonal",)

    def _default_config(self) -> ETraceConfig:
        """The engine's config when none is given: its factorization and scope, symmetric signal."""
        return ETraceConfig(trace_factorization=self._factorization, recurrence_scope=self._scopes[0])

    def _check_config(self, config):
        """``config`` is an :class:`ETraceConfig` this engine computes (raises otherwise)."""
        name = type(self).__name__
        if not isinstance(config, ETraceConfig):
            raise TypeError(f"{name}: `config` must be a braintrace.ETraceConfig, got {config!r}.")
        if config.trace_factorization != self._factorization:
            raise ValueError(
                f"{name}: config.trace_factorization={config.trace_factorization!r}, but this engine keeps "
                f"{self._factorization!r} traces; braintrace.compile(model, config, x0) picks the engine "
                f"for a config."
            )
        if config.learning_signal == "bootstrapped":
            raise ValueError(
                f"{name}: config.learning_signal='bootstrapped' (a learned synthetic gradient) is computed "
                f"by braintrace.DNI; braintrace.compile(model, config, x0) picks it."
            )
        if config.recurrence_scope in self._scopes:
            return
        if config.recurrence_scope == "coupled":
            raise NotImplementedError(
                f"{name}: config.recurrence_scope='coupled' (the per-unit block with the recurrent ETP "
                f"weights' coupling) is not computed by this package's engines; they keep the intrinsic "
                f"block ('diagonal'), or the influence matrix (braintrace.RTRL / SnAp)."
            )
        if config.recurrence_scope in ("sparse_n", "full"):
            raise ValueError(
                f"{name}: config.recurrence_scope={config.recurrence_scope!r} keeps an influence matrix: it "
                f"is computed by braintrace.{'SnAp' if config.recurrence_scope == 'sparse_n' else 'RTRL'}, "
                f"not by this engine (braintrace.compile(model, config, x0) picks it)."
            )

    def _recursion_operator(self):
        """``(kind, scale)`` of the operator that carries the traces over a step: ``'jacobian'``
        (``D``), ``'scalar_leak'`` (``scale * I``) or ``'none'`` (0)."""
        rec = self.config.temporal_recursion
        return rec, self.config.decay

    # the learning signal ----------------------------------------------------------------------
    @property
    def modulator(self):
        """The standing modulator of ``learning_signal='modulatory'`` (``None`` until set): used by
        every step called without ``modulator=``. Kept in a ``brainstate`` state, so compiled
        loops read its current value."""
        st = self._modulator_state
        return None if st is None else st.value

    @modulator.setter
    def modulator(self, value):
        if value is None:
            self._modulator_state = None
            return
        if self.learning_signal != "modulatory":
            raise ValueError(self._modulator_misuse())
        value = jnp.asarray(u.get_mantissa(value))
        if self.is_compiled:
            check_modulator(value, self._signal_shapes(), f"{type(self).__name__}: the modulator")
        st = self._modulator_state
        if st is not None and jnp.shape(st.value) == value.shape and st.value.dtype == value.dtype:
            st.value = value
        else:
            self._modulator_state = brainstate.ShortTermState(value)
            self.__dict__.pop("_etrace_grad_cache", None)  # compiled loops read the old state object

    def _modulator_misuse(self):
        return (
            f"{type(self).__name__}: a `modulator` is the learning signal of learning_signal='modulatory' "
            f"(braintrace.ThreeFactor); this algorithm's signal is {self.learning_signal!r}."
        )

    def _signal_shapes(self):
        """``{group description: (*unit, n)}`` for every hidden group."""
        groups = self.graph.hidden_groups
        return {f"the hidden group {list(g.names)}": (*g.shape, g.num_state) for g in groups}

    def _signal_payload(self):
        """What the backward pass needs to form the learning signal besides the cotangents: the
        modulator of this call (``'modulatory'``), else ``None``."""
        if self.learning_signal != "modulatory":
            return None
        m = self._call_modulator if self._call_modulator is not None else self.modulator
        if m is None:
            raise ValueError(
                f"{type(self).__name__}: learning_signal='modulatory' needs a modulator: call "
                f"`alg.update(x, modulator=m)` (or `alg(x, modulator=m)`), or set `alg.modulator = m`."
            )
        return check_modulator(m, self._signal_shapes(), f"{type(self).__name__}: the modulator")

    def _modulated(self, m, cts):
        """The cotangents ``cts`` replaced by the modulator ``m`` (broadcast per group)."""
        return {k: expand_modulator(m, ct.shape).astype(ct.dtype) for k, ct in cts.items()}

    def _signal_solve(self, traces, cts, weights, aux):
        """The executor's solve: the learning signal formed from the cotangents ``cts``
        (``dL/dh``) and, under ``'modulatory'``, the modulator the step stored with its traces,
        contracted with the traces by the layout's :meth:`_solve`."""
        payload = traces.get(_SIGNAL)
        if self.learning_signal == "symmetric":
            return self._solve(traces, cts, weights, aux)
        if self.learning_signal == "modulatory" and payload is not None:
            return self._solve(traces, self._modulated(payload, cts), weights, aux)
        # random feedback arrives through the output tap; the previous traces under a modulator
        # are not contracted (the modulator is the whole signal)
        return {}

    def _feedback_cotangents(self, state_leaves, arg_leaves, out_cts, state_cts=None):
        """``(d_new, d_old)``: the random-feedback learning signal of the hidden states (and of
        their previous values, for outputs reading them) for the output cotangents ``out_cts``
        (``None`` entries: zero) and the new states' cotangents ``state_cts`` (default zero)."""
        pert = self.executor.perturbation
        old0 = pert.zeros() if self.executor.reads_old else None
        (outs, news), vjp = jax.vjp(
            lambda p, q: self._feedback_step(state_leaves, arg_leaves, p, q), pert.zeros(), old0
        )
        out_cts = [_zero_cotangent(o) if c is None else c for c, o in zip(out_cts, outs)]
        state_cts = [_zero_cotangent(n) for n in news] if state_cts is None else list(state_cts)
        return vjp((out_cts, state_cts))

    def _rule_approximations(self):
        """Why this rule's gradient differs from BPTT by its definition, whatever the model: a list
        of reasons (empty for the exact learning signal without a filter). Each becomes one
        ``LEARNING_RULE_APPROXIMATION`` record per traced parameter when the graph is compiled."""
        why = []
        if self.learning_signal == "random_feedback":
            why.append("the learning signal is fixed random feedback in place of dL_t/dh_t")
        elif self.learning_signal == "modulatory":
            why.append("the learning signal is the caller's modulator in place of dL_t/dh_t")
        if self.config.trace_filter == "kappa":
            why.append(f"the eligibility traces are low-pass filtered (kappa={self.config.kappa})")
        return why

    def _record_rule_approximations(self):
        why = self._rule_approximations()
        if not why:
            return
        paths = sorted(
            {p for r in self.graph.hidden_param_op_relations for ps in r.param_paths.values() for p in ps}
        )
        reason = "; ".join(why)
        for path in paths:
            self.graph.records.append(
                CompilationRecord(
                    DiagnosticKind.LEARNING_RULE_APPROXIMATION,
                    DiagnosticLevel.WARNING,
                    f"{type(self).__name__}: the gradient of {path!r} is not BPTT's by this rule's "
                    f"definition: {reason}.",
                    (path,),
                    weight_path=(path,),
                )
            )
        warnings.warn(
            f"{type(self).__name__}: the online gradient of {paths} is not BPTT's by this rule's definition: "
            f"{reason}. One record per parameter in `graph.records`.",
            ETraceCompilationWarning,
            stacklevel=3,
        )

    def _build(self):
        self._record_rule_approximations()
        self.executor = self._make_executor()
        if self.learning_signal == "random_feedback":
            self._build_random_feedback()
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
        return ETraceVjpGraphExecutor(self.graph, self._signal_solve)

    def _build_random_feedback(self):
        """Draw the fixed random operands of the trainable ETP ops whose input depends on a hidden
        value (the ops between the hidden states and the outputs) and build the step that uses them
        in the backward pass."""
        info = self.graph.module_info
        jaxpr = info.jaxpr
        in_vars, out_vars = info.state_invars(), info.state_outvars()
        ends = [v for h in info.hidden_leaves for v in (in_vars[h.leaf], out_vars[h.leaf])]
        reached = {v for v in ends if not isinstance(v, Literal)}
        for eqn in jaxpr.eqns:
            if any((not isinstance(v, Literal)) and v in reached for v in eqn.invars):
                reached.update(eqn.outvars)
        drawn = random_feedback_operands(jaxpr, self.random_feedback_key)
        ops = {}
        for i, o in drawn.items():
            eqn = jaxpr.eqns[i]
            x = eqn.invars[ETP_X_INVAR_INDICES.get(eqn.primitive, 0)]
            if not isinstance(x, Literal) and x in reached:
                ops[i] = o
        if not ops:
            raise ValueError(
                f"{type(self).__name__}: learning_signal='random_feedback' replaces, in the backward pass, "
                f"the weights of the trainable ETP ops that read the hidden states (a read-out), but no "
                f"trainable ETP op of {type(self.model).__name__} reads them: the signal would be the "
                f"symmetric one. "
                f"Route the read-out through braintrace.matmul (braintrace.nn.Linear, LeakyRateReadout)."
            )
        self.random_feedback = ops
        relation_eqns = [r.eqn_index for r in self.graph.hidden_param_op_relations]
        self._feedback_step = feedback_alignment_step(info, ops, relation_eqns)

    def _forget_rows(self, rows):
        """The hidden values last written are marked as never written (NaN, which no state value
        equals) in ``rows``, so the next step restarts those rows' traces even where a state already
        held its initial value (a spiking unit reset to rest at the step before)."""
        forget = lambda v: _set_rows(rows, v, jnp.full_like(v, jnp.nan), "hidden_seen")  # noqa: E731
        self.hidden_seen.value = [forget(v) for v in self.hidden_seen.value]

    #: The restart of the current step when the caller determined it (:meth:`_restart_given`);
    #: ``None``: each step compares the hidden states with the values last written.
    _given_restart = None

    @contextlib.contextmanager
    def _restart_given(self, keep):
        """Within: the steps take ``keep`` (a ``keep`` of :meth:`_restart_if_reset`) as their restart
        instead of comparing the hidden states with the values last written, and leave
        :attr:`hidden_seen` to the caller.

        For a loop whose steps nothing else writes the states between: it checks once before the
        loop (``_restart_if_reset`` without ``step``), passes that ``keep`` to the first step and ones
        to the others, and calls :meth:`_remember_hidden` after the loop. The per-step comparison
        (a few reductions per hidden state) and the copy of the hidden values are then gone from
        the loop's body.
        """
        previous = self._given_restart
        self._given_restart = keep
        try:
            yield
        finally:
            self._given_restart = previous

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

        Under :meth:`_restart_given`, ``keep`` is the given one and the traces are returned as they
        are (the caller restarted them before its loop).
        """
        if self._given_restart is not None:
            keep = self._given_restart
            if step is not None:
                self._prepare_jacobians(step, keep)
            return traces, keep
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
        radius at most 1 per unit; replaced by the config's ``temporal_recursion`` operator when it
        is not ``'jacobian'``; and times ``keep`` (a restart, see :meth:`_restart_if_reset`)."""
        d = step.d
        if self.normalize_matrix_spectrum:
            d = {g: v / jnp.maximum(1.0, _spectral_radius(v))[..., None, None] for g, v in d.items()}
        kind, scale = self._recursion_operator()
        if kind != "jacobian":  # temporal_recursion 'scalar_leak' (scale * I) or 'none' (0)
            scale = 0.0 if kind == "none" else scale
            eye = lambda v: scale * jnp.eye(v.shape[-1], dtype=v.dtype)  # noqa: E731
            d = {g: jnp.broadcast_to(eye(v), v.shape) for g, v in d.items()}
        if keep is not None:
            d = {g: v * jnp.asarray(keep[g], v.dtype)[..., None, None] for g, v in d.items()}
        step.d = d

    def _restart_undecayed(self, traces: Dict, keep) -> Dict:
        """``traces`` with the leaves that do not propagate through ``D`` multiplied by ``keep``;
        this default multiplies every leaf (algorithms whose large traces all go through ``D``
        override it, so a restart check adds no pass over them)."""
        return _scaled(traces, keep)

    def _remember_hidden(self, new_state_leaves):
        if self._given_restart is not None:  # the caller remembers them after its loop
            return
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
        payload = self._signal_payload()
        info = self.graph.module_info
        states, state_leaves = self._current_states()
        arg_leaves = jax.tree.leaves(inputs)
        step = self.executor.step_values(state_leaves, arg_leaves)
        old, keep = self._restart_if_reset(self.etrace.value, state_leaves, step)
        new_traces = jax.lax.stop_gradient(self._update_traces(old, step))
        new_traces["epoch"] = old["epoch"]
        reads_old = self.executor.reads_old
        old = jax.lax.stop_gradient(old)
        data = new_traces if payload is None else {**new_traces, _SIGNAL: payload}
        outs, new_state_leaves = self.executor.call(
            state_leaves, arg_leaves, data, step, (old, keep) if reads_old else None
        )
        if self.learning_signal == "random_feedback":
            outs, new_state_leaves = _random_feedback_tap(
                self,
                outs,
                new_state_leaves,
                state_leaves,
                arg_leaves,
                new_traces,
                (old, keep) if reads_old else None,
                step.weights,
                step.aux,
            )
        self.etrace.value = new_traces
        self._remember_hidden(new_state_leaves)
        self._write_states(states, new_state_leaves)
        return jax.tree.unflatten(info.out_treedef, outs)

    def update(self, *inputs, modulator=None):
        """Run one step (or, with :class:`~braintrace.MultiStepData`, a window of steps).

        Under ``vjp_method='multi-step'`` every call is a window (of one step for inputs without
        :class:`~braintrace.MultiStepData`, whose output is then not stacked), see the class
        docstring; under ``'single-step'`` a window is ``K`` single steps (sharing ``modulator``).

        ``modulator`` (``learning_signal='modulatory'`` only) is this call's learning signal in
        place of the standing :attr:`modulator`."""
        if modulator is not None and self.learning_signal != "modulatory":
            raise ValueError(self._modulator_misuse())
        self._call_modulator = modulator
        try:
            return self._update(*inputs)
        finally:
            self._call_modulator = None

    def _update(self, *inputs):
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
        if self.learning_signal != "symmetric":
            raise ValueError(
                f"{type(self).__name__}: the multi-step rule (windows of steps) differentiates each window "
                f"exactly; learning_signal={self.learning_signal!r} is a single-step rule. Use window=1."
            )
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
        signal = self.learning_signal
        payload = self._signal_payload()
        if signal == "random_feedback":  # the output error is needed: a zero added to each output
            out_zeros = [
                jnp.zeros(v.aval.shape, v.aval.dtype) if jnp.issubdtype(v.aval.dtype, jnp.inexact) else None
                for v in info.jaxpr.outvars[: info.num_out_leaves]
            ]

        def loss_fn(perturbations):
            states, state_leaves = self._current_states()
            outs, new_state_leaves, env = ex.perturbed(
                state_leaves, arg_leaves, *perturbations[:2], return_env=True
            )
            if signal == "random_feedback":
                outs = [o if z is None else o + z for o, z in zip(outs, perturbations[2])]
            step = ex.step_values(state_leaves, arg_leaves, env=env)  # no second evaluation of the step
            self._write_states(states, new_state_leaves)
            loss = step_fn(jax.tree.unflatten(info.out_treedef, outs), *targets)
            return loss, (step.as_tuple(), [jax.lax.stop_gradient(v) for v in state_leaves])

        grad_fn = brainstate.transform.grad(
            loss_fn, params, argnums=0, has_aux=True, return_value=True, check_states=False
        )
        zeros_old = ex.perturbation.zeros() if ex.reads_old else None
        perturbations = (ex.perturbation.zeros(), zeros_old)
        if signal == "random_feedback":
            perturbations = (*perturbations, out_zeros)
        (grads, d_all), loss, (step, state_leaves) = grad_fn(perturbations)
        d_perturbation, d_old = d_all[0], d_all[1]
        step = StepValues(*step)
        old, keep = self._restart_if_reset(self.etrace.value, state_leaves, step)
        if signal == "random_feedback":
            d_perturbation, d_old = self._feedback_cotangents(state_leaves, arg_leaves, d_all[2])
        cts = ex.group_cotangents(d_perturbation)
        if signal == "modulatory":
            cts = self._modulated(payload, cts)
        if factored:
            new_traces, relation_grads, factors = self._update_solve_factored(old, step, cts)
        else:
            new_traces, relation_grads = self._update_and_solve(old, step, cts)
        if ex.reads_old and signal != "modulatory":  # paths h_(t-1) -> L_t avoiding h_t: the old traces
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
