"""The sequence driver: scan an online algorithm over time and accumulate its gradients."""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional

import brainstate
import jax
import jax.numpy as jnp

from braintrace._compatible_imports import Var
from braintrace._input_data import MultiStepData

from .base import ETraceAlgorithm, add_param_grads
from .masking import (
    StepLoss,
    add_totals,
    check_aux_reduction,
    check_reduction,
    check_resets,
    check_step_weights,
    denominator,
    output_avals,
    record_shapes,
    reduced_aux,
    step_record,
    zero_totals,
)
from .pp_prop import IODimVjpAlgorithm
from .vjp_algorithm import ETraceVjpAlgorithm

__all__ = ["etrace_grad"]


def etrace_grad(
    self: ETraceAlgorithm,
    *sequences,
    step_fn: Optional[Callable] = None,
    return_value: bool = False,
    reset: bool = True,
    solve_every: int = 1,
    window: int = 1,
    mask=None,
    lengths=None,
    resets=None,
    reduction: Optional[str] = None,
    loss_output: str = "per_step",
    has_aux: bool = False,
    aux_reduction: Optional[str] = None,
):
    """The body of :meth:`ETraceAlgorithm.etrace_grad` (documented there)."""
    if not self.is_compiled:
        raise RuntimeError("Call `compile_graph` (or braintrace.compile) before `etrace_grad`.")
    if step_fn is None or not callable(step_fn):
        raise TypeError("`step_fn` must be a callable `(output, *targets) -> loss`.")
    n_in = self._num_inputs
    if len(sequences) < n_in:
        raise ValueError(f"etrace_grad needs at least {n_in} input sequence(s), got {len(sequences)}.")
    length = sequence_length(sequences)
    if isinstance(solve_every, bool) or not isinstance(solve_every, int) or solve_every < 1:
        raise ValueError(f"`solve_every` must be an int >= 1, got {solve_every!r}.")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"`window` must be an int >= 1, got {window!r}.")
    windowed = window > 1 or getattr(self, "vjp_method", "single-step") == "multi-step"
    if windowed and solve_every > 1:
        raise ValueError(
            f"`solve_every={solve_every}` and the multi-step rule (window={window}, vjp_method="
            f"{getattr(self, 'vjp_method', None)!r}) exclude each other: a window's gradient is formed "
            f"by reverse mode over its steps. Use one of them."
        )
    if solve_every > 1 and not isinstance(self, IODimVjpAlgorithm):
        raise ValueError(
            f"`solve_every={solve_every}` needs an algorithm whose weight gradients are products of "
            f"stored factors (pp_prop / ES_D_RTRL); {type(self).__name__} solves its traces every "
            f"step. Use solve_every=1."
        )
    weights = check_step_weights(mask, lengths, length)
    reset_kind = check_resets(resets, length)
    if reset_kind is not None and windowed:
        raise ValueError(
            "`resets` starts rows anew between single steps; the multi-step rule (window > 1 or "
            "vjp_method='multi-step') runs windows of steps. Split the stream at its episode "
            "boundaries, or use the single-step rule."
        )
    reduction = check_reduction(reduction, "sum")
    if loss_output not in LOSS_OUTPUTS:
        raise ValueError(f"`loss_output` must be one of {LOSS_OUTPUTS}, got {loss_output!r}.")
    aux_reduction = check_aux_reduction(aux_reduction, has_aux)
    self.follow_shapes(*[jax.tree.map(lambda a: a[0], s) for s in sequences[:n_in]], reset=reset)
    params = self.model.states(brainstate.ParamState)
    stacked = return_value and loss_output != "scalar"
    # brainstate's jit keeps the state objects it traced: a model re-initialised with
    # init_all_states (new state objects) needs a new compiled loop.
    key = (
        step_fn,
        bool(stacked),
        loss_output,
        bool(reset),
        tuple(id(s) for s in params.values()),
        tuple(id(s) for s in self._current_states()[0]),
        solve_every,
        window,
        id(self.graph),  # a graph compiled again (another batch size) has its own traces and program
        weights,
        reset_kind,
        bool(has_aux),
        aux_reduction,
        reduction,
    )
    cache = self._driver_cache("_etrace_grad_cache")
    if key not in cache:
        _warn_if_loss_ignores_output(self, step_fn, sequences, n_in, has_aux)
        record = step_record(step_fn, has_aux, weights)
        shapes = record_shapes(self, record, sequences, n_in, weights, mask if lengths is None else lengths)

        def run(weight_value, reset_value, *seqs):
            if reset:
                self._restore_initial_states()
            weight_value = None if weights is None else weights.cast(weight_value)
            loop = _Loop(
                self, record, params, weights, weight_value, reset_kind, shapes, aux_reduction, stacked
            )
            scanned = (
                seqs[:n_in],
                seqs[n_in:],
                weight_value if weights is not None and weights.scanned else None,
                reset_value,
            )
            if windowed:
                carry, outs = _scan_blocks(loop.window, loop.init(), scanned, window)
            elif solve_every == 1:
                carry, outs = brainstate.transform.scan(loop.step, loop.init(), scanned)
            else:
                carry, outs = _scan_blocks(loop.factored_block, loop.init(), scanned, solve_every)
            return loop.finish(carry, outs, reduction, loss_output)

        cache[key] = brainstate.transform.jit(run)
    weight_value = mask if lengths is None else lengths
    grads, value, aux = cache[key](weight_value, resets, *sequences)
    out = (grads,) + ((value,) if return_value else ()) + ((aux,) if has_aux else ())
    return out[0] if len(out) == 1 else out


#: What ``return_value=True`` returns: the losses as ``step_fn`` returned them ``(T,)`` / ``(T, B)``,
#: the same times their weights, or the reduced objective (a scalar).
LOSS_OUTPUTS = ("per_step", "masked", "scalar")


def sequence_length(sequences) -> int:
    lengths = {jnp.shape(s)[0] for s in jax.tree.leaves(sequences)}
    if len(lengths) != 1:
        raise ValueError(f"All sequences must share the leading time axis; got lengths {sorted(lengths)}.")
    return lengths.pop()


class _Loop:
    """The pieces of the sequence loop of this package's form: one step (or window, or block of
    factored steps), the carry ``(gradient sums, step counter, running totals)`` and the end.

    Nothing but the steps writes the model's states inside the loop, so where the loop resets no
    rows itself (``resets=None``), the hidden states can differ from the values the algorithm last
    wrote only before the first step: an :class:`ETraceVjpAlgorithm` checks them once in
    :meth:`init`, and its steps take that restart at step 0 and none after it, in place of their
    own check (see :meth:`ETraceVjpAlgorithm._restart_given`). With ``resets``, each step checks.
    """

    def __init__(
        self, alg, record, params, weights, weight_value, reset_kind, shapes, aux_reduction, stacked
    ):
        self.alg, self.record, self.params = alg, record, params
        self.weights, self.weight_value, self.reset_kind = weights, weight_value, reset_kind
        self.shapes, self.aux_reduction, self.stacked = shapes, aux_reduction, stacked
        self.loss = StepLoss(record, shapes)
        self.checks_once = reset_kind is None and isinstance(alg, ETraceVjpAlgorithm)

    def init(self):
        zeros = jax.tree.map(jnp.zeros_like, {k: v.value for k, v in self.params.items()})
        totals = zero_totals(self.shapes[0], self.shapes[1], self.aux_reduction)
        if self.checks_once:
            alg = self.alg
            traces, self.first_keep = alg._restart_if_reset(alg.etrace.value, alg._current_states()[1])
            alg.etrace.value = traces
        return zeros, jnp.zeros((), jnp.int32), totals

    def _restart(self, t):
        """The context of the step (or window) starting at step ``t``: the restart found before
        the loop at ``t = 0``, none after it (a select in the step's use of ``keep``, not a value
        carried from step to step)."""
        if not self.checks_once:
            return contextlib.nullcontext()
        keep = jax.tree.map(lambda k: jnp.where(t == 0, k, jnp.ones_like(k)), self.first_keep)
        return self.alg._restart_given(keep)

    def _outputs(self, rec, aux):
        return (
            rec["loss"] if self.stacked else None,
            rec["masked"] if self.stacked else None,
            aux if self.aux_reduction is None else None,
        )

    def _one(self, carry, data, factored):
        acc, t, totals = carry
        xs_t, ys_t, w_t, r_t = data
        if self.reset_kind is not None:
            self.alg._reset_rows(r_t)
        w = None if self.weights is None else self.weights.at(self.weight_value, w_t, t)
        targets = (w, *ys_t)
        with self._restart(t):
            if factored:
                grads, factors, _ = self.alg._step_grad(
                    self.loss, self.params, xs_t, targets, factored=True
                )
            else:
                grads, _ = self.alg._step_grad(self.loss, self.params, xs_t, targets)
        rec, aux = self.loss.value
        carry = (add_param_grads(acc, grads), t + 1, add_totals(totals, rec, aux))
        outs = self._outputs(rec, aux)
        return carry, ((factors, outs) if factored else outs)

    def step(self, carry, data):
        return self._one(carry, data, factored=False)

    def factored_block(self, carry, data):
        carry, (factors, outs) = brainstate.transform.scan(lambda c, d: self._one(c, d, True), carry, data)
        acc, t, totals = carry
        acc = add_param_grads(acc, self.alg._factored_param_grads(self.params, factors))
        return (acc, t, totals), outs

    def window(self, carry, data):
        acc, t, totals = carry
        xs_w, ys_w, w_w, _ = data
        k = jnp.shape(jax.tree.leaves(xs_w)[0])[0]
        w = None if self.weights is None else self.weights.window_at(self.weight_value, w_w, t, k)

        def window_loss():
            outs = self.alg._window(tuple(MultiStepData(x) for x in xs_w), stacked=True)
            objective, rec, aux = jax.vmap(self.record)(outs, w, *ys_w)
            return objective.sum(), (rec, aux)

        grad_fn = brainstate.transform.grad(window_loss, self.params, has_aux=True, check_states=False)
        with self._restart(t):
            grads, (rec, aux) = grad_fn()
        carry = (add_param_grads(acc, grads), t + k, add_totals(totals, rec, aux, n=1))
        return carry, self._outputs(rec, aux)

    def finish(self, carry, outs, reduction, loss_output):
        acc, _, totals = carry
        if self.checks_once:  # the steps left the hidden values they wrote to the end of the loop
            self.alg._remember_hidden(self.alg._current_states()[1])
        denom = denominator(totals["count"]) if reduction == "mean" else None
        grads = acc if denom is None else jax.tree.map(lambda g: g / denom.astype(g.dtype), acc)
        losses, masked, aux = outs
        if loss_output == "scalar":
            value = totals["loss"] if denom is None else totals["loss"] / denom
        else:
            value = losses if loss_output == "per_step" else masked
        if self.aux_reduction is not None:
            aux = reduced_aux(totals, self.aux_reduction)
        return grads, value, aux


def _scan_blocks(block, carry, seqs, k):
    """``block(carry, seqs_block)`` over consecutive blocks of ``k`` steps of ``seqs`` (a scan over
    the whole blocks, then the remainder): ``(carry, per-step outputs)``."""
    length = jnp.shape(jax.tree.leaves(seqs)[0])[0]
    n_blocks, rest = divmod(length, k)
    parts = []
    if n_blocks:
        head = jax.tree.map(lambda s: s[: n_blocks * k].reshape((n_blocks, k) + s.shape[1:]), seqs)
        carry, outs = brainstate.transform.scan(block, carry, head)
        parts.append(jax.tree.map(lambda o: o.reshape((n_blocks * k,) + o.shape[2:]), outs))
    if rest:
        carry, outs = block(carry, jax.tree.map(lambda s: s[n_blocks * k :], seqs))
        parts.append(outs)
    if len(parts) == 1:
        return carry, parts[0]
    return carry, jax.tree.map(lambda *p: jnp.concatenate(p), *parts)


def _warn_if_loss_ignores_output(alg, step_fn, sequences, n_in, has_aux=False):
    """Warn when ``step_fn``'s loss does not depend on the model output (its gradient is zero)."""
    out_avals = output_avals(alg)
    targets = [jax.ShapeDtypeStruct(jnp.shape(s)[1:], jnp.result_type(s)) for s in sequences[n_in:]]
    loss = (lambda out, *ys: step_fn(out, *ys)[0]) if has_aux else step_fn
    try:
        closed = jax.make_jaxpr(lambda out, *ys: loss(out, *ys))(out_avals, *targets)
    except Exception:  # a loss that needs concrete values or units: skip the check
        return
    jaxpr = closed.jaxpr
    n_out = len(jax.tree.leaves(out_avals))
    live = {v for v in jaxpr.outvars if isinstance(v, Var)}
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if isinstance(v, Var))
    if not any(v in live for v in jaxpr.invars[:n_out]):
        warnings.warn(
            "etrace_grad: the loss returned by `step_fn` does not depend on the model output (its first "
            "argument), so every online gradient is zero. Compute the loss from the output.",
            UserWarning,
            stacklevel=3,
        )
