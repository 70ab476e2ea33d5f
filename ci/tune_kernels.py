#!/usr/bin/env python3
"""Sweep the block sizes of the fused trace kernels at the end-to-end benchmark sizes, on a CUDA GPU.

Usage (from the repository root, on the GPU host)::

    python3 ci/tune_kernels.py [--iters 50] [--repeats 5] [--json OUT.json] [--only dense|csr] [--cases ...]

For each case it times ``dense_trace_update_solve`` (or ``csr_trace_update_solve``) under every
configuration of a staged sweep: first the tile shape, the warps and (dense) the prefetch of the next
batch row and, with several states per unit, whole-state tiles, the other fields at their defaults,
and (dense) small tiles each covering the whole batch, so that no partial ``dW`` is written; then,
at the fastest of these, the batch rows per program and (dense) the ``min_programs`` rule.
Each line gives the time per call and the bandwidth achieved (bytes that must move, as in
``benchmarks/_ops.py``) against a roofline measured in the same run at the same size (a float32
elementwise op over an array as large as the trace: bytes read + written), which is what the kernel
could reach at this size, not at 1 GiB. About 250 configurations in all, each compiled once: on the
GPU host, ``--only dense`` and ``--only csr`` split the run in two, and ``--cases "(a)" "(c)"``
(substrings of the case labels) splits it further. The last lines compare
the fastest configuration with the default one; change the defaults (``DenseBlockSizes`` in
``kernels/dense.py``, ``CsrBlockSizes`` in ``kernels/csr.py``) only on a gain well beyond the spread
between repeats, and write the figures into their docstrings.

Cases: the recurrent trace of the dense RNN (a) ``64 x 512 x 512``, the exact LoRA trace ``E`` of
(c) ``64 x 1024 x 1024``, the trace of (a) stored in bfloat16, a two-state dense trace
``64 x 512 x 512 x 2``, and the CSR trace of (b) (839,680 non-zeros, batch 32). Every configuration
is checked against the reference (normwise relative error below 1e-6, 1e-2 for bfloat16 storage)
before it is timed. Exit status: 0, 1 when a configuration fails or
mismatches, 2 without a GPU. Needs only jax; braintrace's own dependencies are not imported.

``--smoke`` runs the same sweep logic on any machine, in Pallas interpret mode at tiny sizes and with
two configurations per stage (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
import traceback

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "ci"))

from gpu_kernel_smoke import load_kernels  # noqa: E402

from benchmarks._ops import csr_cases, dense_cases  # noqa: E402
from benchmarks._timing import rel_err, roofline_bytes_per_s, time_per_call  # noqa: E402

#: Normwise relative tolerance against the reference: float32, and bfloat16 storage (the kernel and
#: the reference may round a few elements of the new trace differently).
TOL = {"float32": 1e-6, "bfloat16": 1e-2}

#: name -> (family, sizes): the trace sizes of the end-to-end workloads.
CASES = {
    "(a) W_rec 64x512x512 n=1": ("dense", dict(B=64, I=512, O=512, n=1)),
    "(a) W_rec 64x512x512 n=1 bfloat16": ("dense", dict(B=64, I=512, O=512, n=1, dtype=jnp.bfloat16)),
    "(c) LoRA E 64x1024x1024 n=1": ("dense", dict(B=64, I=1024, O=1024, n=1)),
    "two states 64x512x512 n=2": ("dense", dict(B=64, I=512, O=512, n=2)),
    "(b) CSR 839,680 nnz B=32 n=1": ("csr", dict(B=32, I=4096, O=4096, density=0.05, n=1)),
}
#: The same families at tiny sizes, for ``--smoke``.
SMOKE_CASES = {
    "dense 3x37x29 n=2": ("dense", dict(B=3, I=37, O=29, n=2)),
    "dense 3x37x29 n=1 bfloat16": ("dense", dict(B=3, I=37, O=29, n=1, dtype=jnp.bfloat16)),
    "csr 40x30 B=3 n=1": ("csr", dict(B=3, I=40, O=30, density=0.2, n=1)),
}


def sweep(family: str, default, n: int = 1, batch: int = 64):
    """Stage 1 (tiles, warps, dense prefetch and, for ``n > 1``, whole-state tiles; dense also one
    program per small tile over the whole batch) and, given its best, stage 2 (batch rows per
    program).

    ``num_stages`` is not swept: Triton does not pipeline these kernels' loads (they feed no matrix
    product), and the code compiled for sm_90 is the same at any depth.
    """
    if family == "dense":
        tiles = [
            dict(block_i=bi, block_o=bo, num_warps=w, prefetch=p, vector_states=v)
            for bi in ((4, 8, 16) if n > 1 else (8, 16, 32))
            for bo in ((128, 256) if n > 1 else (128, 256, 512))
            for w in (4, 8)
            for p in (False, True)
            for v in ((False, True) if n > 1 else (False,))
            if bi * bo <= 8192
        ]
        # One program per (i, o) tile over the whole batch writes dW once, with no partials to sum
        # afterwards (XLA's fusion of the reference works this way): 8 MB less traffic and one launch
        # less per step on (a), 67 MB on (c). Small tiles keep enough programs; 4 elements per thread.
        tiles += [
            dict(
                block_i=bi,
                block_o=bo,
                num_warps=max(1, bi * bo // 128),
                prefetch=p,
                block_b=batch,
                min_programs=1,
            )
            for bi, bo in ((1, 256), (2, 128), (2, 256), (4, 128), (4, 256), (8, 128))
            for p in (False, True)
        ]

        def second(best):
            configs = [dict(best, block_b=b) for b in (2, 4, 8, 16, 32, 64)]
            return configs + [dict(best, min_programs=1), dict(best, min_programs=528)]

    else:
        tiles = [dict(block_nnz=nz, num_warps=w) for nz in (16, 32, 64, 128, 256) for w in (2, 4, 8)]

        def second(best):
            return [dict(best, block_b=b) for b in (None, 8, 16, 32)]

    return [dataclasses.replace(default, **c) for c in tiles], lambda best: [
        dataclasses.replace(default, **c) for c in second(best)
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write every row here")
    parser.add_argument("--only", choices=("dense", "csr"), default=None)
    parser.add_argument(
        "--cases", nargs="+", default=None, help="only the cases whose label contains one of these strings"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="interpret mode, tiny sizes, 2 configs per stage"
    )
    opts = parser.parse_args(argv)
    cases, limit = (SMOKE_CASES, 2) if opts.smoke else (CASES, None)
    if opts.smoke:
        opts.iters, opts.repeats = 2, 1
    elif not any(dev.platform == "gpu" for dev in jax.devices()):
        print("no CUDA GPU visible to JAX: nothing tuned", file=sys.stderr)
        return 2
    bk = load_kernels()
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    rows, failures = [], 0
    for label, (family, sizes) in cases.items():
        if opts.only and family != opts.only:
            continue
        if opts.cases and not any(c in label for c in opts.cases):
            continue
        make = dense_cases if family == "dense" else csr_cases
        op = f"{family}_trace_update_solve"
        base = make(bk, **sizes, interpret=opts.smoke)[op]
        roof = roofline_bytes_per_s(opts.iters, opts.repeats, size_bytes=base.trace_bytes)
        expected = jax.jit(base.ref)(*base.args)
        default = bk.DenseBlockSizes() if family == "dense" else bk.CsrBlockSizes()
        print(
            f"\n## {label}: {op}, {base.moved / 1e6:.0f} MB must move; roofline at this size "
            f"{roof / 1e12:.2f} TB/s"
        )

        def measure(bs):
            nonlocal failures
            fn = lambda *a: getattr(bk, op)(*a, block_sizes=bs, interpret=opts.smoke)  # noqa: E731
            try:
                err = rel_err(jax.jit(fn)(*base.args), expected)
                tol = TOL[jnp.dtype(base.args[0].dtype).name]
                if not err < tol:
                    raise AssertionError(f"relative error {err:.1e} >= {tol:.0e}")
                t = time_per_call(
                    fn, base.args, carry=base.carry, vary=base.vary, iters=opts.iters, repeats=opts.repeats
                )
            except Exception:  # one failing configuration must not end the sweep
                failures += 1
                print(f"  {bs}: FAILED")
                traceback.print_exc()
                return None
            row = dict(
                case=label,
                op=op,
                block_sizes=dataclasses.asdict(bs),
                us=t * 1e6,
                gbps=base.moved / t / 1e9,
                roofline_gbps=roof / 1e9,
                default=bs == default,
            )
            rows.append(row)
            print(
                f"  {t * 1e6:8.1f} us {row['gbps']:6.0f} GB/s {100 * base.moved / t / roof:4.0f}% "
                f"{'(default) ' if row['default'] else ''}{bs}",
                flush=True,
            )
            return t

        first, second = sweep(family, default, sizes.get("n", 1), sizes["B"])
        timed = {bs: measure(bs) for bs in ([default] + [c for c in first if c != default])[:limit]}
        best = min((bs for bs in timed if timed[bs] is not None), key=timed.get)
        tile_fields = {
            k: getattr(best, k)
            for k in ("block_i", "block_o", "block_nnz", "num_warps", "prefetch", "vector_states")
            if hasattr(best, k)
        }
        for bs in second(tile_fields)[:limit]:
            if bs not in timed:
                timed[bs] = measure(bs)
        best = min((bs for bs in timed if timed[bs] is not None), key=timed.get)
        if timed[default] is not None:
            print(
                f"# fastest {timed[best] * 1e6:.1f} us ({best}); default {timed[default] * 1e6:.1f} us: "
                f"{timed[default] / timed[best]:.2f}x the fastest"
            )
    if opts.json:
        opts.json.write_text(
            json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), indent=1)
        )
    print(f"# {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
