r"""Dense matmul ETP primitives ``etp_mm`` (batched) and ``etp_mv`` (unbatched).

Forward:  :math:`y = x W \;(+ b)` with :math:`x \in \mathbb{R}^{B\times I}` (``etp_mm``) or
:math:`\mathbb{R}^{I}` (``etp_mv``), :math:`W \in \mathbb{R}^{I\times O}`, :math:`b \in \mathbb{R}^{O}`.

Invars: ``x, W[, b]``; static param ``has_bias``; trainable layout ``{'weight': 1[, 'bias': 2]}``.

ETP rules (``g = \partial h/\partial y`` for one hidden state, shape of ``y``):

* ``xy_to_dw(x, g, {W, b})`` — the VJP of the op: :math:`\partial h/\partial W_{ik} = \sum_b x_{bi} g_{bk}`,
  :math:`\partial h/\partial b_k = \sum_b g_{bk}`.
* ``yw_to_w(d, trace)`` — the ``y -> W`` link of :math:`D^t \epsilon^{t-1}`: since
  :math:`\partial y_j/\partial W_{ik} = \delta_{jk} x_i`, the trace is scaled along ``out``:
  :math:`\epsilon_{W,\dots ik} \leftarrow d_{\dots k}\,\epsilon_{W,\dots ik}`,
  :math:`\epsilon_{b,\dots k} \leftarrow d_{\dots k}\,\epsilon_{b,\dots k}` (``d`` of shape ``(..., O)``
  broadcast at axis ``-2`` of the weight trace, so ``in != out`` works with or without batch).
* ``init_drtrl`` — ``{'weight': (B, I, O, n)[, 'bias': (B, O, n)]}`` for ``etp_mm``;
  ``{'weight': (I, O, n)[, 'bias': (O, n)]}`` for ``etp_mv``; dtype of the weight.
* ``init_pp`` — the output-shaped df trace ``(*y.shape, n)``, dtype of ``y``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u

from braintrace._batch_sharding import BATCH_SUM, BatchLayout

from . import _cpu_sums, _trace_ops
from ._batching import make_x_batching_rule
from ._fused import fused_op
from ._spec import ETPPrimitiveSpec, register_primitive_spec
from ._units import attach, bias_mantissa, split

__all__ = ["etp_mm_p", "etp_mv_p", "matmul"]


def _matmul_impl(*args, has_bias=False):
    x, w = args[0], args[1]
    y = x @ w
    if has_bias:
        y = y + args[2]
    return y


def _dense_trainable_invars(params):
    """``{'weight': 1}`` or ``{'weight': 1, 'bias': 2}`` depending on ``has_bias``."""
    layout = {"weight": 1}
    if params.get("has_bias", False):
        layout["bias"] = 2
    return layout


def _dense_yw_to_w(hidden_dim, trace, *, has_bias=False):
    r"""Scale the weight-shaped trace by ``hidden_dim`` along ``out``.

    ``hidden_dim``: ``(..., O)``; ``trace['weight']``: ``(..., I, O)``; ``trace['bias']``: ``(..., O)``.
    """
    out = {"weight": trace["weight"] * jnp.expand_dims(hidden_dim, axis=-2)}
    if has_bias:
        out["bias"] = trace["bias"] * hidden_dim
    return out


def _dense_xy_to_dw(x, hidden_dim, weights, *, has_bias=False):
    r"""``{'weight': x^T g[, 'bias': sum_b g]}``: the VJP of ``x @ W (+ b)`` with cotangent ``g``.

    ``x``: ``(*batch, I)``, ``hidden_dim`` ``g``: ``(*batch, O)``; summed over the leading axes
    (:func:`_cpu_sums.outer_sum`), each leaf in its weight's dtype.
    """
    w = weights["weight"]
    g = jnp.asarray(hidden_dim, dtype=jnp.result_type(x, w))
    out = {"weight": _cpu_sums.outer_sum(x.astype(g.dtype), g).astype(w.dtype)}
    if has_bias:
        out["bias"] = _cpu_sums.row_sum(g).astype(weights["bias"].dtype)
    return out


def _mm_init_drtrl(x_var, y_var, weight_vars, num_hidden_state):
    """``{'weight': zeros(B, I, O, n)[, 'bias': zeros(B, O, n)]}``."""
    return _trace_ops.param_trace_zeros(x_var.aval.shape[:1], weight_vars, num_hidden_state)


def _mv_init_drtrl(x_var, y_var, weight_vars, num_hidden_state):
    """``{'weight': zeros(I, O, n)[, 'bias': zeros(O, n)]}``."""
    return _trace_ops.param_trace_zeros((), weight_vars, num_hidden_state)


# Per-primitive names of the rules (both primitives share them).
_mm_trainable_invars = _mv_trainable_invars = _dense_trainable_invars
_mm_yw_to_w = _mv_yw_to_w = _dense_yw_to_w
_mm_xy_to_dw = _mv_xy_to_dw = _dense_xy_to_dw
_mm_init_pp = _mv_init_pp = _trace_ops.output_trace_zeros

_x_rule = make_x_batching_rule(lambda: etp_mv_p, lambda: etp_mm_p)
_x_rule_mm = make_x_batching_rule(lambda: etp_mm_p, lambda: etp_mm_p)

etp_mm_p = register_primitive_spec(
    ETPPrimitiveSpec(
        name="etp_mm",
        impl=_matmul_impl,
        yw_to_w=_dense_yw_to_w,
        xy_to_dw=_dense_xy_to_dw,
        init_drtrl=_mm_init_drtrl,
        init_pp=_trace_ops.output_trace_zeros,
        trainable_invars_fn=_dense_trainable_invars,
        x_invar_index=0,
        batched=True,
        batching_rule=_x_rule_mm,
    )
)

etp_mv_p = register_primitive_spec(
    ETPPrimitiveSpec(
        name="etp_mv",
        impl=_matmul_impl,
        yw_to_w=_dense_yw_to_w,
        xy_to_dw=_dense_xy_to_dw,
        init_drtrl=_mv_init_drtrl,
        init_pp=_trace_ops.output_trace_zeros,
        trainable_invars_fn=_dense_trainable_invars,
        x_invar_index=0,
        batched=False,
        batching_rule=_x_rule,
    )
)


def apply_operand_fn(fn, mantissa, *, name, op):
    r"""``fn(mantissa)`` for a wrapper's ``*_fn`` keyword (``weight_fn``, ``bias_fn``, ...).

    The function runs with ordinary JAX ops on the operand's unitless mantissa *before* the primitive
    is bound, so the primitive's trainable operand is ``fn(w)``; the compiler follows such plain ops
    back to the ``ParamState`` and the online gradient of ``w`` is the chain rule through ``fn``.
    ``None`` is the identity. The result must keep the operand's shape and carry no unit.
    """
    if fn is None:
        return mantissa
    if not callable(fn):
        raise TypeError(f"{op}: `{name}` must be callable or None, got {type(fn).__name__}.")
    out = fn(mantissa)
    if isinstance(out, u.Quantity) and not u.get_unit(out).is_unitless:
        raise TypeError(
            f"{op}: `{name}` is applied to the unitless mantissa of its operand and must return a plain "
            f"array, got a quantity in {u.get_unit(out)}."
        )
    out = jnp.asarray(u.get_mantissa(out))
    if out.shape != jnp.shape(mantissa):
        raise ValueError(
            f"{op}: `{name}` must keep the shape of its operand {tuple(jnp.shape(mantissa))}, "
            f"got {out.shape}."
        )
    return out


def matmul(x, weight, bias=None, *, weight_fn=None, bias_fn=None):
    r"""ETP-marked dense matrix product :math:`y = x\, f(W) \;(+ g(b))`.

    Binds ``etp_mm`` when ``x.ndim >= 2`` (``(batch, in)``; more leading axes are flattened into
    the batch) and ``etp_mv`` when ``x`` is a vector ``(in,)``.

    Parameters
    ----------
    x : array or Quantity, shape ``(batch, in)`` or ``(in,)``
    weight : array or Quantity, shape ``(in, out)``
    bias : array or Quantity, shape ``(out,)``, optional
        Its unit must have the dimension of ``unit(x) * unit(weight)``.
    weight_fn : callable, optional
        Shape-preserving transform :math:`f` of the weight's mantissa (units are split off before
        and put back after), e.g. ``jnp.abs`` for a sign-constrained weight. It is applied with
        plain JAX ops before the primitive is bound: the primitive's trainable operand is
        ``weight_fn(weight)``, and the online gradient of ``weight`` is the chain rule through it.
        Being no part of the primitive's parameters, a fresh ``lambda`` per call does not retrace.
    bias_fn : callable, optional
        The same for the bias, applied to its mantissa in the unit of ``x @ weight``; ignored
        without a bias.

    Returns
    -------
    array or Quantity of shape ``(batch, out)`` or ``(out,)``

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> braintrace.matmul(jnp.ones((4, 3)), jnp.ones((3, 5))).shape
    (4, 5)
    >>> braintrace.matmul(jnp.ones(3), jnp.ones((3, 5)), bias=jnp.zeros(5)).shape
    (5,)
    >>> braintrace.matmul(jnp.ones(2), -jnp.ones((2, 1)), weight_fn=jnp.abs)
    Array([2.], dtype=float32)
    """
    x_m, x_u = split(x)
    w_m, w_u = split(weight)
    x_m, w_m = jnp.asarray(x_m), jnp.asarray(w_m)
    w_m = apply_operand_fn(weight_fn, w_m, name="weight_fn", op="matmul")
    if w_m.ndim != 2:
        raise ValueError(f"matmul: `weight` must be 2-D (in, out), got shape {w_m.shape}.")
    if x_m.ndim == 0:
        raise ValueError("matmul: `x` must have at least one axis (in,) or (batch, in), got a scalar.")
    if x_m.shape[-1] != w_m.shape[0]:
        raise ValueError(
            f"matmul: `x` has {x_m.shape[-1]} input features (shape {x_m.shape}) but `weight` expects "
            f"{w_m.shape[0]} (shape {w_m.shape}); x.shape[-1] must equal weight.shape[0]."
        )
    unit = x_u * w_u
    operands = [x_m, w_m]
    if bias is not None:
        b_m = jnp.asarray(bias_mantissa(bias, unit, op="matmul"))
        b_m = apply_operand_fn(bias_fn, b_m, name="bias_fn", op="matmul")
        if b_m.shape != (w_m.shape[1],):
            raise ValueError(
                f"matmul: `bias` must have shape ({w_m.shape[1]},) = (weight.shape[1],), got {b_m.shape}."
            )
        operands.append(b_m)
    lead = x_m.shape[:-1]
    if x_m.ndim > 2:
        operands[0] = x_m.reshape((-1, x_m.shape[-1]))
    p = etp_mv_p if x_m.ndim == 1 else etp_mm_p
    y = p.bind(*operands, has_bias=bias is not None)
    if x_m.ndim > 2:
        y = y.reshape((*lead, y.shape[-1]))
    return attach(y, unit)


# ---------------------------------------------------------------------------------------------
# D-RTRL trace operations as fused primitives (reference from the rules; Pallas kernel on GPU)
# ---------------------------------------------------------------------------------------------


def _arithmetic_dtype(dtype):
    """The dtype the fused operations compute in: float64 for float64 traces, else float32 (a
    bfloat16 trace is storage only, as in the kernels)."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _dense_update_reference(trace, d, x, df):
    r"""``new[b,i,o,s] = sum_j yw_to_w(d[b,:,s,j], trace[b,...,j]) + xy_to_dw(x_b, df[b,:,s])``.

    Shapes: trace ``(B, I, O, n)``, d ``(B, O, n, n)``, x ``(B, I)``, df ``(B, O, n)``. Computed in
    :func:`_arithmetic_dtype`, stored in the trace's dtype.
    """
    acc = _arithmetic_dtype(trace.dtype)
    w = jnp.zeros(trace.shape[1:3], acc)
    ops = _trace_ops._default_ops(etp_mm_p)
    args = [a.astype(acc) for a in (d, x, df)]
    new = ops.update({"weight": trace.astype(acc)}, *args, {"weight": w}, {"has_bias": False}, 1)["weight"]
    return new.astype(trace.dtype)


def _dense_solve_reference(trace, ct):
    r"""``dW[i,o] = sum_b sum_s yw_to_w(ct[b,:,s], trace[b,...,s])``.

    Shapes: trace ``(B, I, O, n)``, ct ``(B, O, n)``. Accumulated and returned in
    :func:`_arithmetic_dtype` (float32 for a bfloat16 trace).
    """
    acc = _arithmetic_dtype(trace.dtype)
    trace, ct = trace.astype(acc), ct.astype(acc)
    ops = _trace_ops._default_ops(etp_mm_p)

    def reduction(trace, ct):  # GPU: XLA fuses it with the update into one pass over the trace
        return ops.solve({"weight": trace}, ct, {}, {"has_bias": False}, 1)["weight"]

    def cpu(trace, ct):  # see _cpu_sums: XLA:CPU's YNNPACK fusion of a large reduction is slow
        if _cpu_sums.unrolls(trace.shape, (0, 3), CPU_UNROLLED_SOLVE_TERMS):
            return _cpu_sums.unrolled_sum(trace * ct[:, None], (0, 3))
        if trace.size < _cpu_sums.MIN_ELEMENTS:  # a loop fusion
            return reduction(trace, ct)
        return jnp.einsum("bios,bos->io", trace, ct)  # many (row, state) terms: a dot

    # resolved when lowering: a program for one platform holds one of the two, no conditional
    return jax.lax.platform_dependent(trace, ct, cpu=cpu, default=reduction)


#: Batch rows times states up to which the CPU lowering of the dense solve sums the products unrolled
#: (see :func:`_dense_solve_reference`), above which it is a dot. Measured on a 2-core AMD EPYC,
#: update and solve of one trace ``(B, I, O, 1)`` per step of a scan, unrolled against the dot:
#: 32 x 64 x 64, 19 against 145 us; 64 x 128 x 128, 360 against 1700 us; 256 x 64 x 64, 3000 against
#: 1100 us. The LoRA RNN's D-RTRL step of ``ci/compare_published_timing.py`` (B = 4): 10.4 against
#: 11.5 us.
CPU_UNROLLED_SOLVE_TERMS = 64


#: Number of hidden states per unit from which the dense kernels replace XLA's fusion. Measured on
#: an H100 (docs/performance.md): with one state XLA already fuses the update into one pass at the
#: roofline and the kernels are 5-25% slower (end to end, D-RTRL on a 512-unit RNN: 118 us against
#: 97 us per step); with two states the kernels take 0.2-0.8x XLA's time.
DENSE_KERNEL_MIN_STATES = 2


def _dense_update_kernel(trace, d, x, df, *, interpret):
    if trace.shape[-1] < DENSE_KERNEL_MIN_STATES and not interpret:
        return _dense_update_reference(trace, d, x, df)
    from braintrace._kernel_import import kernel_module

    return kernel_module("dense").dense_trace_update(trace, d, x, df, interpret=interpret)


def _dense_solve_kernel(trace, ct, *, interpret):
    if trace.shape[-1] < DENSE_KERNEL_MIN_STATES and not interpret:
        return _dense_solve_reference(trace, ct)
    from braintrace._kernel_import import kernel_module

    out = kernel_module("dense").dense_trace_solve(trace, ct, interpret=interpret)
    return out.astype(_arithmetic_dtype(trace.dtype))


def _dense_update_solve_reference(trace, d, x, df, ct):
    """``(new, dW)``: :func:`_dense_update_reference`, then :func:`_dense_solve_reference` of ``new``."""
    new = _dense_update_reference(trace, d, x, df)
    return new, _dense_solve_reference(new, ct)


def _kernel_splits_the_batch(shape, block_sizes) -> bool:
    """Whether the update+solve kernel, for a trace of ``shape`` ``(B, I, O, n)`` with one state per
    unit, would split the batch finer than ``block_sizes.block_b`` rows per program.

    It does so when the ``(i, o)`` tiles alone give too few programs (a small ``I x O``: an input
    weight, a bias, a LoRA factor), and then writes one partial ``dW`` per one to a few batch rows,
    about as many bytes again as the trace itself, and one more launch to sum them. XLA's fusion of the
    reference makes one pass with no partials (in the H100 programs of the benchmark models,
    ``ci/gpu_program.py``: 8.9 MB against 17 MB for the input weight of the dense RNN).
    """
    num_b, num_i, num_o, n = shape
    tiles = -(-num_o // block_sizes.block_o) * -(-num_i // block_sizes.block_i)
    return n == 1 and block_sizes.rows_per_program(num_b, tiles) < min(block_sizes.block_b, num_b)


def _dense_update_solve_kernel(trace, d, x, df, ct, *, interpret):
    # Unlike the update alone, the fused update+solve kernel is used for one state as well: it makes
    # one pass over the trace where XLA's update and reduction make two or share one only partly
    # (H100, 64 x 512 x 512: 66 us against 70 us; docs/performance.md); but not for a small one-state
    # trace, where its partial sums would double the bytes.
    from braintrace._kernel_import import kernel_module

    dense = kernel_module("dense")
    if not interpret and _kernel_splits_the_batch(trace.shape, dense.DenseBlockSizes.get_default()):
        return _dense_update_solve_reference(trace, d, x, df, ct)
    new, dw = dense.dense_trace_update_solve(trace, d, x, df, ct, interpret=interpret)
    return new, dw.astype(_arithmetic_dtype(trace.dtype))


# Every operand is per batch row, batch first; the solves sum over the batch (one psum of dW when
# the batch is sharded).
#: Fused dense D-RTRL trace update ``eps <- D eps + x (x) df`` (one pass over the trace).
dense_trace_update_p = fused_op(
    "dense_trace_update",
    _dense_update_reference,
    _dense_update_kernel,
    batch_layout=BatchLayout({0: 0, 1: 0, 2: 0, 3: 0}, (0,)),
)
#: Dense gradient solve ``dW = sum_b sum_s eps * dL/dh``.
dense_trace_solve_p = fused_op(
    "dense_trace_solve",
    _dense_solve_reference,
    _dense_solve_kernel,
    batch_layout=BatchLayout({0: 0, 1: 0}, (BATCH_SUM,)),
)
#: The update and the solve of the new trace in one pass: ``(new, dW)``.
dense_trace_update_solve_p = fused_op(
    "dense_trace_update_solve",
    _dense_update_solve_reference,
    _dense_update_solve_kernel,
    multiple_results=True,
    batch_layout=BatchLayout({0: 0, 1: 0, 2: 0, 3: 0, 4: 0}, (0, BATCH_SUM)),
)


def _flat_batch(a, batch_ndim, tail_ndim):
    """Collapse ``batch_ndim`` leading axes into one (adding one when there are none)."""
    lead = a.shape[: a.ndim - tail_ndim]
    return a.reshape((int(np.prod(lead)) if lead else 1, *a.shape[a.ndim - tail_ndim :]))


def fused_dense_update(trace, d, x, df):
    """The fused dense update of one weight-shaped trace leaf in the rule layout.

    trace ``(*batch, I, O, n)``, d ``(*batch, O, n, n)``, x ``(*batch, I)`` or ``(I,)`` (broadcast),
    df ``(*batch, O, n)``; ``batch`` may be empty.
    """
    bshape = trace.shape[:-3]
    I, O, n = trace.shape[-3:]
    x = jnp.broadcast_to(x, (*bshape, I))
    new = dense_trace_update_p.bind(
        _flat_batch(trace, len(bshape), 3),
        _flat_batch(d, len(bshape), 3).astype(trace.dtype),
        _flat_batch(x, len(bshape), 1).astype(trace.dtype),
        _flat_batch(df, len(bshape), 2).astype(trace.dtype),
    )
    return new.reshape(trace.shape)


def fused_dense_solve(trace, ct):
    """``sum_batch sum_s trace * ct`` of a trace leaf ``(*batch, I, O, n)``: ``(I, O)``."""
    bshape = trace.shape[:-3]
    flat_ct = _flat_batch(ct, len(bshape), 2).astype(trace.dtype)
    return dense_trace_solve_p.bind(_flat_batch(trace, len(bshape), 3), flat_ct)


def fused_dense_update_solve(trace, d, x, df, ct):
    """:func:`fused_dense_update` and :func:`fused_dense_solve` of the new trace in one pass.

    Returns ``(new trace (*batch, I, O, n), dW (I, O))``; ``ct`` is ``(*batch, O, n)``.
    """
    bshape = trace.shape[:-3]
    I, O, n = trace.shape[-3:]
    x = jnp.broadcast_to(x, (*bshape, I))
    new, dw = dense_trace_update_solve_p.bind(
        _flat_batch(trace, len(bshape), 3),
        _flat_batch(d, len(bshape), 3).astype(trace.dtype),
        _flat_batch(x, len(bshape), 1).astype(trace.dtype),
        _flat_batch(df, len(bshape), 2).astype(trace.dtype),
        _flat_batch(ct, len(bshape), 2).astype(trace.dtype),
    )
    return new.reshape(trace.shape), dw


def fused_bias_update(trace, d, df):
    """The bias trace ``(*batch, O, n)``: the dense update with ``I = 1`` and ``x = 1``."""
    ones = jnp.ones((*trace.shape[:-2], 1), trace.dtype)
    return fused_dense_update(trace[..., None, :, :], d, ones, df)[..., 0, :, :]


def fused_bias_solve(trace, ct):
    """``sum_batch sum_s trace * ct`` of a bias trace ``(*batch, O, n)``: ``(O,)``."""
    return fused_dense_solve(trace[..., None, :, :], ct)[0]


def fused_bias_update_solve(trace, d, df, ct):
    """:func:`fused_bias_update` and :func:`fused_bias_solve` of the new trace in one pass."""
    ones = jnp.ones((*trace.shape[:-2], 1), trace.dtype)
    new, db = fused_dense_update_solve(trace[..., None, :, :], d, ones, df, ct)
    return new[..., 0, :, :], db[0]


def _dense_ops_update(trace, d, x, df, weights, params, batch_ndim):
    """Dense D-RTRL update through the fused primitive; trace leaves in the rule layout."""
    out = {"weight": fused_dense_update(trace["weight"], d, x, df)}
    if "bias" in trace:
        out["bias"] = fused_bias_update(trace["bias"], d, df)
    return out


def _dense_ops_solve(trace, ct, weights, params, batch_ndim):
    out = {"weight": fused_dense_solve(trace["weight"], ct).astype(weights["weight"].dtype)}
    if "bias" in trace:
        out["bias"] = fused_bias_solve(trace["bias"], ct).astype(weights["bias"].dtype)
    return out


def _dense_ops_update_solve(trace, d, x, df, ct, weights, params, batch_ndim):
    """The update and the solve of the new trace, each leaf in one pass: ``(new trace, grads)``."""
    new_w, dw = fused_dense_update_solve(trace["weight"], d, x, df, ct)
    new, grads = {"weight": new_w}, {"weight": dw.astype(weights["weight"].dtype)}
    if "bias" in trace:
        new["bias"], db = fused_bias_update_solve(trace["bias"], d, df, ct)
        grads["bias"] = db.astype(weights["bias"].dtype)
    return new, grads


def _dense_ops_init(primitive):
    return _trace_ops._default_ops(primitive).init


for _p in (etp_mm_p, etp_mv_p):
    _trace_ops.ETP_DRTRL_TRACE_OPS[_p] = _trace_ops.DRTRLTraceOps(
        init=_dense_ops_init(_p),
        update=_dense_ops_update,
        solve=_dense_ops_solve,
        update_solve=_dense_ops_update_solve,
    )
