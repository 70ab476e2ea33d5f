"""Data-parallel online learning on host CPU devices: run by ``tests/test_sharding.py`` in a
subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax starts).

For each workload (dense, CSR, LoRA RNNs and the LIF network of ``benchmarks/_models.py`` at batch
8) and algorithm (D_RTRL, pp_prop), ``etrace_grad`` runs on batch-sharded sequences
(``NamedSharding(mesh, P(None, 'batch', None))``) over meshes of 1, 2, 4 and 8 devices. Prints one
JSON line per case: the normwise relative difference of the gradients to the unsharded run, whether
the traces and hidden states the learner keeps are sharded along the batch afterwards, the
per-device bytes of the traces, and the number of all-reduces in the compiled program at two
sequence lengths.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import braintrace
from benchmarks import _models as M

BATCH = 8


def _learner(s, algorithm):
    with brainstate.environ.context(dt=M.DT), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = M.build_model(s, 0)
        name, options = M.ALGORITHMS[algorithm]
        learner = braintrace.compile(model, name, jnp.zeros((s.batch, s.n_in)), batch_size=s.batch, **options)
    return model, learner


def _run(s, algorithm, xs, ys, hlo_lengths=()):
    model, learner = _learner(s, algorithm)
    loss = M.step_fn(s)
    fn = brainstate.transform.jit(lambda xs, ys: learner.etrace_grad(xs, ys, step_fn=loss))
    with brainstate.environ.context(dt=M.DT):
        grads = fn(xs, ys)
        hlo = {T: fn.lower(xs[:T], ys[:T]).compile().as_text() for T in hlo_lengths}
    return model, learner, grads, hlo


def _flat(g):
    leaves = jax.tree.leaves([v for _, v in sorted(g.items(), key=lambda kv: str(kv[0]))])
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in leaves])


def _batch_sharded(x, n_dev):
    sh = getattr(x, "sharding", None)
    if sh is None or n_dev == 1:
        return True
    spec = getattr(sh, "spec", None)
    return spec is not None and any(p == "batch" for p in spec)


def main(cases, backend="xla", hlo_lengths=(3, 6)):
    """``cases``: ``[(workload, algorithm, [device counts])]``. The compiled program's collectives
    are counted at two sequence lengths on the largest mesh of each case."""
    interpret = backend == "pallas"
    braintrace.set_backend(backend, **({"interpret": True} if interpret else {}))
    for w, a, device_counts in cases:
        s = dataclasses.replace(M.spec(w, "cpu"), batch=BATCH)
        xs, ys = M.make_data(s, 6)
        _, _, ref, _ = _run(s, a, xs, ys)
        ref = _flat(ref)
        for n in device_counts:
            mesh = Mesh(np.array(jax.devices()[:n]), ("batch",))
            shard = NamedSharding(mesh, P(None, "batch", None))
            lengths = hlo_lengths if n == max(device_counts) else ()
            xs_n, ys_n = jax.device_put(xs, shard), jax.device_put(ys, shard)
            model, learner, grads, hlo = _run(s, a, xs_n, ys_n, lengths)
            err = float(np.linalg.norm(_flat(grads) - ref) / max(np.linalg.norm(ref), 1e-30))
            traces = [st.value for st in learner.states(braintrace.EligibilityTrace).values()]
            trace_leaves = [x for t in traces for x in jax.tree.leaves(t) if np.ndim(x) > 0]
            batched = [x for x in trace_leaves if BATCH in np.shape(x)]
            per_device = sum(x.addressable_shards[0].data.nbytes for x in trace_leaves)
            total = sum(x.nbytes for x in trace_leaves)
            hidden = [st.value for st in model.states(brainstate.HiddenState).values()]
            count = lambda pattern: {T: len(re.findall(pattern, h)) for T, h in hlo.items()}  # noqa: E731
            row = {
                "workload": w,
                "algorithm": a,
                "backend": backend,
                "devices": n,
                "rel_err": err,
                "traces_batch_sharded": all(_batch_sharded(x, n) for x in batched),
                "hidden_batch_sharded": all(_batch_sharded(x, n) for x in hidden),
                "trace_bytes_per_device": per_device,
                "trace_bytes": total,
                "all_reduce": count(r"all-reduce(?:-start)?\("),
                "all_gather": count(r"all-gather(?:-start)?\("),
            }
            print(json.dumps(row), flush=True)


def _parse(text):
    """``'dense:d_rtrl:2,4,8;csr:pp_prop:8'`` -> cases."""
    cases = []
    for item in text.split(";"):
        w, a, devices = item.split(":")
        cases.append((w, a, [int(n) for n in devices.split(",")]))
    return cases


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    main(_parse(args["cases"]), backend=args.get("backend", "xla"))
