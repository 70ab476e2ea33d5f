r"""Which entries of a batch of sequences count: masks, lengths, resets, and the reductions of the
sequence drivers (``etrace_grad`` in both forms, ``etrace_train``).

A step's loss :math:`\ell_t` is what ``step_fn`` returns: a scalar (already reduced over the batch)
or one loss per batch row, a vector of shape ``(B,)``. The weight :math:`w_t` of the step comes from

* ``mask`` of shape ``(T,)`` (one weight per step, broadcast over the rows of a per-row loss) or
  ``(T, B)`` (one per step and row; needs a per-row loss), boolean or real;
* ``lengths`` of shape ``(B,)``: :math:`w_{t,b} = [t < \mathrm{lengths}_b]` (needs a per-row loss),
  formed step by step inside the loop, so no ``(T, B)`` array is ever stored;
* neither: every entry counts once.

The objective whose online gradient a driver returns is :math:`\sum_t \sum_b w_{t,b}\,\ell_{t,b}`
(``reduction='sum'``), or that sum divided by the number of entries that count,
:math:`\max(\sum_{t,b} w_{t,b},\,1)` (``'mean'``). An entry with weight 0 contributes nothing to
the gradient or to the loss, whatever its (finite) value.

``resets`` of shape ``(T, B)`` (or ``(T,)`` for every row at once), boolean: where
``resets[t, b]``, row ``b`` of every state the step writes is set back to its initial value before
step ``t`` (see :meth:`ETraceAlgorithm._reset_rows`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "StepWeights",
    "StepLoss",
    "step_record",
    "record_shapes",
    "output_avals",
    "check_step_weights",
    "check_resets",
    "check_reduction",
    "check_aux_reduction",
    "weighted_loss",
    "zero_totals",
    "add_totals",
    "denominator",
    "reduced_aux",
]

REDUCTIONS = ("sum", "mean")


def _shape_dtype(x) -> Tuple[Tuple[int, ...], np.dtype]:
    """Shape and dtype of an array, a tracer, a ``jax.ShapeDtypeStruct`` or array-like data."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), np.dtype(x.dtype)
    a = np.asarray(x)
    return a.shape, a.dtype


def _is_concrete(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, list, tuple, int)) or (
        isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
    )


@dataclasses.dataclass(frozen=True)
class StepWeights:
    """The static description of a ``mask`` or ``lengths`` argument (the array itself is passed to
    the compiled loop separately).

    ``kind`` is ``'steps'`` (a ``(T,)`` mask), ``'rows'`` (a ``(T, B)`` mask) or ``'lengths'``;
    ``source`` names the argument in error messages.
    """

    kind: str
    source: str

    @property
    def scanned(self) -> bool:
        """Whether the loop slices the array step by step (a mask) or reads it whole (lengths)."""
        return self.kind != "lengths"

    def at(self, value, sliced, t):
        """The weight of step ``t``: ``()`` or ``(B,)`` (``lead + ...`` for a window's slice)."""
        if self.kind == "lengths":
            return t < value
        return sliced

    def window_at(self, value, sliced, t0, k):
        """The weights of the ``k`` steps from ``t0``: ``(k,)`` or ``(k, B)``."""
        if self.kind == "lengths":
            return (t0 + jnp.arange(k))[:, None] < value[None, :]
        return sliced

    def cast(self, value):
        """The array as the loop uses it: a real mask (bool converted), lengths as integers."""
        if self.kind == "lengths":
            return value
        value = jnp.asarray(value)
        if value.dtype == jnp.bool_ or jnp.issubdtype(value.dtype, jnp.integer):
            value = value.astype(jnp.result_type(float))
        return value


def check_step_weights(mask, lengths, length: int) -> Optional[StepWeights]:
    """Check ``mask`` / ``lengths`` against the sequence length ``length``; ``None`` when neither
    is given. Shapes and dtypes only, plus the values of concrete ``lengths``."""
    if mask is not None and lengths is not None:
        raise ValueError(
            "`mask` and `lengths` exclude each other: give `lengths` (B,) for sequences padded at "
            "their end, or a `mask` (T,) / (T, B) for any other pattern."
        )
    if mask is not None:
        shape, dtype = _shape_dtype(mask)
        if len(shape) not in (1, 2) or shape[0] != length:
            raise ValueError(
                f"`mask` must have shape (T,) or (T, B) with T = {length} (the sequences' leading axis), "
                f"got shape {shape}."
            )
        if not (dtype == np.bool_ or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
            raise TypeError(f"`mask` must hold booleans or real weights, got dtype {dtype}.")
        return StepWeights("steps" if len(shape) == 1 else "rows", "mask")
    if lengths is not None:
        shape, dtype = _shape_dtype(lengths)
        if len(shape) != 1:
            raise ValueError(f"`lengths` must have shape (B,), one length per batch row, got shape {shape}.")
        if not np.issubdtype(dtype, np.integer):
            raise TypeError(f"`lengths` must hold integers (steps per row), got dtype {dtype}.")
        if _is_concrete(lengths):
            values = np.asarray(lengths)
            if values.size and (values.min() < 0 or values.max() > length):
                raise ValueError(
                    f"`lengths` must lie in [0, {length}] (the sequences have {length} steps), got values "
                    f"from {values.min()} to {values.max()}."
                )
        return StepWeights("lengths", "lengths")
    return None


def check_resets(resets, length: int) -> Optional[str]:
    """Check ``resets``: ``'rows'`` for ``(T, B)``, ``'steps'`` for ``(T,)``, ``None`` if absent."""
    if resets is None:
        return None
    shape, dtype = _shape_dtype(resets)
    if len(shape) not in (1, 2) or shape[0] != length:
        raise ValueError(
            f"`resets` must have shape (T, B) (or (T,) for every row at once) with T = {length}, got "
            f"shape {shape}."
        )
    if not (dtype == np.bool_ or np.issubdtype(dtype, np.integer)):
        raise TypeError(f"`resets` must hold booleans (True where a row starts anew), got dtype {dtype}.")
    return "rows" if len(shape) == 2 else "steps"


def check_reduction(reduction, default: str) -> str:
    reduction = default if reduction is None else reduction
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be 'sum' or 'mean', got {reduction!r}.")
    return reduction


def check_aux_reduction(aux_reduction, has_aux: bool) -> Optional[str]:
    if aux_reduction is None:
        return None
    if not has_aux:
        raise ValueError("`aux_reduction` needs has_aux=True (a step_fn returning (loss, aux)).")
    if aux_reduction not in REDUCTIONS:
        raise ValueError(f"`aux_reduction` must be None (stacked), 'sum' or 'mean', got {aux_reduction!r}.")
    return aux_reduction


def weighted_loss(loss, weight, source: str = "mask", lead: Tuple[int, ...] = ()):
    r"""``(objective, record)`` of one step's loss (``lead = (k,)`` for a window of ``k`` steps).

    ``loss`` has shape ``lead`` (one scalar per step) or ``lead + (B,)`` (one per row); ``weight``
    is ``None``, ``lead`` or ``lead + (B,)``. ``objective`` is :math:`\sum w\,\ell` (a scalar);
    ``record`` holds ``loss`` (as returned), ``masked`` (:math:`w\,\ell`, 0 where :math:`w = 0`),
    ``w`` (the weights broadcast to the loss's shape) and ``count`` (:math:`\sum w`).
    """
    loss = jnp.asarray(loss)
    n = len(lead)
    if tuple(loss.shape[:n]) != tuple(lead) or loss.ndim > n + 1:
        per = f"({lead[0]},) or ({lead[0]}, B) for a window of {lead[0]} steps" if lead else "() or (B,)"
        raise ValueError(
            f"step_fn must return a scalar loss per step or one loss per batch row, shape {per}; got "
            f"shape {tuple(loss.shape)}."
        )
    if weight is None:
        w = jnp.ones(loss.shape, loss.dtype)
    else:
        w = jnp.asarray(weight)
        if w.ndim == n + 1:
            if loss.ndim == n:
                raise ValueError(
                    f"`{source}` weighs each batch row, but step_fn returns one scalar loss per step "
                    f"(already reduced over the batch), so the rows cannot be told apart. Return the loss "
                    f"of each row, a vector of shape (B,) (e.g. jnp.mean((out - y) ** 2, axis=-1)), or "
                    f"pass a mask of shape (T,)."
                )
            if w.shape[n] != loss.shape[n]:
                raise ValueError(
                    f"`{source}` has {w.shape[n]} rows but step_fn returns {loss.shape[n]} per-row losses."
                )
        w = jnp.broadcast_to(w.reshape(w.shape + (1,) * (loss.ndim - w.ndim)), loss.shape).astype(loss.dtype)
    masked = jnp.where(w != 0, w * loss, jnp.zeros_like(loss))
    record = {"loss": loss, "masked": masked, "w": w, "count": jnp.sum(w)}
    return jnp.sum(masked), record


def step_record(step_fn, has_aux: bool, weights: Optional[StepWeights]):
    """``record(out, w, *targets) -> (objective, record, aux)`` of one step of this package's form:
    ``step_fn(out, *targets)`` weighed by ``w`` (see :func:`masking.weighted_loss`)."""
    source = "mask" if weights is None else weights.source

    def record(out, w, *targets):
        value = step_fn(out, *targets)
        if has_aux:
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise TypeError(
                    f"has_aux=True: step_fn must return a pair (loss, aux), got {type(value).__name__}."
                )
            loss, aux = value
        else:
            loss, aux = value, None
        objective, rec = weighted_loss(loss, w, source)
        return objective, rec, aux

    return record


def output_avals(alg):
    info = alg.graph.module_info
    leaves = [
        jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in info.jaxpr.outvars[: info.num_out_leaves]
    ]
    return jax.tree.unflatten(info.out_treedef, leaves)


def record_shapes(alg, record, sequences, n_in, weights, weight_value):
    """``(record, aux)`` shapes of one step, from the model's output shapes (nothing runs)."""
    targets = [
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), s) for s in sequences[n_in:]
    ]
    w = None
    if weights is not None:
        shape = tuple(jnp.shape(weight_value))
        w = jax.ShapeDtypeStruct(shape[1:] if weights.scanned else shape, jnp.result_type(float))
    _, rec, aux = jax.eval_shape(record, output_avals(alg), w, *targets)
    return rec, aux


class StepLoss:
    """The loss of one step of this package's form as the algorithm's gradient calls it,
    ``loss(out, w, *targets) -> objective``; the step's record and aux come out through a state
    (brainstate carries a state written inside a differentiated function out of it), read with
    :attr:`value` after the step. Build it inside the compiled loop."""

    def __init__(self, record, shapes):
        self.record = record
        self._dtypes = jax.tree.map(lambda s: s.dtype, shapes)
        self._box = brainstate.ShortTermState(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))

    def __call__(self, out, w, *targets):
        objective, rec, aux = self.record(out, w, *targets)
        self._box.value = jax.tree.map(
            lambda v, d: jax.lax.stop_gradient(jnp.asarray(v).astype(d)), (rec, aux), self._dtypes
        )
        return objective

    @property
    def value(self):
        """``(record, aux)`` of the last step."""
        return self._box.value


def _aux_weight(w, leaf, n):
    """``(weights, axes, count)`` of one aux leaf: per row when the loss is per row and the leaf's
    axis after ``lead`` is the batch (``B``); otherwise one weight per step (a step counts as much
    as its heaviest row). ``axes`` are the leaf's axes the reduction sums over."""
    leaf_shape = jnp.shape(leaf)
    if w.ndim == n + 1 and len(leaf_shape) > n and leaf_shape[n] == w.shape[n]:
        weights, axes = w, tuple(range(n + 1))
    else:
        weights, axes = (w if w.ndim == n else jnp.max(w, axis=-1)), tuple(range(n))
    count = jnp.sum(weights)
    return weights.reshape(weights.shape + (1,) * (len(leaf_shape) - len(axes))), axes, count


def _aux_parts(aux, w, n):
    """``(sums, counts)`` of one step's (or window's) aux under weights ``w`` (see :func:`_aux_weight`)."""
    sums, counts = [], []
    leaves, tree = jax.tree.flatten(aux)
    for leaf in leaves:
        leaf = jnp.asarray(leaf)
        weights, axes, count = _aux_weight(w, leaf, n)
        weights = weights.astype(jnp.result_type(leaf.dtype, w.dtype))
        part = jnp.where(weights != 0, weights * leaf, jnp.zeros((), weights.dtype))
        sums.append(jnp.sum(part, axis=axes))
        counts.append(count.astype(weights.dtype))
    return jax.tree.unflatten(tree, sums), jax.tree.unflatten(tree, counts)


def zero_totals(record_shapes, aux_shapes, aux_reduction, n: int = 0):
    """The loop's running totals, zero, for records shaped like ``record_shapes`` (``eval_shape`` of
    :func:`weighted_loss`'s record) and aux like ``aux_shapes``."""
    loss = record_shapes["masked"]
    totals = {"loss": jnp.zeros((), loss.dtype), "count": jnp.zeros((), loss.dtype)}
    if aux_reduction is not None:
        w = jnp.zeros(record_shapes["w"].shape, record_shapes["w"].dtype)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes)
        totals["aux"] = jax.tree.map(jnp.zeros_like, _aux_parts(zeros, w, n))
    return totals


def add_totals(totals, record, aux, n: int = 0):
    """``totals`` plus one step's (or window's, ``n = 1``) record and aux."""
    out = {
        "loss": totals["loss"] + jnp.sum(record["masked"]),
        "count": totals["count"] + jnp.sum(record["count"]),
    }
    if "aux" in totals:
        parts = _aux_parts(aux, record["w"], n)
        out["aux"] = jax.tree.map(jnp.add, totals["aux"], parts)
    return out


def denominator(count):
    """What ``reduction='mean'`` divides by: the total weight, at least 1."""
    return jnp.maximum(count, 1)


def reduced_aux(totals, aux_reduction) -> Any:
    """The aux reduced over the entries that count: their weighted sum, or its weighted mean."""
    sums, counts = totals["aux"]
    if aux_reduction == "sum":
        return sums
    return jax.tree.map(lambda s, c: s / denominator(c), sums, counts)
