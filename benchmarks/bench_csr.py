"""CSR kernels against their XLA references.

* D-RTRL trace of a CSR layer in the kernel layout ``(nnz, n, B)``: update, solve, update + solve.
  Bytes that must move: the trace read (and, for an update, written)
  once, ``rows``/``cols`` read once, every per-unit vector (``d``, ``x``, ``df``, ``ct``) read once,
  ``dw`` written once. GPU sizes up to a 430 MB trace (8192 x 8192 at 5%, batch 32).
* The layer's products: ``csr_matmul`` (forward), ``csr_matmul_transpose`` (its gradient in ``x``)
  and ``csr_sddmm`` (the weight gradient, also the pp_prop solve).
"""

from ._config import scale_of
from ._ops import cached_cases, op_params

TRACE_OPS = ("csr_trace_update", "csr_trace_solve", "csr_trace_update_solve")
MATMUL_OPS = ("csr_matmul", "csr_matmul_transpose", "csr_sddmm")
TRACE_SIZES = {
    "gpu": [
        {"B": 8, "I": 1024, "O": 1024, "density": 0.05, "n": 1},  # 52k non-zeros, 1.7 MB
        {"B": 32, "I": 4096, "O": 4096, "density": 0.05, "n": 1},  # 839k non-zeros, 107 MB
        {"B": 32, "I": 4096, "O": 4096, "density": 0.05, "n": 2},  # 215 MB
        {"B": 32, "I": 8192, "O": 8192, "density": 0.05, "n": 1},  # 3.4M non-zeros, 430 MB
    ],
    "cpu": [{"B": 2, "I": 64, "O": 64, "density": 0.1, "n": 1}],
}
MATMUL_SIZES = {
    "gpu": [
        {"B": 8, "I": 1024, "O": 1024, "density": 0.05},
        {"B": 32, "I": 4096, "O": 4096, "density": 0.05},
        # 256 rows, as 32 steps of batch 8 stacked by etrace_grad(..., solve_every=32): csr_sddmm
        # walks four lane blocks in each program
        {"B": 256, "I": 4096, "O": 4096, "density": 0.05},
    ],
    "cpu": [{"B": 2, "I": 64, "O": 64, "density": 0.1}],
}


def pytest_generate_tests(metafunc):
    if {"size", "op", "backend"} <= set(metafunc.fixturenames):
        scale = scale_of(metafunc.config)
        if metafunc.function.__name__ == "test_csr_trace":
            params = op_params(TRACE_SIZES[scale], TRACE_OPS)
        else:
            params = op_params(MATMUL_SIZES[scale], MATMUL_OPS)
        metafunc.parametrize("size,op,backend", params)


def test_csr_trace(op_benchmark, kernels, interpret, size, op, backend):
    op_benchmark(cached_cases("csr", kernels, interpret, size)[op], backend, "csr")


def test_csr_matmul(op_benchmark, kernels, interpret, size, op, backend):
    op_benchmark(cached_cases("csr_matmul", kernels, interpret, size)[op], backend, "csr_matmul")
