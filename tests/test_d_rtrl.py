"""D-RTRL against independent oracles (float64).

* Every model: the per-step gradients of ``braintrace.D_RTRL`` equal the masked-RTRL oracle of
  ``online_models`` (hidden Jacobian with every ETP output held fixed, masked to per-unit blocks)
  to 1e-10 relative, over 10 steps; plain parameters get their within-step gradient.
* Where the true hidden Jacobian is already block diagonal per unit (leaky or two-state units fed
  by ETP input weights, element-wise time constants, a conv feeding leaky units), the gradient
  summed over 25 steps equals ``jax.grad`` of the summed loss through ``lax.scan`` (BPTT).
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import online_models as om
import pytest

import braintrace

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 10
BPTT_STEPS = 25


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with om.float64():
        yield


def _d_rtrl_vs_oracle(spec, steps=STEPS):
    module = om.build_module(spec)
    xs, targets = om.make_data(spec, steps)
    got, _ = om.run_online(braintrace.D_RTRL(module), module, xs, targets)
    want = om.masked_rtrl(spec, xs, targets)
    om.assert_grads_close(got, want, what=f"D_RTRL {spec.name} (per-step gradients, {steps} steps)")
    return got, want


# Models whose Jacobian is block diagonal (leaky units fed by a dense input weight, an element-wise
# time constant, conv) are compared with the masked-RTRL oracle in the BPTT test below.
MODELS = {
    "dense_rnn_batched_bias": lambda: om.dense_rnn(batch=3),
    "two_state_input_and_recurrent": lambda: om.two_state(batch=3, recurrent=True),
    "two_hidden_groups": lambda: om.two_groups(batch=3),
    "sparse_csr": lambda: om.sparse_rnn(batch=3),
    "lora_recurrent": lambda: om.lora_rnn(batch=3),
    "plain_cond_in_dynamics": lambda: om.cond_leaky(batch=3),
    "unbatched_dense_rnn": lambda: om.dense_rnn(batch=None),
    "unbatched_two_state": lambda: om.two_state(batch=None, recurrent=True),
    "unbatched_sparse": lambda: om.sparse_rnn(batch=None),
    "unbatched_lora": lambda: om.lora_rnn(batch=None),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_d_rtrl_equals_masked_rtrl(model):
    _d_rtrl_vs_oracle(MODELS[model]())


EXACT = {
    "leaky_units_dense_input": lambda: om.leaky_ff(batch=3),
    "leaky_units_dense_input_unbatched": lambda: om.leaky_ff(batch=None),
    "two_state_input_weights_only": lambda: om.two_state(batch=3, recurrent=False),
    "elementwise_time_constant": lambda: om.elemwise_tau(batch=3),
    "conv_into_leaky_units": lambda: om.conv_leaky(batch=2),
    "two_state_input_weights_only_unbatched": lambda: om.two_state(batch=None, recurrent=False),
}


@pytest.mark.parametrize("model", list(EXACT))
def test_d_rtrl_equals_bptt_where_jacobian_is_block_diagonal(model):
    """Per step equal to the masked-RTRL oracle, and summed over 25 steps equal to BPTT."""
    spec = EXACT[model]()
    got, _ = _d_rtrl_vs_oracle(spec, steps=BPTT_STEPS)
    xs, targets = om.make_data(spec, BPTT_STEPS)
    total = {k: v.sum(0) for k, v in got.items()}
    want = om.bptt_grads(spec, xs, targets)
    om.assert_grads_close(total, want, what=f"D_RTRL {spec.name} summed over {BPTT_STEPS} steps vs BPTT")


def test_oracles_discriminate():
    """The comparisons above would notice a wrong ``D`` or a wrong estimator: on a model whose true
    Jacobian is not block diagonal masked RTRL differs from BPTT; on leaky units, where it is exact,
    dropping ``D`` (only within-step terms) differs from BPTT; pp_prop differs from D-RTRL."""
    spec = om.dense_rnn(batch=3)
    xs, targets = om.make_data(spec, STEPS)
    masked = om.masked_rtrl(spec, xs, targets)
    bptt = om.bptt_grads(spec, xs, targets)
    assert om.rel_err(masked["W_rec"].sum(0), bptt["W_rec"]) > 1e-3
    pp = om.pp_prop_oracle(spec, xs, targets, 0.5)
    assert om.rel_err(pp["W_rec"], masked["W_rec"]) > 1e-3

    leaky = om.leaky_ff(batch=3)
    xs, targets = om.make_data(leaky, STEPS)
    exact = om.bptt_grads(leaky, xs, targets)
    assert om.rel_err(om.masked_rtrl(leaky, xs, targets)["W"].sum(0), exact["W"]) < 1e-10
    within_step_only = om.masked_rtrl(leaky, xs, targets, traced=())
    assert om.rel_err(within_step_only["W"].sum(0), exact["W"]) > 1e-2


def test_plain_parameter_gets_within_step_gradient():
    """A parameter used with ``@`` (not an ETP op) gets ``∂L_t/∂θ`` with ``h_{t-1}`` fixed,
    not zeros: checked step by step against ``jax.grad`` of the single step of the plain model."""
    spec = om.tiny_rnn_plain_input(batch=3)
    module = om.build_module(spec)
    xs, targets = om.make_data(spec, 6)
    alg = braintrace.D_RTRL(module)
    got, _ = om.run_online(alg, module, xs, targets)
    rec = {r.primitive.name: r.param_paths for r in alg.graph.hidden_param_op_relations}
    assert rec == {"etp_mm": {"weight": ("W_rec",)}}

    params = spec.params
    h = spec.init_hidden()
    for t in range(xs.shape[0]):
        x, target = xs[t], targets[t]

        def step_loss(w_in, h=h, x=x, target=target):
            p = {**params, "W_in": w_in}
            hn = spec.step(p, h, x, om.ys_plain(spec, p, h, x))
            return om.loss_fn(spec.readout(p, hn, x), target)

        want = jax.grad(step_loss)(params["W_in"])
        assert float(jnp.linalg.norm(want)) > 0
        assert om.rel_err(got["W_in"][t], want) < 1e-10, t
        h = spec.step(params, h, x, om.ys_plain(spec, params, h, x))


def test_vmapped_unbatched_model_matches_batched_oracle():
    """An unbatched model (``etp_mv``) under ``brainstate.nn.Vmap`` with states created by
    ``vmap_new_states`` runs D-RTRL with the batched relations (``etp_mm``) and equals the batched oracle."""
    batch = 3
    spec = om.two_state(batch=None, recurrent=True)
    module = om.build_module(spec, init=False)
    brainstate.transform.vmap_new_states(
        lambda: (brainstate.nn.init_all_states(module), None)[1], state_tag="new", axis_size=batch
    )()
    assert module.V.value.shape == (batch, 4)
    vmapped = brainstate.nn.Vmap(module, vmap_states="new")
    batched = om.two_state(batch=batch, recurrent=True)
    xs, targets = om.make_data(batched, STEPS)
    alg = braintrace.D_RTRL(vmapped)
    got, _ = om.run_online(alg, vmapped, xs, targets)
    names = sorted(r.primitive.name for r in alg.graph.hidden_param_op_relations)
    assert names == ["etp_elemwise", "etp_mm", "etp_mm"]
    want = om.masked_rtrl(batched, xs, targets)
    om.assert_grads_close(got, want, what="D_RTRL of a vmapped unbatched two-state model")


def test_trace_dtype_sets_the_storage_of_every_parameter_trace():
    spec = om.lora_rnn(batch=3)
    module = om.build_module(spec)
    alg = braintrace.D_RTRL(module, trace_dtype=jnp.bfloat16)
    alg.compile_graph(om.make_data(spec, 1)[0][0])
    leaves = [v for k, v in alg.etrace.value.items() if k != "epoch"]
    assert leaves and all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(leaves))
    for bad in (jnp.int32, "not a dtype"):
        with pytest.raises(TypeError, match="trace_dtype"):
            braintrace.D_RTRL(module, trace_dtype=bad)
