"""``braintrace.compile`` + ``etrace_grad``, memory in T, bad input, units, and trace resets."""

from __future__ import annotations

import brainstate
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest
import saiunit as u

import braintrace
from braintrace._compatible_imports import jaxpr_of
from braintrace._compiler.jaxpr_tools import sub_jaxprs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 10
ALGORITHMS = {
    "d_rtrl": ({}, lambda m: braintrace.D_RTRL(m)),
    "pp_prop": ({"decay_or_rank": 0.8}, lambda m: braintrace.pp_prop(m, 0.8)),
}


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with om.float64():
        yield


# ------------------------------------------------------------------------------------------------
# etrace_grad
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_etrace_grad_equals_summed_per_step_gradients(name):
    options, make = ALGORITHMS[name]
    spec = om.two_state(batch=3, recurrent=True)
    xs, targets = om.make_data(spec, STEPS)

    module = om.build_module(spec, init=False)
    learner = braintrace.compile(module, name, xs[0], batch_size=spec.batch, **options)
    grads, losses = learner.etrace_grad(xs, targets, step_fn=om.loss_fn, return_value=True)
    assert set(grads) == {(n,) for n in spec.params}

    reference = om.build_module(spec)
    per_step, per_step_losses = om.run_online(make(reference), reference, xs, targets)
    om.assert_grads_close(
        {k[-1]: v for k, v in grads.items()},
        {k: v.sum(0) for k, v in per_step.items()},
        tol=1e-12,
        what=f"etrace_grad ({name}) vs summed per-step gradients",
    )
    assert losses.shape == (STEPS,)
    np.testing.assert_allclose(np.asarray(losses), np.asarray(per_step_losses), rtol=1e-12)

    # the sequence restarts from the compiled initial states: a second call gives the same result
    again = learner.etrace_grad(xs, targets, step_fn=om.loss_fn)
    for k in grads:
        np.testing.assert_allclose(np.asarray(again[k]), np.asarray(grads[k]), rtol=1e-12, atol=0)


# etrace_grad computes dL/dh first and then updates and solves each trace in one pass (a different
# order than a step under brainstate's grad): it must still equal the independent oracles.
DRIVER_MODELS = {
    "dense_rnn_bias": lambda: om.dense_rnn(batch=3),
    "two_state": lambda: om.two_state(batch=3, recurrent=True),
    "two_hidden_groups": lambda: om.two_groups(batch=3),
    "sparse_csr": lambda: om.sparse_rnn(batch=3),
    "lora_recurrent": lambda: om.lora_rnn(batch=3),
    "conv": lambda: om.conv_leaky(batch=2),
    "elementwise_time_constant": lambda: om.elemwise_tau(batch=3),
    "plain_parameter_input": lambda: om.tiny_rnn_plain_input(batch=3),
    "unbatched_two_state": lambda: om.two_state(batch=None, recurrent=True),
    "unbatched_sparse": lambda: om.sparse_rnn(batch=None),
    "unbatched_lora": lambda: om.lora_rnn(batch=None),
}


@pytest.mark.parametrize("name", ["d_rtrl", "pp_prop"])
@pytest.mark.parametrize("model", list(DRIVER_MODELS))
def test_etrace_grad_equals_the_oracles(model, name):
    spec = DRIVER_MODELS[model]()
    xs, targets = om.make_data(spec, STEPS)
    options, _ = ALGORITHMS[name]
    learner = braintrace.compile(om.build_module(spec), name, xs[0], **options)
    grads = learner.etrace_grad(xs, targets, step_fn=om.loss_fn)
    if name == "d_rtrl":
        want = om.masked_rtrl(spec, xs, targets)
    else:
        want = om.pp_prop_oracle(spec, xs, targets, options["decay_or_rank"])
    om.assert_grads_close(
        {k[-1]: v for k, v in grads.items()},
        {k: v.sum(0) for k, v in want.items()},
        what=f"etrace_grad {name} on {spec.name} vs the oracle, summed over {STEPS} steps",
    )


def test_etrace_grad_factored_lora_equals_per_step_gradients():
    spec = om.lora_rnn(batch=3)
    xs, targets = om.make_data(spec, STEPS)
    module = om.build_module(spec, init=False)
    learner = braintrace.compile(
        module, "d_rtrl", xs[0], batch_size=spec.batch, lora_factored=True, decay_or_rank=0.7
    )
    grads = learner.etrace_grad(xs, targets, step_fn=om.loss_fn)
    reference = om.build_module(spec)
    per_step, _ = om.run_online(
        braintrace.D_RTRL(reference, lora_factored=True, decay_or_rank=0.7), reference, xs, targets
    )
    om.assert_grads_close(
        {k[-1]: v for k, v in grads.items()},
        {k: v.sum(0) for k, v in per_step.items()},
        tol=1e-12,
        what="etrace_grad, factored LoRA trace, vs summed per-step gradients",
    )


# solve_every=K: pp_prop forms the x-dependent weight gradients once per block of K steps from the
# stored factors. Same sums as the per-step solve; STEPS=10 with K=3 leaves a remainder block.
# K=3: three blocks and a remainder of one step; K=16 > STEPS: the remainder block alone. The
# models: each factored primitive (dense with bias, CSR, LoRA, conv), two hidden groups (their
# cotangents summed before the product), a plain parameter, and unbatched layers (not factored).
SOLVE_EVERY_CASES = [
    (m, 3)
    for m in (
        "dense_rnn_bias",
        "sparse_csr",
        "lora_recurrent",
        "conv",
        "two_hidden_groups",
        "plain_parameter_input",
        "unbatched_sparse",
    )
] + [("sparse_csr", 16)]


@pytest.mark.parametrize("model,solve_every", SOLVE_EVERY_CASES)
def test_solve_every_equals_the_pp_prop_oracle(model, solve_every):
    spec = DRIVER_MODELS[model]()
    xs, targets = om.make_data(spec, STEPS)
    learner = braintrace.compile(om.build_module(spec), "pp_prop", xs[0], decay_or_rank=0.8)
    grads, losses = learner.etrace_grad(
        xs, targets, step_fn=om.loss_fn, return_value=True, solve_every=solve_every
    )
    want = om.pp_prop_oracle(spec, xs, targets, 0.8)
    om.assert_grads_close(
        {k[-1]: v for k, v in grads.items()},
        {k: v.sum(0) for k, v in want.items()},
        what=f"etrace_grad pp_prop solve_every={solve_every} on {spec.name} vs the oracle",
    )
    per_step = learner.etrace_grad(xs, targets, step_fn=om.loss_fn, return_value=True)[1]
    assert losses.shape == (STEPS,)
    np.testing.assert_allclose(np.asarray(losses), np.asarray(per_step), rtol=1e-12)
    factored = {r.primitive.name for r in learner._factored_relations()}
    if spec.batch is None:
        assert not factored  # unbatched primitives keep the per-step solve
    elif model in ("dense_rnn_bias", "sparse_csr", "lora_recurrent", "conv"):
        assert factored, f"{model}: no relation formed its gradient from factors"


class _DecayingWeight(brainstate.nn.Module):
    """``h' = tanh(x W + x V + 0.5 h)`` where the step also writes ``W <- 0.99 W``: ``W``'s operand
    changes from step to step, so its gradient cannot be summed over steps before routing; ``V``'s
    can."""

    def __init__(self, n_in=3, n_hid=4):
        super().__init__()
        rng = np.random.default_rng(3)
        self.W = brainstate.ParamState(jnp.asarray(rng.normal(size=(n_in, n_hid)) * 0.6))
        self.V = brainstate.ParamState(jnp.asarray(rng.normal(size=(n_in, n_hid)) * 0.6))

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, self.W.value.shape[1])))

    def update(self, x):
        w, v = self.W.value, self.V.value
        self.h.value = jnp.tanh(braintrace.matmul(x, w) + braintrace.matmul(x, v) + 0.5 * self.h.value)
        self.W.value = 0.99 * w
        return self.h.value


def test_solve_every_keeps_the_per_step_solve_for_weights_written_by_the_step():
    rng = np.random.default_rng(4)
    xs, ys = jnp.asarray(rng.normal(size=(STEPS, 2, 3))), jnp.asarray(rng.normal(size=(STEPS, 2, 4)))
    loss = lambda out, y: jnp.mean((out - y) ** 2)
    results = []
    for k in (1, 4):  # fresh models: the step writes W, so a second run would start elsewhere
        learner = braintrace.compile(_DecayingWeight(), "pp_prop", xs[0], batch_size=2, decay_or_rank=0.7)
        factored = [r.trainable_vars for r in learner._factored_relations()]
        results.append(learner.etrace_grad(xs, ys, step_fn=loss, solve_every=k))
    assert len(learner.graph.hidden_param_op_relations) == 2 and len(factored) == 1  # V only
    for key in results[0]:
        assert om.rel_err(results[1][key], results[0][key]) < 1e-12, key


def test_solve_every_forms_the_sparse_weight_gradient_once_per_block():
    """The SDDMM of the sparse layer leaves the per-step loop: one per block of K steps."""
    spec = om.sparse_rnn(batch=3)
    xs, targets = om.make_data(spec, 8)
    learner = braintrace.compile(om.build_module(spec), "pp_prop", xs[0], decay_or_rank=0.8)
    run = lambda k: lambda xs, ys: learner.etrace_grad(xs, ys, step_fn=om.loss_fn, solve_every=k)
    per_step = brainstate.transform.make_jaxpr(run(1))(xs, targets)[0]
    blocked = brainstate.transform.make_jaxpr(run(4))(xs, targets)[0]
    count = lambda eqn: _primitive_names(eqn.params["jaxpr"]).count("csr_sddmm")
    (loop,) = _outermost_scans(per_step)
    (blocks,) = _outermost_scans(blocked)  # 8 = 2 blocks of 4, no remainder
    (steps,) = _outermost_scans(blocks.params["jaxpr"])
    # (the bias key's exact trace goes through the same xy_to_dw rule; its unused weight product
    # stays in the step and is removed by XLA's dead-code elimination)
    assert count(loop) >= 1
    assert count(steps) == count(loop) - 1  # the weight's SDDMM left the per-step loop ...
    assert count(blocks) - count(steps) == 1  # ... for one per block


def _outermost_scans(jaxpr):
    """The ``scan`` equations of ``jaxpr``, looking through calls (``pjit``) but not into scans."""
    found = []
    for eqn in jaxpr_of(jaxpr).eqns:
        if eqn.primitive.name == "scan":
            found.append(eqn)
        else:
            for sub in sub_jaxprs(eqn):
                found.extend(_outermost_scans(sub))
    return found


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_solve_every_must_be_a_positive_int(bad):
    spec = om.dense_rnn(batch=2)
    xs, targets = om.make_data(spec, 3)
    learner = braintrace.compile(om.build_module(spec), "pp_prop", xs[0])
    with pytest.raises(ValueError, match="solve_every"):
        learner.etrace_grad(xs, targets, step_fn=om.loss_fn, solve_every=bad)


def test_solve_every_is_refused_by_d_rtrl():
    spec = om.dense_rnn(batch=2)
    xs, targets = om.make_data(spec, 3)
    learner = braintrace.compile(om.build_module(spec), "d_rtrl", xs[0])
    with pytest.raises(ValueError, match="solve_every=2.*pp_prop / ES_D_RTRL.*solves its traces every step"):
        learner.etrace_grad(xs, targets, step_fn=om.loss_fn, solve_every=2)


def test_return_value_false_returns_only_gradients():
    spec = om.leaky_ff(batch=2)
    xs, targets = om.make_data(spec, 4)
    learner = braintrace.compile(om.build_module(spec, init=False), "d_rtrl", xs[0], batch_size=2)
    grads = learner.etrace_grad(xs, targets, step_fn=om.loss_fn)
    assert isinstance(grads, dict) and set(grads) == {(n,) for n in spec.params}


# ------------------------------------------------------------------------------------------------
# memory does not grow with T (with a BPTT control that does)
# ------------------------------------------------------------------------------------------------


def _temp_bytes(fn, *args):
    return brainstate.transform.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_online_memory_does_not_grow_with_sequence_length():
    """``etrace_grad`` compiled for T=10 and T=1000 needs the same temporary memory under D-RTRL and
    pp_prop, while the BPTT control (``grad`` through ``scan`` of the same model) grows with T."""
    spec = om.two_state(batch=4, n_hid=16, recurrent=True)
    x0 = jnp.zeros(spec.input_shape())
    seqs = {
        steps: (jnp.zeros((steps, *spec.input_shape())), jnp.zeros((steps, *spec.output_shape())))
        for steps in (10, 1000)
    }

    module = om.build_module(spec)
    params = module.states(brainstate.ParamState)

    def bptt(xs, ys):
        def total():
            def body(acc, inp):
                x, y = inp
                return acc + om.loss_fn(module(x), y), None

            acc, _ = brainstate.transform.scan(body, jnp.zeros(()), (xs, ys))
            return acc

        return brainstate.transform.grad(total, params)()

    bptt_10, bptt_1000 = (_temp_bytes(bptt, *seqs[t]) for t in (10, 1000))
    # BPTT keeps (at least) both hidden states of every step for the backward pass ...
    assert bptt_1000 - bptt_10 >= 990 * 2 * spec.batch * 16 * 8, (bptt_10, bptt_1000)

    for name, (options, _) in ALGORITHMS.items():
        learner = braintrace.compile(
            om.build_module(spec, init=False), name, x0, batch_size=spec.batch, **options
        )
        online = lambda xs, ys: learner.etrace_grad(xs, ys, step_fn=om.loss_fn)
        online_10, online_1000 = (_temp_bytes(online, *seqs[t]) for t in (10, 1000))
        # ... the online learners keep none of them
        assert online_1000 <= online_10 + 1024, (name, online_10, online_1000, bptt_10, bptt_1000)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_step_before_compile_graph_is_a_runtime_error():
    spec = om.leaky_ff(batch=2)
    alg = braintrace.D_RTRL(om.build_module(spec))
    with pytest.raises(RuntimeError, match="compile_graph"):
        alg(jnp.zeros(spec.input_shape()))
    with pytest.raises(RuntimeError, match="compile_graph"):
        alg.etrace_grad(jnp.zeros((3, *spec.input_shape())), jnp.zeros((3, 2, 2)), step_fn=om.loss_fn)


@pytest.mark.parametrize("shape", [(2, 4), (3, 3)])
def test_input_shape_differs_from_compile_time(shape):
    spec = om.leaky_ff(batch=2, n_in=3)
    alg = braintrace.D_RTRL(om.build_module(spec))
    alg.compile_graph(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="compile"):
        alg(jnp.zeros(shape))


def test_input_that_fits_the_states_compiles_again():
    # an unbatched input broadcast against batched states is a valid step of this model
    spec = om.leaky_ff(batch=2, n_in=3)
    alg = braintrace.D_RTRL(om.build_module(spec))
    alg.compile_graph(jnp.zeros((2, 3)))
    graph = alg.graph
    assert alg(jnp.ones((3,))).shape == (2, 2)
    assert alg.graph is not graph


def test_unknown_algorithm_name_lists_the_names():
    spec = om.leaky_ff(batch=2)
    with pytest.raises(ValueError) as info:
        braintrace.compile(om.build_module(spec), "bptt", jnp.zeros(spec.input_shape()))
    for name in ("d_rtrl", "pp_prop", "es_d_rtrl"):
        assert name in str(info.value)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_loss_independent_of_output_gives_zero_gradients(name):
    """A step loss that ignores the model's output: the run completes, every gradient is exactly
    zero, and a warning says why."""
    options, _ = ALGORITHMS[name]
    spec = om.leaky_ff(batch=2)
    xs, targets = om.make_data(spec, 4)
    learner = braintrace.compile(om.build_module(spec, init=False), name, xs[0], batch_size=2, **options)
    with pytest.warns(UserWarning, match="does not depend on the model output"):
        grads, losses = learner.etrace_grad(
            xs, targets, step_fn=lambda out, y: jnp.sum(y**2), return_value=True
        )
    for k, g in grads.items():
        assert np.all(np.asarray(g) == 0), k
    np.testing.assert_allclose(np.asarray(losses), np.asarray(jnp.sum(targets**2, axis=(1, 2))), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# units
# ------------------------------------------------------------------------------------------------


class UnitLeaky(brainstate.nn.Module):
    """``V' = α V + (1 − α)(x W + b)`` with ``V``, ``W``, ``b`` in mV, ``τ`` in ms, ``α = exp(−1 ms/τ)``."""

    def __init__(self, spec):
        super().__init__()
        p = spec.params
        self.W = brainstate.ParamState(p["W"] * u.mV)
        self.b = brainstate.ParamState(p["b"] * u.mV)
        self.tau = brainstate.ParamState(p["tau"] * u.ms)

    def init_state(self, batch_size=None, **kwargs):
        self.V = brainstate.HiddenState(jnp.zeros((batch_size, self.W.value.shape[1])) * u.mV)

    def update(self, x):
        a = braintrace.element_wise(self.tau.value, fn=lambda t: jnp.exp(-1.0 * u.ms / t))
        self.V.value = a * self.V.value + (1 - a) * braintrace.matmul(x, self.W.value, self.b.value)
        return self.V.value


def _unitless_leaky(batch=3, n_in=3, n_hid=4):
    """The same model on mantissas (mV, ms)."""
    rng = om._keys(30, 3)
    params = {
        "W": om._nrm(rng[0], (n_in, n_hid), 0.8),
        "b": om._nrm(rng[1], (n_hid,), 0.3),
        "tau": om._uniform(rng[2], (n_hid,), 2.0, 8.0),
    }
    ops = {
        "alpha": om.Op("elem", {"weight": "tau"}, fn=lambda t: jnp.exp(-1.0 / t)),
        "in": om.Op("dense", {"weight": "W", "bias": "b"}, x_fn=lambda p, h, x: x),
    }

    def step(p, h, x, ys):
        a = ys["alpha"]
        return {"V": a * h["V"] + (1 - a) * ys["in"]}

    return om.PlainSpec(
        "unit_leaky", params, {"V": (n_hid,)}, (("V",),), ops, step, lambda p, h, x: h["V"], (n_in,), batch
    )


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_quantities_run_end_to_end(name):
    """Hidden state and weights in mV, time constant in ms: both algorithms run, the gradients carry
    the parameters' units and shapes, and their mantissas equal the oracle on the unitless model."""
    options, make = ALGORITHMS[name]
    spec = _unitless_leaky()
    xs, targets = om.make_data(spec, STEPS)
    module = UnitLeaky(spec)
    brainstate.nn.init_all_states(module, batch_size=spec.batch)
    loss = lambda out, y: om.loss_fn(out / u.mV, y)
    got, _ = om.run_online(make(module), module, xs, targets, loss=loss)
    units = {"W": u.mV, "b": u.mV, "tau": u.ms}
    mantissas = {}
    for k, g in got.items():
        assert isinstance(g, u.Quantity) and g.unit == units[k], (k, type(g), getattr(g, "unit", None))
        assert g.shape == (STEPS, *spec.params[k].shape)
        assert np.all(np.isfinite(np.asarray(g.mantissa)))
        mantissas[k] = g.mantissa
    want = (
        om.masked_rtrl(spec, xs, targets)
        if name == "d_rtrl"
        else om.pp_prop_oracle(spec, xs, targets, options["decay_or_rank"])
    )
    om.assert_grads_close(mantissas, want, what=f"{name} with saiunit quantities (mantissas)")


# ------------------------------------------------------------------------------------------------
# re-initialising the model's states restarts the traces
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_traces_reset_when_states_are_reinitialised(name):
    """After ``brainstate.nn.init_all_states`` again, the run restarts: the gradients of the steps
    that follow equal those of a fresh run (the first step's, and the next ones', which show that
    the traces restart once and then accumulate again)."""
    _, make = ALGORITHMS[name]
    spec = om.two_state(batch=2, recurrent=True)
    xs, targets = om.make_data(spec, 5)

    fresh = om.build_module(spec)
    first, _ = om.run_online(make(fresh), fresh, xs[:3], targets[:3])

    module = om.build_module(spec)
    alg = make(module)
    om.run_online(alg, module, xs[3:], targets[3:])  # two steps: traces and states move away
    brainstate.nn.init_all_states(module, batch_size=spec.batch)
    # A new jitted step: brainstate's jit keeps the state objects it traced, and init_all_states
    # creates new ones.
    again, _ = om.run_online(alg, module, xs[:3], targets[:3], compile_graph=False)
    errors = {t: {k: om.rel_err(again[k][t], first[k][t]) for k in first} for t in range(3)}
    om.assert_grads_close(
        {k: v[0] for k, v in again.items()},
        {k: v[0] for k, v in first.items() if k != "W_rec"},
        tol=1e-12,
        what=f"{name}: first step after re-init vs a fresh run",
    )
    om.assert_grads_close(
        again, first, tol=1e-12, what=f"{name}: steps 1-3 after re-init vs a fresh run {errors}"
    )


def _primitive_names(jaxpr, out=None):
    """Every primitive name in ``jaxpr`` and the jaxprs nested in its equations' params."""

    out = [] if out is None else out
    for eqn in jaxpr_of(jaxpr).eqns:
        out.append(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    _primitive_names(sub, out)
    return out


def test_sequence_driver_updates_and_solves_each_trace_in_one_operation():
    """Under etrace_grad the dense weight and bias traces are each touched by one fused update+solve
    per step, never by a separate update and solve."""
    spec = om.dense_rnn(batch=3)
    xs, targets = om.make_data(spec, 4)
    learner = braintrace.compile(om.build_module(spec), "d_rtrl", xs[0])
    run = lambda xs, ys: learner.etrace_grad(xs, ys, step_fn=om.loss_fn)
    names = _primitive_names(brainstate.transform.make_jaxpr(run)(xs, targets)[0])
    relations = learner.graph.hidden_param_op_relations
    traces = sum(len(r.trainable_vars) * len(r.hidden_groups) for r in relations)  # weight, bias leaves
    assert traces >= 3 and names.count("dense_trace_update_solve") == traces
    assert "dense_trace_update" not in names and "dense_trace_solve" not in names
