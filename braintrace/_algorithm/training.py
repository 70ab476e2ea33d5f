r"""Learning inside the sequence: the online gradient applied to the parameters every ``K`` steps.

:meth:`~braintrace.ETraceAlgorithm.etrace_train` runs time-major sequences in one ``jit``-compiled
loop. Each step takes the algorithm's online gradient (as :meth:`etrace_grad` does); every
``update_every`` steps the summed gradient goes through an optax-style optimizer and the update
is written to the model's ``ParamState`` values. The eligibility traces are not reset when the
weights change (the practice of real-time recurrent learning), and neither are the hidden states.

Streams longer than one call are fed in chunks: the model's states, the traces, the optimizer state
(returned and passed back) and the gradient of a block not yet applied (kept by the algorithm) carry
over, so chunks give the same result as one long call.
"""

from __future__ import annotations

from typing import Callable

import brainstate
import jax
import jax.numpy as jnp

from .base import add_param_grads
from .masking import (
    StepLoss,
    add_totals,
    check_reduction,
    check_resets,
    check_step_weights,
    denominator,
    record_shapes,
    step_record,
    zero_totals,
)

__all__ = ["etrace_train"]


def _check_optimizer(optimizer):
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(
            f"`optimizer` must be an optax-style GradientTransformation (with init(params) and "
            f"update(grads, state, params)), got {type(optimizer).__name__}."
        )


def etrace_train(
    alg,
    *sequences,
    step_fn: Callable,
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
    """The body of :meth:`ETraceAlgorithm.etrace_train` (documented there)."""
    if not alg.is_compiled:
        raise RuntimeError("Call `compile_graph` (or braintrace.compile) before `etrace_train`.")
    if step_fn is None or not callable(step_fn):
        raise TypeError("`step_fn` must be a callable `(output, *targets) -> loss`.")
    _check_optimizer(optimizer)
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"`update_every` must be an int >= 1, got {update_every!r}.")
    if losses not in ("mean", "all"):
        raise ValueError(f"`losses` must be 'mean' or 'all', got {losses!r}.")
    reduction = check_reduction(reduction, "sum")
    n_in = alg._num_inputs
    if len(sequences) < n_in:
        raise ValueError(f"etrace_train needs at least {n_in} input sequence(s), got {len(sequences)}.")
    lengths_seen = {jnp.shape(s)[0] for s in jax.tree.leaves(sequences)}
    if len(lengths_seen) != 1:
        raise ValueError(
            f"All sequences must share the leading time axis; got lengths {sorted(lengths_seen)}."
        )
    (length,) = lengths_seen
    weights = check_step_weights(mask, lengths, length)
    reset_kind = check_resets(resets, length)
    alg.follow_shapes(*[jax.tree.map(lambda a: a[0], s) for s in sequences[:n_in]], reset=reset)
    params = alg.model.states(brainstate.ParamState)
    values = {k: v.value for k, v in params.items()}
    if opt_state is None:
        opt_state = optimizer.init(values)
    pending = alg.__dict__.get("_train_pending")
    if reset or pending is None or pending[:2] != (update_every, reduction) or pending[3] != id(alg.graph):
        # no gradient of an unfinished block:
        # (update_every, reduction, steps into the block, graph, gradient sum, weight sum)
        zero = jnp.zeros((), jnp.result_type(float))
        pending = (update_every, reduction, 0, id(alg.graph), jax.tree.map(jnp.zeros_like, values), zero)
    done, acc, block_count = pending[2], pending[4], pending[5]
    head = min(update_every - done, length) if done else 0
    n_blocks, rest = divmod(length - head, update_every)

    key = (step_fn, id(optimizer), update_every, done, length, bool(reset), losses, id(alg.graph))
    key += (tuple(id(s) for s in params.values()), tuple(id(s) for s in alg._current_states()[0]))
    key += (weights, reset_kind, reduction)
    cache = alg._driver_cache("_etrace_train_cache")
    weight_value = mask if lengths is None else lengths
    if key not in cache:
        record = step_record(step_fn, False, weights)
        shapes = record_shapes(alg, record, sequences, n_in, weights, weight_value)

        def run(acc, block_count, opt_state, weight_value, reset_value, *seqs):
            if reset:
                alg._restore_initial_states()
            weight_value = None if weights is None else weights.cast(weight_value)
            loss = StepLoss(record, shapes)

            def at(tree, t):
                # one step of the whole sequences, read in place (no copy of a block of steps)
                return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, t, keepdims=False), tree)

            def step(carry, _):
                acc, block_count, opt_state, t, totals = carry
                if reset_kind is not None:
                    alg._reset_rows(at(reset_value, t))
                w = None
                if weights is not None:
                    w = weights.at(weight_value, at(weight_value, t) if weights.scanned else None, t)
                xs_t = at(seqs[:n_in], t)
                grads, _ = alg._step_grad(loss, params, xs_t, (w, *at(seqs[n_in:], t)))
                rec, _ = loss.value
                totals = add_totals(totals, rec, None)
                carry = (add_param_grads(acc, grads), block_count + rec["count"], opt_state, t + 1, totals)
                return carry, rec["loss"] if losses == "all" else None

            def apply(carry):
                acc, block_count, opt_state, t, totals = carry
                if reduction == "mean":
                    scale = denominator(block_count)
                    acc = jax.tree.map(lambda g: g / scale.astype(g.dtype), acc)
                current = {k: v.value for k, v in params.items()}
                updates, opt_state = optimizer.update(acc, opt_state, current)
                for k, state in params.items():
                    state.value = jax.tree.map(jnp.add, current[k], updates[k])
                zero = jax.tree.map(jnp.zeros_like, acc)
                return zero, jnp.zeros_like(block_count), opt_state, t, totals

            def block(carry, _):
                carry, part = brainstate.transform.scan(step, carry, None, length=update_every)
                return apply(carry), part

            totals = zero_totals(shapes[0], shapes[1], None)
            carry = (acc, block_count, opt_state, jnp.zeros((), jnp.int32), totals)
            parts = []
            if head:
                carry, part = brainstate.transform.scan(step, carry, None, length=head)
                parts.append(part)
                if done + head == update_every:
                    carry = apply(carry)
            if n_blocks:
                carry, part = brainstate.transform.scan(block, carry, None, length=n_blocks)
                parts.append(None if part is None else part.reshape((-1,) + part.shape[2:]))
            if rest:
                carry, part = brainstate.transform.scan(step, carry, None, length=rest)
                parts.append(part)
            acc, block_count, opt_state, _, totals = carry
            if losses == "all":
                out = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
            else:
                out = totals["loss"] / denominator(totals["count"])
            return acc, block_count, opt_state, out

        cache[key] = brainstate.transform.jit(run)
    program = cache[key]
    acc, block_count, opt_state, out = program(acc, block_count, opt_state, weight_value, resets, *sequences)
    steps_in_block = (done + length) % update_every
    alg._train_pending = (update_every, reduction, steps_in_block, id(alg.graph), acc, block_count)
    return opt_state, out
