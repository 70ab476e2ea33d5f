"""A GRU learns a copy task online with D-RTRL, beside the same GRU trained with BPTT.

The task: ``length`` random symbols (one-hot over ``vocab`` symbols) are shown one per step, then
``delay`` blank steps, then a "go" input for ``length`` steps during which the network must repeat the
symbols in order. The loss is the cross-entropy over the recall steps only; chance is ``ln(vocab)``.

The model is ``braintrace.nn.GRUCell`` followed by a ``braintrace.nn.Linear`` read-out. Under
``D_RTRL`` the update and candidate weights (``Wz``, ``Wh``) carry eligibility traces; the reset-gate
weight ``Wr`` reaches the hidden state only through ``Wh`` and the read-out does not reach it at all,
so both get their within-step gradient. D-RTRL keeps one trace per unit: the coupling between units
through ``Wh h`` is dropped from the trace (the hidden Jacobian is taken with the ETP outputs held
fixed), so D-RTRL approximates BPTT here. Both learners start from the same weights, see the same
batches and use the same Adam optimizer; the script prints both losses.

    python examples/gru_copy_task.py            # about half a minute on a CPU
    python examples/gru_copy_task.py --tiny     # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import math
import time

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import braintrace
from braintrace import nn


def make_batch(key, batch: int, length: int, delay: int, vocab: int):
    """Inputs ``(T, batch, vocab + 1)``, targets ``(T, batch)`` and the recall mask ``(T,)``.

    Channel ``vocab`` is the "go" cue. ``T = 2 * length + delay``.
    """
    symbols = jax.random.randint(key, (batch, length), 0, vocab)
    T = 2 * length + delay
    cue = jax.nn.one_hot(symbols, vocab + 1).transpose(1, 0, 2)  # (length, batch, vocab + 1)
    blank = jnp.zeros((delay, batch, vocab + 1))
    go = jnp.zeros((length, batch, vocab + 1)).at[..., vocab].set(1.0)
    xs = jnp.concatenate([cue, blank, go])
    targets = jnp.concatenate([jnp.zeros((length + delay, batch), jnp.int32), symbols.T])
    mask = (jnp.arange(T) >= length + delay).astype(jnp.float32)
    return xs, targets, mask


class CopyNet(brainstate.nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.gru = nn.GRUCell(vocab + 1, hidden)
        self.readout = nn.Linear(hidden, vocab)

    def update(self, x):
        return self.readout(self.gru(x))


def make_step_loss(length: int):
    def step_loss(logits, target, mask):
        """Cross-entropy at one step, averaged over the batch and the ``length`` recall steps."""
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), target[:, None], axis=1)
        return mask * -jnp.mean(logp) / length

    return step_loss


def build_trainer(model, algorithm: str, args):
    """A jitted ``train_step(key) -> loss`` that applies one Adam update to ``model``."""
    params = model.states(brainstate.ParamState)
    optimizer = optax.adam(args.lr)
    opt_state = brainstate.ShortTermState(optimizer.init({k: s.value for k, s in params.items()}))
    step_loss = make_step_loss(args.length)
    vocab, batch = args.vocab, args.batch

    if algorithm == "bptt":
        brainstate.nn.init_all_states(model, batch_size=batch)

        def sequence_grads(xs, ys, mask):
            def total_loss():
                brainstate.nn.reset_all_states(model, batch_size=batch)
                return brainstate.transform.for_loop(
                    lambda x, y, m: step_loss(model(x), y, m), xs, ys, mask
                ).sum()

            return brainstate.transform.grad(total_loss, params, return_value=True)()

    else:
        learner = braintrace.compile(
            model, braintrace.D_RTRL, jnp.zeros((batch, vocab + 1)), batch_size=batch
        )

        def sequence_grads(xs, ys, mask):
            grads, losses = learner.etrace_grad(xs, ys, mask, step_fn=step_loss, return_value=True)
            return grads, losses.sum()

    @brainstate.transform.jit
    def train_step(key):
        xs, ys, mask = make_batch(key, batch, args.length, args.delay, vocab)
        grads, loss = sequence_grads(xs, ys, mask)
        values = {k: s.value for k, s in params.items()}
        updates, opt_state.value = optimizer.update(grads, opt_state.value, values)
        for k, v in optax.apply_updates(values, updates).items():
            params[k].value = v
        return loss

    return train_step


def build_evaluator(model, args):
    """A jitted ``evaluate(key) -> accuracy``: the fraction of symbols recalled correctly (argmax)."""

    @brainstate.transform.jit
    def evaluate(key):
        xs, ys, mask = make_batch(key, args.batch, args.length, args.delay, args.vocab)
        brainstate.nn.reset_all_states(model, batch_size=args.batch)
        logits = brainstate.transform.for_loop(model, xs)  # (T, batch, vocab)
        correct = (jnp.argmax(logits, axis=-1) == ys) * mask[:, None]
        return correct.sum() / (mask.sum() * args.batch)

    return evaluate


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training iterations (default 1500)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=None, help="symbols to copy (default 4)")
    parser.add_argument("--delay", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=None, help="GRU units (default 64)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (used by the tests)")
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (30 if args.tiny else 1500)
    args.length = args.length if args.length is not None else (2 if args.tiny else 4)
    args.hidden = args.hidden if args.hidden is not None else (16 if args.tiny else 64)
    if args.tiny:
        args.batch = min(args.batch, 16)

    print(
        f"copy {args.length} of {args.vocab} symbols after a delay of {args.delay} steps; GRU with "
        f"{args.hidden} units, batch {args.batch}, {args.steps} Adam steps; chance loss "
        f"ln({args.vocab}) = {math.log(args.vocab):.3f}"
    )
    final = {}
    for algorithm in ("d_rtrl", "bptt"):
        brainstate.random.seed(args.seed)  # both learners start from the same weights
        model = CopyNet(args.vocab, args.hidden)
        t0 = time.perf_counter()
        train_step = build_trainer(model, algorithm, args)
        key = jax.random.PRNGKey(args.seed)  # and see the same batches
        losses = []
        bar = tqdm(range(args.steps), desc=algorithm, unit="it")
        for step in bar:
            losses.append(float(train_step(jax.random.fold_in(key, step))))
            bar.set_postfix(step=step + 1, loss=f"{losses[-1]:.3f}")
        bar.close()
        elapsed = time.perf_counter() - t0
        evaluate = build_evaluator(model, args)
        eval_key = jax.random.PRNGKey(10_000 + args.seed)
        accuracy = float(np.mean([float(evaluate(jax.random.fold_in(eval_key, i))) for i in range(8)]))
        final[algorithm] = (float(np.mean(losses[-max(1, args.steps // 10) :])), accuracy)
        print(
            f"{algorithm}: final loss {final[algorithm][0]:.4f}, recall accuracy {accuracy:.3f} on held-out "
            f"sequences ({elapsed:.1f} s)"
        )
    (l_on, a_on), (l_bptt, a_bptt) = final["d_rtrl"], final["bptt"]
    print(
        f"final loss: D_RTRL {l_on:.4f}, BPTT {l_bptt:.4f} (chance {math.log(args.vocab):.4f}); "
        f"recall accuracy: D_RTRL {a_on:.3f}, BPTT {a_bptt:.3f} (chance {1 / args.vocab:.3f})"
    )
    return final


if __name__ == "__main__":
    main()
