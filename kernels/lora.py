"""Exact D-RTRL traces of a LoRA layer ``y = alpha * x B A``.

With ``z = x B`` (``(B, r)``), the factor ``A`` (``(r, O)``) is a dense weight fed by ``z`` and keeps the
dense trace ``TA``; the factor ``B`` (``(I, r)``) reaches every unit, and its exact trace is
``eps_B[b, i, r, k, s] = alpha A[r, k] E[b, i, k, s]`` where ``E`` is the dense trace of ``x (x) df``.
``E`` is kept (a dense layer's trace) and contracted with ``A`` at solve time::

    E   (B, I, O, n)     E_new  = d . E  + x (x) df
    TA  (B, r, O, n)     TA_new = d . TA + z (x) (alpha df)
    dB  (I, r)           dB[i, r] = alpha sum_k A[r, k] sum_b sum_s E[b, i, k, s] ct[b, k, s]
    dA  (r, O)           dA[r, k] = sum_b sum_s TA[b, r, k, s] ct[b, k, s]

``d (B, O, n, n)``, ``df`` and ``ct`` ``(B, O, n)`` as in :mod:`.dense`. Every trace operation here is
a dense trace operation (two launches of the :mod:`.dense` kernels, ``alpha`` folded into ``z``); the
``(I, O) x (O, r)`` product of the solve is a small matmul left to XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .dense import (
    DenseBlockSizes,
    dense_trace_solve,
    dense_trace_solve_reference,
    dense_trace_update,
    dense_trace_update_reference,
    dense_trace_update_solve,
    dense_trace_update_solve_reference,
)

__all__ = [
    "lora_trace_solve",
    "lora_trace_solve_reference",
    "lora_trace_update",
    "lora_trace_update_reference",
    "lora_trace_update_solve",
    "lora_trace_update_solve_reference",
]


def _check(E, TA, *, z=None, A=None):
    if E.ndim != 4 or TA.ndim != 4:
        raise ValueError(
            f"E {tuple(E.shape)} and TA {tuple(TA.shape)} must be (B, I, O, n) and (B, r, O, n)."
        )
    num_b, _, num_o, n = E.shape
    rank = TA.shape[1]
    if (TA.shape[0], TA.shape[2], TA.shape[3]) != (num_b, num_o, n):
        raise ValueError(
            f"TA has shape {tuple(TA.shape)}, expected ({num_b}, r, {num_o}, {n}) "
            f"to match E {tuple(E.shape)} (layout (B, r, O, n))."
        )
    if z is not None and tuple(z.shape) != (num_b, rank):
        raise ValueError(f"z has shape {tuple(z.shape)}, expected ({num_b}, {rank}) (layout (B, r)).")
    if A is not None and tuple(A.shape) != (rank, num_o):
        raise ValueError(f"A has shape {tuple(A.shape)}, expected ({rank}, {num_o}) (layout (r, O)).")


def _scaled(z, alpha):
    return z * jnp.asarray(alpha, z.dtype)


def _factor_grads(dW_E, dA, A, alpha):
    """``dB = alpha dW_E A^T`` (exact, no TF32) next to ``dA``."""
    product = jnp.matmul(dW_E, A.astype(dW_E.dtype).T, precision=lax.Precision.HIGHEST)
    return jnp.asarray(alpha, dW_E.dtype) * product, dA


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def lora_trace_update(
    E: jax.Array,
    TA: jax.Array,
    d: jax.Array,
    x: jax.Array,
    z: jax.Array,
    df: jax.Array,
    alpha: float,
    *,
    block_sizes: DenseBlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(E_new, TA_new) = (d.E + x (x) df, d.TA + z (x) alpha df)``; two dense-trace launches."""
    _check(E, TA, z=z)
    kw = dict(block_sizes=block_sizes, interpret=interpret)
    return dense_trace_update(E, d, x, df, **kw), dense_trace_update(TA, d, _scaled(z, alpha), df, **kw)


def lora_trace_solve(
    E: jax.Array,
    TA: jax.Array,
    ct: jax.Array,
    A: jax.Array,
    alpha: float,
    *,
    block_sizes: DenseBlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(dB (I, r), dA (r, O))`` from the traces; see the module docstring."""
    _check(E, TA, A=A)
    kw = dict(block_sizes=block_sizes, interpret=interpret)
    return _factor_grads(dense_trace_solve(E, ct, **kw), dense_trace_solve(TA, ct, **kw), A, alpha)


def lora_trace_update_solve(
    E: jax.Array,
    TA: jax.Array,
    d: jax.Array,
    x: jax.Array,
    z: jax.Array,
    df: jax.Array,
    ct: jax.Array,
    A: jax.Array,
    alpha: float,
    *,
    block_sizes: DenseBlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(E_new, TA_new, dB, dA)``: the update, then the solve of the new traces, one pass per trace."""
    _check(E, TA, z=z, A=A)
    kw = dict(block_sizes=block_sizes, interpret=interpret)
    E_new, dW_E = dense_trace_update_solve(E, d, x, df, ct, **kw)
    TA_new, dA = dense_trace_update_solve(TA, d, _scaled(z, alpha), df, ct, **kw)
    return (E_new, TA_new, *_factor_grads(dW_E, dA, A, alpha))


# --------------------------------------------------------------------------------------------------
# References (the dense references composed the same way; block_sizes and interpret are ignored)
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def lora_trace_update_reference(E, TA, d, x, z, df, alpha, *, block_sizes=None, interpret=False):
    """Plain-``jnp`` :func:`lora_trace_update`."""
    del block_sizes, interpret
    E_new = dense_trace_update_reference(E, d, x, df)
    return E_new, dense_trace_update_reference(TA, d, _scaled(z, alpha), df)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def lora_trace_solve_reference(E, TA, ct, A, alpha, *, block_sizes=None, interpret=False):
    """Plain-``jnp`` :func:`lora_trace_solve`."""
    del block_sizes, interpret
    return _factor_grads(dense_trace_solve_reference(E, ct), dense_trace_solve_reference(TA, ct), A, alpha)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def lora_trace_update_solve_reference(E, TA, d, x, z, df, ct, A, alpha, *, block_sizes=None, interpret=False):
    """Plain-``jnp`` :func:`lora_trace_update_solve`."""
    del block_sizes, interpret
    E_new, dW_E = dense_trace_update_solve_reference(E, d, x, df, ct)
    TA_new, dA = dense_trace_update_solve_reference(TA, d, _scaled(z, alpha), df, ct)
    return (E_new, TA_new, *_factor_grads(dW_E, dA, A, alpha))
