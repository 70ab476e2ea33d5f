r"""Convolution ETP primitive ``etp_conv`` (always batched).

Forward: :math:`y = \mathrm{conv}(x, K) \;(+ b)`, ``jax.lax.conv_general_dilated`` with every one
of its layout parameters, plus an optional bias of shape ``(C_out,)`` added along the output
feature axis. ``x`` always carries a batch axis (``x.ndim == kernel.ndim``). Shapes below are in
the canonical order; the arrays themselves keep the layout given by ``dimension_numbers``
(``NCHW/OIHW/NCHW`` by default, ``NHWC/HWIO/NHWC``, ``NWC/WIO/NWC``, ...):
``x: (B, C_in, *spatial_in)``, ``K: (C_out, C_in / G, *k)``, ``y: (B, C_out, *spatial_out)``.

Invars: ``x, K[, b]``. Static params: ``has_bias, strides, padding, lhs_dilation, rhs_dilation,
feature_group_count, batch_group_count, dimension_numbers`` (all hashable). Trainable layout
``{'weight': 1[, 'bias': 2]}``.

The unit of a conv relation is one output element ``(b, p, c)`` (batch, output position, output
channel): a hidden state fed by ``y`` has ``y``'s shape, and ``d``, ``df``, ``ct`` are per output
element. With ``P[b, p, ci, *k]`` the input patch seen by output position ``p`` (the same patch
for every output channel), :math:`y_{bpc} = \sum_{ci, k} P_{b,p,ci,k} K_{c,ci,k}` for
``feature_group_count=1``; with ``G`` groups output channel ``c`` reads the input channels of its
group.

ETP rules (``g = \partial h/\partial y`` for one hidden state, ``y``-shaped):

* ``xy_to_dw(x, g, {K, b})`` — the VJP of the op, summed over batch and positions:
  :math:`\partial h/\partial K_{c,ci,k} = \sum_{b,p} P_{b,p,ci,k}\, g_{bpc}`,
  :math:`\partial h/\partial b_c = \sum_{b,p} g_{bpc}`.
* D-RTRL trace, per output position (exact when ``D`` varies over positions):
  ``{'weight': (B, *spatial_out, *K.shape, n)[, 'bias': (B, *spatial_out, C_out, n)]}``, the
  kernel part in the kernel's own layout, ``spatial_out`` in the order of the spatial dims of
  ``dimension_numbers``. Per position the instantaneous term is :math:`P_{b,p,ci,k}\, g_{bpc}`
  (weight) and :math:`g_{bpc}` (bias); summed over ``b`` and ``p`` it is ``xy_to_dw``.
* ``yw_to_w(d, trace)`` — on the per-position trace: since :math:`\partial y_{bpc'}/\partial K_{c,ci,k}`
  is non-zero only for :math:`c' = c`, ``d[b, p, c]`` multiplies ``trace[b, p, ...]`` broadcast over
  the kernel's spatial and input-channel axes; the bias trace ``(B, *spatial_out, C_out)`` is scaled
  element-wise. Hence, per key, ``sum_{b,p} yw_to_w(v, inst(x, g)) == xy_to_dw(x, v * g)``.
* ``init_drtrl(x_var, y_var, weight_vars, n, **params)`` — zeros in the per-position layout above
  (dtype of each weight); it needs the equation's static params to find the spatial axes of ``y``.
* ``init_pp`` — the output-shaped df trace ``(*y.shape, n)``, dtype of ``y``.

Because ``xy_to_dw`` sums over positions, the rule-derived D-RTRL update cannot fill a
per-position trace; the conv registers its own :class:`~braintrace._etrace_op._trace_ops.DRTRLTraceOps`
(update ``eps[..., s] = sum_j d[..., s, j] eps[..., j] + P g[..., s]``, solve
``sum_b sum_p sum_s ct eps``). It supports every layout and feature groups; ``batch_group_count > 1``
raises ``NotImplementedError`` there (the primitive itself, its VJP-based ``xy_to_dw`` and pp_prop
work in every configuration).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._batching import make_x_batching_rule
from ._spec import ETPPrimitiveSpec, register_primitive_spec
from ._trace_ops import ETP_DRTRL_TRACE_OPS, DRTRLTraceOps, output_trace_zeros
from ._units import attach, bias_mantissa, split
from .dense import apply_operand_fn

__all__ = ["etp_conv_p", "conv"]


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


def _dnums(ndim, dimension_numbers):
    """``ConvDimensionNumbers`` (lhs/rhs/out specs as axis tuples) for arrays of rank ``ndim``."""
    ones = (1,) * ndim
    return lax.conv_dimension_numbers(ones, ones, dimension_numbers)


def _conv_impl(
    *args,
    has_bias=False,
    strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    feature_group_count=1,
    batch_group_count=1,
    dimension_numbers=None,
):
    x, kernel = args[0], args[1]
    y = lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
    )
    if has_bias:
        feature_axis = _dnums(y.ndim, dimension_numbers).out_spec[1]
        shape = [1] * y.ndim
        shape[feature_axis] = -1
        y = y + args[2].reshape(shape)
    return y


def _conv_trainable_invars(params):
    """``{'weight': 1}`` or ``{'weight': 1, 'bias': 2}`` depending on ``has_bias``."""
    layout = {"weight": 1}
    if params.get("has_bias", False):
        layout["bias"] = 2
    return layout


# ---------------------------------------------------------------------------------------------
# Per-position layout helpers
# ---------------------------------------------------------------------------------------------


def _y_to_units(v, dn, n_extra):
    """``(*y.shape, *extra)`` -> ``(B, *spatial_out, C_out, *extra)``."""
    ndim_y = v.ndim - n_extra
    ob, of, *osp = dn.out_spec
    return jnp.transpose(v, (ob, *osp, of, *range(ndim_y, v.ndim)))


def _units_to_kernel(u, dn, kernel_ndim, n_extra):
    """``(B, *spatial_out, C_out, *extra)`` -> ``(B, *spatial_out, *kb, *extra)``.

    ``kb`` has the kernel's rank, ``C_out`` at the kernel's output-feature axis and 1 elsewhere, so
    the result broadcasts against a per-position kernel-shaped trace.
    """
    c_axis = u.ndim - n_extra - 1
    lead, c, extra = u.shape[:c_axis], u.shape[c_axis], u.shape[c_axis + 1 :]
    kb = tuple(c if a == dn.rhs_spec[0] else 1 for a in range(kernel_ndim))
    return u.reshape(lead + kb + extra)


def _patches(x, kernel_shape, dn, params):
    """Input patches ``(B, *spatial_out, C_in, *k)`` (canonical order) seen by each output position."""
    x_c = jnp.transpose(x, dn.lhs_spec)
    k_sp = tuple(kernel_shape[a] for a in dn.rhs_spec[2:])
    p = lax.conv_general_dilated_patches(
        x_c,
        k_sp,
        params["strides"],
        params["padding"],
        lhs_dilation=params.get("lhs_dilation"),
        rhs_dilation=params.get("rhs_dilation"),
        precision=lax.Precision.HIGHEST,  # an exact copy of x, also under TF32 defaults on GPU
    )
    # p: (B, C_in * prod(k), *spatial_out), features ordered (C_in, *k).
    nsp = len(k_sp)
    p = p.reshape((p.shape[0], x_c.shape[1], *k_sp, *p.shape[2:]))
    return jnp.moveaxis(p, tuple(range(1, 2 + nsp)), tuple(range(1 + nsp, 2 + 2 * nsp)))


def _position_terms(x, g, kernel_shape, params, n_extra=0):
    r"""The per-position instantaneous terms for cotangent ``g`` of shape ``(*y.shape, *extra)``.

    Returns ``{'weight': (B, *spatial_out, *kernel_shape, *extra), 'bias': (B, *spatial_out, C_out, *extra)}``
    with ``weight[b, p, K-index(c, ci, k)] = P[b, p, group(c) * C_in/G + ci, k] * g[b, p, c]``.
    """
    dn = _dnums(x.ndim, params.get("dimension_numbers"))
    groups = params.get("feature_group_count", 1)
    nsp = x.ndim - 2
    pt = _patches(x, kernel_shape, dn, params)  # (B, *sp, C_in, *k)
    gu = _y_to_units(g, dn, n_extra)  # (B, *sp, C_out, *extra)
    lead = pt.shape[: 1 + nsp]
    c_in, k_sp = pt.shape[1 + nsp], pt.shape[2 + nsp :]
    c_out, extra = gu.shape[1 + nsp], gu.shape[2 + nsp :]
    pt = pt.reshape(lead + (groups, 1, c_in // groups) + k_sp + (1,) * n_extra)
    ge = gu.reshape(lead + (groups, c_out // groups) + (1,) * (1 + nsp) + extra)
    w = (pt * ge).reshape(lead + (c_out, c_in // groups) + k_sp + extra)
    # Canonical (O, I, *k) -> the kernel's own layout: kernel axis a is canonical axis argsort(rhs)[a].
    off = len(lead)
    perm = np.argsort(dn.rhs_spec)
    w = jnp.transpose(w, (*range(off), *(off + int(a) for a in perm), *range(off + 2 + nsp, w.ndim)))
    return {"weight": w, "bias": gu}


# ---------------------------------------------------------------------------------------------
# The four ETP rules
# ---------------------------------------------------------------------------------------------


def _conv_yw_to_w(hidden_dim, trace, *, has_bias=False, dimension_numbers=None, **params):
    r"""Scale the per-position trace by ``hidden_dim`` (``y``-shaped) along the output channel.

    ``trace['weight']``: ``(B, *spatial_out, *K.shape)``; ``trace['bias']``: ``(B, *spatial_out, C_out)``.
    """
    dn = _dnums(hidden_dim.ndim, dimension_numbers)
    gu = _y_to_units(hidden_dim, dn, 0)
    out = {"weight": trace["weight"] * _units_to_kernel(gu, dn, hidden_dim.ndim, 0)}
    if has_bias:
        out["bias"] = trace["bias"] * gu
    return out


def _conv_xy_to_dw(x, hidden_dim, weights, *, has_bias=False, **params):
    r"""``{'weight': dK[, 'bias': db]}``: the VJP of the conv with cotangent ``hidden_dim``."""

    def fwd(w):
        return _conv_impl(x, w["weight"], *([w["bias"]] if has_bias else []), has_bias=has_bias, **params)

    _, vjp = jax.vjp(fwd, dict(weights))
    return vjp(jnp.asarray(hidden_dim, dtype=jnp.result_type(x, weights["weight"])))[0]


def _conv_trace_shapes(y_shape, weight_shapes, dimension_numbers):
    dn = _dnums(len(y_shape), dimension_numbers)
    lead = (y_shape[dn.out_spec[0]], *(y_shape[a] for a in dn.out_spec[2:]))
    shapes = {"weight": lead + tuple(weight_shapes["weight"])}
    if "bias" in weight_shapes:
        shapes["bias"] = lead + (y_shape[dn.out_spec[1]],)
    return shapes


def _conv_init_drtrl(x_var, y_var, weight_vars, num_hidden_state, **params):
    """Per-position zeros ``{'weight': (B, *sp_out, *K.shape, n)[, 'bias': (B, *sp_out, C_out, n)]}``.

    Needs the equation's static params (at least ``dimension_numbers``) as keywords.
    """
    if "dimension_numbers" not in params:
        raise TypeError(
            "etp_conv init_drtrl: the per-position trace layout depends on the equation's "
            "`dimension_numbers`; call it as init_drtrl(x_var, y_var, weight_vars, n, **eqn.params)."
        )
    shapes = _conv_trace_shapes(
        y_var.aval.shape,
        {k: v.aval.shape for k, v in weight_vars.items()},
        params["dimension_numbers"],
    )
    return {k: jnp.zeros((*shapes[k], num_hidden_state), dtype=weight_vars[k].aval.dtype) for k in shapes}


# ---------------------------------------------------------------------------------------------
# D-RTRL trace operations (per output position)
# ---------------------------------------------------------------------------------------------


def _check_per_position_supported(params):
    if params.get("batch_group_count", 1) != 1:
        raise NotImplementedError(
            f"etp_conv: the per-position D-RTRL trace does not support batch_group_count="
            f"{params['batch_group_count']} (output batch elements mix input batch elements). Use "
            f"pp_prop / ES_D_RTRL for this conv, or batch_group_count=1."
        )


def _propagate(d, eps):
    r"""``out[..., s] = sum_j d[..., s, j] * eps[..., j]`` with ``d`` broadcasting against ``eps``."""
    acc = d[..., :, 0] * eps[..., 0:1]
    for j in range(1, eps.shape[-1]):
        acc = acc + d[..., :, j] * eps[..., j : j + 1]
    return acc


def _check_unit_shape(name, arr, y_shape, n_extra):
    if arr.ndim != len(y_shape) + n_extra or tuple(arr.shape[: len(y_shape)]) != tuple(y_shape):
        raise ValueError(
            f"etp_conv trace ops: `{name}` must have shape (*y.shape, {'n, n' if n_extra == 2 else 'n'}) "
            f"with y.shape={tuple(y_shape)}, got {arr.shape}."
        )


def _conv_trace_init(x_var, y_var, weight_vars, n, batch_shape, params):
    _check_per_position_supported(params)
    return _conv_init_drtrl(x_var, y_var, weight_vars, n, **params)


def _conv_trace_update(trace, d, x, df, weights, params, batch_ndim):
    r"""``eps[..., s] <- sum_j d[b,p,c,s,j] eps[..., j] + P[b,p,ci,k] df[b,p,c,s]`` per position."""
    _check_per_position_supported(params)
    kernel_shape = weights["weight"].shape
    dn = _dnums(x.ndim, params.get("dimension_numbers"))
    y_shape = tuple(df.shape[:-1])
    _check_unit_shape("d", d, y_shape, 2)
    inst = _position_terms(x, df, kernel_shape, params, n_extra=1)
    d_u = _y_to_units(d, dn, 2)  # (B, *sp, C_out, n, n)
    new = {
        "weight": _propagate(_units_to_kernel(d_u, dn, len(kernel_shape), 2), trace["weight"])
        + inst["weight"]
    }
    if "bias" in trace:
        new["bias"] = _propagate(d_u, trace["bias"]) + inst["bias"]
    return {k: v.astype(trace[k].dtype) for k, v in new.items()}


def _conv_trace_solve(trace, ct, weights, params, batch_ndim):
    r"""``dK = sum_b sum_p sum_s ct[b,p,c,s] eps[b,p,K-index,s]`` (kernel-shaped), ``db`` likewise."""
    _check_per_position_supported(params)
    kernel_ndim = weights["weight"].ndim
    dn = _dnums(kernel_ndim, params.get("dimension_numbers"))
    ct_u = _y_to_units(ct, dn, 1)  # (B, *sp, C_out, n)
    lead_axes = tuple(range(kernel_ndim - 1))  # B and the spatial_out axes
    grads = {
        "weight": jnp.sum(_units_to_kernel(ct_u, dn, kernel_ndim, 1) * trace["weight"], axis=(*lead_axes, -1))
    }
    if "bias" in trace:
        grads["bias"] = jnp.sum(ct_u * trace["bias"], axis=(*lead_axes, -1))
    return grads


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

_leading_batch_rule = make_x_batching_rule(lambda: etp_conv_p, lambda: etp_conv_p)


def _conv_batching(args, dims, **params):
    """Fold a mapped ``x`` axis into the conv's batch axis (keeps the marker).

    Layouts whose batch axis leads in ``x`` and ``y`` use :func:`make_x_batching_rule`; others fold
    at their batch axes. A mapped kernel or bias, or ``batch_group_count > 1`` (whose batch groups a
    fold would mix), falls back to ``vmap`` of the implementation.
    """
    others_mapped = any(d is not None for d in dims[1:])
    if others_mapped or dims[0] is None or params["batch_group_count"] != 1:
        return jax.vmap(partial(_conv_impl, **params), in_axes=tuple(dims))(*args), 0
    x = args[0]
    dn = _dnums(x.ndim - 1, params["dimension_numbers"])
    lb, ob = dn.lhs_spec[0], dn.out_spec[0]
    if lb == 0 and ob == 0:
        return _leading_batch_rule(args, dims, **params)
    x = jnp.moveaxis(x, dims[0], lb)  # mapped axis at lb, the conv's batch axis right after it
    v = x.shape[lb]
    x = x.reshape(x.shape[:lb] + (v * x.shape[lb + 1],) + x.shape[lb + 2 :])
    y = etp_conv_p.bind(x, *args[1:], **params)
    return y.reshape(y.shape[:ob] + (v, y.shape[ob] // v) + y.shape[ob + 1 :]), ob


etp_conv_p = register_primitive_spec(
    ETPPrimitiveSpec(
        name="etp_conv",
        impl=_conv_impl,
        yw_to_w=_conv_yw_to_w,
        xy_to_dw=_conv_xy_to_dw,
        init_drtrl=_conv_init_drtrl,
        init_pp=output_trace_zeros,
        trainable_invars_fn=_conv_trainable_invars,
        x_invar_index=0,
        batched=True,
        batching_rule=_conv_batching,
    )
)

ETP_DRTRL_TRACE_OPS[etp_conv_p] = DRTRLTraceOps(
    init=_conv_trace_init, update=_conv_trace_update, solve=_conv_trace_solve
)


# ---------------------------------------------------------------------------------------------
# User-facing wrapper
# ---------------------------------------------------------------------------------------------


def _int_tuple(value, name, n_spatial):
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f"conv: `{name}` must be a sequence of {n_spatial} ints, got {value!r}.") from None
    if len(out) != n_spatial:
        raise ValueError(
            f"conv: `{name}` must have one entry per spatial dimension ({n_spatial}), got {value!r}."
        )
    if min(out, default=1) < 1:
        raise ValueError(f"conv: `{name}` must be positive ints, one per spatial dimension, got {value!r}.")
    return out


_PADDING_NAMES = ("SAME", "VALID", "SAME_LOWER")


def _padding_param(padding, n_spatial):
    if isinstance(padding, str):
        if padding.upper() not in _PADDING_NAMES:
            raise ValueError(
                f"conv: string `padding` must be one of {_PADDING_NAMES} (any case), got {padding!r}."
            )
        return padding
    try:
        out = tuple((int(lo), int(hi)) for lo, hi in padding)
    except (TypeError, ValueError):
        raise TypeError(
            f"conv: `padding` must be 'SAME', 'VALID', 'SAME_LOWER' or a sequence of {n_spatial} "
            f"(low, high) pairs, got {padding!r}."
        ) from None
    if len(out) != n_spatial:
        raise ValueError(
            f"conv: `padding` must have one (low, high) pair per spatial dimension ({n_spatial}), "
            f"got {padding!r}."
        )
    return out


def _dimension_numbers_param(dimension_numbers):
    if isinstance(dimension_numbers, list):
        dimension_numbers = tuple(dimension_numbers)
    try:
        hash(dimension_numbers)
    except TypeError:
        raise TypeError(
            f"conv: `dimension_numbers` must be hashable (None, a tuple of three layout strings such "
            f"as ('NHWC', 'HWIO', 'NHWC'), or a ConvDimensionNumbers), got {dimension_numbers!r}."
        ) from None
    return dimension_numbers


def _positive_int(value, name):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"conv: `{name}` must be a positive int, got {value!r}.")
    return int(value)


def conv(
    x,
    kernel,
    bias=None,
    *,
    strides=None,
    padding="SAME",
    lhs_dilation=None,
    rhs_dilation=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    dimension_numbers=None,
    kernel_fn=None,
    bias_fn=None,
):
    r"""ETP-marked convolution :math:`y = \mathrm{conv}(x, f(K)) \;(+ g(b))` (``lax.conv_general_dilated``).

    Parameters
    ----------
    x : array or Quantity
        Input with a batch axis, ``x.ndim == kernel.ndim`` (e.g. ``(B, W, C_in)`` for ``NWC``).
    kernel : array or Quantity
        Kernel in the layout of ``dimension_numbers`` (e.g. ``(kW, C_in / G, C_out)`` for ``WIO``).
    bias : array or Quantity, shape ``(C_out,)``, optional
        Added along the output feature axis; its unit must have the dimension of
        ``unit(x) * unit(kernel)``.
    strides, padding, lhs_dilation, rhs_dilation, feature_group_count, batch_group_count, dimension_numbers
        As in :func:`jax.lax.conv_general_dilated` (lists are stored as tuples). ``strides`` defaults
        to 1 along every spatial axis and ``padding`` to ``'SAME'``.
    kernel_fn : callable, optional
        Shape-preserving transform :math:`f` of the kernel's mantissa (units are split off before and
        put back after), applied with plain JAX ops before the primitive is bound: the primitive's
        trainable operand is ``kernel_fn(kernel)`` and the online gradient of ``kernel`` is the chain
        rule through it (any function, not only element-wise ones). ``None`` is the identity.
    bias_fn : callable, optional
        The same for the bias ``(C_out,)``, applied to its mantissa in the unit of the output;
        ignored without a bias.

    Returns
    -------
    array or Quantity in the output layout of ``dimension_numbers``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> braintrace.conv(jnp.ones((2, 16, 3)), jnp.ones((4, 3, 8)), strides=(1,), padding='SAME',
    ...                 dimension_numbers=('NWC', 'WIO', 'NWC')).shape
    (2, 16, 8)
    """
    x_m, x_u = split(x)
    k_m, k_u = split(kernel)
    x_m, k_m = jnp.asarray(x_m), jnp.asarray(k_m)
    k_m = apply_operand_fn(kernel_fn, k_m, name="kernel_fn", op="conv")
    if k_m.ndim < 3:
        raise ValueError(
            f"conv: `kernel` must have at least 3 axes (out/in channels and one spatial axis), got "
            f"shape {k_m.shape}."
        )
    if x_m.ndim != k_m.ndim:
        raise ValueError(
            f"conv: `x` must carry a batch axis, so x.ndim must equal kernel.ndim; got x shape "
            f"{x_m.shape} and kernel shape {k_m.shape}. For a single sample pass x[None]."
        )
    n_spatial = k_m.ndim - 2
    strides = (1,) * n_spatial if strides is None else _int_tuple(strides, "strides", n_spatial)
    padding = _padding_param(padding, n_spatial)
    lhs_dilation = None if lhs_dilation is None else _int_tuple(lhs_dilation, "lhs_dilation", n_spatial)
    rhs_dilation = None if rhs_dilation is None else _int_tuple(rhs_dilation, "rhs_dilation", n_spatial)
    feature_group_count = _positive_int(feature_group_count, "feature_group_count")
    batch_group_count = _positive_int(batch_group_count, "batch_group_count")
    dimension_numbers = _dimension_numbers_param(dimension_numbers)
    try:
        dn = lax.conv_dimension_numbers(x_m.shape, k_m.shape, dimension_numbers)
    except (TypeError, ValueError) as err:
        raise ValueError(f"conv: invalid `dimension_numbers` {dimension_numbers!r}: {err}") from err
    c_in, k_in = x_m.shape[dn.lhs_spec[1]], k_m.shape[dn.rhs_spec[1]]
    c_out = k_m.shape[dn.rhs_spec[0]]
    if c_in != k_in * feature_group_count:
        raise ValueError(
            f"conv: `x` has {c_in} input channels (shape {x_m.shape}) but `kernel` (shape {k_m.shape}) "
            f"expects {k_in} per group x feature_group_count={feature_group_count} = "
            f"{k_in * feature_group_count}."
        )
    if c_out % feature_group_count or c_out % batch_group_count:
        raise ValueError(
            f"conv: the kernel's {c_out} output channels (shape {k_m.shape}) must be divisible by "
            f"feature_group_count={feature_group_count} and batch_group_count={batch_group_count}."
        )
    unit = x_u * k_u
    operands = [x_m, k_m]
    if bias is not None:
        b_m = jnp.asarray(bias_mantissa(bias, unit, op="conv"))
        b_m = apply_operand_fn(bias_fn, b_m, name="bias_fn", op="conv")
        if b_m.shape != (c_out,):
            raise ValueError(
                f"conv: `bias` must have shape ({c_out},) = (out_channels,) of the kernel (shape "
                f"{k_m.shape}), got {b_m.shape}."
            )
        operands.append(b_m)
    y = etp_conv_p.bind(
        *operands,
        has_bias=bias is not None,
        strides=strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        dimension_numbers=dimension_numbers,
    )
    return attach(y, unit)
