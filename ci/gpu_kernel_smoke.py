#!/usr/bin/env python3
"""Smoke test of every Pallas kernel, compiled, on a CUDA GPU: correctness, time and bandwidth.

Usage (from the repository root, on the GPU host)::

    python3 ci/gpu_kernel_smoke.py [--iters 100] [--repeats 5]

For each kernel at a moderate size it prints one line: the normwise relative error against the
``*_reference`` (which must stay below 1e-6 in float32, DESIGN.md Clarification 9), the time per call,
the bandwidth achieved (bytes that must move, Clarification 12, divided by that time) as a fraction of
a roofline measured in the same run (a 1 GiB float32 elementwise op: bytes read + written), and the
time of the reference, an XLA formulation, timed the same way. Times are medians over ``--repeats``
runs of ``--iters`` calls inside one jitted ``lax.fori_loop`` (never single dispatches): every output
is carried into the next step or accumulated, so nothing is dead code and nothing is loop-invariant.

Exit status: 0 when every kernel matches its reference, 1 on any mismatch or failure, 2 without a GPU.
Needs only jax (and Triton, through jax); braintrace's own dependencies are not imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-6


def load_kernels():
    """``braintrace_kernels``: the installed package, or ``kernels/`` of this checkout."""
    sys.path.insert(0, str(ROOT))
    try:
        from braintrace._kernel_import import load_kernels as loader
    except ImportError:  # braintrace's dependencies are absent: run its loader file on its own
        path = ROOT / "braintrace" / "_kernel_import.py"
        spec = importlib.util.spec_from_file_location("_kernel_import", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loader = module.load_kernels
    return loader()


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def time_per_call(fn, args, *, carry=None, vary=(), iters=100, repeats=5):
    """Median seconds per ``fn(*args)`` over ``repeats`` jitted loops of ``iters`` calls.

    ``carry`` maps an output index to the argument it replaces in the next call (the trace);
    arguments listed in ``vary`` are rescaled every call (small arrays, so a kernel that does not
    carry its big operand is not loop-invariant); every other output is summed into an accumulator.
    """
    carry = carry or {}
    outs = jax.eval_shape(fn, *args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    accumulated = [k for k in range(len(outs)) if k not in carry]

    def body(_, state):
        args, accs = state
        out = fn(*args)
        out = out if isinstance(out, tuple) else (out,)
        args = list(args)
        for k, a in carry.items():
            args[a] = out[k]
        for a in vary:
            args[a] = args[a] * jnp.asarray(1.0 + 1e-7, args[a].dtype)
        return tuple(args), tuple(acc + out[k] for acc, k in zip(accs, accumulated))

    loop = jax.jit(lambda args, accs: lax.fori_loop(0, iters, body, (args, accs)))
    accs = tuple(jnp.zeros(outs[k].shape, outs[k].dtype) for k in accumulated)
    jax.block_until_ready(loop(tuple(args), accs))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(loop(tuple(args), accs))
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def roofline_bytes_per_s(iters, repeats):
    """Bandwidth of a 1 GiB float32 elementwise op (read + write), the same loop style."""
    x = jnp.ones((1 << 28,), jnp.float32)
    seconds = time_per_call(
        lambda a: a * jnp.float32(1.0000001), (x,), carry={0: 0}, iters=iters, repeats=repeats
    )
    del x
    return 2 * (1 << 30) / seconds


# --------------------------------------------------------------------------------------------------
# Cases: (name, kernel fn, reference fn, args, carry, vary, bytes that must move)
# --------------------------------------------------------------------------------------------------


def nbytes(*arrays):
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


def normal(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float32)


def dense_cases(bk, B=64, I=512, O=512, ns=(1, 2)):
    for n in ns:
        k = jax.random.split(jax.random.key(n), 5)
        tr, d = normal(k[0], (B, I, O, n)), normal(k[1], (B, O, n, n), 0.3)
        x, df, ct = normal(k[2], (B, I)), normal(k[3], (B, O, n)), normal(k[4], (B, O, n))
        dw = jax.ShapeDtypeStruct((I, O), jnp.float32)
        tag = f"B={B} I={I} O={O} n={n}"
        yield (
            "dense_trace_update",
            tag,
            bk.dense_trace_update,
            bk.dense_trace_update_reference,
            (tr, d, x, df),
            {0: 0},
            (),
            2 * nbytes(tr) + nbytes(d, x, df),
        )
        yield (
            "dense_trace_solve",
            tag,
            bk.dense_trace_solve,
            bk.dense_trace_solve_reference,
            (tr, ct),
            {},
            (1,),
            nbytes(tr, ct, dw),
        )
        yield (
            "dense_trace_update_solve",
            tag,
            bk.dense_trace_update_solve,
            bk.dense_trace_update_solve_reference,
            (tr, d, x, df, ct),
            {0: 0},
            (),
            2 * nbytes(tr) + nbytes(d, x, df, ct, dw),
        )


def csr_pattern(num_in, num_out, density, seed=0):
    rows, cols = np.nonzero(np.random.default_rng(seed).random((num_in, num_out)) < density)
    return jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32)


def csr_cases(bk, B=32, I=4096, O=4096, density=0.05, ns=(1, 2)):
    rows, cols = csr_pattern(I, O, density)
    nnz = rows.shape[0]
    for n in ns:
        k = jax.random.split(jax.random.key(10 + n), 5)
        tr, d_t = normal(k[0], (nnz, n, B)), normal(k[1], (O, n, n, B), 0.3)
        x_t, df_t, ct_t = normal(k[2], (I, B)), normal(k[3], (O, n, B)), normal(k[4], (O, n, B))
        dw = jax.ShapeDtypeStruct((nnz,), jnp.float32)
        tag = f"B={B} nnz={nnz} ({I}x{O}) n={n}"
        yield (
            "csr_trace_update",
            tag,
            bk.csr_trace_update,
            bk.csr_trace_update_reference,
            (tr, d_t, x_t, df_t, rows, cols),
            {0: 0},
            (),
            2 * nbytes(tr) + nbytes(d_t, x_t, df_t, rows, cols),
        )
        yield (
            "csr_trace_solve",
            tag,
            bk.csr_trace_solve,
            bk.csr_trace_solve_reference,
            (tr, ct_t, cols),
            {},
            (1,),
            nbytes(tr, ct_t, cols, dw),
        )
        yield (
            "csr_trace_update_solve",
            tag,
            bk.csr_trace_update_solve,
            bk.csr_trace_update_solve_reference,
            (tr, d_t, x_t, df_t, ct_t, rows, cols),
            {0: 0},
            (),
            2 * nbytes(tr) + nbytes(d_t, x_t, df_t, ct_t, rows, cols, dw),
        )

    k = jax.random.split(jax.random.key(20), 3)
    x, g, data = normal(k[0], (B, I)), normal(k[1], (B, O)), normal(k[2], (nnz,))
    csc = bk.csr_to_csc(rows, cols, O)
    row_ptr = bk.csr_row_pointers(rows, I)
    tag = f"B={B} nnz={nnz} ({I}x{O})"
    yield (
        "csr_matmul",
        tag,
        lambda x, data, r, c, perm, ptr: bk.csr_matmul(x, data, r, c, (I, O), csc=(perm, ptr)),
        lambda x, data, r, c, perm, ptr: bk.csr_matmul_reference(x, data, r, c, (I, O)),
        (x, data, rows, cols, *csc),
        {},
        (0,),
        nbytes(x, data, rows, cols, g),
    )
    yield (
        "csr_matmul_transpose",
        tag,
        lambda g, data, r, c, ptr: bk.csr_matmul_transpose(g, data, r, c, (I, O), row_ptr=ptr),
        lambda g, data, r, c, ptr: bk.csr_matmul_transpose_reference(g, data, r, c, (I, O)),
        (g, data, rows, cols, row_ptr),
        {},
        (0,),
        nbytes(g, data, rows, cols, x),
    )
    yield (
        "csr_sddmm",
        tag,
        bk.csr_sddmm,
        bk.csr_sddmm_reference,
        (x, g, rows, cols),
        {},
        (0,),
        nbytes(x, g, rows, cols, data),
    )


def lora_cases(bk, B=64, I=512, O=512, R=16, n=1, alpha=0.5):
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
    tag = f"B={B} I={I} O={O} r={R} n={n}"
    yield (
        "lora_trace_update",
        tag,
        lambda E, TA, d, x, z, df: bk.lora_trace_update(E, TA, d, x, z, df, alpha),
        lambda E, TA, d, x, z, df: bk.lora_trace_update_reference(E, TA, d, x, z, df, alpha),
        (E, TA, d, x, z, df),
        {0: 0, 1: 1},
        (),
        2 * nbytes(E, TA) + nbytes(d, x, z, df),
    )
    yield (
        "lora_trace_solve",
        tag,
        lambda E, TA, ct, A: bk.lora_trace_solve(E, TA, ct, A, alpha),
        lambda E, TA, ct, A: bk.lora_trace_solve_reference(E, TA, ct, A, alpha),
        (E, TA, ct, A),
        {},
        (2,),
        nbytes(E, TA, ct, A, *grads),
    )
    yield (
        "lora_trace_update_solve",
        tag,
        lambda E, TA, d, x, z, df, ct, A: bk.lora_trace_update_solve(E, TA, d, x, z, df, ct, A, alpha),
        lambda E, TA, d, x, z, df, ct, A: bk.lora_trace_update_solve_reference(
            E, TA, d, x, z, df, ct, A, alpha
        ),
        (E, TA, d, x, z, df, ct, A),
        {0: 0, 1: 1},
        (),
        2 * nbytes(E, TA) + nbytes(d, x, z, df, ct, A, *grads),
    )


# --------------------------------------------------------------------------------------------------


def rel_err(got, want):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    errs = []
    for a, b in zip(got, want):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape or not np.all(np.isfinite(a)):
            return float("inf")
        errs.append(float(np.linalg.norm(a - b) / np.linalg.norm(b)))
    return max(errs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args(argv)

    if not any(dev.platform == "gpu" for dev in jax.devices()):
        print("no CUDA GPU visible to JAX: nothing checked", file=sys.stderr)
        return 2
    bk = load_kernels()
    device = jax.devices()[0]
    print(f"# {device.device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    roof = roofline_bytes_per_s(max(opts.iters // 5, 10), opts.repeats)
    print(f"# roofline: 1 GiB float32 elementwise op, {roof / 1e12:.2f} TB/s (read + write)")
    print(
        f"{'kernel':26s} {'size':34s} {'rel_err':>9s} {'us/call':>9s} {'GB/s':>7s} {'%roof':>6s} "
        f"{'xla us':>8s} {'speedup':>7s}"
    )

    failures = 0
    for cases in (dense_cases(bk), csr_cases(bk), lora_cases(bk)):
        for name, tag, fn, ref, args, carry, vary, moved in cases:
            try:
                err = rel_err(jax.jit(fn)(*args), jax.jit(ref)(*args))
                t = time_per_call(fn, args, carry=carry, vary=vary, iters=opts.iters, repeats=opts.repeats)
                t_ref = time_per_call(
                    ref, args, carry=carry, vary=vary, iters=opts.iters, repeats=opts.repeats
                )
            except Exception:  # report and go on: one broken kernel must not hide the others
                failures += 1
                print(f"{name:26s} {tag:34s} FAILED")
                traceback.print_exc()
                continue
            ok = err < TOL
            failures += not ok
            print(
                f"{name:26s} {tag:34s} {err:9.1e} {t * 1e6:9.1f} {moved / t / 1e9:7.0f} "
                f"{100 * moved / t / roof:5.0f}% {t_ref * 1e6:8.1f} {t_ref / t:6.2f}x"
                + ("" if ok else f"  MISMATCH (tolerance {TOL:.0e})"),
                flush=True,
            )
    print(f"# {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
