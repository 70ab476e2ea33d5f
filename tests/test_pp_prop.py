"""pp_prop / ES-D-RTRL against an independent plain-``jnp`` implementation of its recursion (float64).

``ε_x ← λ ε_x + x_t``, ``ε_f ← λ D_t ε_f + (1−λ) df_t``, weight gradient
``xy_to_dw(ε_x, Σ_s ∂L/∂h_s ⊙ ε_{f,s} / (1−λ^{t+1}))``; bias and element-wise keys use the exact
trace ``ε ← D ε + df``. ``decay_or_rank``: a float is ``λ ∈ (0, 1)``, an
int ``r > 0`` means ``λ = (r−1)/(r+1)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import online_models as om
import pytest

import braintrace

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 10


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with om.float64():
        yield


def _pp_vs_oracle(spec, decay_or_rank, lam, steps=STEPS, algorithm=None):
    module = om.build_module(spec)
    xs, targets = om.make_data(spec, steps)
    alg = (algorithm or braintrace.pp_prop)(module, decay_or_rank)
    got, _ = om.run_online(alg, module, xs, targets)
    want = om.pp_prop_oracle(spec, xs, targets, lam)
    om.assert_grads_close(got, want, what=f"pp_prop {spec.name} lambda={lam} (per-step, {steps} steps)")
    return alg


# the element-wise time constant on a batched model: test_batched_elementwise_weight_both_algorithms
MODELS = {
    "dense_rnn_bias": lambda: om.dense_rnn(batch=3),
    "two_state": lambda: om.two_state(batch=3, recurrent=True),
    "two_hidden_groups": lambda: om.two_groups(batch=3),
    "sparse_csr": lambda: om.sparse_rnn(batch=3),
    "lora_recurrent": lambda: om.lora_rnn(batch=3),
    "conv": lambda: om.conv_leaky(batch=2),
    "unbatched_dense_rnn": lambda: om.dense_rnn(batch=None),
    "unbatched_two_state": lambda: om.two_state(batch=None, recurrent=True),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_pp_prop_equals_oracle(model):
    _pp_vs_oracle(MODELS[model](), 0.7, 0.7)


@pytest.mark.parametrize("rank", [1, 3])
def test_int_rank_means_lambda_r_minus_1_over_r_plus_1(rank):
    lam = (rank - 1) / (rank + 1)
    _pp_vs_oracle(om.two_state(batch=2, recurrent=True), rank, lam)


def test_es_d_rtrl_is_pp_prop():
    """``braintrace.ES_D_RTRL(model, decay_or_rank)`` is the same algorithm."""
    assert braintrace.ES_D_RTRL is type(braintrace.pp_prop(om.build_module(om.leaky_ff()), 0.5))
    _pp_vs_oracle(om.leaky_ff(batch=2), 4, 0.6, algorithm=braintrace.ES_D_RTRL)


BAD_DECAY = [
    (0, ValueError),  # rank 0
    (-3, ValueError),  # negative rank
    (0.0, ValueError),
    (1.0, ValueError),
    (-0.5, ValueError),
    (1.5, ValueError),
    (float("nan"), ValueError),
    (True, TypeError),  # a bool is not a rank
    (False, TypeError),
    ("a", TypeError),
    (None, TypeError),
]


@pytest.mark.parametrize("value, error", BAD_DECAY, ids=[repr(v) for v, _ in BAD_DECAY])
def test_decay_or_rank_out_of_range(value, error):
    module = om.build_module(om.leaky_ff(batch=2))
    with pytest.raises(error, match="decay_or_rank"):
        braintrace.pp_prop(module, value)
    with pytest.raises(error, match="decay_or_rank"):
        braintrace.ES_D_RTRL(module, value)
    with pytest.raises(error, match="decay_or_rank"):
        braintrace.compile(module, "pp_prop", jnp.zeros((2, 3)), decay_or_rank=value)


def test_batched_elementwise_weight_both_algorithms():
    """an element-wise weight of shape ``(H,)`` on states ``(B, H)`` gets a trace with
    the batch axis ``(B, H, n)`` and both algorithms match their oracles."""
    batch, hid = 2, 5
    spec = om.elemwise_tau(batch=batch, n_in=3, n_hid=hid)
    xs, targets = om.make_data(spec, STEPS)

    module = om.build_module(spec)
    alg = braintrace.D_RTRL(module)
    got, _ = om.run_online(alg, module, xs, targets)
    om.assert_grads_close(got, om.masked_rtrl(spec, xs, targets), what="D_RTRL, (H,) weight on (B, H)")
    elem = [r for r in alg.graph.hidden_param_op_relations if r.primitive.name == "etp_elemwise"]
    assert len(elem) == 1 and elem[0].param_paths == {"weight": ("tau",)}
    traces = alg.states(braintrace.EligibilityTrace)
    shapes = {tuple(leaf.shape) for st in traces.values() for leaf in jax.tree.leaves(st.value)}
    assert (batch, hid, 1) in shapes, shapes

    module = om.build_module(spec)
    alg = braintrace.pp_prop(module, 0.6)
    got, _ = om.run_online(alg, module, xs, targets)
    om.assert_grads_close(
        got, om.pp_prop_oracle(spec, xs, targets, 0.6), what="pp_prop, (H,) weight on (B, H)"
    )
