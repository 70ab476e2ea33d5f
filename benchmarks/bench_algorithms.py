"""The online-learning algorithms side by side: one row per (task, algorithm) of
``benchmarks/_algorithm_tasks.py``.

Each benchmark trains the task's network with the algorithm (one optimizer step per sequence) and
records, in ``extra_info``, the held-out accuracy, the gradient cosine to BPTT at initialisation, the
compiled temporary memory of a training sequence and the time per step; the timed call is one
training iteration. The smoke run (no ``--gpu``) trains the tiny sizes for two iterations with one
seed, every algorithm on the GRU task, without the held-out evaluation: it checks that every
algorithm trains and that its figures are well formed (``--gpu`` runs every pair at the CPU sizes). The
table of ``docs/algorithms.md`` comes from ``python ci/compare_algorithms.py`` (CPU sizes, three
seeds, hundreds of iterations).
"""

from __future__ import annotations

import math

from . import _algorithm_tasks as A
from ._config import scale_of

ALL = [(task, alg) for task in A.TASKS for alg in A.ALGORITHMS]
SMOKE = [("recall_gru", alg) for alg in A.ALGORITHMS]


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ == "test_algorithm_row":
        cases = ALL if scale_of(metafunc.config) == "gpu" else SMOKE
        metafunc.parametrize("task,algorithm", cases, ids=[f"{t}-{a}" for t, a in cases])


def test_algorithm_row(benchmark, request, task, algorithm):
    size = "cpu" if scale_of(request.config) == "gpu" else "tiny"
    cfg = A.SIZES[size][task]
    seeds = (0, 1, 2) if size == "cpu" else (0,)
    benchmark.group = "algorithms"
    benchmark.name = f"{algorithm}[{task}]"
    evaluate = size == "cpu"
    row = benchmark.pedantic(lambda: A.run_row(cfg, algorithm, seeds, evaluate), rounds=1, iterations=1)
    assert (0.0 <= row["accuracy_mean"] <= 1.0) if evaluate else math.isnan(row["accuracy_mean"])
    cosine = row["grad_cosine_to_bptt"]
    assert math.isfinite(cosine) and -1.0 - 1e-6 <= cosine <= 1.0 + 1e-6
    assert row["temp_bytes"] >= 0 and row["us_per_step"] > 0
    benchmark.extra_info.update({"kind": "algorithm_row", **row})
