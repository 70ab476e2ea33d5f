"""The sequence driver: scan an online algorithm over time and accumulate its gradients."""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import brainstate
import jax
import jax.numpy as jnp

from braintrace._compatible_imports import Var
from braintrace._input_data import MultiStepData

from .base import ETraceAlgorithm, add_param_grads
from .pp_prop import IODimVjpAlgorithm

__all__ = ["etrace_grad"]

def etrace_grad(
    self: ETraceAlgorithm,
    *sequences,
    step_fn: Optional[Callable] = None,
    return_value: bool = False,
    reset: bool = True,
    solve_every: int = 1,
    window: int = 1,
):
    """The body of :meth:`ETraceAlgorithm.etrace_grad` (documented there)."""
    if not self.is_compiled:
        raise RuntimeError("Call `compile_graph` (or braintrace.compile) before `etrace_grad`.")
    if step_fn is None or not callable(step_fn):
        raise TypeError("`step_fn` must be a callable `(output, *targets) -> scalar loss`.")
    n_in = self._num_inputs
    if len(sequences) < n_in:
        raise ValueError(f"etrace_grad needs at least {n_in} input sequence(s), got {len(sequences)}.")
    lengths = {jnp.shape(s)[0] for s in jax.tree.leaves(sequences)}
    if len(lengths) != 1:
        raise ValueError(f"All sequences must share the leading time axis; got lengths {sorted(lengths)}.")
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
    self.follow_shapes(*[jax.tree.map(lambda a: a[0], s) for s in sequences[:n_in]], reset=reset)
    params = self.model.states(brainstate.ParamState)
    # brainstate's jit keeps the state objects it traced: a model re-initialised with
    # init_all_states (new state objects) needs a new compiled loop.
    key = (
        step_fn,
        bool(return_value),
        bool(reset),
        tuple(id(s) for s in params.values()),
        tuple(id(s) for s in self._current_states()[0]),
        solve_every,
        window,
        id(self.graph),  # a graph compiled again (another batch size) has its own traces and program
    )
    cache = self.__dict__.setdefault("_etrace_grad_cache", {})
    if key not in cache:
        _warn_if_loss_ignores_output(self, step_fn, sequences, n_in)

        def run(*seqs):
            if reset:
                self._restore_initial_states()
            inputs, targets = seqs[:n_in], seqs[n_in:]

            zeros = jax.tree.map(jnp.zeros_like, {k: v.value for k, v in params.items()})
            if windowed:
                return _scan_windows(self, step_fn, params, zeros, (inputs, targets), window)
            if solve_every == 1:

                def body(acc, step_seqs):
                    xs_t, ys_t = step_seqs
                    grads, loss = self._step_grad(step_fn, params, xs_t, ys_t)
                    return jax.tree.map(jnp.add, acc, grads), loss

                return brainstate.transform.scan(body, zeros, (inputs, targets))
            return _scan_in_blocks(self, step_fn, params, zeros, (inputs, targets), solve_every)

        cache[key] = brainstate.transform.jit(run)
    grads, losses = cache[key](*sequences)
    return (grads, losses) if return_value else grads


def _scan_in_blocks(alg, step_fn, params, zeros, seqs, k):
    """The sequence loop with factored weight gradients formed once per block of ``k`` steps (the
    last block holds the remainder): ``(gradients, per-step losses)``."""

    def step(acc, step_seqs):
        xs_t, ys_t = step_seqs
        grads, factors, loss = alg._step_grad(step_fn, params, xs_t, ys_t, factored=True)
        return add_param_grads(acc, grads), (factors, loss)

    def block(acc, block_seqs):
        acc, (factors, losses) = brainstate.transform.scan(step, acc, block_seqs)
        return add_param_grads(acc, alg._factored_param_grads(params, factors)), losses

    return _scan_blocks(block, zeros, seqs, k)


def _scan_windows(alg, step_fn, params, zeros, seqs, k):
    """The sequence loop of the multi-step rule: windows of ``k`` steps (the last holds the
    remainder), each differentiated exactly inside and through the traces at its start."""

    def block(acc, block_seqs):
        xs_w, ys_w = block_seqs

        def window_loss():
            outs = alg._window(tuple(MultiStepData(x) for x in xs_w), stacked=True)
            losses = jax.vmap(step_fn)(outs, *ys_w)
            return losses.sum(), losses

        grads, losses = brainstate.transform.grad(window_loss, params, has_aux=True)()
        return add_param_grads(acc, grads), losses

    return _scan_blocks(block, zeros, seqs, k)


def _scan_blocks(block, acc, seqs, k):
    """``block(acc, seqs_block)`` over consecutive blocks of ``k`` steps of ``seqs`` (a scan over
    the whole blocks, then the remainder): ``(acc, per-step losses)``."""
    length = jnp.shape(jax.tree.leaves(seqs)[0])[0]
    n_blocks, rest = divmod(length, k)
    parts = []
    if n_blocks:
        head = jax.tree.map(lambda s: s[: n_blocks * k].reshape((n_blocks, k) + s.shape[1:]), seqs)
        acc, losses = brainstate.transform.scan(block, acc, head)
        parts.append(losses.reshape((n_blocks * k,)))
    if rest:
        acc, losses = block(acc, jax.tree.map(lambda s: s[n_blocks * k :], seqs))
        parts.append(losses)
    if not parts:
        return acc, jnp.zeros((0,), jnp.float32)
    return acc, jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def _warn_if_loss_ignores_output(alg, step_fn, sequences, n_in):
    """Warn when ``step_fn``'s loss does not depend on the model output (its gradient is zero)."""
    info = alg.graph.module_info
    leaves = [
        jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in info.jaxpr.outvars[: info.num_out_leaves]
    ]
    out_avals = jax.tree.unflatten(info.out_treedef, leaves)
    targets = [jax.ShapeDtypeStruct(jnp.shape(s)[1:], jnp.result_type(s)) for s in sequences[n_in:]]
    try:
        closed = jax.make_jaxpr(lambda out, *ys: step_fn(out, *ys))(out_avals, *targets)
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
