"""Helpers shared by the layers: sizes, input checks, time constants and decay factors."""

from __future__ import annotations

import numbers
from typing import Callable, Sequence, Tuple, Union

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u

__all__ = [
    "Size",
    "to_size",
    "check_trailing_shape",
    "shape_of",
    "check_features",
    "check_time_constant",
    "decay_factor",
    "time_ratio",
    "to_dimensionless",
    "get_activation",
    "init_weight",
    "init_state",
    "get_dt",
    "pick_alias",
]

Size = Union[int, Sequence[int]]


def to_size(size: Size, name: str, owner: str) -> Tuple[int, ...]:
    """``size`` as a tuple of positive ints (an int ``n`` becomes ``(n,)``)."""
    if isinstance(size, bool):
        raise TypeError(f"{owner}: `{name}` must be an int or a tuple of ints, got {size!r}.")
    if isinstance(size, numbers.Integral):
        size = (int(size),)
    try:
        out = tuple(int(s) for s in size)
    except TypeError:
        raise TypeError(f"{owner}: `{name}` must be an int or a tuple of ints, got {size!r}.") from None
    if not out or min(out) < 1:
        raise ValueError(
            f"{owner}: `{name}` must be a positive int or a non-empty tuple of positive ints, got {size!r}."
        )
    return out


def shape_of(x) -> Tuple[int, ...]:
    """The shape of an array, a Quantity or a Python number."""
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else tuple(np.shape(x))


def check_features(x, expected: int, owner: str, what: str = "input features") -> Tuple[int, ...]:
    """Raise ``ValueError`` unless ``x.shape[-1] == expected``; returns ``x``'s shape."""
    shape = shape_of(x)
    if len(shape) == 0:
        raise ValueError(f"{owner}: expected an input of shape (..., {expected}), got a scalar.")
    if shape[-1] != expected:
        raise ValueError(
            f"{owner}: expected {expected} {what} (x.shape[-1] == {expected}), but received x of shape "
            f"{shape} with {shape[-1]}."
        )
    return shape


def check_trailing_shape(x, varshape: Tuple[int, ...], owner: str):
    """Raise ``ValueError`` unless ``x`` is a scalar or its shape ends with ``varshape``."""
    shape = shape_of(x)
    n = len(varshape)
    if shape and (len(shape) < n or shape[len(shape) - n :] != tuple(varshape)):
        raise ValueError(
            f"{owner}: expected an input of shape (..., {', '.join(map(str, varshape))}) "
            f"(in_size={tuple(varshape)}), received shape {shape}."
        )


def check_time_constant(tau, name: str, owner: str):
    """Validate a time constant: positive everywhere (when concrete); returns it unchanged."""
    if tau is None:
        raise ValueError(f"{owner}: `{name}` must be a positive time constant, got None.")
    mantissa = u.get_mantissa(tau)
    if isinstance(mantissa, jax.core.Tracer):
        return tau
    values = np.asarray(mantissa)
    if not np.issubdtype(values.dtype, np.number):
        raise TypeError(f"{owner}: `{name}` must be a number, array or Quantity, got {tau!r}.")
    if values.size == 0 or not np.all(values > 0) or not np.all(np.isfinite(values)):
        raise ValueError(
            f"{owner}: `{name}` must be a positive, finite time constant (e.g. 10. * u.ms), got {tau!r}."
        )
    return tau


def pick_alias(value, default, alias, name: str, alias_name: str, owner: str):
    """``alias`` when it is given (then ``value`` must still be its ``default`` object), else ``value``.

    Used for keywords that have a second, published name (``V_initializer`` for ``V_init``, ...).
    """
    if alias is None:
        return value
    if value is not default:
        raise TypeError(f"{owner}: give `{name}` or its alias `{alias_name}`, not both.")
    return alias


def get_dt(owner: str):
    try:
        return brainstate.environ.get_dt()
    except KeyError:
        raise ValueError(
            f"{owner}: the integration step is not set; call brainstate.environ.set(dt=1. * u.ms) or run "
            f"inside brainstate.environ.context(dt=...)."
        ) from None


def time_ratio(tau, owner: str, name: str = "tau"):
    r""":math:`\Delta t/\tau` as a plain number or array, with ``dt`` from ``brainstate.environ.get_dt()``.

    ``dt`` and ``tau`` must have the same dimension (both times, or both plain numbers).
    """
    dt = get_dt(owner)
    ratio = dt / tau
    if isinstance(ratio, u.Quantity):
        if not ratio.is_unitless:
            raise ValueError(
                f"{owner}: dt ({dt}) and `{name}` ({tau}) must have the same dimension (give both in time "
                f"units, e.g. dt=1. * u.ms and {name}=10. * u.ms); dt / {name} has unit {ratio.unit}."
            )
        ratio = ratio.to_decimal()
    return ratio


def decay_factor(tau, dtype, owner: str, name: str = "tau"):
    r""":math:`e^{-\Delta t/\tau}` in ``dtype`` (see :func:`time_ratio`)."""
    return jnp.exp(-jnp.asarray(time_ratio(tau, owner, name), dtype=dtype))


def to_dimensionless(x, owner: str, what: str):
    """A plain array from a dimensionless Quantity (or the array itself)."""
    if isinstance(x, u.Quantity):
        if not x.is_unitless:
            raise ValueError(f"{owner}: {what} must be dimensionless, got unit {x.unit}.")
        return x.to_decimal()
    return x


def get_activation(activation, owner: str) -> Callable:
    """A callable from a name in ``jax.nn`` / ``jax.numpy`` (``'tanh'``, ``'relu'``, ...) or a callable."""
    if callable(activation):
        return activation
    if isinstance(activation, str):
        for mod in (jax.nn, jnp):
            fn = getattr(mod, activation, None)
            if callable(fn):
                return fn
    raise ValueError(
        f"{owner}: `activation` must be a callable or the name of a function in jax.nn / jax.numpy "
        f"(e.g. 'tanh', 'relu', 'sigmoid'), got {activation!r}."
    )


def init_weight(init, shape, owner: str, name: str):
    """A parameter of exactly ``shape`` from an initializer (``init(shape)``) or an array."""
    shape = tuple(int(s) for s in shape)
    if init is None:
        raise ValueError(f"{owner}: `{name}` needs an initializer or an array of shape {shape}, got None.")
    value = init(shape) if callable(init) else init
    if not isinstance(value, u.Quantity):
        value = jnp.asarray(value)
    if shape_of(value) != shape:
        raise ValueError(f"{owner}: `{name}` must have shape {shape}, got {shape_of(value)}.")
    return value


def init_state(init, size, batch_size, owner: str, name: str):
    """A state value of shape ``(batch_size, *size)`` (or ``size``) from an initializer or an array."""
    size = tuple(size)
    try:
        value = brainstate.nn.init.param(init, size, batch_size=batch_size, allow_none=False)
    except ValueError as err:
        raise ValueError(f"{owner}: cannot initialise `{name}` of size {size}: {err}") from None
    full = ((batch_size,) if batch_size is not None else ()) + size
    if not isinstance(value, u.Quantity):
        value = jnp.asarray(value)
        if not jnp.issubdtype(value.dtype, jnp.inexact):
            value = value.astype(brainstate.environ.dftype())
    if shape_of(value) != full:
        value = u.math.broadcast_to(value, full)
    return value
