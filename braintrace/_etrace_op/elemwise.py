r"""The element-wise ETP primitive ``etp_elemwise`` (identity marker for diagonal weights).

The wrapper :func:`element_wise` computes ``y = fn(w)`` (or ``weight_fn`` of the mantissa) with
ordinary JAX ops and binds the identity primitive on ``y``; JAX differentiates ``fn`` as usual. It is
the only ``gradient_enabled`` built-in: the compiler walks through it.

Invars: ``y``; no static params; trainable layout ``{'weight': 0}``; ``x_invar_index=None``.

ETP rules (primitive view ``y = w``, so :math:`\partial y/\partial w = I`):

* ``xy_to_dw(None, g, {w})`` -> ``{'weight': g}``;
* ``yw_to_w(d, trace)`` -> ``{'weight': d * trace['weight']}`` (same shapes);
* ``init_drtrl`` -> ``{'weight': zeros(*y.shape, n)}``; ``init_pp`` -> ``zeros(*y.shape, n)``.

Under a batched model (``y`` of shape ``(H,)`` feeding states of shape ``(B, H)``) the algorithms
give the trace a leading batch axis, ``(B, H, n)``.
"""

from __future__ import annotations

import jax.numpy as jnp

from ._primitive import register_primitive
from ._trace_ops import output_trace_zeros
from ._units import attach, split
from .dense import apply_operand_fn

__all__ = ["etp_elemwise_p", "element_wise"]


def _elemwise_impl(y):
    return y


def _elemwise_trainable_invars(params):
    return {"weight": 0}


def _elemwise_yw_to_w(hidden_dim, trace):
    """``{'weight': hidden_dim * trace['weight']}``."""
    return {"weight": trace["weight"] * hidden_dim}


def _elemwise_xy_to_dw(x, hidden_dim, weights):
    """``{'weight': hidden_dim}`` (``x`` is unused)."""
    return {"weight": jnp.asarray(hidden_dim)}


def _elemwise_init_drtrl(x_var, y_var, weight_vars, num_hidden_state):
    """``{'weight': zeros(*y.shape, n)}``."""
    return {"weight": jnp.zeros((*y_var.aval.shape, num_hidden_state), dtype=y_var.aval.dtype)}


def _elemwise_batching(args, dims, **params):
    (y,), (d,) = args, dims
    return etp_elemwise_p.bind(y), d


_elemwise_init_pp = output_trace_zeros

etp_elemwise_p = register_primitive(
    "etp_elemwise",
    _elemwise_impl,
    batched=False,
    gradient_enabled=True,
    trainable_invars_fn=_elemwise_trainable_invars,
    x_invar_index=None,
    batching_rule=_elemwise_batching,
)
etp_elemwise_p.register_etp_rules(
    yw_to_w=_elemwise_yw_to_w,
    xy_to_dw=_elemwise_xy_to_dw,
    init_drtrl=_elemwise_init_drtrl,
    init_pp=_elemwise_init_pp,
)


def _identity(w):
    """The default ``fn`` of :func:`element_wise`."""
    return w


def element_wise(weight, fn=_identity, *, weight_fn=None):
    r"""ETP-marked element-wise weight: returns ``fn(weight)`` through ``etp_elemwise``.

    Use it for per-unit parameters (time constants, thresholds, gate biases) that enter the
    dynamics element-wise; the weight then gets an exact per-unit eligibility trace.

    Parameters
    ----------
    weight : array or Quantity
    fn : callable
        Applied to ``weight`` (the quantity itself, so it may change or remove the unit) before the
        marker; identity by default.
    weight_fn : callable, optional
        Shape-preserving transform of the weight's unitless mantissa, the unit put back after
        (``element_wise(w, weight_fn=f)`` is ``f(mantissa(w)) * unit(w)``); applied with plain JAX
        ops before the marker, like ``fn``. Give ``fn`` or ``weight_fn``, not both.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import braintrace
    >>> w = jnp.array([0.5, -0.3])
    >>> braintrace.element_wise(w, fn=jnp.abs)
    Array([0.5, 0.3], dtype=float32)
    >>> braintrace.element_wise(w, weight_fn=jnp.abs)
    Array([0.5, 0.3], dtype=float32)
    """
    if not callable(fn):
        raise TypeError(f"element_wise: `fn` must be callable, got {type(fn).__name__}.")
    if weight_fn is not None:
        if fn is not _identity:
            raise TypeError(
                "element_wise: give `fn` (applied to the quantity) or `weight_fn` (applied to its "
                "mantissa), not both; compose them into one function."
            )
        w_m, w_u = split(weight)
        y_m = apply_operand_fn(weight_fn, jnp.asarray(w_m), name="weight_fn", op="element_wise")
        return attach(etp_elemwise_p.bind(y_m), w_u)
    y = fn(weight)
    y_m, y_u = split(y)
    return attach(etp_elemwise_p.bind(jnp.asarray(y_m)), y_u)
