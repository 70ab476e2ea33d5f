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
):
    """The body of :meth:`ETraceAlgorithm.etrace_train` (documented there)."""
    if not alg.is_compiled:
        raise RuntimeError("Call `compile_graph` (or braintrace.compile) before `etrace_train`.")
    if step_fn is None or not callable(step_fn):
        raise TypeError("`step_fn` must be a callable `(output, *targets) -> scalar loss`.")
    _check_optimizer(optimizer)
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"`update_every` must be an int >= 1, got {update_every!r}.")
    if losses not in ("mean", "all"):
        raise ValueError(f"`losses` must be 'mean' or 'all', got {losses!r}.")
    n_in = alg._num_inputs
    if len(sequences) < n_in:
        raise ValueError(f"etrace_train needs at least {n_in} input sequence(s), got {len(sequences)}.")
    lengths = {jnp.shape(s)[0] for s in jax.tree.leaves(sequences)}
    if len(lengths) != 1:
        raise ValueError(f"All sequences must share the leading time axis; got lengths {sorted(lengths)}.")
    (length,) = lengths
    alg.follow_shapes(*[jax.tree.map(lambda a: a[0], s) for s in sequences[:n_in]], reset=reset)
    params = alg.model.states(brainstate.ParamState)
    values = {k: v.value for k, v in params.items()}
    if opt_state is None:
        opt_state = optimizer.init(values)
    pending = alg.__dict__.get("_train_pending")
    if reset or pending is None or pending[0] != update_every or pending[2] != id(alg.graph):
        # no gradient of an unfinished block: (update_every, steps into the block, graph, its sum)
        pending = (update_every, 0, id(alg.graph), jax.tree.map(jnp.zeros_like, values))
    _, done, _, acc = pending
    head = min(update_every - done, length) if done else 0
    n_blocks, rest = divmod(length - head, update_every)

    key = (step_fn, id(optimizer), update_every, done, length, bool(reset), losses, id(alg.graph))
    key += (tuple(id(s) for s in params.values()), tuple(id(s) for s in alg._current_states()[0]))
    cache = alg.__dict__.setdefault("_etrace_train_cache", {})
    if key not in cache:

        def step(acc, step_seqs):
            xs_t, ys_t = step_seqs
            grads, loss = alg._step_grad(step_fn, params, xs_t, ys_t)
            return add_param_grads(acc, grads), loss

        def apply(acc, opt_state):
            current = {k: v.value for k, v in params.items()}
            updates, opt_state = optimizer.update(acc, opt_state, current)
            for k, state in params.items():
                state.value = jax.tree.map(jnp.add, current[k], updates[k])
            return jax.tree.map(jnp.zeros_like, acc), opt_state

        def block(carry, block_seqs):
            acc, opt_state = carry
            acc, block_losses = brainstate.transform.scan(step, acc, block_seqs)
            acc, opt_state = apply(acc, opt_state)
            return (acc, opt_state), block_losses

        def run(acc, opt_state, *seqs):
            if reset:
                alg._restore_initial_states()
            data = (seqs[:n_in], seqs[n_in:])
            parts = []
            if head:
                acc, part = brainstate.transform.scan(step, acc, jax.tree.map(lambda s: s[:head], data))
                parts.append(part)
                if done + head == update_every:
                    acc, opt_state = apply(acc, opt_state)
            if n_blocks:
                body = jax.tree.map(
                    lambda s: s[head : head + n_blocks * update_every].reshape(
                        (n_blocks, update_every) + s.shape[1:]
                    ),
                    data,
                )
                (acc, opt_state), part = brainstate.transform.scan(block, (acc, opt_state), body)
                parts.append(part.reshape((-1,)))
            if rest:
                tail = jax.tree.map(lambda s: s[length - rest :], data)
                acc, part = brainstate.transform.scan(step, acc, tail)
                parts.append(part)
            all_losses = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
            return acc, opt_state, all_losses if losses == "all" else jnp.mean(all_losses)

        cache[key] = brainstate.transform.jit(run)
    acc, opt_state, out = cache[key](acc, opt_state, *sequences)
    steps_in_block = (done + length) % update_every
    alg._train_pending = (update_every, steps_in_block, id(alg.graph), acc)
    return opt_state, out
