"""D-RTRL eligibility trace of a dense layer ``y = x W``: update, gradient solve, and both in one pass.

Shapes (``B`` batch, ``I`` inputs, ``O`` units, ``n`` hidden states per unit)::

    trace (B, I, O, n)   eps[b, i, o, s] = d h[b, o, s] / d W[i, o]
    d     (B, O, n, n)   hidden Jacobian, one n x n block per unit: d[b, o, s, j] = d h_t[s] / d h_{t-1}[j]
    x     (B, I)         layer input
    df    (B, O, n)      d h[b, o, s] / d y[b, o]
    ct    (B, O, n)      d L / d h[b, o, s]

Formulas::

    update:  new[b, i, o, s] = sum_j d[b, o, s, j] * trace[b, i, o, j] + x[b, i] * df[b, o, s]
    solve:   dW[i, o]        = sum_b sum_s trace[b, i, o, s] * ct[b, o, s]

:func:`dense_trace_update_solve` computes the update and the solve of the *new* trace in one pass
(each trace element read once and written once). A bias trace is the same operation with ``I = 1`` and
``x = ones((B, 1))``: the caller reshapes its ``(B, O, n)`` trace to ``(B, 1, O, n)``.

Kernel layout: one program owns an ``(block_i, block_o)`` tile of ``(i, o)`` for up to ``block_b`` batch rows,
so the grid covers tiles x batch chunks and keeps every SM busy even when ``I x O`` is small. The solve
writes one partial ``dW`` per batch chunk, ``(cdiv(B, block_b), I, O)``, summed by XLA afterwards (a
small second step). State planes ``s`` are loaded with stride ``n``, or, with ``vector_states``, all
states of a tile at once; ``n`` need not be a power of two.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._common import (
    accumulator_dtype,
    all_of,
    check_block,
    check_float_operands,
    check_positive,
    check_shape,
    compiler_params,
    load,
    outer_mask,
    resolve_block_sizes,
    store,
    tail_mask,
    whole_array_spec,
)

__all__ = [
    "DenseBlockSizes",
    "dense_trace_update",
    "dense_trace_solve",
    "dense_trace_update_solve",
    "dense_trace_update_reference",
    "dense_trace_solve_reference",
    "dense_trace_update_solve_reference",
]


@dataclasses.dataclass(frozen=True, slots=True)
class DenseBlockSizes:
    """Tiling of the dense trace kernels.

    Attributes:
      block_i: input rows per tile (power of two).
      block_o: units per tile (power of two).
      block_b: at most this many batch rows per program (the batch chunk of one partial ``dW``).
      min_programs: split the batch finer than ``block_b`` when the ``(i, o)`` tiles times the batch
        chunks would give fewer programs than this (a small ``I x O``, e.g. a LoRA factor of rank
        16, would otherwise leave most SMs idle); 1 turns the rule off. 264 is two per H100 SM.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the batch loop. Triton 3.6 does not pipeline
        this loop (its loads feed no matrix product): the code compiled for sm_90 is the same at 1
        and 3 stages.
      prefetch: load the next batch row's trace tile before the current row is updated and stored,
        so that each program has two rows in flight (the software pipelining Triton does not do
        here), at the price of one more tile of registers per thread.
      vector_states: with ``n > 1`` states per unit, read and write a row's trace as one
        ``(block_i, block_o, n)`` tile (``n`` padded to a power of two and masked), so that each
        thread's states are contiguous and its accesses vectorised, instead of one plane per state
        with stride ``n`` (scalar accesses). No effect with one state.

    Measured on an H100 (jax 0.11.2, Triton 3.6), a 64 x 512 x 512 trace, 50 calls in one jitted loop
    (``ci/gpu_kernel_smoke.py``): n = 1, update 58 us (XLA's fusion of the reference: 56 us), update
    and solve 65 us (XLA: 69 us); n = 2, update 125 us (XLA: 215 us), update and solve 157 us (XLA:
    774 us). Tiles of 8 to 32 x 128 to 512 and 4 or 8 warps were within 10% of the defaults.
    """

    block_i: int = 16
    block_o: int = 256
    block_b: int = 8
    min_programs: int = 264
    num_warps: int = 4
    num_stages: int = 1
    prefetch: bool = False
    vector_states: bool = False

    @classmethod
    def get_default(cls) -> DenseBlockSizes:
        return cls()

    def rows_per_program(self, batch: int, num_tiles: int) -> int:
        """Batch rows per program: ``block_b``, fewer if needed to reach ``min_programs``."""
        rows = min(self.block_b, batch)
        chunks_needed = pl.cdiv(self.min_programs, num_tiles)
        if pl.cdiv(batch, rows) < chunks_needed:
            rows = max(1, min(rows, batch // chunks_needed))
        return rows

    def validate(self) -> DenseBlockSizes:
        check_block("block_i", self.block_i)
        check_block("block_o", self.block_o)
        check_positive("block_b", self.block_b)
        check_positive("min_programs", self.min_programs)
        check_positive("num_warps", self.num_warps)
        check_positive("num_stages", self.num_stages)
        for name in ("prefetch", "vector_states"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False.")
        return self


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------


def _dense_trace_kernel(
    *refs,
    update: bool,
    solve: bool,
    shape: tuple[int, int, int, int],
    block_i: int,
    block_o: int,
    block_b: int,
    prefetch: bool,
    vector_states: bool,
    acc_dtype,
):
    """One ``(block_i, block_o)`` tile of ``(i, o)`` for the batch rows of one chunk.

    Operands (whole-array refs): ``trace, [d, x, df], [ct]``; outputs: ``[new_trace], [dW_partial]``.
    """
    num_b, num_i, num_o, n = shape
    refs = list(refs)
    tr_ref = refs.pop(0)
    d_ref, x_ref, df_ref = (refs.pop(0), refs.pop(0), refs.pop(0)) if update else (None,) * 3
    ct_ref = refs.pop(0) if solve else None
    new_ref = refs.pop(0) if update else None
    part_ref = refs.pop(0) if solve else None

    o_blk, i_blk, chunk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    i0 = i_blk * block_i
    o0 = o_blk * block_o
    rows_i, cols_o = pl.ds(i0, block_i), pl.ds(o0, block_o)
    # Masks exist only for dimensions that end in a partial block (see _common.all_of).
    mask_i = tail_mask(i0, block_i, num_i)
    mask_o = tail_mask(o0, block_o, num_o)
    mask_tile = outer_mask(mask_i, mask_o)
    rows = min(block_b, num_b)
    partial_chunk = num_b % rows != 0

    def unit_vector(ref, b, valid, *idx):  # (block_o,) slice of a per-unit vector, 0 outside
        vec = load(ref.at[b, cols_o, *map(jnp.int32, idx)], mask=all_of(mask_o, valid), other=0)
        return vec.astype(acc_dtype)

    def batch_row(k, in_chunk=None):
        """``(b, valid)`` of the chunk's ``k``-th row: ``b`` clamped into range, ``valid`` (a scalar
        mask, ``None`` when always true) says whether the row exists (and is ``< rows`` given
        ``in_chunk``)."""
        b_raw = chunk * block_b + k
        valid = all_of(b_raw < num_b if partial_chunk else None, in_chunk)
        b = jnp.minimum(b_raw, num_b - 1) if valid is not None else b_raw
        return b, valid

    def tile_mask(valid):
        if valid is None or mask_tile is not None:
            return all_of(mask_tile, valid)
        return jnp.broadcast_to(valid, (block_i, block_o))

    whole_states = vector_states and n > 1
    n_pad = pl.next_power_of_2(n)
    state_ids = jnp.arange(n_pad)

    def states_mask(valid):  # mask of a (block_i, block_o, n_pad) tile, or None
        mask = tile_mask(valid)
        return all_of(
            None if mask is None else mask[:, :, None], None if n == n_pad else (state_ids < n)[None, None, :]
        )

    def load_row(b, valid):
        """Row ``b``'s trace tile in the storage dtype: ``n`` planes ``(block_i, block_o)`` read with
        stride ``n``, or (``vector_states``) one ``(block_i, block_o, n_pad)`` tile read contiguously."""
        if whole_states:
            return load(tr_ref.at[b, rows_i, cols_o, pl.ds(0, n_pad)], mask=states_mask(valid), other=0)
        mask = tile_mask(valid)
        return [load(tr_ref.at[b, rows_i, cols_o, jnp.int32(j)], mask=mask, other=0) for j in range(n)]

    def planes_of(row):  # the n planes in the accumulator dtype
        if whole_states:
            row = row.astype(acc_dtype)
            return [jnp.sum(jnp.where(state_ids == j, row, 0), axis=-1) for j in range(n)]
        return [plane.astype(acc_dtype) for plane in row]

    def store_plane(b, valid, s, plane):  # state s of row b's new trace tile
        store(new_ref.at[b, rows_i, cols_o, jnp.int32(s)], plane.astype(new_ref.dtype), mask=tile_mask(valid))

    def store_states(b, valid, planes):  # all states of row b's new trace tile at once
        whole = sum(jnp.where(state_ids == s, plane[:, :, None], 0) for s, plane in enumerate(planes))
        dst = new_ref.at[b, rows_i, cols_o, pl.ds(0, n_pad)]
        store(dst, whole.astype(new_ref.dtype), mask=states_mask(valid))

    def update_and_solve(k, row, acc):
        b, valid = batch_row(k)
        planes = planes_of(row)
        if update:
            xb = load(x_ref.at[b, rows_i], mask=all_of(mask_i, valid), other=0).astype(acc_dtype)
            new = []
            for s in range(n):
                val = xb[:, None] * unit_vector(df_ref, b, valid, s)[None, :]
                for j in range(n):
                    val = val + unit_vector(d_ref, b, valid, s, j)[None, :] * planes[j]
                new.append(val)
                if not whole_states:  # each state stored once computed: fewer live registers
                    store_plane(b, valid, s, val)
            if whole_states:
                store_states(b, valid, new)
        else:
            new = planes
        if solve:
            for s in range(n):
                acc = acc + new[s] * unit_vector(ct_ref, b, valid, s)[None, :]
        return acc

    init = jnp.zeros((block_i, block_o), acc_dtype) if solve else None
    if prefetch:
        # Row k + 1's tile is loaded before row k is computed and stored, so two rows per program
        # are in flight. The load past the chunk's last row is masked off entirely (no traffic).
        def body(k, carry):
            row, acc = carry
            following = load_row(*batch_row(k + 1, in_chunk=k + 1 < rows))
            return following, update_and_solve(k, row, acc)

        acc = lax.fori_loop(0, rows, body, (load_row(*batch_row(0)), init))[1]
    else:
        acc = lax.fori_loop(0, rows, lambda k, acc: update_and_solve(k, load_row(*batch_row(k)), acc), init)
    if solve:
        store(part_ref.at[chunk, rows_i, cols_o], acc.astype(part_ref.dtype), mask=mask_tile)


# --------------------------------------------------------------------------------------------------
# pallas_call wrapper
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("update", "solve", "block_sizes", "interpret"))
def _dense_trace_call(
    trace, d, x, df, ct, *, update: bool, solve: bool, block_sizes: DenseBlockSizes, interpret: bool
):
    num_b, num_i, num_o, n = trace.shape
    bs = block_sizes
    acc_dtype = accumulator_dtype(trace.dtype)
    grid_io = (pl.cdiv(num_o, bs.block_o), pl.cdiv(num_i, bs.block_i))
    rows = bs.rows_per_program(num_b, grid_io[0] * grid_io[1])
    num_chunks = pl.cdiv(num_b, rows)
    kernel = functools.partial(
        _dense_trace_kernel,
        update=update,
        solve=solve,
        shape=trace.shape,
        block_i=bs.block_i,
        block_o=bs.block_o,
        block_b=rows,
        prefetch=bs.prefetch,
        vector_states=bs.vector_states,
        acc_dtype=acc_dtype,
    )
    operands = [trace] + ([d, x, df] if update else []) + ([ct] if solve else [])
    out_shape = []
    if update:
        out_shape.append(jax.ShapeDtypeStruct(trace.shape, trace.dtype))
    if solve:
        out_shape.append(jax.ShapeDtypeStruct((num_chunks, num_i, num_o), acc_dtype))
    name = "dense_trace_" + "_".join(k for k, on in (("update", update), ("solve", solve)) if on)
    outs = pl.pallas_call(
        kernel,
        grid=(*grid_io, num_chunks),
        in_specs=[whole_array_spec() for _ in operands],
        out_specs=[whole_array_spec() for _ in out_shape],
        out_shape=out_shape,
        # The new trace is written over the old one: a tile is read before it is written, by the one
        # program that owns it. Inside a scan whose carry is the trace this saves a full copy of the
        # trace per step (XLA would otherwise copy the kernel's output back into the carry buffer);
        # a caller that keeps using the old trace gets a copy made by XLA first.
        input_output_aliases={0: 0} if update else {},
        compiler_params=compiler_params(bs.num_warps, bs.num_stages, interpret),
        interpret=interpret,
        name=name,
    )(*operands)
    new = outs[0] if update else None
    dw = None
    if solve:
        partial = outs[-1]
        dw = partial[0] if num_chunks == 1 else jnp.sum(partial, axis=0)
    return new, dw


def _check(trace, *, d=None, x=None, df=None, ct=None, block_sizes, interpret):
    if trace.ndim != 4:
        raise ValueError(f"trace must be 4-D (B, I, O, n), got shape {tuple(trace.shape)}.")
    num_b, num_i, num_o, n = trace.shape
    if min(trace.shape) < 1:
        raise ValueError(f"trace has shape {tuple(trace.shape)}; every dimension must be at least 1.")
    if d is not None:
        check_shape("d", d, (num_b, num_o, n, n), "(B, O, n, n)")
    if x is not None:
        check_shape("x", x, (num_b, num_i), "(B, I)")
    if df is not None:
        check_shape("df", df, (num_b, num_o, n), "(B, O, n)")
    if ct is not None:
        check_shape("ct", ct, (num_b, num_o, n), "(B, O, n)")
    given = {k: v for k, v in dict(trace=trace, d=d, x=x, df=df, ct=ct).items() if v is not None}
    check_float_operands(interpret, **given)
    return resolve_block_sizes(block_sizes, DenseBlockSizes)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def dense_trace_update(
    trace: jax.Array,
    d: jax.Array,
    x: jax.Array,
    df: jax.Array,
    *,
    block_sizes: DenseBlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``new[b,i,o,s] = sum_j d[b,o,s,j] trace[b,i,o,j] + x[b,i] df[b,o,s]``; shapes in the module doc."""
    bs = _check(trace, d=d, x=x, df=df, block_sizes=block_sizes, interpret=interpret)
    return _dense_trace_call(
        trace, d, x, df, None, update=True, solve=False, block_sizes=bs, interpret=interpret
    )[0]


def dense_trace_solve(
    trace: jax.Array, ct: jax.Array, *, block_sizes: DenseBlockSizes | None = None, interpret: bool = False
) -> jax.Array:
    """``dW[i,o] = sum_b sum_s trace[b,i,o,s] ct[b,o,s]``: ``(I, O)`` in float32 (float64 for float64)."""
    bs = _check(trace, ct=ct, block_sizes=block_sizes, interpret=interpret)
    return _dense_trace_call(
        trace, None, None, None, ct, update=False, solve=True, block_sizes=bs, interpret=interpret
    )[1]


def dense_trace_update_solve(
    trace: jax.Array,
    d: jax.Array,
    x: jax.Array,
    df: jax.Array,
    ct: jax.Array,
    *,
    block_sizes: DenseBlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(new, dW)``: the update, then the solve of the *new* trace, in one pass over the trace."""
    bs = _check(trace, d=d, x=x, df=df, ct=ct, block_sizes=block_sizes, interpret=interpret)
    return _dense_trace_call(
        trace, d, x, df, ct, update=True, solve=True, block_sizes=bs, interpret=interpret
    )


# --------------------------------------------------------------------------------------------------
# References (plain jnp; block_sizes and interpret are accepted and ignored so the two interchange)
# --------------------------------------------------------------------------------------------------


def _updated(trace, d, x, df):
    """The updated trace in the accumulator dtype (float32, or float64 for float64 operands).

    Written as broadcasts and a sum over ``j`` (no ``dot_general``), so XLA fuses it into one pass and
    no TF32 rounding enters on the GPU.
    """
    acc = accumulator_dtype(trace.dtype)
    carried = jnp.sum(d.astype(acc)[:, None, :, :, :] * trace.astype(acc)[:, :, :, None, :], axis=-1)
    return carried + x.astype(acc)[:, :, None, None] * df.astype(acc)[:, None, :, :]


def _solved(trace, ct):
    acc = accumulator_dtype(trace.dtype)
    return jnp.einsum("bios,bos->io", trace.astype(acc), ct.astype(acc), precision=lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def dense_trace_update_reference(trace, d, x, df, *, block_sizes=None, interpret=False):
    """Plain-``jnp`` :func:`dense_trace_update`."""
    del block_sizes, interpret
    return _updated(trace, d, x, df).astype(trace.dtype)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def dense_trace_solve_reference(trace, ct, *, block_sizes=None, interpret=False):
    """Plain-``jnp`` :func:`dense_trace_solve`."""
    del block_sizes, interpret
    return _solved(trace, ct)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def dense_trace_update_solve_reference(trace, d, x, df, ct, *, block_sizes=None, interpret=False):
    """Plain-``jnp`` :func:`dense_trace_update_solve` (the solve sees the new trace before rounding)."""
    del block_sizes, interpret
    new = _updated(trace, d, x, df)
    return new.astype(trace.dtype), _solved(new, ct)
