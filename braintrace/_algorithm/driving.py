r"""The sequence driver in the form of the published 0.2 releases: ``step_fn`` runs the model itself.

``learner.etrace_grad(*sequences, step_fn=f)`` with ``f(*slices_t)`` calling the learner once and
returning the step's loss (the published form) is told apart from this package's form
(``f(output, *targets)``, the learner called by the driver) by a probe: ``f`` is evaluated
abstractly on the first step's slices and the calls it makes to the learner are counted.

Each step's gradient is that of the learner under ``brainstate.transform.grad`` (the per-step
online rule: the trace update in the forward pass, its solve in the backward pass), weighted by
``mask`` and summed; ``reduction='mean'`` divides by the total mask weight.
"""

from __future__ import annotations

from typing import Callable, Optional

import brainstate
import jax
import jax.numpy as jnp

from braintrace._input_data import MultiStepData, SingleStepData

__all__ = ["step_fn_runs_the_model", "etrace_grad_driving", "etrace_evolve_driving"]


def step_fn_runs_the_model(alg, step_fn: Callable, sequences) -> bool:
    """Whether ``step_fn(*sequences[t])`` calls ``alg`` (the published form of ``step_fn``).

    Evaluated abstractly on the first step; every state's value is restored afterwards.
    """
    slices = [jax.tree.map(lambda a: a[0], s) for s in sequences]
    states = list(alg.states().values())
    saved = [s.value for s in states]
    calls = [0]
    alg.__dict__["_call_probe"] = calls
    try:
        jax.eval_shape(lambda *a: step_fn(*a), *slices)
    except Exception:  # noqa: BLE001 - a step_fn of the other form may fail on these arguments
        pass
    finally:
        del alg.__dict__["_call_probe"]
        for s, v in zip(states, saved):
            s.value = v
    return calls[0] > 0


def _lengths(sequences):
    if not sequences:
        raise ValueError("etrace_grad needs at least one sequence.")
    for s in jax.tree.leaves(sequences, is_leaf=lambda x: isinstance(x, (SingleStepData, MultiStepData))):
        if isinstance(s, (SingleStepData, MultiStepData)):
            raise TypeError(
                "etrace_grad: a sequence may not be a SingleStepData / MultiStepData wrapper; wrap the "
                "model's inputs inside step_fn instead."
            )
    lengths = {jnp.shape(s)[0] for s in jax.tree.leaves(sequences)}
    if len(lengths) != 1:
        raise ValueError(f"All sequences must share the leading time axis; got lengths {sorted(lengths)}.")
    (length,) = lengths
    if length == 0:
        raise ValueError("etrace_grad: the sequences have no step (T == 0).")
    return length


def _chunk(alg, chunk_size, length, need_multi_step):
    if chunk_size is None:
        return 1
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"`chunk_size` must be None or a Python int, got {chunk_size!r}.")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
    if chunk_size > 1:
        if need_multi_step and getattr(alg, "vjp_method", None) != "multi-step":
            raise ValueError(
                f"`chunk_size={chunk_size}` drives windows, which need an algorithm built with "
                f"vjp_method='multi-step'."
            )
        if length % chunk_size:
            raise ValueError(f"`chunk_size={chunk_size}` must divide the sequence length {length}.")
    return chunk_size


def _windows(sequences, k):
    return [jax.tree.map(lambda a: a.reshape((a.shape[0] // k, k) + a.shape[1:]), s) for s in sequences]


def etrace_grad_driving(
    alg,
    sequences,
    step_fn: Callable,
    mask=None,
    chunk_size: Optional[int] = None,
    weights=None,
    reduction: str = "mean",
    loss_output: str = "per_step",
    has_aux: bool = False,
    return_value: bool = False,
):
    """``etrace_grad`` in the published form (see :meth:`ETraceAlgorithm.etrace_grad`)."""
    length = _lengths(sequences)
    k = _chunk(alg, chunk_size, length, need_multi_step=True)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}.")
    if loss_output not in ("per_step", "masked", "scalar"):
        raise ValueError(f"`loss_output` must be 'per_step', 'masked' or 'scalar', got {loss_output!r}.")
    mask = jnp.ones((length,)) if mask is None else jnp.asarray(mask)
    if mask.shape != (length,):
        raise ValueError(f"`mask` must have shape ({length},), got {mask.shape}.")
    params = alg.model.states(brainstate.ParamState) if weights is None else weights
    key = ("driving", step_fn, k, bool(has_aux), id(alg.graph), tuple(id(s) for s in params.values()))
    key += (tuple(id(s) for s in alg._current_states()[0]),)
    cache = alg.__dict__.setdefault("_etrace_grad_cache", {})
    if key not in cache:

        def run(mask, *seqs):
            zeros = jax.tree.map(jnp.zeros_like, {p: s.value for p, s in params.items()})

            def body(acc, data):
                m, slices = data

                def objective():
                    out = step_fn(*slices)
                    loss, aux = out if has_aux else (out, None)
                    if k > 1 and jnp.shape(loss) != (k,):
                        raise ValueError(
                            f"step_fn must return {k} per-step losses in a window, got {jnp.shape(loss)}."
                        )
                    if k == 1 and jnp.shape(loss) != ():
                        raise ValueError(f"step_fn must return a scalar loss, got shape {jnp.shape(loss)}.")
                    return jnp.sum(m * loss), (loss, aux)

                grads, (loss, aux) = brainstate.transform.grad(objective, params, has_aux=True)()
                return jax.tree.map(jnp.add, acc, grads), (loss, aux)

            if k > 1:
                data = (mask.reshape((-1, k)), _windows(seqs, k))
            else:
                data = (mask, list(seqs))
            grads, (losses, aux) = brainstate.transform.scan(body, zeros, data)
            return grads, losses.reshape((-1,)), aux

        cache[key] = brainstate.transform.jit(run)
    grads, losses, aux = cache[key](mask, *sequences)
    denom = jnp.maximum(jnp.sum(mask), 1.0) if reduction == "mean" else 1.0
    grads = jax.tree.map(lambda g: g / denom, grads)
    if loss_output == "per_step":
        value = losses
    elif loss_output == "masked":
        value = losses * mask
    else:
        value = jnp.sum(losses * mask) / denom
    out = (grads,) + ((value,) if return_value else ()) + ((aux,) if has_aux else ())
    return out[0] if len(out) == 1 else out


def etrace_evolve_driving(alg, sequences, step_fn=None, chunk_size=None, return_outputs=False):
    """``etrace_evolve`` in the published form (see :meth:`ETraceAlgorithm.etrace_evolve`)."""
    length = _lengths(sequences)
    k = _chunk(alg, chunk_size, length, need_multi_step=False)
    key = ("evolve", step_fn, k, bool(return_outputs), id(alg.graph))
    key += (tuple(id(s) for s in alg._current_states()[0]),)
    cache = alg.__dict__.setdefault("_etrace_evolve_cache", {})
    if key not in cache:

        def run(*seqs):
            def body(_, slices):
                if step_fn is not None:
                    out = step_fn(*slices)
                elif k > 1:
                    out = alg(*[MultiStepData(s) for s in slices])
                else:
                    out = alg(*slices)
                return None, out if return_outputs else None

            data = _windows(seqs, k) if k > 1 else list(seqs)
            return brainstate.transform.scan(body, None, data)[1]

        cache[key] = brainstate.transform.jit(run)
    return cache[key](*sequences)
