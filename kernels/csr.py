"""D-RTRL trace of a CSR layer ``y = x sparse(w)``: update, gradient solve, and both in one pass.

The pattern is ``nnz`` non-zeros given as COO in CSR order: ``row_ids`` (input index ``r_p``) and
``col_ids`` (unit index ``c_p``), int32 arrays of length ``nnz``. The trace kernels work for any order
of the non-zeros (CSR order, or a CSC-like order that makes neighbouring non-zeros share columns).
Indices must lie in range; kernels clamp them (memory safety, not a feature). The layer's own
products (``csr_matmul`` and its gradient) are in :mod:`.csr_matmul`.

**Kernel layout**: the trace is kept non-zero-major, batch-minor, ``(nnz, n, B)``,
for the whole run, so that one program owns a block of non-zeros across the batch and every gather
by row or column fetches a contiguous run of ``B`` floats. The ETP rules' layout is ``(B, nnz, n)``;
convert once with :func:`csr_trace_to_kernel_layout` / :func:`csr_trace_from_kernel_layout`.
Per-unit operands come unit-major (batch last), as :func:`csr_unit_major` makes them::

    trace (nnz, n, B)      d_t (O, n, n, B)      df_t (O, n, B)      ct_t (O, n, B)      x_t (I, B)

    update:  new[p, s, b] = sum_j d_t[c_p, s, j, b] trace[p, j, b] + x_t[r_p, b] df_t[c_p, s, b]
    solve:   dw[p]        = sum_b sum_s trace[p, s, b] ct_t[c_p, s, b]

One program owns ``block_nnz`` non-zeros x ``block_b`` batch lanes; the solve writes one partial
``dw`` per lane block, summed afterwards (one block, hence no sum, for batches up to 64). The new
trace is written over the old one (``input_output_aliases``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._common import (
    accumulator_dtype,
    batch_block,
    batch_lanes,
    block_ids,
    check_block,
    check_float_operands,
    check_index_operand,
    check_positive,
    check_shape,
    compiler_params,
    load,
    outer_mask,
    resolve_block_sizes,
    store,
    sum_partials,
    tail_mask,
    whole_array_spec,
)

__all__ = [
    "CsrBlockSizes",
    "csr_trace_from_kernel_layout",
    "csr_trace_solve",
    "csr_trace_solve_reference",
    "csr_trace_to_kernel_layout",
    "csr_trace_update",
    "csr_trace_update_reference",
    "csr_trace_update_solve",
    "csr_trace_update_solve_reference",
    "csr_unit_major",
]


@dataclasses.dataclass(frozen=True, slots=True)
class CsrBlockSizes:
    """Tiling of the CSR trace kernels.

    Attributes:
      block_nnz: non-zeros per program (power of two).
      block_b: batch lanes per program (power of two); ``None`` picks the batch rounded up to a
        power of two, at most 64, so that one program usually covers the whole batch.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth.

    Measured on an H100 (jax 0.11.2), batch 32, 839,474 non-zeros, 50 calls in one jitted loop
    (``ci/gpu_kernel_smoke.py``): n = 1, update 91 us (XLA's gathers in the same layout: 90 us), solve
    62 us (XLA: 79 us), update and solve 108 us (XLA: 113 us); n = 2, update 184 us (XLA: 318 us),
    update and solve 223 us (XLA: 359 us). block_nnz 32 to 128 and 2 to 8 warps: within 5%.
    """

    block_nnz: int = 64
    block_b: int | None = None
    num_warps: int = 4
    num_stages: int = 1

    @classmethod
    def get_default(cls) -> CsrBlockSizes:
        return cls()

    def validate(self) -> CsrBlockSizes:
        check_block("block_nnz", self.block_nnz)
        if self.block_b is not None:
            check_block("block_b", self.block_b)
        check_positive("num_warps", self.num_warps)
        check_positive("num_stages", self.num_stages)
        return self


# --------------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------------


def csr_trace_to_kernel_layout(trace: jax.Array) -> jax.Array:
    """Rule layout ``(B, nnz, n)`` -> kernel layout ``(nnz, n, B)`` (once, at initialisation)."""
    if trace.ndim != 3:
        raise ValueError(f"trace must be (B, nnz, n), got shape {tuple(trace.shape)}.")
    return jnp.transpose(trace, (1, 2, 0))


def csr_trace_from_kernel_layout(trace: jax.Array) -> jax.Array:
    """Kernel layout ``(nnz, n, B)`` -> rule layout ``(B, nnz, n)`` (once, at read-out)."""
    if trace.ndim != 3:
        raise ValueError(f"trace must be (nnz, n, B), got shape {tuple(trace.shape)}.")
    return jnp.transpose(trace, (2, 0, 1))


def csr_unit_major(array: jax.Array) -> jax.Array:
    """Move the leading batch axis last: ``(B, O, n[, n]) -> (O, n[, n], B)``, ``(B, I) -> (I, B)``."""
    return jnp.moveaxis(array, 0, -1)


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------


def _csr_trace_kernel(
    *refs,
    update: bool,
    solve: bool,
    nnz: int,
    n: int,
    batch: int,
    num_in: int,
    num_out: int,
    block_nnz: int,
    block_b: int,
    acc_dtype,
):
    """One block of ``block_nnz`` non-zeros x ``block_b`` batch lanes.

    Operands: ``trace, [d2, x_t, df2, row_ids], [ct2], col_ids``; outputs: ``[new_trace], [dw_partial]``.
    ``d2``, ``df2``, ``ct2`` are the unit-major operands flattened to ``(O, planes * B)`` so that every
    gather is a 2-D ``ref[unit, plane * B + lane]``.
    """
    refs = list(refs)
    tr_ref = refs.pop(0)
    if update:
        d_ref, x_ref, df_ref, row_ref = (refs.pop(0) for _ in range(4))
    ct_ref = refs.pop(0) if solve else None
    col_ref = refs.pop(0)
    new_ref = refs.pop(0) if update else None
    part_ref = refs.pop(0) if solve else None

    p_blk, b_blk = pl.program_id(0), pl.program_id(1)
    p0 = p_blk * block_nnz
    mask_p = tail_mask(p0, block_nnz, nnz)
    b0, lanes, mask_b = batch_lanes(b_blk, block_b, batch)
    mask = outer_mask(mask_p, mask_b)
    rows_p, cols_b = pl.ds(p0, block_nnz), pl.ds(b0, block_b)
    cols = block_ids(col_ref, p0, block_nnz, mask_p, num_out)[:, None]

    def unit_gather(ref, plane):  # (block_nnz, block_b): ref[c_p, plane * B + b]
        return ref[cols, plane * batch + lanes].astype(acc_dtype)

    planes = [
        load(tr_ref.at[rows_p, jnp.int32(j), cols_b], mask=mask, other=0).astype(acc_dtype) for j in range(n)
    ]
    if update:
        rows = block_ids(row_ref, p0, block_nnz, mask_p, num_in)[:, None]
        x_rows = x_ref[rows, lanes].astype(acc_dtype)
        new = []
        for s in range(n):
            val = x_rows * unit_gather(df_ref, s)
            for j in range(n):
                val = val + unit_gather(d_ref, s * n + j) * planes[j]
            store(new_ref.at[rows_p, jnp.int32(s), cols_b], val.astype(new_ref.dtype), mask=mask)
            new.append(val)
    else:
        new = planes
    if solve:
        acc = new[0] * unit_gather(ct_ref, 0)
        for s in range(1, n):
            acc = acc + new[s] * unit_gather(ct_ref, s)
        if mask_b is not None:  # lanes past the batch gathered real (clamped) rows: drop them
            acc = jnp.where(mask_b[None, :], acc, 0)
        store(part_ref.at[b_blk, rows_p], jnp.sum(acc, axis=1).astype(part_ref.dtype), mask=mask_p)


# --------------------------------------------------------------------------------------------------
# pallas_call wrapper
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("update", "solve", "block_sizes", "interpret"))
def _csr_trace_call(
    trace,
    d_t,
    x_t,
    df_t,
    ct_t,
    row_ids,
    col_ids,
    *,
    update: bool,
    solve: bool,
    block_sizes: CsrBlockSizes,
    interpret: bool,
):
    nnz, n, batch = trace.shape
    num_out = (d_t if update else ct_t).shape[0]
    num_in = x_t.shape[0] if update else 1
    bs = block_sizes
    block_b = batch_block(bs.block_b, batch)
    num_b_blocks = pl.cdiv(batch, block_b)
    acc_dtype = accumulator_dtype(trace.dtype)
    operands = [trace]
    if update:
        operands += [d_t.reshape(num_out, n * n * batch), x_t, df_t.reshape(num_out, n * batch), row_ids]
    if solve:
        operands.append(ct_t.reshape(num_out, n * batch))
    operands.append(col_ids)
    out_shape = []
    if update:
        out_shape.append(jax.ShapeDtypeStruct(trace.shape, trace.dtype))
    if solve:
        out_shape.append(jax.ShapeDtypeStruct((num_b_blocks, nnz), acc_dtype))
    kernel = functools.partial(
        _csr_trace_kernel,
        update=update,
        solve=solve,
        nnz=nnz,
        n=n,
        batch=batch,
        num_in=num_in,
        num_out=num_out,
        block_nnz=bs.block_nnz,
        block_b=block_b,
        acc_dtype=acc_dtype,
    )
    name = "csr_trace_" + "_".join(k for k, on in (("update", update), ("solve", solve)) if on)
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(nnz, bs.block_nnz), num_b_blocks),
        in_specs=[whole_array_spec() for _ in operands],
        out_specs=[whole_array_spec() for _ in out_shape],
        out_shape=out_shape,
        # In place, as for the dense trace: each (non-zero block, lane block) is read, then written,
        # by the one program that owns it.
        input_output_aliases={0: 0} if update else {},
        compiler_params=compiler_params(bs.num_warps, bs.num_stages, interpret),
        interpret=interpret,
        name=name,
    )(*operands)
    new = outs[0] if update else None
    dw = sum_partials(outs[-1]) if solve else None
    return new, dw


def _check_trace(trace, *, d_t=None, x_t=None, df_t=None, ct_t=None, row_ids=None, col_ids=None, interpret):
    if trace.ndim != 3:
        raise ValueError(
            f"trace must be 3-D in the kernel layout (nnz, n, B), got shape {tuple(trace.shape)}; "
            "convert a (B, nnz, n) trace once with csr_trace_to_kernel_layout."
        )
    if min(trace.shape) < 1:
        raise ValueError(f"trace has shape {tuple(trace.shape)}; every dimension must be at least 1.")
    nnz, n, batch = trace.shape
    unit_op = d_t if d_t is not None else ct_t
    if unit_op.ndim < 1:
        raise ValueError("per-unit operands must be unit-major arrays (O, ..., B).")
    num_out = unit_op.shape[0]
    if d_t is not None:
        check_shape("d_t", d_t, (num_out, n, n, batch), "(O, n, n, B)")
    if df_t is not None:
        check_shape("df_t", df_t, (num_out, n, batch), "(O, n, B)")
    if ct_t is not None:
        check_shape("ct_t", ct_t, (num_out, n, batch), "(O, n, B)")
    if x_t is not None:
        if x_t.ndim != 2 or x_t.shape[1] != batch or x_t.shape[0] < 1:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}, expected (I, {batch}) (layout (I, B)).")
    floats = dict(trace=trace, d_t=d_t, x_t=x_t, df_t=df_t, ct_t=ct_t)
    check_float_operands(interpret, **{k: v for k, v in floats.items() if v is not None})
    ids = {}
    for name, arr in (("row_ids", row_ids), ("col_ids", col_ids)):
        if arr is not None:
            ids[name] = check_index_operand(name, arr, nnz)
    return ids


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def csr_trace_update(
    trace: jax.Array,
    d_t: jax.Array,
    x_t: jax.Array,
    df_t: jax.Array,
    row_ids: jax.Array,
    col_ids: jax.Array,
    *,
    block_sizes: CsrBlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``new[p,s,b] = sum_j d_t[c_p,s,j,b] trace[p,j,b] + x_t[r_p,b] df_t[c_p,s,b]`` (kernel layout)."""
    ids = _check_trace(
        trace, d_t=d_t, x_t=x_t, df_t=df_t, row_ids=row_ids, col_ids=col_ids, interpret=interpret
    )
    return _csr_trace_call(
        trace,
        d_t,
        x_t,
        df_t,
        None,
        ids["row_ids"],
        ids["col_ids"],
        update=True,
        solve=False,
        block_sizes=resolve_block_sizes(block_sizes, CsrBlockSizes),
        interpret=interpret,
    )[0]


def csr_trace_solve(
    trace: jax.Array,
    ct_t: jax.Array,
    col_ids: jax.Array,
    *,
    block_sizes: CsrBlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``dw[p] = sum_b sum_s trace[p,s,b] ct_t[c_p,s,b]``: ``(nnz,)`` in float32 (float64 for float64)."""
    ids = _check_trace(trace, ct_t=ct_t, col_ids=col_ids, interpret=interpret)
    return _csr_trace_call(
        trace,
        None,
        None,
        None,
        ct_t,
        None,
        ids["col_ids"],
        update=False,
        solve=True,
        block_sizes=resolve_block_sizes(block_sizes, CsrBlockSizes),
        interpret=interpret,
    )[1]


def csr_trace_update_solve(
    trace: jax.Array,
    d_t: jax.Array,
    x_t: jax.Array,
    df_t: jax.Array,
    ct_t: jax.Array,
    row_ids: jax.Array,
    col_ids: jax.Array,
    *,
    block_sizes: CsrBlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(new, dw)``: the update, then the solve of the new trace, in one pass over the trace."""
    ids = _check_trace(
        trace, d_t=d_t, x_t=x_t, df_t=df_t, ct_t=ct_t, row_ids=row_ids, col_ids=col_ids, interpret=interpret
    )
    return _csr_trace_call(
        trace,
        d_t,
        x_t,
        df_t,
        ct_t,
        ids["row_ids"],
        ids["col_ids"],
        update=True,
        solve=True,
        block_sizes=resolve_block_sizes(block_sizes, CsrBlockSizes),
        interpret=interpret,
    )


# --------------------------------------------------------------------------------------------------
# References (plain jnp / XLA gathers; block_sizes and interpret are accepted and ignored)
# --------------------------------------------------------------------------------------------------


def _updated(trace, d_t, x_t, df_t, row_ids, col_ids):
    acc = accumulator_dtype(trace.dtype)
    d_p = d_t.astype(acc)[col_ids]  # (nnz, n, n, B)
    carried = jnp.sum(d_p * trace.astype(acc)[:, None, :, :], axis=2)
    return carried + x_t.astype(acc)[row_ids][:, None, :] * df_t.astype(acc)[col_ids]


def _solved(trace, ct_t, col_ids):
    acc = accumulator_dtype(trace.dtype)
    return jnp.sum(trace.astype(acc) * ct_t.astype(acc)[col_ids], axis=(1, 2))


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def csr_trace_update_reference(trace, d_t, x_t, df_t, row_ids, col_ids, *, block_sizes=None, interpret=False):
    """Plain-``jnp`` :func:`csr_trace_update` (XLA gathers)."""
    del block_sizes, interpret
    return _updated(trace, d_t, x_t, df_t, row_ids, col_ids).astype(trace.dtype)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def csr_trace_solve_reference(trace, ct_t, col_ids, *, block_sizes=None, interpret=False):
    """Plain-``jnp`` :func:`csr_trace_solve`."""
    del block_sizes, interpret
    return _solved(trace, ct_t, col_ids)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def csr_trace_update_solve_reference(
    trace, d_t, x_t, df_t, ct_t, row_ids, col_ids, *, block_sizes=None, interpret=False
):
    """Plain-``jnp`` :func:`csr_trace_update_solve`."""
    del block_sizes, interpret
    new = _updated(trace, d_t, x_t, df_t, row_ids, col_ids)
    return new.astype(trace.dtype), _solved(new, ct_t, col_ids)
