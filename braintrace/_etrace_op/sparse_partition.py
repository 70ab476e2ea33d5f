r"""A sparse matrix split into postsynaptic blocks: :func:`partition_postsynaptic`.

The output units ``0 .. O-1`` of an ``(I, O)`` sparse matrix are split into ``P`` blocks of ``O / P``
consecutive units; block ``p`` owns the synapses that end on its units. The stored entries are
reordered block by block, each block padded to the largest block's count ``K`` with inert entries,
so that every per-synapse array has the shape ``(P K, ...)`` with block ``p`` at ``[p K, (p + 1) K)``:
an array XLA can shard along its first axis, one block per device (see
:func:`braintrace.shard_postsynaptic`). Within a block the entries stay in column order (stable),
padding last; ``col_ptr`` counts a block's padding in the block's last column, so the pattern keeps
``col_sorted=True``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ._units import attach, split
from .sparse import SparsePattern, _check_blocks, sparse_pattern

__all__ = ["PostsynapticPartition", "partition_postsynaptic"]


@dataclasses.dataclass(frozen=True, eq=False)
class PostsynapticPartition:
    """The pattern, index arrays and weights of a sparse matrix split into postsynaptic blocks.

    Attributes
    ----------
    pattern : SparsePattern
        ``blocks = P``, ``nnz = P K``, ``block_nnz`` the true non-zeros of each block,
        ``col_sorted=True``.
    row_ids, col_ids : numpy.ndarray of int32, shape ``(P K,)``
        The COO indices of the stored entries (padding: row 0, the block's last column).
    col_ptr : numpy.ndarray of int32, shape ``(O + 1,)``
        Column ``c`` owns entries ``[col_ptr[c], col_ptr[c+1])``.
    weight : array or Quantity, shape ``(P K,)``
        The weights in the order of the entries, zero at padding.
    source : numpy.ndarray of int32, shape ``(P K,)``
        Each entry's position in the source matrix's data, ``-1`` for padding.
    """

    pattern: SparsePattern
    row_ids: np.ndarray
    col_ids: np.ndarray
    col_ptr: np.ndarray
    weight: object
    source: np.ndarray

    @property
    def indices(self):
        """``[row_ids, col_ids, col_ptr]``, the index operands of :func:`bind_sparse_matmul`."""
        return [self.row_ids, self.col_ids, self.col_ptr]

    @property
    def real(self) -> np.ndarray:
        """``(P K,)`` bool: True for the source's non-zeros, False for padding."""
        return self.source >= 0

    def to_source(self, values):
        """``values (..., P K)`` (per entry: weights, gradients) in the source's order ``(..., nnz)``,
        the padding entries dropped."""
        v_m, v_u = split(values)
        v_m = jnp.asarray(v_m)
        if v_m.shape[-1:] != (self.pattern.nnz,):
            raise ValueError(
                f"PostsynapticPartition.to_source: `values` must have {self.pattern.nnz} entries along "
                f"its last axis (one per stored entry), got shape {v_m.shape}."
            )
        real = self.real
        out = jnp.zeros(v_m.shape[:-1] + (int(real.sum()),), v_m.dtype)
        return attach(out.at[..., self.source[real]].set(v_m[..., real]), v_u)

    def from_source(self, values):
        """``values (..., nnz)`` in the source's order as ``(..., P K)``, zero at padding."""
        v_m, v_u = split(values)
        v_m = jnp.asarray(v_m)
        n_src = int(self.real.sum())
        if v_m.shape[-1:] != (n_src,):
            raise ValueError(
                f"PostsynapticPartition.from_source: `values` must have the source's {n_src} non-zeros "
                f"along its last axis, got shape {v_m.shape}."
            )
        gathered = jnp.take(v_m, np.maximum(self.source, 0), axis=-1)
        return attach(jnp.where(self.real, gathered, jnp.zeros((), v_m.dtype)), v_u)


def _concrete_ids(ids, what):
    try:
        return np.asarray(ids).astype(np.int64)
    except jax.errors.TracerArrayConversionError:
        raise ValueError(
            f"partition_postsynaptic: the matrix's {what} must be concrete (call it outside jit)."
        ) from None


def partition_postsynaptic(sparse_mat, blocks: int, weight=None) -> PostsynapticPartition:
    r"""Split a sparse ``(I, O)`` matrix into ``blocks`` postsynaptic blocks (see the module docstring).

    Parameters
    ----------
    sparse_mat : saiunit.sparse.CSR, CSC or COO (or brainevent.CSR / CSC), shape ``(I, O)``
        Its index arrays must be concrete (call this outside ``jit``).
    blocks : int
        ``P >= 1``; must divide ``O``. ``P = 1`` reorders by column and adds no padding.
    weight : array or Quantity of shape ``(nnz,)``, optional
        The weights in the order of ``sparse_mat.data``; default ``sparse_mat.data``.

    Returns
    -------
    PostsynapticPartition
        Its ``pattern``, ``weight`` and ``indices`` go to :func:`bind_sparse_matmul`;
        :class:`braintrace.nn.SparseLinear` does this with ``postsynaptic_blocks=P``.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> from saiunit import sparse as ss
    >>> csr = ss.CSR.fromdense(jnp.array([[0., 1., 0., 4.], [2., 0., 3., 5.]]))
    >>> part = braintrace.partition_postsynaptic(csr, blocks=2)
    >>> part.pattern.block_nnz, part.col_ids.tolist()
    ((2, 3), [0, 1, 1, 2, 3, 3])
    >>> part.weight
    Array([2., 1., 0., 3., 4., 5.], dtype=float32)
    >>> part.to_source(part.weight)  # the CSR's order
    Array([1., 4., 2., 3., 5.], dtype=float32)
    """
    base, row_ids, col_ids = sparse_pattern(sparse_mat)
    where = "partition_postsynaptic"
    blocks = _check_blocks(blocks, base.shape, where)
    rows, cols = _concrete_ids(row_ids, "row indices"), _concrete_ids(col_ids, "column indices")
    weight = sparse_mat.data if weight is None else weight
    w_m, w_u = split(weight)
    w_m = jnp.asarray(w_m)
    if w_m.shape != (base.nnz,):
        raise ValueError(
            f"{where}: `weight` must hold the matrix's {base.nnz} non-zeros in the order of its data, "
            f"shape ({base.nnz},); got shape {w_m.shape}."
        )
    n_out = base.shape[1]
    units = n_out // blocks
    order = np.argsort(cols, kind="stable")  # column order: each block's entries are contiguous
    block_of = cols[order] // units
    counts = np.bincount(block_of, minlength=blocks)
    size = base.nnz if blocks == 1 else max(1, int(counts.max(initial=0)))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    dest = block_of * size + (np.arange(base.nnz) - starts[block_of])
    source = np.full(blocks * size, -1, np.int64)
    source[dest] = order
    real = source >= 0
    last_unit = np.repeat((np.arange(blocks) + 1) * units - 1, size)
    new_cols = np.where(real, cols[np.maximum(source, 0)] if base.nnz else 0, last_unit)
    new_rows = np.where(real, rows[np.maximum(source, 0)] if base.nnz else 0, 0)
    col_ptr = np.concatenate([[0], np.cumsum(np.bincount(new_cols, minlength=n_out))])
    pattern = SparsePattern(
        base.shape,
        blocks * size,
        base.format,
        col_sorted=True,
        blocks=blocks,
        block_nnz=tuple(int(c) for c in counts),
    )
    gathered = (
        jnp.take(w_m, np.maximum(source, 0), axis=0) if base.nnz else jnp.zeros(source.shape, w_m.dtype)
    )
    w = attach(jnp.where(real, gathered, jnp.zeros((), w_m.dtype)), w_u)
    as_int32 = lambda a: np.asarray(a, np.int32)  # noqa: E731
    return PostsynapticPartition(
        pattern, as_int32(new_rows), as_int32(new_cols), as_int32(col_ptr), w, as_int32(source)
    )
