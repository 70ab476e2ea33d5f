"""``SequenceDriverMixin``: the published sequence drivers over three hooks.

``etrace_grad(*sequences, step_fn=...)`` scans time-major sequences; at each step ``step_fn(*slices)``
runs the learner once and returns the step's loss, and the step's gradient (the learner's online
rule under ``brainstate.transform.grad``) is weighted by ``mask`` and summed. ``etrace_evolve``
drives the learner without a loss. The mixin owns the loop, the accumulation and the reduction; an
object using it provides:

* ``_seq_call``: what ``etrace_evolve`` calls without a ``step_fn`` (the object itself);
* ``_seq_param_states``: the default ``ParamState`` dict to differentiate;
* ``_seq_vjp_method``: the learner's ``vjp_method`` (windows need ``'multi-step'``);
* ``_seq_is_vmapped``: ``True`` refuses windows (a ``(k, batch, ...)`` slice under ``vmap`` would
  map time as the batch axis).

:class:`~braintrace.ETraceAlgorithm` keeps its own drivers (which also take this package's form of
``step_fn``); :class:`~braintrace.ETraceVmap` uses these.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import brainstate
import jax
import jax.numpy as jnp

from braintrace._input_data import MultiStepData, SingleStepData

__all__ = ["SequenceDriverMixin"]


def _length(sequences) -> int:
    if not sequences:
        raise ValueError("etrace_grad / etrace_evolve need at least one time-major sequence.")
    is_data = lambda x: isinstance(x, (SingleStepData, MultiStepData))  # noqa: E731
    if any(is_data(leaf) for leaf in jax.tree.leaves(sequences, is_leaf=is_data)):
        raise TypeError(
            "A sequence may not be a SingleStepData / MultiStepData wrapper; wrap the model's inputs "
            "inside step_fn instead."
        )
    shapes = [jnp.shape(a) for a in jax.tree.leaves(sequences)]
    if not shapes or any(len(s) == 0 for s in shapes):
        raise ValueError("Every sequence leaf needs a leading time axis (scalars have none).")
    lengths = sorted({s[0] for s in shapes})
    if len(lengths) != 1:
        raise ValueError(f"The sequences must share their leading time axis; got lengths {lengths}.")
    if lengths[0] == 0:
        raise ValueError("The sequences have no step (T == 0).")
    return lengths[0]


def _windows(tree, k: int):
    return jax.tree.map(lambda a: a.reshape((a.shape[0] // k, k) + a.shape[1:]), tree)


class SequenceDriverMixin:
    """Base of the objects that drive a learner over sequences (published name).

    Provides :meth:`etrace_grad` and :meth:`etrace_evolve` in the published form over the hooks
    listed in :mod:`braintrace._algorithm.sequence`.
    """

    #: Windows are refused when true (set by :class:`~braintrace.ETraceVmap`).
    _seq_is_vmapped: bool = False

    @property
    def _seq_call(self) -> Callable:
        return self

    @property
    def _seq_param_states(self):  # pragma: no cover - provided by the subclass
        raise NotImplementedError

    @property
    def _seq_vjp_method(self) -> Optional[str]:  # pragma: no cover - provided by the subclass
        raise NotImplementedError

    def _seq_chunk(self, chunk_size, length: int, for_grad: bool) -> int:
        if chunk_size is None:
            return 1
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"`chunk_size` must be None or a Python int, got {chunk_size!r}.")
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be at least 1, got {chunk_size}.")
        if chunk_size == 1:
            return 1
        if self._seq_is_vmapped:
            raise ValueError(
                f"`chunk_size={chunk_size}` (windows) is not supported under a vmapped learner: a "
                f"(chunk_size, batch, ...) slice would map time as the batch axis. Use the batched "
                f"learner (braintrace.compile(..., batch_size=...)) or chunk_size=None."
            )
        if for_grad and self._seq_vjp_method != "multi-step":
            raise ValueError(
                f"`chunk_size={chunk_size}` drives windows, which need a learner built with "
                f"vjp_method='multi-step' (this one: {self._seq_vjp_method!r})."
            )
        if length % chunk_size:
            raise ValueError(f"`chunk_size={chunk_size}` must divide the sequence length {length}.")
        return chunk_size

    def etrace_grad(
        self,
        *sequences: Any,
        step_fn: Callable,
        mask: Any = None,
        chunk_size: Optional[int] = None,
        weights: Any = None,
        reduction: str = "mean",
        loss_output: str = "per_step",
        has_aux: bool = False,
        return_value: bool = False,
    ):
        r"""Sum the online gradients of ``step_fn``'s losses over time-major ``sequences``.

        Parameters
        ----------
        *sequences
            Pytrees whose leaves share a leading length ``T``, sliced in lockstep for ``step_fn``.
        step_fn : callable
            ``step_fn(*slices_t) -> loss_t``: runs the learner once and returns a scalar loss (a
            ``(k,)`` vector of per-step losses with ``chunk_size=k``).
        mask : array, optional
            ``(T,)`` loss weights (all ones by default).
        chunk_size : int, optional
            Windows of ``k`` steps for a multi-step learner (``None`` or ``1``: single steps).
        weights : dict, optional
            The ``ParamState`` dict to differentiate (default: the learner's parameters).
        reduction : {'mean', 'sum'}
            ``'mean'`` divides the summed gradient by ``max(sum(mask), 1)``.
        loss_output : {'per_step', 'masked', 'scalar'}
            What ``return_value=True`` returns: the losses ``(T,)``, the masked losses, or the
            reduced objective.
        has_aux : bool
            ``step_fn`` returns ``(loss, aux)``; the per-step ``aux`` are stacked.
        return_value : bool

        Returns
        -------
        ``grads``, ``(grads, value)``, ``(grads, aux)`` or ``(grads, value, aux)``.
        """
        if not callable(step_fn):
            raise TypeError("`step_fn` must be a callable `(*slices) -> loss` that runs the learner.")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}.")
        if loss_output not in ("per_step", "masked", "scalar"):
            raise ValueError(f"`loss_output` must be 'per_step', 'masked' or 'scalar', got {loss_output!r}.")
        length = _length(sequences)
        k = self._seq_chunk(chunk_size, length, for_grad=True)
        mask = jnp.ones((length,)) if mask is None else jnp.asarray(mask)
        if mask.shape != (length,):
            raise ValueError(f"`mask` must have shape ({length},), got {mask.shape}.")
        params = self._seq_param_states if weights is None else weights

        def objective(slices, m):
            out = step_fn(*slices)
            loss, aux = out if has_aux else (out, None)
            want = (k,) if k > 1 else ()
            if jnp.shape(loss) != want:
                raise ValueError(f"step_fn must return a loss of shape {want}, got {jnp.shape(loss)}.")
            return jnp.sum(m * loss), (loss, aux)

        grad_fn = brainstate.transform.grad(objective, params, has_aux=True, check_states=False)

        def body(acc, data):
            slices, m = data
            grads, (loss, aux) = grad_fn(slices, m)
            return jax.tree.map(jnp.add, acc, grads), (loss, aux)

        zeros = jax.tree.map(jnp.zeros_like, {p: s.value for p, s in params.items()})
        data = (_windows(sequences, k), mask.reshape((-1, k))) if k > 1 else (sequences, mask)
        grads, (losses, aux) = brainstate.transform.scan(body, zeros, data)
        losses = losses.reshape((length,))
        denom = jnp.maximum(jnp.sum(mask), 1.0) if reduction == "mean" else 1.0
        grads = jax.tree.map(lambda g: g / denom, grads)
        value = {"per_step": losses, "masked": losses * mask, "scalar": jnp.sum(losses * mask) / denom}
        out = (grads,) + ((value[loss_output],) if return_value else ()) + ((aux,) if has_aux else ())
        return out[0] if len(out) == 1 else out

    def etrace_evolve(
        self,
        *sequences: Any,
        step_fn: Optional[Callable] = None,
        chunk_size: Optional[int] = None,
        return_outputs: bool = False,
    ):
        """Drive the learner over ``sequences`` without a loss (hidden states and traces advance).

        Without ``step_fn`` the learner is called with the slices (wrapped in ``MultiStepData`` for
        windows); returns the stacked outputs with ``return_outputs=True``, else ``None``.
        """
        length = _length(sequences)
        k = self._seq_chunk(chunk_size, length, for_grad=False)
        call = self._seq_call

        def body(_, slices):
            if step_fn is not None:
                out = step_fn(*slices)
            elif k > 1:
                out = call(*[MultiStepData(s) for s in slices])
            else:
                out = call(*slices)
            return None, out if return_outputs else None

        data = _windows(sequences, k) if k > 1 else sequences
        return brainstate.transform.scan(body, None, data)[1]
