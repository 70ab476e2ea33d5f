#!/usr/bin/env python3
"""The H100 program of each benchmark workload, compiled on a machine without a GPU.

Usage (from the repository root)::

    pip install "jax-cuda12-plugin==<jax version>" "jax-cuda12-pjrt==<jax version>"   # no CUDA needed
    python3 ci/gpu_program.py --json docs/_data/gpu-program.json [--hlo-dir DIR]

XLA compiles for a GPU it is only told about: the CUDA plugin builds a compile-only device from a
target description (here an H100 SXM's: 132 SMs, 50 MB of L2, compute capability 9.0) and its compiler
runs without a driver, Triton kernels included. For each workload of ``benchmarks/_models.py`` at its
GPU size, each algorithm and each backend this compiles the program ``pytest benchmarks --gpu`` times
(``etrace_grad`` over ``T`` steps in one jit, or ``jax.grad`` through a scan for BPTT) and reports

* the compiled program's memory, as XLA's GPU buffer assignment gives it (``temp`` is the working
  set; ``args`` the sequences and the states; ``out`` the gradients and, online, the new traces);
* what one step launches: the instructions of the loop body over ``T`` that run as kernels (fusions,
  GEMMs, Triton custom calls, copies), and the bytes each one must read and write (its operands and
  results, counting only the slice a dynamic slice reads and the update a dynamic update writes);
  for a program that loops over blocks of steps (``solve_every``), the work of a block counts in
  proportion.

Launches and bytes explain a measured step time (a step of many small kernels is bound by launches,
one of a few large kernels by bandwidth), and show which operations a change removed, without a
GPU. They are the program, not a timing; the GPU host runs jax 0.11.2, whose XLA may fuse slightly
differently from the version used here. Exit status 2 when the CUDA plugin is missing.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import re
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: The compile target: an H100 SXM 80 GB (the GPU host's), as XLA's GpuTargetConfig text proto.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""

#: HLO instructions that launch nothing themselves (views, tuples, constants, loop plumbing; a
#: ``while`` runs its body, whose launches are counted on their own).
NO_LAUNCH = {
    "parameter",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "constant",
    "after-all",
    "opt-barrier",
    "while",
}
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4}
_DTYPE_BYTES.update({"f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16})
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")


def gpu_device():
    """The compile-only H100 device; without the CUDA plugin, a message naming it and exit status 2."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            "h100", "cuda", target_config=H100_TARGET_CONFIG, topology="1x1x1"
        )
    except Exception as err:  # noqa: BLE001 - any failure here means the same: no CUDA plugin
        import jax

        print(
            "ci/gpu_program.py needs JAX's CUDA plugin to compile for a GPU (no GPU or driver needed): "
            f'pip install "jax-cuda12-plugin=={jax.__version__}" "jax-cuda12-pjrt=={jax.__version__}" '
            f"({type(err).__name__}: {err})",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    return topology.devices[0]


# --------------------------------------------------------------------------------------------------
# Reading the compiled HLO text
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Instr:
    name: str
    type: str  # result type text, e.g. "f32[64,512]{1,0}" or a tuple
    opcode: str
    operands: list[str]
    args: str  # the operand list's text (a parameter's number)
    attrs: str


def array_bytes(type_text: str) -> int:
    """Bytes of every array in a (possibly tuple) HLO type."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _DTYPE_BYTES[dtype]
    return total


def parse_hlo(text: str) -> dict[str, list[Instr]]:
    """``{computation name: instructions}`` of an HLO module's text; ``'ENTRY'`` names the entry too."""
    computations, current, entry = {}, None, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            header = _HEADER.match(line)
            if header:
                current = computations.setdefault(header.group(1), [])
                if line.startswith("ENTRY"):
                    entry = header.group(1)
            continue
        if line.startswith("}"):
            current = None
            continue
        match = _INSTR.match(line) if current is not None else None
        if match:
            name, type_text, opcode, rest = match.groups()
            depth = 1
            for k, ch in enumerate(rest):  # the operand list ends at the matching parenthesis
                depth += (ch == "(") - (ch == ")")
                if depth == 0:
                    args, attrs = rest[:k], rest[k + 1 :]
                    break
            else:  # unbalanced: take the rest as operands
                args, attrs = rest, ""
            operands = re.findall(r"%([\w.\-]+)", args)
            current.append(Instr(name, type_text, opcode, operands, args, attrs))
    if entry is not None:
        computations["ENTRY"] = computations[entry]
    return computations


def _called(instr: Instr, key: str) -> str | None:
    match = re.search(key + r"=%([\w.\-]+)", instr.attrs)
    return match.group(1) if match else None


def launch_bytes(instr: Instr, shapes: dict[str, str], computations) -> int:
    """Bytes a launch must read and write: operands and results, but for a fused dynamic slice only
    the slice, and for a fused in-place dynamic update only the update."""
    operand_bytes = [array_bytes(shapes.get(op, "")) for op in instr.operands]
    result_bytes = array_bytes(instr.type)
    body = computations.get(_called(instr, "calls") or "", [])
    by_name = {i.name: i for i in body}
    params = {i.name: int(i.args) for i in body if i.opcode == "parameter"}
    users = collections.defaultdict(list)
    for i in body:
        for op in i.operands:
            users[op].append(i)

    def uses_of(name):
        """``[(user, the name it reads)]``, looking through bitcasts (a relabelled view of the same
        bytes: XLA's layout assignment inserts them around a loop's stacked buffers)."""
        found = []
        for u in users.get(name, []):
            found += uses_of(u.name) if u.opcode == "bitcast" else [(u, name)]
        return found

    for pname, index in params.items():
        pairs = uses_of(pname)
        uses = [u for u, _ in pairs]
        if (
            index < len(operand_bytes)
            and uses
            and all(u.opcode == "dynamic-slice" and u.operands[0] == via for u, via in pairs)
        ):
            operand_bytes[index] = sum(array_bytes(u.type) for u in uses)
        elif (
            index < len(operand_bytes)
            and uses
            and all(u.opcode == "dynamic-update-slice" and u.operands[0] == via for u, via in pairs)
        ):
            updates = sum(array_bytes(by_name[u.operands[1]].type) for u in uses if u.operands[1] in by_name)
            operand_bytes[index] = 0  # updated in place: only the update is written
            result_bytes -= sum(array_bytes(u.type) for u in uses) - updates
    return sum(operand_bytes) + max(result_bytes, 0)


def launch_kind(instr: Instr, computations) -> str:
    """``triton:<kernel>``, ``gemm``, ``fusion``, ``copy``, or the opcode."""
    if instr.opcode == "custom-call":
        name = re.search(r'name = "([^"]+)"', instr.attrs)
        if "xla.gpu.triton" in instr.attrs and name:
            return f"triton:{name.group(1)}"
        target = re.search(r'custom_call_target="([^"]+)"', instr.attrs)
        return (
            "gemm"
            if target and "gemm" in target.group(1)
            else f"custom-call:{target.group(1) if target else '?'}"
        )
    if instr.opcode == "fusion":
        called = _called(instr, "calls") or ""
        body = computations.get(called, [])
        if "gemm" in called or any(i.opcode in ("dot", "convolution") for i in body):
            return "gemm"
        return "fusion"
    return instr.opcode


def _trip_count(instr: Instr) -> int | None:
    """A ``while``'s known trip count (XLA's ``known_trip_count`` in its backend config)."""
    match = re.search(r'"n":"(\d+)"', instr.attrs)
    return int(match.group(1)) if match else None


def step_launches(computations, T: int, block: int = 1) -> list[dict]:
    """The launches of one step, each with ``per_step``: how often it runs per step.

    ``block = 1``: the bodies of the entry's loops that run ``T`` times (BPTT has two), once per step.
    ``block = K > 1`` (``etrace_grad(..., solve_every=K)``): a loop over the ``T // K`` blocks whose
    body holds the loop over a block's ``K`` steps; the inner body runs once per step, the rest of
    the block's body once per ``K`` steps, and the loop over the ``T % K`` remaining steps (if any) in
    proportion. The remainder block's own solve runs once per program and is left out, like
    everything else outside the loops.
    """
    n_blocks, rest = divmod(T, block) if block > 1 else (T, 0)
    rows = []

    def add(body_name, per_step):
        body = computations[body_name]
        shapes = {i.name: i.type for i in body}
        for i in body:
            if i.opcode in NO_LAUNCH:
                continue
            row = {"loop": body_name, "name": i.name, "kind": launch_kind(i, computations)}
            row.update(bytes=launch_bytes(i, shapes, computations), per_step=per_step)
            rows.append(row)

    for instr in computations["ENTRY"]:
        n = _trip_count(instr) if instr.opcode == "while" else None
        if n is None:
            continue
        body_name = _called(instr, "body")
        if block == 1 and n == T:
            add(body_name, 1.0)
        elif block > 1 and n == n_blocks:
            inner = [i for i in computations[body_name] if i.opcode == "while" and _trip_count(i) == block]
            if len(inner) == 1:
                add(body_name, n_blocks / T)
                add(_called(inner[0], "body"), n_blocks * block / T)
        elif block > 1 and rest and n == rest:
            add(body_name, rest / T)
    return rows


# --------------------------------------------------------------------------------------------------
# The workloads
# --------------------------------------------------------------------------------------------------


def compile_workload(device, workload: str, algorithm: str, backend: str, T: int, scale: str = "gpu"):
    """``(spec, the compiled H100 program of one benchmark)`` (``algorithm``: ``'bptt'`` or a key of
    ``benchmarks._models.ALGORITHMS``)."""
    import jax

    import braintrace
    from benchmarks import _models as M

    s = M.spec(workload, scale)
    with warnings.catch_warnings(), braintrace.backend(backend):
        # Without a GPU, 'pallas' warns that it computes with the references; compiling for the
        # GPU device still takes the kernels.
        warnings.simplefilter("ignore")
        return s, M.compiled_program(s, algorithm, T, jax.sharding.SingleDeviceSharding(device))


def analyse(device, workload, algorithm, backend, T, scale="gpu", hlo_dir=None) -> dict:
    start = time.perf_counter()
    s, compiled = compile_workload(device, workload, algorithm, backend, T, scale)
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    if hlo_dir is not None:
        hlo_dir.mkdir(parents=True, exist_ok=True)
        (hlo_dir / f"{workload}-{algorithm}-{backend}-T{T}.hlo.txt").write_text(text)
    from benchmarks import _models as M

    block = M.ETRACE_GRAD_OPTIONS.get(algorithm, {}).get("solve_every", 1)
    launches = step_launches(parse_hlo(text), T, block)
    return {
        "workload": workload,
        "label": s.label,
        "algorithm": algorithm,
        "backend": backend,
        "T": T,
        "solve_every": block,
        "temp_bytes": int(memory.temp_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "step_launches": round(sum(r["per_step"] for r in launches), 3),
        "step_bytes": round(sum(r["bytes"] * r["per_step"] for r in launches)),
        "launches": launches,
        "compile_s": round(time.perf_counter() - start, 2),
    }


def summary(launches: list[dict]) -> str:
    """``3 triton:dense_trace_update_solve, 5 gemm, 9 fusion, ...`` (most frequent first)."""
    counts = collections.Counter(r["kind"] for r in launches)
    return ", ".join(f"{n} {kind}" for kind, n in counts.most_common())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["dense", "csr", "lora"])
    parser.add_argument("--algorithms", nargs="+", default=["d_rtrl", "d_rtrl_factored", "pp_prop", "bptt"])
    parser.add_argument("--backends", nargs="+", default=["pallas", "xla"])
    parser.add_argument("--T", nargs="+", type=int, default=[100])
    parser.add_argument("--scale", choices=["gpu", "cpu"], default="gpu", help="model sizes (default: gpu)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows to this file")
    parser.add_argument("--hlo-dir", type=pathlib.Path, help="keep each compiled program's HLO text here")
    parser.add_argument("--launches", action="store_true", help="print every launch of a step")
    args = parser.parse_args(argv)
    # A compile-only GPU: JAX itself must not try to use a CUDA device. Set here, not at import, so
    # that a program on a GPU host can import this module's HLO reader without losing its GPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    device = gpu_device()
    rows = []
    print(
        f"{'workload':40s} {'algorithm':16s} {'backend':7s} {'T':>6s} {'temp MB':>9s} {'args MB':>8s} "
        f"{'out MB':>8s} {'launches':>8s} {'step MB':>8s}  kinds"
    )
    for workload in args.workloads:
        for algorithm in args.algorithms:
            if algorithm == "d_rtrl_factored" and workload != "lora":
                continue  # the option changes only LoRA layers
            for backend in args.backends if algorithm != "bptt" else ["xla"]:
                for T in args.T:
                    row = analyse(device, workload, algorithm, backend, T, args.scale, args.hlo_dir)
                    rows.append(row)
                    mb = lambda key: row[key] / 1e6  # noqa: E731
                    print(
                        f"{row['label']:40s} {algorithm:16s} {backend:7s} {T:6d} {mb('temp_bytes'):9.1f} "
                        f"{mb('argument_bytes'):8.1f} {mb('output_bytes'):8.1f} {row['step_launches']:8.2f} "
                        f"{mb('step_bytes'):8.1f}  {summary(row['launches'])}",
                        flush=True,
                    )
                    if args.launches:
                        for r in row["launches"]:
                            print(
                                f"    {r['kind']:34s} {r['bytes'] / 1e6:9.3f} MB"
                                f" x {r['per_step']:.3g}  {r['name']}"
                            )
    if args.json is not None:
        import jax

        meta = {
            "target": "NVIDIA H100 80GB HBM3 (compile only)",
            "jax": jax.__version__,
            "command": " ".join(["python3", "ci/gpu_program.py", *sys.argv[1:]]),
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
