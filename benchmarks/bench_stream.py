"""Learning on a long packed stream: ``learner.etrace_train`` with ``resets``, steps per second.

A dense recurrent network (``h' = tanh(0.5 h + x W + h U)``, both weights through
``braintrace.matmul``) learns online from one long stream in which every row holds episodes of
random lengths back to back (``resets`` marks their starts, on average one every ``episode``
steps), with an optax SGD update every ``update_every`` steps, the loss reduced inside the loop
(``reduction='mean'``, the call's mean loss returned: nothing is stored per step). Each timed call
continues the stream where the previous one stopped (states, traces, optimizer state and the
unfinished update block carry over). Reported: ``steps_per_s`` and ``us_per_step`` (median call),
under D_RTRL and pp_prop. Tiny sizes without ``--gpu``.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace

STREAM = {
    "gpu": {"T": 20_000, "batch": 32, "n_in": 64, "n_hid": 256, "update_every": 10, "episode": 500},
    "cpu": {"T": 200, "batch": 4, "n_in": 4, "n_hid": 8, "update_every": 10, "episode": 50},
}
ALGORITHMS = {"d_rtrl": {}, "pp_prop": {"decay_or_rank": 0.9}}


class _RNN(brainstate.nn.Module):
    def __init__(self, n_in, n_hid):
        super().__init__()
        rng = np.random.default_rng(0)
        self.n_hid = n_hid
        self.w = brainstate.ParamState(
            jnp.asarray(rng.standard_normal((n_in, n_hid)) / np.sqrt(n_in), jnp.float32)
        )
        self.u = brainstate.ParamState(
            jnp.asarray(rng.standard_normal((n_hid, n_hid)) / np.sqrt(n_hid), jnp.float32)
        )

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, self.n_hid), jnp.float32))

    def update(self, x):
        h = self.h.value
        self.h.value = jnp.tanh(
            0.5 * h + braintrace.matmul(x, self.w.value) + braintrace.matmul(h, self.u.value)
        )
        return self.h.value


def _row_loss(out, y):
    return jnp.mean((out - y) ** 2, axis=-1)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_stream_training(benchmark, scale, settings, algorithm):
    optax = pytest.importorskip("optax")  # the `examples` extra
    cfg = STREAM[scale]
    T, B = cfg["T"], cfg["batch"]
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.standard_normal((T, B, cfg["n_in"])), jnp.float32)
    ys = jnp.asarray(rng.standard_normal((T, B, cfg["n_hid"])), jnp.float32)
    resets = jnp.asarray(rng.random((T, B)) < 1.0 / cfg["episode"])
    model = _RNN(cfg["n_in"], cfg["n_hid"])
    learner = braintrace.compile(model, algorithm, xs[0], batch_size=B, **ALGORITHMS[algorithm])
    optimizer = optax.sgd(1e-3)
    state = [None]

    def run():
        state[0], loss = learner.etrace_train(
            xs,
            ys,
            step_fn=_row_loss,
            optimizer=optimizer,
            opt_state=state[0],
            update_every=cfg["update_every"],
            resets=resets,
            reduction="mean",
        )
        return jax.block_until_ready(loss)

    benchmark.group = "stream"
    benchmark.name = f"etrace_train stream[{algorithm}, T={T}]"
    loss = benchmark.pedantic(run, rounds=settings["e2e_rounds"], iterations=1, warmup_rounds=1)
    assert np.isfinite(float(loss))
    if benchmark.stats is None:  # --benchmark-disable
        return
    seconds = benchmark.stats.stats.median / T
    benchmark.extra_info.update(
        {
            "kind": "stream",
            "algorithm": algorithm,
            "backend": "xla",
            **cfg,
            "us_per_step": seconds * 1e6,
            "steps_per_s": 1.0 / seconds,
        }
    )
