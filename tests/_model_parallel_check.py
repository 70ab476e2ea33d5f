"""Model-parallel online learning on host CPU devices: run by ``tests/test_model_parallel.py`` in a
subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax starts).

A recurrent LIF network (``SparseLinear`` input and recurrence split into ``P`` postsynaptic blocks,
``Expon`` synapses, ``LIF`` neurons; loss on the membrane potential and the spike rate) learns under
D_RTRL and pp_prop with :func:`braintrace.shard_postsynaptic` on meshes of 1, 2, 4 and 8 devices.
Prints one JSON line per (algorithm, devices): the normwise relative difference of the weight
gradients (in the matrices' own order) to the unpartitioned network on one device (the first row
of each algorithm), whether the
traces and hidden states are still sharded after ``etrace_grad``, the per-device and total bytes of
the blocked layers' synapses (weights, row and column ids) and traces, and, on the largest mesh, the
all-gathers of the compiled program inside the scan's loop body and in all at two sequence lengths.
A last row runs D_RTRL on the largest mesh under the ``'pallas'`` backend (kernels in interpret
mode), where the blocked layers keep the XLA implementation: no kernel call, the same placement.
"""

from __future__ import annotations

import json
import re
import sys
import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u
from jax.sharding import Mesh

import braintrace
from benchmarks._models import fixed_in_degree_csr

DT = 1.0 * u.ms
N, N_IN, BATCH, K_REC, K_IN = 64, 8, 4, 8, 4
ALGORITHMS = {"d_rtrl": {}, "pp_prop": {"decay_or_rank": 0.9}}
MATRICES = {
    "inp": fixed_in_degree_csr(N_IN, N, K_IN, 1.0, 1),
    "rec": fixed_in_degree_csr(N, N, K_REC, 0.5 / np.sqrt(K_REC), 2),
}


class Net(brainstate.nn.Module):
    """``x -> SparseLinear -> Expon -> LIF`` with a recurrent ``SparseLinear`` on the spikes."""

    def __init__(self, blocks: int):
        super().__init__()
        self.inp = braintrace.nn.SparseLinear(MATRICES["inp"], postsynaptic_blocks=blocks)
        self.rec = braintrace.nn.SparseLinear(MATRICES["rec"], postsynaptic_blocks=blocks)
        self.syn = braintrace.nn.Expon(N, tau=5.0 * u.ms)
        self.lif = braintrace.nn.LIF(N, tau=10.0 * u.ms, V_th=1.0)

    def update(self, x):
        g = self.syn(self.inp(x) + self.rec(self.lif.get_spike()))
        spikes = self.lif(g)
        return spikes, self.lif.V.value


def loss(out, y):
    spikes, v = out
    return jnp.mean((v - y) ** 2) + 1e-2 * jnp.mean(spikes)


def data(T: int):
    kx, ky = jax.random.split(jax.random.key(0))
    xs = (jax.random.uniform(kx, (T, BATCH, N_IN)) < 0.3).astype(jnp.float32)
    return xs, jax.random.normal(ky, (T, BATCH, N), jnp.float32)


def run(algorithm: str, blocks: int, devices: int, lengths=(6,), hlo_lengths=()):
    """``(model, learner, gradients at the first length, {T: compiled HLO text})``."""
    with brainstate.environ.context(dt=DT), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Net(blocks)
        learner = braintrace.compile(
            model, algorithm, jnp.zeros((BATCH, N_IN)), batch_size=BATCH, **ALGORITHMS[algorithm]
        )
    if devices:
        braintrace.shard_postsynaptic(learner, Mesh(np.array(jax.devices()[:devices]), ("model",)))
    fn = brainstate.transform.jit(lambda xs, ys: learner.etrace_grad(xs, ys, step_fn=loss))
    with brainstate.environ.context(dt=DT):
        grads = fn(*data(lengths[0]))
        hlo = {T: fn.lower(*data(T)).compile().as_text() for T in hlo_lengths}
    return model, learner, grads, hlo


def source_order(model, grads):
    """Every weight gradient in its matrix's own order, concatenated (float64)."""
    parts = []
    for name in MATRICES:
        part = getattr(model, name).partition
        parts.append(np.asarray(part.to_source(grads[(name, "weight")]["weight"]), np.float64))
    return np.concatenate(parts)


def _computations(text: str):
    """``{name: body text}`` of an HLO module's computations."""
    comps, name, lines = {}, None, []
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head:
            name, lines = head.group(1), []
        elif line.startswith("}") and name:
            comps[name], name = "\n".join(lines), None
        elif name:
            lines.append(line)
    return comps


ALL_GATHER = re.compile(r"all-gather(?:-start)?\(")


def loop_all_gathers(text: str) -> int:
    """All-gathers in the body of the program's while loops, with the computations they call."""
    comps = _computations(text)
    bodies = [m.group(1) for body in comps.values() for m in re.finditer(r"body=%?([\w.\-]+)", body)]
    seen, stack, count = set(), list(bodies), 0
    while stack:
        name = stack.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        count += len(ALL_GATHER.findall(comps[name]))
        stack += re.findall(
            r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", comps[name]
        )
    return count


def _bytes(arrays):
    """``(per device, total)`` bytes: the first device's shard and the whole arrays."""
    return sum(a.addressable_shards[0].data.nbytes for a in arrays), sum(a.nbytes for a in arrays)


def _sharded(x) -> bool:
    return "model" in tuple(getattr(x.sharding, "spec", ()))


def report(backend, algorithm, n, model, learner, got, want, hlo):
    """The JSON row of one run (see the module docstring)."""
    keys = [
        k for k in learner.etrace.value if k.startswith(("r", "f"))
    ]  # D_RTRL r{i}_g{j}, pp_prop f{i}_g{j}
    blocked = [leaf for k in keys for leaf in jax.tree.leaves(learner.etrace.value[k])]
    synapses = [
        a
        for name in MATRICES
        for a in (
            getattr(model, name).weight.value["weight"],
            getattr(model, name).indices.value["row"],
            getattr(model, name).indices.value["col"],
        )
    ]
    hidden = [model.lif.V.value, model.syn.g.value]
    snapshot = [  # the compile-time values etrace_grad(reset=True) restores
        leaf
        for value in learner._initial_values
        for leaf in jax.tree.leaves(value)
        if np.ndim(leaf) and np.shape(leaf)[0] == model.rec.nnz
    ]
    learner.reset_state()  # zeroes the traces outside jit
    zeroed = [leaf for k in keys for leaf in jax.tree.leaves(learner.etrace.value[k])]
    return {
        "backend": backend,
        "algorithm": algorithm,
        "devices": n,
        "rel_err": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
        "traces_sharded": n == 1 or all(_sharded(x) for x in blocked),
        "hidden_sharded": n == 1 or all(_sharded(x) for x in hidden),
        "snapshot_sharded": n == 1 or (len(snapshot) > 0 and all(_sharded(x) for x in snapshot)),
        "reset_traces_sharded": n == 1 or all(_sharded(x) for x in zeroed),
        "trace_shapes": [list(x.shape) for x in blocked],
        "trace_bytes_per_device": _bytes(blocked)[0],
        "trace_bytes": _bytes(blocked)[1],
        "synapse_bytes_per_device": _bytes(synapses)[0],
        "synapse_bytes": _bytes(synapses)[1],
        "nnz_unpadded": int(sum(m.data.shape[0] for m in MATRICES.values())),
        "nnz_stored": int(sum(getattr(model, k).nnz for k in MATRICES)),
        "loop_all_gathers": {T: loop_all_gathers(h) for T, h in hlo.items()},
        "all_gathers": {T: len(ALL_GATHER.findall(h)) for T, h in hlo.items()},
        "custom_calls": {T: h.count("custom-call(") for T, h in hlo.items()},
    }


def main(device_counts=(2, 4, 8), hlo_lengths=(3, 6)):
    """On one device (a mesh of one, ``postsynaptic_blocks=1``: the unpartitioned network, the
    reference), then on each of ``device_counts``."""
    cases = [("xla", a, n) for a in ALGORITHMS for n in (1, *device_counts)]
    cases.append(("pallas", "d_rtrl", max(device_counts)))
    reference = {}
    for backend, algorithm, n in cases:
        lengths = hlo_lengths if n == max(device_counts) else ()
        if backend == "pallas":
            lengths = lengths[:1]
        with braintrace.backend(backend, interpret=backend == "pallas"):
            model, learner, grads, hlo = run(algorithm, n, n, hlo_lengths=lengths)
        got = source_order(model, grads)
        want = reference.setdefault(algorithm, got)
        print(json.dumps(report(backend, algorithm, n, model, learner, got, want, hlo)), flush=True)


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    counts = tuple(int(n) for n in args.get("devices", "2,4,8").split(","))
    main(counts)
