"""Dense D-RTRL trace kernels against their XLA references: update, solve, update + solve.

Trace ``(B, I, O, n)`` float32; GPU sizes from 0.5 MB to 537 MB. Bytes that must move: the trace
read (and, for an update, written) once, ``d``, ``x``, ``df``, ``ct`` read once, ``dW`` written once.
"""

from ._config import scale_of
from ._ops import cached_cases, op_params

FAMILY = "dense"
OPS = ("dense_trace_update", "dense_trace_solve", "dense_trace_update_solve")
SIZES = {
    "gpu": [
        {"B": 8, "I": 128, "O": 128, "n": 1},  # 0.5 MB
        {"B": 64, "I": 512, "O": 512, "n": 1},  # 67 MB
        {"B": 64, "I": 512, "O": 512, "n": 2},  # 134 MB
        {"B": 64, "I": 1024, "O": 1024, "n": 1},  # 268 MB
        {"B": 128, "I": 1024, "O": 1024, "n": 1},  # 537 MB
    ],
    "cpu": [{"B": 2, "I": 16, "O": 32, "n": 1}],
}


def pytest_generate_tests(metafunc):
    if {"size", "op", "backend"} <= set(metafunc.fixturenames):
        metafunc.parametrize("size,op,backend", op_params(SIZES[scale_of(metafunc.config)], OPS))


def test_dense_trace(op_benchmark, kernels, interpret, size, op, backend):
    op_benchmark(cached_cases(FAMILY, kernels, interpret, size)[op], backend, FAMILY)
