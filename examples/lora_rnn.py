"""Adapting a frozen recurrent network with a low-rank (LoRA) recurrent update, learned online.

A "pretrained" rate network has a frozen input weight ``W_in``, a frozen recurrent weight ``W0`` and a
frozen read-out ``W_out``. Only a rank-``r`` correction of the recurrence, ``alpha * B A`` with
``braintrace.nn.LoRA``, is trained: ``2 n r`` parameters instead of ``n^2``::

    h_t = a h_{t-1} + (1 - a) tanh(x_t W_in + h_{t-1} W0 + alpha * h_{t-1} B A),      out_t = h_t W_out

The target is a teacher: the same network whose recurrence was changed by an unknown rank-``r``
matrix. The student starts from ``A = 0`` (the LoRA convention: the adapted network begins as the
pretrained one) and learns ``B`` and ``A`` online, step by step, from the teacher's outputs.

The frozen product ``h_{t-1} W0`` goes through ``braintrace.matmul`` although ``W0`` does not learn:
the online algorithms then hold it fixed like every ETP output, and the hidden Jacobian they
propagate stays per unit (the leak and the slope of ``tanh``). Written as a plain ``h @ W0`` it would
be part of the intrinsic dynamics, which the traces can keep only as one number per unit (the
compiler warns); on this task that version learns much worse.

``--algorithm d_rtrl`` (default) keeps the exact per-unit trace of the LoRA factors (for ``B`` the
dense ``(batch, n, n)`` trace contracted with ``A`` at solve time); ``--algorithm pp_prop`` keeps the
``O(batch (I + O))`` input-output trace, which factors that one too. In both, the traces leave out
how the recurrence carries a change of one unit to the others (through ``W0`` and ``B A``), so the
online gradient approximates BPTT.

    python examples/lora_rnn.py                 # about half a minute on a CPU
    python examples/lora_rnn.py --tiny          # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import time
import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import braintrace
from braintrace import nn

LEAK = 0.7


class LoRARNN(brainstate.nn.Module):
    """A frozen leaky tanh RNN with a trainable low-rank recurrent correction."""

    def __init__(self, w_in, w0, w_out, rank: int, alpha: float, lora_b=None, lora_a=None):
        super().__init__()
        n = w0.shape[0]
        self.n = n
        # frozen weights are plain arrays, not ParamState: nothing trains them
        self.w_in, self.w0, self.w_out = jnp.asarray(w_in), jnp.asarray(w0), jnp.asarray(w_out)
        self.lora = nn.LoRA(
            n,
            n,
            rank=rank,
            alpha=alpha,
            B_init=brainstate.nn.init.LecunNormal() if lora_b is None else jnp.asarray(lora_b),
            A_init=jnp.zeros((rank, n)) if lora_a is None else jnp.asarray(lora_a),
        )

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, self.n)))

    def update(self, x):
        h = self.h.value
        # marked, so that the traces hold it fixed (see the module docstring); W0 itself stays frozen
        drive = x @ self.w_in + braintrace.matmul(h, self.w0) + self.lora(h)
        self.h.value = LEAK * h + (1 - LEAK) * jnp.tanh(drive)
        return self.h.value @ self.w_out


def mse(out, target):
    return jnp.mean((out - target) ** 2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", choices=["d_rtrl", "pp_prop"], default="d_rtrl")
    parser.add_argument("--steps", type=int, default=None, help="training iterations (default 300)")
    parser.add_argument("--hidden", type=int, default=None, help="recurrent units (default 128)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (used by the tests)")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (30 if args.tiny else 300)
    n = args.hidden if args.hidden is not None else (24 if args.tiny else 128)
    r, B, T, n_in, n_out, alpha = args.rank, args.batch, 40, 6, 3, 1.0

    rng = np.random.default_rng(args.seed)
    w_in = rng.normal(0.0, 1.0 / np.sqrt(n_in), (n_in, n)).astype(np.float32)
    w0 = rng.normal(0.0, 0.9 / np.sqrt(n), (n, n)).astype(np.float32)
    w_out = rng.normal(0.0, 1.0 / np.sqrt(n), (n, n_out)).astype(np.float32)
    delta = (rng.normal(size=(n, r)) @ rng.normal(size=(r, n)) / n).astype(np.float32)  # unknown change
    teacher_w = jnp.asarray(w0 + delta)

    def batch_of(key):
        """Smooth random inputs ``(T, B, n_in)`` and the teacher's outputs ``(T, B, n_out)``."""
        noise = jax.random.normal(key, (T, B, n_in))
        xs = jax.lax.scan(lambda s, e: (0.8 * s + 0.6 * e,) * 2, jnp.zeros((B, n_in)), noise)[1]

        def teacher(h, x):
            h = LEAK * h + (1 - LEAK) * jnp.tanh(x @ w_in + h @ teacher_w)
            return h, h @ w_out

        return xs, jax.lax.scan(teacher, jnp.zeros((B, n)), xs)[1]

    brainstate.random.seed(args.seed)
    model = LoRARNN(w_in, w0, w_out, rank=r, alpha=alpha)
    options = {"decay_or_rank": 0.9} if args.algorithm == "pp_prop" else {}
    with warnings.catch_warnings():
        # The compiler notes that the marked product with the constant W0 carries no trace: intended.
        warnings.filterwarnings("ignore", message=r"(?s).*depend on inputs or non-parameter states")
        learner = braintrace.compile(model, args.algorithm, jnp.zeros((B, n_in)), batch_size=B, **options)
    (relation,) = learner.graph.hidden_param_op_relations
    params = model.states(brainstate.ParamState)
    n_params = sum(int(np.prod(v.shape)) for s in params.values() for v in jax.tree.leaves(s.value))
    print(
        f"{n} units, LoRA rank {r}: {n_params} trainable parameters ({n * n} in the full recurrent matrix); "
        f"relation {relation.primitive.name} {sorted(relation.trainable_vars)}; {args.algorithm}"
    )

    optimizer = optax.adam(args.lr)
    opt_state = brainstate.ShortTermState(optimizer.init({k: s.value for k, s in params.items()}))

    @brainstate.transform.jit
    def train_step(key):
        xs, targets = batch_of(key)
        grads, losses = learner.etrace_grad(xs, targets, step_fn=mse, return_value=True)
        values = {k: s.value for k, s in params.items()}
        updates, opt_state.value = optimizer.update(grads, opt_state.value, values)
        for k, v in optax.apply_updates(values, updates).items():
            params[k].value = v
        return losses.mean()

    t0 = time.perf_counter()
    key = jax.random.PRNGKey(args.seed)
    losses = []
    bar = tqdm(range(steps), desc=args.algorithm, unit="it")
    for step in bar:
        losses.append(float(train_step(jax.random.fold_in(key, step))))
        bar.set_postfix(step=step + 1, loss=f"{losses[-1]:.2e}")
    bar.close()
    first, last = losses[0], float(np.mean(losses[-max(1, steps // 10) :]))
    print(
        f"final: loss {last:.3e} (first iteration {first:.3e}, {first / last:.1f}x lower) after {steps} "
        f"iterations in {time.perf_counter() - t0:.1f} s"
    )
    return {"first": first, "final": last}


if __name__ == "__main__":
    main()
