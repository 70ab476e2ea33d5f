"""ETP primitives inside control flow within one step: ``cond`` branches and ``fori_loop`` sub-steps
are brought to the top level of the step; the gradients are checked against BPTT (float64)."""

import types

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace
from braintrace._compiler.diagnostics import DiagnosticKind, NotSupportedError
from braintrace._compiler.module_info import extract_module_info
from tests._numerics import assert_close
from tests.online_models import float64

B, I, H, T = 2, 3, 4, 5


class Net(brainstate.nn.Module):
    """``h' = a h + (1 - a) tanh(u)``, ``u`` from the input through ETP ops inside control flow."""

    def __init__(self, kind):
        super().__init__()
        rng = np.random.default_rng(0)
        self.kind = kind
        self.w = brainstate.ParamState(jnp.asarray(rng.normal(0, 0.5, (I, H))))
        if kind in ("cond", "where"):
            self.v = brainstate.ParamState(jnp.asarray(rng.normal(0, 0.5, (I, H))))
        if kind == "recurrent_substeps":
            self.r = brainstate.ParamState(jnp.asarray(rng.normal(0, 0.3, (H, H))))

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

    def drive(self, x):
        if self.kind == "cond":  # the input decides which weight drives the step
            return jax.lax.cond(
                x[0, 0] > 0,
                lambda x: braintrace.matmul(x, self.w.value),
                lambda x: 2.0 * jnp.sin(braintrace.matmul(x, self.v.value)),
                x,
            )
        if self.kind == "where":  # the same model written with jnp.where
            a = braintrace.matmul(x, self.w.value)
            b = 2.0 * jnp.sin(braintrace.matmul(x, self.v.value))
            return jnp.where(x[0, 0] > 0, a, b)
        raise AssertionError(self.kind)

    def update(self, x):
        h = self.h.value
        if self.kind == "substeps":  # three Euler sub-steps, the input weight applied in each
            def body(i, h):
                return h + 0.3 * (-h + jnp.tanh(braintrace.matmul(x, self.w.value)))

            self.h.value = jax.lax.fori_loop(0, 3, body, h)
        elif self.kind == "recurrent_substeps":  # a recurrent ETP weight inside the sub-steps
            def body(i, h):
                return h + 0.3 * (-h + jnp.tanh(braintrace.matmul(h, self.r.value) + x @ self.w.value))

            self.h.value = jax.lax.fori_loop(0, 2, body, h)
        else:
            self.h.value = 0.8 * h + 0.2 * jnp.tanh(self.drive(x))
        return self.h.value


def _loss(out, y):
    return jnp.sum((out - y) ** 2)


def _data():
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    ys = jnp.asarray(rng.normal(size=(T, B, H)))
    return xs, ys


def _bptt(kind, xs, ys):
    model = Net(kind)
    brainstate.nn.init_all_states(model, batch_size=B)
    params = model.states(brainstate.ParamState)

    def total():
        brainstate.nn.reset_all_states(model, batch_size=B)
        return brainstate.transform.for_loop(lambda x, y: _loss(model(x), y), xs, ys).sum()

    return brainstate.transform.grad(total, params)()


def _online(kind, xs, ys, **kw):
    model = Net(kind)
    brainstate.nn.init_all_states(model, batch_size=B)
    learner = braintrace.D_RTRL(model)
    learner.compile_graph(xs[0])
    return learner, learner.etrace_grad(xs, ys, step_fn=_loss, **kw)


@pytest.mark.parametrize("kind", ["cond", "substeps"])
def test_etp_inside_control_flow_equals_bptt_where_exact(kind):
    with float64():
        xs, ys = _data()
        learner, grads = _online(kind, xs, ys)
        expected = _bptt(kind, xs, ys)
        for key, g in expected.items():
            assert_close(grads[key], g, np.float64)
        n_rel = len(learner.graph.hidden_param_op_relations)
        assert n_rel == (2 if kind == "cond" else 3)  # one relation per branch / per sub-step


def test_cond_equals_the_same_model_written_with_where():
    with float64():
        xs, ys = _data()
        _, grads_cond = _online("cond", xs, ys)
        _, grads_where = _online("where", xs, ys)
        for key, g in grads_where.items():
            assert_close(grads_cond[key], g, np.float64)


def test_recurrent_etp_inside_substeps_is_recorded_and_exact_within_the_step():
    with float64():
        xs, ys = _data()
        with pytest.warns(UserWarning):
            learner, grads = _online("recurrent_substeps", xs[:1], ys[:1])
        kinds = {r.kind for r in learner.graph.records}
        assert DiagnosticKind.CROSS_LAYER_INFLUENCE in kinds  # the sub-steps chain the recurrent op
        expected = _bptt("recurrent_substeps", xs[:1], ys[:1])  # one step: the within-step gradient
        for key, g in expected.items():
            assert_close(grads[key], g, np.float64)


class _Loop(brainstate.nn.Module):
    def __init__(self, loop):
        super().__init__()
        self.loop = loop
        self.w = brainstate.ParamState(jnp.ones((H, H)) * 0.1)

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

    def update(self, x):
        step = lambda h: 0.5 * h + braintrace.matmul(h, self.w.value) + x  # noqa: E731
        if self.loop == "while":
            carry = jax.lax.while_loop(
                lambda c: c[0] < 2, lambda c: (c[0] + 1, step(c[1])), (0, self.h.value)
            )
            self.h.value = carry[1]
        else:
            self.h.value = jax.lax.fori_loop(0, 20, lambda i, h: step(h), self.h.value)
        return self.h.value


def test_unsupported_loops_are_refused_naming_the_construct():
    x = jnp.zeros((B, H))
    m = _Loop("while")
    brainstate.nn.init_all_states(m, batch_size=B)
    with pytest.raises(NotSupportedError, match="while_loop"):
        extract_module_info(m, x)
    m = _Loop("fori")
    brainstate.nn.init_all_states(m, batch_size=B)
    with pytest.raises(NotSupportedError, match="scan_unroll_limit=16"):
        extract_module_info(m, x)
    info = extract_module_info(m, x, control_flow=types.SimpleNamespace(scan_unroll_limit=20))
    assert str(info.jaxpr).count("etp_") == 20
