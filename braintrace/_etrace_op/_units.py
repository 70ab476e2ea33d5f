"""saiunit support shared by the user-facing wrappers.

Wrappers split each quantity into a mantissa and a unit, bind the primitive on mantissas only
and re-attach the combined unit with ``u.maybe_decimal``. A bias is converted into the unit of
``x @ w`` before binding so the addition is dimensionally valid.
"""

from __future__ import annotations

import saiunit as u

__all__ = ["split", "bias_mantissa", "attach"]


def split(value):
    """``(mantissa, unit)`` of a quantity or a plain array (unit ``u.UNITLESS``)."""
    return u.split_mantissa_unit(value)


def bias_mantissa(bias, unit, *, op: str):
    """The mantissa of ``bias`` expressed in ``unit``; a clear error for incompatible units."""
    b_unit = u.get_unit(bias)
    if not b_unit.has_same_dim(unit):
        raise ValueError(
            f"{op}: `bias` has unit {b_unit}, which is incompatible with the unit of x @ weight "
            f"({unit}); give the bias a unit of the same dimension."
        )
    if b_unit == unit:
        return u.get_mantissa(bias)
    # Express the bias in ``unit``, scale included: with x in mV and weight in 1/V the product unit
    # is the dimensionless 10^-3, and a plain bias of 1 has the mantissa 1000 in it.
    return u.Quantity(bias).to_decimal(unit)


def attach(mantissa, unit):
    """``mantissa`` carrying ``unit`` (a plain array when the unit is dimensionless)."""
    return u.maybe_decimal(u.Quantity(mantissa, unit=unit))
