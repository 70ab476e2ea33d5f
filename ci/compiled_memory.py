#!/usr/bin/env python3
"""The compiled memory of BPTT and of the online algorithms at the benchmark sizes, on any machine.

Usage (from the repository root)::

    python3 ci/compiled_memory.py --json docs/_data/compiled-memory.json

For each workload of ``benchmarks/_models.py`` at its GPU size ((a) dense, (b) CSR, (c) LoRA), each
of BPTT, D_RTRL and pp_prop, and each sequence length ``T`` (100, 1,000 and 10,000 by default), it
compiles the program that ``pytest benchmarks --gpu`` times (``etrace_grad`` over ``T`` steps, or
``jax.grad`` of the summed loss through a scan) for the local backend, without running it, and
prints XLA's ``memory_analysis()`` of it: the temporary memory (``temp``: the working set, the
figure that must stay flat in ``T`` online and grows with ``T`` under BPTT), the inputs (``args``:
the sequences and the states) and the outputs (``out``: the gradients and, online, the new traces).

These are the compiled program's own figures, not a device's measured peak (which
``pytest benchmarks --gpu`` records): they show the growth in ``T`` and the ratio between the
algorithms on a machine without a GPU, in a minute or two.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _models as M  # noqa: E402

ALGORITHMS = ("bptt", "d_rtrl", "pp_prop")


def compiled_memory(workload: str, algorithm: str, T: int, scale: str = "gpu") -> dict:
    """One row: the compiled program's memory analysis, in bytes."""
    s = M.spec(workload, scale)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = M.compiled_program(s, algorithm, T).memory_analysis()
    return {
        "workload": workload,
        "label": s.label,
        "algorithm": algorithm,
        "T": T,
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "compile_s": round(time.perf_counter() - start, 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["dense", "csr", "lora"])
    parser.add_argument("--T", nargs="+", type=int, default=[100, 1000, 10000])
    parser.add_argument("--scale", choices=["gpu", "cpu"], default="gpu", help="model sizes (default: gpu)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'workload':40s} {'algorithm':9s} {'T':>6s} {'temp MB':>10s} {'args MB':>9s} {'out MB':>9s}")
    for workload in args.workloads:
        for algorithm in ALGORITHMS:
            for T in args.T:
                row = compiled_memory(workload, algorithm, T, args.scale)
                rows.append(row)
                mb = lambda key: row[key] / 1e6  # noqa: E731
                print(
                    f"{row['label']:40s} {algorithm:9s} {T:6d} {mb('temp_bytes'):10.1f} "
                    f"{mb('argument_bytes'):9.1f} {mb('output_bytes'):9.1f}",
                    flush=True,
                )
    if args.json is not None:
        import jax

        meta = {"backend": jax.default_backend(), "jax": jax.__version__, "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
