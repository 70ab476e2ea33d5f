"""End-to-end workloads: the four models of the benchmarks issue, their data, and how to run them.

(a) ``dense``: a leaky tanh RNN of 512 units with a dense recurrence, batch 64;
(b) ``csr``: 4096 units with a CSR recurrence at 5% density (fixed in-degree), batch 32;
(c) ``lora``: 1024 units with a rank-16 LoRA recurrence, batch 64;
(d) ``snn``: a recurrent LIF network (``Linear -> Expon -> LIF``, recurrent ``SparseLinear`` on the
    spikes, ``LeakyRateReadout``) of 50,000 neurons and 25 million synapses (500 per neuron), batch 8.

The RNNs compute ``h' = (1 - a) h + a tanh(x W_in + rec(h))`` (``a = 0.2``) and output ``h' W_out``;
``W_in`` (``braintrace.nn.Linear``) and the recurrence are ETP relations, ``W_out`` is a plain
parameter (its within-step gradient). The leak makes the hidden Jacobian
``D`` non-zero, so the trace update does real work. Loss per step: mean squared error against random
targets; the SNN adds a small penalty on the spike rate, so that the LIF group's states receive a
gradient of their own (the readout group alone would reach them only through the cross-group path
that ``tests/test_nn_online.py`` marks as a known defect).

Every size has a CPU variant (``scale='cpu'``), small enough for the smoke run. Inputs are float32,
time-major ``(T, B, I)``; the input width is kept small so that the sequence itself adds little to the
memory measured at T = 10,000.

:func:`online_fn` and :func:`bptt_fn` return ``run(xs, ys) -> gradients``: ``etrace_grad`` of the
compiled learner (T steps in one jitted scan) and ``jax.grad`` of the summed loss through a scan
(BPTT), each a ``brainstate.transform.jit`` function, so ``run.lower(xs, ys)`` gives the compiled
program's memory analysis.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Dict, Tuple

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u
from saiunit import sparse as ss

import braintrace
from braintrace import nn

__all__ = [
    "Spec",
    "SPECS",
    "spec",
    "build_model",
    "make_data",
    "online_fn",
    "bptt_fn",
    "compiled_program",
    "ALGORITHMS",
    "ETRACE_GRAD_OPTIONS",
    "DT",
]

#: Simulation step of the spiking model.
DT = 1.0 * u.ms
#: pp_prop's decay (a float is lambda).
PP_PROP_DECAY = 0.9
#: Benchmark algorithm name -> (``braintrace.compile`` algorithm, its options). ``d_rtrl_factored`` is
#: D_RTRL with the LoRA ``B``-factor trace factored as in ES-D-RTRL; ``d_rtrl_bf16`` stores the traces
#: in bfloat16.
ALGORITHMS = {
    "d_rtrl": ("d_rtrl", {}),
    "d_rtrl_factored": ("d_rtrl", {"lora_factored": True, "decay_or_rank": PP_PROP_DECAY}),
    "d_rtrl_bf16": ("d_rtrl", {"trace_dtype": jnp.bfloat16}),
    "pp_prop": ("pp_prop", {"decay_or_rank": PP_PROP_DECAY}),
    "pp_prop_solve32": ("pp_prop", {"decay_or_rank": PP_PROP_DECAY}),
}
#: ``etrace_grad`` options of a benchmark algorithm: ``pp_prop_solve32`` forms the weight gradients
#: once per 32 steps from the stored factors (``solve_every=32``).
ETRACE_GRAD_OPTIONS = {"pp_prop_solve32": {"solve_every": 32}}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One workload at one scale."""

    name: str  # 'dense', 'csr', 'lora', 'snn'
    label: str  # human-readable, for tables
    n_hid: int
    batch: int
    n_in: int
    n_out: int
    density: float = 0.0  # csr: fraction of non-zeros per row
    rank: int = 0  # lora
    syn_per_neuron: int = 0  # snn

    @property
    def nnz(self) -> int:
        if self.name == "csr":
            return self.n_hid * _in_degree(self.n_hid, self.density)
        if self.name == "snn":
            return self.n_hid * self.syn_per_neuron
        return 0


def _in_degree(n, density):
    return max(1, int(round(n * density)))


SPECS: Dict[str, Dict[str, Spec]] = {
    "gpu": {
        "dense": Spec("dense", "(a) dense RNN, 512 units, B=64", 512, 64, 32, 8),
        "csr": Spec("csr", "(b) CSR RNN, 4096 units, 5%, B=32", 4096, 32, 32, 8, density=0.05),
        "lora": Spec("lora", "(c) LoRA RNN, 1024 units, rank 16, B=64", 1024, 64, 32, 8, rank=16),
        "snn": Spec(
            "snn", "(d) LIF SNN, 50k neurons, 25M synapses, B=8", 50_000, 8, 100, 10, syn_per_neuron=500
        ),
        "snn_b1": Spec(
            "snn", "(d) LIF SNN, 50k neurons, 25M synapses, B=1", 50_000, 1, 100, 10, syn_per_neuron=500
        ),
    },
    "cpu": {
        "dense": Spec("dense", "(a) dense RNN, 32 units, B=4", 32, 4, 8, 4),
        "csr": Spec("csr", "(b) CSR RNN, 64 units, 10%, B=4", 64, 4, 8, 4, density=0.1),
        "lora": Spec("lora", "(c) LoRA RNN, 48 units, rank 4, B=4", 48, 4, 8, 4, rank=4),
        "snn": Spec("snn", "(d) LIF SNN, 256 neurons, 5k synapses, B=2", 256, 2, 8, 4, syn_per_neuron=20),
    },
}


def spec(name: str, scale: str) -> Spec:
    try:
        return SPECS[scale][name]
    except KeyError:
        raise ValueError(f"no workload {name!r} at scale {scale!r}; known: {sorted(SPECS[scale])}") from None


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def fixed_in_degree_csr(n_pre, n_post, k, scale, seed) -> ss.CSR:
    """``(n_pre, n_post)`` CSR with ``k`` distinct, sorted columns per row (one per stratum of width
    ``n_post / k``) and normal weights of standard deviation ``scale``. Built in numpy in O(nnz)."""
    rng = np.random.default_rng(seed)
    width = n_post / k
    starts = np.floor(np.arange(k) * width).astype(np.int64)
    ends = np.floor((np.arange(k) + 1) * width).astype(np.int64)
    cols = starts[None, :] + (rng.random((n_pre, k)) * (ends - starts)[None, :]).astype(np.int64)
    indptr = np.arange(0, n_pre * k + 1, k, dtype=np.int32)
    data = (rng.standard_normal(n_pre * k) * scale).astype(np.float32)
    return ss.CSR(
        (jnp.asarray(data), jnp.asarray(cols.reshape(-1).astype(np.int32)), jnp.asarray(indptr)),
        shape=(n_pre, n_post),
    )


class RNN(brainstate.nn.Module):
    """``h' = (1 - a) h + a tanh(x W_in + rec(h))``, output ``h' W_out`` (``W_out`` a plain parameter)."""

    LEAK = 0.2

    def __init__(self, s: Spec, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        H = s.n_hid
        self.n_hid = H
        self.inp = nn.Linear(
            s.n_in, H, w_init=jnp.asarray(rng.standard_normal((s.n_in, H)) / np.sqrt(s.n_in), jnp.float32)
        )
        if s.name == "dense":
            w = rng.standard_normal((H, H)) / np.sqrt(H)
            self.rec = nn.Linear(H, H, w_init=jnp.asarray(w, jnp.float32), b_init=None)
        elif s.name == "csr":
            k = _in_degree(H, s.density)
            self.rec = nn.SparseLinear(fixed_in_degree_csr(H, H, k, 1.0 / np.sqrt(k), seed + 1))
        elif s.name == "lora":
            self.rec = nn.LoRA(
                H,
                H,
                rank=s.rank,
                alpha=1.0,
                B_init=jnp.asarray(rng.standard_normal((H, s.rank)) / np.sqrt(H), jnp.float32),
                A_init=jnp.asarray(rng.standard_normal((s.rank, H)) / np.sqrt(s.rank), jnp.float32),
            )
        else:
            raise ValueError(s.name)
        self.w_out = brainstate.ParamState(
            jnp.asarray(rng.standard_normal((H, s.n_out)) / np.sqrt(H), jnp.float32)
        )

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, self.n_hid), jnp.float32))

    def update(self, x):
        h = self.h.value
        h = (1.0 - self.LEAK) * h + self.LEAK * jnp.tanh(self.inp(x) + self.rec(h))
        self.h.value = h
        return h @ self.w_out.value


class SNN(brainstate.nn.Module):
    """``x -> Linear -> Expon -> LIF -> LeakyRateReadout`` with a recurrent ``SparseLinear`` on the spikes.

    Returns ``(readout, spikes)``.
    """

    def __init__(self, s: Spec, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        n, k = s.n_hid, s.syn_per_neuron
        self.inp = nn.Linear(
            s.n_in, n, w_init=jnp.asarray(rng.normal(0.0, 2.0, (s.n_in, n)) / np.sqrt(s.n_in), jnp.float32)
        )
        self.rec = nn.SparseLinear(fixed_in_degree_csr(n, n, k, 0.5 / np.sqrt(k), seed + 1))
        self.syn = nn.Expon(n, tau=5.0 * u.ms)
        self.lif = nn.LIF(n, tau=10.0 * u.ms, V_th=1.0)
        self.out = nn.LeakyRateReadout(
            n, s.n_out, tau=10.0 * u.ms, w_init=jnp.asarray(rng.normal(0.0, 0.1, (n, s.n_out)), jnp.float32)
        )

    def update(self, x):
        spk_prev = self.lif.get_spike()
        g = self.syn(self.inp(x) + self.rec(spk_prev))
        spk = self.lif(g)
        return self.out(spk), spk


def build_model(s: Spec, seed: int = 0) -> brainstate.nn.Module:
    return SNN(s, seed) if s.name == "snn" else RNN(s, seed)


def rnn_loss(out, y):
    return jnp.mean((out - y) ** 2)


def snn_loss(out, y):
    readout, spikes = out
    return jnp.mean((readout - y) ** 2) + 1e-3 * jnp.mean(spikes)


def step_fn(s: Spec) -> Callable:
    """The per-step loss ``(output, target) -> scalar`` (one function object per workload: ``etrace_grad``
    caches its compiled loop by it)."""
    return snn_loss if s.name == "snn" else rnn_loss


def make_data(s: Spec, T: int, seed: int = 0) -> Tuple[jax.Array, jax.Array]:
    """``xs (T, B, n_in)`` and ``ys (T, B, n_out)``, float32, on the default device."""
    kx, ky = jax.random.split(jax.random.key(seed))
    if s.name == "snn":
        xs = (jax.random.uniform(kx, (T, s.batch, s.n_in)) < 0.05).astype(jnp.float32)
    else:
        xs = jax.random.normal(kx, (T, s.batch, s.n_in), jnp.float32)
    ys = jax.random.normal(ky, (T, s.batch, s.n_out), jnp.float32)
    return xs, ys


def data_bytes(s: Spec, T: int) -> int:
    """Bytes of the sequences ``xs`` and ``ys`` (they grow with T whatever the algorithm)."""
    return 4 * T * s.batch * (s.n_in + s.n_out)


# --------------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------------


class _InContext:
    """Wrap a ``brainstate.transform.jit`` function so calls, ``trace`` and ``lower`` run with
    ``dt = DT`` (the spiking layers read ``dt`` when they are traced)."""

    def __init__(self, fn):
        self._fn = fn

    def __call__(self, *args):
        with brainstate.environ.context(dt=DT):
            return self._fn(*args)

    def lower(self, *args):
        with brainstate.environ.context(dt=DT):
            return self._fn.lower(*args)

    def trace(self, *args):
        """``jax.stages.Traced``; traced in ``braintrace_kernels.triton_calls.cuda_target()``,
        ``.lower(lowering_platforms=("cuda",))`` lowers it for a GPU anywhere."""
        with brainstate.environ.context(dt=DT):
            return self._fn.trace(*args)


def online_fn(s: Spec, algorithm: str, seed: int = 0):
    """``run(xs, ys)``: the summed online gradients of ``algorithm`` (a key of :data:`ALGORITHMS`)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {sorted(ALGORITHMS)}, got {algorithm!r}")
    loss = step_fn(s)
    with brainstate.environ.context(dt=DT), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compiler diagnostics (e.g. W_out is not a relation)
        model = build_model(s, seed)
        x0 = jnp.zeros((s.batch, s.n_in), jnp.float32)
        name, options = ALGORITHMS[algorithm]
        learner = braintrace.compile(model, name, x0, batch_size=s.batch, **options)
    grad_options = ETRACE_GRAD_OPTIONS.get(algorithm, {})
    return _InContext(
        brainstate.transform.jit(lambda xs, ys: learner.etrace_grad(xs, ys, step_fn=loss, **grad_options))
    )


def compiled_program(s: Spec, algorithm: str, T: int, sharding=None):
    """The compiled program ``pytest benchmarks`` times for ``algorithm`` (``'bptt'`` or a key of
    :data:`ALGORITHMS`) over ``T`` steps, built from the shapes of the sequences alone, for the
    device of ``sharding`` (default: the local default device); compiled, never run."""
    run = bptt_fn(s) if algorithm == "bptt" else online_fn(s, algorithm)
    xs = jax.ShapeDtypeStruct((T, s.batch, s.n_in), jnp.float32, sharding=sharding)
    ys = jax.ShapeDtypeStruct((T, s.batch, s.n_out), jnp.float32, sharding=sharding)
    return run.trace(xs, ys).lower().compile()


def bptt_fn(s: Spec, seed: int = 0):
    """``run(xs, ys)``: ``jax.grad`` of the summed loss through a scan over the sequence (BPTT)."""
    loss = step_fn(s)
    with brainstate.environ.context(dt=DT):
        model = build_model(s, seed)
        brainstate.nn.init_all_states(model, batch_size=s.batch)
    params = model.states(brainstate.ParamState)
    hidden = model.states(brainstate.HiddenState)
    initial = {k: v.value for k, v in hidden.items()}

    def run(xs, ys):
        for k, st in hidden.items():  # every sequence starts from the initial state
            st.value = initial[k]

        def total_loss():
            def body(acc, xy):
                return acc + loss(model(xy[0]), xy[1]), None

            return brainstate.transform.scan(body, jnp.zeros((), jnp.float32), (xs, ys))[0]

        return brainstate.transform.grad(total_loss, params)()

    return _InContext(brainstate.transform.jit(run))
