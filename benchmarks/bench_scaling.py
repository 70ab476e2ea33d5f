"""Model-parallel recurrence: steps per second of a spiking network whose sparse layers are split into
postsynaptic blocks, one per device, against the same network unpartitioned on one device.

The network is the LIF model of the benchmarks (``Linear``-free here: input and recurrence are both
``SparseLinear`` so that every ETP layer driving the neurons is partitioned, then ``Expon`` and
``LIF``; loss on the membrane potential and the spike rate). ``etrace_grad`` runs ``T`` steps in one
jitted scan; the partitioned learner is placed with :func:`braintrace.shard_postsynaptic` on a mesh
of every visible device (``P`` = their number, 1 on a CPU run). Reported: ``steps_per_s`` and
``us_per_step`` (median call), the devices, and the per-device bytes of the recurrent layer's trace.
The multi-device CPU figures (8 host devices) come from ``tests/_model_parallel_check.py``; on a
multi-GPU host ``pytest benchmarks --gpu`` runs this file on every GPU. Tiny sizes without ``--gpu``.
"""

from __future__ import annotations

import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from jax.sharding import Mesh

import braintrace

from ._models import fixed_in_degree_csr

SIZES = {
    # the (d) SNN of the end-to-end benchmarks: 50,000 neurons, 500 synapses each, batch 8
    "gpu": {"n": 50_000, "n_in": 100, "syn": 500, "syn_in": 50, "batch": 8, "T": 100},
    "cpu": {"n": 256, "n_in": 8, "syn": 16, "syn_in": 8, "batch": 2, "T": 8},
}
ALGORITHMS = {"d_rtrl": {}, "pp_prop": {"decay_or_rank": 0.9}}
DT = 1.0 * u.ms


class _PartitionedSNN(brainstate.nn.Module):
    def __init__(self, cfg, blocks):
        super().__init__()
        n = cfg["n"]
        self.inp = braintrace.nn.SparseLinear(
            fixed_in_degree_csr(cfg["n_in"], n, cfg["syn_in"], 2.0 / np.sqrt(cfg["syn_in"]), 1),
            postsynaptic_blocks=blocks,
        )
        self.rec = braintrace.nn.SparseLinear(
            fixed_in_degree_csr(n, n, cfg["syn"], 0.5 / np.sqrt(cfg["syn"]), 2), postsynaptic_blocks=blocks
        )
        self.syn = braintrace.nn.Expon(n, tau=5.0 * u.ms)
        self.lif = braintrace.nn.LIF(n, tau=10.0 * u.ms, V_th=1.0)

    def update(self, x):
        spikes = self.lif(self.syn(self.inp(x) + self.rec(self.lif.get_spike())))
        return spikes, self.lif.V.value


def _loss(out, y):
    spikes, v = out
    return jnp.mean((v - y) ** 2) + 1e-2 * jnp.mean(spikes)


def _devices(n):
    """The largest number of visible devices that divides ``n``."""
    p = len(jax.devices())
    while n % p:
        p -= 1
    return p


@pytest.mark.parametrize("form", ["unpartitioned", "partitioned"])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_scaling(benchmark, scale, settings, algorithm, form):
    cfg = SIZES[scale]
    p = _devices(cfg["n"]) if form == "partitioned" else 1
    T, B = cfg["T"], cfg["batch"]
    key_x, key_y = jax.random.split(jax.random.key(0))
    xs = (jax.random.uniform(key_x, (T, B, cfg["n_in"])) < 0.05).astype(jnp.float32)
    ys = jax.random.normal(key_y, (T, B, cfg["n"]), jnp.float32)
    with brainstate.environ.context(dt=DT), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _PartitionedSNN(cfg, p if form == "partitioned" else 1)
        learner = braintrace.compile(model, algorithm, xs[0], batch_size=B, **ALGORITHMS[algorithm])
    if form == "partitioned":
        braintrace.shard_postsynaptic(learner, Mesh(np.array(jax.devices()[:p]), ("model",)))
    fn = brainstate.transform.jit(lambda xs, ys: learner.etrace_grad(xs, ys, step_fn=_loss))

    def run():
        with brainstate.environ.context(dt=DT):
            return jax.block_until_ready(fn(xs, ys))

    benchmark.group = "scaling"
    benchmark.name = f"etrace_grad LIF[{algorithm}, {form}, {p} device{'s' * (p > 1)}]"
    grads = benchmark.pedantic(run, rounds=settings["e2e_rounds"], iterations=1, warmup_rounds=1)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    if benchmark.stats is None:  # --benchmark-disable
        return
    seconds = benchmark.stats.stats.median / T
    rec = learner.graph.hidden_param_op_relations[1]  # the recurrent layer (pp_prop: its shared f trace)
    key = "r1_g0" if algorithm == "d_rtrl" else learner._f_key(rec, 0)
    trace = jax.tree.leaves(learner.etrace.value[key])[0]
    benchmark.extra_info.update(
        {
            "kind": "scaling",
            "algorithm": algorithm,
            "form": form,
            "devices": p,
            "backend": braintrace.get_backend(),
            **cfg,
            "us_per_step": seconds * 1e6,
            "steps_per_s": 1.0 / seconds,
            "rec_trace_bytes_per_device": trace.addressable_shards[0].data.nbytes,
        }
    )
