"""DNI (synthetic gradients) against independent references, in float64.

* An untrained DNI (zero synthesiser) is D-RTRL's multi-step rule, bit for bit: gradients and
  outputs, through ``MultiStepData`` calls and ``etrace_grad(window=K)`` (a remainder window too).
* With a synthesiser that predicts the true future cotangent (computed here by BPTT through a
  plain-``jnp`` recursion, set window by window), the plain parameters' gradients summed over the
  windows equal BPTT's; the ETP parameters' stay D-RTRL's whatever the synthesiser predicts.
* The hidden cotangent at a window's entry is the bootstrapped target
  ``dL_k/dh_a + (dh_b/dh_a)^T M(h_b)``, with ``M`` written out in ``jnp``.
* ``train_synthetic_gradient`` lowers its regression error and moves the plain parameters'
  gradient towards BPTT's (cosine); the optax-style and stateful optimizer paths give the SGD result.
* ``SyntheticGradient`` equals its formula (affine and with a hidden layer); errors name the argument.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest

import braintrace
from braintrace import ETraceConfig, MultiStepData

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

I, H = 3, 4
LEAK = 0.6


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with om.float64():
        yield


class _Net(brainstate.nn.Module):
    """``h' = tanh(LEAK h + h U + x V + ETP(x, W))``: ``W`` an ETP input weight, ``U`` a plain
    recurrent matrix and ``V`` a plain input matrix."""

    def __init__(self, w, u, v):
        super().__init__()
        self.w = brainstate.ParamState(w)
        self.u = brainstate.ParamState(u)
        self.v = brainstate.ParamState(v)

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

    def update(self, x):
        pre = LEAK * self.h.value + self.h.value @ self.u.value + x @ self.v.value
        self.h.value = jnp.tanh(pre + braintrace.matmul(x, self.w.value))
        return self.h.value


def _step(p, h, x):
    return jnp.tanh(LEAK * h + h @ p["u"] + x @ p["v"] + x @ p["w"])


def _params(seed):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((I, H)) * 0.5),
        "u": jnp.asarray(rng.standard_normal((H, H)) * 0.4),
        "v": jnp.asarray(rng.standard_normal((I, H)) * 0.5),
    }


def _data(seed, steps, batch):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((steps, batch, I))), jnp.asarray(
        rng.standard_normal((steps, batch, H))
    )


def _learner(cls, p, batch, xs, **kw):
    model = _Net(p["w"], p["u"], p["v"])
    brainstate.nn.init_all_states(model, batch_size=batch)
    alg = cls(model, vjp_method="multi-step", **kw) if cls is braintrace.D_RTRL else cls(model, **kw)
    return alg.compile_graph(xs[0])


def _named(grads):
    return {str(k[-1]): v for k, v in grads.items()}


def _window_grad_fn(alg):
    """``(xs_w, ys_w) -> (gradients, outputs)`` of one window's loss, jitted."""
    params = alg.model.states(brainstate.ParamState)

    def grads(xw, yw):
        def loss():
            out = alg(MultiStepData(xw))
            return jax.vmap(om.loss_fn)(out, yw).sum(), out

        return brainstate.transform.grad(loss, params, has_aux=True)()

    return brainstate.transform.jit(grads)


def _window_grads(alg, xs, ys, k):
    """Gradients of every window's loss, one differentiation per window, summed; and the outputs."""
    fn = _window_grad_fn(alg)
    total, outs = None, []
    for s in range(0, xs.shape[0], k):
        g, out = fn(xs[s : s + k], ys[s : s + k])
        total = g if total is None else {key: total[key] + g[key] for key in g}
        outs.append(out)
    return _named(total), jnp.concatenate(outs)


@jax.jit
def _bptt_and_adjoints(p, xs, ys):
    """BPTT's gradients and, per step ``t``, ``d(sum_{s >= t} L_s)/dh_t`` (the cotangent of a
    perturbation added to the input hidden value of step ``t``), through the plain recursion."""

    def total(p, e):
        def body(h, inp):
            x, y, e_t = inp
            h = _step(p, h + e_t, x)
            return h, om.loss_fn(h, y)

        _, losses = jax.lax.scan(body, jnp.zeros(xs.shape[1:2] + (H,)), (xs, ys, e))
        return losses.sum()

    return jax.grad(total, argnums=(0, 1))(p, jnp.zeros(xs.shape[:2] + (H,)))


def _bptt(p, xs, ys):
    return _bptt_and_adjoints(p, xs, ys)[0]


def _hidden_path(p, xs):
    """``[h_0, h_1, ..., h_T]`` of the plain recursion from zero."""
    hs = [jnp.zeros(xs.shape[1:2] + (H,))]
    for t in range(xs.shape[0]):
        hs.append(_step(p, hs[-1], xs[t]))
    return hs


def _future_cotangent(p, xs, ys, b):
    """``d(sum_{t >= b} L_t)/dh_b`` (zero at the end of the sequence)."""
    adjoints = _bptt_and_adjoints(p, xs, ys)[1]
    return adjoints[b] if b < xs.shape[0] else jnp.zeros_like(adjoints[0])


def _cos(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------------------------------
# untrained DNI is the multi-step rule
# ------------------------------------------------------------------------------------------------


def test_untrained_dni_is_d_rtrl_multi_step_bit_for_bit_and_etp_weights_ignore_the_synthesiser():
    p = _params(0)
    xs, ys = _data(1, 6, 2)
    dni = _learner(braintrace.DNI, p, 2, xs)
    ref = _learner(braintrace.D_RTRL, p, 2, xs)
    assert isinstance(dni.synthesizer, braintrace.SyntheticGradient)
    assert dni.synthesizer.weights[0].value.dtype == jnp.float64
    # windows of 4 and 2 steps: gradients and per-step losses (so outputs) bit for bit
    got, got_loss = dni.etrace_grad(xs, ys, step_fn=om.loss_fn, window=4, return_value=True)
    want, want_loss = ref.etrace_grad(xs, ys, step_fn=om.loss_fn, window=4, return_value=True)
    assert np.array_equal(got_loss, want_loss)
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    assert om.rel_err(want[("u",)], _bptt(p, xs, ys)["u"]) > 1e-3  # the truncation is visible
    # a live synthesiser: the ETP weight's gradient is still D-RTRL's, the plain ones move
    dni.attach_synthesizer(braintrace.SyntheticGradient({0: (2, H, 1)}, scale=0.5, seed=3))
    live, live_loss = dni.etrace_grad(xs, ys, step_fn=om.loss_fn, window=4, return_value=True)
    assert np.array_equal(live[("w",)], want[("w",)]) and np.array_equal(live_loss, want_loss)
    assert om.rel_err(live[("u",)], want[("u",)]) > 1e-3 and om.rel_err(live[("v",)], want[("v",)]) > 1e-3


# ------------------------------------------------------------------------------------------------
# the exact future: BPTT for the plain parameters
# ------------------------------------------------------------------------------------------------


def test_the_true_future_cotangent_gives_bptt_for_plain_parameters():
    p = _params(2)
    steps, k = 6, 2
    xs, ys = _data(3, steps, 1)  # one row: the synthesiser's bias is the prediction
    dni = _learner(braintrace.DNI, p, 1, xs)
    synth = dni.synthesizer
    fn = _window_grad_fn(dni)
    total = None
    for s in range(0, steps, k):
        g = _future_cotangent(p, xs, ys, s + k)  # (1, H): the true exit cotangent
        synth.weights[0].value = jnp.zeros_like(synth.weights[0].value)
        synth.biases[0].value = g.reshape(-1)
        grads, _ = fn(xs[s : s + k], ys[s : s + k])
        total = grads if total is None else {key: total[key] + grads[key] for key in grads}
    got, bptt = _named(total), _bptt(p, xs, ys)
    assert om.rel_err(got["u"], bptt["u"]) < 1e-12 and om.rel_err(got["v"], bptt["v"]) < 1e-12
    # the ETP weight keeps D-RTRL's multi-step gradient (its future arrives through the traces)
    ref, _ = _window_grads(_learner(braintrace.D_RTRL, p, 1, xs), xs, ys, k)
    assert np.array_equal(got["w"], ref["w"])
    assert om.rel_err(ref["u"], bptt["u"]) > 1e-3 and om.rel_err(ref["v"], bptt["v"]) > 1e-3


def _window_oracle(p, xs, ys, start, stop):
    """``h_start -> (sum_{start <= t < stop} L_t, h_stop)`` through the plain recursion."""

    def window(h):
        acc = 0.0
        for t in range(start, stop):
            h = _step(p, h, xs[t])
            acc = acc + om.loss_fn(h, ys[t])
        return acc, h

    return window


def test_the_entry_cotangent_is_the_bootstrapped_target():
    p = _params(6)
    xs, ys = _data(7, 4, 3)
    live = braintrace.SyntheticGradient({0: (3, H, 1)}, scale=0.4, seed=1)
    dni = _learner(braintrace.DNI, p, 3, xs, synthesizer=live)
    hidden = dni.model.states(brainstate.HiddenState)

    def entry_cotangent(xw, yw):
        loss = lambda: jax.vmap(om.loss_fn)(dni(MultiStepData(xw)), yw).sum()  # noqa: E731
        return brainstate.transform.grad(loss, hidden)()

    fn = brainstate.transform.jit(entry_cotangent)
    fn(xs[:2], ys[:2])  # the first window moves the state to h_2
    (got,) = fn(xs[2:], ys[2:]).values()
    a, b = live.weights[0].value, live.biases[0].value
    window = _window_oracle(p, xs, ys, 2, 4)
    h_entry = _hidden_path(p, xs)[2]
    (_, h_exit), vjp = jax.vjp(window, h_entry)
    (want,) = vjp((1.0, h_exit @ a + b))  # M(h_exit) = h_exit A + b, one row per batch element
    assert om.rel_err(got, want) < 1e-12
    assert om.rel_err(got, jax.grad(lambda h: window(h)[0])(h_entry)) > 1e-3


# ------------------------------------------------------------------------------------------------
# training the synthesiser
# ------------------------------------------------------------------------------------------------


def test_training_fits_the_bootstrapped_targets_and_moves_plain_gradients_to_bptt():
    p = _params(8)
    steps, batch, k, epochs = 8, 16, 2, 20
    xs, _ = _data(9, steps, batch)
    ys = jnp.zeros((steps, batch, H))
    dni = _learner(braintrace.DNI, p, batch, xs)
    untrained = _named(dni.etrace_grad(xs, ys, step_fn=om.loss_fn, window=k))
    errors = braintrace.train_synthetic_gradient(
        dni, xs, chunk_size=k, loss_fn=om.loss_fn, targets=ys, lr=0.1, epochs=epochs
    )
    assert len(errors) == epochs and all(np.isfinite(errors))
    assert all(np.array_equal(dni.model.states()[(n,)].value, p[n]) for n in p)  # the model is unchanged

    # the regression error against the bootstrapped targets of the trained M, written out here,
    # and against the same targets with M = 0
    @jax.jit
    def regression_errors(a, b):
        m = lambda h: h @ a + b  # noqa: E731
        hs = _hidden_path(p, xs)
        err_m, err_0 = [], []
        for s in range(0, steps, k):
            (_, h_exit), vjp = jax.vjp(_window_oracle(p, xs, ys, s, s + k), hs[s])
            (target,) = vjp((1.0, m(h_exit)))
            err_m.append(jnp.mean((m(hs[s]) - target) ** 2))
            err_0.append(jnp.mean(target**2))
        err_m.append(jnp.mean(m(hs[steps]) ** 2))  # the final state's target is 0
        err_0.append(jnp.zeros(()))
        return jnp.stack(err_m), jnp.stack(err_0)

    err_m, err_0 = regression_errors(dni.synthesizer.weights[0].value, dni.synthesizer.biases[0].value)
    assert np.mean(err_m) < 0.9 * np.mean(err_0), (err_m, err_0)
    assert abs(errors[-1] - np.mean(err_m)) < 0.05 * np.mean(err_m)  # converged: the last epoch's error
    trained = _named(dni.etrace_grad(xs, ys, step_fn=om.loss_fn, window=k))
    bptt = _bptt(p, xs, ys)
    for name in ("u", "v"):
        before, after = _cos(untrained[name], bptt[name]), _cos(trained[name], bptt[name])
        assert after > before + 0.02, (name, before, after)
    assert np.array_equal(trained["w"], untrained["w"])


class _OptaxSGD:
    """An optax-style GradientTransformation (init / update(grads, state, params))."""

    def __init__(self, lr):
        self.lr = lr

    def init(self, params):
        return ()

    def update(self, grads, state, params=None):
        return jax.tree.map(lambda g: -self.lr * g, grads), state


class _StatefulSGD:
    """An optimizer registered against the synthesiser's states, updating them itself."""

    def __init__(self, states, lr):
        self.states, self.lr = states, lr

    def update(self, grads):
        for key, st in self.states.items():
            st.value = st.value - self.lr * grads[key]


def test_optimizer_forms_and_fresh_states_give_the_same_fit():
    p = _params(10)
    xs, _ = _data(11, 4, 2)
    results = []
    for form in ("sgd", "optax", "stateful"):
        dni = _learner(braintrace.DNI, p, 2, xs)
        synth = dni.synthesizer
        opt = {"optax": _OptaxSGD(0.05), "stateful": _StatefulSGD(synth.states_dict(), 0.05)}.get(form)
        fresh = dict(batch_size=2) if form == "sgd" else {}  # init_all_states: the compile-time zeros again
        errors = braintrace.train_synthetic_gradient(
            dni, xs, chunk_size=2, optimizer=opt, lr=0.05, epochs=2, **fresh
        )
        results.append((errors, synth.param_values()))
    for errors, values in results[1:]:
        assert np.allclose(errors, results[0][0], rtol=1e-12, atol=0)
        for key in values:
            assert np.allclose(values[key], results[0][1][key], rtol=1e-12, atol=1e-15), key
    assert float(jnp.abs(results[0][1][("weights", 0)]).max()) > 0


def test_etrace_train_runs_one_step_windows():
    p = _params(12)
    xs, ys = _data(13, 5, 2)
    live = braintrace.SyntheticGradient({0: (2, H, 1)}, scale=0.3, seed=5)
    dni = _learner(braintrace.DNI, p, 2, xs, synthesizer=live)
    want = dni.etrace_grad(xs, ys, step_fn=om.loss_fn, window=1)
    start = {key: st.value for key, st in dni.model.states(brainstate.ParamState).items()}
    dni.etrace_train(xs, ys, step_fn=om.loss_fn, optimizer=_OptaxSGD(1.0), update_every=5, reset=True)
    for key, st in dni.model.states(brainstate.ParamState).items():
        assert om.rel_err(start[key] - st.value, want[key]) < 1e-12, key


# ------------------------------------------------------------------------------------------------
# the synthesiser, the axes, the names, the errors
# ------------------------------------------------------------------------------------------------


def test_synthesiser_equals_its_formula():
    rng = np.random.default_rng(14)
    h = rng.standard_normal((5, 2, 3, 2))  # lead (5, 2), H = 3, n = 2
    affine = braintrace.SyntheticGradient({1: (5, 2, 3, 2)}, scale=0.7, seed=2)
    assert affine.weights[1].value.shape == (6, 6) and float(np.std(affine.weights[1].value)) > 0.2
    values = {k: rng.standard_normal(np.shape(v)) for k, v in affine.param_values().items()}
    got = affine.apply(values, {1: jnp.asarray(h)})[1]
    want = (h.reshape(5, 2, 6) @ values[("weights", 1)] + values[("biases", 1)]).reshape(h.shape)
    assert om.rel_err(got, want) < 1e-14
    mlp = braintrace.SyntheticGradient({1: (5, 2, 3, 2)}, hidden_width=7, seed=2)
    assert float(np.abs(mlp({1: jnp.asarray(h)})[1]).max()) == 0.0  # the last layer starts at zero
    values = {k: rng.standard_normal(np.shape(v)) for k, v in mlp.param_values().items()}
    hidden = np.maximum(h.reshape(5, 2, 6) @ values[("hidden_weights", 1)] + values[("hidden_biases", 1)], 0)
    want = (hidden @ values[("weights", 1)] + values[("biases", 1)]).reshape(h.shape)
    assert om.rel_err(mlp.apply(values, {1: jnp.asarray(h)})[1], want) < 1e-14


def test_compile_names_and_configs_select_dni():
    p = _params(15)
    xs, _ = _data(16, 2, 2)
    model = _Net(p["w"], p["u"], p["v"])
    alg = braintrace.compile(model, "dni", xs[0], batch_size=2)
    assert type(alg) is braintrace.DNI and alg.config == ETraceConfig(learning_signal="bootstrapped")
    assert alg.learning_signal == "symmetric" and alg.vjp_method == "multi-step"
    cfg = ETraceConfig(learning_signal="bootstrapped", temporal_recursion="scalar_leak", decay=0.5)
    alg = braintrace.compile(_Net(p["w"], p["u"], p["v"]), cfg, xs[0], batch_size=2)
    assert type(alg) is braintrace.DNI and alg.config == cfg
    assert alg.group_signal_shapes() == {0: (2, H, 1)}
    with pytest.raises(ValueError, match="learning_signal='bootstrapped'.*per_param"):
        ETraceConfig(learning_signal="bootstrapped", trace_factorization="io_factorized", decay=0.5)
    with pytest.raises(ValueError, match="learning_signal='bootstrapped'.*diagonal"):
        ETraceConfig(learning_signal="bootstrapped", recurrence_scope="full")


def test_errors_name_the_argument():
    p = _params(17)
    xs, _ = _data(18, 4, 2)
    model = _Net(p["w"], p["u"], p["v"])
    brainstate.nn.init_all_states(model, batch_size=2)
    with pytest.raises(ValueError, match="vjp_method"):
        braintrace.DNI(model, vjp_method="single-step")
    with pytest.raises(TypeError, match="synthesizer"):
        braintrace.DNI(model, synthesizer=lambda h: h)
    with pytest.raises(ValueError, match="config.learning_signal"):
        braintrace.DNI(model, config=ETraceConfig())
    with pytest.raises(TypeError, match="config"):
        braintrace.DNI(model, config="bootstrapped")
    with pytest.raises(RuntimeError, match="compile"):
        braintrace.DNI(model).group_signal_shapes()
    for kwargs, error, name in [
        (dict(group_shapes={}), TypeError, "group_shapes"),
        (dict(group_shapes={0: (0, 1)}), ValueError, "group_shapes"),
        (dict(group_shapes={0: ()}), ValueError, "group_shapes"),
        (dict(group_shapes={0: (2, 1)}, scale=-1.0), ValueError, "scale"),
        (dict(group_shapes={0: (2, 1)}, hidden_width=0), ValueError, "hidden_width"),
        (dict(group_shapes={0: (2, 1)}, dtype=jnp.int32), TypeError, "dtype"),
    ]:
        with pytest.raises(error, match=name):
            braintrace.SyntheticGradient(**kwargs)
    synth = braintrace.SyntheticGradient({0: (2, H, 1)})
    with pytest.raises(ValueError, match="group_hiddens"):
        synth.apply(synth.param_values(), {0: jnp.zeros((2, H + 1, 1))})
    with pytest.raises(ValueError, match="group_hiddens"):
        synth.apply(synth.param_values(), {1: jnp.zeros((2, H, 1))})
    dni = braintrace.DNI(model).compile_graph(xs[0])
    with pytest.raises(ValueError, match="synthesizer"):
        dni.attach_synthesizer(braintrace.SyntheticGradient({0: (2, H, 2)}))
    with pytest.raises(ValueError, match="synthesizer"):
        braintrace.DNI(model, synthesizer=braintrace.SyntheticGradient({0: (2, H + 1, 1)})).compile_graph(
            xs[0]
        )
    with pytest.raises(TypeError, match="synthesizer"):
        dni.attach_synthesizer(None)
    train = braintrace.train_synthetic_gradient
    with pytest.raises(TypeError, match="learner"):
        train(braintrace.D_RTRL(model), xs)
    with pytest.raises(ValueError, match="learner"):
        train(braintrace.DNI(model), xs)
    for kwargs, error, name in [
        (dict(chunk_size=3), ValueError, "chunk_size=3"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=2.0), TypeError, "chunk_size"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr="fast"), TypeError, "lr"),
        (dict(epochs=0), ValueError, "epochs"),
        (dict(reset=1), TypeError, "reset"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(loss_fn=3), TypeError, "loss_fn"),
        (dict(optimizer=object()), TypeError, "optimizer"),
        (dict(targets=jnp.zeros((3, 2, H))), ValueError, "targets"),
    ]:
        with pytest.raises(error, match=name):
            train(dni, xs, **kwargs)
    with pytest.raises(ValueError, match="inputs"):
        train(dni, (xs, xs[:3]))
