"""The online-learning algorithms side by side: one row per (task, algorithm) of
``benchmarks/_algorithm_tasks.py``.

Each benchmark trains the task's network with the algorithm (one optimizer step per sequence) and
records, in ``extra_info``, the held-out accuracy, the gradient cosine to BPTT at initialisation, the
compiled temporary memory of a training sequence and the time per step; the timed call is one
training iteration. The smoke run (no ``--gpu``) trains the tiny sizes for two iterations with one
seed: it checks that every algorithm runs on both tasks and that the figures are well formed. The
table of ``docs/algorithms.md`` comes from ``python ci/compare_algorithms.py`` (CPU sizes, three
seeds, hundreds of iterations).
"""

from __future__ import annotations

import math

import pytest

from . import _algorithm_tasks as A
from ._config import scale_of

CASES = [(task, alg) for task in A.TASKS for alg in A.ALGORITHMS]


@pytest.mark.parametrize("task,algorithm", CASES, ids=[f"{t}-{a}" for t, a in CASES])
def test_algorithm_row(benchmark, request, task, algorithm):
    size = "cpu" if scale_of(request.config) == "gpu" else "tiny"
    cfg = A.SIZES[size][task]
    seeds = (0, 1, 2) if size == "cpu" else (0,)
    benchmark.group = "algorithms"
    benchmark.name = f"{algorithm}[{task}]"
    row = benchmark.pedantic(lambda: A.run_row(cfg, algorithm, seeds=seeds), rounds=1, iterations=1)
    assert 0.0 <= row["accuracy_mean"] <= 1.0
    cosine = row["grad_cosine_to_bptt"]
    assert math.isfinite(cosine) and -1.0 - 1e-6 <= cosine <= 1.0 + 1e-6
    assert row["temp_bytes"] >= 0 and row["us_per_step"] > 0
    benchmark.extra_info.update({"kind": "algorithm_row", **row})
