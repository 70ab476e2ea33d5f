r"""LoRA matmul ETP primitives ``etp_lora_mm`` (batched) and ``etp_lora_mv`` (unbatched).

Forward: :math:`y = \alpha\,(x B) A \;(+ b)` with :math:`x \in \mathbb{R}^{B\times I}`
(``etp_lora_mm``) or :math:`\mathbb{R}^{I}` (``etp_lora_mv``), :math:`B \in \mathbb{R}^{I\times r}`,
:math:`A \in \mathbb{R}^{r\times O}`, :math:`b \in \mathbb{R}^{O}`; computed as ``alpha * ((x @ B) @ A)``.

Invars: ``x, B, A[, b]``; static params ``alpha`` (float) and ``has_bias``; trainable layout
``{'lora_b': 1, 'lora_a': 2[, 'bias': 3]}``.

ETP rules (``g = \partial h/\partial y`` for one hidden state, ``y``-shaped; ``z = x B``):

* ``xy_to_dw(x, g, {B, A, b})`` — the VJP of the op:
  :math:`\partial h/\partial A_{rk} = \alpha \sum_b z_{br} g_{bk}`,
  :math:`\partial h/\partial B_{ir} = \alpha \sum_b x_{bi} (g A^\top)_{br}`,
  :math:`\partial h/\partial b_k = \sum_b g_{bk}`.
* D-RTRL trace (exact): ``A`` and the bias behave like a dense
  weight fed by ``z``: each :math:`A_{rk}` drives unit ``k`` only, so their traces ``(..., r, O)`` and
  ``(..., O)`` are exact. ``B`` reaches every unit (:math:`\partial y_k/\partial B_{ir} = \alpha x_i A_{rk}`),
  so its trace is kept in the **E layout**: the dense trace ``E (..., I, O)`` of :math:`x \otimes df`,
  contracted with :math:`\alpha A` at solve time, :math:`\epsilon_{B,ir} = \alpha \sum_k A_{rk} E_{ik}`
  (``A`` is constant within a sequence).
* ``yw_to_w(d, trace)`` — every leaf is scaled along ``out``: ``E`` and the ``A`` trace by ``d``
  broadcast at axis ``-2``, the bias trace element-wise.
* ``init_drtrl`` — ``{'lora_b': (B, I, O, n), 'lora_a': (B, r, O, n)[, 'bias': (B, O, n)]}`` for
  ``etp_lora_mm`` (``'lora_b'`` is ``E``, dtype of ``B``), without the leading ``B`` for ``etp_lora_mv``.
* ``init_pp`` — the output-shaped df trace ``(*y.shape, n)``, dtype of ``y``.

Rule identity ``yw_to_w(v, xy_to_dw(x, g)) == xy_to_dw(x, v * g)`` (per batch element, or for ``v``
shared by the batch): for ``lora_a`` and ``bias`` each element belongs to one output unit ``k``,
so scaling by ``v_k`` after the product equals scaling ``g_k`` before it. ``xy_to_dw``'s ``lora_b``
mixes units (it contracts ``g`` with ``A``), so there the identity holds in the E layout: with
``E(x, g) = x \otimes g``, ``alpha * yw_to_w(v, E(x, g)) @ A.T == xy_to_dw(x, v * g)['lora_b']``,
because scaling column ``k`` of ``E`` by ``v_k`` commutes with the later (linear) contraction over ``k``.

The rule-derived D-RTRL update cannot produce the E layout, so both primitives register a
:class:`~braintrace._etrace_op._trace_ops.DRTRLTraceOps`: update
``E <- D E + x ⊗ df``, ``eps_A <- D eps_A + (x B) ⊗ (alpha df)``, ``eps_b <- D eps_b + df`` (``D`` a
contraction over the state axis per unit ``k``); solve
``dB[i, r] = alpha sum_k A[r, k] sum_b sum_s ct[b, k, s] E[b, i, k, s]`` and the dense-like solves
for ``A`` and the bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _cpu_sums
from ._batching import make_x_batching_rule
from ._registries import BATCHED_PRIMITIVES
from ._spec import ETPPrimitiveSpec, register_primitive_spec
from ._trace_ops import ETP_DRTRL_TRACE_OPS, DRTRLTraceOps, output_trace_zeros
from ._units import attach, bias_mantissa, split
from .dense import (
    apply_operand_fn,
    fused_bias_solve,
    fused_bias_update,
    fused_bias_update_solve,
    fused_dense_solve,
    fused_dense_update,
    fused_dense_update_solve,
)

__all__ = ["etp_lora_mm_p", "etp_lora_mv_p", "lora_matmul", "make_factored_trace_ops"]


def _lora_impl(*args, alpha=1.0, has_bias=False):
    x, b, a = args[0], args[1], args[2]
    y = alpha * ((x @ b) @ a)
    if has_bias:
        y = y + args[3]
    return y


def _lora_trainable_invars(params):
    """``{'lora_b': 1, 'lora_a': 2}`` plus ``'bias': 3`` when ``has_bias``."""
    layout = {"lora_b": 1, "lora_a": 2}
    if params.get("has_bias", False):
        layout["bias"] = 3
    return layout


# ---------------------------------------------------------------------------------------------
# The four ETP rules
# ---------------------------------------------------------------------------------------------


def _lora_yw_to_w(hidden_dim, trace, *, alpha=1.0, has_bias=False):
    r"""Scale every leaf along ``out`` by ``hidden_dim`` ``(..., O)``.

    ``trace['lora_b']``: the E layout ``(..., I, O)``; ``trace['lora_a']``: ``(..., r, O)``;
    ``trace['bias']``: ``(..., O)``.
    """
    d = jnp.expand_dims(hidden_dim, axis=-2)
    out = {"lora_b": trace["lora_b"] * d, "lora_a": trace["lora_a"] * d}
    if has_bias:
        out["bias"] = trace["bias"] * hidden_dim
    return out


def _lora_xy_to_dw(x, hidden_dim, weights, *, alpha=1.0, has_bias=False):
    r"""``{'lora_b': dB, 'lora_a': dA[, 'bias': db]}``: the VJP of the op with cotangent ``g``.

    With :math:`z = x B`: :math:`dA = \alpha \sum_b z_b^\top g_b`, :math:`dB = \alpha \sum_b
    x_b^\top (g_b A^\top)`, :math:`db = \sum_b g_b`. ``x``: ``(*batch, I)``, ``g``: ``(*batch, O)``;
    the batch sums are :func:`_cpu_sums.outer_sum`; each leaf in its weight's dtype.
    """
    b, a = weights["lora_b"], weights["lora_a"]
    dtype = jnp.result_type(x, b, a)
    g_y = jnp.asarray(hidden_dim, dtype=dtype)
    g = alpha * g_y
    x = x.astype(dtype)
    out = {
        "lora_b": _cpu_sums.outer_sum(x, g @ a.astype(dtype).T).astype(b.dtype),
        "lora_a": _cpu_sums.outer_sum(x @ b.astype(dtype), g).astype(a.dtype),
    }
    if has_bias:
        out["bias"] = _cpu_sums.row_sum(g_y).astype(weights["bias"].dtype)
    return out


def _lora_e_term(x, g):
    r"""The E-layout term :math:`x \otimes g`: ``(..., I)`` x ``(..., O)`` -> ``(..., I, O)``."""
    return x[..., :, None] * g[..., None, :]


def _lora_b_from_e(e, lora_a, alpha):
    r"""Contract an E-layout term with :math:`\alpha A`: ``(..., I, O)`` -> ``(..., I, r)``."""
    return alpha * jnp.einsum("...ik,rk->...ir", e, lora_a)


def _trace_zeros(batch_shape, weight_vars, n):
    b_var, a_var = weight_vars["lora_b"], weight_vars["lora_a"]
    n_in, n_out = b_var.aval.shape[0], a_var.aval.shape[1]
    out = {
        "lora_b": jnp.zeros((*batch_shape, n_in, n_out, n), dtype=b_var.aval.dtype),
        "lora_a": jnp.zeros((*batch_shape, *a_var.aval.shape, n), dtype=a_var.aval.dtype),
    }
    if "bias" in weight_vars:
        bias = weight_vars["bias"].aval
        out["bias"] = jnp.zeros((*batch_shape, *bias.shape, n), dtype=bias.dtype)
    return out


def _lora_mm_init_drtrl(x_var, y_var, weight_vars, num_hidden_state):
    """``{'lora_b': zeros(B, I, O, n), 'lora_a': zeros(B, r, O, n)[, 'bias': zeros(B, O, n)]}``."""
    return _trace_zeros(x_var.aval.shape[:1], weight_vars, num_hidden_state)


def _lora_mv_init_drtrl(x_var, y_var, weight_vars, num_hidden_state):
    """``{'lora_b': zeros(I, O, n), 'lora_a': zeros(r, O, n)[, 'bias': zeros(O, n)]}``."""
    return _trace_zeros((), weight_vars, num_hidden_state)


# Per-primitive names (the dense module's convention); both primitives share the rules.
_lora_mm_yw_to_w = _lora_mv_yw_to_w = _lora_yw_to_w
_lora_mm_xy_to_dw = _lora_mv_xy_to_dw = _lora_xy_to_dw
_lora_mm_init_pp = _lora_mv_init_pp = _lora_init_pp = output_trace_zeros


# ---------------------------------------------------------------------------------------------
# D-RTRL trace operations (E layout for lora_b)
# ---------------------------------------------------------------------------------------------


def _make_trace_ops(get_primitive):
    def init(x_var, y_var, weight_vars, n, batch_shape, params):
        if get_primitive() in BATCHED_PRIMITIVES:
            batch_shape = x_var.aval.shape[:1]
        return _trace_zeros(tuple(batch_shape), weight_vars, n)

    def update(trace, d, x, df, weights, params, batch_ndim):
        r"""``E <- D E + x ⊗ df``; ``eps_A <- D eps_A + (xB) ⊗ (alpha df)``; ``eps_b <- D eps_b + df``.

        ``x``: ``(*batch, I)`` or ``(I,)`` (``etp_lora_mv`` under a batched model); ``df``:
        ``(*batch, O, n)``; ``d``: ``(*batch, O, n, n)``. Each leaf goes through the fused dense
        trace update (a Pallas kernel under the ``'pallas'`` backend).
        """
        alpha = params.get("alpha", 1.0)
        z = x @ weights["lora_b"]
        new = {
            "lora_b": fused_dense_update(trace["lora_b"], d, x, df),
            "lora_a": fused_dense_update(trace["lora_a"], d, alpha * z, df),
        }
        if "bias" in trace:
            new["bias"] = fused_bias_update(trace["bias"], d, df)
        return {k: v.astype(trace[k].dtype) for k, v in new.items()}

    def solve(trace, ct, weights, params, batch_ndim):
        r"""``dB = alpha (sum_b sum_s ct E) A^T``; ``dA``, ``db``: ``sum_b sum_s ct eps``."""
        alpha = params.get("alpha", 1.0)
        grads = {
            "lora_b": _lora_b_from_e(fused_dense_solve(trace["lora_b"], ct), weights["lora_a"], alpha),
            "lora_a": fused_dense_solve(trace["lora_a"], ct),
        }
        if "bias" in trace:
            grads["bias"] = fused_bias_solve(trace["bias"], ct)
        return {k: v.astype(weights[k].dtype) for k, v in grads.items()}

    def update_solve(trace, d, x, df, ct, weights, params, batch_ndim):
        """:func:`update`, then :func:`solve` of the new trace, each leaf in one pass."""
        alpha = params.get("alpha", 1.0)
        z = x @ weights["lora_b"]
        new, grads = {}, {}
        new["lora_b"], e_grad = fused_dense_update_solve(trace["lora_b"], d, x, df, ct)
        new["lora_a"], grads["lora_a"] = fused_dense_update_solve(trace["lora_a"], d, alpha * z, df, ct)
        grads["lora_b"] = _lora_b_from_e(e_grad, weights["lora_a"], alpha)
        if "bias" in trace:
            new["bias"], grads["bias"] = fused_bias_update_solve(trace["bias"], d, df, ct)
        return (
            {k: v.astype(trace[k].dtype) for k, v in new.items()},
            {k: v.astype(weights[k].dtype) for k, v in grads.items()},
        )

    return DRTRLTraceOps(init=init, update=update, solve=solve, update_solve=update_solve)


def make_factored_trace_ops(primitive, decay: float) -> DRTRLTraceOps:
    r"""D-RTRL trace operations with the ``lora_b`` trace factored as in ES-D-RTRL.

    The exact ``lora_b`` trace keeps ``E`` ``(B, I, O, n)``; this variant approximates
    :math:`E \approx \epsilon_x \otimes \epsilon_f / (1 - \lambda^{t})` with
    :math:`\epsilon_x \leftarrow \lambda \epsilon_x + x` ``(B, I)`` and
    :math:`\epsilon_f \leftarrow \lambda D \epsilon_f + (1-\lambda) df` ``(B, O, n)``, so its memory is
    ``B (I + O n)``. ``lora_a`` and ``bias`` keep their exact traces. Selected by
    ``braintrace.D_RTRL(model, lora_factored=True, decay_or_rank=...)``.

    The bias correction :math:`1-\lambda^{t}` is not formed from a power of :math:`\lambda`: the
    trace carries its normaliser ``eps_f_norm`` :math:`c \leftarrow \lambda c + (1-\lambda)` (a
    scalar in the dtype of :math:`\epsilon_f`, with the same arithmetic), and the solve divides by it,
    as ``pp_prop`` does. ``1 - lam ** t`` cancels to nothing in float32 for a :math:`\lambda` within a
    few ulps of 1 (an infinite gradient for ``0.99999999``); :math:`\epsilon_f / c` stays exact to
    rounding. A zero normaliser (no step taken) divides by 1: the zero trace contributes zero.

    Leaves: ``lora_a`` ``(*batch, r, O, n)``, ``bias`` ``(*batch, O, n)`` when present, ``eps_x``
    ``(*batch, I)``, ``eps_f`` ``(*batch, O, n)`` and ``eps_f_norm`` ``()``. ``eps_x`` and
    ``eps_f_norm`` do not propagate through ``D``: a restart of the traces scales them itself.
    """
    exact = _make_trace_ops(lambda: primitive)

    def init(x_var, y_var, weight_vars, n, batch_shape, params):
        full = exact.init(x_var, y_var, weight_vars, n, batch_shape, params)
        e = full.pop("lora_b")  # (*batch, I, O, n): only its shape is used
        bshape = e.shape[:-3]
        return {
            **full,
            "eps_x": jnp.zeros((*bshape, e.shape[-3]), e.dtype),
            "eps_f": jnp.zeros((*bshape, *e.shape[-2:]), e.dtype),
            "eps_f_norm": jnp.zeros((), e.dtype),  # the normaliser 1 - lambda^t
        }

    def update_factors(trace, d, x, df):
        """``eps_x <- lambda eps_x + x``, ``eps_f <- lambda D eps_f + (1 - lambda) df`` and its
        normaliser ``c <- lambda c + (1 - lambda)``."""
        eps_x, eps_f, norm = trace["eps_x"], trace["eps_f"], trace["eps_f_norm"]
        return {
            "eps_x": (decay * eps_x + jnp.broadcast_to(x, eps_x.shape)).astype(eps_x.dtype),
            "eps_f": (decay * jnp.einsum("...sj,...j->...s", d, eps_f) + (1 - decay) * df).astype(
                eps_f.dtype
            ),
            # the same arithmetic as eps_f, so that eps_f / c is exact to rounding
            "eps_f_norm": (decay * norm + (1 - decay)).astype(norm.dtype),
        }

    def lora_b_grad(trace, ct, weights, alpha):
        """``dB = alpha (eps_x (x) g) A^T``, ``g = sum_s ct eps_f / c``, summed over batch."""
        eps_f, norm = trace["eps_f"], trace["eps_f_norm"]
        # c = 1 - lambda^t; 0 only before the first step, where eps_f is zero and contributes nothing
        correction = jnp.where(norm == 0, jnp.ones_like(norm), norm)
        g = jnp.sum(ct * eps_f, axis=-1) / correction  # (*batch, O)
        e_grad = _cpu_sums.outer_sum(trace["eps_x"], g)
        return _lora_b_from_e(e_grad, weights["lora_a"], alpha)

    def update(trace, d, x, df, weights, params, batch_ndim):
        alpha = params.get("alpha", 1.0)
        z = x @ weights["lora_b"]
        new = {
            "lora_a": fused_dense_update(trace["lora_a"], d, alpha * z, df),
            **update_factors(trace, d, x, df),
        }
        if "bias" in trace:
            new["bias"] = fused_bias_update(trace["bias"], d, df)
        return new

    def solve(trace, ct, weights, params, batch_ndim):
        alpha = params.get("alpha", 1.0)
        grads = {
            "lora_b": lora_b_grad(trace, ct, weights, alpha),
            "lora_a": fused_dense_solve(trace["lora_a"], ct),
        }
        if "bias" in trace:
            grads["bias"] = fused_bias_solve(trace["bias"], ct)
        return {k: v.astype(weights[k].dtype) for k, v in grads.items()}

    def update_solve(trace, d, x, df, ct, weights, params, batch_ndim):
        """:func:`update`, then :func:`solve` of the new trace; the exact leaves in one pass each."""
        alpha = params.get("alpha", 1.0)
        z = x @ weights["lora_b"]
        new, grads = update_factors(trace, d, x, df), {}
        new["lora_a"], grads["lora_a"] = fused_dense_update_solve(trace["lora_a"], d, alpha * z, df, ct)
        if "bias" in trace:
            new["bias"], grads["bias"] = fused_bias_update_solve(trace["bias"], d, df, ct)
        grads["lora_b"] = lora_b_grad(new, ct, weights, alpha)
        return new, {k: v.astype(weights[k].dtype) for k, v in grads.items()}

    return DRTRLTraceOps(init=init, update=update, solve=solve, update_solve=update_solve)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

_x_rule_mv = make_x_batching_rule(lambda: etp_lora_mv_p, lambda: etp_lora_mm_p)
_x_rule_mm = make_x_batching_rule(lambda: etp_lora_mm_p, lambda: etp_lora_mm_p)

etp_lora_mm_p = register_primitive_spec(
    ETPPrimitiveSpec(
        name="etp_lora_mm",
        impl=_lora_impl,
        yw_to_w=_lora_mm_yw_to_w,
        xy_to_dw=_lora_mm_xy_to_dw,
        init_drtrl=_lora_mm_init_drtrl,
        init_pp=_lora_mm_init_pp,
        trainable_invars_fn=_lora_trainable_invars,
        x_invar_index=0,
        batched=True,
        batching_rule=_x_rule_mm,
    )
)

etp_lora_mv_p = register_primitive_spec(
    ETPPrimitiveSpec(
        name="etp_lora_mv",
        impl=_lora_impl,
        yw_to_w=_lora_mv_yw_to_w,
        xy_to_dw=_lora_mv_xy_to_dw,
        init_drtrl=_lora_mv_init_drtrl,
        init_pp=_lora_mv_init_pp,
        trainable_invars_fn=_lora_trainable_invars,
        x_invar_index=0,
        batched=False,
        batching_rule=_x_rule_mv,
    )
)

ETP_DRTRL_TRACE_OPS[etp_lora_mm_p] = _make_trace_ops(lambda: etp_lora_mm_p)
ETP_DRTRL_TRACE_OPS[etp_lora_mv_p] = _make_trace_ops(lambda: etp_lora_mv_p)


# ---------------------------------------------------------------------------------------------
# User-facing wrapper
# ---------------------------------------------------------------------------------------------


def lora_matmul(x, B, A, *, alpha: float = 1.0, bias=None, b_fn=None, a_fn=None, bias_fn=None):
    r"""ETP-marked low-rank product :math:`y = \alpha\, x\, f_B(B)\, f_A(A) \;(+ f_b(b))`.

    Binds ``etp_lora_mm`` when ``x.ndim >= 2`` (``(batch, in)``; more leading axes are flattened
    into the batch) and ``etp_lora_mv`` when ``x`` is a vector ``(in,)``.

    Parameters
    ----------
    x : array or Quantity, shape ``(batch, in)`` or ``(in,)``
    B : array or Quantity, shape ``(in, rank)``
    A : array or Quantity, shape ``(rank, out)``
    alpha : float
        Static scale (a Python number, not a traced value).
    bias : array or Quantity, shape ``(out,)``, optional
        Its unit must have the dimension of ``unit(x) * unit(B) * unit(A)``.
    b_fn, a_fn : callable, optional
        Shape-preserving transforms of the mantissas of ``B`` and ``A`` (units are split off before
        and put back after). Each is applied with plain JAX ops before the primitive is bound, so the
        primitive's trainable operands are ``b_fn(B)`` and ``a_fn(A)`` and the online gradients of
        ``B`` and ``A`` are the chain rule through them. ``None`` is the identity.
    bias_fn : callable, optional
        The same for the bias, applied to its mantissa in the output unit; ignored without a bias.

    Returns
    -------
    array or Quantity of shape ``(batch, out)`` or ``(out,)``, unit ``unit(x) * unit(B) * unit(A)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> braintrace.lora_matmul(jnp.ones((8, 64)), jnp.ones((64, 4)), jnp.ones((4, 32)), alpha=2.0).shape
    (8, 32)
    """
    x_m, x_u = split(x)
    b_m, b_u = split(B)
    a_m, a_u = split(A)
    x_m, b_m, a_m = jnp.asarray(x_m), jnp.asarray(b_m), jnp.asarray(a_m)
    b_m = apply_operand_fn(b_fn, b_m, name="b_fn", op="lora_matmul")
    a_m = apply_operand_fn(a_fn, a_m, name="a_fn", op="lora_matmul")
    try:
        alpha = float(alpha)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            f"lora_matmul: `alpha` must be a static Python number, got {type(alpha).__name__}."
        ) from None
    if b_m.ndim != 2:
        raise ValueError(f"lora_matmul: `B` must be 2-D (in, rank), got shape {b_m.shape}.")
    if a_m.ndim != 2:
        raise ValueError(f"lora_matmul: `A` must be 2-D (rank, out), got shape {a_m.shape}.")
    if b_m.shape[1] != a_m.shape[0]:
        raise ValueError(
            f"lora_matmul: the rank of `B` (shape {b_m.shape}) and of `A` (shape {a_m.shape}) differ; "
            f"B.shape[1] must equal A.shape[0]."
        )
    if x_m.ndim == 0:
        raise ValueError("lora_matmul: `x` must have at least one axis (in,) or (batch, in), got a scalar.")
    if x_m.shape[-1] != b_m.shape[0]:
        raise ValueError(
            f"lora_matmul: `x` has {x_m.shape[-1]} input features (shape {x_m.shape}) but `B` expects "
            f"{b_m.shape[0]} (shape {b_m.shape}); x.shape[-1] must equal B.shape[0]."
        )
    unit = x_u * b_u * a_u
    n_out = a_m.shape[1]
    operands = [x_m, b_m, a_m]
    if bias is not None:
        bias_m = jnp.asarray(bias_mantissa(bias, unit, op="lora_matmul"))
        bias_m = apply_operand_fn(bias_fn, bias_m, name="bias_fn", op="lora_matmul")
        if bias_m.shape != (n_out,):
            raise ValueError(
                f"lora_matmul: `bias` must have shape ({n_out},) = (A.shape[1],), got {bias_m.shape}."
            )
        operands.append(bias_m)
    lead = x_m.shape[:-1]
    if x_m.ndim > 2:
        operands[0] = x_m.reshape((-1, x_m.shape[-1]))
    p = etp_lora_mv_p if x_m.ndim == 1 else etp_lora_mm_p
    y = p.bind(*operands, alpha=alpha, has_bias=bias is not None)
    if x_m.ndim > 2:
        y = y.reshape((*lead, n_out))
    return attach(y, unit)
