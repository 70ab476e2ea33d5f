r"""Grouped (block-diagonal) matmul ETP primitives ``etp_gmm`` (batched) and ``etp_gmv`` (unbatched).

Forward: ``G`` independent ``I -> O`` maps,

.. math:: y_{\dots g o} = \sum_i x_{\dots g i} W_{g i o} \;(+ b_{g o}),

with ``x`` of shape ``(batch, G, I)`` (``etp_gmm``) or ``(G, I)`` (``etp_gmv``), ``W`` ``(G, I, O)``,
``b`` ``(G, O)`` and ``y`` ``(batch, G, O)`` or ``(G, O)``. It equals a dense map with the
block-diagonal weight :math:`\mathrm{diag}(W_1, \dots, W_G)` on the flattened features, with a
weight ``G`` times smaller and a D-RTRL trace ``G`` times smaller than that dense map's.

Invars: ``x, W[, b]``; static param ``has_bias``; trainable layout ``{'weight': 1[, 'bias': 2]}``.

ETP rules (``g = \partial h/\partial y`` for one hidden state, shape of ``y``):

* ``xy_to_dw(x, g, {W, b})`` — the VJP of the op:
  :math:`\partial h/\partial W_{g i o} = \sum_b x_{b g i}\, g_{b g o}`,
  :math:`\partial h/\partial b_{g o} = \sum_b g_{b g o}`.
* ``yw_to_w(d, trace)`` — since :math:`\partial y_{\dots g o}/\partial W_{g' i o'} =
  \delta_{g g'} \delta_{o o'} x_{\dots g i}`, the weight trace is scaled along ``out`` within its
  group: :math:`\epsilon_{W,\dots g i o} \leftarrow d_{\dots g o}\, \epsilon_{W,\dots g i o}`,
  :math:`\epsilon_{b,\dots g o} \leftarrow d_{\dots g o}\, \epsilon_{b,\dots g o}` (``d`` of the
  shape of ``y``, broadcast at axis ``-2`` of the weight trace).
* ``init_drtrl`` — ``{'weight': (B, G, I, O, n)[, 'bias': (B, G, O, n)]}`` for ``etp_gmm``,
  ``{'weight': (G, I, O, n)[, 'bias': (G, O, n)]}`` for ``etp_gmv``; dtype of the weight.
* ``init_pp`` — the output-shaped df trace ``(*y.shape, n)``.

Under ``vmap`` of ``x`` alone, ``etp_gmv`` becomes ``etp_gmm`` and ``etp_gmm`` folds the mapped axis
into its batch axis (the marker stays in the jaxpr).

Registration: the two primitives are registered on first use (the first call of
:func:`grouped_matmul` or :func:`grouped_primitives`), not when ``braintrace`` is imported, so that
until then the registries hold exactly the eight primitives of the specification (whose notebook
prints them). The compiler finds them in any jaxpr that contains them, since binding registers them
first. Module attributes ``etp_gmm_p`` / ``etp_gmv_p`` return the registered primitives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _trace_ops
from ._batching import make_x_batching_rule
from ._registries import ETP_PRIMITIVES
from ._spec import ETPPrimitiveSpec, register_primitive_spec
from ._units import attach, bias_mantissa, split
from .dense import apply_operand_fn

__all__ = ["grouped_primitives", "grouped_matmul"]


def _grouped_impl(*args, has_bias=False):
    x, w = args[0], args[1]
    y = jnp.einsum("...gi,gio->...go", x, w)
    if has_bias:
        y = y + args[2]
    return y


def _grouped_trainable_invars(params):
    """``{'weight': 1}`` or ``{'weight': 1, 'bias': 2}`` depending on ``has_bias``."""
    layout = {"weight": 1}
    if params.get("has_bias", False):
        layout["bias"] = 2
    return layout


def _grouped_yw_to_w(hidden_dim, trace, *, has_bias=False):
    r"""Scale the weight-shaped trace by ``hidden_dim`` along ``out`` within each group.

    ``hidden_dim``: ``(..., G, O)``; ``trace['weight']``: ``(..., G, I, O)``; ``trace['bias']``:
    ``(..., G, O)``.
    """
    out = {"weight": trace["weight"] * jnp.expand_dims(hidden_dim, axis=-2)}
    if has_bias:
        out["bias"] = trace["bias"] * hidden_dim
    return out


def _grouped_xy_to_dw(x, hidden_dim, weights, *, has_bias=False):
    r"""``{'weight': sum_b x_bgi g_bgo[, 'bias': sum_b g_bgo]}``: the VJP of the op with cotangent ``g``."""

    def fwd(w):
        return _grouped_impl(x, w["weight"], *([w["bias"]] if has_bias else []), has_bias=has_bias)

    _, vjp = jax.vjp(fwd, dict(weights))
    return vjp(jnp.asarray(hidden_dim, dtype=jnp.result_type(x, weights["weight"])))[0]


def _gmm_init_drtrl(x_var, y_var, weight_vars, num_hidden_state):
    """``{'weight': zeros(B, G, I, O, n)[, 'bias': zeros(B, G, O, n)]}``."""
    return _trace_ops.param_trace_zeros(x_var.aval.shape[:1], weight_vars, num_hidden_state)


def _gmv_init_drtrl(x_var, y_var, weight_vars, num_hidden_state):
    """``{'weight': zeros(G, I, O, n)[, 'bias': zeros(G, O, n)]}``."""
    return _trace_ops.param_trace_zeros((), weight_vars, num_hidden_state)


_SPECS = {
    name: ETPPrimitiveSpec(
        name=name,
        impl=_grouped_impl,
        yw_to_w=_grouped_yw_to_w,
        xy_to_dw=_grouped_xy_to_dw,
        init_drtrl=init_drtrl,
        init_pp=_trace_ops.output_trace_zeros,
        trainable_invars_fn=_grouped_trainable_invars,
        x_invar_index=0,
        batched=batched,
        batching_rule=make_x_batching_rule(lambda n=name: _registered(n), lambda: _registered("etp_gmm")),
    )
    for name, batched, init_drtrl in (
        ("etp_gmm", True, _gmm_init_drtrl),
        ("etp_gmv", False, _gmv_init_drtrl),
    )
}
_live = {}


def _registered(name):
    """The primitive ``name`` (``'etp_gmm'`` or ``'etp_gmv'``), registered now if it is not."""
    p = _live.get(name)
    if p is None or p not in ETP_PRIMITIVES:
        p = _live[name] = register_primitive_spec(_SPECS[name])
    return p


def grouped_primitives():
    """``(etp_gmm_p, etp_gmv_p)``, registering them on first use (see the module docstring)."""
    return _registered("etp_gmm"), _registered("etp_gmv")


def __getattr__(name):
    if name in ("etp_gmm_p", "etp_gmv_p"):
        return _registered(name[:-2])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def grouped_matmul(x, weight, bias=None, *, weight_fn=None, bias_fn=None):
    r"""ETP-marked grouped (block-diagonal) product :math:`y_{\dots g} = x_{\dots g} f(W)_g \;(+ g(b)_g)`.

    Binds ``etp_gmm`` when ``x.ndim >= 3`` (``(batch, G, I)``; more leading axes are flattened into
    the batch) and ``etp_gmv`` when ``x`` is ``(G, I)``.

    Parameters
    ----------
    x : array or Quantity, shape ``(..., G, I)``
    weight : array or Quantity, shape ``(G, I, O)``
    bias : array or Quantity, shape ``(G, O)``, optional
        Its unit must have the dimension of ``unit(x) * unit(weight)``.
    weight_fn : callable, optional
        Shape-preserving transform :math:`f` of the weight's mantissa (units are split off before
        and put back after), applied with plain JAX ops before the primitive is bound: the
        primitive's trainable operand is ``weight_fn(weight)`` and the online gradient of ``weight``
        is the chain rule through it. ``None`` is the identity.
    bias_fn : callable, optional
        The same for the bias, applied to its mantissa in the unit of the product; ignored without a
        bias.

    Returns
    -------
    array or Quantity of shape ``(..., G, O)``

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> braintrace.grouped_matmul(jnp.ones((8, 4, 3)), jnp.ones((4, 3, 5))).shape
    (8, 4, 5)
    >>> braintrace.grouped_matmul(jnp.ones((2, 3)), jnp.ones((2, 3, 1)), bias=jnp.zeros((2, 1)))
    Array([[3.],
           [3.]], dtype=float32)
    """
    x_m, x_u = split(x)
    w_m, w_u = split(weight)
    x_m, w_m = jnp.asarray(x_m), jnp.asarray(w_m)
    w_m = apply_operand_fn(weight_fn, w_m, name="weight_fn", op="grouped_matmul")
    if w_m.ndim != 3:
        raise ValueError(f"grouped_matmul: `weight` must be 3-D (groups, in, out), got shape {w_m.shape}.")
    if x_m.ndim < 2:
        raise ValueError(
            f"grouped_matmul: `x` must have shape (groups, in) or (batch, groups, in), got {x_m.shape}."
        )
    if x_m.shape[-2:] != w_m.shape[:2]:
        raise ValueError(
            f"grouped_matmul: `x` of shape {x_m.shape} ends with (groups, in) = {x_m.shape[-2:]}, but "
            f"`weight` of shape {w_m.shape} expects {w_m.shape[:2]}; x.shape[-2:] must equal "
            f"weight.shape[:2]."
        )
    unit = x_u * w_u
    operands = [x_m, w_m]
    if bias is not None:
        b_m = jnp.asarray(bias_mantissa(bias, unit, op="grouped_matmul"))
        b_m = apply_operand_fn(bias_fn, b_m, name="bias_fn", op="grouped_matmul")
        if b_m.shape != (w_m.shape[0], w_m.shape[2]):
            raise ValueError(
                f"grouped_matmul: `bias` must have shape {(w_m.shape[0], w_m.shape[2])} = (groups, out), "
                f"got {b_m.shape}."
            )
        operands.append(b_m)
    lead = x_m.shape[:-2]
    if x_m.ndim > 3:
        operands[0] = x_m.reshape((-1, *x_m.shape[-2:]))
    p = _registered("etp_gmv" if x_m.ndim == 2 else "etp_gmm")
    y = p.bind(*operands, has_bias=bias is not None)
    if x_m.ndim > 3:
        y = y.reshape((*lead, *y.shape[-2:]))
    return attach(y, unit)
