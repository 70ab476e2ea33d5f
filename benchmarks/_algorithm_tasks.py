"""The algorithm comparison: two synthetic tasks, their networks, and one row of the table per
(task, algorithm).

Tasks (generated on the fly, so the comparison needs no data):

* ``evidence_lif`` -- evidence accumulation on a recurrent LIF network. Two populations of Poisson
  inputs fire for ``T`` steps, one at a higher rate; the network reports which one over the last
  ``decision`` steps. Network: ``[x, spikes_{t-1}] -> Linear -> Expon -> LIF -> LeakyRateReadout``.
* ``recall_gru`` -- delayed recall with a GRU. A one-hot cue of ``n_classes`` classes arrives at the
  first step, then ``T - 1`` steps of noise; the network reports the cue over the last ``decision``
  steps. Network: ``GRUCell -> Linear``.

Each row trains a fresh network (one per seed) with Adam (:func:`adam_update`, the form of
``optax.adam``) on fresh batches, one optimizer step per sequence, and reports: held-out accuracy after
training (mean and spread over the seeds), the cosine between the algorithm's sequence gradient and
BPTT's on the same batch at initialisation, the compiled temporary memory of one training sequence
(bytes, and per step), and the time per step of a training iteration (the fastest of a few timed calls).
BPTT (``jax.grad`` through a scan) is the reference row.

Used by ``benchmarks/bench_algorithms.py`` (pytest-benchmark, tiny sizes in the smoke run) and by
``ci/compare_algorithms.py`` (the table of ``docs/algorithms.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Dict, Tuple

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u

import braintrace
from braintrace import nn

__all__ = ["TaskConfig", "TASKS", "ALGORITHMS", "SIZES", "run_row", "gradient_cosine"]


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """One task at one size."""

    task: str  # 'evidence_lif' or 'recall_gru'
    n_hidden: int
    t_steps: int
    decision: int
    batch: int
    iterations: int  # optimizer steps of one training run
    lr: float
    n_in: int = 8
    n_classes: int = 2
    eval_batch: int = 256


#: Sizes: ``tiny`` for the benchmark smoke run, ``cpu`` for the table of ``docs/algorithms.md``.
SIZES = {
    "tiny": {
        "evidence_lif": TaskConfig("evidence_lif", 12, 12, 4, 8, 2, 1e-2, n_in=8),
        "recall_gru": TaskConfig("recall_gru", 8, 8, 2, 8, 2, 1e-2, n_in=4, n_classes=3),
    },
    "cpu": {
        "evidence_lif": TaskConfig("evidence_lif", 24, 60, 10, 16, 200, 1e-2, n_in=8),
        "recall_gru": TaskConfig("recall_gru", 24, 20, 4, 16, 200, 1e-2, n_in=6, n_classes=3),
    },
}

#: Table row -> (``braintrace.compile`` algorithm, options); ``None`` is BPTT.
ALGORITHMS: Dict[str, Tuple[str, dict] | None] = {
    "bptt": None,
    "rtrl": ("rtrl", {}),
    "snap2": ("snap", {"n": 2}),
    "uoro": ("uoro", {"projection_key": 0}),
    "d_rtrl": ("d_rtrl", {}),
    "e_prop": ("e_prop", {"kappa_filter_decay": 0.8}),
    "ostl_recurrent": ("ostl_recurrent", {}),
    "ostl_feedforward": ("ostl_feedforward", {}),
    "pp_prop": ("pp_prop", {"decay_or_rank": 0.9}),
}


# --------------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------------


def _evidence(key, cfg: TaskConfig, batch: int):
    """Inputs ``(T, batch, n_in)`` of 0/1 spikes; label = the population firing faster."""
    k_label, k_spikes = jax.random.split(key)
    label = jax.random.bernoulli(k_label, 0.5, (batch,)).astype(jnp.int32)
    pop = jnp.arange(cfg.n_in) >= cfg.n_in // 2
    rate = jnp.where(pop[None, :] == label[:, None].astype(bool), 0.06, 0.04)
    spikes = jax.random.uniform(k_spikes, (cfg.t_steps, batch, cfg.n_in)) < rate[None]
    return spikes.astype(jnp.float32), label


def _recall(key, cfg: TaskConfig, batch: int):
    """A one-hot cue at the first step, Gaussian noise on every channel at every step."""
    k_label, k_noise = jax.random.split(key)
    label = jax.random.randint(k_label, (batch,), 0, cfg.n_classes)
    xs = 0.3 * jax.random.normal(k_noise, (cfg.t_steps, batch, cfg.n_in))
    cue = jax.nn.one_hot(label, cfg.n_in) * 2.0
    return xs.at[0].add(cue), label


TASKS = {"evidence_lif": _evidence, "recall_gru": _recall}


class EvidenceLIF(brainstate.nn.Module):
    """``[x, spikes_{t-1}] -> Linear -> Expon -> LIF -> LeakyRateReadout`` (every weight an ETP op)."""

    def __init__(self, cfg: TaskConfig, seed: int):
        super().__init__()
        rng = np.random.default_rng(seed)
        n_in, n = cfg.n_in, cfg.n_hidden
        w = np.concatenate(
            [rng.normal(0.0, 3.0 / np.sqrt(n_in), (n_in, n)), rng.normal(0.0, 0.5 / np.sqrt(n), (n, n))]
        )
        self.inp = nn.Linear(n_in + n, n, w_init=jnp.asarray(w, jnp.float32), b_init=None)
        self.syn = nn.Expon(n, tau=5.0 * u.ms)
        self.lif = nn.LIF(n, tau=20.0 * u.ms, V_th=1.0)
        w_out = rng.normal(0.0, 1.0 / np.sqrt(n), (n, cfg.n_classes))
        w_out = jnp.asarray(w_out, jnp.float32)
        self.out = nn.LeakyRateReadout(n, cfg.n_classes, tau=10.0 * u.ms, w_init=w_out)

    def update(self, x):
        h = self.syn(self.inp(jnp.concatenate([x, self.lif.get_spike()], axis=-1)))
        return self.out(self.lif(h))


class RecallGRU(brainstate.nn.Module):
    """``GRUCell -> Linear``."""

    def __init__(self, cfg: TaskConfig, seed: int):
        super().__init__()
        key = jax.random.PRNGKey(seed)
        w_out = jax.random.normal(key, (cfg.n_hidden, cfg.n_classes)) / np.sqrt(cfg.n_hidden)
        with brainstate.random.seed_context(seed):
            self.cell = nn.GRUCell(cfg.n_in, cfg.n_hidden)
        self.out = nn.Linear(cfg.n_hidden, cfg.n_classes, w_init=w_out)

    def update(self, x):
        return self.out(self.cell(x))


NETWORKS = {"evidence_lif": EvidenceLIF, "recall_gru": RecallGRU}


def _step_loss(out, label, mask):
    """Cross-entropy of the output, counted only in the decision window (``mask``)."""
    logp = jax.nn.log_softmax(out)
    return mask * -jnp.mean(jnp.take_along_axis(logp, label[:, None], axis=1))


def _decision_mask(cfg: TaskConfig):
    steps = np.arange(cfg.t_steps) >= cfg.t_steps - cfg.decision
    return jnp.asarray(steps, jnp.float32) / cfg.decision


# --------------------------------------------------------------------------------------------------
# one algorithm on one task
# --------------------------------------------------------------------------------------------------


def _sequence_grads(model, cfg: TaskConfig, algorithm: str):
    """``grads(xs, labels) -> (grads, loss)`` over one batch of sequences (not jitted)."""
    params = model.states(brainstate.ParamState)
    mask = _decision_mask(cfg)
    entry = ALGORITHMS[algorithm]
    if entry is None:
        brainstate.nn.init_all_states(model, batch_size=cfg.batch)

        def grads(xs, labels):
            def total_loss():
                brainstate.nn.reset_all_states(model, batch_size=cfg.batch)
                losses = brainstate.transform.for_loop(lambda x, m: _step_loss(model(x), labels, m), xs, mask)
                return losses.sum()

            return brainstate.transform.grad(total_loss, params, return_value=True)()

        return grads
    name, options = entry
    x0 = jnp.zeros((cfg.batch, cfg.n_in), jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the records are listed in the docs' table, not here
        learner = braintrace.compile(model, name, x0, batch_size=cfg.batch, **options)

    def grads(xs, labels):
        ys = jnp.broadcast_to(labels, (cfg.t_steps, cfg.batch))
        g, losses = learner.etrace_grad(xs, ys, mask, step_fn=_step_loss, return_value=True, reset=True)
        return g, losses.sum()

    return grads


def _flat(tree):
    return jnp.concatenate([jnp.ravel(jnp.asarray(v, jnp.float32)) for v in jax.tree.leaves(tree)])


@functools.lru_cache(maxsize=None)
def _flat_gradient(cfg: TaskConfig, algorithm: str, seed: int):
    """The algorithm's gradient of one batch at initialisation, flattened (cached: BPTT's is shared
    by every row)."""
    xs, labels = TASKS[cfg.task](jax.random.PRNGKey(1000 + seed), cfg, cfg.batch)
    with brainstate.environ.context(dt=1.0 * u.ms):
        model = NETWORKS[cfg.task](cfg, seed)
        g, _ = brainstate.transform.jit(_sequence_grads(model, cfg, algorithm))(xs, labels)
    return _flat({"/".join(map(str, k)): v for k, v in g.items()})


def gradient_cosine(cfg: TaskConfig, algorithm: str, seed: int = 0) -> float:
    """Cosine between the algorithm's and BPTT's gradient of one batch, at initialisation."""
    a, b = _flat_gradient(cfg, algorithm, seed), _flat_gradient(cfg, "bptt", seed)
    return float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30))


def _accuracy(model, cfg: TaskConfig, key) -> float:
    xs, labels = TASKS[cfg.task](key, cfg, cfg.eval_batch)
    brainstate.nn.init_all_states(model, batch_size=cfg.eval_batch)
    mask = _decision_mask(cfg)

    @brainstate.transform.jit
    def scores(xs):
        outs = brainstate.transform.for_loop(model, xs)
        return jnp.einsum("t,tbc->bc", mask, jax.nn.log_softmax(outs))

    return float(jnp.mean(jnp.argmax(scores(xs), axis=-1) == labels))


def adam_init(values):
    """Adam's state for ``values``: the step count and the first and second moments (zeros)."""
    zeros = jax.tree.map(jnp.zeros_like, values)
    return {"count": jnp.zeros((), jnp.int32), "mu": zeros, "nu": zeros}


def adam_update(grads, state, values, lr, b1=0.9, b2=0.999, eps=1e-8):
    r"""One Adam step (Kingma and Ba; the form of ``optax.adam``):
    :math:`m \leftarrow b_1 m + (1 - b_1) g`, :math:`v \leftarrow b_2 v + (1 - b_2) g^2`,
    :math:`\theta \leftarrow \theta - \mathrm{lr}\,\hat m / (\sqrt{\hat v} + \epsilon)` with the
    bias-corrected moments :math:`\hat m = m / (1 - b_1^t)`, :math:`\hat v = v / (1 - b_2^t)`.
    Returns ``(new values, new state)``."""
    count = state["count"] + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["mu"], grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["nu"], grads)
    c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
    new = jax.tree.map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), values, mu, nu)
    return new, {"count": count, "mu": mu, "nu": nu}


def train_once(cfg: TaskConfig, algorithm: str, seed: int, evaluate: bool = True) -> dict:
    """Train one network; its accuracy (NaN without ``evaluate``), memory and time per step."""
    with brainstate.environ.context(dt=1.0 * u.ms):
        model = NETWORKS[cfg.task](cfg, seed)
        params = model.states(brainstate.ParamState)
        grads_fn = _sequence_grads(model, cfg, algorithm)
        opt_state = brainstate.ShortTermState(adam_init({k: s.value for k, s in params.items()}))

        @brainstate.transform.jit
        def train_step(key):
            xs, labels = TASKS[cfg.task](key, cfg, cfg.batch)
            g, loss = grads_fn(xs, labels)
            values = {k: s.value for k, s in params.items()}
            new_values, opt_state.value = adam_update(g, opt_state.value, values, cfg.lr)
            for k, v in new_values.items():
                params[k].value = v
            return loss

        example = TASKS[cfg.task](jax.random.PRNGKey(0), cfg, cfg.batch)
        compiled = brainstate.transform.jit(grads_fn).lower(*example)
        temp = int(compiled.compile().memory_analysis().temp_size_in_bytes)
        keys = jax.random.split(jax.random.PRNGKey(seed), cfg.iterations)
        losses = []
        timed = []
        for i in range(cfg.iterations):
            start = time.perf_counter()
            loss = jax.block_until_ready(train_step(keys[i]))
            timed.append(time.perf_counter() - start)
            losses.append(float(loss))
        step_s = min(timed[1:]) if len(timed) > 1 else timed[0]
        accuracy = _accuracy(model, cfg, jax.random.PRNGKey(10_000 + seed)) if evaluate else float("nan")
    return {
        "accuracy": accuracy,
        "final_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])),
        "temp_bytes": temp,
        "us_per_step": 1e6 * step_s / cfg.t_steps,
        "first_call_s": timed[0],
    }


def run_row(cfg: TaskConfig, algorithm: str, seeds=(0, 1, 2), evaluate: bool = True) -> dict:
    """The table row of ``algorithm`` on ``cfg``'s task (its numbers, ready for JSON); without
    ``evaluate`` the held-out accuracy is not measured (NaN)."""
    runs = [train_once(cfg, algorithm, s, evaluate) for s in seeds]
    acc = np.array([r["accuracy"] for r in runs])
    return {
        "task": cfg.task,
        "algorithm": algorithm,
        "seeds": list(seeds),
        "accuracy_mean": float(acc.mean()),
        "accuracy_spread": float(acc.max() - acc.min()),
        "accuracies": acc.tolist(),
        "grad_cosine_to_bptt": 1.0 if algorithm == "bptt" else gradient_cosine(cfg, algorithm),
        "temp_bytes": runs[0]["temp_bytes"],
        "temp_bytes_per_step": runs[0]["temp_bytes"] / cfg.t_steps,
        "us_per_step": min(r["us_per_step"] for r in runs),
        "config": dataclasses.asdict(cfg),
    }
