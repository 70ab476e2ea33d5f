"""Helpers shared by the kernel modules: argument checks, Triton compiler params, masked loads.

Every kernel in this package addresses its operands as whole arrays in HBM (``memory_space=ANY``) and
computes its own offsets and masks. Blocked ``BlockSpec`` windows are not used: the Triton lowering
does not mask a block that runs past the end of an array, and trace blocks whose last dimension is the
number of hidden states ``n`` (often 3) are not power-of-two tensors, which Triton cannot build.

Loads of contiguous tiles go through :func:`load` / :func:`store` with a mask. Gathers index a ref
with integer arrays that were clamped into range first, so they never need a mask. Both spellings
run in Pallas interpret mode on CPU (where a masked load of a tile that overruns the array is padded,
not shifted back as ``lax.dynamic_slice`` would) and lower through Triton on the GPU.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = [
    "COMPILED_DTYPES",
    "INTERPRET_DTYPES",
    "accumulator_dtype",
    "all_of",
    "batch_block",
    "batch_lanes",
    "block_ids",
    "check_block",
    "check_float_operands",
    "check_index_operand",
    "check_positive",
    "check_shape",
    "compiler_params",
    "load",
    "outer_mask",
    "resolve_block_sizes",
    "store",
    "sum_partials",
    "tail_mask",
    "whole_array_spec",
]

# jax 0.11 warns, once per lowering, that the Pallas Triton backend is deprecated. Every kernel here
# is written for that backend on purpose (portable Pallas that also runs in interpret mode), and
# the warning would otherwise reach users once per compiled step. It is silenced here, in one
# place, for that one message only; other Pallas warnings still show.
warnings.filterwarnings("ignore", message=r"The Pallas Triton backend is deprecated")

#: Floating dtypes a compiled (Triton) kernel accepts. Arithmetic runs in float32; bfloat16 is storage.
COMPILED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
#: Floating dtypes interpret mode accepts (float64 needs ``jax.enable_x64``).
INTERPRET_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64), jnp.dtype(jnp.bfloat16))


# --------------------------------------------------------------------------------------------------
# Argument checks (user input: raise, never assert)
# --------------------------------------------------------------------------------------------------


def check_block(name: str, value: Any) -> int:
    """A tensor block size: a positive power of two (Triton builds only power-of-two tensors).

    Interpret mode would accept other sizes; they are rejected anyway so that a configuration that
    passes on CPU also compiles on the GPU.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(
            f"{name}={value!r} must be a positive power of two (Triton tensors have power-of-two "
            f"sizes); try {name}={pl.next_power_of_2(max(int(value), 1)) if _is_number(value) else 16}."
        )
    return value


def check_positive(name: str, value: Any) -> int:
    """A positive integer that is not a tensor dimension (a loop length, a warp count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_shape(name: str, array: jax.Array, expected: tuple[int, ...], layout: str) -> None:
    """Raise ``ValueError`` naming ``name`` when ``array.shape != expected``."""
    if tuple(array.shape) != tuple(expected):
        raise ValueError(
            f"{name} has shape {tuple(array.shape)}, expected {tuple(expected)} (layout {layout})."
        )


def check_float_operands(interpret: bool, **operands: jax.Array) -> jnp.dtype:
    """All floating operands share one supported dtype; return it.

    Compiled kernels take float32 (bfloat16 as storage, arithmetic in float32); interpret mode also
    takes float64. Anything else is a ``TypeError`` naming the argument.
    """
    allowed = INTERPRET_DTYPES if interpret else COMPILED_DTYPES
    dtype = None
    first = None
    for name, array in operands.items():
        dt = jnp.dtype(array.dtype)
        if dt not in allowed:
            where = "in interpret mode" if interpret else "on the GPU (float64 only in interpret mode)"
            raise TypeError(
                f"{name} has dtype {dt}; supported {where}: {', '.join(str(a) for a in allowed)}."
            )
        if dtype is None:
            dtype, first = dt, name
        elif dt != dtype:
            raise TypeError(
                f"{name} has dtype {dt} but {first} has dtype {dtype}; all floating operands must share "
                f"one dtype (cast them with .astype({str(dtype)!r}))."
            )
    return dtype


def check_index_operand(name: str, array: jax.Array, length: int | None = None) -> jax.Array:
    """Index arrays are 1-D integers; returned as int32.

    int32 is used as is. Other integer dtypes (int64 under ``jax_enable_x64``, int16, uint32, ...) are
    converted to int32, which copies the array on every call: keep index arrays int32. Floating or
    boolean indices are a ``TypeError``. ``length`` checks the number of entries.
    """
    dt = jnp.dtype(array.dtype)
    if not jnp.issubdtype(dt, jnp.integer):
        raise TypeError(f"{name} has dtype {dt}; index arrays must be integers (int32 preferred).")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(array.shape)}.")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"{name} has {array.shape[0]} entries, expected {length}.")
    return array if dt == jnp.int32 else array.astype(jnp.int32)


def resolve_block_sizes(block_sizes, cls):
    """``cls.get_default()`` for ``None``, else ``block_sizes`` checked to be a valid ``cls``."""
    block_sizes = cls.get_default() if block_sizes is None else block_sizes
    if not isinstance(block_sizes, cls):
        raise TypeError(f"block_sizes must be a {cls.__name__}, got {type(block_sizes).__name__}.")
    return block_sizes.validate()


def batch_block(block_b: int | None, batch: int) -> int:
    """Batch lanes per program: ``block_b``, or for ``None`` the batch rounded up to a power of two,
    at most 64 (one program then usually covers the whole batch)."""
    return min(pl.next_power_of_2(batch), 64) if block_b is None else block_b


def accumulator_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Arithmetic dtype for a storage dtype: float64 stays float64, everything else float32."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# Pallas plumbing that differs between jax versions (detected by capability, not version)
# --------------------------------------------------------------------------------------------------


def _any_memory_space():
    """The "whole array, wherever it lives" memory space: ``pl.ANY`` in jax 0.10 and 0.11."""
    space = getattr(pl, "ANY", None)
    if space is None:
        memory_space = getattr(pl, "MemorySpace", None)
        space = getattr(memory_space, "ANY", None)
    if space is None:  # older jax spelled it in the TPU module only
        from jax.experimental.pallas import tpu as pltpu

        space = getattr(pltpu, "ANY", None) or pltpu.TPUMemorySpace.ANY
    return space


def whole_array_spec() -> pl.BlockSpec:
    """A ``BlockSpec`` handing the kernel the whole operand as a ref (no blocking, no copies)."""
    return pl.BlockSpec(memory_space=_any_memory_space())


def _triton_module():
    # Imported lazily: jax.experimental.pallas.triton pulls in the Triton lowering, and the GPU
    # submodules beside it (mosaic_gpu) do not import on every CPU stack.
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError:  # jax before the Triton module had its own name
        from jax.experimental.pallas import gpu as pltriton
    return pltriton


def compiler_params(num_warps: int, num_stages: int, interpret: bool):
    """Triton compiler params (``CompilerParams`` in jax>=0.5, ``TritonCompilerParams`` before).

    Interpret mode takes none, so nothing GPU-specific is imported on CPU.
    """
    if interpret:
        return None
    pltriton = _triton_module()
    cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def all_of(*masks):
    """``&`` of the masks that are not ``None`` (broadcast together); ``None`` when there are none.

    Kernels build a mask only for a dimension whose size is not a multiple of its block (a static
    fact), so the common full-block case compiles to unmasked, vectorised loads and stores.
    """
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = out & m
    return out


def outer_mask(row_mask, col_mask):
    """The 2-D mask ``row_mask[:, None] & col_mask[None, :]`` of two optional 1-D masks (or ``None``)."""
    return all_of(
        None if row_mask is None else row_mask[:, None], None if col_mask is None else col_mask[None, :]
    )


def tail_mask(start, block: int, size: int):
    """``start + arange(block) < size``, or ``None`` when every block is full (``size % block == 0``)."""
    if size % block == 0:
        return None
    return start + jnp.arange(block) < size


def load(ref, *, mask=None, other=None):
    """Masked load of a ref view (``ref.at[...]``); lanes outside ``mask`` read ``other``."""
    if mask is None:
        other = None
    try:
        fn = _triton_module().load
    except ImportError:  # pragma: no cover - a jax without the Triton module
        from jax._src.pallas import primitives as pallas_primitives

        return pallas_primitives.load(ref, None, mask=mask, other=other)
    return fn(ref, mask=mask, other=other)


def store(ref, value, *, mask=None):
    """Masked store into a ref view (``ref.at[...]``); lanes outside ``mask`` are left untouched."""
    try:
        fn = _triton_module().store
    except ImportError:  # pragma: no cover
        from jax._src.pallas import primitives as pallas_primitives

        return pallas_primitives.store(ref, None, value, mask=mask)
    return fn(ref, value, mask=mask)


# --------------------------------------------------------------------------------------------------
# Pieces of kernels over non-zeros (CSR trace, sparse products)
# --------------------------------------------------------------------------------------------------


def batch_lanes(b_blk, block_b: int, batch: int):
    """``(b0, lanes, mask)``: lane indices ``(1, block_b)`` clamped into range (so gathers need no
    mask) and the lane mask (``None`` when the batch fills every lane block)."""
    b0 = b_blk * block_b
    mask_b = tail_mask(b0, block_b, batch)
    lanes = b0 + jnp.arange(block_b)
    if mask_b is not None:
        lanes = jnp.minimum(lanes, batch - 1)
    return b0, lanes[None, :], mask_b


def block_ids(ref, start, block: int, mask, size: int):
    """A ``(block,)`` slice of an index array, clamped to ``[0, size)`` so that gathers stay in bounds."""
    ids = load(ref.at[pl.ds(start, block)], mask=mask, other=0)
    return jnp.clip(ids, 0, size - 1)


def sum_partials(partial):
    """Sum per-program partial results over their leading axis (a no-op copy-free index for one)."""
    return partial[0] if partial.shape[0] == 1 else jnp.sum(partial, axis=0)
