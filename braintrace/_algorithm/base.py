"""Base classes of the online-learning algorithms."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import brainstate
import jax
import jax.numpy as jnp

from braintrace._compiler.diagnostics import CompilationError
from braintrace._compiler.graph import ETraceGraph, compile_etrace_graph
from braintrace._input_data import (
    MultiStepData,
    get_single_step_data,
    has_multistep_data,
    split_window,
    window_length,
)

from .executor import ETraceVjpGraphExecutor, StepValues, _zero_cotangent, add_relation_grads

__all__ = ["EligibilityTrace", "ETraceAlgorithm", "ETraceVjpAlgorithm"]


def add_param_grads(total: Dict, grads: Dict) -> Dict:
    """``total`` with ``grads`` (keyed like it, possibly fewer keys) added, key by key."""
    total = dict(total)
    for key, value in grads.items():
        total[key] = jax.tree.map(jnp.add, total[key], value)
    return total


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


class EligibilityTrace(brainstate.ShortTermState):
    """A ``brainstate`` state that holds eligibility traces (a dict of arrays)."""


class ETraceAlgorithm(brainstate.nn.Module):
    """An online-learning algorithm wrapped around a model.

    Call :meth:`compile_graph` once with example inputs, then call the algorithm like the model:
    ``alg(x)`` runs one step, writes the model's new states and advances the eligibility traces.

    Parameters
    ----------
    model : brainstate.nn.Module
        A model whose states are initialised (``brainstate.nn.init_all_states``).
    name : str, optional
    """

    def __init__(self, model, name: Optional[str] = None, mode=None):
        super().__init__(name=name)
        if not isinstance(model, brainstate.nn.Module):
            raise TypeError(f"`model` must be a brainstate.nn.Module, got {type(model).__name__}.")
        if mode is not None and not isinstance(mode, brainstate.mixin.Mode):
            raise TypeError(
                f"`mode` must be a brainstate.mixin.Mode such as brainstate.mixin.Batching(), or None; "
                f"got {mode!r}."
            )
        self.model = model
        #: The mode declared at construction (``brainstate.mixin.Batching()`` in code written for the
        #: 0.2 releases). Informative only: the batch axes are read off the states' shapes.
        self.mode = mode
        self.graph: Optional[ETraceGraph] = None
        self._bound_hidden = None
        self._epoch = 0

    @property
    def is_compiled(self) -> bool:
        return self.graph is not None

    def compile_graph(self, *inputs) -> "ETraceAlgorithm":
        """Trace one step with ``inputs`` (used for shapes only), build the graph and the traces.

        ``inputs`` may hold :class:`~braintrace.MultiStepData` (its first step is used) and
        :class:`~braintrace.SingleStepData`."""
        inputs = get_single_step_data(*inputs)
        self.graph = compile_etrace_graph(self.model, *inputs, include_hidden_perturb=False)
        self._input_avals = [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(inputs)]
        self._input_tree = jax.tree.structure(inputs)
        self._num_inputs = len(inputs)
        self._build()
        self._initial_values = [s.value for s in self.graph.module_info.states]
        #: compile-time state values per input signature (``reset=True`` restores the matching one)
        snapshots = self.__dict__.setdefault("_initial_by_inputs", {})
        snapshots[self._input_signature(inputs)] = self._initial_values
        self._bound_hidden = tuple(
            id(self.graph.module_info.states[h.state_index]) for h in self.graph.module_info.hidden_leaves
        )
        return self

    # subclasses -------------------------------------------------------------------------------
    def _build(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _step(self, *inputs):  # pragma: no cover - abstract
        raise NotImplementedError

    def reset_state(self, *args, **kwargs):
        """Zero the eligibility traces (the model's own states are reset by brainstate)."""
        if self.is_compiled:
            self._reset_traces()

    def _reset_traces(self):  # pragma: no cover - abstract
        raise NotImplementedError

    # running ----------------------------------------------------------------------------------
    @staticmethod
    def _input_signature(inputs):
        return (jax.tree.structure(inputs), tuple(tuple(jnp.shape(x)) for x in jax.tree.leaves(inputs)))

    def _state_shapes_match(self) -> bool:
        info = self.graph.module_info
        current = {tuple(map(str, p)): s for p, s in self.model.states().items()}
        for i, s in enumerate(info.states):
            s = current.get(info.paths[i], s)
            a, b = info.state_leaf_ranges[i]
            want = [tuple(v.aval.shape) for v in info.state_invars()[a:b]]
            if [tuple(jnp.shape(leaf)) for leaf in jax.tree.leaves(s.value)] != want:
                return False
        return True

    def follow_shapes(self, *inputs, reset: bool = False) -> bool:
        """Make the compiled graph fit ``inputs`` (one step's) and the model's states now.

        The graph's structure does not depend on the batch size, but its traces and programs do.
        When the inputs or the model's states have other shapes than at compile time (the model was
        evaluated at another batch size with ``brainstate.nn.init_all_states``), the graph is
        compiled again for them (the traces start from zero). With ``reset``, the model's states
        are first restored to their compile-time values for inputs of this signature, when such a
        compilation exists. Returns whether it compiled again. Called by the algorithm's step and
        by ``etrace_grad`` outside traced code; under a ``jit`` trace a mismatch is an error.
        """
        sig = self._input_signature(inputs)
        snapshot = self.__dict__.get("_initial_by_inputs", {}).get(sig)
        if reset and snapshot is not None and sig != self._input_signature_now():
            self._write_values(snapshot)
        if sig == self._input_signature_now() and self._state_shapes_match():
            return False
        leaves = [*jax.tree.leaves(inputs), *jax.tree.leaves([s.value for s in self.model.states().values()])]
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            raise ValueError(
                f"{type(self).__name__} was compiled for inputs {list(self._input_signature_now()[1])} and "
                f"is called with {list(sig[1])} inside a traced function (jit / grad), where the graph "
                f"cannot be compiled again: call `alg.compile_graph(x)` with inputs of the new shape "
                f"outside the traced function first (etrace_grad does this by itself)."
            )
        if reset and snapshot is not None:
            self._write_values(snapshot)
        try:
            self.compile_graph(*inputs)
        except Exception as err:
            raise ValueError(
                f"{type(self).__name__}: inputs {list(sig[1])} do not fit the model's states (compiled "
                f"for inputs {list(self._input_signature_now()[1])}); initialise the states for the new "
                f"batch size (brainstate.nn.init_all_states(model, batch_size=...)). ({err})"
            ) from err
        return True

    def _input_signature_now(self):
        return (self._input_tree, tuple(tuple(a[0]) for a in self._input_avals))

    def _write_values(self, values):
        info = self.graph.module_info
        current = {tuple(map(str, p)): s for p, s in self.model.states().items()}
        for i, (s, v) in enumerate(zip(info.states, values)):
            s = current.get(info.paths[i], s)
            if info.written[i] and not isinstance(s, brainstate.ParamState):
                s.value = v

    def _check_inputs(self, inputs):
        if not self.is_compiled:
            raise RuntimeError(
                f"{type(self).__name__} is not compiled: call `alg.compile_graph(*example_inputs)` "
                f"before running a step."
            )
        tree = jax.tree.structure(inputs)
        avals = [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(inputs)]
        if tree != self._input_tree or [a[0] for a in avals] != [a[0] for a in self._input_avals]:
            raise ValueError(
                f"Inputs {[a[0] for a in avals]} differ from the shapes the graph was compiled with "
                f"{[a[0] for a in self._input_avals]}; call `compile_graph` again with inputs of the new "
                f"shape (and re-initialise the model's states for a new batch size)."
            )

    def _current_states(self):
        """The model's states now, resolved by path (``init_all_states`` creates new objects)."""
        info = self.graph.module_info
        try:
            current = {tuple(map(str, p)): s for p, s in self.model.states().items()}
        except Exception:  # pragma: no cover
            current = {}
        states = []
        for i, s in enumerate(info.states):
            p = info.paths[i]
            states.append(s if p[0] == "<external>" else current.get(p, s))
        leaves = jax.tree.leaves([s.value for s in states])
        compiled = info.state_invars()
        for k, (leaf, var) in enumerate(zip(leaves, compiled)):
            if tuple(jnp.shape(leaf)) != tuple(var.aval.shape):
                owner = info.leaf_owner(k)
                raise ValueError(
                    f"State {info.path_of(owner)!r} has shape {tuple(jnp.shape(leaf))} but the graph was "
                    f"compiled for {tuple(var.aval.shape)}; call `compile_graph` again after changing the "
                    f"batch size."
                )
        hidden_ids = tuple(id(states[h.state_index]) for h in info.hidden_leaves)
        if hidden_ids != self._bound_hidden:
            # The model's states were re-created (init_all_states): its traces restart with them.
            # This is seen while a step is traced, and the traced program is then reused for every
            # later step, so the restart is a runtime check on an epoch stored with the traces: the
            # first step run with the new states zeroes them, later steps do not.
            self._bound_hidden = hidden_ids
            self._epoch += 1
        return states, leaves

    def update(self, *inputs):
        """Run one step: returns the model's output, writes its states, advances the traces.

        With a :class:`~braintrace.MultiStepData` argument, run a window of ``K`` steps and return
        the outputs stacked along a leading axis (see :meth:`ETraceVjpAlgorithm.update`).
        Inputs of another batch size than at compile time (with the model's states initialised for
        it) compile the graph again for them, outside traced code (see :meth:`follow_shapes`)."""
        self._count_call()
        windowed = has_multistep_data(*inputs)
        if windowed:
            window_length(*inputs)  # one length for every MultiStepData leaf
        one = get_single_step_data(*inputs)
        if self.is_compiled:
            self.follow_shapes(*one)
        self._check_inputs(one)
        if windowed:
            return self._steps(inputs)
        return self._step(*one)

    def _count_call(self):
        """Count a call while the sequence driver probes its ``step_fn`` (see ``driving.py``)."""
        probe = self.__dict__.get("_call_probe")
        if probe is not None:
            probe[0] += 1

    def _steps(self, inputs):
        """``K`` single steps over a window of inputs, outputs stacked."""
        leaves, stepped = split_window(*inputs)
        tree = jax.tree.structure(get_single_step_data(*inputs))
        seq = [leaf for leaf, s in zip(leaves, stepped) if s]

        def body(_, seq_t):
            it = iter(seq_t)
            step_leaves = [next(it) if s else leaf for leaf, s in zip(leaves, stepped)]
            return None, self._step(*jax.tree.unflatten(tree, step_leaves))

        return brainstate.transform.scan(body, None, seq)[1]

    # the sequence driver ---------------------------------------------------------------------
    def etrace_grad(
        self,
        *sequences,
        step_fn=None,
        return_value: bool = False,
        reset: Optional[bool] = None,
        solve_every: int = 1,
        window: int = 1,
        mask=None,
        chunk_size: Optional[int] = None,
        weights=None,
        reduction: Optional[str] = None,
        loss_output: str = "per_step",
        has_aux: bool = False,
    ):
        r"""Run the model online over time-major ``sequences`` and sum the per-step gradients.

        ``step_fn`` takes one of two forms. In this package's form, the first
        ``len(example_inputs)`` sequences are the model's inputs at each step and the driver calls
        the model; the others are passed to ``step_fn`` with the step's output:
        ``loss_t = step_fn(output_t, *others_t)``. In the form of the published 0.2 releases,
        ``step_fn(*slices_t)`` receives every sequence's slice, calls the learner itself (once) and
        returns the loss; the driver tells the forms apart by evaluating ``step_fn`` abstractly once
        and counting its calls to the learner. That form takes ``mask`` (``(T,)`` loss weights),
        ``reduction`` (``'mean'``, its default, divides by the total mask weight; ``'sum'``),
        ``chunk_size`` (windows of the multi-step rule: ``step_fn`` gets ``(k, ...)`` slices and
        returns ``(k,)`` losses), ``weights`` (the ``ParamState`` dict to differentiate),
        ``loss_output`` (``'per_step'``, ``'masked'`` or ``'scalar'`` losses with
        ``return_value``) and ``has_aux``; it does not reset the states unless ``reset=True``, and
        returns ``grads``, ``(grads, losses)``, ``(grads, aux)`` or ``(grads, losses, aux)``.
        The whole loop runs in one ``jit``-compiled ``scan``; memory does not grow with its length.
        Each step first takes :math:`\partial L_t/\partial h_t` and the parameters' within-step
        gradients, then updates every eligibility trace and solves it against
        :math:`\partial L_t/\partial h_t` in one operation (one pass over the trace; a fused kernel under
        ``set_backend('pallas')``). The result equals the per-step gradients of the algorithm called under
        ``brainstate.transform.grad``, summed.

        Parameters
        ----------
        *sequences : arrays with a leading time axis
        step_fn : callable
            ``(output, *targets) -> scalar loss`` of one step.
        return_value : bool
            Also return the per-step losses, shape ``(T,)``.
        reset : bool, optional
            Restore the model's non-parameter states to their values at compile time and zero the
            traces before the sequence (the default in this package's form; not in the published
            form). Sequences of another batch size than at compile time compile
            the graph again for it (``follow_shapes``), with the model's states as they are (initialise
            them for that batch size first); a later call at a batch size compiled before restores that
            compilation's states.
        solve_every : int
            pp_prop only: form the ``x``-dependent weight gradients once every ``solve_every`` steps.
            Each step's gradient is the product :math:`\mathrm{xy\_to\_dw}(\epsilon_x, g_t)` of two
            small factors, ``(B, I)`` and ``(B, O)``; the driver keeps the factors of ``K`` steps and
            forms the sum of their gradients in one product over ``K B`` rows (one GEMM for a dense
            layer, one SDDMM for a sparse one). The result is the same sum (up to rounding order);
            the weight gradient is read and written once per ``K`` steps instead of every step, at
            the cost of ``K B (I + O)`` stored values per layer. This pays most when the weight
            gradient outweighs the traces: large sparse layers at small batch. Layers of an
            unbatched model, and layers whose weights are not fixed over the sequence, keep the
            per-step solve.
        window : int
            Run the multi-step rule over consecutive windows of ``window`` steps (the last one holds
            the remainder): each window's gradient is exact inside it (reverse mode through its steps)
            and the credit from before it arrives through the traces at its start; the traces carry
            on across windows. ``window=1`` with a ``vjp_method='single-step'`` algorithm is the fully
            online rule; a window as long as the sequence is BPTT. An algorithm built with
            ``vjp_method='multi-step'`` always uses this rule (windows of one step by default).

        Returns
        -------
        dict of gradients keyed like ``model.states(brainstate.ParamState)`` (and the losses).

        Examples
        --------
        >>> import brainstate, jax, jax.numpy as jnp, braintrace
        >>> class Leaky(brainstate.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = brainstate.ParamState(jax.random.normal(jax.random.PRNGKey(0), (2, 3)))
        ...     def init_state(self, batch_size=None, **kw):
        ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 3)))
        ...     def update(self, x):
        ...         self.h.value = 0.9 * self.h.value + braintrace.matmul(x, self.w.value)
        ...         return self.h.value
        >>> learner = braintrace.compile(Leaky(), 'pp_prop', jnp.zeros((4, 2)), batch_size=4)
        >>> xs = jax.random.normal(jax.random.PRNGKey(1), (10, 4, 2))
        >>> ys = jnp.zeros((10, 4, 3))
        >>> loss = lambda out, y: jnp.mean((out - y) ** 2)
        >>> grads, losses = learner.etrace_grad(xs, ys, step_fn=loss, return_value=True)
        >>> losses.shape
        (10,)
        >>> blocked = learner.etrace_grad(xs, ys, step_fn=loss, solve_every=4)  # blocks of 4, 4, 2
        >>> bool(jnp.allclose(blocked[('w',)], grads[('w',)], rtol=1e-5, atol=1e-6))
        True
        """
        from .driving import etrace_grad_driving, step_fn_runs_the_model
        from .learner import etrace_grad

        if not self.is_compiled:
            raise RuntimeError("Call `compile_graph` (or braintrace.compile) before `etrace_grad`.")
        if step_fn is None or not callable(step_fn):
            raise TypeError(
                "`step_fn` must be a callable: `(output, *targets) -> loss`, or `(*slices) -> loss` "
                "that runs the learner."
            )
        if step_fn_runs_the_model(self, step_fn, sequences):
            if solve_every != 1 or window != 1:
                raise ValueError(
                    "`solve_every` and `window` drive the model themselves; with a step_fn that runs the "
                    "learner, use chunk_size= (windows of the multi-step rule) instead."
                )
            if reset:
                self._restore_initial_states()
            return etrace_grad_driving(
                self,
                sequences,
                step_fn,
                mask=mask,
                chunk_size=chunk_size,
                weights=weights,
                reduction="mean" if reduction is None else reduction,
                loss_output=loss_output,
                has_aux=has_aux,
                return_value=return_value,
            )
        published_only = dict(mask=mask, chunk_size=chunk_size, weights=weights, has_aux=has_aux)
        for name, value in published_only.items():
            if value is not None and value is not False:
                raise ValueError(
                    f"`{name}` applies to a step_fn that runs the learner itself (`step_fn(*slices)`); "
                    f"this step_fn takes the output, `step_fn(output, *targets)`."
                )
        if loss_output != "per_step":
            raise ValueError("`loss_output` applies to a step_fn that runs the learner itself.")
        if reduction not in (None, "sum", "mean"):
            raise ValueError(f"`reduction` must be 'sum' or 'mean', got {reduction!r}.")
        out = etrace_grad(
            self,
            *sequences,
            step_fn=step_fn,
            return_value=return_value,
            reset=True if reset is None else reset,
            solve_every=solve_every,
            window=window,
        )
        if reduction == "mean":
            length = jnp.shape(jax.tree.leaves(sequences)[0])[0]
            grads = out[0] if return_value else out
            grads = jax.tree.map(lambda g: g / length, grads)
            out = (grads, out[1]) if return_value else grads
        return out

    def etrace_train(
        self,
        *sequences,
        step_fn,
        optimizer,
        opt_state=None,
        update_every: int = 1,
        reset: bool = False,
        losses: str = "mean",
    ):
        r"""Learn while the model runs: apply the online gradient every ``update_every`` steps.

        One ``jit``-compiled loop over time-major ``sequences`` (the model's inputs, then the
        targets of ``step_fn``, as in :meth:`etrace_grad`). Each step takes the algorithm's online
        gradient; after every ``update_every`` steps their sum goes through ``optimizer`` and the
        update is written to the model's ``ParamState`` values. The traces and hidden states carry
        on across updates. A stream longer than one call is fed in chunks: pass the returned
        optimizer state back; the gradient of a block not finished at the end of a call is kept
        by the algorithm and completed by the next call, so chunks equal one long call.

        Parameters
        ----------
        *sequences : arrays with a leading time axis
        step_fn : callable
            ``(output, *targets) -> scalar loss`` of one step.
        optimizer : optax-style GradientTransformation
            Anything with ``init(params)`` and ``update(grads, state, params) -> (updates, state)``;
            the updates are added to the parameters.
        opt_state : optional
            The optimizer state from a previous call; by default ``optimizer.init(params)``.
        update_every : int
            Steps per update. ``update_every`` at least the sequence's length sums the whole
            sequence's gradient first (:meth:`etrace_grad` followed by one update).
        reset : bool
            Restore the compile-time states, zero the traces and drop an unfinished block first.
        losses : ``'mean'`` or ``'all'``
            Return the mean loss of the call, or every step's loss ``(T,)``.

        Returns
        -------
        ``(opt_state, loss)``: the optimizer state after the call, and the losses as asked.

        Examples
        --------
        >>> import brainstate, jax, jax.numpy as jnp, braintrace
        >>> class Leaky(brainstate.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = brainstate.ParamState(jnp.zeros((2, 3)))
        ...     def init_state(self, batch_size=None, **kw):
        ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 3)))
        ...     def update(self, x):
        ...         self.h.value = 0.5 * self.h.value + braintrace.matmul(x, self.w.value)
        ...         return self.h.value
        >>> class SGD:  # an optax GradientTransformation works the same way
        ...     init = staticmethod(lambda params: ())
        ...     update = staticmethod(lambda g, s, p=None: (jax.tree.map(lambda v: -0.1 * v, g), s))
        >>> learner = braintrace.compile(Leaky(), 'd_rtrl', jnp.zeros((4, 2)), batch_size=4)
        >>> xs, ys = jnp.ones((50, 4, 2)), jnp.ones((50, 4, 3))
        >>> loss = lambda out, y: jnp.mean((out - y) ** 2)
        >>> state, first = learner.etrace_train(xs, ys, step_fn=loss, optimizer=SGD(), update_every=5)
        >>> state, later = learner.etrace_train(xs, ys, step_fn=loss, optimizer=SGD(), opt_state=state)
        >>> bool(later < first)
        True
        """
        from .training import etrace_train

        return etrace_train(
            self,
            *sequences,
            step_fn=step_fn,
            optimizer=optimizer,
            opt_state=opt_state,
            update_every=update_every,
            reset=reset,
            losses=losses,
        )

    def etrace_evolve(
        self,
        *sequences,
        step_fn=None,
        chunk_size: Optional[int] = None,
        return_outputs: bool = False,
        reset: bool = False,
    ):
        """Advance the model's states and the eligibility traces over time-major ``sequences``,
        with no loss and no gradient: a warm-up before learning, or an evaluation that keeps the
        traces going. One ``jit``-compiled loop.

        Parameters
        ----------
        *sequences : arrays with a leading time axis
            The model's inputs, step by step (or the arguments of ``step_fn``).
        step_fn : callable, optional
            Called with each step's slices instead of the learner (it calls the learner itself).
        chunk_size : int, optional
            Drive windows of ``chunk_size`` steps (``MultiStepData``) instead of single steps.
        return_outputs : bool
            Return the stacked outputs ``(T, ...)`` (or ``(T // chunk_size, ...)``); ``None`` by
            default, so a long warm-up stores nothing.
        reset : bool
            Restore the compile-time states and zero the traces first.

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
        ...         self.h.value = 0.5 * self.h.value + braintrace.matmul(x, self.w.value)
        ...         return self.h.value
        >>> learner = braintrace.compile(Leaky(), 'd_rtrl', jnp.zeros((4, 2)), batch_size=4)
        >>> learner.etrace_evolve(jnp.ones((10, 4, 2)), return_outputs=True).shape
        (10, 4, 3)
        """
        from .driving import etrace_evolve_driving

        if not self.is_compiled:
            raise RuntimeError("Call `compile_graph` (or braintrace.compile) before `etrace_evolve`.")
        if step_fn is None:
            self.follow_shapes(*[jax.tree.map(lambda a: a[0], s) for s in sequences], reset=reset)
        if reset:
            self._restore_initial_states()
        return etrace_evolve_driving(self, sequences, step_fn, chunk_size, return_outputs)

    def _restore_initial_states(self):
        """The model's written non-parameter states back to their compile-time values; traces zeroed."""
        self._write_values(self._initial_values)
        self._reset_traces()

    def _step_grad(self, step_fn, params, inputs, targets):
        """One step of the sequence driver: ``(gradients keyed like params, loss)``."""
        loss = lambda: step_fn(self(*inputs), *targets)
        return brainstate.transform.grad(loss, params, return_value=True)()


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
        self.executor = ETraceVjpGraphExecutor(self.graph, self._solve)
        self.etrace = EligibilityTrace({**self._init_trace_values(), "epoch": jnp.zeros((), jnp.int32)})
        info = self.graph.module_info
        self._hidden_leaf_ids = tuple(sorted({h.leaf for h in info.hidden_leaves}))
        leaves = jax.tree.leaves([s.value for s in info.states])
        #: The hidden values this algorithm last wrote: a step that finds other values (the model
        #: was reset, ``brainstate.nn.reset_all_states``, or its states were set by hand) restarts
        #: the traces, which describe how the old values depended on the parameters.
        self.hidden_seen = brainstate.ShortTermState([leaves[i] for i in self._hidden_leaf_ids])

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
