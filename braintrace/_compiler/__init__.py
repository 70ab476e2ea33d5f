"""The ETP compiler: from one model step to hidden groups and hidden-param-op relations."""

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
from .module_info import HiddenLeaf, ModuleInfo, extract_module_info
from .perturbation import HiddenPerturbation, add_hidden_perturbation_in_module

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
]
