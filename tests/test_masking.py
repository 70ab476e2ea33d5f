"""Sequences as real data comes: ``mask`` / ``lengths``, ``resets``, reductions and aux outputs of
``etrace_grad`` (both forms of ``step_fn``) and ``etrace_train``, in float64, against D_RTRL and
pp_prop written out in numpy here for the models used (:class:`_Oracle`).

* A padded batch with ``lengths`` (or the equivalent ``(T, B)`` mask) equals the sum of each sequence
  run alone, with its own length; the padding holds large random values that must not matter.
* A packed stream with ``resets`` equals each row's episodes run alone (D_RTRL, per row); under
  pp_prop it equals the recursion restarted for every row at a step where any row resets.
* A reset of a row whose state already equals its initial value (a spiking unit reset to rest at
  the step before) still restarts its traces.
* ``has_aux``: the aux stacked ``(T, ...)`` equals the model's outputs; reduced, it equals a numpy
  mean over the entries that count.
* ``etrace_train`` with a mask and resets equals the oracle with the same updates applied.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest

import braintrace

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

B, T, LAM = 3, 7, 0.8
LENGTHS = np.array([7, 4, 2])
VALID = np.arange(T)[:, None] < LENGTHS[None, :]
RESETS = np.zeros((T, B), bool)
RESETS[[0, 3, 5, 2, 6], [0, 0, 0, 1, 1]] = True  # row 0: episodes of 3, 2, 2 steps; row 1: 2, 4, 1; row 2: 7


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with om.float64():
        yield


def row_loss(out, y):
    """One loss per batch row, ``(B,)``."""
    return 0.5 * jnp.sum((out - y) ** 2, axis=-1)


# ------------------------------------------------------------------------------------------------
# the oracle
# ------------------------------------------------------------------------------------------------


def _tanh_cell(p, h, y):
    """``dense_rnn`` of online_models: ``h' = tanh(y + 0.5 h)``; ``(h', dh'/dy, dh'/dh)``."""
    new = np.tanh(y + 0.5 * h)
    g = 1.0 - new**2
    return new, g, 0.5 * g


def _surrogate(v):
    return 1.0 / (1.0 + np.abs(v)) ** 2


def _hard_reset_cell(p, h, y):
    """``v' = pre (1 - [pre > 1])`` with ``pre = 0.8 v + y``, the spike's derivative a surrogate."""
    pre = 0.8 * h + y
    spike = (pre > 1.0).astype(float)
    dpre = (1.0 - spike) - pre * _surrogate(pre - 1.0)
    return pre * (1.0 - spike), dpre, 0.8 * dpre


class _Oracle:
    r"""D_RTRL or pp_prop for one state per unit, ``h' = f(h, y)`` with ``y = Σ_r x_r W_r + b``
    (``relations``: weight name -> ``x_r`` from ``(h, x)``) and the plain read-out ``out = h' W_out``,
    loss ``Σ_b w_b · 0.5 |out_b - target_b|²``. D_RTRL: ``ε_r ← D ε_r + x_r ⊗ g`` per row, gradient
    ``Σ_b ε_r[b] · ∂L/∂h'``; pp_prop: ``ε_x ← λ ε_x + x_r``, ``ε_f ← λ D ε_f + (1−λ) g``,
    ``c ← λ c + (1−λ)``, gradient ``ε_x^T (∂L/∂h' ⊙ ε_f / c)``; the bias keeps ``ε_b ← D ε_b + g``."""

    def __init__(self, cell, relations, alg, batch, n_hid):
        self.cell, self.relations, self.alg = cell, relations, alg
        self.h = np.zeros((batch, n_hid))
        self.eps, self.eps_b, self.eps_f, self.c = {}, np.zeros((batch, n_hid)), np.zeros((batch, n_hid)), 0.0

    def restart(self, rows):
        """Rows ``rows`` back to rest; D_RTRL restarts their traces, pp_prop every trace."""
        rows = np.asarray(rows, bool)
        self.h[rows] = 0.0
        if self.alg == "d_rtrl":
            for e in (*self.eps.values(), self.eps_b):
                e[rows] = 0.0
        elif rows.any():
            self.eps = {k: np.zeros_like(v) for k, v in self.eps.items()}
            self.eps_b, self.eps_f, self.c = np.zeros_like(self.eps_b), np.zeros_like(self.eps_f), 0.0

    def step(self, p, x, target, w=None):
        """``(gradients, per-row losses, output)`` of one step."""
        p = {k: np.asarray(v) for k, v in p.items()}
        x, target = np.asarray(x), np.asarray(target)
        xr = {name: fn(self.h, x) for name, fn in self.relations.items()}
        y = sum(xr[name] @ p[name] for name in self.relations) + p["b"]
        new, g, d = self.cell(p, self.h, y)
        out = new @ p["W_out"]
        err = out - target
        w = np.ones(len(x)) if w is None else np.asarray(w, float)
        ct = (w[:, None] * err) @ p["W_out"].T
        grads = {"W_out": new.T @ (w[:, None] * err)}
        self.eps_b = d * self.eps_b + g
        grads["b"] = np.sum(ct * self.eps_b, 0)
        if self.alg == "d_rtrl":
            for name, xv in xr.items():
                e = self.eps.get(name, 0.0)
                self.eps[name] = d[:, None, :] * e + xv[:, :, None] * g[:, None, :]
                grads[name] = np.einsum("bik,bk->ik", self.eps[name], ct)
        else:
            self.eps_f = LAM * d * self.eps_f + (1 - LAM) * g
            self.c = LAM * self.c + (1 - LAM)
            for name, xv in xr.items():
                self.eps[name] = LAM * self.eps.get(name, 0.0) + xv
                grads[name] = self.eps[name].T @ (ct * self.eps_f / self.c)
        self.h = new
        return grads, 0.5 * np.sum(err**2, -1), out


DENSE = dict(cell=_tanh_cell, relations={"W_in": lambda h, x: x, "W_rec": lambda h, x: h}, n_hid=4)


def _run(model, alg, p, xs, ys, weights=None, resets=None, per_row=True):
    """The oracle over ``xs`` ``(L, b, ...)`` from rest: ``(summed gradients, losses (L, b), outputs)``."""
    oracle = _Oracle(model["cell"], model["relations"], alg, xs.shape[1], model["n_hid"])
    total, losses, outs = None, [], []
    for t in range(xs.shape[0]):
        if resets is not None:
            oracle.restart(resets[t])
        g, loss, out = oracle.step(p, xs[t], ys[t], None if weights is None else weights[t])
        total = _add(total, g)
        losses.append(loss)
        outs.append(out)
    return total, np.stack(losses), np.stack(outs)


def _alone(model, alg, p, xs, ys, episodes):
    """The summed gradients of each row's ``episodes`` (row -> list of (start, stop)) run alone."""
    total = None
    for b, spans in episodes.items():
        for a, c in spans:
            total = _add(total, _run(model, alg, p, xs[a:c, b : b + 1], ys[a:c, b : b + 1])[0])
    return total


def _episodes(resets):
    out = {}
    for b in range(resets.shape[1]):
        starts = [0] + [t for t in range(1, T) if resets[t, b]] + [T]
        out[b] = list(zip(starts[:-1], starts[1:]))
    return out


def _add(a, b):
    return b if a is None else {k: a[k] + b[k] for k in a}


def _learner(spec, alg):
    module = om.build_module(spec)
    if alg == "d_rtrl":
        learner = braintrace.D_RTRL(module)
    else:
        learner = braintrace.pp_prop(module, decay_or_rank=LAM)
    return learner.compile_graph(jnp.zeros(spec.input_shape()))


def _names(grads):
    return {k[-1]: v for k, v in grads.items()}


def _padded_data(spec, seed=3):
    xs, ys = om.make_data(spec, T, seed=seed)
    rng = np.random.default_rng(seed)
    pad = ~VALID[..., None]
    xs = jnp.where(pad, jnp.asarray(50 * rng.standard_normal(xs.shape)), xs)
    ys = jnp.where(pad, jnp.asarray(1e3 * rng.standard_normal(ys.shape)), ys)
    return xs, ys


# ------------------------------------------------------------------------------------------------
# mask and lengths
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["d_rtrl", "pp_prop"])
def test_lengths_equal_each_sequence_run_alone(alg):
    spec = om.dense_rnn(batch=B)
    xs, ys = _padded_data(spec)
    want = _alone(DENSE, alg, spec.params, xs, ys, {b: [(0, n)] for b, n in enumerate(LENGTHS)})
    _, losses, _ = _run(DENSE, alg, spec.params, xs, ys)
    learner = _learner(spec, alg)
    got, loss = learner.etrace_grad(
        xs, ys, step_fn=row_loss, lengths=LENGTHS, return_value=True, loss_output="scalar"
    )
    om.assert_grads_close(_names(got), want, tol=1e-10, what=f"{alg} lengths, sum")
    np.testing.assert_allclose(float(loss), np.sum(losses * VALID), rtol=1e-12)
    # the published form (step_fn runs the learner) with the same pattern as a (T, B) mask; its
    # default reduction is the mean over the valid entries
    step = lambda x, y: row_loss(learner(x), y)  # noqa: E731
    mean = learner.etrace_grad(xs, ys, step_fn=step, mask=jnp.asarray(VALID), reset=True)
    om.assert_grads_close(
        _names(mean), {k: v / VALID.sum() for k, v in want.items()}, tol=1e-10, what=f"{alg} mask, mean"
    )


def test_a_step_mask_weighs_a_scalar_loss():
    spec = om.dense_rnn(batch=B)
    xs, ys = om.make_data(spec, T)
    weights = np.array([1.0, 0.0, 0.5, 1.0, 0.0, 2.0, 1.0])
    want, losses, _ = _run(DENSE, "d_rtrl", spec.params, xs, ys, weights=np.repeat(weights[:, None], B, 1))
    got, masked = _learner(spec, "d_rtrl").etrace_grad(
        xs,
        ys,
        step_fn=lambda o, y: jnp.sum(row_loss(o, y)),
        mask=weights,
        reduction="mean",
        return_value=True,
        loss_output="masked",
    )
    om.assert_grads_close(_names(got), {k: v / weights.sum() for k, v in want.items()}, tol=1e-10)
    np.testing.assert_allclose(np.asarray(masked), weights * losses.sum(1), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# resets
# ------------------------------------------------------------------------------------------------


def test_packed_stream_equals_the_episodes_run_apart_under_d_rtrl():
    spec = om.dense_rnn(batch=B)
    xs, ys = om.make_data(spec, T)
    want = _alone(DENSE, "d_rtrl", spec.params, xs, ys, _episodes(RESETS))
    # the resets matter: one sequence per row gives another gradient
    assert om.rel_err(_run(DENSE, "d_rtrl", spec.params, xs, ys)[0]["W_in"], want["W_in"]) > 1e-3
    learner = _learner(spec, "d_rtrl")
    got = learner.etrace_grad(xs, ys, step_fn=row_loss, resets=RESETS)
    om.assert_grads_close(_names(got), want, tol=1e-10, what="D_RTRL packed stream")
    step = lambda x, y: row_loss(learner(x), y)  # noqa: E731
    published = learner.etrace_grad(xs, ys, step_fn=step, resets=RESETS, reduction="sum", reset=True)
    om.assert_grads_close(_names(published), want, tol=1e-10, what="D_RTRL packed stream, published form")


def test_resets_restart_every_row_under_pp_prop():
    """pp_prop's traces restart for every row where any row resets; the states only in that row."""
    spec = om.dense_rnn(batch=B)
    xs, ys = om.make_data(spec, T)
    want = _run(DENSE, "pp_prop", spec.params, xs, ys, resets=RESETS)[0]
    assert (
        om.rel_err(_alone(DENSE, "pp_prop", spec.params, xs, ys, _episodes(RESETS))["W_in"], want["W_in"])
        > 1e-3
    )
    got = _learner(spec, "pp_prop").etrace_grad(xs, ys, step_fn=row_loss, resets=RESETS)
    om.assert_grads_close(_names(got), want, tol=1e-10, what="pp_prop packed stream")


@jax.custom_jvp
def _spike(v):
    return (v > 0).astype(v.dtype)


@_spike.defjvp
def _spike_jvp(primals, tangents):
    (v,), (dv,) = primals, tangents
    return _spike(v), dv / (1.0 + jnp.abs(v)) ** 2


def _hard_reset_neuron(batch):
    """``v' = pre (1 - spike(pre - 1))``, ``pre = 0.8 v + x W + b``: after a spike ``v`` is exactly 0,
    its initial value, while ``dv/dW`` (through the surrogate) is not."""
    rng = np.random.default_rng(11)
    params = {
        "W": jnp.asarray(rng.standard_normal((2, 3)) * 1.5),
        "b": jnp.asarray(rng.standard_normal(3) * 0.3 + 0.5),
        "W_out": jnp.asarray(rng.standard_normal((3, 2))),
    }
    ops = {"in": om.Op("dense", {"weight": "W", "bias": "b"}, x_fn=lambda p, h, x: x)}

    def step(p, h, x, ys):
        pre = 0.8 * h["v"] + ys["in"]
        return {"v": pre * (1.0 - _spike(pre - 1.0))}

    readout = lambda p, h, x: h["v"] @ p["W_out"]  # noqa: E731
    return om.PlainSpec("hard_reset", params, {"v": (3,)}, (("v",),), ops, step, readout, (2,), batch)


HARD_RESET = dict(cell=_hard_reset_cell, relations={"W": lambda h, x: x}, n_hid=3)


def test_a_reset_to_the_value_a_row_already_holds_restarts_its_traces():
    spec = _hard_reset_neuron(B)
    steps = 12
    xs, ys = om.make_data(spec, steps, seed=4)
    _, _, _ = _run(HARD_RESET, "d_rtrl", spec.params, xs, ys)
    oracle = _Oracle(_hard_reset_cell, HARD_RESET["relations"], "d_rtrl", B, 3)
    at_rest = []
    for t in range(steps):
        if t and np.all(oracle.h == 0.0, axis=1).any():
            at_rest += [(t, b) for b in np.flatnonzero(np.all(oracle.h == 0.0, axis=1))]
        oracle.step(spec.params, xs[t], ys[t])
    # a row whose every unit sits at its initial value 0 after the step before: a reset writes the
    # values it already holds
    assert at_rest, "the data must make a row spike in every unit at once"
    t0, b0 = at_rest[len(at_rest) // 2]
    resets = np.zeros((steps, B), bool)
    resets[t0, b0] = True
    episodes = {b: ([(0, t0), (t0, steps)] if b == b0 else [(0, steps)]) for b in range(B)}
    want = None
    for b, spans in episodes.items():
        for a, c in spans:
            want = _add(
                want, _run(HARD_RESET, "d_rtrl", spec.params, xs[a:c, b : b + 1], ys[a:c, b : b + 1])[0]
            )
    # the restart is what makes the difference: without it the traces of row b0 carry on
    assert om.rel_err(_run(HARD_RESET, "d_rtrl", spec.params, xs, ys)[0]["W"], want["W"]) > 1e-6
    learner = braintrace.D_RTRL(om.build_module(spec)).compile_graph(xs[0])
    got = learner.etrace_grad(xs, ys, step_fn=row_loss, resets=resets)
    om.assert_grads_close(_names(got), want, tol=1e-10, what="reset at rest")


# ------------------------------------------------------------------------------------------------
# aux
# ------------------------------------------------------------------------------------------------


def test_aux_stacked_and_reduced():
    spec = om.dense_rnn(batch=B)
    xs, ys = _padded_data(spec)
    want, losses, outs = _run(DENSE, "d_rtrl", spec.params, xs, ys, weights=VALID)
    learner = _learner(spec, "d_rtrl")

    def step(out, y):
        return row_loss(out, y), {"out": out, "mean": jnp.mean(out)}

    grads, aux = learner.etrace_grad(xs, ys, step_fn=step, has_aux=True, lengths=LENGTHS)
    om.assert_grads_close(_names(grads), want, tol=1e-10, what="has_aux")
    np.testing.assert_allclose(np.asarray(aux["out"]), outs, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(aux["mean"]), outs.mean(axis=(1, 2)), rtol=1e-12)

    _, loss, mean = learner.etrace_grad(
        xs,
        ys,
        step_fn=step,
        has_aux=True,
        lengths=LENGTHS,
        aux_reduction="mean",
        return_value=True,
        loss_output="scalar",
        reduction="mean",
    )
    # per row for the leaf whose leading axis is the batch, per step (every step has a valid row) otherwise
    np.testing.assert_allclose(np.asarray(mean["out"]), outs[VALID].mean(0), rtol=1e-12)
    np.testing.assert_allclose(float(mean["mean"]), outs.mean(axis=(1, 2)).mean(), rtol=1e-12)
    np.testing.assert_allclose(float(loss), losses[VALID].mean(), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# etrace_train
# ------------------------------------------------------------------------------------------------


class SGD:
    def __init__(self, lr):
        self.lr = lr

    def init(self, params):
        return ()

    def update(self, grads, state, params=None):
        return jax.tree.map(lambda g: -self.lr * g, grads), state


def test_etrace_train_with_a_mask_and_resets_equals_the_oracle():
    spec = om.dense_rnn(batch=B)
    xs, ys = _padded_data(spec)
    learner = _learner(spec, "d_rtrl")
    _, losses = learner.etrace_train(
        xs,
        ys,
        step_fn=row_loss,
        optimizer=SGD(0.05),
        update_every=3,
        mask=jnp.asarray(VALID),
        resets=RESETS,
        reduction="mean",
        losses="all",
    )
    params = {k: np.asarray(v) for k, v in spec.params.items()}
    oracle = _Oracle(DENSE["cell"], DENSE["relations"], "d_rtrl", B, DENSE["n_hid"])
    block, want_losses = None, []
    for t in range(T):
        oracle.restart(RESETS[t])
        g, loss, _ = oracle.step(params, xs[t], ys[t], VALID[t])
        block = _add(block, g)
        want_losses.append(loss)
        if (t + 1) % 3 == 0:  # the mean over the block's valid entries
            count = max(VALID[t - 2 : t + 1].sum(), 1)
            params = {k: v - 0.05 * block[k] / count for k, v in params.items()}
            block = None
    np.testing.assert_allclose(np.asarray(losses), np.stack(want_losses), rtol=1e-10)
    got = _names({k: v.value for k, v in learner.model.states(brainstate.ParamState).items()})
    om.assert_grads_close(got, params, tol=1e-12, what="parameters after training")


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_bad_masks_lengths_and_resets_are_named():
    spec = om.dense_rnn(batch=B)
    xs, ys = om.make_data(spec, T)
    learner = _learner(spec, "d_rtrl")
    grad = lambda **kw: learner.etrace_grad(xs, ys, **{"step_fn": row_loss, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="`mask` and `lengths`"):
        grad(mask=np.ones((T, B)), lengths=LENGTHS)
    with pytest.raises(ValueError, match=r"`mask` must have shape \(T,\) or \(T, B\) with T = 7"):
        grad(mask=np.ones((T + 1, B)))
    with pytest.raises(TypeError, match="`lengths` must hold integers"):
        grad(lengths=LENGTHS.astype(float))
    with pytest.raises(ValueError, match=r"`lengths` must have shape \(B,\)"):
        grad(lengths=LENGTHS[None])
    with pytest.raises(ValueError, match=r"`lengths` must lie in \[0, 7\]"):
        grad(lengths=np.array([8, 1, 1]))
    with pytest.raises(ValueError, match="`lengths` has 2 rows but step_fn returns 3"):
        grad(lengths=np.array([1, 2]))
    with pytest.raises(ValueError, match=r"weighs each batch row, but step_fn returns one scalar loss"):
        grad(step_fn=om.loss_fn, mask=np.ones((T, B)))
    with pytest.raises(ValueError, match="scalar loss per step or one loss per batch row"):
        grad(step_fn=lambda o, y: (o - y) ** 2)
    with pytest.raises(ValueError, match=r"`resets` must have shape \(T, B\)"):
        grad(resets=np.zeros((T, B, 1), bool))
    with pytest.raises(TypeError, match="`resets` must hold booleans"):
        grad(resets=np.zeros((T, B)))
    with pytest.raises(ValueError, match="`resets` has 2 rows, but state"):
        grad(resets=np.zeros((T, 2), bool))
    with pytest.raises(ValueError, match="resets.*window"):
        grad(resets=RESETS, window=2)
    with pytest.raises(ValueError, match="`aux_reduction` needs has_aux=True"):
        grad(aux_reduction="mean")
    with pytest.raises(TypeError, match=r"has_aux=True: step_fn must return a pair"):
        grad(has_aux=True)
    with pytest.raises(ValueError, match="`reduction` must be 'sum' or 'mean'"):
        grad(reduction="max")
    with pytest.raises(ValueError, match="`loss_output`"):
        grad(loss_output="all")
