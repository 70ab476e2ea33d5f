"""The online-learning algorithm's base class: compiling the graph, following the model's shapes,
and the sequence drivers (:meth:`ETraceAlgorithm.etrace_grad`, ``etrace_train``, ``etrace_evolve``).
The algorithms whose gradient arrives through a ``custom_vjp`` step are in ``vjp_algorithm.py``."""

from __future__ import annotations

from typing import Dict, Optional

import brainstate
import jax
import jax.numpy as jnp

from braintrace._compiler.graph import ETraceGraph, compile_etrace_graph
from braintrace._input_data import (
    get_single_step_data,
    has_multistep_data,
    split_window,
    window_length,
)

from .sequence import SequenceDriverMixin

__all__ = ["EligibilityTrace", "ETraceAlgorithm", "add_param_grads"]


def add_param_grads(total: Dict, grads: Dict) -> Dict:
    """``total`` with ``grads`` (keyed like it, possibly fewer keys) added, key by key."""
    total = dict(total)
    for key, value in grads.items():
        total[key] = jax.tree.map(jnp.add, total[key], value)
    return total


def _set_rows(rows, now, value, name: str):
    """``now`` with its batch rows ``rows`` (leading axis; a scalar: every row) replaced by ``value``."""
    now = jnp.asarray(now)
    if rows.ndim == 0:
        return jnp.where(rows, jnp.asarray(value, now.dtype), now)
    if now.ndim == 0 or now.shape[0] != rows.shape[0]:
        raise ValueError(
            f"`resets` has {rows.shape[0]} rows, but state {name!r} has shape {tuple(now.shape)}: resetting "
            f"rows needs every state the step writes to carry the batch axis first "
            f"(brainstate.nn.init_all_states(model, batch_size={rows.shape[0]}))."
        )
    return jnp.where(rows.reshape((-1,) + (1,) * (now.ndim - 1)), jnp.asarray(value, now.dtype), now)


class DriverCache(dict):
    """A dict of the sequence drivers' compiled loops and probes, keyed by tuples that hold functions.

    Not a pytree node (a subclass of ``dict`` is a leaf to ``jax.tree_util``): brainstate's walk over
    the algorithm's attributes (``alg.states()``) does not look into it, which would sort its keys and
    fail on two functions."""


class EligibilityTrace(brainstate.ShortTermState):
    """A ``brainstate`` state that holds eligibility traces (a dict of arrays)."""


class ETraceAlgorithm(SequenceDriverMixin, brainstate.nn.Module):
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
        policy = getattr(self, "control_flow", None)
        self.graph = compile_etrace_graph(
            self.model, *inputs, include_hidden_perturb=False, control_flow=policy
        )
        self._input_avals = [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(inputs)]
        self._input_tree = jax.tree.structure(inputs)
        self._num_inputs = len(inputs)
        self._build()
        self._initial_values = [s.value for s in self.graph.module_info.states]
        #: compile-time state values per input signature (``reset=True`` restores the matching one)
        snapshots = self._driver_cache("_initial_by_inputs")
        snapshots[self._input_signature(inputs)] = self._initial_values
        self._bound_hidden = tuple(
            id(self.graph.module_info.states[h.state_index]) for h in self.graph.module_info.hidden_leaves
        )
        return self

    def _driver_cache(self, name: str) -> "DriverCache":
        """The dict ``name`` kept on the algorithm by its drivers (compiled loops, probes, snapshots)."""
        cache = self.__dict__.get(name)
        if cache is None:
            cache = self.__dict__[name] = DriverCache()
        return cache

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
        lengths=None,
        resets=None,
        chunk_size: Optional[int] = None,
        weights=None,
        reduction: Optional[str] = None,
        loss_output: str = "per_step",
        has_aux: bool = False,
        aux_reduction: Optional[str] = None,
    ):
        r"""Run the model online over time-major ``sequences`` and sum the per-step gradients.

        ``step_fn`` takes one of two forms. In this package's form, the first
        ``len(example_inputs)`` sequences are the model's inputs at each step and the driver calls
        the model; the others are passed to ``step_fn`` with the step's output:
        ``loss_t = step_fn(output_t, *others_t)``. In the form of the published 0.2 releases,
        ``step_fn(*slices_t)`` receives every sequence's slice, calls the learner itself (once) and
        returns the loss; the driver tells the forms apart by evaluating ``step_fn`` abstractly once
        and counting its calls to the learner. The published form also takes ``chunk_size``
        (windows of the multi-step rule: ``step_fn`` gets ``(k, ...)`` slices and returns ``(k,)``
        or ``(k, B)`` losses) and ``weights`` (the ``ParamState`` dict to differentiate); it does
        not reset the states unless ``reset=True``, and its ``reduction`` defaults to ``'mean'``.

        **Losses, masks and reductions** (both forms). A step's loss :math:`\ell_t` is a scalar
        (already reduced over the batch) or one loss per batch row, a vector ``(B,)``. Each entry
        has a weight :math:`w_{t,b}`: from ``mask`` (``(T,)``, broadcast over the rows, or
        ``(T, B)``), from ``lengths`` (``(B,)``: :math:`w_{t,b} = [t < \mathrm{lengths}_b]`, for
        sequences padded at their end), or 1. Per-row weights need a per-row loss. The gradient
        returned is that of :math:`\sum_{t,b} w_{t,b}\,\ell_{t,b}` (``reduction='sum'``) or of
        that sum divided by :math:`\max(\sum_{t,b} w_{t,b}, 1)`, the number of entries that count
        (``'mean'``). An entry of weight 0 contributes nothing to the gradient or the loss; the
        model still runs over it (padding must be finite; zeros are fine), and with a batched
        model the rows are independent, so the gradient of a padded batch equals the sum of the
        gradients of its sequences run one by one, each with its own length.

        **Resets.** ``resets`` ``(T, B)`` (or ``(T,)`` for every row) packs several episodes into
        one stream: where ``resets[t, b]``, row ``b`` of every ``ShortTermState`` the step writes
        (hidden states included) is set back to its value at compile time (the values
        ``init_all_states`` gave) before step ``t``, and the row's traces restart. ``D_RTRL``
        restarts the traces of those rows only, so each row's gradient equals its episodes run
        separately. ``pp_prop`` / ``ES_D_RTRL`` (and ``D_RTRL`` with ``lora_factored=True`` or a
        custom primitive's trace operations), whose trace leaves are shared by the rows or not
        all propagated through ``D``, restart every row's traces at a step where any row resets:
        the other rows lose the credit carried from before that step. Resets need single steps
        (not ``window`` / ``chunk_size`` windows) and states that carry the batch axis first.

        **Outputs.** With ``return_value``, ``loss_output`` selects the losses returned:
        ``'per_step'`` as ``step_fn`` returned them, ``(T,)`` or ``(T, B)``; ``'masked'`` the same
        times their weights; ``'scalar'`` the reduced objective. With ``has_aux``, ``step_fn``
        returns ``(loss, aux)`` and the aux is returned stacked ``(T, ...)``, or, with
        ``aux_reduction='sum'`` / ``'mean'``, summed or averaged over the entries that count
        (per step and row for a leaf whose axis is the batch of a per-row loss, per step otherwise).
        The result is ``grads``, ``(grads, losses)``, ``(grads, aux)`` or ``(grads, losses, aux)``.

        The whole loop runs in one ``jit``-compiled ``scan``; with ``loss_output='scalar'`` (or no
        ``return_value``) and reduced aux, its working memory does not grow with its length.
        Each step first takes :math:`\partial L_t/\partial h_t` and the parameters' within-step
        gradients, then updates every eligibility trace and solves it against
        :math:`\partial L_t/\partial h_t` in one operation (one pass over the trace; a fused kernel under
        ``set_backend('pallas')``). The result equals the per-step gradients of the algorithm called under
        ``brainstate.transform.grad``, weighted and summed.

        Parameters
        ----------
        *sequences : arrays with a leading time axis
        step_fn : callable
            ``(output, *targets) -> loss`` of one step: a scalar, or a vector ``(B,)`` of per-row
            losses (``(loss, aux)`` with ``has_aux``).
        return_value : bool
            Also return the losses (see ``loss_output``).
        mask : array ``(T,)`` or ``(T, B)``, optional
            Weights of the steps, or of each step's rows (bool or real).
        lengths : int array ``(B,)``, optional
            Valid steps per row; excludes ``mask``.
        resets : bool array ``(T, B)`` or ``(T,)``, optional
            Where a row starts anew (states back to their initial values, traces restarted).
        reduction : ``'sum'`` or ``'mean'``, optional
            ``'sum'`` by default in this package's form, ``'mean'`` in the published form.
        loss_output : ``'per_step'``, ``'masked'`` or ``'scalar'``
        has_aux : bool
            ``step_fn`` returns ``(loss, aux)``.
        aux_reduction : None, ``'sum'`` or ``'mean'``
            Return the aux stacked over the steps (``None``) or reduced.
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
        dict of gradients keyed like ``model.states(brainstate.ParamState)`` (and the losses, the aux).

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

        Sequences of different lengths in one batch: a per-row loss and ``lengths``.

        >>> row_loss = lambda out, y: jnp.mean((out - y) ** 2, axis=-1)  # (B,)
        >>> lengths = jnp.array([10, 7, 3, 10])
        >>> grads, loss = learner.etrace_grad(xs, ys, step_fn=row_loss, lengths=lengths,
        ...                                   reduction='mean', return_value=True, loss_output='scalar')
        >>> loss.shape
        ()
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
        # which form step_fn takes, probed once per step_fn and sequence shapes (an abstract trace)
        form_key = (step_fn, tuple((jnp.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(sequences)))
        forms = self._driver_cache("_step_fn_forms")
        if form_key not in forms:
            forms[form_key] = step_fn_runs_the_model(self, step_fn, sequences)
        if forms[form_key]:
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
                lengths=lengths,
                resets=resets,
                chunk_size=chunk_size,
                weights=weights,
                reduction="mean" if reduction is None else reduction,
                loss_output=loss_output,
                has_aux=has_aux,
                aux_reduction=aux_reduction,
                return_value=return_value,
            )
        for name, value in dict(chunk_size=chunk_size, weights=weights).items():
            if value is not None:
                raise ValueError(
                    f"`{name}` applies to a step_fn that runs the learner itself (`step_fn(*slices)`); "
                    f"this step_fn takes the output, `step_fn(output, *targets)`."
                )
        return etrace_grad(
            self,
            *sequences,
            step_fn=step_fn,
            return_value=return_value,
            reset=True if reset is None else reset,
            solve_every=solve_every,
            window=window,
            mask=mask,
            lengths=lengths,
            resets=resets,
            reduction=reduction,
            loss_output=loss_output,
            has_aux=has_aux,
            aux_reduction=aux_reduction,
        )

    def etrace_train(
        self,
        *sequences,
        step_fn,
        optimizer,
        opt_state=None,
        update_every: int = 1,
        reset: bool = False,
        losses: str = "mean",
        mask=None,
        lengths=None,
        resets=None,
        reduction: str = "sum",
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
            ``(output, *targets) -> loss`` of one step: a scalar, or a vector ``(B,)`` of per-row
            losses (needed by a per-row ``mask`` and by ``lengths``).
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
            Return the mean loss of the call over the entries that count (a running sum: nothing
            is stored per step), or every step's loss as ``step_fn`` returned it, ``(T,)`` or
            ``(T, B)``.
        mask, lengths, resets
            As in :meth:`etrace_grad`: weights of the steps ``(T,)`` or of each row ``(T, B)``,
            valid steps per row ``(B,)``, and where rows start anew ``(T, B)`` (states back to
            their initial values, traces restarted: per row under ``D_RTRL``, every row under
            ``pp_prop``).
        reduction : ``'sum'`` or ``'mean'``
            Each update applies the sum of the block's weighted gradients, or that sum divided by
            the block's total weight (at least 1). A block in which nothing counts applies a zero
            gradient (the optimizer's state still advances).

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

        A packed stream: episodes of different lengths back to back in each row.

        >>> resets = jnp.zeros((50, 4), bool).at[jnp.array([0, 20, 35]), jnp.array([1, 2, 1])].set(True)
        >>> row_loss = lambda out, y: jnp.mean((out - y) ** 2, axis=-1)
        >>> state, loss = learner.etrace_train(xs, ys, step_fn=row_loss, optimizer=SGD(), resets=resets,
        ...                                    reduction='mean')
        >>> loss.shape
        ()
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
            mask=mask,
            lengths=lengths,
            resets=resets,
            reduction=reduction,
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

    def _reset_rows(self, rows):
        """Batch rows ``rows`` (bool ``(B,)``, or a scalar for every row) of every ``ShortTermState``
        the step writes back to their compile-time values; the next step restarts their traces.

        The algorithms notice the new values themselves (they compare the hidden states with the
        values they last wrote, see ``ETraceVjpAlgorithm._restart_if_reset``); :meth:`_forget_rows`
        makes that hold also where a row's state already had its initial value."""
        info = self.graph.module_info
        current = {tuple(map(str, p)): s for p, s in self.model.states().items()}
        rows = jnp.asarray(rows).astype(bool)
        for i, (state, initial) in enumerate(zip(info.states, self._initial_values)):
            state = current.get(info.paths[i], state)
            if not info.written[i] or not isinstance(state, brainstate.ShortTermState):
                continue
            name = info.path_of(i)
            state.value = jax.tree.map(lambda now, v0: _set_rows(rows, now, v0, name), state.value, initial)
        self._forget_rows(rows)

    def _forget_rows(self, rows):
        """Make the next step's restart check treat the hidden values of ``rows`` as changed (an
        algorithm that keeps a record of the values it last wrote overrides this; without one
        there is nothing to forget)."""

    def _restore_initial_states(self):
        """The model's written non-parameter states back to their compile-time values; traces zeroed."""
        self._write_values(self._initial_values)
        self._reset_traces()

    def _step_grad(self, step_fn, params, inputs, targets):
        """One step of the sequence driver: ``(gradients keyed like params, loss)``."""
        loss = lambda: step_fn(self(*inputs), *targets)
        return brainstate.transform.grad(loss, params, return_value=True, check_states=False)()
