r"""Linear maps whose weights take part in online learning: dense, sign-constrained, weight-standardised,
sparse and low-rank.

Each layer computes its product through an ETP primitive (:func:`braintrace.matmul`,
:func:`braintrace.sparse_matmul`, :func:`braintrace.lora_matmul`), so its weights become
eligibility-trace relations whenever its output drives a hidden state without passing through
another trainable ETP op. A weight transformed before the product (a mask, signs, a standardisation)
is still a relation: the trace is kept for the product's operand and pulled back through the
transform. Weights live in one ``brainstate.ParamState`` holding a dict (``{'weight'[, 'bias']}``,
``{'lora_a', 'lora_b'[, 'bias']}``), like the ``brainstate.nn`` layers of the same names.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, Optional, Union

import brainstate
import jax.numpy as jnp
import numpy as np
import saiunit as u

from braintrace._etrace_op import lora_matmul, matmul
from braintrace._etrace_op.sparse import _check_blocks, bind_sparse_matmul, sparse_pattern
from braintrace._etrace_op.sparse_partition import partition_postsynaptic

from ._common import Size, check_features, init_weight, shape_of, to_size

__all__ = ["Linear", "SignedWLinear", "ScaledWSLinear", "SparseLinear", "SparseIndices", "LoRA"]

init = brainstate.nn.init


class _DenseSizes:
    """``in_size``, ``out_size``, ``in_features``, ``out_features`` of a dense map."""

    def _set_sizes(self, in_size, out_size):
        """Set the four attributes; returns the weight's shape ``(in_features, out_features)``."""
        owner = type(self).__name__
        self.in_size = to_size(in_size, "in_size", owner)
        self.out_size = to_size(out_size, "out_size", owner)
        self.in_features, self.out_features = self.in_size[-1], self.out_size[-1]
        return (self.in_features, self.out_features)


class Linear(_DenseSizes, brainstate.nn.Module):
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
    w_mask : array of shape ``(I, O)`` or an initializer called with it, optional
        A fixed mask multiplied into the weight (``y = x (W \odot M) + b``); the weight remains a
        relation because the mask is a constant.
    name : str, optional
    param_type : type
        The ``brainstate.ParamState`` subclass holding the weights; default ``ParamState``.

    Attributes
    ----------
    weight : param_type
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
        param_type: type = brainstate.ParamState,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        shape = self._set_sizes(in_size, out_size)
        params = {"weight": init_weight(w_init, shape, owner, "w_init")}
        if b_init is not None:
            params["bias"] = init_weight(b_init, (self.out_features,), owner, "b_init")
        self.weight = param_type(params)
        self.w_mask = None if w_mask is None else init_weight(w_mask, shape, owner, "w_mask")

    def update(self, x):
        check_features(x, self.in_features, type(self).__name__)
        params = self.weight.value
        w = params["weight"]
        if self.w_mask is not None:
            w = w * self.w_mask
        return matmul(x, w, params.get("bias"))


class SignedWLinear(_DenseSizes, brainstate.nn.Module):
    r"""Linear map with sign-constrained weights, :math:`y = x\,(|W| \odot S)`, through
    :func:`braintrace.matmul` (as ``brainstate.nn.SignedWLinear``).

    The stored ``W`` is unconstrained; the effective weight :math:`|W| \odot S` has the fixed signs
    ``S`` (all positive when ``w_sign`` is None). The product's operand is the effective weight, and
    online gradients are pulled back through :math:`|\cdot|` to ``W``.

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Last entries are ``I`` and ``O``.
    w_init : initializer or array of shape ``(I, O)``
        Default ``KaimingNormal()``.
    w_sign : array broadcastable to ``(I, O)``, optional
        The signs ``S`` (e.g. ``+1`` / ``-1`` per presynaptic row, shape ``(I, 1)``).
    name : str, optional
    param_type : type
        The ``brainstate.ParamState`` subclass holding the weight; default ``ParamState``.

    Attributes
    ----------
    weight : param_type, shape ``(I, O)`` (a plain array, as in ``brainstate``)
    w_sign : array or None

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> layer = braintrace.nn.SignedWLinear(2, 3, w_init=-jnp.ones((2, 3)), w_sign=jnp.array([[1.], [-1.]]))
    >>> layer(jnp.array([[1., 2.]]))
    Array([[-1., -1., -1.]], dtype=float32)
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        w_init: Union[Callable, jnp.ndarray] = init.KaimingNormal(),
        w_sign=None,
        name: Optional[str] = None,
        param_type: type = brainstate.ParamState,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        shape = self._set_sizes(in_size, out_size)
        self.weight = param_type(init_weight(w_init, shape, owner, "w_init"))
        self.w_sign = None if w_sign is None else _broadcastable(w_sign, shape, owner, "w_sign")

    def update(self, x):
        check_features(x, self.in_features, type(self).__name__)
        w = u.math.abs(self.weight.value)
        if self.w_sign is not None:
            w = w * self.w_sign
        return matmul(x, w)


class ScaledWSLinear(_DenseSizes, brainstate.nn.Module):
    r"""Linear map with scaled weight standardisation (Qiao et al., 2019), through
    :func:`braintrace.matmul` (as ``brainstate.nn.ScaledWSLinear``):

    .. math::
        \hat W_{io} = g_o \frac{W_{io} - \mu_o}{\sqrt{\max(I\,\sigma_o^2,\ \epsilon)}}, \qquad
        y = x\,(\hat W \odot M) + b,

    with :math:`\mu_o`, :math:`\sigma_o^2` the mean and variance of column ``o`` of ``W``
    (``brainstate.nn.weight_standardization``). The product's operand is :math:`\hat W \odot M`, so the
    online gradients of ``W`` and of the gain ``g`` are pulled back exactly through the
    standardisation (braintrace 0.2 multiplies the gain after the product instead).

    Parameters
    ----------
    in_size, out_size : int or tuple of int
        Last entries are ``I`` and ``O``.
    w_init : initializer or array of shape ``(I, O)``
        Default ``KaimingNormal()``.
    b_init : initializer, array of shape ``(O,)``, or None
        Default ``ZeroInit()``.
    w_mask : array broadcastable to ``(I, O)``, or an initializer called with ``(I, 1)``, optional
        A fixed mask ``M`` applied after the standardisation.
    ws_gain : bool
        Learn the gain ``g`` ``(1, O)`` (initialised to ones); default True.
    eps : float
        Default ``1e-4``.
    name : str, optional
    param_type : type
        The ``brainstate.ParamState`` subclass holding the weights; default ``ParamState``.

    Attributes
    ----------
    weight : param_type
        ``{'weight': (I, O)[, 'bias': (O,)][, 'gain': (1, O)]}``.
    w_mask, eps

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> layer = braintrace.nn.ScaledWSLinear(4, 3)
    >>> layer(jnp.ones((2, 4))).shape
    (2, 3)
    >>> sorted(layer.weight.value)
    ['bias', 'gain', 'weight']
    """

    def __init__(
        self,
        in_size: Size,
        out_size: Size,
        w_init: Union[Callable, jnp.ndarray] = init.KaimingNormal(),
        b_init: Optional[Union[Callable, jnp.ndarray]] = init.ZeroInit(),
        w_mask=None,
        ws_gain: bool = True,
        eps: float = 1e-4,
        name: Optional[str] = None,
        param_type: type = brainstate.ParamState,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        shape = self._set_sizes(in_size, out_size)
        params = {"weight": init_weight(w_init, shape, owner, "w_init")}
        if b_init is not None:
            params["bias"] = init_weight(b_init, (self.out_features,), owner, "b_init")
        if ws_gain:
            params["gain"] = jnp.ones((1, self.out_features), u.math.get_dtype(params["weight"]))
        self.weight = param_type(params)
        if callable(w_mask):
            w_mask = w_mask((self.in_features, 1))
        self.w_mask = None if w_mask is None else _broadcastable(w_mask, shape, owner, "w_mask")
        try:
            self.eps = float(eps)
        except TypeError:
            raise TypeError(f"{owner}: `eps` must be a Python number, got {type(eps).__name__}.") from None

    def update(self, x):
        check_features(x, self.in_features, type(self).__name__)
        params = self.weight.value
        w = brainstate.nn.weight_standardization(params["weight"], self.eps, params.get("gain"))
        if self.w_mask is not None:
            w = w * self.w_mask
        return matmul(x, w, params.get("bias"))


def _broadcastable(value, shape, owner, name):
    """``value`` as an array whose shape broadcasts to ``shape`` (``ValueError`` otherwise)."""
    if not isinstance(value, u.Quantity):
        value = jnp.asarray(value)
    try:
        fits = np.broadcast_shapes(shape_of(value), shape) == tuple(shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{owner}: `{name}` of shape {shape_of(value)} does not broadcast to the weight's shape {shape}."
        )
    return value


class SparseIndices(brainstate.LongTermState):
    """Non-trainable state holding a sparse layer's index arrays (int32): COO ``{'row', 'col'}``, and
    ``'col_ptr'`` (``O + 1``) when the non-zeros are stored in column order.

    It is not a ``ParamState``, so ``model.states(brainstate.ParamState)`` and
    ``brainstate.transform.grad`` over parameters leave it out; because the layer reads it in
    ``update``, the indices are traced inputs of a compiled step (never HLO constants).
    """


class SparseLinear(brainstate.nn.Module):
    r"""Sparse linear map :math:`y = x\,\mathrm{sparse}(w) + b` through :func:`braintrace.sparse_matmul`.

    Only the ``nnz`` stored entries ``w`` are trainable (initialised from the matrix's own data);
    the structure is kept as COO ``row``/``col`` index arrays in the non-trainable
    :class:`SparseIndices` state ``self.indices``, in the order of the data. The layer stores the
    non-zeros in column order (stable within a column), with the column pointers ``col_ptr``: under
    the ``'pallas'`` backend the product is then a segment sum per output unit, with no scatter.
    ``weight['weight'][k]`` is the entry at ``(indices['row'][k], indices['col'][k])``. The positional
    order ``(spar_mat, b_init, in_size, name, param_type)`` is that of ``brainstate.nn.SparseLinear``
    and braintrace 0.2.

    Parameters
    ----------
    spar_mat : saiunit.sparse.CSR / CSC / COO or brainevent.CSR / CSC, shape ``(I, O)``
        The connectivity and the initial weights (keyword alias ``conn``). Its index arrays must be
        concrete (build the layer outside ``jit``) and are validated here, once: an index outside
        ``spar_mat.shape`` or malformed ``indptr`` raises ``ValueError`` naming the array. The
        layer's own calls do not check them again (under ``jit`` they are traced and cannot be
        checked).
    b_init : initializer, array of shape ``(O,)``, or None
        Default ``None`` (no bias).
    in_size, out_size : int or tuple of int, optional
        When given, their last entries must equal ``spar_mat.shape[0]`` and ``spar_mat.shape[1]``
        (``ValueError`` otherwise); by default taken from ``spar_mat``.
    name : str, optional
    param_type : type
        The ``brainstate.ParamState`` subclass holding the weights; default ``ParamState``.
    conn : sparse matrix, optional
        The earlier name of ``spar_mat`` (keyword only); give one of the two.
    postsynaptic_blocks : int
        ``P``, default 1. With ``P > 1`` (dividing ``O``) the output units are split into ``P`` blocks
        of ``O / P`` consecutive units and the stored entries are grouped by the block they end on,
        each block padded to the largest block's count ``K`` with inert entries (weight 0, zero
        gradient): ``nnz = P K`` and block ``p`` holds entries ``[p K, (p + 1) K)``, in column order
        within the block (see :func:`braintrace.partition_postsynaptic`). The layer then computes
        per block, so that :func:`braintrace.shard_postsynaptic` can put each block's synapses,
        traces and units on its own device. Under the ``'pallas'`` backend a blocked layer uses the
        XLA implementations.

    Attributes
    ----------
    weight : param_type
        ``{'weight': (nnz,)[, 'bias': (O,)]}``.
    indices : SparseIndices
        ``{'row': (nnz,), 'col': (nnz,), 'col_ptr': (O + 1,)}``.
    partition : PostsynapticPartition
        The blocks (one without ``postsynaptic_blocks``), and the map between the stored entries and
        the matrix's own order: ``partition.to_source(layer.weight.value['weight'])`` gives the
        weights (or their gradients) in the order of ``spar_mat.data``.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> from saiunit import sparse as ss
    >>> csr = ss.CSR.fromdense(jnp.array([[0., 1., 0.], [2., 0., 3.]]))
    >>> layer = braintrace.nn.SparseLinear(csr)
    >>> layer(jnp.ones((1, 2)))
    Array([[2., 1., 3.]], dtype=float32)
    >>> blocked = braintrace.nn.SparseLinear(csr, postsynaptic_blocks=3)
    >>> blocked(jnp.ones((1, 2)))
    Array([[2., 1., 3.]], dtype=float32)
    >>> blocked.nnz, blocked.partition.pattern.block_nnz
    (3, (1, 1, 1))
    """

    def __init__(
        self,
        spar_mat=None,
        b_init: Optional[Union[Callable, jnp.ndarray]] = None,
        in_size: Optional[Size] = None,
        name: Optional[str] = None,
        param_type: type = brainstate.ParamState,
        *,
        out_size: Optional[Size] = None,
        conn=None,
        postsynaptic_blocks: int = 1,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        if (spar_mat is None) == (conn is None):
            raise TypeError(
                f"{owner}: give the sparse matrix once, as `spar_mat` (first argument) or `conn`; got "
                f"{'both' if conn is not None else 'neither'}."
            )
        conn = spar_mat if conn is None else conn
        try:
            pattern, row_ids, col_ids = sparse_pattern(conn)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{owner}: {err}") from None
        n_in, n_out = pattern.shape
        self.in_size = (n_in,) if in_size is None else to_size(in_size, "in_size", owner)
        self.out_size = (n_out,) if out_size is None else to_size(out_size, "out_size", owner)
        if self.in_size[-1] != n_in or self.out_size[-1] != n_out:
            raise ValueError(
                f"{owner}: the sparse matrix has shape {pattern.shape} = (in, out), which does not match "
                f"in_size={self.in_size} / out_size={self.out_size}; spar_mat.shape must equal "
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
        _check_blocks(postsynaptic_blocks, pattern.shape, owner, "postsynaptic_blocks")
        try:
            part = partition_postsynaptic(conn, postsynaptic_blocks, data)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{owner}: {err}") from None
        self.partition = part
        self.nnz = part.pattern.nnz
        self._pattern = dataclasses.replace(part.pattern, format="csc")
        params = {"weight": part.weight}
        if b_init is not None:
            params["bias"] = init_weight(b_init, (n_out,), owner, "b_init")
        self.weight = param_type(params)
        self.indices = SparseIndices(
            {
                "row": jnp.asarray(part.row_ids),
                "col": jnp.asarray(part.col_ids),
                "col_ptr": jnp.asarray(part.col_ptr),
            }
        )

    def update(self, x):
        check_features(x, self.in_features, type(self).__name__)
        params = self.weight.value
        idx = self.indices.value
        indices = [idx["row"], idx["col"], idx["col_ptr"]]
        # validated when the layer was built: the indices are usually traced here
        return bind_sparse_matmul(
            x, params["weight"], self._pattern, indices, params.get("bias"), validate=False
        )

    def todense(self):
        """The ``(I, O)`` dense weight (for inspection and tests)."""
        idx = self.indices.value
        w = u.get_mantissa(self.weight.value["weight"])
        if self._pattern.padded:  # padding entries act as zero weights
            w = jnp.where(self.partition.real, w, jnp.zeros((), w.dtype))
        dense = jnp.zeros(self.shape, jnp.result_type(w)).at[idx["row"], idx["col"]].add(w)
        return u.maybe_decimal(u.Quantity(dense, unit=u.get_unit(self.weight.value["weight"])))


class LoRA(brainstate.nn.Module):
    r"""Low-rank linear map :math:`y = \alpha\, x A_{in} A_{out} + b\; [+ \mathrm{base}(x)]` through
    :func:`braintrace.lora_matmul`, with the constructor of ``brainstate.nn.LoRA`` / braintrace 0.2.

    ``weight['lora_a']`` is the input-side factor :math:`A_{in}` ``(I, r)`` and ``weight['lora_b']`` the
    output-side factor :math:`A_{out}` ``(r, O)`` (the names of ``brainstate.nn.LoRA``; they are the
    primitive's ``B`` and ``A``).

    Parameters
    ----------
    in_features : int or tuple of int
        ``I`` (last entry).
    lora_rank : int
        ``r``, the inner dimension.
    out_features : int or tuple of int
        ``O`` (last entry).
    base_module : callable, optional
        A layer called on ``x`` whose output (``(..., O)``) is added; its weights learn as that
        layer's own ops allow.
    kernel_init : initializer or array
        Initialiser of both factors; default ``LecunNormal()``.
    param_type : type
        The ``brainstate.ParamState`` subclass holding the weights; default ``ParamState``.
    in_size : int or tuple of int, optional
        The input size; its last entry is ``I`` (then ``in_features`` may be omitted), and
        ``out_size = in_size[:-1] + (O,)``.
    rank : int, optional
        ``r`` under the name of this class's earlier signature ``LoRA(in_size, out_size, rank=r)``:
        when ``rank`` is given, the first two positional arguments are the input and output sizes.
    alpha : float, optional
        The static scale :math:`\alpha`. Default ``1 / r`` when the rank is given as ``lora_rank``
        (braintrace 0.2 scales by ``1 / lora_rank``), ``1.0`` when it is given as ``rank``.
    B_init, A_init : initializer or array, optional
        Separate initialisers of ``lora_a`` ``(I, r)`` and ``lora_b`` ``(r, O)``; default
        ``kernel_init``.
    b_init : initializer, array of shape ``(O,)``, or None
        Default ``None`` (no bias).
    name : str, optional

    Attributes
    ----------
    weight : param_type
        ``{'lora_a': (I, r), 'lora_b': (r, O)[, 'bias': (O,)]}``.
    in_features, out_features, rank (alias ``lora_rank``), alpha, base_module

    Under ``D_RTRL`` the output-side factor gets an exact ``(batch, r, O, n)`` trace and the
    input-side factor the exact dense-sized trace.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> layer = braintrace.nn.LoRA(in_features=8, lora_rank=2, out_features=5)
    >>> layer(jnp.ones((3, 8))).shape
    (3, 5)
    >>> layer.weight.value['lora_a'].shape, layer.alpha
    ((8, 2), 0.5)
    >>> braintrace.nn.LoRA(8, 5, rank=2).alpha  # the earlier signature
    1.0
    """

    def __init__(
        self,
        in_features: Optional[Size] = None,
        lora_rank: Optional[Union[int, Size]] = None,
        out_features: Optional[Size] = None,
        *,
        base_module: Optional[Callable] = None,
        kernel_init: Union[Callable, jnp.ndarray] = init.LecunNormal(),
        param_type: type = brainstate.ParamState,
        in_size: Optional[Size] = None,
        out_size: Optional[Size] = None,
        rank: Optional[int] = None,
        alpha: Optional[float] = None,
        B_init: Optional[Union[Callable, jnp.ndarray]] = None,
        A_init: Optional[Union[Callable, jnp.ndarray]] = None,
        b_init: Optional[Union[Callable, jnp.ndarray]] = None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        if rank is not None:  # LoRA(in_size, out_size, rank=r): the second positional is the output
            if out_features is not None:
                raise TypeError(
                    f"{owner}: give the rank once: LoRA(in_features, lora_rank, out_features) or "
                    f"LoRA(in_size, out_size, rank=r); got lora_rank/out_size={lora_rank!r}, "
                    f"out_features={out_features!r} and rank={rank!r}."
                )
            out_features, lora_rank = lora_rank, rank
            default_alpha = 1.0
        else:
            default_alpha = None
        in_features = _pick_size(in_features, in_size, "in_features", "in_size", owner)
        out_features = _pick_size(out_features, out_size, "out_features", "out_size", owner)
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, numbers.Integral) or lora_rank < 1:
            raise ValueError(
                f"{owner}: the rank (`lora_rank` or `rank`) must be a positive int, got {lora_rank!r}."
            )
        self.rank = int(lora_rank)
        self.in_size = to_size(in_size if in_size is not None else in_features, "in_size", owner)
        self.in_features = self.in_size[-1]
        self.out_features = to_size(out_features, "out_features", owner)[-1]
        self.out_size = self.in_size[:-1] + (self.out_features,)
        if alpha is None:
            alpha = 1.0 / self.rank if default_alpha is None else default_alpha
        try:
            self.alpha = float(alpha)
        except TypeError:
            raise TypeError(
                f"{owner}: `alpha` must be a Python number, got {type(alpha).__name__}."
            ) from None
        if base_module is not None and not callable(base_module):
            raise TypeError(f"{owner}: `base_module` must be callable (x -> (..., O)), got {base_module!r}.")
        self.base_module = base_module
        a_in, a_in_name = (kernel_init, "kernel_init") if B_init is None else (B_init, "B_init")
        a_out, a_out_name = (kernel_init, "kernel_init") if A_init is None else (A_init, "A_init")
        params = {
            "lora_a": init_weight(a_in, (self.in_features, self.rank), owner, a_in_name),
            "lora_b": init_weight(a_out, (self.rank, self.out_features), owner, a_out_name),
        }
        if b_init is not None:
            params["bias"] = init_weight(b_init, (self.out_features,), owner, "b_init")
        self.weight = param_type(params)

    @property
    def lora_rank(self) -> int:
        return self.rank

    def update(self, x):
        check_features(x, self.in_features, type(self).__name__)
        p = self.weight.value
        y = lora_matmul(x, p["lora_a"], p["lora_b"], alpha=self.alpha, bias=p.get("bias"))
        if self.base_module is not None:
            y = y + self.base_module(x)
        return y


def _pick_size(value, alias, name, alias_name, owner):
    """``value`` or, when it is None, the last entry of ``alias`` (one of the two is required)."""
    if value is None and alias is None:
        raise TypeError(f"{owner}: missing `{name}` (or `{alias_name}`).")
    if value is None:
        return to_size(alias, alias_name, owner)[-1]
    if alias is not None and to_size(alias, alias_name, owner)[-1] != to_size(value, name, owner)[-1]:
        raise ValueError(
            f"{owner}: `{name}`={value!r} does not match the last entry of `{alias_name}`={alias!r}."
        )
    return value
