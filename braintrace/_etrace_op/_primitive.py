r""":class:`ETPPrimitive` and :func:`register_primitive`.

An ETP primitive is a JAX primitive that marks a trainable operation ``y = f(x, \theta)`` in a
model's jaxpr. Every standard JAX rule (eager impl, abstract evaluation, MLIR lowering, JVP,
transpose, batching) is derived from one implementation function; only the four ETP rules
(``yw_to_w``, ``xy_to_dw``, ``init_drtrl``, ``init_pp``) are written by hand.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from braintrace._compatible_imports import Primitive, ad, batching, mlir

from ._registries import (
    BATCHED_PRIMITIVES,
    ETP_PRIMITIVE_SPECS,
    ETP_PRIMITIVES,
    ETP_PRIMITIVES_BY_NAME,
    ETP_RULES_INIT_DRTRL,
    ETP_RULES_INIT_PP,
    ETP_RULES_XY_TO_DW,
    ETP_RULES_YW_TO_W,
    ETP_TRAINABLE_INVARS_FNS,
    ETP_X_INVAR_INDICES,
    ETP_Y_OUTVAR_INDICES,
    GRADIENT_ENABLED_PRIMITIVES,
    default_trainable_invars,
)
from ._trace_ops import ETP_DRTRL_TRACE_OPS

__all__ = ["ETPPrimitive", "register_primitive", "unregister_primitive"]


class ETPPrimitive(Primitive):
    """A JAX ``Primitive`` that carries the four ETP rules.

    Returned by :func:`register_primitive`. It binds like any primitive and adds methods that
    install its ETP rules in the global registries of :mod:`braintrace._etrace_op`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> def my_impl(x, w):
    ...     return x @ w
    >>> my_p = braintrace.register_primitive('etp_doc_mm', my_impl, batched=True, replace=True)
    >>> my_p.bind(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
    (2, 4)
    """

    #: The implementation every derived rule is built from.
    impl_fn: Callable
    #: Optional accelerator implementation ``kernel_fn(*args, interpret: bool, **params)``.
    kernel_fn: Optional[Callable] = None

    def __repr__(self):
        return self.name

    def register_yw_to_w(self, fn: Callable) -> None:
        """Install the D-RTRL trace propagation rule ``(hidden_dim, trace, **params) -> trace``."""
        _check_callable(fn, "yw_to_w")
        ETP_RULES_YW_TO_W[self] = fn

    def register_xy_to_dw(self, fn: Callable) -> None:
        """Install the weight-gradient rule ``(x, hidden_dim, weights, **params) -> dW``."""
        _check_callable(fn, "xy_to_dw")
        ETP_RULES_XY_TO_DW[self] = fn

    def register_init_drtrl(self, fn: Callable) -> None:
        """Install the D-RTRL trace initialiser ``(x_var, y_var, weight_vars, n) -> zeros``."""
        _check_callable(fn, "init_drtrl")
        ETP_RULES_INIT_DRTRL[self] = fn

    def register_init_pp(self, fn: Callable) -> None:
        """Install the pp_prop df-trace initialiser ``(x_var, y_var, weight_vars, n) -> zeros``."""
        _check_callable(fn, "init_pp")
        ETP_RULES_INIT_PP[self] = fn

    def register_etp_rules(
        self,
        *,
        yw_to_w: Optional[Callable] = None,
        xy_to_dw: Optional[Callable] = None,
        init_drtrl: Optional[Callable] = None,
        init_pp: Optional[Callable] = None,
    ) -> None:
        """Install several ETP rules at once; an argument left as ``None`` is skipped."""
        for name, fn, reg in (
            ("yw_to_w", yw_to_w, self.register_yw_to_w),
            ("xy_to_dw", xy_to_dw, self.register_xy_to_dw),
            ("init_drtrl", init_drtrl, self.register_init_drtrl),
            ("init_pp", init_pp, self.register_init_pp),
        ):
            if fn is not None:
                reg(fn)


def _check_callable(fn, what):
    if not callable(fn):
        raise TypeError(f"The {what!r} rule must be callable, got {type(fn).__name__}.")


def _zero_tangent(primal):
    """A concrete zero tangent for ``primal`` (``float0`` for integer/boolean operands)."""
    dtype = jnp.result_type(primal)
    if jnp.issubdtype(dtype, jnp.inexact):
        return jnp.zeros(jnp.shape(primal), dtype)
    return np.zeros(jnp.shape(primal), dtype=jax.dtypes.float0)


def unregister_primitive(primitive) -> None:
    """Remove ``primitive`` from every registry (its JAX rules stay attached to the object)."""
    for table in (ETP_PRIMITIVES, BATCHED_PRIMITIVES, GRADIENT_ENABLED_PRIMITIVES):
        table.discard(primitive)
    for table in (
        ETP_RULES_YW_TO_W,
        ETP_RULES_XY_TO_DW,
        ETP_RULES_INIT_DRTRL,
        ETP_RULES_INIT_PP,
        ETP_TRAINABLE_INVARS_FNS,
        ETP_X_INVAR_INDICES,
        ETP_Y_OUTVAR_INDICES,
        ETP_PRIMITIVE_SPECS,
    ):
        table.pop(primitive, None)
    ETP_DRTRL_TRACE_OPS.pop(primitive, None)
    if ETP_PRIMITIVES_BY_NAME.get(primitive.name) is primitive:
        del ETP_PRIMITIVES_BY_NAME[primitive.name]


def register_primitive(
    name: str,
    impl_fn: Callable,
    *,
    batched: bool = False,
    gradient_enabled: bool = False,
    trainable_invars_fn: Optional[Callable[[dict], Dict[str, int]]] = None,
    x_invar_index: Optional[int] = 0,
    y_outvar_index: int = 0,
    multiple_results: bool = False,
    batching_rule: Optional[Callable] = None,
    kernel_fn: Optional[Callable] = None,
    remat_jvp: bool = False,
    replace: bool = False,
) -> ETPPrimitive:
    r"""Create an :class:`ETPPrimitive` whose JAX rules are all derived from ``impl_fn``.

    Derived rules: eager impl (``impl_fn``), abstract evaluation (``jax.eval_shape(impl_fn)``),
    MLIR lowering (``mlir.lower_fun(impl_fn)``), JVP (``jax.jvp(impl_fn)``), transpose (JAX
    transposes the linear ops of that JVP) and batching (``jax.vmap(impl_fn)``). Note that the
    derived batching rule inlines ``impl_fn``: under ``vmap`` the marker disappears from the
    jaxpr, so the compiler no longer sees the op. Pass ``batching_rule`` (same signature as a JAX
    batcher, ``(args, dims, **params) -> (out, out_dim)``) to re-bind an ETP primitive instead,
    as the built-ins do.

    Parameters
    ----------
    name : str
        Primitive name, e.g. ``'etp_mm'``.
    impl_fn : callable
        ``impl_fn(*operands, **static_params) -> y`` written with ordinary JAX ops.
    batched : bool
        ``True`` when ``x`` and ``y`` carry a leading batch axis.
    gradient_enabled : bool
        ``True`` only for identity-like primitives the compiler may walk through on ``y -> h``.
    trainable_invars_fn : callable, optional
        ``params -> {key: invar_index}``; defaults to ``{'weight': 1}``.
    x_invar_index : int or None
        Position of ``x`` in ``eqn.invars`` (``None`` for input-free primitives).
    y_outvar_index : int
        Position of ``y`` in ``eqn.outvars``.
    multiple_results : bool
        ``True`` when ``impl_fn`` returns a tuple of arrays.
    batching_rule : callable, optional
        Replaces the derived ``jax.vmap(impl_fn)`` batching rule.
    kernel_fn : callable, optional
        Accelerator implementation ``kernel_fn(*operands, interpret: bool, **params)`` with the
        semantics of ``impl_fn``; used instead of ``impl_fn`` under ``set_backend('pallas')``.
    remat_jvp : bool
        Differentiate ``jax.checkpoint(impl_fn)``: reverse mode then keeps only the operands for the
        backward pass and recomputes ``impl_fn``'s intermediates there. Worth it when an intermediate
        is much larger than the operands (the sparse ops gather ``x`` into a ``(batch, nnz)`` array;
        through a scan of ``T`` steps that is ``T`` such arrays).
    replace : bool
        Registering a name that is already registered raises ``ValueError`` unless
        ``replace=True``, which unregisters the previous primitive first (its existing jaxprs
        keep working, but the compiler no longer recognises it).

    Returns
    -------
    ETPPrimitive

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import braintrace
    >>> p = braintrace.register_primitive('etp_doc_scale', lambda x, w: x * w, batched=True,
    ...                                   replace=True)
    >>> float(jax.grad(lambda w: p.bind(jnp.arange(3.), w).sum())(2.0))
    3.0
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"`name` must be a non-empty string, got {name!r}.")
    if not callable(impl_fn):
        raise TypeError(f"`impl_fn` must be callable, got {type(impl_fn).__name__}.")
    if trainable_invars_fn is not None and not callable(trainable_invars_fn):
        raise TypeError("`trainable_invars_fn` must be a callable `params -> {key: invar_index}`.")
    for arg, fn in (("batching_rule", batching_rule), ("kernel_fn", kernel_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"`{arg}` must be callable or None, got {type(fn).__name__}.")
    if x_invar_index is not None and (not isinstance(x_invar_index, int) or x_invar_index < 0):
        raise ValueError(f"`x_invar_index` must be a non-negative int or None, got {x_invar_index!r}.")
    if not isinstance(y_outvar_index, int) or y_outvar_index < 0:
        raise ValueError(f"`y_outvar_index` must be a non-negative int, got {y_outvar_index!r}.")
    previous = ETP_PRIMITIVES_BY_NAME.get(name)
    if previous is not None:
        if not replace:
            raise ValueError(
                f"An ETP primitive named {name!r} is already registered. Pick another name, or pass "
                f"replace=True to unregister the existing one."
            )
        unregister_primitive(previous)

    p = ETPPrimitive(name)
    p.multiple_results = multiple_results
    p.impl_fn = impl_fn
    p.kernel_fn = kernel_fn
    ETP_PRIMITIVES.add(p)
    ETP_PRIMITIVES_BY_NAME[name] = p
    if batched:
        BATCHED_PRIMITIVES.add(p)
    if gradient_enabled:
        GRADIENT_ENABLED_PRIMITIVES.add(p)
    ETP_TRAINABLE_INVARS_FNS[p] = trainable_invars_fn or default_trainable_invars
    ETP_X_INVAR_INDICES[p] = x_invar_index
    ETP_Y_OUTVAR_INDICES[p] = y_outvar_index

    p.def_impl(impl_fn)

    def _abstract_eval(*avals, **params):
        shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
        out = jax.eval_shape(partial(impl_fn, **params), *shapes)
        to_aval = lambda o: jax.core.ShapedArray(o.shape, o.dtype)
        return [to_aval(o) for o in out] if multiple_results else to_aval(out)

    p.def_abstract_eval(_abstract_eval)

    # Default lowering (every platform); the backend module adds platform-specific kernel
    # lowerings on top of it when ``kernel_fn`` is given.
    mlir.register_lowering(p, mlir.lower_fun(impl_fn, multiple_results=multiple_results))

    def _jvp(primals, tangents, **params):
        # Differentiate only through the operands with a nonzero tangent: instantiating the symbolic
        # zeros would make the linearised op do the work of every operand (a second matmul in
        # `jvp(matmul, w)` whose x-tangent is zero).
        active = [not isinstance(t, ad.Zero) for t in tangents]
        if not any(active):
            active = [True] * len(primals)
            tangents = [_zero_tangent(pr) for pr in primals]

        def restricted(*active_primals):
            it = iter(active_primals)
            return impl_fn(*(next(it) if a else pr for pr, a in zip(primals, active)), **params)

        _, out_t = jax.jvp(
            jax.checkpoint(restricted) if remat_jvp else restricted,
            tuple(pr for pr, a in zip(primals, active) if a),
            tuple(t for t, a in zip(tangents, active) if a),
        )
        # The primal output re-binds the primitive, so a differentiated jaxpr keeps the ETP marker
        # and the primal lowers to the selected backend's implementation.
        out = p.bind(*primals, **params)
        return (list(out), list(out_t)) if multiple_results else (out, out_t)

    ad.primitive_jvps[p] = _jvp

    if batching_rule is None:

        def batching_rule(args, dims, **params):
            out = jax.vmap(partial(impl_fn, **params), in_axes=tuple(dims))(*args)
            return (out, [0] * len(out)) if multiple_results else (out, 0)

    batching.primitive_batchers[p] = batching_rule

    if kernel_fn is not None:
        from braintrace._backend import install_kernel_lowerings

        install_kernel_lowerings(p)
    return p
