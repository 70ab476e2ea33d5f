r"""Linear maps whose weights take part in online learning: dense, sparse and low-rank.

Each layer computes its product through an ETP primitive (:func:`braintrace.matmul`,
:func:`braintrace.sparse_matmul`, :func:`braintrace.lora_matmul`), so its weights become
eligibility-trace relations whenever its output drives a hidden state without passing through
another trainable ETP op. Weights live in one ``brainstate.ParamState`` holding a dict
(``{'weight'[, 'bias']}``, ``{'lora_b', 'lora_a'[, 'bias']}``), like ``brainstate.nn.Linear``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u

from braintrace._etrace_op import lora_matmul, matmul
from braintrace._etrace_op.sparse import bind_sparse_matmul, sparse_pattern

from ._common import Size, check_features, init_weight, to_size

__all__ = ["Linear", "SparseLinear", "SparseIndices", "LoRA"]

init = brainstate.nn.init


class Linear(brainstate.nn.Module):
    r"""Dense linear map :math:`y = x W + b` through :func:`braintrace.matmul`.

    Parameters
    ----------
    in_size : int or tuple of int
        Input size; its last entry is the number of input features ``I``.
    out_size : int or tuple of int
        Output size; its last entry is the number of output features ``O``.
    w_init : initializer or array, shape ``(I, O)``
        Default ``KaimingNormal()``.
    b_init : initializer, array of shape ``(O,)``, or None
        Default ``ZeroInit()``; ``None`` for no bias.
    w_mask : array of shape ``(I, O)``, optional
        A fixed mask multiplied into the weight (``y = x (W \odot M) + b``); the weight remains a
        relation because the mask is a constant.
    name : str, optional

    Attributes
    ----------
    weight : brainstate.ParamState
        ``{'weight': (I, O)[, 'bias': (O,)]}``.

    Input ``x``: ``(..., I)``; output ``(..., O)``. A wrong feature size raises ``ValueError``.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> layer = braintrace.nn.Linear(3, 4)
    >>> layer(jnp.ones((2, 3))).shape
    (2, 4)
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        w_init: Union[Callable, jnp.ndarray] = init.KaimingNormal(),
        b_init: Optional[Union[Callable, jnp.ndarray]] = init.ZeroInit(),
        w_mask=None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        self.in_size = to_size(in_size, "in_size", owner)
        self.out_size = to_size(out_size, "out_size", owner)
        self.in_features, self.out_features = self.in_size[-1], self.out_size[-1]
        shape = (self.in_features, self.out_features)
        params = {"weight": init_weight(w_init, shape, owner, "w_init")}
        if b_init is not None:
            params["bias"] = init_weight(b_init, (self.out_features,), owner, "b_init")
        self.weight = brainstate.ParamState(params)
        self.w_mask = None if w_mask is None else init_weight(w_mask, shape, owner, "w_mask")

    def update(self, x):
        check_features(x, self.in_features, type(self).__name__)
        params = self.weight.value
        w = params["weight"]
        if self.w_mask is not None:
            w = w * self.w_mask
        return matmul(x, w, params.get("bias"))


class SparseIndices(brainstate.LongTermState):
    """Non-trainable state holding a sparse layer's index arrays (int32): COO ``{'row', 'col'}``, and
    ``'col_ptr'`` (``O + 1``) when the non-zeros are stored in column order.

    It is not a ``ParamState``, so ``model.states(brainstate.ParamState)`` and
    ``brainstate.transform.grad`` over parameters leave it out; because the layer reads it in
    ``update``, the indices are traced inputs of a compiled step (never HLO constants).
    """


def _column_order(col_ids, num_cols):
    """``(order, col_ptr)``: a stable sort of the non-zeros by column, and each column's segment."""
    try:
        cols = np.asarray(col_ids)
    except jax.errors.TracerArrayConversionError:
        raise ValueError(
            "SparseLinear: the connectivity's index arrays must be concrete when the layer is built "
            "(construct the layer outside jit)."
        ) from None
    order = np.argsort(cols, kind="stable")
    col_ptr = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=num_cols))])
    return order, col_ptr


class SparseLinear(brainstate.nn.Module):
    r"""Sparse linear map :math:`y = x\,\mathrm{sparse}(w) + b` through :func:`braintrace.sparse_matmul`.

    Only the ``nnz`` stored entries ``w`` are trainable (initialised from the matrix's own data);
    the structure is kept as COO ``row``/``col`` index arrays in the non-trainable
    :class:`SparseIndices` state ``self.indices``, in the order of the data. The layer stores the
    non-zeros in column order (stable within a column), with the column pointers ``col_ptr``: under
    the ``'pallas'`` backend the product is then a segment sum per output unit, with no scatter.
    ``weight['weight'][k]`` is the entry at ``(indices['row'][k], indices['col'][k])``.

    Parameters
    ----------
    conn : saiunit.sparse.CSR / CSC / COO or brainevent.CSR / CSC, shape ``(I, O)``
        The connectivity and the initial weights.
    in_size, out_size : int or tuple of int, optional
        When given, their last entries must equal ``conn.shape[0]`` and ``conn.shape[1]``
        (``ValueError`` otherwise); by default taken from ``conn``.
    b_init : initializer, array of shape ``(O,)``, or None
        Default ``None`` (no bias).
    name : str, optional

    Attributes
    ----------
    weight : brainstate.ParamState
        ``{'weight': (nnz,)[, 'bias': (O,)]}``.
    indices : SparseIndices
        ``{'row': (nnz,), 'col': (nnz,), 'col_ptr': (O + 1,)}``.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> from saiunit import sparse as ss
    >>> csr = ss.CSR.fromdense(jnp.array([[0., 1., 0.], [2., 0., 3.]]))
    >>> layer = braintrace.nn.SparseLinear(csr)
    >>> layer(jnp.ones((1, 2)))
    Array([[2., 1., 3.]], dtype=float32)
    """

    def __init__(
        self,
        conn,
        in_size: Optional[Size] = None,
        out_size: Optional[Size] = None,
        b_init: Optional[Union[Callable, jnp.ndarray]] = None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        try:
            pattern, row_ids, col_ids = sparse_pattern(conn)
        except TypeError as err:
            raise TypeError(f"{owner}: {err}") from None
        n_in, n_out = pattern.shape
        self.in_size = (n_in,) if in_size is None else to_size(in_size, "in_size", owner)
        self.out_size = (n_out,) if out_size is None else to_size(out_size, "out_size", owner)
        if self.in_size[-1] != n_in or self.out_size[-1] != n_out:
            raise ValueError(
                f"{owner}: the sparse matrix has shape {pattern.shape} = (in, out), which does not match "
                f"in_size={self.in_size} / out_size={self.out_size}; conn.shape must equal "
                f"(in_size[-1], out_size[-1]) = ({self.in_size[-1]}, {self.out_size[-1]})."
            )
        self.in_features, self.out_features = n_in, n_out
        self.shape = (n_in, n_out)
        self.nnz = pattern.nnz
        data = conn.data
        if not isinstance(data, u.Quantity):
            data = jnp.asarray(data)
        if tuple(data.shape) != (self.nnz,):
            raise ValueError(
                f"{owner}: the sparse matrix's data must have shape ({self.nnz},), got {data.shape}."
            )
        order, col_ptr = _column_order(col_ids, n_out)
        params = {"weight": data[order]}
        if b_init is not None:
            params["bias"] = init_weight(b_init, (n_out,), owner, "b_init")
        self.weight = brainstate.ParamState(params)
        self.indices = SparseIndices(
            {
                "row": jnp.asarray(np.asarray(row_ids)[order], jnp.int32),
                "col": jnp.asarray(np.asarray(col_ids)[order], jnp.int32),
                "col_ptr": jnp.asarray(col_ptr, jnp.int32),
            }
        )
        self._pattern = dataclasses.replace(pattern, format="csc", col_sorted=True)

    def update(self, x):
        check_features(x, self.in_features, type(self).__name__)
        params = self.weight.value
        idx = self.indices.value
        indices = [idx["row"], idx["col"], idx["col_ptr"]]
        return bind_sparse_matmul(x, params["weight"], self._pattern, indices, params.get("bias"))

    def todense(self):
        """The ``(I, O)`` dense weight (for inspection and tests)."""
        idx = self.indices.value
        w = u.get_mantissa(self.weight.value["weight"])
        dense = jnp.zeros(self.shape, jnp.result_type(w)).at[idx["row"], idx["col"]].add(w)
        return u.maybe_decimal(u.Quantity(dense, unit=u.get_unit(self.weight.value["weight"])))


class LoRA(brainstate.nn.Module):
    r"""Low-rank linear map :math:`y = \alpha\, x B A + b` through :func:`braintrace.lora_matmul`.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Last entries are ``I`` and ``O``.
    rank : int
        ``r``, the inner dimension.
    alpha : float
        Static scale :math:`\alpha`.
    B_init : initializer or array, shape ``(I, r)``
        The input-side factor; default ``LecunNormal()``.
    A_init : initializer or array, shape ``(r, O)``
        The output-side factor; default ``LecunNormal()``.
    b_init : initializer, array of shape ``(O,)``, or None
        Default ``None``.
    name : str, optional

    Attributes
    ----------
    weight : brainstate.ParamState
        ``{'lora_b': (I, r), 'lora_a': (r, O)[, 'bias': (O,)]}`` (the primitive's trainable keys).

    Under ``D_RTRL`` the factor ``A`` gets an exact ``(batch, r, O, n)`` trace and ``B`` the exact
    dense-sized trace.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> braintrace.nn.LoRA(8, 5, rank=2)(jnp.ones((3, 8))).shape
    (3, 5)
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        rank: int,
        alpha: float = 1.0,
        B_init: Union[Callable, jnp.ndarray] = init.LecunNormal(),
        A_init: Union[Callable, jnp.ndarray] = init.LecunNormal(),
        b_init: Optional[Union[Callable, jnp.ndarray]] = None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        self.in_size = to_size(in_size, "in_size", owner)
        self.out_size = to_size(out_size, "out_size", owner)
        self.in_features, self.out_features = self.in_size[-1], self.out_size[-1]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{owner}: `rank` must be a positive int, got {rank!r}.")
        try:
            self.alpha = float(alpha)
        except TypeError:
            raise TypeError(
                f"{owner}: `alpha` must be a Python number, got {type(alpha).__name__}."
            ) from None
        self.rank = rank
        params = {
            "lora_b": init_weight(B_init, (self.in_features, rank), owner, "B_init"),
            "lora_a": init_weight(A_init, (rank, self.out_features), owner, "A_init"),
        }
        if b_init is not None:
            params["bias"] = init_weight(b_init, (self.out_features,), owner, "b_init")
        self.weight = brainstate.ParamState(params)

    def update(self, x):
        check_features(x, self.in_features, type(self).__name__)
        p = self.weight.value
        return lora_matmul(x, p["lora_b"], p["lora_a"], alpha=self.alpha, bias=p.get("bias"))
