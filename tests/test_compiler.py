"""The ETP compiler: relations, hidden groups, diagnostics, refusals, mapped models, group states."""

from __future__ import annotations

import contextlib
import io
import warnings

import brainstate
import jax
import jax.numpy as jnp
import online_models as om
import pytest

import braintrace
from braintrace import CompilationError, DiagnosticKind, NotSupportedError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # _compile records them itself

B, I_, H = 2, 3, 4


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with om.float64():
        yield


def _compile(module, x):
    """``(graph, [warning messages])``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = braintrace.compile_etrace_graph(module, x)
    return graph, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _x0(spec):
    return jnp.zeros(spec.input_shape())


def _sorted(relations):
    return sorted(relations, key=lambda r: (r[0], sorted(r[1].items()), r[2]))


def _relations(graph):
    """Sorted ``(primitive, {key: param paths}, (group state names...))`` of every relation."""
    return _sorted(
        (r.primitive.name, dict(r.param_paths), tuple(n for g in r.hidden_groups for n in g.names))
        for r in graph.hidden_param_op_relations
    )


def _groups(graph):
    return [(g.names, g.num_state, g.shape) for g in graph.hidden_groups]


def _records(graph, kind):
    return [r for r in graph.records if r.kind is kind]


# ------------------------------------------------------------------------------------------------
# relations and groups
# ------------------------------------------------------------------------------------------------

EXPECTED = {
    "dense_rnn": (
        lambda: om.dense_rnn(batch=B),
        [
            ("etp_mm", {"weight": ("W_in",), "bias": ("b",)}, ("h",)),
            ("etp_mm", {"weight": ("W_rec",)}, ("h",)),
        ],
        [(("h",), 1, (B, H))],
        {"W_out"},
    ),
    "dense_rnn_unbatched": (
        lambda: om.dense_rnn(batch=None),
        [
            ("etp_mv", {"weight": ("W_in",), "bias": ("b",)}, ("h",)),
            ("etp_mv", {"weight": ("W_rec",)}, ("h",)),
        ],
        [(("h",), 1, (H,))],
        {"W_out"},
    ),
    "two_state": (
        lambda: om.two_state(batch=B, recurrent=True),
        [
            ("etp_elemwise", {"weight": ("tau",)}, ("I", "V")),
            ("etp_mm", {"weight": ("W",), "bias": ("b",)}, ("I", "V")),
            ("etp_mm", {"weight": ("W_rec",)}, ("I", "V")),
        ],
        [(("I", "V"), 2, (B, H))],
        set(),
    ),
    "two_groups": (
        lambda: om.two_groups(batch=B, n1=4, n2=3),
        [
            ("etp_mm", {"weight": ("W1",)}, ("h1",)),
            ("etp_mm", {"weight": ("W12",), "bias": ("b2",)}, ("h2",)),
            ("etp_mm", {"weight": ("W21",)}, ("h1",)),
        ],
        [(("h1",), 1, (B, 4)), (("h2",), 1, (B, 3))],
        set(),
    ),
    "conv": (
        lambda: om.conv_leaky(batch=B, length=8, c_out=3, width=3, stride=2),
        [("etp_conv", {"weight": ("K",), "bias": ("b",)}, ("h",))],
        [(("h",), 1, (B, 3, 3))],
        set(),
    ),
    "sparse": (
        lambda: om.sparse_rnn(batch=B, n_hid=5),
        [
            ("etp_mm", {"weight": ("W_in",)}, ("h",)),
            ("etp_sp_mm", {"weight": ("w_sp",), "bias": ("b",)}, ("h",)),
        ],
        [(("h",), 1, (B, 5))],
        set(),
    ),
    "lora": (
        lambda: om.lora_rnn(batch=B, n_hid=5),
        [
            ("etp_lora_mm", {"lora_b": ("lora_B",), "lora_a": ("lora_A",), "bias": ("b",)}, ("h",)),
            ("etp_mm", {"weight": ("W_in",)}, ("h",)),
        ],
        [(("h",), 1, (B, 5))],
        set(),
    ),
    "tiny_rnn_plain_input": (
        lambda: om.tiny_rnn_plain_input(batch=B),
        [("etp_mm", {"weight": ("W_rec",)}, ("h",))],
        [(("h",), 1, (B, H))],
        {"W_in"},
    ),
}


@pytest.mark.parametrize("model", list(EXPECTED))
def test_relations_and_hidden_groups(model):
    make, relations, groups, plain = EXPECTED[model]
    spec = make()
    graph, _ = _compile(om.build_module(spec), _x0(spec))
    assert _relations(graph) == _sorted(relations)
    assert _groups(graph) == groups
    # trainable keys as the primitive declares them, and the parameters behind relations
    for r in graph.hidden_param_op_relations:
        assert set(r.trainable_vars) == set(r.param_paths) == set(r.trainable_invar_indices)
    info = graph.module_info
    rel_params = {info.path_of(i) for i in graph.relation_param_states}
    assert rel_params == set(spec.params) - plain
    assert {s for r in _records(graph, DiagnosticKind.PLAIN_PARAMETER) for s in r.subject} == plain


def test_sparse_index_arrays_are_aux_operands():
    spec = om.sparse_rnn(batch=B, n_hid=5)
    graph, _ = _compile(om.build_module(spec), _x0(spec))
    (rel,) = [r for r in graph.hidden_param_op_relations if r.primitive.name == "etp_sp_mm"]
    assert len(rel.aux_vars) == 2
    assert all(jnp.issubdtype(v.aval.dtype, jnp.integer) for v in rel.aux_vars)


# ------------------------------------------------------------------------------------------------
# GRU: weight -> weight -> hidden
# ------------------------------------------------------------------------------------------------


class GRU(brainstate.nn.Module):
    """A GRU cell from three ``braintrace.matmul`` linears.

    ``style='input'`` (Keras ``reset_after=False`` / the published braintrace GRUCell): the candidate
    linear reads ``[x, r ⊙ h]``. ``style='output'`` (PyTorch): the candidate is
    ``tanh(x W_x + r ⊙ (h W_h))`` with ``W_x`` plain.
    """

    def __init__(self, style):
        super().__init__()
        self.style = style
        rng = om._keys(20, 4)
        self.Wr = brainstate.ParamState(om._nrm(rng[0], (I_ + H, H), 0.5))
        self.Wz = brainstate.ParamState(om._nrm(rng[1], (I_ + H, H), 0.5))
        self.Wh = brainstate.ParamState(om._nrm(rng[2], (I_ + H, H) if style == "input" else (H, H), 0.5))
        if style == "output":
            self.Wx = brainstate.ParamState(om._nrm(rng[3], (I_, H), 0.5))

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

    def update(self, x):
        h = self.h.value
        xh = jnp.concatenate([x, h], axis=-1)
        r = jax.nn.sigmoid(braintrace.matmul(xh, self.Wr.value))
        z = jax.nn.sigmoid(braintrace.matmul(xh, self.Wz.value))
        if self.style == "input":
            cand = jnp.tanh(braintrace.matmul(jnp.concatenate([x, r * h], axis=-1), self.Wh.value))
        else:
            cand = jnp.tanh(x @ self.Wx.value + r * braintrace.matmul(h, self.Wh.value))
        self.h.value = (1 - z) * h + z * cand
        return self.h.value


def test_gru_reset_gate_weight_is_excluded():
    """Rule: a relation's output must reach a hidden state without passing through another trainable
    ETP primitive. Here ``r`` only reaches ``h`` through the candidate linear's *input* ``[x, r ⊙ h]``
    (another trainable ``etp_mm``), so the reset-gate weight ``Wr`` is excluded (warning + record) and
    learned with its within-step gradient; ``z`` and the candidate's output reach ``h`` through
    element-wise ops only: exactly 2 relations."""
    model = GRU("input")
    brainstate.nn.init_all_states(model, batch_size=B)
    graph, messages = _compile(model, jnp.zeros((B, I_)))
    assert len(graph.hidden_param_op_relations) == 2
    assert _relations(graph) == [
        ("etp_mm", {"weight": ("Wh",)}, ("h",)),
        ("etp_mm", {"weight": ("Wz",)}, ("h",)),
    ]
    excluded = _records(graph, DiagnosticKind.WEIGHT_NOT_REACHING_HIDDEN)
    assert [r.subject for r in excluded] == [("Wr",)]
    assert "Wr" in excluded[0].message
    assert any("Wr" in m and "no eligibility trace" in m for m in messages), messages


def test_gru_reset_gate_on_candidate_output_keeps_three_relations():
    """With the reset gate applied to the candidate linear's *output*, ``r ⊙ (h W_h)``, the path
    ``r -> h`` is element-wise and passes through no other ETP primitive, so by the same rule all three
    linears are relations and nothing is excluded (this form does not give 2 relations)."""
    model = GRU("output")
    brainstate.nn.init_all_states(model, batch_size=B)
    graph, _ = _compile(model, jnp.zeros((B, I_)))
    assert _relations(graph) == [
        ("etp_mm", {"weight": ("Wh",)}, ("h",)),
        ("etp_mm", {"weight": ("Wr",)}, ("h",)),
        ("etp_mm", {"weight": ("Wz",)}, ("h",)),
    ]
    assert not _records(graph, DiagnosticKind.WEIGHT_NOT_REACHING_HIDDEN)
    assert {s for r in _records(graph, DiagnosticKind.PLAIN_PARAMETER) for s in r.subject} == {"Wx"}


def _gru_spec(model):
    """The plain form of ``model`` (a :class:`GRU`) for the oracles: its marked linears as ops.

    ``style='input'``: the reset gate's linear is not a relation, so the spec computes ``r`` inside
    the candidate op's input with plain ``@``; the oracle then gives ``Wr`` its within-step gradient.
    """
    params = {n: getattr(model, n).value for n in ("Wr", "Wz", "Wh", "Wx") if hasattr(model, n)}

    def xh(p, h, x):
        return jnp.concatenate([x, h["h"]], axis=-1)

    if model.style == "input":

        def cand_in(p, h, x):
            r = jax.nn.sigmoid(xh(p, h, x) @ p["Wr"])
            return jnp.concatenate([x, r * h["h"]], axis=-1)

        ops = {
            "z": om.Op("dense", {"weight": "Wz"}, x_fn=xh),
            "c": om.Op("dense", {"weight": "Wh"}, x_fn=cand_in),
        }

        def step(p, h, x, ys):
            z = jax.nn.sigmoid(ys["z"])
            return {"h": (1 - z) * h["h"] + z * jnp.tanh(ys["c"])}

    else:
        ops = {
            "r": om.Op("dense", {"weight": "Wr"}, x_fn=xh),
            "z": om.Op("dense", {"weight": "Wz"}, x_fn=xh),
            "hh": om.Op("dense", {"weight": "Wh"}, x_fn=lambda p, h, x: h["h"]),
        }

        def step(p, h, x, ys):
            z = jax.nn.sigmoid(ys["z"])
            cand = jnp.tanh(x @ p["Wx"] + jax.nn.sigmoid(ys["r"]) * ys["hh"])
            return {"h": (1 - z) * h["h"] + z * cand}

    return om.PlainSpec(
        f"gru_{model.style}", params, {"h": (H,)}, (("h",),), ops, step, lambda p, h, x: h["h"], (I_,), B
    )


@pytest.mark.parametrize("style", ["input", "output"])
def test_gru_d_rtrl_matches_oracle(style):
    """D-RTRL on both GRU forms equals the masked-RTRL oracle; in the ``input`` form the excluded ``Wr``
    gets its within-step gradient, as the warning says."""
    model = GRU(style)
    brainstate.nn.init_all_states(model, batch_size=B)
    spec = _gru_spec(model)
    xs, targets = om.make_data(spec, 10)
    got, _ = om.run_online(braintrace.D_RTRL(model), model, xs, targets)
    om.assert_grads_close(got, om.masked_rtrl(spec, xs, targets), what=f"D_RTRL on a GRU ({style} form)")


# ------------------------------------------------------------------------------------------------
# unit-mixing diagnostics
# ------------------------------------------------------------------------------------------------


class MixingLeak(brainstate.nn.Module):
    """``h' = tanh(x W + 0.5 roll(h))``: the intrinsic dynamics really mix units (``D`` is not
    block diagonal), so the compiler must say so."""

    def __init__(self):
        super().__init__()
        self.W = brainstate.ParamState(om._nrm(om._keys(21, 1)[0], (I_, H), 0.5))

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

    def update(self, x):
        self.h.value = jnp.tanh(braintrace.matmul(x, self.W.value) + 0.5 * jnp.roll(self.h.value, 1, axis=-1))
        return self.h.value


def test_mixing_intrinsic_dynamics_are_reported():
    model = MixingLeak()
    brainstate.nn.init_all_states(model, batch_size=B)
    graph, messages = _compile(model, jnp.zeros((B, I_)))
    assert _records(graph, DiagnosticKind.NON_DIAGONAL_PATH)
    assert any("mixing" in m for m in messages)


def _off_path_models():
    gru = GRU("input")
    brainstate.nn.init_all_states(gru, batch_size=B)
    rnn, groups = om.dense_rnn(batch=B), om.two_groups(batch=B)
    return {
        "readout_matmul": (om.build_module(rnn), _x0(rnn)),
        "readout_concatenate": (om.build_module(groups), _x0(groups)),
        "concatenate_into_etp_input": (gru, jnp.zeros((B, I_))),
    }


@pytest.mark.parametrize("case", ["readout_matmul", "readout_concatenate", "concatenate_into_etp_input"])
def test_no_mixing_diagnostic_for_ops_off_the_hidden_paths(case):
    """A unit-mixing op that lies on no ``h_{t-1} -> h_t`` path with the ETP outputs held fixed and on no
    ``y -> h`` path (a readout ``h' W_out`` / ``concatenate`` computing the model's output, or a
    ``concatenate`` whose result only feeds a trainable ETP op's input) does not make ``D`` or ``df``
    inexact: the compiler must not report NON_DIAGONAL_PATH for it (on these models D-RTRL equals the
    masked-RTRL oracle, whose per-unit blocks are the exact ``D`` and ``df``; see test_d_rtrl.py and
    test_gru_d_rtrl_matches_oracle)."""
    module, x = _off_path_models()[case]
    graph, messages = _compile(module, x)
    found = _records(graph, DiagnosticKind.NON_DIAGONAL_PATH)
    assert not found, [str(r) for r in found]


# ------------------------------------------------------------------------------------------------
# control flow, missing pieces
# ------------------------------------------------------------------------------------------------


class CondModel(brainstate.nn.Module):
    def __init__(self, etp_inside):
        super().__init__()
        self.etp_inside = etp_inside
        self.W = brainstate.ParamState(om._nrm(om._keys(22, 1)[0], (I_, H), 0.5))

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

    def update(self, x):
        if self.etp_inside:
            y = jax.lax.cond(
                jnp.sum(x) > 0, lambda: braintrace.matmul(x, self.W.value), lambda: jnp.zeros((x.shape[0], H))
            )
            self.h.value = 0.9 * self.h.value + y
        else:
            y = braintrace.matmul(x, self.W.value)
            leak = jax.lax.cond(jnp.sum(x) > 0, lambda v: 0.9 * v, lambda v: 0.5 * v, self.h.value)
            self.h.value = leak + y
        return self.h.value


def test_etp_op_inside_cond_is_brought_to_the_top_level():
    """Both branches are evaluated and selected (tests/test_control_flow.py checks the gradients)."""
    model = CondModel(etp_inside=True)
    brainstate.nn.init_all_states(model, batch_size=B)
    graph, _ = _compile(model, jnp.zeros((B, I_)))
    assert _relations(graph) == [("etp_mm", {"weight": ("W",)}, ("h",))]
    assert "cond" not in str(graph.module_info.jaxpr)
    assert issubclass(NotSupportedError, CompilationError)


def test_cond_without_etp_op_is_fine():
    model = CondModel(etp_inside=False)
    brainstate.nn.init_all_states(model, batch_size=B)
    graph, _ = _compile(model, jnp.zeros((B, I_)))
    assert _relations(graph) == [("etp_mm", {"weight": ("W",)}, ("h",))]


class NoHidden(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.W = brainstate.ParamState(jnp.ones((I_, H)))

    def update(self, x):
        return braintrace.matmul(x, self.W.value)


class NoEtp(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.W = brainstate.ParamState(jnp.ones((I_, H)))

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

    def update(self, x):
        self.h.value = 0.9 * self.h.value + x @ self.W.value
        return self.h.value


def test_model_without_hidden_state_is_a_compilation_error():
    model = NoHidden()
    brainstate.nn.init_all_states(model, batch_size=B)
    with pytest.raises(CompilationError, match="no hidden state") as info:
        braintrace.compile_etrace_graph(model, jnp.zeros((B, I_)))
    assert "HiddenState" in str(info.value) and "NoHidden" in str(info.value)


def test_model_without_etp_op_is_a_compilation_error():
    model = NoEtp()
    brainstate.nn.init_all_states(model, batch_size=B)
    with pytest.raises(CompilationError, match="no ETP relation") as info:
        braintrace.compile_etrace_graph(model, jnp.zeros((B, I_)))
    assert "braintrace.matmul" in str(info.value)
    with pytest.raises(CompilationError):
        braintrace.D_RTRL(model).compile_graph(jnp.zeros((B, I_)))


# ------------------------------------------------------------------------------------------------
# mapped models keep the marker
# ------------------------------------------------------------------------------------------------

BATCHED_NAME = {
    "etp_mv": "etp_mm",
    "etp_sp_mv": "etp_sp_mm",
    "etp_lora_mv": "etp_lora_mm",
    "etp_elemwise": "etp_elemwise",
}
UNBATCHED = {
    "two_state": lambda: om.two_state(batch=None, recurrent=True),
    "sparse": lambda: om.sparse_rnn(batch=None),
    "lora": lambda: om.lora_rnn(batch=None),
}


def _vmap_init(module, batch):
    brainstate.transform.vmap_new_states(
        lambda: (brainstate.nn.init_all_states(module), None)[1], state_tag="new", axis_size=batch
    )()


class _TransformVmap(brainstate.nn.Module):
    """``brainstate.transform.vmap`` of the unbatched step, mapping the hidden states."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self._fn = (
            brainstate.transform.vmap(lambda x: module(x), in_states=module.states(brainstate.HiddenState)),
        )

    def update(self, x):
        return self._fn[0](x)


def _unprefixed(relations):
    return [
        (
            name,
            {k: tuple(p.split(".")[-1] for p in v) for k, v in paths.items()},
            tuple(n.split(".")[-1] for n in groups),
        )
        for name, paths, groups in relations
    ]


@pytest.mark.parametrize("wrapper", ["nn.Vmap", "transform.vmap"])
@pytest.mark.parametrize("model", list(UNBATCHED))
def test_vmapped_unbatched_model_compiles_to_the_same_relations(model, wrapper):
    spec = UNBATCHED[model]()
    plain = om.build_module(spec)
    graph, _ = _compile(plain, _x0(spec))
    expected = [(BATCHED_NAME[n], p, g) for n, p, g in _relations(graph)]

    module = om.build_module(spec, init=False)
    _vmap_init(module, B)
    mapped = brainstate.nn.Vmap(module, vmap_states="new") if wrapper == "nn.Vmap" else _TransformVmap(module)
    mgraph, _ = _compile(mapped, jnp.zeros((B, *spec.x_shape)))
    assert _sorted(_unprefixed(_relations(mgraph))) == _sorted(expected)
    assert [(g.num_state, g.shape) for g in mgraph.hidden_groups] == [
        (g.num_state, (B, *g.shape)) for g in graph.hidden_groups
    ]


# ------------------------------------------------------------------------------------------------
# HiddenGroupState / HiddenTreeState
# ------------------------------------------------------------------------------------------------


class GroupTwoState(brainstate.nn.Module):
    """The two-state unit of ``om.two_state`` with ``I`` and ``V`` in one group state.

    ``reread=False`` returns the new ``V`` as computed (what a model naturally does);
    ``reread=True`` returns it read back from the group state after the write.
    """

    def __init__(self, spec, kind, reread):
        super().__init__()
        self._spec = (spec,)
        self.kind = kind
        self.reread = reread
        for name, value in spec.params.items():
            setattr(self, name, brainstate.ParamState(value))

    def init_state(self, batch_size=None, **kwargs):
        zeros = jnp.zeros((batch_size, H))
        if self.kind == "group":
            self.g = brainstate.HiddenGroupState(jnp.stack([zeros, zeros], axis=-1))
        else:
            self.g = brainstate.HiddenTreeState({"I": zeros, "V": zeros})

    def _read(self):
        if self.kind == "group":
            return {"I": self.g.value[..., 0], "V": self.g.value[..., 1]}
        return {"I": self.g.get_value("I"), "V": self.g.get_value("V")}

    def update(self, x):
        spec = self._spec[0]
        params = {n: getattr(self, n).value for n in spec.params}
        h = self._read()
        ys = {name: om.op_braintrace(op, params, h, x) for name, op in spec.ops.items()}
        new = spec.step(params, h, x, ys)
        if self.kind == "group":
            self.g.value = jnp.stack([new["I"], new["V"]], axis=-1)
        else:
            self.g.set_value({"I": new["I"], "V": new["V"]})
        return spec.readout(params, self._read() if self.reread else new, x)


@pytest.mark.parametrize("returns", ["new_value", "value_read_back"])
@pytest.mark.parametrize("kind", ["group", "tree"])
def test_group_states_form_one_group_and_learn_exactly(kind, returns):
    """The states of a HiddenGroupState / HiddenTreeState form one group (``num_state`` 2) and D-RTRL
    equals the masked-RTRL oracle of the same two-state unit written with two HiddenStates, whether
    the step returns the new ``V`` it computed or reads it back from the group state."""
    spec = om.two_state(batch=B, n_hid=H, recurrent=True)
    module = GroupTwoState(spec, kind, reread=returns == "value_read_back")
    brainstate.nn.init_all_states(module, batch_size=B)
    graph, _ = _compile(module, _x0(spec))
    assert [(g.num_state, g.shape) for g in graph.hidden_groups] == [(2, (B, H))]
    assert {h.slot for h in graph.hidden_groups[0].hidden_leaves} == {0, 1}
    assert len(graph.hidden_param_op_relations) == 3
    assert all(len(r.hidden_groups) == 1 for r in graph.hidden_param_op_relations)

    xs, targets = om.make_data(spec, 10)
    got, _ = om.run_online(braintrace.D_RTRL(module), module, xs, targets)
    om.assert_grads_close(
        got, om.masked_rtrl(spec, xs, targets), what=f"D_RTRL with a Hidden{kind.title()}State ({returns})"
    )


# ------------------------------------------------------------------------------------------------
# the specification notebook's last cell
# ------------------------------------------------------------------------------------------------

TINY_RNN_CELL = """
import brainstate


class TinyRNN(brainstate.nn.Module):
    def __init__(self, in_dim=4, hid_dim=6):
        super().__init__()
        self.in_dim = in_dim
        self.hid_dim = hid_dim
        # Recurrent weight: ETP-enabled (online learning via D-RTRL).
        self.W_rec = brainstate.ParamState(
            0.1 * jax.random.normal(jax.random.PRNGKey(0), (hid_dim, hid_dim))
        )
        # Input weight: plain matmul, learned via BPTT instead.
        self.W_in = brainstate.ParamState(
            0.1 * jax.random.normal(jax.random.PRNGKey(1), (in_dim, hid_dim))
        )

    def init_state(self, batch_size=None, **kwargs):
        # ``HiddenState`` is what the ETP compiler traces through.
        self.h = brainstate.HiddenState(
            jnp.zeros((batch_size or 1, self.hid_dim))
        )

    def update(self, x):
        # W_in is NOT marked -> excluded from ETP.
        input_drive = x @ self.W_in.value
        # W_rec IS marked -> included in ETP.
        rec_drive = braintrace.matmul(self.h.value, self.W_rec.value)
        self.h.value = jax.nn.tanh(input_drive + rec_drive)
        return self.h.value


model = TinyRNN(in_dim=4, hid_dim=6)
brainstate.nn.init_all_states(model, batch_size=2)

# Wrap the model in a D-RTRL algorithm and compile the ETP graph.
alg = braintrace.D_RTRL(model)
alg.compile_graph(jnp.zeros((2, model.in_dim)))

print("Compiled ETP relations:", len(alg.graph.hidden_param_op_relations))
for rel in alg.graph.hidden_param_op_relations:
    print("   primitive =", rel.primitive.name,
          "  trainable keys =", list(rel.trainable_vars.keys()))
"""

TINY_RNN_OUTPUT = "Compiled ETP relations: 1\n   primitive = etp_mm   trainable keys = ['weight']\n"


def test_spec_notebook_tiny_rnn_cell():
    out = io.StringIO()
    namespace = {"jax": jax, "jnp": jnp, "braintrace": braintrace}
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(TINY_RNN_CELL, "<notebook: TinyRNN + D_RTRL>", "exec"), namespace)
    assert out.getvalue() == TINY_RNN_OUTPUT
