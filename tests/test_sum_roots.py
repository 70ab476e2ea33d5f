"""Shared output-side traces of pp_prop: :func:`braintrace._compiler.sum_roots.sum_roots` on jaxprs,
and pp_prop's gradients with the traces of summed relations shared, against the same learner with
every relation keeping its own traces (float64, generated cells), and against the plain-``jnp``
pp_prop oracle on the curated models."""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import braintrace
from braintrace._algorithm.pp_prop import IODimVjpAlgorithm
from braintrace._compiler.sum_roots import sum_roots

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _roots(fn, n_args=3):
    """``sum_roots`` of the outputs of the first ``n_args`` dot equations of ``fn``'s jaxpr, as the
    index of the equation each root comes from (``'in'`` for an input, ``'self'`` for the output
    itself)."""
    w = jnp.ones((3, 3))
    jaxpr = jax.make_jaxpr(fn)(*([w] * 4)).jaxpr
    producers = {e.outvars[0]: i for i, e in enumerate(jaxpr.eqns)}
    ys = [e.outvars[0] for e in jaxpr.eqns if e.primitive.name == "dot_general"][:n_args]
    roots = sum_roots(jaxpr, ys)
    return [("self" if roots[y] is y else producers[roots[y]]) for y in ys]


def test_sum_roots_follows_additions_only():
    # a chain of additions: both reach the last one
    assert _roots(lambda x, a, b, c: jnp.tanh(x @ a + x @ b), 2) == [2, 2]
    assert _roots(lambda x, a, b, c: jnp.tanh((x @ a + x @ b) + x @ c)) == [4, 4, 4]
    assert _roots(lambda x, a, b, c: jnp.tanh((x @ a + x @ b) * (x @ c))) == [2, 2, "self"]
    # a difference, a scaled term, a term read twice: no root past them
    assert _roots(lambda x, a, b, c: jnp.tanh(x @ a - x @ b), 2) == ["self", "self"]
    assert _roots(lambda x, a, b, c: jnp.tanh(2.0 * (x @ a) + x @ b), 2) == ["self", 3]
    assert _roots(lambda x, a, b, c: (lambda y: jnp.tanh(x @ a + y) * y)(x @ b), 2) == ["self", 2]
    # a sum that is an output of the step is not summed away; y + y is not a sum of two terms
    assert _roots(lambda x, a, b, c: x @ a + x @ b, 2) == [2, 2]
    assert _roots(lambda x, a, b, c: (x @ a + x @ b, x @ c + 1.0)) == [2, 2, 4]
    assert _roots(lambda x, a, b, c: jnp.tanh((lambda y: y + y)(x @ a)), 1) == ["self"]
    # a term that is sliced and broadcast first has no root past them (the full-shape term has);
    # a change of dtype stops the walk
    w = jnp.ones((3, 3))
    jaxpr = jax.make_jaxpr(lambda x, v: jnp.tanh(x @ w + (v @ w)[0]))(w, w).jaxpr
    full, sliced = [e.outvars[0] for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    roots = sum_roots(jaxpr, [full, sliced])
    assert roots[sliced] is sliced and roots[full] is not full
    jaxpr = jax.make_jaxpr(lambda x: (x @ w).astype(jnp.float16) + jnp.ones(3, jnp.float16))(w).jaxpr
    (y,) = [e.outvars[0] for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert sum_roots(jaxpr, [y])[y] is y


# ------------------------------------------------------------------------------------------------
# Generated cells: k projections of x or h (some with a bias), combined in one of several ways
# ------------------------------------------------------------------------------------------------

#: combination -> (act(y_0, ..., y_3), which projections share their output traces)
COMBOS = {
    "sum": (lambda y: jnp.tanh(y[0] + y[1] + y[2] + y[3]), [[0, 1, 2, 3]]),
    "nested": (lambda y: jnp.tanh((y[0] + y[1]) + (y[2] + y[3])), [[0, 1, 2, 3]]),
    "gated": (lambda y: jnp.tanh(y[0] + y[1]) * jax.nn.sigmoid(y[2] + y[3]), [[0, 1], [2, 3]]),
    "read_twice": (lambda y: jnp.tanh(y[0] + y[1] + y[2]) + 0.1 * y[1] + jnp.sin(y[3]), [[0, 2]]),
    "scaled": (lambda y: jnp.tanh(2.0 * y[0] + y[1] + y[2] - y[3]), [[1, 2]]),
}


class _Cell(brainstate.nn.Module):
    def __init__(self, combo, n_in, n_hid, sources, biases, seed):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.combo, self.sources, self.n_hid = combo, sources, n_hid
        self.w = [
            brainstate.ParamState(
                {
                    "weight": jnp.asarray(rng.standard_normal(((n_in if s == "x" else n_hid), n_hid)) * 0.4),
                    **({"bias": jnp.asarray(rng.standard_normal(n_hid) * 0.1)} if b else {}),
                }
            )
            for s, b in zip(sources, biases)
        ]
        self.w_out = brainstate.ParamState(jnp.asarray(rng.standard_normal((n_hid, 2)) * 0.5))

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, self.n_hid)))

    def update(self, x):
        h = self.h.value
        ys = [
            braintrace.matmul(x if s == "x" else h, p.value["weight"], p.value.get("bias"))
            for s, p in zip(self.sources, self.w)
        ]
        self.h.value = 0.7 * h + 0.3 * COMBOS[self.combo][0](ys)
        return self.h.value @ self.w_out.value


def _online_grads(combo, sources, biases, seed, batch, steps, shared):
    n_in, n_hid = 3, 4
    model = _Cell(combo, n_in, n_hid, sources, biases, seed)
    rng = np.random.default_rng(seed + 1)
    xs = jnp.asarray(rng.standard_normal((steps, batch, n_in)))
    ys = jnp.asarray(rng.standard_normal((steps, batch, 2)))
    x0 = jnp.zeros((batch, n_in))
    learner = braintrace.compile(model, "pp_prop", x0, batch_size=batch, decay_or_rank=0.6)
    if not shared:  # every relation its own traces: the layout before sharing
        learner._trace_owners = lambda: {
            r.index: {"f": r.index, "e": r.index} for r in learner.graph.hidden_param_op_relations
        }
        learner.etrace.value = {**learner._init_trace_values(), "epoch": learner.etrace.value["epoch"]}
    loss = lambda out, y: jnp.mean((out - y) ** 2)  # noqa: E731
    grads = learner.etrace_grad(xs, ys, step_fn=loss)
    return grads, learner


@pytest.mark.parametrize("combo", sorted(COMBOS))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sources=st.lists(st.sampled_from("xh"), min_size=4, max_size=4),
    biases=st.lists(st.booleans(), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_shared_traces_give_the_gradients_of_separate_ones(combo, sources, biases, seed):
    with om.float64():
        got, learner = _online_grads(combo, sources, biases, seed, batch=2, steps=6, shared=True)
        want, _ = _online_grads(combo, sources, biases, seed, batch=2, steps=6, shared=False)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13, err_msg=jax.tree_util.keystr(path))
        # the trace layout: one f trace per sharing class of the projections, one exact trace per
        # class of the projections with a bias
        order = {r.eqn_index: r.index for r in learner.graph.hidden_param_op_relations}
        relation_of = [order[e] for e in sorted(order)]  # projection k -> relation index
        owners = learner._trace_owners()
        classes = [set(c) for c in COMBOS[combo][1]]

        def expected(k, with_bias):
            members = next((c for c in classes if k in c), {k})
            if with_bias:
                members = {j for j in members if biases[j]}
            return relation_of[min(members)]

        for k in range(4):
            assert owners[relation_of[k]]["f"] == expected(k, False)
            if biases[k]:
                assert owners[relation_of[k]]["e"] == expected(k, True)
        n_f = len({expected(k, False) for k in range(4)})
        keys = learner.etrace.value.keys()
        assert sum(k.startswith("f") for k in keys) == n_f


def test_dense_rnn_keeps_one_f_trace_and_equals_the_oracle():
    """The curated dense RNN (``x W_in + b + h W_rec``): one f trace, and the oracle's gradients
    (the oracle keeps a trace per operation)."""
    with om.float64():
        spec = om.dense_rnn(batch=3)
        module = om.build_module(spec)
        xs, targets = om.make_data(spec, 8)
        alg = braintrace.pp_prop(module, 0.7)
        got, _ = om.run_online(alg, module, xs, targets)
        om.assert_grads_close(got, om.pp_prop_oracle(spec, xs, targets, 0.7), what="pp_prop dense_rnn")
        assert sum(k.startswith("f") for k in alg.etrace.value) == 1
        assert isinstance(alg, IODimVjpAlgorithm)
