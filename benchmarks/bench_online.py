"""End to end: one online-learning step, BPTT for comparison, and memory against the sequence length.

* ``test_online_step``: ``learner.etrace_grad(xs, ys, step_fn=...)`` over ``T`` steps inside one
  jit (on the GPU ``T = 500``; 100 for the spiking network and for BPTT on the CSR RNN, see
  ``benchmarks/_config.py``), time per step, for D_RTRL and pp_prop on the workloads of
  ``benchmarks/_models.py`` ((a) dense, (b) CSR, (c) LoRA RNNs, the latter also under D_RTRL with
  the factored LoRA trace, and D_RTRL with bfloat16 traces under ``'pallas'``; (d) the 50k-neuron LIF
  network under pp_prop at batch 8 and 1), on both backends; pp_prop also with its weight
  gradients formed once per 32 steps (``pp_prop_solve32``, ``etrace_grad(..., solve_every=32)``)
  on (b) and (d).
* ``test_bptt_step``: ``jax.grad`` of the summed loss through a scan, same models, same ``T``.
* ``test_memory``: each of BPTT, D_RTRL and pp_prop on (a)-(c) at T = 100, 1,000 and 10,000 (GPU):
  peak device memory measured one configuration per process, and the compiled program's
  ``temp_bytes``; an allocation failure is recorded as ``status: 'oom'``. On a CPU only the compiled
  analysis exists (one configuration still goes through a subprocess, so that path is exercised).
* ``test_memory_scaling``: the checks. BPTT is the control: its memory must grow by at least one
  hidden state per step between the shortest and the longest sequence (otherwise the measurement
  cannot see growth at all). The online algorithms must stay flat in T: their working memory may not
  grow by more than a few percent.
"""

from __future__ import annotations

import concurrent.futures
import gc
import os
import tempfile
import time

import jax
import pytest

import braintrace

from . import _models as M
from ._config import SETTINGS, scale_of, seconds_left
from ._memory import measure, run_subprocess
from ._timing import BackendPairs

RNNS = ("dense", "csr", "lora")
ONLINE = ("d_rtrl", "pp_prop")
BACKENDS = ("xla", "pallas")

E2E = {
    "gpu": [(w, a, b) for w in RNNS for a in ONLINE for b in BACKENDS]
    + [("lora", "d_rtrl_factored", b) for b in BACKENDS]
    + [(w, "d_rtrl_bf16", "pallas") for w in RNNS]
    + [(w, a, b) for w in ("snn", "snn_b1") for a in ("pp_prop", "pp_prop_solve32") for b in BACKENDS]
    + [("csr", "pp_prop_solve32", b) for b in BACKENDS],
    "cpu": [(w, a, "xla") for w in RNNS for a in ONLINE]
    + [("lora", "d_rtrl_factored", "xla"), ("dense", "d_rtrl_bf16", "xla"), ("snn", "pp_prop", "xla")]
    + [("snn", "pp_prop_solve32", "xla")]
    + [("dense", "d_rtrl", "pallas")],
}
MEMORY_ALGORITHMS = ("bptt",) + ONLINE
#: The CPU smoke run sends this one memory configuration through a subprocess too.
CPU_SUBPROCESS_JOB = ("dense", "bptt")


def pytest_generate_tests(metafunc):
    scale = scale_of(metafunc.config)
    name = metafunc.function.__name__
    if name == "test_online_step":
        metafunc.parametrize("workload,algorithm,backend", E2E[scale], ids=["-".join(p) for p in E2E[scale]])
    elif name == "test_bptt_step":
        metafunc.parametrize("workload", RNNS)
    elif name == "test_memory":
        params = [(w, a, T) for w in RNNS for a in MEMORY_ALGORITHMS for T in SETTINGS[scale]["memory_T"]]
        metafunc.parametrize("workload,algorithm,T", params, ids=[f"{w}-{a}-T{T}" for w, a, T in params])
    elif name == "test_memory_scaling":
        params = [(w, a) for w in RNNS for a in MEMORY_ALGORITHMS]
        metafunc.parametrize("workload,algorithm", params, ids=[f"{w}-{a}" for w, a in params])


# --------------------------------------------------------------------------------------------------
# Time per step
# --------------------------------------------------------------------------------------------------

#: The most recent (spec, algorithm, backend) -> run function; one kept at a time (device memory).
_RUNNERS: dict = {}
#: The gradients of an (spec, algorithm) pair's first backend, until the second one has run.
_PAIRS = BackendPairs()


def _runner(s, algorithm, backend):
    key = (s, algorithm, backend)
    if key not in _RUNNERS:
        _RUNNERS.clear()
        gc.collect()
        _RUNNERS[key] = M.bptt_fn(s) if algorithm == "bptt" else M.online_fn(s, algorithm)
    return _RUNNERS[key]


def _time_steps(benchmark, settings, s, algorithm, backend, mode):
    overrides = settings["e2e_T_overrides"]
    T = overrides.get(f"{s.name}/{algorithm}", overrides.get(s.name, settings["e2e_T"]))
    rounds = settings["e2e_rounds"]
    run = _runner(s, algorithm, backend)
    xs, ys = M.make_data(s, T)
    jax.block_until_ready(run(xs, ys))  # compile
    benchmark.group = "e2e"
    benchmark.name = f"{algorithm}[{s.label}, {backend}]"
    out = benchmark.pedantic(
        lambda: jax.block_until_ready(run(xs, ys)), rounds=rounds, iterations=1, warmup_rounds=1
    )
    if benchmark.stats is None:  # --benchmark-disable
        return
    seconds = benchmark.stats.stats.median / T
    benchmark.extra_info.update(_PAIRS.record((s, algorithm), backend, seconds, out))
    benchmark.extra_info.update(
        {
            "kind": "e2e",
            "workload": s.name,
            "label": s.label,
            "algorithm": algorithm,
            "backend": backend,
            "mode": mode,
            "batch": s.batch,
            "n_hid": s.n_hid,
            "nnz": s.nnz,
            "T": T,
            "us_per_step": seconds * 1e6,
            "steps_per_s": 1.0 / seconds,
        }
    )


def test_online_step(benchmark, settings, scale, interpret, workload, algorithm, backend):
    s = M.spec(workload, scale)
    use_interpret = backend == "pallas" and interpret
    braintrace.set_backend(backend, interpret=use_interpret)
    mode = "reference" if backend == "xla" else ("interpret" if use_interpret else "compiled")
    _time_steps(benchmark, settings, s, algorithm, backend, mode)


def test_bptt_step(benchmark, settings, scale, workload):
    _time_steps(benchmark, settings, M.spec(workload, scale), "bptt", "xla", "reference")


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


class MemoryJobs:
    """All memory configurations of the session.

    On the GPU every configuration runs in a subprocess of its own; ``memory_workers`` of them
    compile at once, their device work serialized by a lock file. Jobs that would start after the
    session's time budget is spent are recorded as skipped. On a CPU the configurations are measured
    in this process (the compiled analysis is per program), except ``CPU_SUBPROCESS_JOB``.
    """

    def __init__(self, scale: str, subprocesses: bool | None = None):
        self.scale = scale
        self.settings = SETTINGS[scale]
        self.Ts = tuple(self.settings["memory_T"])
        fd, self.lock = tempfile.mkstemp(prefix="braintrace-bench-", suffix=".lock")
        os.close(fd)
        self.futures = {}
        self.results = {}
        self.pool = None
        if subprocesses if subprocesses is not None else scale == "gpu":
            self.pool = concurrent.futures.ThreadPoolExecutor(self.settings["memory_workers"])
            # shortest sequences first: if the budget runs out, the long ones are what is skipped
            for T in self.Ts:
                for w in RNNS:
                    for a in MEMORY_ALGORITHMS:
                        self.futures[(w, a, T)] = self.pool.submit(self._subprocess, w, a, T)

    def _subprocess(self, workload, algorithm, T):
        s = M.spec(workload, self.scale)
        row = {
            "kind": "memory",
            "workload": workload,
            "label": s.label,
            "algorithm": algorithm,
            "T": T,
            "batch": s.batch,
            "n_hid": s.n_hid,
            "backend": "xla",
            "data_bytes": M.data_bytes(s, T),
        }
        left = seconds_left(self.scale)
        if left < (30 if T >= 10000 else 15):
            budget = self.settings["budget_s"]
            return {
                **row,
                "status": "skipped",
                "message": f"skipped: the session's {budget:.0f} s budget is spent",
            }
        job = {"workload": workload, "algorithm": algorithm, "T": T, "scale": self.scale, "lock": self.lock}
        return {**row, **run_subprocess(job, timeout=min(self.settings["memory_timeout_s"], left))}

    def result(self, workload, algorithm, T) -> dict:
        key = (workload, algorithm, T)
        if key in self.futures:
            return self.futures[key].result()
        if key not in self.results:
            if (workload, algorithm) == CPU_SUBPROCESS_JOB and T == self.Ts[0]:
                self.results[key] = self._subprocess(workload, algorithm, T)
            else:
                self.results[key] = measure(workload, algorithm, T, self.scale)
        return self.results[key]

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        os.unlink(self.lock)


@pytest.fixture(scope="module")
def memory_jobs(scale):
    _RUNNERS.clear()  # free the timing runs' traces before the memory runs start
    gc.collect()
    jobs = MemoryJobs(scale)
    yield jobs
    jobs.close()


def test_memory(benchmark, memory_jobs, workload, algorithm, T):
    start = time.perf_counter()
    r = memory_jobs.result(workload, algorithm, T)
    benchmark.group = "memory"
    benchmark.name = f"memory {algorithm}[{r.get('label', workload)}, T={T}]"
    benchmark.extra_info.update({k: v for k, v in r.items() if k != "traceback"})
    benchmark.extra_info["wait_s"] = time.perf_counter() - start
    # The timing stats of a memory row are meaningless (one no-op call): the row is there for its
    # extra_info; `us_per_step` inside it is the configuration's own timed run.
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    if r["status"] == "error":
        pytest.fail(f"{workload}/{algorithm}/T={T}: {r.get('message')}\n{r.get('traceback', '')}")


def _metric_pairs(lo, hi, metrics):
    return [(m, lo[m], hi[m]) for m in metrics if lo.get(m) is not None and hi.get(m) is not None]


def test_memory_scaling(memory_jobs, workload, algorithm):
    Ts = memory_jobs.Ts
    results = [memory_jobs.result(workload, algorithm, T) for T in Ts]
    ok = [r for r in results if r["status"] == "ok"]
    if algorithm == "bptt" and ok and any(r["status"] == "oom" and r["T"] > ok[-1]["T"] for r in results):
        return  # out of memory at a longer sequence: growth shown
    if len(ok) < 2:
        pytest.skip(f"fewer than two sequence lengths measured: {[(r['T'], r['status']) for r in results]}")
    lo, hi = ok[0], ok[-1]
    s = M.spec(workload, memory_jobs.scale)
    if algorithm == "bptt":
        # the control: at least one hidden state of float32 kept per step
        need = (hi["T"] - lo["T"]) * s.batch * s.n_hid * 4
        pairs = _metric_pairs(lo, hi, ("temp_bytes", "peak_bytes"))
        assert pairs, "no memory figure to compare"
        for metric, a, b in pairs:
            assert b - a >= need, (
                f"BPTT {metric} grew by {b - a} bytes from T={lo['T']} to T={hi['T']}; at least {need} "
                f"expected (one hidden state per step): the measurement does not see memory growth"
            )
    else:
        if lo.get("temp_bytes") is not None and hi.get("temp_bytes") is not None:
            a, b = lo["temp_bytes"], hi["temp_bytes"]
            assert b - a <= 0.05 * a + (1 << 20), (
                f"{algorithm} temp_bytes grew from {a} (T={lo['T']}) to {b} (T={hi['T']}): not flat in T"
            )
        if lo.get("peak_bytes") is not None and hi.get("peak_bytes") is not None:
            # the sequences themselves (inputs, targets, per-step losses) grow with T whatever the algorithm
            a = lo["peak_bytes"] - lo["data_bytes"] - 4 * lo["T"]
            b = hi["peak_bytes"] - hi["data_bytes"] - 4 * hi["T"]
            assert b - a <= 0.25 * a + (64 << 20), (
                f"{algorithm} peak memory without the sequences grew from {a} (T={lo['T']}) to {b} "
                f"(T={hi['T']}): not flat in T"
            )
