"""Memory of one online-learning (or BPTT) configuration at one sequence length T.

Two figures per configuration:

* ``temp_bytes`` (and ``argument_bytes``, ``output_bytes``): the compiled program's own
  ``memory_analysis()``, exact for the program and independent of everything else in the process;
  ``temp_bytes`` excludes the inputs, so it is the figure that must stay flat in T online and grow
  with T under BPTT.
* ``peak_bytes``: the device allocator's ``peak_bytes_in_use`` after running the program (GPU only).
  The peak never goes down within a process, so each configuration runs in a process of its own:
  ``python -m benchmarks._memory '<job as JSON>'`` prints one result line.

An allocation failure is a result (``status: 'oom'``), not a crash. Subprocesses may compile at the
same time; their device work (one run for the peak, one timed run for ``us_per_step``) is serialized
by an exclusive lock on a file, so the timings do not share the GPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import subprocess
import sys
import time
import traceback

__all__ = ["measure", "run_subprocess", "MARK", "is_oom"]

MARK = "BRAINTRACE_MEMORY_RESULT "
ROOT = pathlib.Path(__file__).resolve().parents[1]
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")


def is_oom(text: str) -> bool:
    return any(m in text for m in _OOM_MARKERS)


@contextlib.contextmanager
def _locked(path):
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def measure(workload: str, algorithm: str, T: int, scale: str, execute: bool = True, lock: str = "") -> dict:
    """Build, compile and (with ``execute``) run one configuration; never raises."""
    import jax

    from . import _models as M

    s = M.spec(workload, scale)
    result = {
        "kind": "memory",
        "workload": workload,
        "label": s.label,
        "algorithm": algorithm,
        "T": int(T),
        "batch": s.batch,
        "n_hid": s.n_hid,
        "backend": "xla",
        "data_bytes": M.data_bytes(s, T),
        "device_kind": jax.devices()[0].device_kind,
    }
    try:
        run = M.bptt_fn(s) if algorithm == "bptt" else M.online_fn(s, algorithm)
        xs, ys = M.make_data(s, T)
        try:
            analysis = run.lower(xs, ys).compile().memory_analysis()
        except Exception as err:  # an allocation failure is handled below; anything else is reported
            if is_oom(str(err)):
                raise
            analysis = None
            result["analysis_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        if analysis is not None:
            result["temp_bytes"] = int(analysis.temp_size_in_bytes)
            result["argument_bytes"] = int(analysis.argument_size_in_bytes)
            result["output_bytes"] = int(analysis.output_size_in_bytes)
        if execute:
            with _locked(lock):
                jax.block_until_ready(run(xs, ys))
                start = time.perf_counter()
                jax.block_until_ready(run(xs, ys))
                result["us_per_step"] = (time.perf_counter() - start) / T * 1e6
            stats = jax.devices()[0].memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                result["peak_bytes"] = int(stats["peak_bytes_in_use"])
                result["source"] = "peak_bytes_in_use, one configuration per process"
        result.setdefault("source", "compiled memory_analysis")
        result["status"] = "ok"
    except Exception as err:
        text = f"{type(err).__name__}: {err}"
        result["status"] = "oom" if is_oom(text) else "error"
        result["message"] = text.splitlines()[0][:300]
        if result["status"] == "error":
            result["traceback"] = traceback.format_exc()[-2000:]
    return result


def run_subprocess(job: dict, timeout: float) -> dict:
    """Run :func:`measure` for ``job`` in a fresh Python process and return its result."""
    env = dict(os.environ)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # several processes share the GPU
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "benchmarks._memory", json.dumps(job)]
    base = {"kind": "memory", "backend": "xla", **{k: job[k] for k in ("workload", "algorithm", "T")}}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout", "message": f"no result within {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (proc.stderr or proc.stdout)[-1500:]
    status = "oom" if is_oom(tail) else "error"
    return {**base, "status": status, "message": f"exit status {proc.returncode}: {tail.strip()[-300:]}"}


def main(argv) -> int:
    if len(argv) != 2:
        print("usage: python -m benchmarks._memory '<job as JSON>'", file=sys.stderr)
        return 2
    import warnings

    warnings.simplefilter("ignore")
    result = measure(**json.loads(argv[1]))
    print(MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
