r"""The learning-rule axes: :class:`ETraceConfig`, one point in the space of online rules.

An online rule here is a choice on a few independent axes, each implemented once by the engines
(:class:`~braintrace.ParamDimVjpAlgorithm`, :class:`~braintrace.IODimVjpAlgorithm`, and the
influence-matrix algorithms); the named algorithms (``D_RTRL``, ``pp_prop``, ``EProp``,
``ThreeFactor``, the OSTL presets) are points on these axes.

=====================  ==========================================================================
axis                   values
=====================  ==========================================================================
trace_factorization    ``'per_param'`` (a trace per parameter element and hidden state),
                       ``'io_factorized'`` (input and output factors), ``'random_projection'``
                       (a rank-one random projection of the influence matrix, UORO)
temporal_recursion     the operator :math:`R` that carries the trace from one step to the next:
                       ``'jacobian'`` (the per-unit block :math:`D_t`), ``'scalar_leak'``
                       (:math:`\lambda I`), ``'none'`` (0). A pair ``(x_side, f_side)`` under
                       ``'io_factorized'``
recurrence_scope       how much of :math:`\partial h_t/\partial h_{t-1}` the recursion keeps:
                       ``'diagonal'`` (the per-unit block of the intrinsic dynamics, ETP outputs
                       held fixed), ``'coupled'`` (the per-unit block with the recurrent ETP
                       weights' coupling), ``'sparse_n'`` (SnAp-n), ``'full'`` (RTRL)
learning_signal        what the traces are contracted with: ``'symmetric'``
                       (:math:`\partial L_t/\partial h_t`), ``'random_feedback'`` (a fixed random
                       matrix in place of each trainable op's weight in the backward pass from the
                       hidden states to the outputs), ``'modulatory'`` (a caller's modulator),
                       ``'bootstrapped'`` (:math:`\partial L/\partial h` of a window of steps, plus
                       a learned synthetic gradient at its exit: DNI)
trace_filter           ``'none'`` or ``'kappa'`` (e-prop's low-pass
                       :math:`\bar\epsilon_t = \kappa\bar\epsilon_{t-1} + \epsilon_t`)
update_schedule        ``'per_step'`` (a gradient every step)
=====================  ==========================================================================

The coefficients are ``decay`` (of ``'scalar_leak'`` and of the ``'io_factorized'`` sides),
``kappa`` (of ``'kappa'``), ``sparse_n`` (of ``'sparse_n'``) and ``window_size``.

Coordinates recognised but provided by no engine of this package (``update_schedule='window'`` /
``'sequence_end'``) raise ``NotImplementedError`` naming the field; an engine given a coordinate it
does not compute raises in its constructor.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
from typing import Any, Optional, Tuple, Union

__all__ = ["ETraceConfig", "VOCABULARY"]

#: Every axis and its legal values, the default first.
VOCABULARY = {
    "trace_factorization": ("per_param", "io_factorized", "random_projection"),
    "temporal_recursion": ("jacobian", "scalar_leak", "none"),
    "recurrence_scope": ("diagonal", "coupled", "sparse_n", "full"),
    "learning_signal": ("symmetric", "random_feedback", "modulatory", "bootstrapped"),
    "trace_filter": ("none", "kappa"),
    "update_schedule": ("per_step", "window", "sequence_end"),
}

#: Values accepted by the vocabulary (for code written for the published releases) that no engine
#: here computes: constructing a config with one raises ``NotImplementedError``.
_NOT_PROVIDED = {
    ("update_schedule", "window"): "a weight update every `window_size` steps",
    ("update_schedule", "sequence_end"): "a weight update at the end of the sequence",
}

#: coefficient -> (axis, value that needs it)
_COEFFICIENTS = {
    "kappa": ("trace_filter", "kappa"),
    "sparse_n": ("recurrence_scope", "sparse_n"),
    "window_size": ("update_schedule", "window"),
}


def _unit_interval(value: Any, what: str) -> float:
    """``value`` as a float in ``[0, 1)``; ``TypeError`` / ``ValueError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"ETraceConfig: `{what}` must be a float in [0, 1), got {value!r}.")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"ETraceConfig: `{what}` must lie in [0, 1), got {value}. (A rank r is a keyword of the "
            f"algorithms, `decay_or_rank`, meaning (r - 1) / (r + 1); the config stores the decay.)"
        )
    return value


def _order(value: Any) -> int:
    """The SnAp order as an int >= 1 (``bool`` refused: ``True`` is not an order)."""
    if isinstance(value, bool):
        raise TypeError(f"ETraceConfig: `sparse_n` must be an int >= 1, got {value!r}.")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"ETraceConfig: `sparse_n` must be an int >= 1, got {value!r}.") from None
    if n < 1:
        raise ValueError(f"ETraceConfig: `sparse_n` must be an int >= 1, got {n}.")
    return n


@dataclasses.dataclass(frozen=True)
class ETraceConfig:
    r"""A point on the learning-rule axes (see the module docstring for the axes).

    Built configs are canonical (one spelling per rule) and valid (a combination that makes no
    sense raises at construction, naming the field).

    Parameters
    ----------
    trace_factorization : ``'per_param'``, ``'io_factorized'`` or ``'random_projection'``
        Selects the engine: :class:`~braintrace.ParamDimVjpAlgorithm`,
        :class:`~braintrace.IODimVjpAlgorithm`, or ``braintrace.UORO``.
    temporal_recursion : str or pair of str
        :math:`R` in :math:`\epsilon_t = R_t\,\epsilon_{t-1} + (\partial h_t/\partial\theta)_{\rm now}`
        (``'per_param'``): ``'jacobian'`` (:math:`D_t`), ``'scalar_leak'`` (:math:`\lambda I`, needs
        ``decay``), ``'none'`` (0). Under ``'io_factorized'`` a pair ``(x_side, f_side)``:
        :math:`\epsilon_x \leftarrow \lambda_x \epsilon_x + x_t` (``x_side`` ``'scalar_leak'``, or
        ``'none'`` with :math:`\lambda_x = 0`) and
        :math:`\epsilon_f \leftarrow \lambda_f R_t \epsilon_f + (1-\lambda_f)\,df_t` with
        :math:`R_t` = :math:`D_t` (``'jacobian'``), :math:`I` (``'scalar_leak'``) or 0 (``'none'``).
        A single value under ``'io_factorized'`` means ``('scalar_leak', value)``.
    recurrence_scope : ``'diagonal'``, ``'coupled'``, ``'sparse_n'`` or ``'full'``
    learning_signal : ``'symmetric'``, ``'random_feedback'``, ``'modulatory'`` or ``'bootstrapped'``
        ``'bootstrapped'`` (:class:`~braintrace.DNI`) needs ``trace_factorization='per_param'`` and
        ``recurrence_scope='diagonal'``.
    trace_filter : ``'none'`` or ``'kappa'``
    update_schedule : ``'per_step'``
        (``'window'`` and ``'sequence_end'`` are recognised and not provided.)
    decay : float or pair of floats, optional
        In ``[0, 1)``. Needed by ``'scalar_leak'`` (``'per_param'``) and by ``'io_factorized'``
        (a pair ``(lambda_x, lambda_f)``; one float sets both).
    kappa : float, optional
        The filter coefficient, in ``[0, 1)``; needed by ``trace_filter='kappa'``.
    sparse_n : int, optional
        The SnAp order (``>= 1``); needed by ``recurrence_scope='sparse_n'``.
    window_size : int, optional
        The coefficient of ``update_schedule='window'``.

    Notes
    -----
    Canonical forms: ``'scalar_leak'`` with decay 0 is ``'none'`` (whose decay is 0), on either
    side of ``'io_factorized'`` too (a ``'jacobian'`` output side with decay 0 stays: the exact
    keys of pp_prop still follow :math:`D_t`); ``trace_filter='kappa'`` with ``kappa=0``
    is ``'none'`` (e-prop with :math:`\kappa = 0` is D-RTRL); ``'sparse_n'`` with ``sparse_n=1``
    is ``'coupled'`` (SnAp-1 keeps the per-unit block of the full Jacobian).

    Raises
    ------
    ValueError
        A value outside an axis's vocabulary, a coefficient out of range or without its axis
        value, an axis value without its coefficient, or a combination no rule defines.
    TypeError
        A coefficient of the wrong type.
    NotImplementedError
        A recognised value that no engine of this package computes.

    Examples
    --------
    >>> import braintrace
    >>> braintrace.ETraceConfig().learning_signal
    'symmetric'
    >>> cfg = braintrace.ETraceConfig(trace_factorization='io_factorized', decay=0.9)
    >>> cfg.temporal_recursion, cfg.decay
    (('scalar_leak', 'jacobian'), (0.9, 0.9))
    >>> braintrace.ETraceConfig(trace_filter='kappa', kappa=0.0).trace_filter
    'none'
    >>> braintrace.ETraceConfig(kappa=0.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ETraceConfig: `kappa=0.5` is set but `trace_filter` is 'none'; set trace_filter='kappa' ...
    """

    trace_factorization: str = "per_param"
    temporal_recursion: Union[str, Tuple[str, str]] = "jacobian"
    recurrence_scope: str = "diagonal"
    learning_signal: str = "symmetric"
    trace_filter: str = "none"
    update_schedule: str = "per_step"
    decay: Union[float, Tuple[float, float], None] = None
    kappa: Optional[float] = None
    sparse_n: Optional[int] = None
    window_size: Optional[int] = None

    def __post_init__(self):
        self._check_vocabulary()
        self._canonicalise()
        self._validate()

    # construction -------------------------------------------------------------------------------
    def _set(self, field: str, value):
        object.__setattr__(self, field, value)

    def _check_vocabulary(self):
        for axis, legal in VOCABULARY.items():
            raw = getattr(self, axis)
            if axis == "temporal_recursion" and isinstance(raw, (tuple, list)):
                if len(raw) != 2:
                    raise ValueError(
                        f"ETraceConfig: `temporal_recursion` as a pair must be (x_side, f_side), got {raw!r}."
                    )
                values = tuple(raw)
                self._set(axis, values)
            else:
                values = (raw,)
            for v in values:
                if not isinstance(v, str) or v not in legal:
                    raise ValueError(
                        f"ETraceConfig: `{axis}={v!r}` is not a value of this axis; expected one of "
                        f"{', '.join(map(repr, legal))}."
                    )
        for (axis, value), what in _NOT_PROVIDED.items():
            if getattr(self, axis) == value:
                raise NotImplementedError(
                    f"ETraceConfig: `{axis}={value!r}` ({what}) is a coordinate of the published releases "
                    f"that no engine of this package computes; use {axis}={VOCABULARY[axis][0]!r}."
                )

    def _canonicalise(self):
        if self.trace_factorization == "io_factorized":
            rec = self.temporal_recursion
            if isinstance(rec, str):
                rec = ("scalar_leak", rec) if rec != "none" else ("none", "none")
            decay = self.decay
            if decay is not None and not isinstance(decay, (tuple, list)):
                decay = (decay, decay)
            if decay is not None:
                if len(decay) != 2:
                    raise ValueError(
                        f"ETraceConfig: `decay` under 'io_factorized' is a float or a pair "
                        f"(lambda_x, lambda_f), got {self.decay!r}."
                    )
                decay = tuple(None if d is None else _unit_interval(d, "decay") for d in decay)
            else:
                decay = (None, None)
            sides = []
            for side, (r, d) in zip(("x", "f"), zip(rec, decay)):
                if d == 0.0 and r == "scalar_leak":
                    r = "none"
                if r == "none":
                    if d not in (None, 0.0):
                        raise ValueError(
                            f"ETraceConfig: the {side}-side recursion is 'none' (no memory), so its decay "
                            f"{d} would have no effect; drop it or use 'scalar_leak'."
                        )
                    d = 0.0
                sides.append((r, d))
            self._set("temporal_recursion", (sides[0][0], sides[1][0]))
            self._set("decay", (sides[0][1], sides[1][1]))
        else:
            if isinstance(self.temporal_recursion, tuple):
                raise ValueError(
                    f"ETraceConfig: `temporal_recursion` is a pair only under "
                    f"trace_factorization='io_factorized'; got {self.temporal_recursion!r} with "
                    f"{self.trace_factorization!r}."
                )
            if isinstance(self.decay, (tuple, list)):
                raise ValueError(
                    f"ETraceConfig: `decay` is a pair only under trace_factorization='io_factorized'; got "
                    f"{self.decay!r}."
                )
            if self.decay is not None:
                self._set("decay", _unit_interval(self.decay, "decay"))
            if self.temporal_recursion == "scalar_leak" and self.decay == 0.0:
                self._set("temporal_recursion", "none")
            if self.temporal_recursion == "none":
                if self.decay not in (None, 0.0):
                    raise ValueError(
                        f"ETraceConfig: temporal_recursion='none' keeps no memory, so decay={self.decay} "
                        f"would have no effect; drop it or use temporal_recursion='scalar_leak'."
                    )
                self._set("decay", 0.0)
        if self.kappa is not None:
            self._set("kappa", _unit_interval(self.kappa, "kappa"))
            if self.trace_filter == "kappa" and self.kappa == 0.0:
                self._set("trace_filter", "none")
                self._set("kappa", None)
        if self.sparse_n is not None:
            self._set("sparse_n", _order(self.sparse_n))
            if self.recurrence_scope == "sparse_n" and self.sparse_n == 1:
                self._set("recurrence_scope", "coupled")
                self._set("sparse_n", None)

    def _validate(self):
        for field, (axis, needs) in _COEFFICIENTS.items():
            value, at = getattr(self, field), getattr(self, axis)
            if value is not None and at != needs:
                raise ValueError(
                    f"ETraceConfig: `{field}={value!r}` is set but `{axis}` is {at!r}; set {axis}={needs!r} "
                    f"or drop `{field}`."
                )
            if value is None and at == needs:
                raise ValueError(f"ETraceConfig: {axis}={needs!r} needs its coefficient `{field}`.")
        fact = self.trace_factorization
        if fact == "per_param":
            if self.temporal_recursion == "jacobian" and self.decay is not None:
                raise ValueError(
                    f"ETraceConfig: temporal_recursion='jacobian' takes no `decay` (got {self.decay}); drop "
                    f"it, or use temporal_recursion='scalar_leak'."
                )
            if self.temporal_recursion == "scalar_leak" and self.decay is None:
                raise ValueError("ETraceConfig: temporal_recursion='scalar_leak' needs `decay` in [0, 1).")
        if fact == "io_factorized":
            if None in self.decay:
                raise ValueError(
                    "ETraceConfig: trace_factorization='io_factorized' needs `decay` (a float, or a pair "
                    "(lambda_x, lambda_f))."
                )
            if self.temporal_recursion[0] == "jacobian":
                raise ValueError(
                    "ETraceConfig: the x-side of 'io_factorized' is a leaky copy of the input and has no "
                    "Jacobian; its temporal_recursion is 'scalar_leak' or 'none', got 'jacobian'."
                )
        if fact == "random_projection" and self.temporal_recursion != "jacobian":
            raise ValueError(
                f"ETraceConfig: trace_factorization='random_projection' projects the Jacobian recursion; "
                f"temporal_recursion must be 'jacobian', got {self.temporal_recursion!r}."
            )
        if self.trace_filter == "kappa" and fact != "per_param":
            raise ValueError(
                f"ETraceConfig: trace_filter='kappa' filters the per-parameter trace and needs "
                f"trace_factorization='per_param', got {fact!r} (a filtered sum of factored traces is not "
                f"a product of filtered factors)."
            )
        if self.recurrence_scope != "diagonal":
            side = self.temporal_recursion[1] if fact == "io_factorized" else self.temporal_recursion
            if side != "jacobian":
                raise ValueError(
                    f"ETraceConfig: recurrence_scope={self.recurrence_scope!r} widens the Jacobian "
                    f"recursion, but temporal_recursion is {self.temporal_recursion!r}; use "
                    f"recurrence_scope='diagonal'."
                )
        if self.recurrence_scope in ("sparse_n", "full") and fact == "io_factorized":
            raise ValueError(
                f"ETraceConfig: recurrence_scope={self.recurrence_scope!r} keeps an influence matrix per "
                f"parameter and needs trace_factorization='per_param', got {fact!r}."
            )
        if fact == "random_projection" and self.recurrence_scope not in ("coupled", "full"):
            raise ValueError(
                f"ETraceConfig: trace_factorization='random_projection' (UORO) projects the full "
                f"influence matrix; recurrence_scope must be 'full' (or 'coupled'), got "
                f"{self.recurrence_scope!r}."
            )
        bootstrapped = self.learning_signal == "bootstrapped"
        if bootstrapped and (fact != "per_param" or self.recurrence_scope != "diagonal"):
            raise ValueError(
                f"ETraceConfig: learning_signal='bootstrapped' (DNI) adds a learned exit cotangent to the "
                f"windows of the per-parameter engine; it needs trace_factorization='per_param' and "
                f"recurrence_scope='diagonal', got {fact!r} and {self.recurrence_scope!r}."
            )
        if self.window_size is not None:
            if isinstance(self.window_size, bool) or not isinstance(self.window_size, numbers.Integral):
                raise TypeError(f"ETraceConfig: `window_size` must be an int >= 1, got {self.window_size!r}.")

    # views ------------------------------------------------------------------------------------
    @property
    def is_factorized(self) -> bool:
        """Whether the trace is an input/output factor pair."""
        return self.trace_factorization == "io_factorized"

    def replace(self, **changes) -> "ETraceConfig":
        """A copy with ``changes`` applied (canonicalised and checked again)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """The fields that differ from the default, as ``'axis=value, ...'`` (``'default'`` if none)."""
        default = ETraceConfig()
        parts = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        ]
        return ", ".join(parts) or "default"
