"""Kernel benchmark cases: each Pallas kernel beside its ``*_reference``, with the bytes that must move.

Shared by ``benchmarks/bench_{dense,csr,lora}.py`` and ``ci/gpu_kernel_smoke.py``. A :class:`Case`
holds one operation at one size: the kernel (``fn``), the XLA reference with the same signature
(``ref``), the operands, which output is carried into the next call (the trace) and which small
operands are varied per call (see :func:`benchmarks._timing.make_loop`), and ``moved``: the bytes
that must move per call (the trace read and written once, each index
array and each per-unit vector read once, each result written once).

``bk`` is the kernel package ``braintrace_kernels`` (passed in, so this module needs nothing but jax).
With ``interpret=True`` the kernels run in Pallas interpret mode (any platform: the CPU smoke run).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ._timing import nbytes, normal

__all__ = [
    "Case",
    "dense_cases",
    "csr_cases",
    "csr_matmul_cases",
    "lora_cases",
    "csr_pattern",
    "ALL_FAMILIES",
]


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel operation at one size (see the module docstring)."""

    op: str
    size: str
    fn: Callable
    ref: Callable
    args: Tuple
    carry: Mapping[int, int]
    vary: Tuple[int, ...]
    moved: int
    trace_bytes: int

    def function(self, backend: str) -> Callable:
        """``fn`` for ``'pallas'``, ``ref`` for ``'xla'``."""
        if backend not in ("xla", "pallas"):
            raise ValueError(f"backend must be 'xla' or 'pallas', got {backend!r}.")
        return self.fn if backend == "pallas" else self.ref


def _bind(fn, interpret, **kwargs):
    return functools.partial(fn, interpret=interpret, **kwargs)


def dense_cases(
    bk, B=64, I=512, O=512, n=1, *, dtype=jnp.float32, interpret=False, seed=0
) -> Dict[str, Case]:
    """``dense_trace_{update,solve,update_solve}``: trace ``(B, I, O, n)``, every operand in ``dtype``
    (float32, or bfloat16 storage with float32 arithmetic)."""
    k = jax.random.split(jax.random.key(seed + n), 5)
    tr, d = normal(k[0], (B, I, O, n), dtype=dtype), normal(k[1], (B, O, n, n), 0.3, dtype)
    x, df = normal(k[2], (B, I), dtype=dtype), normal(k[3], (B, O, n), dtype=dtype)
    ct = normal(k[4], (B, O, n), dtype=dtype)
    dw = jax.ShapeDtypeStruct((I, O), jnp.float32)
    size = f"B={B} I={I} O={O} n={n}" + (
        "" if jnp.dtype(dtype) == jnp.float32 else f" {jnp.dtype(dtype).name}"
    )
    tb = nbytes(tr)
    return {
        "dense_trace_update": Case(
            "dense_trace_update",
            size,
            _bind(bk.dense_trace_update, interpret),
            bk.dense_trace_update_reference,
            (tr, d, x, df),
            {0: 0},
            (),
            2 * tb + nbytes(d, x, df),
            tb,
        ),
        "dense_trace_solve": Case(
            "dense_trace_solve",
            size,
            _bind(bk.dense_trace_solve, interpret),
            bk.dense_trace_solve_reference,
            (tr, ct),
            {},
            (1,),
            nbytes(tr, ct, dw),
            tb,
        ),
        "dense_trace_update_solve": Case(
            "dense_trace_update_solve",
            size,
            _bind(bk.dense_trace_update_solve, interpret),
            bk.dense_trace_update_solve_reference,
            (tr, d, x, df, ct),
            {0: 0},
            (),
            2 * tb + nbytes(d, x, df, ct, dw),
            tb,
        ),
    }


@functools.lru_cache(maxsize=4)
def _pattern_numpy(num_in, num_out, density, seed):
    rng = np.random.default_rng(seed)
    rows, cols = [], []
    chunk = max(1, (1 << 24) // max(num_out, 1))  # at most 16 M random numbers at a time
    for start in range(0, num_in, chunk):
        r, c = np.nonzero(rng.random((min(chunk, num_in - start), num_out)) < density)
        rows.append(r + start)
        cols.append(c)
    return np.concatenate(rows).astype(np.int32), np.concatenate(cols).astype(np.int32)


def csr_pattern(num_in, num_out, density, seed=0):
    """Row-major (CSR data order) ``(rows, cols)`` of a random pattern, as int32 device arrays."""
    rows, cols = _pattern_numpy(num_in, num_out, float(density), seed)
    return jnp.asarray(rows), jnp.asarray(cols)


def csr_cases(bk, B=32, I=4096, O=4096, density=0.05, n=1, *, interpret=False) -> Dict[str, Case]:
    """``csr_trace_{update,solve,update_solve}`` in the kernel layout: trace ``(nnz, n, B)``."""
    rows, cols = csr_pattern(I, O, density)
    nnz = rows.shape[0]
    k = jax.random.split(jax.random.key(10 + n), 5)
    tr, d_t = normal(k[0], (nnz, n, B)), normal(k[1], (O, n, n, B), 0.3)
    x_t, df_t, ct_t = normal(k[2], (I, B)), normal(k[3], (O, n, B)), normal(k[4], (O, n, B))
    dw = jax.ShapeDtypeStruct((nnz,), jnp.float32)
    size = f"B={B} nnz={nnz} ({I}x{O}) n={n}"
    tb = nbytes(tr)
    return {
        "csr_trace_update": Case(
            "csr_trace_update",
            size,
            _bind(bk.csr_trace_update, interpret),
            bk.csr_trace_update_reference,
            (tr, d_t, x_t, df_t, rows, cols),
            {0: 0},
            (),
            2 * tb + nbytes(d_t, x_t, df_t, rows, cols),
            tb,
        ),
        "csr_trace_solve": Case(
            "csr_trace_solve",
            size,
            _bind(bk.csr_trace_solve, interpret),
            bk.csr_trace_solve_reference,
            (tr, ct_t, cols),
            {},
            (1,),
            nbytes(tr, ct_t, cols, dw),
            tb,
        ),
        "csr_trace_update_solve": Case(
            "csr_trace_update_solve",
            size,
            _bind(bk.csr_trace_update_solve, interpret),
            bk.csr_trace_update_solve_reference,
            (tr, d_t, x_t, df_t, ct_t, rows, cols),
            {0: 0},
            (),
            2 * tb + nbytes(d_t, x_t, df_t, ct_t, rows, cols, dw),
            tb,
        ),
    }


def csr_matmul_cases(bk, B=32, I=4096, O=4096, density=0.05, *, interpret=False) -> Dict[str, Case]:
    """The CSR layer's products: ``csr_matmul``, ``csr_matmul_transpose``, ``csr_sddmm``."""
    rows, cols = csr_pattern(I, O, density)
    nnz = rows.shape[0]
    k = jax.random.split(jax.random.key(20), 3)
    x, g, data = normal(k[0], (B, I)), normal(k[1], (B, O)), normal(k[2], (nnz,))
    csc = bk.csr_to_csc(rows, cols, O)
    row_ptr = bk.csr_row_pointers(rows, I)
    size = f"B={B} nnz={nnz} ({I}x{O})"
    db = nbytes(data)

    def matmul(x, data, r, c, perm, ptr):
        return bk.csr_matmul(x, data, r, c, (I, O), csc=(perm, ptr), interpret=interpret)

    def matmul_ref(x, data, r, c, perm, ptr):
        return bk.csr_matmul_reference(x, data, r, c, (I, O))

    def transpose(g, data, r, c, ptr):
        return bk.csr_matmul_transpose(g, data, r, c, (I, O), row_ptr=ptr, interpret=interpret)

    def transpose_ref(g, data, r, c, ptr):
        return bk.csr_matmul_transpose_reference(g, data, r, c, (I, O))

    return {
        "csr_matmul": Case(
            "csr_matmul",
            size,
            matmul,
            matmul_ref,
            (x, data, rows, cols, *csc),
            {},
            (0,),
            nbytes(x, data, rows, cols, g),
            db,
        ),
        "csr_matmul_transpose": Case(
            "csr_matmul_transpose",
            size,
            transpose,
            transpose_ref,
            (g, data, rows, cols, row_ptr),
            {},
            (0,),
            nbytes(g, data, rows, cols, x),
            db,
        ),
        "csr_sddmm": Case(
            "csr_sddmm",
            size,
            _bind(bk.csr_sddmm, interpret),
            bk.csr_sddmm_reference,
            (x, g, rows, cols),
            {},
            (0,),
            nbytes(x, g, rows, cols, data),
            db,
        ),
    }


def lora_cases(bk, B=64, I=512, O=512, R=16, n=1, alpha=0.5, *, interpret=False) -> Dict[str, Case]:
    """``lora_trace_{update,solve,update_solve}``: ``E (B, I, O, n)`` and ``TA (B, r, O, n)``."""
    k = jax.random.split(jax.random.key(30), 8)
    E, TA, d = normal(k[0], (B, I, O, n)), normal(k[1], (B, R, O, n)), normal(k[2], (B, O, n, n), 0.3)
    x, z, df, ct, A = (
        normal(k[3], (B, I)),
        normal(k[4], (B, R)),
        normal(k[5], (B, O, n)),
        normal(k[6], (B, O, n)),
        normal(k[7], (R, O)),
    )
    grads = (jax.ShapeDtypeStruct((I, R), jnp.float32), jax.ShapeDtypeStruct((R, O), jnp.float32))
    size = f"B={B} I={I} O={O} r={R} n={n}"
    tb = nbytes(E, TA)
    kw = {"interpret": interpret}

    def update(E, TA, d, x, z, df):
        return bk.lora_trace_update(E, TA, d, x, z, df, alpha, **kw)

    def update_ref(E, TA, d, x, z, df):
        return bk.lora_trace_update_reference(E, TA, d, x, z, df, alpha)

    def solve(E, TA, ct, A):
        return bk.lora_trace_solve(E, TA, ct, A, alpha, **kw)

    def solve_ref(E, TA, ct, A):
        return bk.lora_trace_solve_reference(E, TA, ct, A, alpha)

    def update_solve(E, TA, d, x, z, df, ct, A):
        return bk.lora_trace_update_solve(E, TA, d, x, z, df, ct, A, alpha, **kw)

    def update_solve_ref(E, TA, d, x, z, df, ct, A):
        return bk.lora_trace_update_solve_reference(E, TA, d, x, z, df, ct, A, alpha)

    return {
        "lora_trace_update": Case(
            "lora_trace_update",
            size,
            update,
            update_ref,
            (E, TA, d, x, z, df),
            {0: 0, 1: 1},
            (),
            2 * tb + nbytes(d, x, z, df),
            tb,
        ),
        "lora_trace_solve": Case(
            "lora_trace_solve",
            size,
            solve,
            solve_ref,
            (E, TA, ct, A),
            {},
            (2,),
            tb + nbytes(ct, A, *grads),
            tb,
        ),
        "lora_trace_update_solve": Case(
            "lora_trace_update_solve",
            size,
            update_solve,
            update_solve_ref,
            (E, TA, d, x, z, df, ct, A),
            {0: 0, 1: 1},
            (),
            2 * tb + nbytes(d, x, z, df, ct, A, *grads),
            tb,
        ),
    }


#: Family name -> case builder.
ALL_FAMILIES = {"dense": dense_cases, "csr": csr_cases, "csr_matmul": csr_matmul_cases, "lora": lora_cases}


# --------------------------------------------------------------------------------------------------
# pytest parametrization (used by bench_dense.py, bench_csr.py, bench_lora.py)
# --------------------------------------------------------------------------------------------------

BACKENDS = ("xla", "pallas")


def size_id(size: Mapping) -> str:
    """``{'B': 64, 'I': 512}`` -> ``'B64-I512'``."""
    return "-".join(f"{k}{v}" for k, v in size.items())


def op_params(sizes, ops):
    """``pytest.param(size, op, backend)`` for every size, op and backend, the two backends of an
    (op, size) pair adjacent (the second one records the Pallas/XLA ratio)."""
    import pytest

    return [
        pytest.param(dict(size), op, backend, id=f"{op}-{size_id(size)}-{backend}")
        for size in sizes
        for op in ops
        for backend in BACKENDS
    ]


_LAST: dict = {}


def cached_cases(family: str, bk, interpret: bool, size: Mapping) -> Dict[str, Case]:
    """The cases of ``family`` at ``size``; only the most recent size is kept (device memory)."""
    key = (family, interpret, tuple(sorted(size.items())))
    if _LAST.get("key") != key:
        _LAST.clear()
        _LAST["cases"] = ALL_FAMILIES[family](bk, interpret=interpret, **size)
        _LAST["key"] = key
    return _LAST["cases"]
