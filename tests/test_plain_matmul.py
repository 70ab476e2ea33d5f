"""The plain matrix products of a model step (``braintrace/_compiler/plain_matmul.py``).

* ``bind_plain_matmul``: the forward and both cotangents equal ``jax.vjp`` of the equation itself
  (float64, random shapes with none, one or two leading axes, products on both sides of the CPU's
  fusion limit).
* ``is_plain_matmul`` takes ``x @ W`` only: not a batched ``dot_general``, a vector right operand,
  integers, mixed dtypes or a wider ``preferred_element_type``.
* Through a learner: the plain read-out's gradient equals BPTT (float64), and the CPU program of the
  step holds no product contracting the batch axis of both operands (the dot XLA:CPU runs through
  Eigen).
"""

from __future__ import annotations

import re

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import braintrace
from braintrace._compiler.plain_matmul import bind_plain_matmul, is_plain_matmul

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _eqn(fn, *avals):
    jaxpr = jax.make_jaxpr(fn)(*avals).jaxpr
    (eqn,) = [e for e in jaxpr.eqns if e.primitive is jax.lax.dot_general_p]
    return eqn


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    n_in=st.sampled_from([1, 3, 8, 130]),
    n_out=st.sampled_from([1, 4, 9, 260]),
    seed=st.integers(0, 2**16),
)
def test_bind_equals_the_vjp_of_the_equation(lead, n_in, n_out, seed):
    with om.float64():
        rng = np.random.default_rng(seed)
        x = jnp.asarray(rng.standard_normal((*lead, n_in)))
        w = jnp.asarray(rng.standard_normal((n_in, n_out)))
        g = jnp.asarray(rng.standard_normal((*lead, n_out)))
        eqn = _eqn(lambda a, b: a @ b, x, w)
        assert is_plain_matmul(eqn)
        y, vjp = jax.vjp(lambda a, b: bind_plain_matmul(eqn, [a, b])[0], x, w)
        y_ref, vjp_ref = jax.vjp(lambda a, b: a @ b, x, w)
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        for got, want in zip(vjp(g), vjp_ref(g)):
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_which_equations_are_plain_matmuls():
    f32 = jnp.ones((4, 3), jnp.float32), jnp.ones((3, 5), jnp.float32)
    assert is_plain_matmul(_eqn(lambda a, b: a @ b, *f32))
    assert is_plain_matmul(_eqn(lambda a, b: jnp.dot(a[0], b), *f32))  # no leading axis
    refused = [
        (lambda a, b: jnp.einsum("bi,bo->io", a, b), jnp.ones((4, 3)), jnp.ones((4, 5))),  # x^T g
        (lambda a, b: jnp.einsum("bij,bjo->bio", a, b), jnp.ones((2, 4, 3)), jnp.ones((2, 3, 5))),
        (lambda a, b: a @ b, jnp.ones((4, 3)), jnp.ones((3,))),  # a vector right operand
        (lambda a, b: a @ b, jnp.ones((4, 3), jnp.int32), jnp.ones((3, 5), jnp.int32)),
        (
            lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32),
            jnp.ones((4, 3), jnp.bfloat16),
            jnp.ones((3, 5), jnp.bfloat16),
        ),
    ]
    for fn, a, b in refused:
        assert not is_plain_matmul(_eqn(fn, a, b)), fn


@pytest.mark.parametrize("algorithm", ["d_rtrl", "pp_prop"])
def test_read_out_gradient_through_a_learner(algorithm):
    """The plain ``W_out`` of ``online_models.dense_rnn`` equals BPTT, and the CPU step holds no
    ``x^T g`` dot (``contracting_dims = [0] x [0]``)."""
    with om.float64():
        spec = om.dense_rnn(batch=3, n_in=3, n_hid=5, n_out=2, seed=4)
        xs, targets = om.make_data(spec, 6)
        module = om.build_module(spec)
        make = braintrace.D_RTRL if algorithm == "d_rtrl" else braintrace.pp_prop
        alg = make(module)
        got, _ = om.run_online(alg, module, xs, targets)
        want = om.bptt_grads(spec, xs, targets)
        om.assert_grads_close({"W_out": got["W_out"].sum(0)}, {"W_out": want["W_out"]}, 1e-10, what=algorithm)

        params = module.states(brainstate.ParamState)
        step = brainstate.transform.jit(
            lambda x, y: brainstate.transform.grad(lambda: om.loss_fn(alg(x), y), params)()
        )
        text = step.lower(xs[0], targets[0]).as_text()
    if jax.default_backend() != "cpu":
        pytest.skip("the program is lowered for the CPU only on a CPU default backend")
    assert not re.search(r"contracting_dims = \[0\] x \[0\]", text), "an x^T g dot is left in the step"


class _Probe(brainstate.nn.Module):
    """``h' = tanh(x W_in + h U + 0.3 h) `` with a plain recurrent ``U`` (``kind='plain_rec'``) or an ETP
    one, a plain read-out of ``h'`` (2-D) or of ``h'`` broadcast over a leading axis (3-D), and an
    extra plain product of the input (``x V``) added to the output."""

    def __init__(self, kind, n_in=3, n_hid=5, n_out=2, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.kind = kind
        self.w_in = brainstate.ParamState(jnp.asarray(rng.standard_normal((n_in, n_hid)) * 0.6))
        self.u = brainstate.ParamState(jnp.asarray(rng.standard_normal((n_hid, n_hid)) * 0.4))
        self.w_out = brainstate.ParamState(jnp.asarray(rng.standard_normal((n_hid, n_out)) * 0.5))
        self.v = brainstate.ParamState(jnp.asarray(rng.standard_normal((n_in, n_out)) * 0.5))
        self.n_hid = n_hid

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, self.n_hid)))

    def update(self, x):
        h = self.h.value
        rec = h @ self.u.value if self.kind == "plain_rec" else braintrace.matmul(h, self.u.value)
        new = jnp.tanh(braintrace.matmul(x, self.w_in.value) + rec + 0.3 * h)
        self.h.value = new
        if self.kind == "three_d":
            stacked = jnp.stack([new, 2.0 * new])  # (2, B, H): a product over two leading axes
            return (stacked @ self.w_out.value).sum(0) + x @ self.v.value
        return new @ self.w_out.value + x @ self.v.value


@pytest.mark.parametrize("kind", ["etp_rec", "plain_rec", "three_d"])
@pytest.mark.parametrize("algorithm", ["d_rtrl", "pp_prop"])
def test_the_rewrite_changes_no_gradient(kind, algorithm, monkeypatch):
    """Every parameter's online gradient over a sequence is the same with the plain products bound
    as equations (the rewrite switched off) and through :func:`bind_plain_matmul` (float64)."""
    import braintrace._algorithm.executor as executor

    def grads():
        model = _Probe(kind)
        rng = np.random.default_rng(1)
        xs = jnp.asarray(rng.standard_normal((5, 2, 3)))
        ys = jnp.asarray(rng.standard_normal((5, 2, 2)))
        learner = braintrace.compile(model, algorithm, xs[0], batch_size=2)
        out = learner.etrace_grad(xs, ys, step_fn=lambda out, y: jnp.sum((out - y) ** 2))
        return {str(k): np.asarray(v) for k, v in out.items()}

    with om.float64():
        rewritten = grads()
        monkeypatch.setattr(executor, "is_plain_matmul", lambda eqn: False)
        plain = grads()
    assert sorted(rewritten) == sorted(plain) and len(plain) == 4
    for k in plain:
        assert np.abs(plain[k]).max() > 0, k
        np.testing.assert_allclose(rewritten[k], plain[k], rtol=1e-11, atol=1e-13, err_msg=k)
