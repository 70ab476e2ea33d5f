"""Exact LoRA D-RTRL trace kernels against their XLA references: update, solve, update + solve.

Traces ``E (B, I, O, n)`` and ``TA (B, r, O, n)`` float32; GPU sizes
up to a 268 MB ``E``. Bytes that must move: both traces read (and, for an update, written) once,
every small operand read once, ``dB`` and ``dA`` written once.
"""

from ._config import scale_of
from ._ops import cached_cases, op_params

FAMILY = "lora"
OPS = ("lora_trace_update", "lora_trace_solve", "lora_trace_update_solve")
SIZES = {
    "gpu": [
        {"B": 8, "I": 128, "O": 128, "R": 16, "n": 1},  # 0.6 MB
        {"B": 64, "I": 512, "O": 512, "R": 16, "n": 1},  # 69 MB
        {"B": 64, "I": 1024, "O": 1024, "R": 16, "n": 1},  # 273 MB
    ],
    "cpu": [{"B": 2, "I": 16, "O": 32, "R": 4, "n": 1}],
}


def pytest_generate_tests(metafunc):
    if {"size", "op", "backend"} <= set(metafunc.fixturenames):
        metafunc.parametrize("size,op,backend", op_params(SIZES[scale_of(metafunc.config)], OPS))


def test_lora_trace(op_benchmark, kernels, interpret, size, op, backend):
    op_benchmark(cached_cases(FAMILY, kernels, interpret, size)[op], backend, FAMILY)
