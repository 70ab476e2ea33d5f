"""The benchmarked online steps, lowered for CUDA under ``'pallas'``, launch the fused Triton kernels.

Lowering for another platform needs no GPU: here the jitted ``etrace_grad`` of each end-to-end
benchmark workload (``benchmarks/_models.py``, at the GPU sizes) is lowered for ``cuda`` and the
Triton kernels in the program are listed. This checks on any machine what the GPU run relies on: which
kernel each trace and each sparse product dispatches to, that every trace is updated and solved in
one kernel per step, and that no XLA operation inside the step produces a trace-sized array (the
trace is read and written by its kernel only). The per-step API (``alg(x)`` under
``brainstate.transform.grad``) is lowered the same way on the models of
``tests/test_backend_algorithms.py``. Whether the kernels compile and what they compute is checked on
the GPU (``tests/gpu``) and in interpret mode (``tests/test_backend_algorithms.py``).
"""

from __future__ import annotations

import collections
import pathlib
import re
import sys
import warnings

import brainstate
import jax
import jax.numpy as jnp
import pytest
from test_backend_algorithms import B, H, I, _Model

import braintrace
from braintrace._kernel_import import kernel_module

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import _models as models  # noqa: E402

FUSED = "dense_trace_update_solve"

# workload, algorithm, scale -> the Triton kernels of one step (a multiset).
EXPECTED = {
    # W_rec's trace: the fused update+solve. W_in's and the bias's traces are small with one state
    # per unit: XLA's fusion of the reference (the kernel would split the batch into partial sums).
    ("dense", "d_rtrl", "gpu"): {FUSED: 1},
    ("dense", "d_rtrl_bf16", "gpu"): {FUSED: 1},
    # pp_prop's dense traces are per-unit vectors: XLA's fusions, no kernel.
    ("dense", "pp_prop", "gpu"): {},
    # The sparse product (non-zeros in column order) and the CSR trace; W_in and the bias as in (a).
    ("csr", "d_rtrl", "gpu"): {"csr_segment_sum": 1, "csr_trace_update_solve": 1},
    # pp_prop's sparse weight gradient is the SDDMM.
    ("csr", "pp_prop", "gpu"): {"csr_segment_sum": 1, "csr_sddmm": 1},
    # The exact LoRA trace E (1024 x 1024 per row); A's (16 x 1024), W_in's and the bias's are small.
    ("lora", "d_rtrl", "gpu"): {FUSED: 1},
    ("lora", "d_rtrl_bf16", "gpu"): {FUSED: 1},
    # The factored option keeps only A's trace exact: no large trace is left.
    ("lora", "d_rtrl_factored", "gpu"): {},
    ("lora", "pp_prop", "gpu"): {},
    # The spiking network (small size: the kernel choice does not depend on it).
    ("snn", "pp_prop", "cpu"): {"csr_segment_sum": 1, "csr_sddmm": 1},
}

# The per-step API (``alg(x)`` under ``brainstate.transform.grad``) on the two-state model of the
# backend tests: the update runs in the forward pass and the solve in the backward pass, so each
# trace gets an update kernel and a solve kernel (W_in, bias and the recurrence).
PER_STEP_EXPECTED = {
    ("dense", "d_rtrl"): {"dense_trace_update": 3, "dense_trace_solve": 3},
    ("csr", "d_rtrl"): {
        "dense_trace_update": 2,
        "dense_trace_solve": 2,
        "csr_trace_update": 1,
        "csr_trace_solve": 1,
    },
    ("csc", "d_rtrl"): {
        "csr_segment_sum": 1,
        "dense_trace_update": 2,
        "dense_trace_solve": 2,
        "csr_trace_update": 1,
        "csr_trace_solve": 1,
    },
    ("lora", "d_rtrl"): {"dense_trace_update": 4, "dense_trace_solve": 4},
    # A pattern in row order keeps XLA's product; in column order it is the segment sum.
    ("csr", "pp_prop"): {"csr_sddmm": 1},
    ("csc", "pp_prop"): {"csr_segment_sum": 1, "csr_sddmm": 1},
}


# The largest trace of each workload (float32 runs), as the leading dimensions of its array type in
# any layout the step could give it: inside the step its kernel must be its only producer.
TRACE_TYPES = {
    "dense": ("64x512x512x",),  # (B, I, O, n) or (B, I, O)
    "csr": ("839680x1x32x", "839680x32x", "32x839680x"),  # (nnz, n, B), (nnz, B), (B, nnz)
    "lora": ("64x1024x1024x",),
}


def _lowered_for_cuda(workload: str, algorithm: str, scale: str) -> str:
    """The jitted ``etrace_grad`` of a benchmark workload, lowered for CUDA under the current backend."""
    s = models.spec(workload, scale)
    xs = jax.ShapeDtypeStruct((3, s.batch, s.n_in), jnp.float32)
    ys = jax.ShapeDtypeStruct((3, s.batch, s.n_out), jnp.float32)
    with kernel_module("triton_calls").cuda_target():  # the graph is compiled in it too
        run = models.online_fn(s, algorithm)
        return run.trace(xs, ys).lower(lowering_platforms=("cuda",)).as_text()


def _per_step_lowered_for_cuda(kind: str, algorithm: str) -> str:
    """One jitted step of the per-step API on the backend tests' model, lowered for CUDA."""
    with kernel_module("triton_calls").cuda_target():  # the graph is compiled in it too
        model = _Model(kind)
        brainstate.nn.init_all_states(model, batch_size=B)
        alg = braintrace.D_RTRL(model) if algorithm == "d_rtrl" else braintrace.pp_prop(model, 0.6)
        x, y = jnp.zeros((B, I)), jnp.zeros((B, H))
        alg.compile_graph(x)
        params = model.states(brainstate.ParamState)

        def step(x, y):
            return brainstate.transform.grad(lambda: jnp.sum((alg(x) - y) ** 2), params)()

        traced = brainstate.transform.jit(step).trace(x, y)
        return traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.fixture(scope="module")
def pallas_programs():
    """Every program checked here, lowered in one stay under ``'pallas'`` (switching the backend
    clears JAX's caches, so the switches are kept to one there and one back)."""
    with warnings.catch_warnings():
        # Without a GPU, 'pallas' warns that it computes with the references; lowering for CUDA still
        # takes the kernels.
        warnings.filterwarnings("ignore", message=".*needs a CUDA GPU.*")
        with braintrace.backend("pallas"):
            online = {key: _lowered_for_cuda(*key) for key in EXPECTED}
            per_step = {key: _per_step_lowered_for_cuda(*key) for key in PER_STEP_EXPECTED}
    return online, per_step


def _triton_kernels(text: str) -> collections.Counter:
    """The kernel names of the Triton custom calls in a lowered module."""
    return collections.Counter(call.name for call in kernel_module("triton_calls").triton_calls(text))


def _producers_of(text: str, prefixes) -> collections.Counter:
    """Operations (other than function calls, returns and loops) whose result type starts with one
    of ``prefixes``."""
    found = collections.Counter()
    for line in text.splitlines():
        result_type = line.split("->")[-1].split(":")[-1]
        if "=" not in line or not any(f"tensor<{p}" in result_type for p in prefixes):
            continue
        op = re.search(r"= (stablehlo\.custom_call @[\w$.]+|stablehlo\.[a-z_]+)", line)
        if op and op.group(1) != "stablehlo.while":
            found[op.group(1)] += 1
    return found


@pytest.mark.parametrize("workload,algorithm,scale", list(EXPECTED), ids=lambda v: str(v))
def test_each_trace_and_sparse_product_dispatches_to_its_kernel(pallas_programs, workload, algorithm, scale):
    text = pallas_programs[0][workload, algorithm, scale]
    assert _triton_kernels(text) == collections.Counter(EXPECTED[workload, algorithm, scale])
    if algorithm == "d_rtrl_bf16":  # the traces are stored in bfloat16
        kernel_lines = [line for line in text.splitlines() if "xla.gpu.triton" in line]
        assert all("bf16>" in line for line in kernel_lines)
    if algorithm == "d_rtrl" and workload in TRACE_TYPES:
        # One pass per step: the kernel is the trace's only writer besides its initial zeros.
        producers = _producers_of(text, TRACE_TYPES[workload])
        assert producers == collections.Counter(
            {"stablehlo.custom_call @__gpu$xla.gpu.triton": 1, "stablehlo.broadcast_in_dim": 1}
        ), producers


@pytest.mark.parametrize("workload", sorted(TRACE_TYPES))
def test_the_reference_backend_launches_no_kernel(workload):
    with braintrace.backend("xla"):
        text = _lowered_for_cuda(workload, "d_rtrl", "gpu")
    assert _triton_kernels(text) == collections.Counter()
    # The trace check above sees XLA's update: more than the initial zeros produce a trace.
    producers = _producers_of(text, TRACE_TYPES[workload])
    assert sum(producers.values()) > 1 and "stablehlo.add" in producers, producers


@pytest.mark.parametrize("kind,algorithm", list(PER_STEP_EXPECTED), ids=lambda v: str(v))
def test_per_step_api_dispatches_to_the_kernels(pallas_programs, kind, algorithm):
    text = pallas_programs[1][kind, algorithm]
    assert _triton_kernels(text) == collections.Counter(PER_STEP_EXPECTED[kind, algorithm])
