"""Errors and diagnostics of the ETP compiler.

Every weight the compiler excludes from online learning, and every approximation it has to make,
becomes a :class:`CompilationRecord` (kept on the graph) and a Python warning naming the weight
and the reason.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from typing import Any, Dict, Optional, Tuple

__all__ = [
    "CompilationError",
    "NotSupportedError",
    "DiagnosticKind",
    "DiagnosticLevel",
    "CompilationRecord",
    "ETraceCompilationWarning",
    "emit",
]


class CompilationError(ValueError):
    """The model cannot be compiled into an eligibility-trace graph as written."""


class NotSupportedError(CompilationError, NotImplementedError):
    """The model uses a construct the compiler refuses rather than mis-handle (e.g. an ETP
    primitive inside ``lax.cond`` / ``scan`` / ``while_loop`` within one step)."""


class ETraceCompilationWarning(UserWarning):
    """Warning category of compiler diagnostics."""


class DiagnosticLevel(enum.Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class DiagnosticKind(enum.Enum):
    #: An ETP primitive's output reaches no hidden state (or only through another trainable ETP op).
    WEIGHT_NOT_REACHING_HIDDEN = "weight_not_reaching_hidden"
    #: A ParamState is used by plain JAX ops only: it gets its within-step gradient.
    PLAIN_PARAMETER = "plain_parameter"
    #: A trainable operand of an ETP primitive depends on something other than parameters.
    TRAINABLE_DEPENDS_ON_STATE = "trainable_depends_on_state"
    #: ``y`` and the hidden states it drives have incompatible shapes.
    SHAPE_MISMATCH = "shape_mismatch"
    #: The ``y -> h`` or ``h -> h`` path mixes units; D-RTRL keeps only per-unit blocks.
    NON_DIAGONAL_PATH = "non_diagonal_path"
    #: Hidden states of different shapes drive each other; the cross terms are dropped.
    CROSS_GROUP_COUPLING = "cross_group_coupling"
    #: A hidden state that no ETP relation drives.
    HIDDEN_WITHOUT_RELATION = "hidden_without_relation"
    #: An integer or boolean hidden state: no gradient, carried like a non-hidden state.
    NON_FLOAT_HIDDEN_STATE = "non_float_hidden_state"
    #: A traced weight also reaches hidden states through plain JAX ops: that recurrence is in no trace.
    WEIGHT_ALSO_PLAIN = "weight_also_plain"
    #: A traced weight moves another, self-recurrent hidden group (a stacked layer) within a step:
    #: its influence carried by that group's own recurrence at later steps is in no trace.
    CROSS_LAYER_INFLUENCE = "cross_layer_influence"
    #: A traced weight's op reads hidden values its own output moves at later steps (a recurrent
    #: weight): D-RTRL and pp_prop drop that path from the traces by design (``D`` holds ETP outputs
    #: fixed), so the gradient is their definition, not BPTT's.
    RECURRENT_ETP_WEIGHT = "recurrent_etp_weight"
    #: An influence-matrix algorithm keeps part of dh/dθ by its definition (SnAp-n drops the entries
    #: reached in more than n steps, UORO keeps a random rank-one estimate): not BPTT's gradient.
    INFLUENCE_APPROXIMATION = "influence_approximation"
    #: A preset's learning signal, trace filter or dropped temporal term differs from the exact
    #: ``dL_t/dh_t`` contraction by its definition (e-prop's random feedback and kappa filter, a
    #: three-factor modulator, OSTLFeedforward without the temporal term): not BPTT's gradient.
    LEARNING_RULE_APPROXIMATION = "learning_rule_approximation"


@dataclasses.dataclass(frozen=True)
class CompilationRecord:
    """One compiler diagnostic: what, about which object, and why.

    Attributes
    ----------
    kind : DiagnosticKind
    level : DiagnosticLevel
    message : str
        The human-readable explanation (also the text of the warning for ``WARNING`` records).
    subject : tuple of str, optional
        The names the record is about: parameter paths (``'layer.weight'``) or hidden-state names.
    primitive : ETPPrimitive, optional
        The ETP primitive the record concerns, when there is one (published field).
    weight_path : tuple, optional
        The path of the one ``ParamState`` the record concerns, as in ``model.states()``
        (``('layer', 'weight')``); ``None`` when it concerns no parameter or several (then
        ``subject`` lists them). Published field.
    hidden_paths : tuple of tuple
        The paths of the hidden states the record concerns, when known (published field).
    context : dict, optional
        Extra structured context (published field; unused by this compiler).

    Examples
    --------
    >>> import braintrace
    >>> rec = braintrace.CompilationRecord(
    ...     braintrace.DiagnosticKind.PLAIN_PARAMETER, braintrace.DiagnosticLevel.INFO,
    ...     "Parameter 'b' is not used by an ETP relation.", ("b",), weight_path=("b",))
    >>> print(rec)
    [info] plain_parameter: Parameter 'b' is not used by an ETP relation.
    >>> rec.weight_path, rec.hidden_paths
    (('b',), ())
    """

    kind: DiagnosticKind
    level: DiagnosticLevel
    message: str
    subject: Optional[Tuple[str, ...]] = None
    primitive: Optional[Any] = None
    weight_path: Optional[Tuple[Any, ...]] = None
    hidden_paths: Tuple[Tuple[Any, ...], ...] = ()
    context: Optional[Dict[str, Any]] = None

    def __str__(self):
        return f"[{self.level.value}] {self.kind.value}: {self.message}"


def emit(
    records: list,
    kind: DiagnosticKind,
    level: DiagnosticLevel,
    message: str,
    subject=None,
    *,
    primitive=None,
    weight_path=None,
    hidden_paths=(),
    context=None,
):
    """Append a record and, for warnings, raise a Python warning with the same text."""
    rec = CompilationRecord(
        kind,
        level,
        message,
        tuple(subject) if subject is not None else None,
        primitive=primitive,
        weight_path=tuple(weight_path) if weight_path is not None else None,
        hidden_paths=tuple(tuple(p) for p in hidden_paths),
        context=context,
    )
    records.append(rec)
    if level is DiagnosticLevel.WARNING:
        warnings.warn(message, ETraceCompilationWarning, stacklevel=4)
    return rec
