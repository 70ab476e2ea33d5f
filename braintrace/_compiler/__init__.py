"""The ETP compiler: from one model step to hidden groups and hidden-param-op relations."""

from .control_flow_policy import ControlFlowPolicy
from .diagnostics import (
    CompilationError,
    CompilationRecord,
    DiagnosticKind,
    DiagnosticLevel,
    ETraceCompilationWarning,
    NotSupportedError,
)
from .graph import (
    ETraceGraph,
    HiddenGroup,
    HiddenParamOpRelation,
    compile_etrace_graph,
    find_hidden_groups_from_module,
    find_hidden_param_op_relations_from_module,
)
from .minfo_stages import (
    add_hidden_perturbation_from_minfo,
    find_hidden_groups_from_minfo,
    find_hidden_param_op_relations_from_minfo,
)
from .module_info import HiddenLeaf, ModuleInfo, extract_module_info
from .perturbation import HiddenPerturbation, add_hidden_perturbation_in_module
from .report import CompilationReport

__all__ = [
    "CompilationError",
    "CompilationRecord",
    "DiagnosticKind",
    "DiagnosticLevel",
    "ETraceCompilationWarning",
    "NotSupportedError",
    "ETraceGraph",
    "HiddenGroup",
    "HiddenParamOpRelation",
    "compile_etrace_graph",
    "find_hidden_groups_from_module",
    "find_hidden_param_op_relations_from_module",
    "HiddenLeaf",
    "ModuleInfo",
    "extract_module_info",
    "HiddenPerturbation",
    "add_hidden_perturbation_in_module",
    "CompilationReport",
    "ControlFlowPolicy",
    "add_hidden_perturbation_from_minfo",
    "find_hidden_groups_from_minfo",
    "find_hidden_param_op_relations_from_minfo",
]
