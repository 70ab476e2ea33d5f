"""Compile-time checks of custom ETP primitives: every rule evaluated abstractly against the shapes
the online algorithms need (``check_relation_rules``), and the declared operand layouts against
each equation (checked while the step is traced, so ``compile_etrace_graph`` reports them).

The built-in primitives pass the checks on every model of ``online_models`` and on the
``braintrace.nn`` layers."""

from __future__ import annotations

import inspect
import time
import types
import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest
import saiunit as u
from saiunit import sparse as ss

import braintrace
from braintrace import nn
from braintrace._compiler import graph as graph_module
from braintrace._compiler.diagnostics import CompilationError, ETraceCompilationWarning
from braintrace._compiler.graph import (
    find_hidden_groups_from_module,
    find_hidden_param_op_relations_from_module,
)
from braintrace._compiler.module_info import extract_module_info
from braintrace._compiler.rule_check import check_relation_rules, relation_rule_problems

B, I, O = 3, 4, 2
SCALE = 1.5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ETraceCompilationWarning)
        yield


# ------------------------------------------------------------------------------------------------
# the built-in primitives pass
# ------------------------------------------------------------------------------------------------

ONLINE_MODELS = [
    "dense_rnn",
    "leaky_ff",
    "elemwise_tau",
    "two_state",
    "two_groups",
    "conv_leaky",
    "sparse_rnn",
    "lora_rnn",
    "tiny_rnn_plain_input",
    "cond_leaky",
]


def _compile(model, *inputs):
    return braintrace.compile_etrace_graph(model, *inputs)


@pytest.mark.parametrize("batch", [3, None], ids=["batched", "unbatched"])
@pytest.mark.parametrize("name", ONLINE_MODELS)
def test_builtin_primitives_pass_on_the_online_models(name, batch):
    if name == "conv_leaky" and batch is None:
        pytest.skip("conv needs a batch axis")
    spec = getattr(om, name)(batch=batch)
    graph = _compile(om.build_module(spec), jnp.zeros(spec.input_shape()))
    assert graph.hidden_param_op_relations
    check_relation_rules(graph)


class _SNN(brainstate.nn.Module):
    def __init__(self, H=6):
        super().__init__()
        rng = np.random.default_rng(0)
        self.inp = nn.Linear(2, H)
        dense = (rng.random((H, H)) < 0.4) * rng.normal(0.0, 0.5, (H, H))
        self.rec = nn.SparseLinear(ss.CSR.fromdense(jnp.asarray(dense, jnp.float32)), b_init=jnp.zeros(H))
        self.syn = nn.Expon(H, tau=5.0 * u.ms)
        self.lif = nn.LIF(H, tau=10.0 * u.ms, V_th=1.0)
        self.out = nn.LeakyRateReadout(H, 2, tau=10.0 * u.ms)

    def update(self, x):
        return self.out(self.lif(self.syn(self.inp(x) + self.rec(self.lif.get_spike()))))


class _ALIFColumn(brainstate.nn.Module):
    def __init__(self, H=5):
        super().__init__()
        self.inp = nn.Linear(2, H)
        self.neu = nn.ALIF(H, tau=8.0 * u.ms, tau_a=30.0 * u.ms, beta=0.3)
        self.out = nn.LeakySpikeReadout(H, 3, tau=10.0 * u.ms)

    def update(self, x):
        return self.out(self.neu(self.inp(x)))


class _LoRARNN(brainstate.nn.Module):
    def __init__(self, H=5):
        super().__init__()
        self.inp = nn.Linear(2, H)
        self.rec = nn.LoRA(H, H, rank=2, alpha=0.5)

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, 5) if batch_size else (5,)))

    def update(self, x):
        self.h.value = jnp.tanh(self.inp(x) + self.rec(self.h.value))
        return self.h.value


class _ConvLIF(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d((8, 2), out_channels=3, kernel_size=3)
        self.lif = nn.LIF((8, 3), tau=10.0 * u.ms)

    def update(self, x):
        return self.lif(self.conv(x))


RNN_CELLS = ["ValinaRNNCell", "GRUCell", "LSTMCell", "MGUCell", "MinimalRNNCell"]
NN_MODELS = {
    "snn": (_SNN, (2,)),
    "alif": (_ALIFColumn, (2,)),
    "lora": (_LoRARNN, (2,)),
    "conv": (_ConvLIF, (8, 2)),
    **{cell: (lambda cell=cell: getattr(nn, cell)(2, 4), (2,)) for cell in RNN_CELLS},
}


@pytest.mark.parametrize("name", list(NN_MODELS))
def test_builtin_primitives_pass_on_the_nn_layers(name):
    make, x_shape = NN_MODELS[name]
    with brainstate.environ.context(precision=32, dt=1.0 * u.ms):
        model = make()
        brainstate.nn.init_all_states(model, batch_size=B)
        graph = _compile(model, jnp.zeros((B, *x_shape)))
        check_relation_rules(graph)
    assert graph.hidden_param_op_relations


# ------------------------------------------------------------------------------------------------
# a custom scaled matmul y = scale * (x @ W) (+ b), with correct rules
# ------------------------------------------------------------------------------------------------


def scaled_impl(*args, scale=1.0, has_bias=False):
    y = scale * (args[0] @ args[1])
    return y + args[2] if has_bias else y


def scaled_layout(params):
    return {"weight": 1, "bias": 2} if params.get("has_bias", False) else {"weight": 1}


def good_yw_to_w(hidden, trace, *, scale=1.0, has_bias=False):
    out = {"weight": trace["weight"] * jnp.expand_dims(hidden, -2)}
    if has_bias:
        out["bias"] = trace["bias"] * hidden
    return out


def good_xy_to_dw(x, hidden, weights, *, scale=1.0, has_bias=False):
    x2, g2 = jnp.reshape(x, (-1, x.shape[-1])), jnp.reshape(hidden, (-1, hidden.shape[-1]))
    out = {"weight": scale * (x2.T @ g2)}
    if has_bias:
        out["bias"] = g2.sum(0)
    return out


def batched_init_drtrl(x_var, y_var, weight_vars, n):
    lead = y_var.aval.shape[:1]
    return {k: jnp.zeros((*lead, *v.aval.shape, n), v.aval.dtype) for k, v in weight_vars.items()}


def unbatched_init_drtrl(x_var, y_var, weight_vars, n):
    return {k: jnp.zeros((*v.aval.shape, n), v.aval.dtype) for k, v in weight_vars.items()}


def good_init_pp(x_var, y_var, weight_vars, n):
    return jnp.zeros((*y_var.aval.shape, n), y_var.aval.dtype)


@pytest.fixture
def make_primitive(temp_primitives, unique_name):
    """``make_primitive(batched=True, layout=scaled_layout, x_invar_index=0, **rules)``: a registered
    scaled matmul whose rules are the correct ones unless overridden."""

    def make(batched=True, layout=scaled_layout, x_invar_index=0, **rules):
        p = braintrace.register_primitive(
            unique_name("etp_scaled"),
            scaled_impl,
            batched=batched,
            trainable_invars_fn=layout,
            x_invar_index=x_invar_index,
        )
        temp_primitives.append(p)
        all_rules = dict(
            yw_to_w=good_yw_to_w,
            xy_to_dw=good_xy_to_dw,
            init_drtrl=batched_init_drtrl if batched else unbatched_init_drtrl,
            init_pp=good_init_pp,
        )
        all_rules.update(rules)
        p.register_etp_rules(**{k: v for k, v in all_rules.items() if v is not None})
        return p

    return make


class Leaky(brainstate.nn.Module):
    """``h = 0.9 h + p(x, W[, b], scale)``; ``x`` is the step input."""

    def __init__(self, p, has_bias=False):
        super().__init__()
        self.p, self.has_bias = p, has_bias
        rng = np.random.default_rng(0)
        self.w = brainstate.ParamState(jnp.asarray(rng.normal(size=(I, O)), jnp.float32))
        if has_bias:
            self.b = brainstate.ParamState(jnp.asarray(rng.normal(size=(O,)), jnp.float32))

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, O) if batch_size else (O,)))

    def update(self, x):
        args = (x, self.w.value, self.b.value) if self.has_bias else (x, self.w.value)
        y = self.p.bind(*args, scale=SCALE, has_bias=self.has_bias)
        self.h.value = 0.9 * self.h.value + y
        return self.h.value


def leaky_graph(p, has_bias=False, batch=B, x_shape=None):
    """``(model, graph)`` of :class:`Leaky` compiled with ``compile_etrace_graph``."""
    model = Leaky(p, has_bias)
    brainstate.nn.init_all_states(model, batch_size=batch)
    x_shape = x_shape or ((batch, I) if batch else (I,))
    return model, _compile(model, jnp.zeros(x_shape))


def leaky_relations(p, has_bias=False):
    """The relations of a batched :class:`Leaky`, found without compiling the whole graph (whose
    compilation checks the rules itself)."""
    model = Leaky(p, has_bias)
    brainstate.nn.init_all_states(model, batch_size=B)
    info = extract_module_info(model, jnp.zeros((B, I)))
    return find_hidden_param_op_relations_from_module(info, find_hidden_groups_from_module(info))


def rule_error(relations) -> str:
    with pytest.raises(CompilationError) as info:
        check_relation_rules(relations)
    assert isinstance(info.value, ValueError)
    return str(info.value)


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("batched", [True, False])
def test_correct_custom_rules_pass_and_train(make_primitive, batched, has_bias):
    p = make_primitive(batched=batched)
    model, graph = leaky_graph(p, has_bias, batch=B if batched else None)
    check_relation_rules(graph)
    alg = braintrace.D_RTRL(model).compile_graph(jnp.zeros((B, I) if batched else (I,)))
    params = model.states(brainstate.ParamState)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(B, I) if batched else (I,)), jnp.float32)
    grads = brainstate.transform.grad(lambda: alg(x).sum(), params)()
    assert grads[("w",)].shape == (I, O)


def test_unbatched_primitive_under_a_batched_model_passes(make_primitive):
    """``y`` of shape ``(O,)`` drives ``h`` of shape ``(B, O)``: one batch axis the rules broadcast."""
    p = make_primitive(batched=False)
    model, graph = leaky_graph(p, batch=B, x_shape=(I,))
    (rel,) = graph.hidden_param_op_relations
    assert rel.batch_ndims == (1,)
    check_relation_rules(graph)


# ------------------------------------------------------------------------------------------------
# wrong rules: one CompilationError naming the primitive, the rule, the key and both shapes
# ------------------------------------------------------------------------------------------------


def test_broadcastable_xy_to_dw_is_reported(make_primitive):
    """``(1, O)`` for an ``(I, O)`` weight broadcasts silently in the trace update."""
    p = make_primitive(xy_to_dw=lambda x, g, w, **kw: {"weight": good_xy_to_dw(x, g, w, **kw)["weight"][:1]})
    relations = leaky_relations(p)
    msg = rule_error(relations)
    assert p.name in msg and "'xy_to_dw'" in msg and "key 'weight'" in msg
    assert f"expected shape ({I}, {O})" in msg and f"got (1, {O})" in msg


def test_xy_to_dw_with_a_wrong_signature_is_reported(make_primitive):
    p = make_primitive(xy_to_dw=lambda x, hidden: {"weight": x.T @ hidden})
    relations = leaky_relations(p)
    msg = rule_error(relations)
    assert "'xy_to_dw' raised TypeError" in msg and f"float32[{B}, {I}]" in msg


def test_xy_to_dw_with_wrong_keys_is_reported(make_primitive):
    p = make_primitive(xy_to_dw=lambda x, g, w, **kw: {"w": good_xy_to_dw(x, g, w, **kw)["weight"]})
    relations = leaky_relations(p)
    msg = rule_error(relations)
    assert "returned the keys ['w']" in msg and "trainable keys ['weight']" in msg


def test_xy_to_dw_missing_the_bias_key_is_reported(make_primitive):
    p = make_primitive(xy_to_dw=lambda x, g, w, **kw: {"weight": good_xy_to_dw(x, g, w, **kw)["weight"]})
    relations = leaky_relations(p, has_bias=True)
    msg = rule_error(relations)
    assert "returned the keys ['weight']" in msg and "['bias', 'weight']" in msg


def test_xy_to_dw_returning_an_array_is_reported(make_primitive):
    p = make_primitive(xy_to_dw=lambda x, g, w, **kw: good_xy_to_dw(x, g, w, **kw)["weight"])
    relations = leaky_relations(p)
    assert "'xy_to_dw' must return a dict" in rule_error(relations)


def test_yw_to_w_with_a_wrong_shape_is_reported(make_primitive):
    # summing the batch axis away: (I, O) instead of the trace slice (B, I, O)
    p = make_primitive(yw_to_w=lambda h, tr, **kw: {"weight": (tr["weight"] * h[:, None, :]).sum(0)})
    relations = leaky_relations(p)
    msg = rule_error(relations)
    assert "'yw_to_w', key 'weight'" in msg and f"expected shape ({B}, {I}, {O})" in msg
    assert f"got ({I}, {O})" in msg


def test_yw_to_w_with_a_wrong_signature_is_reported(make_primitive):
    p = make_primitive(yw_to_w=lambda trace: trace)
    relations = leaky_relations(p)
    assert "'yw_to_w' raised TypeError" in rule_error(relations)


def test_yw_to_w_reading_a_missing_key_is_reported(make_primitive):
    p = make_primitive(yw_to_w=lambda h, tr, **kw: {"weight": tr["kernel"] * h[:, None, :]})
    relations = leaky_relations(p)
    msg = rule_error(relations)
    assert "'yw_to_w' raised KeyError" in msg and "trace={'weight'" in msg


def test_init_drtrl_without_the_batch_axis_is_reported(make_primitive):
    p = make_primitive(init_drtrl=unbatched_init_drtrl)  # wrong for a batched primitive
    relations = leaky_relations(p)
    msg = rule_error(relations)
    assert "'init_drtrl', key 'weight'" in msg
    assert f"expected shape ({B}, {I}, {O}, 1)" in msg and f"got ({I}, {O}, 1)" in msg


def test_init_drtrl_with_an_integer_dtype_is_reported(make_primitive):
    p = make_primitive(
        init_drtrl=lambda xv, yv, wv, n: {
            k: jnp.zeros((B, *v.aval.shape, n), jnp.int32) for k, v in wv.items()
        }
    )
    relations = leaky_relations(p)
    assert "floating dtype, got int32" in rule_error(relations)


def test_init_pp_returning_a_dict_is_reported(make_primitive):
    p = make_primitive(init_pp=lambda xv, yv, wv, n: {"weight": jnp.zeros((*yv.aval.shape, n))})
    relations = leaky_relations(p)
    assert "'init_pp' must return one array" in rule_error(relations)


def test_every_problem_is_listed_in_one_error(make_primitive):
    p = make_primitive(
        xy_to_dw=lambda x, g, w, **kw: {"weight": good_xy_to_dw(x, g, w, **kw)["weight"][:1]},
        init_drtrl=unbatched_init_drtrl,
    )
    relations = leaky_relations(p)
    problems = relation_rule_problems(relations[0])
    rules = {
        r for r in ("xy_to_dw", "init_drtrl", "yw_to_w", "init_pp") if any(f"'{r}'" in m for m in problems)
    }
    assert rules == {"xy_to_dw", "init_drtrl"}
    msg = rule_error(relations)
    assert all(m in msg for m in problems)


def test_a_rule_that_is_not_registered_is_not_checked(make_primitive):
    """The algorithm that needs a missing rule names it (``get_rule``); compiling does not."""
    p = make_primitive(init_pp=None, yw_to_w=None)
    _, graph = leaky_graph(p)
    check_relation_rules(graph)


def test_the_check_is_abstract(make_primitive):
    """A 4e4 x 4e4 weight with a (64, 4e4, 4e4, 2) trace (terabytes if materialised) is checked in well
    under a second: the rules run on shapes only."""
    p = make_primitive()
    var = lambda *shape: types.SimpleNamespace(aval=jax.core.ShapedArray(shape, jnp.float32))
    n = 40_000
    relation = types.SimpleNamespace(
        primitive=p,
        eqn_index=0,
        params={"scale": SCALE, "has_bias": False},
        trainable_vars={"weight": var(n, n)},
        x_var=var(64, n),
        y_var=var(64, n),
        aux_vars=(),
        hidden_groups=(types.SimpleNamespace(shape=(64, n), dtype=jnp.float32, num_state=2),),
        batch_ndims=(1,),
        param_paths={"weight": ("w",)},
    )
    start = time.perf_counter()
    assert relation_rule_problems(relation) == []
    assert time.perf_counter() - start < 2.0


@pytest.mark.skipif(
    "check_relation_rules" not in inspect.getsource(graph_module),
    reason="compile_etrace_graph does not call check_relation_rules yet",
)
def test_compile_etrace_graph_reports_a_broadcastable_rule(make_primitive):
    p = make_primitive(xy_to_dw=lambda x, g, w, **kw: {"weight": good_xy_to_dw(x, g, w, **kw)["weight"][:1]})
    model = Leaky(p)
    brainstate.nn.init_all_states(model, batch_size=B)
    with pytest.raises(CompilationError, match=r"'xy_to_dw', key 'weight': expected shape \(4, 2\)"):
        braintrace.D_RTRL(model).compile_graph(jnp.zeros((B, I)))


# ------------------------------------------------------------------------------------------------
# layouts: checked while the step is traced, so compiling reports them
# ------------------------------------------------------------------------------------------------


BAD_LAYOUTS = {
    "out of range": ({"weight": 5}, "maps 'weight' to operand 5, out of range"),
    "negative": ({"weight": -1}, "maps 'weight' to operand -1, out of range"),
    "not an int": ({"weight": 1.0}, "maps 'weight' to 1.0 (float); positions must be ints"),
    "a bool": ({"weight": True}, "positions must be ints"),
    "x": ({"weight": 0}, "maps 'weight' to operand 0, which is x"),
    "twice": ({"weight": 1, "bias": 1}, "maps both 'weight' and 'bias' to operand 1"),
    "non-str key": ({1: 1}, "returned the key 1; keys must be str"),
    "not a dict": ([1], "must return a dict"),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_bad_trainable_invars_fn_is_a_compilation_error(make_primitive, case):
    layout, expected = BAD_LAYOUTS[case]
    p = make_primitive(layout=lambda params: layout)
    model = Leaky(p)
    brainstate.nn.init_all_states(model, batch_size=B)
    with pytest.raises(CompilationError) as info:
        braintrace.D_RTRL(model).compile_graph(jnp.zeros((B, I)))
    msg = str(info.value)
    assert p.name in msg and "trainable_invars_fn" in msg and expected in msg, msg
    assert "(equation" in msg and "2 operand(s)" in msg


def test_trainable_invars_fn_that_raises_is_a_compilation_error(make_primitive):
    p = make_primitive(layout=lambda params: {"weight": 1, "bias": params["bias_index"]})
    model = Leaky(p)
    brainstate.nn.init_all_states(model, batch_size=B)
    with pytest.raises(CompilationError, match=r"trainable_invars_fn\(params\) raised KeyError"):
        _compile(model, jnp.zeros((B, I)))


def test_x_invar_index_out_of_range_is_a_compilation_error(make_primitive):
    p = make_primitive(x_invar_index=4)
    model = Leaky(p)
    brainstate.nn.init_all_states(model, batch_size=B)
    with pytest.raises(CompilationError, match="x_invar_index=4 is not a position in its 2 operand"):
        _compile(model, jnp.zeros((B, I)))
