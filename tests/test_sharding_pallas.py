"""Data-parallel online learning under the ``'pallas'`` backend: each kernel runs per batch shard.

A Pallas kernel is a custom call that XLA's SPMD partitioner cannot look into; without a partitioning
rule, a batch-sharded ``etrace_grad`` gathers every trace to each device around every kernel. With
the rule (``braintrace/_batch_sharding.py``) each device runs the kernels on its own batch rows.

The checks on 8 host CPU devices run in a subprocess (the device count must be set before jax
starts; this file is its script, see the bottom):

- ``tests/_sharded_check.py``'s ``main`` in Pallas interpret mode, D_RTRL and pp_prop on the dense,
  CSR, LoRA and LIF workloads: gradients equal to one device's, traces and hidden states sharded
  along the batch, 1/8 of the trace bytes per device, no all-gather in the compiled program;
- single kernels under Shardy and GSPMD, on a 1-D mesh and on a 2-D mesh (batch over one or both
  axes), against the unsharded kernel;
- the CUDA programs, lowered without a GPU: each kernel call of a batch-sharded step is a
  ``CustomSPMDPartitioning`` call, and the per-device program that XLA's partitioner obtains for it
  (the partitioner's own callback, called here with the batch sharding) holds the Triton kernels on
  per-device shapes: the batch divided by 8, every other dimension whole.

In this process (one device): layouts are checked, and a one-device program keeps the plain kernel
call.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace
from braintrace import _backend
from braintrace._batch_sharding import BATCH_SUM, BatchLayout
from braintrace._compatible_imports import Primitive, ShapedArray
from tests._host_devices import run_on_host_devices

DEVICES = 8
WORKLOADS = ("dense", "csr", "lora", "snn")
ALGORITHMS = ("d_rtrl", "pp_prop")
#: Batch of the CUDA lowerings: 3 rows per device, a size no other dimension of those programs has.
CUDA_BATCH = 24


# --------------------------------------------------------------------------------------------------
# The 8-device checks (subprocess)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows():
    out = run_on_host_devices("tests.test_sharding_pallas", devices=DEVICES)
    return {
        "grad": [r for r in out if "kind" not in r],
        "kernel": [r for r in out if r.get("kind") == "kernel"],
        "cuda": [r for r in out if r.get("kind") == "cuda"],
    }


def test_batch_sharded_gradients_equal_one_device(rows):
    cases = {(r["workload"], r["algorithm"]) for r in rows["grad"]}
    assert cases == {(w, a) for w in WORKLOADS for a in ALGORITHMS}
    for row in rows["grad"]:
        assert row["backend"] == "pallas" and row["devices"] == DEVICES, row
        assert row["rel_err"] < 1e-6, row


def test_traces_and_states_stay_batch_sharded(rows):
    for row in rows["grad"]:
        assert row["traces_batch_sharded"] and row["hidden_batch_sharded"], row
        assert row["trace_bytes_per_device"] * DEVICES == row["trace_bytes"], row


def test_compiled_step_gathers_nothing(rows):
    for row in rows["grad"]:
        assert set(row["all_gather"].values()) == {0}, row  # no trace, state or kernel operand gathered
        assert 1 <= min(row["all_reduce"].values()) <= 2, row  # the gradients' batch sums


def test_kernels_per_shard_equal_the_whole_kernel(rows):
    configs = {r["config"] for r in rows["kernel"]}
    assert configs == {"shardy", "gspmd", "2d-mesh-batch", "2d-mesh-both"}
    for row in rows["kernel"]:
        assert max(row["rel_err"]) < 1e-6, row
        assert row["trace_spec"] == row["batch_spec"], row  # the new trace keeps the batch sharding
        assert row["all_gather"] == 0 and row["all_reduce"] == 1, row  # dW's one psum


def _dims(tensor_type: str) -> tuple[int, ...]:
    return tuple(int(d) for d in re.findall(r"(\d+)x", tensor_type))


def test_cuda_kernels_get_per_device_shapes(rows):
    cuda = rows["cuda"]
    assert {r["program"] for r in cuda} == {"csr:d_rtrl", "snn:pp_prop", "dense_trace_update_solve"}
    kernels = set()
    for row in cuda:
        assert row["calls"], row["program"]  # every kernel call is partitioned
        for call in row["calls"]:
            # Per-device operands: the batch axis divided by the devices, every other axis whole.
            assert len(call["global"]) == len(call["per_device"]) == len(call["batch_axes"]), call
            for g, local, axis in zip(call["global"], call["per_device"], call["batch_axes"]):
                expected = list(_dims(g))
                if axis is not None:
                    assert expected[axis] == CUDA_BATCH, call
                    expected[axis] //= DEVICES
                assert list(_dims(local)) == expected, call
            for name, types in call["triton"]:
                kernels.add(name)
                dims = [d for t in types for d in _dims(t)]
                assert CUDA_BATCH // DEVICES in dims and CUDA_BATCH not in dims, (name, types)
    assert {"csr_segment_sum", "csr_trace_update_solve", "csr_sddmm", "dense_trace_update_solve"} <= kernels


# --------------------------------------------------------------------------------------------------
# One device (this process)
# --------------------------------------------------------------------------------------------------


def test_batch_layout_normalises_and_checks_axes():
    layout = BatchLayout({2: -1, 0: 0}, (-1, BATCH_SUM))
    avals = [ShapedArray(s, jnp.float32) for s in [(4, 3), (7,), (5, 4)]]
    assert layout.operands == ((0, 0), (2, -1))
    assert layout.operand_axes(avals) == [0, None, 1]
    assert layout.result_axes(avals[2:] + avals[:1]) == [1, None]
    with pytest.raises(ValueError, match="BatchLayout.operands"):
        BatchLayout({}, (0,))
    with pytest.raises(ValueError, match="BatchLayout.results"):
        BatchLayout({0: 0}, ("mean",))
    with pytest.raises(ValueError, match="out of range"):
        BatchLayout({0: 3}, (0,)).operand_axes(avals[:1])
    with pytest.raises(ValueError, match="2 results"):
        layout.result_axes(avals[:1])
    with pytest.raises(TypeError, match="BatchLayout"):
        _backend.declare_batch_layout(Primitive("unused"), {0: 0})


def test_one_device_keeps_the_plain_kernel_call():
    from braintrace._etrace_op.dense import dense_trace_update_solve_p as p

    rng = np.random.default_rng(0)
    shapes = [(4, 5, 6, 2), (4, 6, 2, 2), (4, 5), (4, 6, 2), (4, 6, 2)]
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    reference = jax.jit(lambda *a: p.bind(*a))(*args)
    braintrace.set_backend("pallas", interpret=True)
    lowered = jax.jit(lambda *a: p.bind(*a)).lower(*args)
    assert "CustomSPMDPartitioning" not in lowered.as_text()
    out = lowered.compile()(*args)
    for o, r in zip(out, reference):
        assert float(jnp.linalg.norm(o - r) / jnp.linalg.norm(r)) < 1e-6


def test_devices_are_passed_to_the_lowering_under_pallas_only():
    from jax._src import dispatch

    from braintrace._etrace_op.dense import dense_trace_update_p
    from braintrace._etrace_op.sparse import csr_trace_update_solve_p, etp_sp_mm_p

    needs = dispatch.prim_requires_devices_during_lowering
    kernels = (dense_trace_update_p, csr_trace_update_solve_p, etp_sp_mm_p)
    assert not any(p in needs for p in kernels)
    with braintrace.backend("pallas", interpret=True):
        assert all(p in needs for p in kernels)
    assert not any(p in needs for p in kernels)


# --------------------------------------------------------------------------------------------------
# The subprocess: python -m tests.test_sharding_pallas (8 host devices)
# --------------------------------------------------------------------------------------------------


def _kernel_rows():
    """The dense update+solve kernel (two states) per shard against the whole kernel."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from braintrace._etrace_op.dense import dense_trace_update_solve_p as p

    rng = np.random.default_rng(0)
    shapes = [(16, 5, 40, 2), (16, 40, 2, 2), (16, 5), (16, 40, 2), (16, 40, 2)]
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    whole = jax.jit(lambda *a: p.bind(*a))(*args)
    devices = np.array(jax.devices()[:DEVICES])
    configs = [
        ("shardy", Mesh(devices, ("batch",)), "batch", True),
        ("gspmd", Mesh(devices, ("batch",)), "batch", False),
        ("2d-mesh-batch", Mesh(devices.reshape(4, 2), ("batch", "model")), "batch", True),
        ("2d-mesh-both", Mesh(devices.reshape(4, 2), ("batch", "model")), ("batch", "model"), True),
    ]
    for name, mesh, batch, shardy in configs:
        jax.config.update("jax_use_shardy_partitioner", shardy)
        try:
            sharded = [jax.device_put(a, NamedSharding(mesh, P(batch))) for a in args]
            fn = jax.jit(lambda *a: p.bind(*a))
            compiled = fn.lower(*sharded).compile()
            out = compiled(*sharded)
        finally:
            jax.config.update("jax_use_shardy_partitioner", True)
        text = compiled.as_text()
        spec = out[0].sharding.spec
        row = {
            "kind": "kernel",
            "config": name,
            "rel_err": [float(jnp.linalg.norm(o - w) / jnp.linalg.norm(w)) for o, w in zip(out, whole)],
            "trace_spec": str(spec[0] if len(spec) else None),
            "batch_spec": str(batch),
            "all_gather": len(re.findall(r"all-gather(?:-start)?\(", text)),
            "all_reduce": len(re.findall(r"all-reduce(?:-start)?\(", text)),
        }
        print(json.dumps(row), flush=True)


_CALL = re.compile(
    r'custom_call @CustomSPMDPartitioning\(.*backend_config = "(\d+)".*op_sharding_rule<(.*)>\} '
    r": \((.*)\) -> (.*)$"
)
_TYPE = re.compile(r"tensor<[^>]*>")
_DTYPES = {"f32": np.float32, "f64": np.float64, "i32": np.int32, "i64": np.int64, "bf16": jnp.bfloat16}


def _factor_lists(text):
    return [[f.strip() for f in group.split(",") if f.strip()] for group in re.findall(r"\[([^\]]*)\]", text)]


def _per_device_program(mesh, key, rule, operand_types, result_types):
    """What XLA's partitioner gets for one ``CustomSPMDPartitioning`` call whose batch factor is
    sharded over the mesh: ``(batch axis per operand, per-device program text)``."""
    from jax._src import custom_partitioning
    from jax._src.interpreters import mlir
    from jax._src.lib import xla_client as xc
    from jax._src.lib.mlir import ir
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    operands, results = (_factor_lists(side) for side in rule.split("{", 1)[0].split("->"))
    replicated = re.search(r"need_replication=\{([^}]*)\}", rule)
    replicated = {f.strip() for f in replicated.group(1).split(",")} if replicated else set()
    (batch,) = {f for factors in operands + results for f in factors} - replicated

    def shapes(types, factor_lists):
        out = []
        for t, factors in zip(types, factor_lists):
            *dims, dtype = t[len("tensor<") : -1].split("x")
            dims = [int(d) for d in dims]
            spec = P(*["batch" if f == batch else None for f in factors])
            sharding = NamedSharding(mesh, spec)._to_xla_hlo_sharding(len(dims))
            out.append((xc.Shape.array_shape(np.dtype(_DTYPES[dtype]), dims), sharding))
        return out

    args = shapes(operand_types, operands)
    outs = shapes(result_types, results)
    if len(outs) == 1:
        result_shape, result_sharding = outs[0]
    else:
        result_shape = xc.Shape.tuple_shape([s for s, _ in outs])
        result_sharding = xc.HloSharding.tuple_sharding(result_shape, [h for _, h in outs])
    from braintrace._kernel_import import kernel_module

    with kernel_module("triton_calls").cuda_target(mesh):  # the per-shard kernels are lowered here
        code, _, _ = custom_partitioning._custom_partitioning_partition(
            [s for s, _ in args], [h for _, h in args], result_shape, result_sharding, key.encode()
        )
    with mlir.make_ir_context():
        text = str(ir.Module.parse(code))
    axes = [factors.index(batch) if batch in factors else None for factors in operands]
    return axes, text


def _cuda_row(program, lowered, mesh):
    from braintrace_kernels.triton_calls import triton_calls

    calls = []
    for line in lowered.as_text().splitlines():
        match = _CALL.search(line)
        if not match:
            continue
        key, rule, operands, results = match.groups()
        operand_types, result_types = _TYPE.findall(operands), _TYPE.findall(results)
        axes, text = _per_device_program(mesh, key, rule, operand_types, result_types)
        signature = next(x for x in text.splitlines() if "func.func public @main" in x)
        signature = signature.split("->")[0]
        triton_lines = [x for x in text.splitlines() if "xla.gpu.triton" in x]
        names = [c.name for c in triton_calls(text)]
        triton = [[n, _TYPE.findall(x.rsplit(" : ", 1)[1])] for n, x in zip(names, triton_lines)]
        per_device = _TYPE.findall(signature)
        calls.append(
            {"global": operand_types, "batch_axes": axes, "per_device": per_device, "triton": triton}
        )
    print(json.dumps({"kind": "cuda", "program": program, "calls": calls}), flush=True)


def _cuda_rows():
    """Batch-sharded programs lowered for CUDA (compiled kernels) on the 8 CPU devices."""
    import dataclasses
    import warnings

    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from benchmarks import _models as M
    from braintrace._etrace_op.dense import dense_trace_update_solve_p as p
    from braintrace._kernel_import import kernel_module

    cuda_target = kernel_module("triton_calls").cuda_target
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'pallas' without a GPU: the CPU falls back, CUDA does not
        braintrace.set_backend("pallas")
    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("batch",))
    sequence = NamedSharding(mesh, P(None, "batch", None))
    for workload, algorithm in (("csr", "d_rtrl"), ("snn", "pp_prop")):
        s = dataclasses.replace(M.spec(workload, "cpu"), batch=CUDA_BATCH)
        xs = jax.ShapeDtypeStruct((3, s.batch, s.n_in), jnp.float32, sharding=sequence)
        ys = jax.ShapeDtypeStruct((3, s.batch, s.n_out), jnp.float32, sharding=sequence)
        with cuda_target(mesh):
            lowered = M.online_fn(s, algorithm).trace(xs, ys).lower(lowering_platforms=("cuda",))
        _cuda_row(f"{workload}:{algorithm}", lowered, mesh)
    # The dense kernel with two states per unit (the benchmark RNNs' one-state traces are small
    # enough per device that the dispatch keeps XLA's fusion there).
    rows = NamedSharding(mesh, P("batch"))
    shapes = [(CUDA_BATCH, 5, 40, 2), (CUDA_BATCH, 40, 2, 2), (CUDA_BATCH, 5), (CUDA_BATCH, 40, 2)]
    args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=rows) for s in shapes + shapes[-1:]]
    with cuda_target(mesh):
        lowered = jax.jit(lambda *a: p.bind(*a)).trace(*args).lower(lowering_platforms=("cuda",))
    _cuda_row("dense_trace_update_solve", lowered, mesh)


def _main():
    from tests._sharded_check import main

    cases = [(w, a, [DEVICES]) for w in WORKLOADS for a in ALGORITHMS]
    main(cases, backend="pallas", hlo_lengths=(6,))
    _kernel_rows()
    _cuda_rows()


if __name__ == "__main__":
    _main()
