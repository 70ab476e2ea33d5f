r"""Sparse matmul ETP primitives ``etp_sp_mm`` (batched) and ``etp_sp_mv`` (unbatched).

Forward: :math:`y = x\,W \;(+ b)` where :math:`W \in \mathbb{R}^{I\times O}` is sparse with ``nnz``
trainable non-zeros ``w_p`` at ``(r_p, c_p)``: :math:`y_{\dots c} = \sum_{p:\,c_p = c} x_{\dots r_p} w_p`,
``x`` of shape ``(B, I)`` (``etp_sp_mm``) or ``(I,)`` (``etp_sp_mv``), ``b`` of shape ``(O,)``.

Invars: ``x, weight_data (nnz,)[, bias (O,)], row_ids (nnz,), col_ids (nnz,)`` — the index arrays
(int32, COO order = the order of ``weight_data``) are operands, never compile-time constants, so a
pattern with 10^6 non-zeros neither bloats the HLO nor gets constant-folded. Static params:
``sparse_mat`` (a hashable :class:`SparsePattern`: shape, nnz, format — no arrays) and ``has_bias``.
Trainable layout ``{'weight': 1[, 'bias': 2]}``; the index arrays reach the ETP rules as the keyword
``aux=(row_ids, col_ids)``.

ETP rules (``g = \partial h/\partial y`` for one hidden state, ``y``-shaped):

* ``xy_to_dw(x, g, {w, b})`` — the VJP of the op, an SDDMM:
  :math:`\partial h/\partial w_p = \sum_b x_{b r_p}\, g_{b c_p}`,
  :math:`\partial h/\partial b_c = \sum_b g_{bc}`.
* ``yw_to_w(d, trace)`` — :math:`\partial y_j/\partial w_p = \delta_{j c_p} x_{r_p}`, so non-zero ``p``
  follows unit ``c_p``: :math:`\epsilon_{w,\dots p} \leftarrow d_{\dots c_p}\,\epsilon_{w,\dots p}` (a gather
  by column, no scatter), :math:`\epsilon_{b,\dots c} \leftarrow d_{\dots c}\,\epsilon_{b,\dots c}`. Hence
  ``yw_to_w(v, xy_to_dw(x, g)) == xy_to_dw(x, v * g)`` per key (per batch element, or for ``v``
  shared by the batch), and the rule-derived D-RTRL update
  :math:`\epsilon_p \leftarrow D_{c_p}\epsilon_p + x_{r_p} df_{c_p}` and solve
  :math:`dw_p = \sum_b \epsilon_p\,(\partial L/\partial h)_{c_p}` are exact.
* ``init_drtrl`` — ``{'weight': (B, nnz, n)[, 'bias': (B, O, n)]}`` for ``etp_sp_mm``,
  ``{'weight': (nnz, n)[, 'bias': (O, n)]}`` for ``etp_sp_mv``; dtype of each weight.
* ``init_pp`` — the output-shaped df trace ``(*y.shape, n)``, dtype of ``y``.

Postsynaptic blocks (``SparsePattern.blocks = P > 1``, built by
:func:`braintrace.partition_postsynaptic`): the entries are grouped by the block of ``O / P`` output
units they end on, ``K`` per block with inert padding, and the product, both rules and the D-RTRL
trace update and solve run as a ``vmap`` over the block axis with local column ids. On arrays whose
block axis is sharded over a mesh axis, XLA's partitioner then keeps each block on its device and
gathers only ``x``. The layouts above are unchanged (``nnz = P K``, block-contiguous). Blocked
patterns use these XLA implementations under every backend.
"""

from __future__ import annotations

import dataclasses
import sys
from functools import partial
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u

from braintrace._batch_sharding import BATCH_SUM, BatchLayout

from . import _cpu_sums, _sparse_cpu
from ._batching import make_x_batching_rule
from ._fused import fused_op
from ._registries import BATCHED_PRIMITIVES
from ._sparse_cpu import IN_BOUNDS as _IN_BOUNDS
from ._sparse_cpu import take as _take
from ._spec import ETPPrimitiveSpec, register_primitive_spec
from ._trace_ops import ETP_DRTRL_TRACE_OPS, DRTRLTraceOps, output_trace_zeros, param_trace_zeros
from ._units import attach, bias_mantissa, split
from .dense import (
    _arithmetic_dtype,
    apply_operand_fn,
    fused_bias_solve,
    fused_bias_update,
    fused_bias_update_solve,
)

__all__ = ["SparsePattern", "etp_sp_mm_p", "etp_sp_mv_p", "sparse_matmul", "sparse_pattern"]

_FORMATS = ("csr", "csc", "coo")


@dataclasses.dataclass(frozen=True)
class SparsePattern:
    """Hashable descriptor of a sparse ``(I, O)`` weight: the static ``sparse_mat`` param.

    It holds no arrays: the index arrays travel as operands of the primitive.

    Attributes
    ----------
    shape : tuple of int
        ``(I, O)`` = (input features, output features).
    nnz : int
        Number of stored non-zeros (length of ``weight_data`` and of each index array).
    format : str
        The format the pattern came from: ``'csr'``, ``'csc'`` or ``'coo'`` (informational; the
        primitive always receives COO ``row_ids, col_ids`` in the order of ``weight_data``).
    col_sorted : bool
        The non-zeros are in column order and a third index operand ``col_ptr`` (``O + 1``, int32;
        column ``c`` owns non-zeros ``[col_ptr[c], col_ptr[c+1])``) follows ``col_ids``. Under the
        ``'pallas'`` backend the product is then a segment sum per output column (a kernel, no
        scatter). A CSC matrix and :class:`braintrace.nn.SparseLinear` give such patterns.
    blocks : int
        ``P``, the number of postsynaptic blocks (default 1: one block, the plain layout). With
        ``P > 1`` the output units are split into ``P`` blocks of ``O / P`` consecutive units and the
        stored entries into ``P`` runs of ``K = nnz / P``: entries ``[p K, (p + 1) K)`` end on block
        ``p`` (their ``col_ids`` lie in ``[p O / P, (p + 1) O / P)``). Every computation of the
        sparse primitives then runs per block (a ``vmap`` over the block axis with the block's local
        column ids), so that XLA's partitioner keeps a block's synapses, traces and units on the
        device that owns them (see :func:`braintrace.partition_postsynaptic` and
        :func:`braintrace.shard_postsynaptic`). Under the ``'pallas'`` backend a blocked pattern
        uses the XLA (reference) implementations.
    block_nnz : tuple of int
        The true number of non-zeros of each block (``P`` entries, each at most ``K``; default ``K``
        for every block). Entries ``[p K + block_nnz[p], (p + 1) K)`` are padding: their weight acts
        as zero in the product, and every rule and trace solve gives them a zero gradient. A pattern
        with one block has no padding (``block_nnz == (nnz,)``).

    Examples
    --------
    >>> from braintrace._etrace_op.sparse import SparsePattern
    >>> SparsePattern(shape=(50, 40), nnz=200, format='csr')
    SparsePattern(shape=(50, 40), nnz=200, format='csr', col_sorted=False)
    >>> SparsePattern((8, 4), 6, 'csr', blocks=2, block_nnz=(3, 1))
    SparsePattern(shape=(8, 4), nnz=6, format='csr', col_sorted=False, blocks=2, block_nnz=(3, 1))
    """

    shape: Tuple[int, int]
    nnz: int
    format: str = "coo"
    col_sorted: bool = False
    blocks: int = 1
    block_nnz: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 2 or min(shape) < 0:
            raise ValueError(
                f"SparsePattern: `shape` must be (in, out) of non-negative ints, got {self.shape!r}."
            )
        if int(self.nnz) < 0:
            raise ValueError(f"SparsePattern: `nnz` must be non-negative, got {self.nnz!r}.")
        if self.format not in _FORMATS:
            raise ValueError(f"SparsePattern: `format` must be one of {_FORMATS}, got {self.format!r}.")
        if not isinstance(self.col_sorted, bool):
            raise TypeError(f"SparsePattern: `col_sorted` must be a bool, got {self.col_sorted!r}.")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "nnz", int(self.nnz))
        object.__setattr__(self, "blocks", _check_blocks(self.blocks, shape, "SparsePattern"))
        object.__setattr__(self, "block_nnz", self._checked_block_nnz())

    def _checked_block_nnz(self) -> Tuple[int, ...]:
        p, nnz = self.blocks, self.nnz
        if nnz % p:
            raise ValueError(
                f"SparsePattern: with blocks={p} every block stores the same number of entries, so `nnz` "
                f"must be divisible by `blocks`; got nnz={nnz}. Pad the blocks (see "
                f"braintrace.partition_postsynaptic)."
            )
        k = nnz // p
        if self.block_nnz is None:
            return (k,) * p
        counts = tuple(self.block_nnz)
        if (
            len(counts) != p
            or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in counts)
            or not all(0 <= c <= k for c in counts)
        ):
            raise ValueError(
                f"SparsePattern: `block_nnz` must hold blocks={p} ints in [0, nnz / blocks] = [0, {k}], "
                f"the true non-zeros of each block; got {self.block_nnz!r}."
            )
        if p == 1 and counts[0] != nnz:
            raise ValueError(
                f"SparsePattern: a pattern of one block has no padding: `block_nnz` must be ({nnz},) "
                f"or None, got {self.block_nnz!r}."
            )
        return tuple(int(c) for c in counts)

    def __repr__(self) -> str:
        text = (
            f"SparsePattern(shape={self.shape}, nnz={self.nnz}, format={self.format!r}, "
            f"col_sorted={self.col_sorted}"
        )
        if self.blocks > 1:
            text += f", blocks={self.blocks}, block_nnz={self.block_nnz}"
        return text + ")"

    @property
    def block_size(self) -> int:
        """``K = nnz / blocks``: the stored entries per block, padding included."""
        return self.nnz // self.blocks

    @property
    def block_units(self) -> int:
        """``O / blocks``: the output units per block."""
        return self.shape[1] // self.blocks

    @property
    def padded(self) -> bool:
        """Whether some block holds padding entries."""
        return any(c < self.block_size for c in self.block_nnz)


def _check_blocks(blocks, shape, where, name="blocks") -> int:
    """``blocks`` (the argument ``name``) as an int ``>= 1`` that divides the output features ``shape[1]``."""
    if isinstance(blocks, bool) or not isinstance(blocks, (int, np.integer)):
        raise TypeError(f"{where}: `{name}` must be an int >= 1, got {blocks!r}.")
    blocks = int(blocks)
    if blocks < 1:
        raise ValueError(f"{where}: `{name}` must be an int >= 1, got {blocks}.")
    if shape[1] % blocks:
        raise ValueError(
            f"{where}: `{name}`={blocks} must divide the output features O = {shape[1]} (shape {shape}); "
            f"each block owns O / {name} consecutive units."
        )
    return blocks


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


def _unpack(args, has_bias):
    """``(x, weight_data, bias or None, (row_ids, col_ids[, col_ptr]))`` from the operand list."""
    first_index = 3 if has_bias else 2
    bias = args[2] if has_bias else None
    return args[0], args[1], bias, tuple(args[first_index:])


# ---------------------------------------------------------------------------------------------
# Postsynaptic blocks (``SparsePattern.blocks > 1``)
# ---------------------------------------------------------------------------------------------
#
# Every per-synapse array is viewed as ``(P, K, ...)`` and every per-unit array as ``(..., P, O/P)``;
# the computation is a ``vmap`` over the block axis with each block's local column ids. When the
# block axis is sharded over a mesh axis, XLA's partitioner keeps each block's work on the device
# that owns it: only the unit-independent operand ``x`` (gathered by row) is all-gathered.


def _local_cols(pattern: SparsePattern, col_ids):
    """``(P, K)``: block ``p``'s column ids minus ``p O / P`` (its first unit)."""
    p, k = pattern.blocks, pattern.block_size
    first = jax.lax.broadcasted_iota(col_ids.dtype, (p, 1), 0) * pattern.block_units
    return col_ids.reshape(p, k) - first


def _local_ids(pattern: SparsePattern, row_ids, col_ids):
    """``(rows (P, K), local cols (P, K))``."""
    return row_ids.reshape(pattern.blocks, pattern.block_size), _local_cols(pattern, col_ids)


def _real_entries(pattern: SparsePattern):
    """``(P, K)`` bool, False at padding entries; ``None`` when no block holds padding."""
    if not pattern.padded:
        return None
    position = jax.lax.broadcasted_iota(jnp.int32, (pattern.blocks, pattern.block_size), 1)
    return position < jnp.asarray(pattern.block_nnz, jnp.int32)[:, None]


def _padding_zeroed(values, pattern: SparsePattern):
    """``values (..., nnz)`` with the padding entries set to zero."""
    real = _real_entries(pattern)
    return values if real is None else jnp.where(real.reshape(-1), values, jnp.zeros((), values.dtype))


def _unit_blocks(a, pattern: SparsePattern, axis: int):
    """``a`` with its unit axis ``axis`` (size ``O``) split into ``(P, O/P)``; the block axis at ``axis``."""
    axis = axis % a.ndim
    return a.reshape(a.shape[:axis] + (pattern.blocks, pattern.block_units) + a.shape[axis + 1 :])


def _blocked_product(x, data, row_ids, col_ids, pattern: SparsePattern):
    """``y (..., O)``: the product per block, padding entries acting as zero weights."""
    rows, cols = _local_ids(pattern, row_ids, col_ids)
    w = _padding_zeroed(data, pattern).reshape(rows.shape)
    lead = x.shape[:-1]

    def block(w_p, r_p, c_p):
        contrib = _take(x, r_p, -1) * w_p  # (..., K)
        y = jnp.zeros(lead + (pattern.block_units,), contrib.dtype)
        return y.at[..., c_p].add(contrib, mode=_IN_BOUNDS)

    y = jax.vmap(block, out_axes=len(lead))(w, rows, cols)  # (..., P, O/P)
    return y.reshape(lead + (pattern.shape[1],))


def _blocked_take_cols(a, col_ids, pattern: SparsePattern):
    """``a (..., O)`` gathered by column: ``(..., nnz)`` (padding entries read their block's last unit)."""
    cols = _local_cols(pattern, col_ids)
    out = jax.vmap(lambda a_p, c_p: _take(a_p, c_p, -1), in_axes=(a.ndim - 1, 0), out_axes=a.ndim - 1)(
        _unit_blocks(a, pattern, -1), cols
    )  # (..., P, K)
    return out.reshape(a.shape[:-1] + (pattern.nnz,))


def _blocked_sddmm(a, g, row_ids, col_ids, pattern: SparsePattern):
    """``v[p] = sum_b a[b, r_p] g[b, c_p]`` per block, zero at padding: ``a (B, I)``, ``g (B, O)``."""
    rows, cols = _local_ids(pattern, row_ids, col_ids)
    per_block = lambda g_p, r_p, c_p: _csr_sddmm_reference(a, g_p, r_p, c_p)  # noqa: E731
    v = jax.vmap(per_block, in_axes=(1, 0, 0))(_unit_blocks(g, pattern, 1), rows, cols)  # (P, K)
    return _padding_zeroed(v.reshape(-1), pattern)


def _blocked_trace_update(trace, d_t, x, df_t, row_ids, col_ids, pattern: SparsePattern):
    """:func:`_csr_update_reference` per block (trace ``(P K, n, B)``, block-contiguous along axis 0);
    padding entries take no instantaneous term, so their trace stays zero.

    ``x`` keeps the product's batch-major layout ``(B, I)`` and its dtype (cast after the gather):
    its gather by row is then the forward's, and a partitioned program all-gathers ``x`` once."""
    rows, cols = _local_ids(pattern, row_ids, col_ids)
    real = _real_entries(pattern)
    acc = _arithmetic_dtype(trace.dtype)

    def block(tr_p, d_p, df_p, r_p, c_p, *real_p):
        x_p = _take(x, r_p, 1).T.astype(trace.dtype).astype(acc)  # (K, B), as the unblocked x_t
        if real_p:
            x_p = jnp.where(real_p[0][:, None], x_p, jnp.zeros((), acc))
        return _csr_update_gathered(tr_p, d_p, x_p, df_p, c_p)

    blocked = (trace.reshape(rows.shape + trace.shape[1:]), _unit_blocks(d_t, pattern, 0))
    blocked += (_unit_blocks(df_t, pattern, 0), rows, cols) + (() if real is None else (real,))
    return jax.vmap(block)(*blocked).reshape(trace.shape)


def _blocked_trace_solve(trace, ct_t, row_ids, col_ids, pattern: SparsePattern):
    """:func:`_csr_solve_reference` per block: ``dw (P K,)``, zero at padding."""
    rows, cols = _local_ids(pattern, row_ids, col_ids)
    per_block = lambda tr_p, ct_p, r_p, c_p: _csr_solve_reference(tr_p, ct_p, r_p, c_p)  # noqa: E731
    dw = jax.vmap(per_block)(
        trace.reshape(rows.shape + trace.shape[1:]), _unit_blocks(ct_t, pattern, 0), rows, cols
    )
    return _padding_zeroed(dw.reshape(-1), pattern)


def _sparse_impl(*args, sparse_mat, has_bias=False):
    x, data, bias, (row_ids, col_ids, *_) = _unpack(args, has_bias)
    if sparse_mat.blocks > 1:
        y = _blocked_product(x, data, row_ids, col_ids, sparse_mat)
    else:
        y = _sparse_cpu.product(
            x, data, row_ids, col_ids, n_out=sparse_mat.shape[1], col_sorted=sparse_mat.col_sorted
        )
    if has_bias:
        y = y + bias
    return y


def _kernel_takes(dtype, interpret):
    """Whether the CSR product kernels run on ``dtype`` (float32; also float64 in interpret mode)."""
    return dtype == jnp.float32 or (interpret and dtype == jnp.float64)


def _sparse_kernel(*args, sparse_mat, has_bias=False, interpret):
    """Under ``'pallas'``: a column-sorted pattern's product as a segment sum per output column
    (``kernels/csr_matmul.py``, no atomics); any other pattern (a blocked one included), or a dtype
    the compiled kernel does not take, keeps the XLA implementation."""
    from braintrace._kernel_import import kernel_module

    x, data, bias, (row_ids, col_ids, *col_ptr) = _unpack(args, has_bias)
    dtype = jnp.result_type(x, data)
    plain = sparse_mat.col_sorted and col_ptr and sparse_mat.blocks == 1 and sparse_mat.nnz > 0
    if not plain or not _kernel_takes(dtype, interpret):
        return _sparse_impl(*args, sparse_mat=sparse_mat, has_bias=has_bias)
    x2 = x.reshape((-1, sparse_mat.shape[0])).astype(dtype)
    segments = (None, col_ptr[0])  # the non-zeros are in column order: no permutation
    y = kernel_module("csr_matmul").csr_matmul(
        x2, data.astype(dtype), row_ids, col_ids, sparse_mat.shape, csc=segments, interpret=interpret
    )
    y = y.reshape(x.shape[:-1] + (sparse_mat.shape[1],))
    return y + bias if has_bias else y


def _sparse_trainable_invars(params):
    """``{'weight': 1}`` or ``{'weight': 1, 'bias': 2}`` depending on ``has_bias``."""
    layout = {"weight": 1}
    if params.get("has_bias", False):
        layout["bias"] = 2
    return layout


# ---------------------------------------------------------------------------------------------
# The four ETP rules
# ---------------------------------------------------------------------------------------------


def _sparse_yw_to_w(hidden_dim, trace, *, sparse_mat, has_bias=False, aux):
    r"""Scale each non-zero's trace by ``hidden_dim`` at its column (gather by ``col_ids``).

    ``hidden_dim``: ``(..., O)``; ``trace['weight']``: ``(..., nnz)``; ``trace['bias']``: ``(..., O)``.
    A blocked pattern gathers per block and gives zero at padding entries.
    """
    col_ids = aux[1]
    if sparse_mat.blocks > 1:
        scaled = trace["weight"] * _blocked_take_cols(hidden_dim, col_ids, sparse_mat)
        out = {"weight": _padding_zeroed(scaled, sparse_mat)}
    else:
        out = {"weight": trace["weight"] * _take(hidden_dim, col_ids, -1)}
    if has_bias:
        out["bias"] = trace["bias"] * hidden_dim
    return out


#: Terms up to which the CPU lowering of the sparse D-RTRL solve (a sum over the batch rows and
#: states) adds them unrolled (see ``_cpu_sums``; the SDDMM has its own forms, ``_sparse_cpu``).
#: Measured on a 2-core AMD EPYC (jax 0.10.2), per step of a scan, unrolled against the reduction:
#: the solve of a ``(5120, 1, 4)`` trace: 18 against 45 us, ``(50000, 2, 8)``: 1100 against 690 us.
CPU_UNROLLED_SUM_TERMS = 8


def _batch_sum(products, axes):
    """``products`` summed over ``axes`` (a sorted tuple): a reduction, unrolled on the CPU where
    :func:`_cpu_sums.unrolls`."""
    reduction = lambda products: jnp.sum(products, axis=axes)  # noqa: E731
    if not _cpu_sums.unrolls(products.shape, axes, CPU_UNROLLED_SUM_TERMS):
        return reduction(products)
    unrolled = lambda products: _cpu_sums.unrolled_sum(products, axes)  # noqa: E731
    # resolved when lowering: a program for one platform holds one of the two, no conditional
    return jax.lax.platform_dependent(products, cpu=unrolled, default=reduction)


def _csr_sddmm_reference(a, g, row_ids, col_ids):
    r"""``v[p] = sum_b a[b, r_p] g[b, c_p]``: ``a (B, I)``, ``g (B, O)`` -> ``(nnz,)`` (an SDDMM, in the
    CPU's form of :func:`_sparse_cpu.sddmm` there)."""
    return _sparse_cpu.sddmm(a, g, row_ids, col_ids)


def _csr_sddmm_kernel(a, g, row_ids, col_ids, *, interpret):
    dtype = jnp.result_type(a, g)
    if not _kernel_takes(dtype, interpret) or row_ids.shape[0] == 0:
        return _csr_sddmm_reference(a, g, row_ids, col_ids)
    from braintrace._kernel_import import kernel_module

    return kernel_module("csr_matmul").csr_sddmm(a, g, row_ids, col_ids, interpret=interpret).astype(dtype)


#: The weight gradient of a sparse layer, ``v[p] = sum_b a[b, r_p] g[b, c_p]`` (the ``xy_to_dw`` rule,
#: hence the pp_prop solve of a sparse layer); a Pallas kernel under ``'pallas'``.
csr_sddmm_p = fused_op(
    "csr_sddmm", _csr_sddmm_reference, _csr_sddmm_kernel, batch_layout=BatchLayout({0: 0, 1: 0}, (BATCH_SUM,))
)


def _sparse_xy_to_dw(x, hidden_dim, weights, *, sparse_mat, has_bias=False, aux):
    r"""``{'weight': sum_b x[b, r_p] g[b, c_p][, 'bias': sum_b g]}``: the VJP of the op.

    ``x``: ``(B, I)`` or ``(I,)``; ``hidden_dim``: the shape of ``y``, ``(B, O)`` or ``(O,)``. A
    blocked pattern computes the SDDMM per block (the XLA implementation under every backend) and
    gives zero at padding entries.
    """
    n_in, n_out = sparse_mat.shape
    dtype = jnp.result_type(x, weights["weight"])
    g = jnp.asarray(hidden_dim, dtype).reshape((-1, n_out))
    a = jnp.asarray(x, dtype).reshape((-1, n_in))
    if sparse_mat.blocks > 1:
        dw = _blocked_sddmm(a, g, aux[0], aux[1], sparse_mat)
    else:
        dw = csr_sddmm_p.bind(a, g, aux[0], aux[1])
    out = {"weight": dw.astype(weights["weight"].dtype)}
    if has_bias:
        out["bias"] = _cpu_sums.row_sum(g).astype(weights["bias"].dtype)
    return out


def _sp_mm_init_drtrl(x_var, y_var, weight_vars, num_hidden_state):
    """``{'weight': zeros(B, nnz, n)[, 'bias': zeros(B, O, n)]}``."""
    return param_trace_zeros(x_var.aval.shape[:1], weight_vars, num_hidden_state)


def _sp_mv_init_drtrl(x_var, y_var, weight_vars, num_hidden_state):
    """``{'weight': zeros(nnz, n)[, 'bias': zeros(O, n)]}``."""
    return param_trace_zeros((), weight_vars, num_hidden_state)


# Per-primitive names (the dense module's convention); both primitives share the rules.
_sp_mm_yw_to_w = _sp_mv_yw_to_w = _sparse_yw_to_w
_sp_mm_xy_to_dw = _sp_mv_xy_to_dw = _sparse_xy_to_dw
_sp_mm_init_pp = _sp_mv_init_pp = _sparse_init_pp = output_trace_zeros


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

_x_rule_mv = make_x_batching_rule(lambda: etp_sp_mv_p, lambda: etp_sp_mm_p)
_x_rule_mm = make_x_batching_rule(lambda: etp_sp_mm_p, lambda: etp_sp_mm_p)

etp_sp_mm_p = register_primitive_spec(
    ETPPrimitiveSpec(
        name="etp_sp_mm",
        impl=_sparse_impl,
        yw_to_w=_sp_mm_yw_to_w,
        xy_to_dw=_sp_mm_xy_to_dw,
        init_drtrl=_sp_mm_init_drtrl,
        init_pp=_sp_mm_init_pp,
        trainable_invars_fn=_sparse_trainable_invars,
        x_invar_index=0,
        batched=True,
        batching_rule=_x_rule_mm,
        kernel_fn=_sparse_kernel,
        remat_jvp=True,
    )
)


def _sparse_product_per_batch_shard():
    """The batched product's kernel runs per batch shard: ``x`` and ``y`` are ``(B, ...)``, the
    non-zeros, bias and index arrays are shared."""
    from braintrace._backend import declare_batch_layout

    declare_batch_layout(etp_sp_mm_p, BatchLayout({0: 0}, (0,)))


_sparse_product_per_batch_shard()


def _blocked_declines_kernel(params) -> bool:
    """A blocked pattern lowers to the XLA implementation under every backend (read by the backend
    when lowering): its per-block form is what XLA's partitioner keeps local to each device."""
    return params["sparse_mat"].blocks > 1


etp_sp_mv_p = register_primitive_spec(
    ETPPrimitiveSpec(
        name="etp_sp_mv",
        impl=_sparse_impl,
        yw_to_w=_sp_mv_yw_to_w,
        xy_to_dw=_sp_mv_xy_to_dw,
        init_drtrl=_sp_mv_init_drtrl,
        init_pp=_sp_mv_init_pp,
        trainable_invars_fn=_sparse_trainable_invars,
        x_invar_index=0,
        batched=False,
        batching_rule=_x_rule_mv,
        kernel_fn=_sparse_kernel,
        remat_jvp=True,
    )
)


# ---------------------------------------------------------------------------------------------
# User-facing wrapper
# ---------------------------------------------------------------------------------------------


def _accepted_types():
    """``{format: (types...)}`` for saiunit's sparse classes and, when imported, brainevent's."""
    from saiunit import sparse as ss

    types = {"csr": [ss.CSR], "csc": [ss.CSC], "coo": [ss.COO]}
    brainevent = sys.modules.get("brainevent")  # only an already-imported brainevent can be passed
    if brainevent is not None:
        for fmt, name in (("csr", "CSR"), ("csc", "CSC")):
            cls = getattr(brainevent, name, None)
            if isinstance(cls, type):
                types[fmt].append(cls)
    return {k: tuple(v) for k, v in types.items()}


def _int_index(arr, what):
    if isinstance(arr, u.Quantity):
        arr = arr.mantissa
    arr = jnp.asarray(arr)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"sparse_matmul: `{what}` must have an integer dtype, got {arr.dtype}.")
    if arr.ndim != 1:
        raise ValueError(f"sparse_matmul: `{what}` must be 1-D, got shape {arr.shape}.")
    return arr.astype(jnp.int32)


def _concrete(arr):
    """``arr`` as a NumPy array when its value is known now (eagerly, or a constant closed over by a
    traced function), ``None`` when it is a tracer (its values are not known until the program runs)."""
    if isinstance(arr, jax.core.Tracer):
        return None
    return np.asarray(arr)


def _check_index_range(ids, bound, what, meaning, where):
    """``ValueError`` unless every entry of the index array ``ids`` (NumPy) lies in ``[0, bound)``."""
    bad = np.flatnonzero((ids < 0) | (ids >= bound))
    if bad.size:
        p = int(bad[0])
        raise ValueError(
            f"{where}: `{what}` holds {meaning} and must lie in [0, {bound}); got {what}[{p}] = "
            f"{int(ids[p])} ({bad.size} of {ids.size} entries out of range)."
        )


def _check_pointers(ptr, nnz, what, where):
    """``ValueError`` unless the compressed pointers ``ptr`` (NumPy) start at 0, never decrease and
    end at ``nnz``."""
    if ptr.size and int(ptr[0]) != 0:
        raise ValueError(f"{where}: `{what}` must start at 0, got {what}[0] = {int(ptr[0])}.")
    drops = np.flatnonzero(np.diff(ptr) < 0)
    if drops.size:
        i = int(drops[0])
        raise ValueError(
            f"{where}: `{what}` must be non-decreasing (no segment holds a negative number of entries); "
            f"got {what}[{i}] = {int(ptr[i])} > {what}[{i + 1}] = {int(ptr[i + 1])}."
        )
    if ptr.size and int(ptr[-1]) != nnz:
        raise ValueError(
            f"{where}: `{what}[-1]` must equal the number of stored non-zeros ({nnz}), got {int(ptr[-1])}."
        )


def _check_coo(shape, row_ids, col_ids, what, where):
    """Range checks of COO index arrays whose values are known (skipped for traced ones)."""
    rows, cols = _concrete(row_ids), _concrete(col_ids)
    if rows is not None:
        _check_index_range(rows, shape[0], what[0], f"row indices of a {shape} = (in, out) matrix", where)
    if cols is not None:
        _check_index_range(cols, shape[1], what[1], f"column indices of a {shape} = (in, out) matrix", where)


def _check_compressed(fmt, shape, indices, indptr, where):
    """Checks of a CSR/CSC matrix's ``indices`` and ``indptr`` whose values are known."""
    minor = shape[1] if fmt == "csr" else shape[0]
    meaning = "column" if fmt == "csr" else "row"
    ptr = _concrete(indptr)
    if ptr is not None:
        _check_pointers(ptr, int(indices.shape[0]), "sparse_mat.indptr", where)
    idx = _concrete(indices)
    if idx is not None:
        _check_index_range(
            idx,
            minor,
            "sparse_mat.indices",
            f"the {meaning} indices of a {fmt.upper()} matrix of shape {shape}",
            where,
        )


@partial(jax.jit, static_argnums=1)  # one compiled program for eager callers, inlined under jit
def _expand_ptr(indptr, nnz):
    """The major-axis index of each stored element of a compressed (CSR/CSC) matrix."""
    counts = jnp.diff(indptr)
    return jnp.repeat(jnp.arange(counts.shape[0], dtype=jnp.int32), counts, total_repeat_length=nnz)


def sparse_pattern(sparse_mat):
    r"""``(SparsePattern, row_ids, col_ids)`` of a sparse matrix, indices in the order of its data.

    Accepts ``saiunit.sparse.CSR`` / ``CSC`` / ``COO`` and, when brainevent is imported,
    ``brainevent.CSR`` / ``CSC``. The index arrays are returned as ``int32`` JAX arrays computed with
    ``jnp`` (traced when the matrix's index arrays are traced).

    Index arrays whose values are known (outside ``jit``, or constants closed over by a jitted
    function) are validated, raising ``ValueError`` for an index outside the matrix's shape, compressed
    pointers that do not start at 0, decrease, or do not end at the number of stored non-zeros.
    Traced index arrays cannot be checked: out-of-range indices then give wrong values, not an error.
    """
    types = _accepted_types()
    fmt = next((f for f, cls in types.items() if isinstance(sparse_mat, cls)), None)
    if fmt is None:
        names = ", ".join(f"{c.__module__.split('.')[0]}.{c.__name__}" for cs in types.values() for c in cs)
        raise TypeError(
            f"sparse_matmul: `sparse_mat` must be one of {names}; got {type(sparse_mat).__name__}. "
            f"Build one with e.g. saiunit.sparse.CSR.fromdense(dense)."
        )
    shape = tuple(int(s) for s in sparse_mat.shape)
    if len(shape) != 2:
        raise ValueError(f"sparse_matmul: `sparse_mat` must be 2-D (in, out), got shape {shape}.")
    if fmt == "coo":
        row_ids = _int_index(sparse_mat.row, "sparse_mat.row")
        col_ids = _int_index(sparse_mat.col, "sparse_mat.col")
        if row_ids.shape != col_ids.shape:
            raise ValueError(
                f"sparse_matmul: `sparse_mat.row` and `sparse_mat.col` must have the same length, "
                f"got {row_ids.shape} and {col_ids.shape}."
            )
        _check_coo(shape, row_ids, col_ids, ("sparse_mat.row", "sparse_mat.col"), "sparse_matmul")
    else:
        indices = _int_index(sparse_mat.indices, "sparse_mat.indices")
        indptr = _int_index(sparse_mat.indptr, "sparse_mat.indptr")
        major = shape[0] if fmt == "csr" else shape[1]
        if indptr.shape != (major + 1,):
            raise ValueError(
                f"sparse_matmul: `sparse_mat.indptr` of a {fmt.upper()} matrix of shape {shape} must have "
                f"shape ({major + 1},), got {indptr.shape}."
            )
        _check_compressed(fmt, shape, indices, indptr, "sparse_matmul")
        ptr_ids = _expand_ptr(indptr, indices.shape[0])
        row_ids, col_ids = (ptr_ids, indices) if fmt == "csr" else (indices, ptr_ids)
    return SparsePattern(shape=shape, nnz=int(row_ids.shape[0]), format=fmt), row_ids, col_ids


def sparse_matmul(x, weight=None, *, sparse_mat, bias=None, weight_fn=None, bias_fn=None, weight_data=None):
    r"""ETP-marked sparse matrix product :math:`y = x\,\mathrm{sparse}(f(w)) \;(+ g(b))`.

    ``sparse_mat`` gives the structure (its own data is ignored); ``weight`` holds the trainable
    non-zeros in the order of ``sparse_mat.data``. Binds ``etp_sp_mm`` when ``x.ndim >= 2``
    (``(batch, in)``; more leading axes are flattened into the batch) and ``etp_sp_mv`` when ``x`` is
    a vector ``(in,)``. The index arrays are operands of the primitive: to keep them out of the
    compiled program as constants, pass the sparse matrix (or its index arrays, e.g.
    ``saiunit.sparse.CSR((data, indices, indptr), shape=...)`` built inside the jitted function) as
    traced inputs.

    The structure is validated whenever its index arrays have known values (an eager call, or a
    matrix closed over by a jitted function, checked when it is traced): an index outside
    ``sparse_mat.shape`` or malformed ``indptr`` raises ``ValueError`` naming the array. Index arrays
    passed into ``jit`` as traced inputs cannot be checked there (an out-of-range index then gives
    wrong values): validate the matrix once outside, e.g. by building
    :class:`braintrace.nn.SparseLinear` or calling :func:`sparse_matmul` eagerly.

    Parameters
    ----------
    x : array or Quantity, shape ``(batch, in)`` or ``(in,)``
    weight : array or Quantity, shape ``(nnz,)``
        The non-zero values (also accepted as the keyword ``weight_data``).
    sparse_mat : saiunit.sparse.CSR, CSC or COO, or brainevent.CSR / CSC, shape ``(in, out)``
    bias : array or Quantity, shape ``(out,)``, optional
        Its unit must have the dimension of ``unit(x) * unit(weight)``.
    weight_fn : callable, optional
        Shape-preserving transform :math:`f` of the non-zeros' mantissa (units are split off before
        and put back after), applied with plain JAX ops before the primitive is bound: the
        primitive's trainable operand is ``weight_fn(weight)`` and the online gradient of ``weight``
        is the chain rule through it. ``None`` is the identity.
    bias_fn : callable, optional
        The same for the bias, applied to its mantissa in the unit of the product; ignored without a
        bias.

    Returns
    -------
    array or Quantity of shape ``(batch, out)`` or ``(out,)``

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> from saiunit import sparse as ss
    >>> csr = ss.CSR.fromdense(jnp.array([[0., 1., 0.], [2., 0., 3.]]))
    >>> braintrace.sparse_matmul(jnp.array([[1., 1.]]), csr.data, sparse_mat=csr)
    Array([[2., 1., 3.]], dtype=float32)
    >>> braintrace.sparse_matmul(jnp.array([[1., 1.]]), weight=-csr.data, sparse_mat=csr, weight_fn=jnp.abs)
    Array([[2., 1., 3.]], dtype=float32)
    """
    if weight_data is not None:
        if weight is not None:
            raise TypeError("sparse_matmul: give the non-zeros as `weight` or as `weight_data`, not both.")
        weight = weight_data
    if weight is None:
        raise TypeError("sparse_matmul: missing the non-zero values `weight` (shape (nnz,)).")
    pattern, row_ids, col_ids = sparse_pattern(sparse_mat)
    indices = [row_ids, col_ids]
    if pattern.format == "csc":  # column order: the CSC's own pointers are the segments
        pattern = dataclasses.replace(pattern, col_sorted=True)
        indices.append(_int_index(sparse_mat.indptr, "sparse_mat.indptr"))
    return bind_sparse_matmul(
        x, weight, pattern, indices, bias, validate=False, weight_fn=weight_fn, bias_fn=bias_fn
    )  # checked above


def _check_block_columns(pattern: SparsePattern, cols, where):
    """``ValueError`` unless entry ``p K + k`` of a blocked pattern ends on a unit of block ``p``."""
    if cols is None or cols.size == 0:
        return
    block = np.repeat(np.arange(pattern.blocks), pattern.block_size)
    wrong = np.flatnonzero(cols // pattern.block_units != block)
    if wrong.size:
        i, units = int(wrong[0]), pattern.block_units
        raise ValueError(
            f"{where}: with blocks={pattern.blocks} the entries [p K, (p + 1) K) (K = {pattern.block_size}) "
            f"must end on block p's units [p O/P, (p + 1) O/P) (O/P = {units}); got col_ids[{i}] = "
            f"{int(cols[i])}, expected a column in [{block[i] * units}, {(block[i] + 1) * units})."
        )


def _check_operand_values(pattern: SparsePattern, indices):
    """The values of the index operands, where known: ranges, and the column pointers."""
    where = "sparse_matmul"
    n_out = pattern.shape[1]
    _check_coo(pattern.shape, indices[0], indices[1], ("row_ids", "col_ids"), where)
    if pattern.blocks > 1:
        _check_block_columns(pattern, _concrete(indices[1]), where)
    if not pattern.col_sorted:
        return
    ptr, cols = _concrete(indices[2]), _concrete(indices[1])
    if ptr is not None:
        _check_pointers(ptr, pattern.nnz, "col_ptr", where)
        if cols is not None:
            owner = np.repeat(np.arange(n_out), np.diff(ptr))  # the column each segment assigns
            wrong = np.flatnonzero(cols != owner)
            if wrong.size:
                p = int(wrong[0])
                raise ValueError(
                    f"{where}: with col_sorted=True the non-zeros must be in column order, non-zero p in "
                    f"column c for col_ptr[c] <= p < col_ptr[c+1]; got col_ids[{p}] = {int(cols[p])}, "
                    f"expected {int(owner[p])} from `col_ptr`."
                )


def bind_sparse_matmul(
    x, weight_data, pattern: SparsePattern, indices, bias=None, validate=True, *, weight_fn=None, bias_fn=None
):
    """:func:`sparse_matmul` for a pattern given as a :class:`SparsePattern` and its index operands
    ``[row_ids, col_ids]`` (``+ [col_ptr]`` when ``pattern.col_sorted``), all int32 arrays.

    With ``validate`` (default), index operands whose values are known are checked against the
    pattern (range, and the column pointers); traced ones cannot be. Callers that validated the
    structure already (:func:`sparse_matmul`, :class:`braintrace.nn.SparseLinear` at construction)
    pass ``validate=False``. ``weight_fn`` / ``bias_fn`` are those of :func:`sparse_matmul`."""
    x_m, x_u = split(x)
    w_m, w_u = split(weight_data)
    x_m, w_m = jnp.asarray(x_m), jnp.asarray(w_m)
    w_m = apply_operand_fn(weight_fn, w_m, name="weight_fn", op="sparse_matmul")
    n_in, n_out = pattern.shape
    expected = 3 if pattern.col_sorted else 2
    if len(indices) != expected:
        raise ValueError(
            f"sparse_matmul: a pattern with col_sorted={pattern.col_sorted} takes {expected} index arrays "
            f"(row_ids, col_ids{', col_ptr' if pattern.col_sorted else ''}), got {len(indices)}."
        )
    if pattern.col_sorted and tuple(indices[2].shape) != (n_out + 1,):
        raise ValueError(
            f"sparse_matmul: `col_ptr` must have shape ({n_out + 1},) = (out + 1,), "
            f"got {tuple(indices[2].shape)}."
        )
    for name, ids in zip(("row_ids", "col_ids"), indices[:2]):
        if tuple(ids.shape) != (pattern.nnz,):
            raise ValueError(
                f"sparse_matmul: `{name}` must have shape ({pattern.nnz},) = (nnz,) of the pattern, "
                f"got {tuple(ids.shape)}."
            )
    if validate:
        _check_operand_values(pattern, indices)
    if w_m.shape != (pattern.nnz,):
        raise ValueError(
            f"sparse_matmul: `weight` (`weight_data`) must have shape ({pattern.nnz},) = (nnz,) of "
            f"`sparse_mat`, got {w_m.shape}."
        )
    if x_m.ndim == 0:
        raise ValueError("sparse_matmul: `x` must have at least one axis (in,) or (batch, in), got a scalar.")
    if x_m.shape[-1] != n_in:
        raise ValueError(
            f"sparse_matmul: `x` has {x_m.shape[-1]} input features (shape {x_m.shape}) but `sparse_mat` "
            f"has shape {pattern.shape}; x.shape[-1] must equal sparse_mat.shape[0]."
        )
    unit = x_u * w_u
    operands = [x_m, w_m]
    if bias is not None:
        b_m = jnp.asarray(bias_mantissa(bias, unit, op="sparse_matmul"))
        b_m = apply_operand_fn(bias_fn, b_m, name="bias_fn", op="sparse_matmul")
        if b_m.shape != (n_out,):
            raise ValueError(
                f"sparse_matmul: `bias` must have shape ({n_out},) = (sparse_mat.shape[1],), got {b_m.shape}."
            )
        operands.append(b_m)
    operands += list(indices)
    lead = x_m.shape[:-1]
    if x_m.ndim > 2:
        operands[0] = x_m.reshape((-1, n_in))
    p = etp_sp_mv_p if x_m.ndim == 1 else etp_sp_mm_p
    y = p.bind(*operands, sparse_mat=pattern, has_bias=bias is not None)
    if x_m.ndim > 2:
        y = y.reshape((*lead, n_out))
    return attach(y, unit)


# ---------------------------------------------------------------------------------------------
# D-RTRL trace operations: fused CSR update and solve over the non-zeros
# ---------------------------------------------------------------------------------------------
#
# The weight trace lives in the kernel's layout for the whole run: non-zero-major, batch-minor,
# ``(nnz, n, B)``, so one program's gathers by row and column each fetch a contiguous run of ``B``
# values. Per-unit vectors are passed unit-major: ``d_t (O, n, n, B)``, ``df_t``/``ct_t (O, n, B)``,
# ``x_t (I, B)`` (small transposes per step). The bias trace keeps the rule layout ``(*batch, O, n)``.


def _csr_update_reference(trace, d_t, x_t, df_t, row_ids, col_ids):
    r"""``new[p,s,b] = sum_j d_t[c_p,s,j,b] trace[p,j,b] + x_t[r_p,b] df_t[c_p,s,b]``.

    This is ``yw_to_w`` (the gather of ``d`` by column) plus ``xy_to_dw`` per batch element (the
    product of ``x`` gathered by row and ``df`` gathered by column), in the kernel layout.
    """
    x_p = _take(x_t.astype(_arithmetic_dtype(trace.dtype)), row_ids, 0)  # (nnz, B)
    return _csr_update_gathered(trace, d_t, x_p, df_t, col_ids)


def _csr_update_gathered(trace, d_t, x_p, df_t, col_ids):
    """:func:`_csr_update_reference` with ``x`` already gathered by row: ``x_p (nnz, B)``."""
    acc = _arithmetic_dtype(trace.dtype)  # a bfloat16 trace is storage only, as in the kernel
    d_p = _take(d_t.astype(acc), col_ids, 0)  # (nnz, n, n, B)
    tr = trace.astype(acc)
    # A loop over the small state axis: a broadcast (nnz, n, n, B) product summed over j is an
    # order of magnitude slower on a CPU.
    carried = d_p[:, :, 0, :] * tr[:, 0:1, :]
    for j in range(1, trace.shape[1]):
        carried = carried + d_p[:, :, j, :] * tr[:, j : j + 1, :]
    inst = x_p[:, None, :] * _take(df_t.astype(acc), col_ids, 0)
    return (carried + inst).astype(trace.dtype)


def _csr_solve_reference(trace, ct_t, row_ids, col_ids):
    r"""``dw[p] = sum_b sum_s trace[p,s,b] ct_t[c_p,s,b]`` (``yw_to_w`` of ``ct`` summed over b, s)."""
    acc = _arithmetic_dtype(trace.dtype)  # returned in it too: float32 for a bfloat16 trace
    return _batch_sum(trace.astype(acc) * _take(ct_t.astype(acc), col_ids, 0), (1, 2))


def _csr_update_kernel(trace, d_t, x_t, df_t, row_ids, col_ids, *, interpret):
    from braintrace._kernel_import import kernel_module

    return kernel_module("csr").csr_trace_update(trace, d_t, x_t, df_t, row_ids, col_ids, interpret=interpret)


def _csr_solve_kernel(trace, ct_t, row_ids, col_ids, *, interpret):
    from braintrace._kernel_import import kernel_module

    out = kernel_module("csr").csr_trace_solve(trace, ct_t, col_ids, interpret=interpret)
    return out.astype(_arithmetic_dtype(trace.dtype))


def _csr_update_solve_reference(trace, d_t, x_t, df_t, ct_t, row_ids, col_ids):
    """``(new, dw)``: the update, then the solve of the new trace."""
    new = _csr_update_reference(trace, d_t, x_t, df_t, row_ids, col_ids)
    return new, _csr_solve_reference(new, ct_t, row_ids, col_ids)


def _csr_update_solve_kernel(trace, d_t, x_t, df_t, ct_t, row_ids, col_ids, *, interpret):
    from braintrace._kernel_import import kernel_module

    new, dw = kernel_module("csr").csr_trace_update_solve(
        trace, d_t, x_t, df_t, ct_t, row_ids, col_ids, interpret=interpret
    )
    return new, dw.astype(_arithmetic_dtype(trace.dtype))


# Batch-minor layout: the batch is the last axis of the trace and of every per-unit operand; the
# index arrays are shared; the solves sum over the batch.
#: Fused CSR D-RTRL trace update over the non-zeros (kernel layout ``(nnz, n, B)``).
csr_trace_update_p = fused_op(
    "csr_trace_update",
    _csr_update_reference,
    _csr_update_kernel,
    batch_layout=BatchLayout({0: -1, 1: -1, 2: -1, 3: -1}, (-1,)),
)
#: CSR gradient solve ``dw_p = sum_b sum_s eps_p ct[c_p]``.
csr_trace_solve_p = fused_op(
    "csr_trace_solve",
    _csr_solve_reference,
    _csr_solve_kernel,
    batch_layout=BatchLayout({0: -1, 1: -1}, (BATCH_SUM,)),
)
#: The CSR update and the solve of the new trace in one pass over the non-zeros: ``(new, dw)``.
csr_trace_update_solve_p = fused_op(
    "csr_trace_update_solve",
    _csr_update_solve_reference,
    _csr_update_solve_kernel,
    multiple_results=True,
    batch_layout=BatchLayout({0: -1, 1: -1, 2: -1, 3: -1, 4: -1}, (-1, BATCH_SUM)),
)


def _unit_major(a, tail_ndim):
    """``(*batch, *tail) -> (*tail, B)`` with the batch axes flattened (``B = 1`` without any)."""
    lead = a.shape[: a.ndim - tail_ndim]
    flat = a.reshape((int(np.prod(lead)) if lead else 1, *a.shape[a.ndim - tail_ndim :]))
    return jnp.moveaxis(flat, 0, -1)


def _make_csr_trace_ops(primitive):
    batched = primitive in BATCHED_PRIMITIVES

    def init(x_var, y_var, weight_vars, n, batch_shape, params):
        bshape = tuple(x_var.aval.shape[:1]) if batched else tuple(batch_shape)
        w = weight_vars["weight"].aval
        out = {"weight": jnp.zeros((w.shape[0], n, int(np.prod(bshape)) if bshape else 1), w.dtype)}
        if "bias" in weight_vars:
            b = weight_vars["bias"].aval
            out["bias"] = jnp.zeros((*bshape, *b.shape, n), b.dtype)
        return out

    def unit_major_operands(trace, d, x, df, params):
        """``d_t (O, n, n, B)``, ``x_t (I, B)``, ``df_t (O, n, B)`` in the trace's dtype; for a blocked
        pattern ``x`` stays batch-major ``(B, I)`` in its own dtype (see :func:`_blocked_trace_update`)."""
        bshape = df.shape[:-2]
        num_in = params["sparse_mat"].shape[0]
        dt = trace["weight"].dtype
        x_full = jnp.broadcast_to(x, (*bshape, num_in))
        if params["sparse_mat"].blocks > 1:
            x_t = x_full.reshape((-1, num_in))
        else:
            x_t = _unit_major(x_full.astype(dt), 1)
        return _unit_major(d.astype(dt), 3), x_t, _unit_major(df.astype(dt), 2)

    def update(trace, d, x, df, weights, params, batch_ndim):
        row_ids, col_ids = params["aux"][:2]
        pattern = params["sparse_mat"]
        d_t, x_t, df_t = unit_major_operands(trace, d, x, df, params)
        if pattern.blocks > 1:
            new_w = _blocked_trace_update(trace["weight"], d_t, x_t, df_t, row_ids, col_ids, pattern)
        else:
            new_w = csr_trace_update_p.bind(trace["weight"], d_t, x_t, df_t, row_ids, col_ids)
        out = {"weight": new_w}
        if "bias" in trace:
            out["bias"] = fused_bias_update(trace["bias"], d, df)
        return out

    def update_solve(trace, d, x, df, ct, weights, params, batch_ndim):
        row_ids, col_ids = params["aux"][:2]
        d_t, x_t, df_t = unit_major_operands(trace, d, x, df, params)
        ct_t = _unit_major(ct.astype(trace["weight"].dtype), 2)
        pattern = params["sparse_mat"]
        if pattern.blocks > 1:
            new_w = _blocked_trace_update(trace["weight"], d_t, x_t, df_t, row_ids, col_ids, pattern)
            dw = _blocked_trace_solve(new_w, ct_t, row_ids, col_ids, pattern)
        else:
            new_w, dw = csr_trace_update_solve_p.bind(trace["weight"], d_t, x_t, df_t, ct_t, row_ids, col_ids)
        new, grads = {"weight": new_w}, {"weight": dw.astype(weights["weight"].dtype)}
        if "bias" in trace:
            new["bias"], db = fused_bias_update_solve(trace["bias"], d, df, ct)
            grads["bias"] = db.astype(weights["bias"].dtype)
        return new, grads

    def solve(trace, ct, weights, params, batch_ndim):
        row_ids, col_ids = params["aux"][:2]
        dt = trace["weight"].dtype
        ct_t = _unit_major(ct.astype(dt), 2)
        pattern = params["sparse_mat"]
        if pattern.blocks > 1:
            dw = _blocked_trace_solve(trace["weight"], ct_t, row_ids, col_ids, pattern)
        else:
            dw = csr_trace_solve_p.bind(trace["weight"], ct_t, row_ids, col_ids)
        out = {"weight": dw.astype(weights["weight"].dtype)}
        if "bias" in trace:
            out["bias"] = fused_bias_solve(trace["bias"], ct).astype(weights["bias"].dtype)
        return out

    return DRTRLTraceOps(init=init, update=update, solve=solve, update_solve=update_solve)


for _p in (etp_sp_mm_p, etp_sp_mv_p):
    ETP_DRTRL_TRACE_OPS[_p] = _make_csr_trace_ops(_p)
    _p.kernel_declines = _blocked_declines_kernel
