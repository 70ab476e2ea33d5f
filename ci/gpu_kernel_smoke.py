#!/usr/bin/env python3
"""Smoke test of every Pallas kernel, compiled, on a CUDA GPU: correctness, time and bandwidth.

Usage (from the repository root, on the GPU host)::

    python3 ci/gpu_kernel_smoke.py [--iters 100] [--repeats 5]

For each kernel at a moderate size it prints one line: the normwise relative error against the
``*_reference`` (which must stay below 1e-6 in float32), the time per call,
the bandwidth achieved (bytes that must move divided by that time) as a fraction of
a roofline measured in the same run (a 1 GiB float32 elementwise op: bytes read + written), and the
time of the reference, an XLA formulation, timed the same way. Times are medians over ``--repeats``
runs of ``--iters`` calls inside one jitted ``lax.fori_loop`` (never single dispatches): every output
is carried into the next step or accumulated, so nothing is dead code and nothing is loop-invariant.

Exit status: 0 when every kernel matches its reference, 1 on any mismatch or failure, 2 without a GPU.
Needs only jax (and Triton, through jax); braintrace's own dependencies are not imported. The timing
loop, the roofline and the cases come from ``benchmarks/_timing.py`` and ``benchmarks/_ops.py``, which
``pytest benchmarks --gpu`` uses too.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time
import traceback

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The timing loop, the roofline and the cases (with their bytes that must move) are shared with the
# benchmark suite; both modules import only jax and numpy.
from benchmarks._ops import csr_cases, csr_matmul_cases, dense_cases, lora_cases  # noqa: E402
from benchmarks._timing import rel_err, roofline_bytes_per_s, time_per_call  # noqa: E402

TOL = 1e-6


def load_kernels():
    """``braintrace_kernels``: the installed package, or ``kernels/`` of this checkout."""
    try:
        from braintrace._kernel_import import load_kernels as loader
    except ImportError:  # braintrace's dependencies are absent: run its loader file on its own
        path = ROOT / "braintrace" / "_kernel_import.py"
        spec = importlib.util.spec_from_file_location("_kernel_import", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loader = module.load_kernels
    return loader()


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

    def all_cases():
        for n in (1, 2):
            yield from dense_cases(bk, B=64, I=512, O=512, n=n).values()
        for n in (1, 2):
            yield from csr_cases(bk, B=32, I=4096, O=4096, density=0.05, n=n).values()
        yield from csr_matmul_cases(bk, B=32, I=4096, O=4096, density=0.05).values()
        yield from lora_cases(bk, B=64, I=512, O=512, R=16, n=1).values()

    failures = 0
    for case in all_cases():
        name, tag, moved = case.op, case.size, case.moved
        loop = {"carry": case.carry, "vary": case.vary, "iters": opts.iters, "repeats": opts.repeats}
        try:
            err = rel_err(jax.jit(case.fn)(*case.args), jax.jit(case.ref)(*case.args))
            t = time_per_call(case.fn, case.args, **loop)
            t_ref = time_per_call(case.ref, case.args, **loop)
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
