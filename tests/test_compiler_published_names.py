"""The compiler's published names: ``CompilationRecord``'s published fields, ``CompilationReport``,
``ControlFlowPolicy`` and the ``*_from_minfo`` stages."""

from __future__ import annotations

import io

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace
from braintrace import CompilationRecord, ControlFlowPolicy, DiagnosticKind, DiagnosticLevel

B, I, H = 2, 3, 4


class Net(brainstate.nn.Module):
    """An ETP relation (``w``), a plain parameter (``b``), a weight whose op reaches no hidden state
    (``r``, read out only), a hidden state driven by no relation (``z``), a non-hidden short-term
    state (``count``); ``loop`` puts the input weight inside ``fori_loop`` sub-steps."""

    def __init__(self, loop: int = 0):
        super().__init__()
        rng = np.random.default_rng(0)
        self.loop = loop
        self.w = brainstate.ParamState(jnp.asarray(rng.normal(0, 0.5, (I, H))))
        self.b = brainstate.ParamState(jnp.zeros(H))
        self.r = brainstate.ParamState(jnp.asarray(rng.normal(0, 0.5, (H, 1))))

    def init_state(self, batch_size=None, **kw):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))
        self.z = brainstate.HiddenState(jnp.zeros((batch_size, H)))
        self.count = brainstate.ShortTermState(jnp.zeros(()))

    def update(self, x):
        if self.loop:
            body = lambda i, h: 0.5 * h + 0.1 * braintrace.matmul(x, self.w.value)  # noqa: E731
            self.h.value = jax.lax.fori_loop(0, self.loop, body, self.h.value) + self.b.value
        else:
            self.h.value = 0.9 * self.h.value + braintrace.matmul(x, self.w.value) + self.b.value
        self.z.value = 0.5 * self.z.value + 1.0
        self.count.value = self.count.value + 1
        return braintrace.matmul(self.h.value, self.r.value)


def _model(loop=0):
    m = Net(loop)
    brainstate.nn.init_all_states(m, batch_size=B)
    return m


X = jnp.zeros((B, I))


def _graph(loop=0, **kw):
    """``compile_etrace_graph`` of :class:`Net`, which warns about ``r`` (read out only)."""
    with pytest.warns(UserWarning, match="reaches no hidden state"):
        return braintrace.compile_etrace_graph(_model(loop), X, **kw)


# -------------------------------------------------------------------------------------------------
# CompilationRecord
# -------------------------------------------------------------------------------------------------


def test_record_constructors():
    old = CompilationRecord(DiagnosticKind.PLAIN_PARAMETER, DiagnosticLevel.INFO, "m", ("b",))
    assert old.subject == ("b",) and old.primitive is None and old.weight_path is None
    assert old.hidden_paths == () and old.context is None
    new = CompilationRecord(
        kind=DiagnosticKind.SHAPE_MISMATCH,
        level=DiagnosticLevel.WARNING,
        message="m",
        primitive=braintrace._etrace_op.etp_mm_p,
        weight_path=("layer", "weight"),
        hidden_paths=(("h",),),
        context={"why": 1},
    )
    assert new.subject is None and new.weight_path == ("layer", "weight") and new.context == {"why": 1}
    assert str(new) == "[warning] shape_mismatch: m"


def test_records_carry_primitive_weight_and_hidden_paths():
    g = _graph()
    by_kind = {}
    for rec in g.records:
        by_kind.setdefault(rec.kind, []).append(rec)
    (plain,) = [r for r in by_kind[DiagnosticKind.PLAIN_PARAMETER] if r.subject == ("b",)]
    assert plain.weight_path == ("b",) and plain.primitive is None
    (unreached,) = by_kind[DiagnosticKind.WEIGHT_NOT_REACHING_HIDDEN]
    assert unreached.primitive is braintrace._etrace_op.etp_mm_p and unreached.weight_path == ("r",)
    (idle,) = by_kind[DiagnosticKind.HIDDEN_WITHOUT_RELATION]
    assert idle.hidden_paths == (("z",),) and idle.weight_path is None


# -------------------------------------------------------------------------------------------------
# CompilationReport
# -------------------------------------------------------------------------------------------------


def test_report_views_and_text():
    g = _graph()
    report = braintrace.CompilationReport(g)
    assert report.graph is g
    assert report.hidden_groups == [(0, [("h",)]), (1, [("z",)])]
    assert report.etrace_weights == [(("w",), [0])]
    assert report.excluded_weights == [(("b",), "plain_parameter"), (("r",), "weight_not_reaching_hidden")]
    assert report.dynamic_states == [("count",)]
    assert report.diagnostics == tuple(g.records)
    warnings = sum(r.level is DiagnosticLevel.WARNING for r in g.records)
    assert warnings >= 1
    assert report.counts == {
        "hidden_groups": len(g.hidden_groups),
        "etrace_weights": 1,
        "excluded_weights": 2,
        "warnings": warnings,
        "errors": 0,
    }
    text = report.to_str()
    assert "Weight 0: ('w',)  is associated with hidden group" in text
    assert "('r',)  (excluded: weight_not_reaching_hidden)" in text
    assert "Dynamic state 0: ('count',)" in text and "Compiler diagnostics" not in text
    assert "[warning] weight_not_reaching_hidden" in report.to_str(2)
    buf = io.StringIO()
    report.show(2, file=buf)
    assert buf.getvalue() == report.to_str(2) + "\n"
    assert repr(report).startswith("CompilationReport(hidden_groups=")
    with pytest.raises(ValueError, match="`level`"):
        report.to_str(3)
    with pytest.raises(TypeError, match="ETraceGraph"):
        braintrace.CompilationReport(object())


# -------------------------------------------------------------------------------------------------
# ControlFlowPolicy
# -------------------------------------------------------------------------------------------------


def test_policy_fields_and_validation():
    p = ControlFlowPolicy()
    assert (p.cond, p.scan_unroll_limit, p.while_hidden, p.etp_in_control_flow, p.scan_descent) == (
        "convert",
        16,
        "opaque-fwd",
        "error",
        "auto",
    )
    assert p.fixpoint_iteration_limit == 64
    for field, bad in (
        ("cond", "maybe"),
        ("while_hidden", "x"),
        ("etp_in_control_flow", "x"),
        ("scan_descent", "x"),
    ):
        with pytest.raises(ValueError, match=f"ControlFlowPolicy.{field}"):
            ControlFlowPolicy(**{field: bad})
    with pytest.raises(TypeError, match="scan_unroll_limit"):
        ControlFlowPolicy(scan_unroll_limit=2.0)
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="fixpoint_iteration_limit"):
            ControlFlowPolicy(fixpoint_iteration_limit=bad)


def test_compile_accepts_the_policies_it_implements():
    default = _graph(3)
    same = _graph(3, control_flow=ControlFlowPolicy(scan_descent="off"))
    assert [r.primitive.name for r in same.hidden_param_op_relations] == ["etp_mm"] * 3  # unrolled
    assert len(default.hidden_param_op_relations) == 3
    # a loop longer than the limit: refused, naming the limit and, under 'auto', the missing descent
    with pytest.raises(braintrace.NotSupportedError, match="scan_unroll_limit=2") as err:
        braintrace.compile_etrace_graph(_model(3), X, control_flow=ControlFlowPolicy(scan_unroll_limit=2))
    assert "scan_descent='auto'" in str(err.value) and isinstance(err.value, NotImplementedError)
    with pytest.raises(braintrace.NotSupportedError) as err:
        policy = ControlFlowPolicy(scan_unroll_limit=-1, scan_descent="off")
        braintrace.compile_etrace_graph(_model(3), X, control_flow=policy)
    assert "scan_descent" not in str(err.value)
    wide = _graph(20, control_flow=ControlFlowPolicy(scan_unroll_limit=20))
    assert len(wide.hidden_param_op_relations) == 20


@pytest.mark.parametrize(
    "field,value", [("cond", "opaque"), ("while_hidden", "error"), ("etp_in_control_flow", "exclude")]
)
def test_policies_not_provided_raise_naming_field_and_value(field, value):
    with pytest.raises(NotImplementedError, match=f"ControlFlowPolicy\\({field}={value!r}\\)"):
        braintrace.compile_etrace_graph(_model(), X, control_flow=ControlFlowPolicy(**{field: value}))


def test_control_flow_must_be_a_policy():
    with pytest.raises(TypeError, match="ControlFlowPolicy"):
        braintrace.compile_etrace_graph(_model(), X, control_flow="convert")


# -------------------------------------------------------------------------------------------------
# *_from_minfo
# -------------------------------------------------------------------------------------------------


def test_minfo_stages_equal_compile_etrace_graph():
    g = _graph()
    minfo = braintrace.extract_module_info(_model(), X)
    groups, by_path = braintrace.find_hidden_groups_from_minfo(minfo)
    assert [gr.names for gr in groups] == [gr.names for gr in g.hidden_groups]
    assert {k: v.names for k, v in by_path.items()} == {("h",): ("h",), ("z",): ("z",)}
    with pytest.warns(UserWarning):
        rels = braintrace.find_hidden_param_op_relations_from_minfo(minfo, by_path)
    assert [(r.primitive, r.eqn_index, r.param_paths) for r in rels] == [
        (r.primitive, r.eqn_index, r.param_paths) for r in g.hidden_param_op_relations
    ]
    pert = braintrace.add_hidden_perturbation_from_minfo(minfo)
    assert [h.name for h in pert.hidden_leaves] == ["h", "z"]


def test_minfo_stage_errors():
    minfo = braintrace.extract_module_info(_model(), X)
    with pytest.raises(NotImplementedError, match="include_recurrent_mixing"):
        braintrace.find_hidden_groups_from_minfo(minfo, include_recurrent_mixing=True)
    with pytest.raises(NotImplementedError, match="sparse_n"):
        braintrace.find_hidden_groups_from_minfo(minfo, sparse_n=2)
    with pytest.raises(NotImplementedError, match="descended_scan_eqn_ids"):
        braintrace.find_hidden_groups_from_minfo(minfo, descended_scan_eqn_ids=frozenset({1}))
    with pytest.raises(NotImplementedError, match="descended_scan_eqn_ids"):
        braintrace.add_hidden_perturbation_from_minfo(minfo, descended_scan_eqn_ids=frozenset({1}))
    with pytest.raises(TypeError, match="`minfo` must be a braintrace.ModuleInfo"):
        braintrace.find_hidden_groups_from_minfo(_model())
    _, by_path = braintrace.find_hidden_groups_from_minfo(minfo)
    with pytest.raises(ValueError, match=r"no group for the hidden states \['z'\]"):
        braintrace.find_hidden_param_op_relations_from_minfo(minfo, {("h",): by_path[("h",)]})
    with pytest.raises(TypeError, match="HiddenGroup"):
        braintrace.find_hidden_param_op_relations_from_minfo(minfo, {("h",): "group"})
