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

from .masking import (
    add_totals,
    check_aux_reduction,
    check_reduction,
    check_resets,
    check_step_weights,
    denominator,
    reduced_aux,
    weighted_loss,
    zero_totals,
)

__all__ = ["step_fn_runs_the_model", "etrace_grad_driving", "etrace_evolve_driving"]


def step_fn_runs_the_model(alg, step_fn: Callable, sequences) -> bool:
    """Whether ``step_fn(*sequences[t])`` calls ``alg`` (the published form of ``step_fn``).

    Evaluated abstractly on the first step; every state the evaluation wrote is restored afterwards,
    and only those: under an enclosing ``jit``, a state written here would become an output of the
    compiled call (a copy of every parameter per call).
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
            if s.value is not v:
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
    lengths=None,
    resets=None,
    chunk_size: Optional[int] = None,
    weights=None,
    reduction: str = "mean",
    loss_output: str = "per_step",
    has_aux: bool = False,
    aux_reduction: Optional[str] = None,
    return_value: bool = False,
):
    """``etrace_grad`` in the published form (see :meth:`ETraceAlgorithm.etrace_grad`)."""
    length = _lengths(sequences)
    k = _chunk(alg, chunk_size, length, need_multi_step=True)
    reduction = check_reduction(reduction, "mean")
    if loss_output not in ("per_step", "masked", "scalar"):
        raise ValueError(f"`loss_output` must be 'per_step', 'masked' or 'scalar', got {loss_output!r}.")
    aux_reduction = check_aux_reduction(aux_reduction, has_aux)
    step_weights = check_step_weights(mask, lengths, length)
    reset_kind = check_resets(resets, length)
    if reset_kind is not None and k > 1:
        raise ValueError(
            "`resets` starts rows anew between single steps; with chunk_size windows, split the stream "
            "at its episode boundaries instead."
        )
    params = alg.model.states(brainstate.ParamState) if weights is None else weights
    stacked = return_value and loss_output != "scalar"
    key = ("driving", step_fn, k, bool(has_aux), id(alg.graph), tuple(id(s) for s in params.values()))
    key += (tuple(id(s) for s in alg._current_states()[0]), step_weights, reset_kind, aux_reduction)
    key += (bool(stacked), loss_output, reduction)
    cache = alg._driver_cache("_etrace_grad_cache")
    weight_value = mask if lengths is None else lengths
    if key not in cache:
        lead = (k,) if k > 1 else ()
        source = "mask" if step_weights is None else step_weights.source

        def objective(slices, w):
            out = step_fn(*slices)
            if has_aux:
                if not (isinstance(out, (tuple, list)) and len(out) == 2):
                    raise TypeError(
                        f"has_aux=True: step_fn must return a pair (loss, aux), got {type(out).__name__}."
                    )
                loss, aux = out
            else:
                loss, aux = out, None
            total, rec = weighted_loss(loss, w, source, lead)
            return total, (rec, aux)

        shapes = _record_shapes(alg, objective, sequences, k, step_weights, weight_value)

        def run(weight_value, reset_value, *seqs):
            weight_value = None if step_weights is None else step_weights.cast(weight_value)
            zeros = jax.tree.map(jnp.zeros_like, {p: s.value for p, s in params.items()})
            totals = zero_totals(shapes[0], shapes[1], aux_reduction, n=len(lead))

            def body(carry, data):
                acc, t, totals = carry
                slices, w_t, r_t = data
                if reset_kind is not None:
                    alg._reset_rows(r_t)
                if step_weights is None:
                    w = None
                elif k > 1:
                    w = step_weights.window_at(weight_value, w_t, t, k)
                else:
                    w = step_weights.at(weight_value, w_t, t)
                grad_fn = brainstate.transform.grad(objective, params, has_aux=True, check_states=False)
                grads, (rec, aux) = grad_fn(slices, w)
                outs = (
                    rec["loss"] if stacked else None,
                    rec["masked"] if stacked else None,
                    aux if aux_reduction is None else None,
                )
                carry = (jax.tree.map(jnp.add, acc, grads), t + k, add_totals(totals, rec, aux, n=len(lead)))
                return carry, outs

            scanned_w = weight_value if step_weights is not None and step_weights.scanned else None
            if k > 1:
                data = (_windows(seqs, k), _windows([scanned_w], k)[0], None)
            else:
                data = (list(seqs), scanned_w, reset_value)
            init = (zeros, jnp.zeros((), jnp.int32), totals)
            (acc, _, totals), (losses, masked, aux) = brainstate.transform.scan(body, init, data)
            denom = denominator(totals["count"]) if reduction == "mean" else None
            grads = acc if denom is None else jax.tree.map(lambda g: g / denom.astype(g.dtype), acc)
            if loss_output == "scalar":
                value = totals["loss"] if denom is None else totals["loss"] / denom
            else:
                value = losses if loss_output == "per_step" else masked
                if value is not None and k > 1:
                    value = value.reshape((-1,) + value.shape[2:])
            if aux_reduction is not None:
                aux = reduced_aux(totals, aux_reduction)
            return grads, value, aux

        cache[key] = brainstate.transform.jit(run)
    grads, value, aux = cache[key](weight_value, resets, *sequences)
    out = (grads,) + ((value,) if return_value else ()) + ((aux,) if has_aux else ())
    return out[0] if len(out) == 1 else out


def _record_shapes(alg, objective, sequences, k, step_weights, weight_value):
    """``(record, aux)`` shapes of one step (or window) of ``objective``, from an abstract
    evaluation of ``step_fn`` on the first slices (no state changes)."""
    lead = (k,) if k > 1 else ()
    slices = [jax.tree.map(lambda a: jax.ShapeDtypeStruct(lead + a.shape[1:], a.dtype), s) for s in sequences]
    w = None
    if step_weights is not None:
        shape = tuple(jnp.shape(weight_value))
        per_row = shape[1:] if step_weights.scanned else shape
        if step_weights.kind == "steps":
            per_row = ()
        w = jax.ShapeDtypeStruct(lead + tuple(per_row), jnp.result_type(float))
    _, (rec, aux) = brainstate.transform.eval_shape(objective, slices, w)
    return rec, aux


def etrace_evolve_driving(alg, sequences, step_fn=None, chunk_size=None, return_outputs=False):
    """``etrace_evolve`` in the published form (see :meth:`ETraceAlgorithm.etrace_evolve`)."""
    length = _lengths(sequences)
    k = _chunk(alg, chunk_size, length, need_multi_step=False)
    key = ("evolve", step_fn, k, bool(return_outputs), id(alg.graph))
    key += (tuple(id(s) for s in alg._current_states()[0]),)
    cache = alg._driver_cache("_etrace_evolve_cache")
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
