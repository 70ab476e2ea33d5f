"""``ControlFlowPolicy``: the published control-flow knobs, and which of them this compiler provides.

What the compiler does with control flow inside one model step (see
:mod:`braintrace._compiler.control_flow`):

* a ``cond`` / ``switch`` holding ETP primitives is brought to the top level of the step (every
  branch evaluated, the result selected): the published ``cond='convert'``;
* a ``scan`` / ``fori_loop`` holding ETP primitives is unrolled up to ``scan_unroll_limit``
  iterations (``0`` or less: never); a longer one, or a ``while_loop`` holding one, is refused with
  :class:`~braintrace.NotSupportedError` (a ``NotImplementedError``): the published
  ``etp_in_control_flow='error'``, and ``scan_descent='off'``;
* control flow without ETP primitives is kept as it is, the hidden Jacobians taken through it and
  the unit analysis reading its bodies: the published ``while_hidden='opaque-fwd'``.

Accepted: every value this describes, and ``scan_descent='auto'`` (the published default, which
descends into long loops holding ETP primitives: not provided, so such a loop is refused as with
``'off'``, and the error says so) and any positive ``fixpoint_iteration_limit`` (the rewriting here is
one pass from the inside out, so the bound is never reached). ``cond='opaque'`` (refuse ETP
primitives inside a ``cond`` instead of converting it), ``while_hidden='error'`` (refuse weight-free
control flow that computes hidden states) and ``etp_in_control_flow='exclude'`` (drop ETP primitives
inside control flow from online learning with a warning) raise ``NotImplementedError`` naming the
field and value when the policy is used.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ControlFlowPolicy", "check_control_flow_policy", "DESCENT_NOT_PROVIDED"]

_CHOICES = {
    "cond": ("convert", "opaque"),
    "while_hidden": ("opaque-fwd", "error"),
    "etp_in_control_flow": ("error", "exclude"),
    "scan_descent": ("auto", "off"),
}
#: Values this compiler does not implement, with what they would do.
_NOT_PROVIDED = {
    ("cond", "opaque"): "refuse ETP primitives inside a cond instead of bringing them to the top level",
    ("while_hidden", "error"): "refuse weight-free control flow that computes hidden states",
    ("etp_in_control_flow", "exclude"): "drop ETP primitives inside control flow from online learning",
}


_DEFAULTS = {"cond": "convert", "while_hidden": "opaque-fwd", "etp_in_control_flow": "error"}


@dataclasses.dataclass(frozen=True)
class ControlFlowPolicy:
    """How the compiler treats control flow inside one model step (the published policy object).

    Parameters
    ----------
    cond : {'convert', 'opaque'}
        A ``cond`` holding ETP primitives: brought to the top level (``'convert'``, what this compiler
        does) or left, and so refused (``'opaque'``, not provided here).
    scan_unroll_limit : int
        Unroll a ``scan`` / ``fori_loop`` holding ETP primitives up to this many iterations (``<= 0``:
        never).
    while_hidden : {'opaque-fwd', 'error'}
        Weight-free control flow that computes hidden states: kept as a forward node (``'opaque-fwd'``,
        what this compiler does) or refused (``'error'``, not provided here).
    etp_in_control_flow : {'error', 'exclude'}
        An ETP primitive left inside control flow: an error (``'error'``, what this compiler does) or
        excluded from online learning with a warning (``'exclude'``, not provided here).
    scan_descent : {'auto', 'off'}
        A loop holding ETP primitives longer than ``scan_unroll_limit``: descended into (``'auto'``,
        the published default; not provided here, so such a loop is refused as with ``'off'``).
    fixpoint_iteration_limit : int
        The published bound on rewriting sweeps (a positive int; the rewriting here is one pass).

    Notes
    -----
    See :mod:`braintrace._compiler.control_flow_policy` for what each value means here. Invalid
    values raise ``ValueError`` / ``TypeError`` naming the field.

    Examples
    --------
    >>> import braintrace
    >>> policy = braintrace.ControlFlowPolicy(cond='opaque')
    >>> policy.cond, policy.scan_unroll_limit
    ('opaque', 16)
    >>> braintrace.ControlFlowPolicy(scan_descent='sometimes')
    Traceback (most recent call last):
    ...
    ValueError: ControlFlowPolicy.scan_descent must be one of ('auto', 'off'), got 'sometimes'.
    """

    cond: str = "convert"
    scan_unroll_limit: int = 16
    while_hidden: str = "opaque-fwd"
    etp_in_control_flow: str = "error"
    scan_descent: str = "auto"
    fixpoint_iteration_limit: int = 64

    def __post_init__(self):
        for field, allowed in _CHOICES.items():
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"ControlFlowPolicy.{field} must be one of {allowed}, got {value!r}.")
        limit = self.scan_unroll_limit
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"ControlFlowPolicy.scan_unroll_limit must be an int, got {limit!r}.")
        limit = self.fixpoint_iteration_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(
                f"ControlFlowPolicy.fixpoint_iteration_limit must be a positive int, got {limit!r}."
            )


def check_control_flow_policy(control_flow) -> None:
    """Accept ``None`` or a :class:`ControlFlowPolicy` this compiler provides.

    Raises
    ------
    TypeError
        For anything else.
    NotImplementedError
        For ``cond='opaque'``, ``while_hidden='error'`` or ``etp_in_control_flow='exclude'``, naming
        the field and value.
    """
    if control_flow is None:
        return
    if not isinstance(control_flow, ControlFlowPolicy):
        raise TypeError(
            f"`control_flow` must be None or a braintrace.ControlFlowPolicy, got "
            f"{type(control_flow).__name__}."
        )
    for (field, value), what in _NOT_PROVIDED.items():
        if getattr(control_flow, field) == value:
            raise NotImplementedError(
                f"ControlFlowPolicy({field}={value!r}) would {what}; this compiler does not provide it "
                f"(see braintrace._compiler.control_flow_policy). Leave `{field}` at its default "
                f"{_DEFAULTS[field]!r}."
            )


#: Added to the error for a loop holding ETP primitives that is refused under ``scan_descent='auto'``.
DESCENT_NOT_PROVIDED = (
    " (ControlFlowPolicy(scan_descent='auto') would descend into the loop; this compiler does not, so "
    "the loop is refused as with scan_descent='off'.)"
)
