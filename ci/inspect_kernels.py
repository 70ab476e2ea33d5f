#!/usr/bin/env python3
"""What the Triton compiler makes of each kernel at the benchmark sizes, on a machine without a GPU.

Usage (from the repository root; needs the ``triton`` package, e.g. ``pip install triton==3.6.0``,
the version jax 0.11.2 uses on the GPU host)::

    python3 ci/inspect_kernels.py [--arch 90] [--out DIR] [--ttir-only]

Each kernel is lowered for CUDA by Pallas (no GPU needed; the Triton IR is taken from the lowered
module), then compiled by the ``triton`` package for the given architecture (``sm_90``: H100) down
to machine code, in a separate process so that its LLVM never meets jaxlib's. One line per kernel:
registers per thread, shared and local (spilled) memory per program, how many programs fit on one SM
(registers, warps and shared memory of an H100), the global loads and stores by width
(``LDG.E.128`` is four float32 per thread and instruction), the barriers, and the layout conversions
in the Triton GPU IR (each one a round trip through shared memory).

These are static facts of the compiled code, not timings; they explain a measured bandwidth (too few
bytes in flight per SM, scalar accesses, barriers in the loop) and compare two versions of a kernel
before a GPU is at hand. ``--ttir-only`` stops after writing the Triton IR (no ``triton`` needed).
The files (``.ttir``, ``.ttgir``, ``.ptx``, ``.sass``) are kept in ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: H100 SXM limits per SM.
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_PROGRAMS_PER_SM, SHARED_PER_SM = 65536, 64, 32, 228 * 1024


def _cases():
    """name -> (function, abstract operands), at the sizes of the end-to-end benchmarks."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT))
    from braintrace._kernel_import import load_kernels

    bk = load_kernels()
    S, f32, i32 = jax.ShapeDtypeStruct, jnp.float32, jnp.int32

    def dense(B, I, O, n, **block):
        fn = lambda *a: bk.dense_trace_update_solve(*a, block_sizes=bk.DenseBlockSizes(**block))  # noqa: E731
        return fn, (
            S((B, I, O, n), f32),
            S((B, O, n, n), f32),
            S((B, I), f32),
            S((B, O, n), f32),
            S((B, O, n), f32),
        )

    nnz, B, H = 4096 * 205, 32, 4096
    csr_args = (
        S((nnz, 1, B), f32),
        S((H, 1, 1, B), f32),
        S((H, B), f32),
        S((H, 1, B), f32),
        S((H, 1, B), f32),
    )
    ids = (S((nnz,), i32), S((nnz,), i32))
    return {
        "(a) dense 64x512x512": dense(64, 512, 512, 1),
        "(a) dense 64x512x512 prefetch": dense(64, 512, 512, 1, prefetch=True),
        "(c) LoRA E 64x1024x1024": dense(64, 1024, 1024, 1),
        "(c) LoRA E 64x1024x1024 prefetch": dense(64, 1024, 1024, 1, prefetch=True),
        "two states 64x512x512x2": dense(64, 512, 512, 2),
        "two states, block_i=8": dense(64, 512, 512, 2, block_i=8),
        "two states, block_i=8, vector_states": dense(64, 512, 512, 2, block_i=8, vector_states=True),
        "(b) CSR trace 839,680 nnz": (bk.csr_trace_update_solve, csr_args + ids),
        "(b) CSR forward product": (
            lambda x, data, r, c, ptr: bk.csr_matmul(x, data, r, c, (H, H), csc=(None, ptr)),
            (S((B, H), f32), S((nnz,), f32), *ids, S((H + 1,), i32)),
        ),
        "(b) CSR SDDMM": (bk.csr_sddmm, (S((B, H), f32), S((B, H), f32), *ids)),
    }


def triton_kernels(fn, args):
    """``[(kernel name, num_warps, num_stages, Triton IR text)]`` of ``jax.jit(fn)`` lowered for CUDA."""
    from braintrace._kernel_import import kernel_module

    lowering = kernel_module("triton_calls")
    calls = lowering.triton_calls(lowering.lowered_for_cuda(fn, *args))
    return [(call.name, call.num_warps, call.num_stages, call.ir_text()) for call in calls]


def compile_one(ttir: pathlib.Path, warps: int, stages: int, arch: int) -> dict:
    """Compile a Triton IR file with the ``triton`` package; write its stages beside it; summarise."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = triton.compile(
        str(ttir), target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages}
    )
    for stage in ("ttgir", "ptx"):
        ttir.with_suffix(f".{stage}").write_text(kernel.asm[stage])
    cubin = ttir.with_suffix(".cubin")
    cubin.write_bytes(kernel.asm["cubin"])
    tools = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    usage = subprocess.run(
        [tools / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True, text=True
    )
    sass = subprocess.run([tools / "nvdisasm", "-c", cubin], capture_output=True, text=True).stdout
    ttir.with_suffix(".sass").write_text(sass)
    resources = dict(re.findall(r"(REG|SHARED|LOCAL):(\d+)", usage.stdout))
    memory = collections.Counter(re.findall(r"\b((?:LDG|STG)\.E(?:\.\d+)?)\b", sass))
    return dict(
        regs=int(resources.get("REG", 0)),
        shared=int(resources.get("SHARED", 0)),
        local=int(resources.get("LOCAL", 0)),
        memory=dict(sorted(memory.items())),
        barriers=sass.count("BAR.SYNC"),
        conversions=kernel.asm["ttgir"].count("ttg.convert_layout"),
    )


def programs_per_sm(regs: int, warps: int, shared: int) -> int:
    """Resident programs per SM on an H100: registers (allocated per warp in units of 256), warps,
    programs and shared memory."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    limits = [REGS_PER_SM // (regs_per_warp * warps), MAX_WARPS_PER_SM // warps, MAX_PROGRAMS_PER_SM]
    if shared:
        limits.append(SHARED_PER_SM // shared)
    return max(0, min(limits))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("kernel-inspection"))
    parser.add_argument("--ttir-only", action="store_true")
    parser.add_argument(
        "--compile-one", nargs=4, metavar=("TTIR", "WARPS", "STAGES", "ARCH"), help=argparse.SUPPRESS
    )
    opts = parser.parse_args(argv)
    if opts.compile_one:
        path, warps, stages, arch = opts.compile_one
        print(json.dumps(compile_one(pathlib.Path(path), int(warps), int(stages), int(arch))))
        return 0

    opts.out.mkdir(parents=True, exist_ok=True)
    header = f"{'case':38s} {'kernel':26s} {'warps':>5s} {'regs':>4s} {'local':>5s} {'prog/SM':>7s} "
    print(header + f"{'bar':>3s} {'cvt':>3s}  global loads and stores")
    failures = 0
    for case, (fn, args) in _cases().items():
        for k, (name, warps, stages, ttir) in enumerate(triton_kernels(fn, args)):
            slug = re.sub(r"[^a-z0-9]+", "_", case.lower()).strip("_") + (f"_{k}" if k else "")
            path = opts.out / f"{slug}.ttir"
            path.write_text(ttir)
            if opts.ttir_only:
                print(f"{case:38s} {name:26s} {warps:5d}  {path}")
                continue
            cmd = [
                sys.executable,
                __file__,
                "--compile-one",
                str(path),
                str(warps),
                str(stages),
                str(opts.arch),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                failures += 1
                print(f"{case:38s} {name:26s} FAILED\n{done.stderr.strip()[-2000:]}")
                continue
            info = json.loads(done.stdout.strip().splitlines()[-1])
            memory = " ".join(f"{count}x{op}" for op, count in info["memory"].items())
            print(
                f"{case:38s} {name:26s} {warps:5d} {info['regs']:4d} {info['local']:5d} "
                f"{programs_per_sm(info['regs'], warps, info['shared']):7d} {info['barriers']:3d} "
                f"{info['conversions']:3d}  {memory}"
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
