"""Run settings of the two scales: ``cpu`` (the smoke run of ``pytest benchmarks``) and ``gpu``
(``pytest benchmarks --gpu``, the real sizes, planned to finish in under 8 minutes on an H100).

Times are medians of ``rounds`` runs; each run is ``iters`` kernel calls (op benchmarks) or ``T``
online-learning steps (end to end) inside one jitted loop. ``BENCH_BUDGET_S`` overrides the budget.
"""

from __future__ import annotations

import os
import time

__all__ = ["SETTINGS", "scale_of", "SESSION_START", "seconds_left"]

SETTINGS = {
    "gpu": {
        "op_iters": 50,
        "op_rounds": 5,
        # steps per timed call: long enough that the call's fixed cost (about 0.5 ms of Python dispatch
        # in brainstate's jit) is under 1 us per step for the RNNs and under 1% for the spiking network
        "e2e_T": 500,
        # exceptions, by workload or "workload/algorithm": the spiking network's step is long enough
        # at 100; BPTT on the CSR RNN keeps a (batch, nnz) residual per step (108 MB, see
        # docs/performance.md), 11 GB at T = 100
        "e2e_T_overrides": {"snn": 100, "csr/bptt": 100},
        "e2e_rounds": 3,
        "memory_T": (100, 1000, 10000),
        "memory_workers": 4,  # subprocesses compiling at once; their GPU runs are serialized by a lock
        "memory_timeout_s": 240,
        # wall-clock budget of the session: benchmarks that would start later are skipped (and listed
        # in the JSON's machine_info); memory jobs are also cut off at it
        "budget_s": float(os.environ.get("BENCH_BUDGET_S", 420)),
    },
    "cpu": {
        "op_iters": 2,
        "op_rounds": 2,
        "e2e_T": 8,
        "e2e_T_overrides": {},
        "e2e_rounds": 2,
        "memory_T": (8, 64),
        "memory_workers": 1,
        "memory_timeout_s": 120,
        "budget_s": float(os.environ.get("BENCH_BUDGET_S", 600)),
    },
}

#: When the benchmark session started (``time.monotonic``); set again by ``pytest_configure``.
SESSION_START = [time.monotonic()]


def scale_of(config) -> str:
    """``'gpu'`` under ``--gpu``, else ``'cpu'``."""
    return "gpu" if config.getoption("gpu", default=False) else "cpu"


def seconds_left(scale: str) -> float:
    """Seconds left of the session's wall-clock budget."""
    return SETTINGS[scale]["budget_s"] - (time.monotonic() - SESSION_START[0])
