"""A recurrent spiking network learns evidence accumulation online, with no backpropagation through time.

The task: two populations of Poisson inputs fire for ``T`` steps, one at a higher rate than the other;
the network must report which one. The evidence arrives spike by spike, so the answer needs memory.

The network (``dt = 1 ms``)::

    Poisson input --Linear--> Expon synapse --> LIF --LeakyRateReadout--> 2 class scores
                                   ^             |
                                   +--SparseLinear (CSR, recurrent, on the spikes)

Every weight (input, recurrent non-zeros, read-out) goes through an ETP primitive, so the online
learner keeps an eligibility trace for each and returns a gradient at every step. A training iteration
is one jitted call: draw a batch of trials, run ``learner.etrace_grad`` over the ``T`` steps (a scan that
sums the per-step gradients), and apply an optax Adam update.

    python examples/snn_online.py                      # pp_prop (ES-D-RTRL), under two minutes on a CPU
    python examples/snn_online.py --algorithm d_rtrl --steps 30   # parameter-dimension traces (slower)
    python examples/snn_online.py --algorithm bptt     # jax.grad through a scan, for comparison
    python examples/snn_online.py --large              # tens of thousands of neurons (GPU: Pallas kernels)

At the end the script prints the accuracy on held-out trials and saves a figure (loss and accuracy
curves, an input and a recurrent spike raster) to ``--out``. Needs the ``examples`` extra
(``pip install -e ".[examples]"``: optax, tqdm, matplotlib).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import brainstate
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import saiunit as u
from saiunit import sparse as ss
from tqdm import tqdm

import braintrace
from braintrace import nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass(frozen=True)
class Config:
    n_per_pop: int = 10  # Poisson inputs per population (two populations)
    n_rec: int = 400  # LIF neurons
    conn_per_neuron: int = 40  # recurrent synapses per neuron (CSR non-zeros per row)
    t_steps: int = 100  # trial length, in steps of 1 ms
    decision: int = 20  # the loss is taken over the last `decision` steps
    rate_hi: float = 0.04  # spikes per step of the stronger population (40 Hz)
    rate_lo: float = 0.025  # and of the weaker one (25 Hz)

    @property
    def n_in(self) -> int:
        return 2 * self.n_per_pop


SMALL = Config()
LARGE = Config(n_per_pop=100, n_rec=20_000, conn_per_neuron=100, t_steps=100, decision=20)
TINY = Config(n_per_pop=8, n_rec=48, conn_per_neuron=8, t_steps=30, decision=8, rate_hi=0.12, rate_lo=0.04)


# --------------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------------


def make_trials(key, cfg: Config, batch: int):
    """``batch`` trials: inputs ``(T, batch, n_in)`` of 0/1 spikes and labels ``(batch,)``.

    The label is the population (0: inputs ``[0, n_per_pop)``, 1: the rest) firing at ``rate_hi``;
    the other fires at ``rate_lo``.
    """
    k_label, k_spikes = jax.random.split(key)
    label = jax.random.bernoulli(k_label, 0.5, (batch,)).astype(jnp.int32)
    pop = jnp.arange(cfg.n_in) >= cfg.n_per_pop  # population of each input
    rate = jnp.where(pop[None, :] == label[:, None].astype(bool), cfg.rate_hi, cfg.rate_lo)
    spikes = jax.random.uniform(k_spikes, (cfg.t_steps, batch, cfg.n_in)) < rate[None]
    return spikes.astype(jnp.float32), label


def step_loss(out, label, mask):
    """Cross-entropy of the read-out at one step, counted only in the decision window (``mask``)."""
    logp = jax.nn.log_softmax(out)
    return mask * -jnp.mean(jnp.take_along_axis(logp, label[:, None], axis=1))


# --------------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------------


def random_csr(rng: np.random.Generator, n: int, per_row: int, scale: float) -> ss.CSR:
    """An ``(n, n)`` CSR matrix with about ``per_row`` random columns per row (no self-connections)."""
    rows = np.repeat(np.arange(n), per_row)
    cols = rng.integers(0, n - 1, n * per_row)
    cols = cols + (cols >= rows)  # skip the diagonal
    flat = np.unique(rows.astype(np.int64) * n + cols)  # sorted by row, then column; duplicates dropped
    rows, cols = flat // n, flat % n
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    data = rng.normal(0.0, scale / np.sqrt(per_row), flat.size).astype(np.float32)
    return ss.CSR(
        (jnp.asarray(data), jnp.asarray(cols, jnp.int32), jnp.asarray(indptr, jnp.int32)), shape=(n, n)
    )


class RecurrentLIF(brainstate.nn.Module):
    """``x -> Linear -> Expon -> LIF -> LeakyRateReadout``, a recurrent ``SparseLinear`` on the spikes."""

    def __init__(self, cfg: Config, seed: int):
        super().__init__()
        rng = np.random.default_rng(seed)
        n_in, n_rec = cfg.n_in, cfg.n_rec
        w_in = rng.normal(0.0, 2.0 / np.sqrt(cfg.n_per_pop * cfg.rate_hi * 5.0), (n_in, n_rec))
        self.inp = nn.Linear(n_in, n_rec, w_init=jnp.asarray(w_in, jnp.float32), b_init=None)
        self.rec = nn.SparseLinear(random_csr(rng, n_rec, cfg.conn_per_neuron, scale=1.0))
        self.syn = nn.Expon(n_rec, tau=5.0 * u.ms)
        self.lif = nn.LIF(n_rec, tau=20.0 * u.ms, V_th=1.0)
        w_out = rng.normal(0.0, 1.0 / np.sqrt(n_rec), (n_rec, 2))
        self.out = nn.LeakyRateReadout(n_rec, 2, tau=20.0 * u.ms, w_init=jnp.asarray(w_out, jnp.float32))

    def update(self, x):
        spk_prev = self.lif.get_spike()
        g = self.syn(self.inp(x) + self.rec(spk_prev))
        return self.out(self.lif(g))


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------


def build_trainer(model, cfg: Config, algorithm: str, batch: int, lr: float):
    """A jitted ``train_step(key) -> (loss, accuracy)`` that updates ``model``'s parameters in place."""
    params = model.states(brainstate.ParamState)
    mask = jnp.asarray(np.arange(cfg.t_steps) >= cfg.t_steps - cfg.decision, jnp.float32) / cfg.decision
    optimizer = optax.adam(lr)
    opt_state = brainstate.ShortTermState(optimizer.init({k: s.value for k, s in params.items()}))

    if algorithm == "bptt":
        brainstate.nn.init_all_states(model, batch_size=batch)

        def sequence_grads(xs, labels):
            def total_loss():
                brainstate.nn.reset_all_states(model, batch_size=batch)
                losses = brainstate.transform.for_loop(lambda x, m: step_loss(model(x), labels, m), xs, mask)
                return losses.sum()

            return brainstate.transform.grad(total_loss, params, return_value=True)()

    else:
        options = {"decay_or_rank": 0.95} if algorithm == "pp_prop" else {}
        x0 = jnp.zeros((batch, cfg.n_in), jnp.float32)
        learner = braintrace.compile(model, algorithm, x0, batch_size=batch, **options)

        def sequence_grads(xs, labels):
            ys = jnp.broadcast_to(labels, (cfg.t_steps, batch))
            grads, losses = learner.etrace_grad(xs, ys, mask, step_fn=step_loss, return_value=True)
            return grads, losses.sum()

    @brainstate.transform.jit
    def train_step(key):
        xs, labels = make_trials(key, cfg, batch)
        grads, loss = sequence_grads(xs, labels)
        values = {k: s.value for k, s in params.items()}
        updates, opt_state.value = optimizer.update(grads, opt_state.value, values)
        for k, v in optax.apply_updates(values, updates).items():
            params[k].value = v
        # the read-out state after the last step decides the class
        accuracy = jnp.mean(jnp.argmax(model.out.r.value, axis=-1) == labels)
        return loss, accuracy

    return train_step


def build_evaluator(model, cfg: Config, batch: int):
    """A jitted ``evaluate(key) -> (accuracy, inputs, spikes, labels)`` over one fresh batch."""

    @brainstate.transform.jit
    def evaluate(key):
        xs, labels = make_trials(key, cfg, batch)
        brainstate.nn.reset_all_states(model, batch_size=batch)

        def step(x):
            model(x)
            return model.lif.get_spike()

        spikes = brainstate.transform.for_loop(step, xs)
        accuracy = jnp.mean(jnp.argmax(model.out.r.value, axis=-1) == labels)
        return accuracy, xs, spikes, labels

    return evaluate


def plot(path, losses, accs, xs, spikes, label, cfg: Config, title: str):
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    marker = "o" if len(losses) < 30 else None  # a short run shows its points
    ax = axes[0, 0]
    ax.plot(losses, lw=1, marker=marker)
    ax.set(xlabel="training iteration", ylabel="cross-entropy", title="loss")
    ax = axes[0, 1]
    ax.plot(accs, lw=1, alpha=0.4, marker=marker, label="training batch")
    k = max(1, len(accs) // 20)
    ax.plot(np.convolve(accs, np.ones(k) / k, mode="valid"), lw=2, label=f"running mean ({k})")
    ax.axhline(0.5, color="gray", ls="--", lw=1, label="chance")
    ax.set(xlabel="training iteration", ylabel="accuracy", ylim=(0.0, 1.05), title="accuracy")
    ax.legend(loc="lower right")

    ax = axes[1, 0]
    t, i = np.nonzero(xs)
    colors = np.where(i < cfg.n_per_pop, "tab:blue", "tab:orange")
    ax.scatter(t, i, s=12, c=colors, marker="|")
    ax.set(xlabel="time (ms)", ylabel="input", xlim=(0, cfg.t_steps), ylim=(-0.5, cfg.n_in - 0.5))
    ax.set_title(f"input spikes (class {label}: population {label} fires faster)")
    ax = axes[1, 1]
    shown = min(cfg.n_rec, 200)
    t, i = np.nonzero(spikes[:, :shown])
    ax.scatter(t, i, s=8, c="k", marker="|")
    ax.set(xlabel="time (ms)", ylabel="LIF neuron", xlim=(0, cfg.t_steps), ylim=(-0.5, shown - 0.5))
    ax.set_title(f"recurrent spikes ({shown} of {cfg.n_rec} neurons)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", choices=["pp_prop", "d_rtrl", "bptt"], default="pp_prop")
    parser.add_argument("--steps", type=int, default=None, help="training iterations (default 300)")
    parser.add_argument("--batch", type=int, default=None, help="trials per iteration (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    parser.add_argument("--large", action="store_true", help="20,000 LIF neurons, 2 million synapses")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (used by the tests)")
    parser.add_argument("--out", default="snn_online.png", help="where to save the figure")
    args = parser.parse_args(argv)

    cfg = LARGE if args.large else TINY if args.tiny else SMALL
    steps = args.steps if args.steps is not None else (20 if args.tiny else 300)
    batch = args.batch if args.batch is not None else (16 if args.tiny else 64)
    if args.large and any(d.platform == "gpu" for d in jax.devices()):
        braintrace.set_backend("pallas")
    brainstate.environ.set(dt=1.0 * u.ms)

    model = RecurrentLIF(cfg, args.seed)
    print(
        f"{cfg.n_in} Poisson inputs -> {cfg.n_rec} LIF neurons ({model.rec.nnz} recurrent synapses) -> 2 "
        f"outputs; {cfg.t_steps} steps per trial, batch {batch}, {args.algorithm}, "
        f"backend {braintrace.get_backend()!r} on {jax.devices()[0].platform}"
    )
    t0 = time.perf_counter()
    train_step = build_trainer(model, cfg, args.algorithm, batch, args.lr)
    evaluate = build_evaluator(model, cfg, batch)
    key = jax.random.PRNGKey(args.seed)
    losses, accs = [], []
    bar = tqdm(range(steps), desc=args.algorithm, unit="it")
    for step in bar:
        loss, acc = train_step(jax.random.fold_in(key, step))
        losses.append(float(loss))
        accs.append(float(acc))
        bar.set_postfix(step=step + 1, loss=f"{losses[-1]:.3f}", acc=f"{accs[-1]:.2f}")
    bar.close()
    train_time = time.perf_counter() - t0

    eval_key = jax.random.PRNGKey(10_000 + args.seed)
    n_eval = 2 if args.tiny else max(1, 512 // batch)  # held-out batches
    results = [evaluate(jax.random.fold_in(eval_key, i)) for i in range(n_eval)]
    accuracy = float(np.mean([float(r[0]) for r in results]))
    _, xs, spikes, labels = results[0]
    print(
        f"final: loss {np.mean(losses[-10:]):.4f}, held-out accuracy {accuracy:.3f} on "
        f"{n_eval * batch} trials (chance 0.5); trained {steps} iterations in {train_time:.1f} s"
    )
    title = f"{args.algorithm}: held-out accuracy {accuracy:.3f} after {steps} iterations"
    plot(args.out, losses, accs, np.asarray(xs[:, 0]), np.asarray(spikes[:, 0]), int(labels[0]), cfg, title)
    print(f"saved figure to {args.out}")
    return accuracy


if __name__ == "__main__":
    main()
