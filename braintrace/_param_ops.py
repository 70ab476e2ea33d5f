r"""Parameter states that carry their operation, and the operation objects (the 0.2 op layer).

Scripts written for the published 0.2 releases hold a weight together with an *op* that says how
the weight acts on an input::

    w = braintrace.ETraceParam({'weight': W, 'bias': b}, braintrace.MatMulOp(weight_fn=jnp.abs))
    h = 0.9 * h + w.execute(x)             # y = x |W| + b through braintrace.matmul

Each op computes its product through one of the ETP wrappers (:func:`braintrace.matmul`,
:func:`braintrace.element_wise`, :func:`braintrace.conv`, :func:`braintrace.sparse_matmul`,
:func:`braintrace.lora_matmul`). A weight mask or a weight function is applied with plain JAX ops to
the parameter *before* the wrapper: the compiler keeps the eligibility trace for the wrapper's
operand and pulls the gradient back through the transform, so the parameter itself is learned online.

* :class:`ETraceParam`, :class:`ElemWiseParam`: ``brainstate.ParamState`` subclasses whose
  ``execute`` goes through the op's ETP wrapper (:meth:`ETraceOp.xw_to_y`): eligibility traces.
* :class:`NonTempParam`: a ``brainstate.ParamState`` whose ``execute`` uses the op's plain-JAX form
  (:meth:`ETraceOp.raw_xw_to_y`): no ETP primitive, so the compiler records it as a plain parameter
  (``DiagnosticKind.PLAIN_PARAMETER``) and it receives its within-step gradient.
* :class:`FakeETraceParam`, :class:`FakeElemWiseParam`: plain objects, not states. Their values are
  constants to the compiler and receive no gradient.

New code can call the wrappers on a ``brainstate.ParamState`` directly; the layers of
:mod:`braintrace.nn` do.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Union

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u
from jax import lax

from ._etrace_op import conv, element_wise, lora_matmul, matmul, sparse_matmul
from ._etrace_op._units import attach, split
from ._etrace_op.sparse import sparse_pattern

__all__ = [
    "ETraceOp",
    "MatMulOp",
    "ElemWiseOp",
    "ConvOp",
    "SpMatMulOp",
    "LoraOp",
    "ETraceParam",
    "ElemWiseParam",
    "NonTempParam",
    "FakeETraceParam",
    "FakeElemWiseParam",
]

_GRADIENT_MODES = ("full", "approx", "adaptive")


def _identity(w):
    return w


def _check_callable(fn, owner: str, name: str):
    if not callable(fn):
        raise TypeError(f"{owner}: `{name}` must be callable, got {type(fn).__name__}.")
    return fn


def _as_mask(weight_mask, owner: str):
    """``None`` or the mask as an array (a ``Quantity`` is kept as it is)."""
    if weight_mask is None or isinstance(weight_mask, u.Quantity):
        return weight_mask
    try:
        return jnp.asarray(weight_mask)
    except TypeError:
        raise TypeError(
            f"{owner}: `weight_mask` must be an array (numpy, JAX or saiunit), got "
            f"{type(weight_mask).__name__}."
        ) from None


def _apply_mask(w, mask, owner: str):
    if mask is None:
        return w
    w_shape, m_shape = tuple(np.shape(w)), tuple(np.shape(mask))
    try:
        broadcast = np.broadcast_shapes(w_shape, m_shape)
    except ValueError:
        broadcast = None
    if broadcast != w_shape:
        raise ValueError(
            f"{owner}: `weight_mask` of shape {m_shape} does not broadcast to the weight's shape "
            f"{w_shape}; give a mask of the weight's shape."
        )
    return w * mask


def _check_weight_dict(w, owner: str, required: Sequence[str], optional: Sequence[str] = ("bias",)):
    if not isinstance(w, dict):
        raise TypeError(
            f"{owner}: the weight must be a dict with keys {list(required)} (and optionally "
            f"{list(optional)}), got {type(w).__name__}."
        )
    missing = [k for k in required if k not in w]
    unknown = sorted(k for k in w if k not in required and k not in optional)
    if missing or unknown:
        raise ValueError(
            f"{owner}: the weight dict must have keys {list(required)} (and optionally {list(optional)}); "
            f"got keys {sorted(w)}"
            + (f", missing {missing}" if missing else "")
            + (f", unknown {unknown}" if unknown else "")
            + "."
        )


def _add_bias(y, bias):
    return y if bias is None else y + bias


# ------------------------------------------------------------------------------------------------
# Operations
# ------------------------------------------------------------------------------------------------


class ETraceOp:
    r"""Base class of the operation objects: ``y = op(x, w)``.

    A subclass defines :meth:`xw_to_y` (the product through an ETP wrapper, which the compiler sees)
    and :meth:`raw_xw_to_y` (the same values with plain JAX ops, which it does not).

    Parameters
    ----------
    is_diagonal : bool
        Whether the operation is element-wise (each output depends on its own weight only).
    name : str, optional

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> class Scale(braintrace.ETraceOp):
    ...     def xw_to_y(self, x, w):
    ...         return braintrace.matmul(x, jnp.diag(w))
    ...     def raw_xw_to_y(self, x, w):
    ...         return x * w
    >>> op = Scale()
    >>> op(jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]))
    Array([3., 8.], dtype=float32)
    >>> op.xy_to_dw(jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]), jnp.array([3.0, 4.0]))
    Array([1., 2.], dtype=float32)
    """

    def __init__(self, is_diagonal: Optional[bool] = False, name: Optional[str] = None) -> None:
        self.is_diagonal = bool(is_diagonal)
        self.name = name

    def __call__(self, inputs: Any, weights: Any) -> Any:
        """:meth:`xw_to_y`."""
        return self.xw_to_y(inputs, weights)

    def xw_to_y(self, inputs: Any, weights: Any) -> Any:
        """``y`` through an ETP wrapper; subclasses define it."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define xw_to_y(inputs, weights); subclasses of ETraceOp "
            f"compute their product there through an ETP wrapper such as braintrace.matmul."
        )

    def raw_xw_to_y(self, inputs: Any, weights: Any) -> Any:
        """``y`` with plain JAX ops (no ETP primitive). By default :meth:`xw_to_y`: a subclass whose
        :meth:`xw_to_y` binds an ETP primitive overrides it."""
        return self.xw_to_y(inputs, weights)

    def xy_to_dw(self, input_dim_arr: Any, hidden_dim_arr: Any, weights: Any) -> Any:
        r"""The weight cotangent of the output cotangent ``hidden_dim_arr``:
        :math:`\partial \langle y, g\rangle / \partial w` with ``y = raw_xw_to_y(input_dim_arr, w)``
        and ``g = hidden_dim_arr`` (a pytree like ``weights``)."""
        y, pullback = jax.vjp(lambda w: u.get_mantissa(self.raw_xw_to_y(input_dim_arr, w)), weights)
        g = u.get_mantissa(hidden_dim_arr)
        if np.shape(g) != np.shape(y):
            raise ValueError(
                f"{type(self).__name__}.xy_to_dw: `hidden_dim_arr` must have the output's shape "
                f"{np.shape(y)}, got {np.shape(g)}."
            )
        return pullback(jnp.asarray(g, dtype=y.dtype))[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MatMulOp(ETraceOp):
    r"""Dense product :math:`y = x\, f(W) + b` through :func:`braintrace.matmul`.

    The weight is a dict ``{'weight': (I, O)[, 'bias': (O,)]}``. With a mask :math:`M`,
    :math:`f(W) = \mathrm{weight\_fn}(W \odot M)`, or :math:`\mathrm{weight\_fn}(W) \odot M` when
    ``apply_weight_fn_before_mask``. The mask and the function act on the parameter with plain JAX
    ops before the wrapper; the online gradient of ``W`` passes through them.

    Parameters
    ----------
    weight_mask : array, shape broadcastable to ``(I, O)``, optional
    weight_fn : callable
        Applied to the weight (``jnp.abs`` for sign-constrained weights); identity by default.
    apply_weight_fn_before_mask : bool
        Apply ``weight_fn`` first and the mask after. Default ``False``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> op = braintrace.MatMulOp(weight_mask=jnp.array([[1.0, 0.0], [1.0, 1.0]]), weight_fn=jnp.abs)
    >>> w = {'weight': jnp.array([[-1.0, 2.0], [3.0, -4.0]]), 'bias': jnp.array([0.5, 0.5])}
    >>> op(jnp.array([[1.0, 1.0]]), w)
    Array([[4.5, 4.5]], dtype=float32)
    """

    def __init__(
        self,
        weight_mask: Optional[Any] = None,
        weight_fn: Callable = _identity,
        apply_weight_fn_before_mask: bool = False,
    ) -> None:
        super().__init__(is_diagonal=False)
        self.weight_mask = _as_mask(weight_mask, "MatMulOp")
        self.weight_fn = _check_callable(weight_fn, "MatMulOp", "weight_fn")
        if not isinstance(apply_weight_fn_before_mask, bool):
            raise TypeError(
                f"MatMulOp: `apply_weight_fn_before_mask` must be a bool, got "
                f"{type(apply_weight_fn_before_mask).__name__}."
            )
        self.apply_weight_fn_before_mask = apply_weight_fn_before_mask

    def _weight(self, w: Dict[str, Any]):
        _check_weight_dict(w, "MatMulOp", ("weight",))
        if self.apply_weight_fn_before_mask:
            return _apply_mask(self.weight_fn(w["weight"]), self.weight_mask, "MatMulOp")
        return self.weight_fn(_apply_mask(w["weight"], self.weight_mask, "MatMulOp"))

    def xw_to_y(self, inputs: Any, weights: Dict[str, Any]) -> Any:
        """:func:`braintrace.matmul` of ``inputs`` and the transformed weight."""
        return matmul(inputs, self._weight(weights), bias=weights.get("bias"))

    def raw_xw_to_y(self, inputs: Any, weights: Dict[str, Any]) -> Any:
        """The same product with ``@``."""
        return _add_bias(u.math.matmul(inputs, self._weight(weights)), weights.get("bias"))


class ElemWiseOp(ETraceOp):
    r"""Element-wise weight :math:`y = \mathrm{fn}(w)` through :func:`braintrace.element_wise`.

    Called with the weight alone: ``op(w)``. For per-unit parameters (time constants, thresholds)
    entering the dynamics element-wise; each gets an exact per-unit eligibility trace.

    Parameters
    ----------
    fn : callable
        Applied to the weight; identity by default.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> op = braintrace.ElemWiseOp(jnp.square)
    >>> op(jnp.array([-1.0, 2.0]))
    Array([1., 4.], dtype=float32)
    """

    def __init__(self, fn: Callable = _identity) -> None:
        super().__init__(is_diagonal=True)
        self.fn = _check_callable(fn, "ElemWiseOp", "fn")

    def __call__(self, weights: Any) -> Any:  # the published form: the weight alone
        """:meth:`xw_to_y` with no input."""
        return self.xw_to_y(None, weights)

    def xw_to_y(self, inputs: Any, weights: Any) -> Any:
        """``fn(weights)`` through :func:`braintrace.element_wise` (``inputs`` is ignored)."""
        return element_wise(weights, fn=self.fn)

    def raw_xw_to_y(self, inputs: Any, weights: Any) -> Any:
        """``fn(weights)`` (``inputs`` is ignored)."""
        return self.fn(weights)


class ConvOp(ETraceOp):
    r"""Convolution :math:`y = \mathrm{conv}(x, \mathrm{weight\_fn}(K \odot M)) + b` through
    :func:`braintrace.conv`.

    The weight is a dict ``{'weight': kernel[, 'bias': (C_out,)]}``; the bias is added along the
    output feature axis of ``dimension_numbers``. ``x`` carries a batch axis.

    Parameters
    ----------
    xinfo : jax.ShapeDtypeStruct
        Shape and dtype of the input (kept as an attribute; the product reads the input's own shape).
    window_strides : sequence of int
    padding : str or sequence of (low, high) pairs
    lhs_dilation, rhs_dilation : sequence of int, optional
    feature_group_count, batch_group_count : int
    dimension_numbers : optional
        As in :func:`jax.lax.conv_general_dilated`, e.g. ``('NWC', 'WIO', 'NWC')``.
    weight_mask : array, shape broadcastable to the kernel's, optional
    weight_fn : callable
        Applied to the masked kernel; identity by default.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import braintrace
    >>> x = jnp.ones((2, 8, 3))
    >>> op = braintrace.ConvOp(jax.ShapeDtypeStruct(x.shape, x.dtype), window_strides=(1,),
    ...                        padding='VALID', dimension_numbers=('NWC', 'WIO', 'NWC'))
    >>> y = op(x, {'weight': jnp.ones((3, 3, 4)), 'bias': jnp.zeros(4)})
    >>> y.shape, float(y[0, 0, 0])
    ((2, 6, 4), 9.0)
    """

    def __init__(
        self,
        xinfo: jax.ShapeDtypeStruct,
        window_strides: Sequence[int],
        padding: Any,
        lhs_dilation: Optional[Sequence[int]] = None,
        rhs_dilation: Optional[Sequence[int]] = None,
        feature_group_count: int = 1,
        batch_group_count: int = 1,
        dimension_numbers: Any = None,
        weight_mask: Optional[Any] = None,
        weight_fn: Callable = _identity,
    ) -> None:
        super().__init__(is_diagonal=False)
        self.xinfo = xinfo
        self.window_strides = window_strides
        self.padding = padding
        self.lhs_dilation = lhs_dilation
        self.rhs_dilation = rhs_dilation
        self.feature_group_count = feature_group_count
        self.batch_group_count = batch_group_count
        self.dimension_numbers = dimension_numbers
        self.weight_mask = _as_mask(weight_mask, "ConvOp")
        self.weight_fn = _check_callable(weight_fn, "ConvOp", "weight_fn")

    def _weight(self, w: Dict[str, Any]):
        _check_weight_dict(w, "ConvOp", ("weight",))
        return self.weight_fn(_apply_mask(w["weight"], self.weight_mask, "ConvOp"))

    def xw_to_y(self, inputs: Any, weights: Dict[str, Any]) -> Any:
        """:func:`braintrace.conv` of ``inputs`` and the transformed kernel."""
        return conv(
            inputs,
            self._weight(weights),
            bias=weights.get("bias"),
            strides=self.window_strides,
            padding=self.padding,
            lhs_dilation=self.lhs_dilation,
            rhs_dilation=self.rhs_dilation,
            feature_group_count=self.feature_group_count,
            batch_group_count=self.batch_group_count,
            dimension_numbers=self.dimension_numbers,
        )

    def raw_xw_to_y(self, inputs: Any, weights: Dict[str, Any]) -> Any:
        """The same convolution with :func:`jax.lax.conv_general_dilated`."""
        x_m, x_u = split(inputs)
        k_m, k_u = split(self._weight(weights))
        x_m, k_m = jnp.asarray(x_m), jnp.asarray(k_m)
        y = lax.conv_general_dilated(
            x_m,
            k_m,
            window_strides=tuple(self.window_strides),
            padding=self.padding if isinstance(self.padding, str) else tuple(map(tuple, self.padding)),
            lhs_dilation=self.lhs_dilation,
            rhs_dilation=self.rhs_dilation,
            feature_group_count=self.feature_group_count,
            batch_group_count=self.batch_group_count,
            dimension_numbers=self.dimension_numbers,
        )
        y = attach(y, x_u * k_u)
        bias = weights.get("bias")
        if bias is None:
            return y
        dn = lax.conv_dimension_numbers(x_m.shape, k_m.shape, self.dimension_numbers)
        shape = [1] * y.ndim
        shape[dn.out_spec[1]] = -1
        return y + u.math.reshape(bias, shape)


class SpMatMulOp(ETraceOp):
    r"""Sparse product :math:`y = x\, \mathrm{sparse}(\mathrm{weight\_fn}(w)) + b` through
    :func:`braintrace.sparse_matmul`.

    The weight is a dict ``{'weight': (nnz,)[, 'bias': (O,)]}``: the non-zeros in the order of
    ``sparse_mat.data`` (the matrix's own data gives the structure only).

    Parameters
    ----------
    sparse_mat : saiunit.sparse.CSR, CSC or COO (or brainevent.CSR / CSC), shape ``(I, O)``
        The structure, validated here. Its index arrays become constants of a compiled step; for a
        large matrix use :class:`braintrace.nn.SparseLinear`, which passes them as operands.
    weight_fn : callable
        Applied to the non-zeros; identity by default.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> from saiunit import sparse as ss
    >>> csr = ss.CSR.fromdense(jnp.array([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]]))
    >>> op = braintrace.SpMatMulOp(csr, weight_fn=jnp.abs)
    >>> op(jnp.array([[1.0, 1.0]]), {'weight': -csr.data})
    Array([[2., 1., 3.]], dtype=float32)
    """

    def __init__(self, sparse_mat: Any, weight_fn: Callable = _identity) -> None:
        super().__init__(is_diagonal=False)
        sparse_pattern(sparse_mat)  # a clear error for anything that is not a sparse matrix
        self.sparse_mat = sparse_mat
        self.weight_fn = _check_callable(weight_fn, "SpMatMulOp", "weight_fn")

    def _data(self, w: Dict[str, Any]):
        _check_weight_dict(w, "SpMatMulOp", ("weight",))
        return self.weight_fn(w["weight"])

    def xw_to_y(self, inputs: Any, weights: Dict[str, Any]) -> Any:
        """:func:`braintrace.sparse_matmul` of ``inputs`` and the transformed non-zeros."""
        return sparse_matmul(
            inputs, self._data(weights), sparse_mat=self.sparse_mat, bias=weights.get("bias")
        )

    def raw_xw_to_y(self, inputs: Any, weights: Dict[str, Any]) -> Any:
        """The same product with a gather and a scatter-add over the non-zeros."""
        pattern, rows, cols = sparse_pattern(self.sparse_mat)
        x_m, x_u = split(inputs)
        d_m, d_u = split(self._data(weights))
        x_m, d_m = jnp.asarray(x_m), jnp.asarray(d_m)
        if d_m.shape != (pattern.nnz,):
            raise ValueError(
                f"SpMatMulOp: the weight must hold the {pattern.nnz} non-zeros of `sparse_mat`, shape "
                f"({pattern.nnz},); got {d_m.shape}."
            )
        terms = x_m[..., rows] * d_m
        y = jnp.zeros((*x_m.shape[:-1], pattern.shape[1]), terms.dtype).at[..., cols].add(terms)
        return _add_bias(attach(y, x_u * d_u), weights.get("bias"))


class LoraOp(ETraceOp):
    r"""Low-rank product :math:`y = \alpha\, x B A + b` through :func:`braintrace.lora_matmul`.

    The weight is a dict ``{'B': (I, r), 'A': (r, O)[, 'bias': (O,)]}``.

    Parameters
    ----------
    alpha : float, optional
        The scale :math:`\alpha`, a Python number (``1.0`` when ``None``).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> op = braintrace.LoraOp(alpha=0.5)
    >>> op(jnp.ones((1, 3)), {'B': jnp.ones((3, 2)), 'A': jnp.ones((2, 4))})
    Array([[3., 3., 3., 3.]], dtype=float32)
    """

    def __init__(self, alpha: Optional[float] = None) -> None:
        super().__init__(is_diagonal=False)
        if alpha is not None:
            try:
                alpha = float(alpha)
            except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
                raise TypeError(
                    f"LoraOp: `alpha` must be a Python number (a static scale), got {type(alpha).__name__}."
                ) from None
        self.alpha = alpha

    @property
    def _scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha

    def xw_to_y(self, inputs: Any, weights: Dict[str, Any]) -> Any:
        """:func:`braintrace.lora_matmul` of ``inputs`` and the two factors."""
        _check_weight_dict(weights, "LoraOp", ("B", "A"))
        return lora_matmul(inputs, weights["B"], weights["A"], alpha=self._scale, bias=weights.get("bias"))

    def raw_xw_to_y(self, inputs: Any, weights: Dict[str, Any]) -> Any:
        """The same product with ``@``."""
        _check_weight_dict(weights, "LoraOp", ("B", "A"))
        y = self._scale * u.math.matmul(u.math.matmul(inputs, weights["B"]), weights["A"])
        return _add_bias(y, weights.get("bias"))


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------


def _gradient_mode(grad) -> str:
    mode = getattr(grad, "value", grad)  # an enum member of the published ETraceGrad
    if grad is None:
        return "adaptive"
    if mode not in _GRADIENT_MODES:
        raise ValueError(f"ETraceParam: `grad` must be None or one of {_GRADIENT_MODES}, got {grad!r}.")
    return mode


class ETraceParam(brainstate.ParamState):
    r"""A parameter learned online through its operation: ``execute(x) = op.xw_to_y(x, value)``.

    A ``brainstate.ParamState``, so ``model.states(brainstate.ParamState)`` finds it. Its op binds an
    ETP primitive, so the compiler connects the parameter to the hidden states the product drives
    and keeps its eligibility trace.

    Parameters
    ----------
    weight : pytree of arrays
        The value, in the form the op expects (``{'weight', 'bias'}`` for :class:`MatMulOp`).
    op : ETraceOp
    grad : str, optional
        ``'full'``, ``'approx'`` or ``'adaptive'`` (default), stored as :attr:`gradient`. Accepted
        for compatibility: every algorithm computes its own gradient, whatever this says.
    name : str, optional

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp
    >>> import braintrace
    >>> class Leaky(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = braintrace.ETraceParam({'weight': jnp.full((2, 3), 0.5)},
    ...                                         braintrace.MatMulOp(weight_fn=jnp.abs))
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 3)))
    ...     def update(self, x):
    ...         self.h.value = 0.9 * self.h.value + self.w.execute(x)
    ...         return self.h.value
    >>> model = Leaky()
    >>> _ = brainstate.nn.init_all_states(model, batch_size=4)
    >>> alg = braintrace.D_RTRL(model)
    >>> _ = alg.compile_graph(jnp.ones((4, 2)))
    >>> len(alg.graph.hidden_param_op_relations)
    1
    >>> grads = alg.etrace_grad(jnp.ones((5, 4, 2)), jnp.zeros((5, 4, 3)),
    ...                         step_fn=lambda out, y: jnp.mean((out - y) ** 2))
    >>> grads[('w',)]['weight'].shape
    (2, 3)
    """

    def __init__(
        self,
        weight: Any,
        op: ETraceOp,
        grad: Optional[object] = None,
        name: Optional[str] = None,
    ) -> None:
        if not isinstance(op, ETraceOp):
            raise TypeError(
                f"{type(self).__name__}: `op` must be an ETraceOp (MatMulOp, ConvOp, SpMatMulOp, LoraOp, "
                f"ElemWiseOp, or a subclass), got {type(op).__name__}."
            )
        super().__init__(weight, name=name)
        self.op = op
        self.gradient = _gradient_mode(grad)
        self.is_etrace = True

    def execute(self, x: Any) -> Any:
        """``op(x, value)`` through the op's ETP wrapper."""
        return self.op(x, self.value)


class ElemWiseParam(ETraceParam):
    r"""An element-wise parameter learned online: ``execute() = element_wise(value, fn=op.fn)``.

    Parameters
    ----------
    weight : array
    op : ElemWiseOp or callable
        A callable is wrapped into an :class:`ElemWiseOp`; identity by default.
    name : str, optional

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> tau = braintrace.ElemWiseParam(jnp.array([-1.0, 2.0]), jnp.square)
    >>> tau.execute()
    Array([1., 4.], dtype=float32)
    """

    op: ElemWiseOp

    def __init__(
        self,
        weight: Any,
        op: Union[ElemWiseOp, Callable] = _identity,
        name: Optional[str] = None,
    ) -> None:
        if isinstance(op, ETraceOp) and not isinstance(op, ElemWiseOp):
            raise TypeError(
                f"ElemWiseParam: `op` must be an ElemWiseOp or a callable of the weight, got "
                f"{type(op).__name__}; use ETraceParam for {type(op).__name__}."
            )
        if not isinstance(op, ElemWiseOp):
            op = ElemWiseOp(_check_callable(op, "ElemWiseParam", "op"))
        super().__init__(weight, op=op, grad="full", name=name)

    def execute(self) -> Any:  # type: ignore[override]
        """``op(value)`` through :func:`braintrace.element_wise`."""
        return self.op(self.value)


def _plain_op(op, owner: str) -> Callable:
    """``op.raw_xw_to_y`` for an :class:`ETraceOp`, else the callable ``op(x, w)`` itself."""
    if isinstance(op, ETraceOp):
        return op.raw_xw_to_y
    return _check_callable(op, owner, "op")


class NonTempParam(brainstate.ParamState):
    r"""A parameter used through plain JAX ops: ``execute(x) = op.raw_xw_to_y(x, value)``.

    No ETP primitive carries it, so it has no eligibility trace: the compiler records it as a plain
    parameter (``DiagnosticKind.PLAIN_PARAMETER``) and the online algorithms give it its within-step
    gradient :math:`\partial L_t / \partial \theta` with :math:`h_{t-1}` held fixed.

    Parameters
    ----------
    value : pytree of arrays
    op : ETraceOp or callable
        An :class:`ETraceOp` is used through its plain form :meth:`ETraceOp.raw_xw_to_y` (kept as
        :attr:`etrace_op`); a callable ``op(x, value)`` is used as it is.
    name : str, optional

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> w = braintrace.NonTempParam({'weight': jnp.ones((2, 3))}, braintrace.MatMulOp())
    >>> w.execute(jnp.ones((1, 2)))
    Array([[2., 2., 2.]], dtype=float32)
    """

    def __init__(self, value: Any, op: Union[ETraceOp, Callable], name: Optional[str] = None) -> None:
        super().__init__(value, name=name)
        self.etrace_op = op if isinstance(op, ETraceOp) else None
        self.op = _plain_op(op, "NonTempParam")

    def execute(self, x: Any) -> Any:
        """``op(x, value)`` with plain JAX ops."""
        return self.op(x, self.value)


class FakeETraceParam:
    r"""A fixed weight with an operation; not a state: ``execute(x) = op.raw_xw_to_y(x, value)``.

    Its value is a constant to the compiler and the algorithms (not in
    ``model.states(brainstate.ParamState)``), so it receives no gradient.

    Parameters
    ----------
    value : pytree of arrays
    op : ETraceOp or callable
        An :class:`ETraceOp` is used through its plain form :meth:`ETraceOp.raw_xw_to_y` (kept as
        :attr:`etrace_op`); a callable ``op(x, value)`` is used as it is.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> w = braintrace.FakeETraceParam({'weight': jnp.ones((2, 3))}, braintrace.MatMulOp())
    >>> w.execute(jnp.ones((1, 2)))
    Array([[2., 2., 2.]], dtype=float32)
    """

    def __init__(self, value: Any, op: Union[ETraceOp, Callable]) -> None:
        self.value = value
        self.etrace_op = op if isinstance(op, ETraceOp) else None
        self.op = _plain_op(op, "FakeETraceParam")

    def execute(self, x: Any) -> Any:
        """``op(x, value)`` with plain JAX ops."""
        return self.op(x, self.value)

    def __repr__(self) -> str:
        return f"FakeETraceParam(value={self.value!r}, op={self.etrace_op or self.op!r})"


class FakeElemWiseParam:
    r"""A fixed element-wise weight; not a state: ``execute() = fn(value)``.

    Its value is a constant to the compiler and the algorithms, so it receives no gradient.

    Parameters
    ----------
    weight : array
    op : ElemWiseOp or callable
        The function of the weight (an :class:`ElemWiseOp` contributes its ``fn``); identity by
        default.
    name : str, optional

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> braintrace.FakeElemWiseParam(jnp.array([-1.0, 2.0]), jnp.abs).execute()
    Array([1., 2.], dtype=float32)
    """

    def __init__(
        self,
        weight: Any,
        op: Union[ElemWiseOp, Callable] = _identity,
        name: Optional[str] = None,
    ) -> None:
        if isinstance(op, ETraceOp) and not isinstance(op, ElemWiseOp):
            raise TypeError(
                f"FakeElemWiseParam: `op` must be an ElemWiseOp or a callable of the weight, got "
                f"{type(op).__name__}."
            )
        self.etrace_op = op if isinstance(op, ElemWiseOp) else None
        self.op = op.fn if isinstance(op, ElemWiseOp) else _check_callable(op, "FakeElemWiseParam", "op")
        self.value = weight
        self.name = name

    def execute(self) -> Any:
        """``fn(value)`` with plain JAX ops."""
        return self.op(self.value)

    def __repr__(self) -> str:
        return (
            f"FakeElemWiseParam(value={self.value!r}, op={self.etrace_op or self.op!r}, name={self.name!r})"
        )
