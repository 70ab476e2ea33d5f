"""braintrace: online learning for recurrent and spiking networks in JAX.

Models mark their trainable operations with ETP primitives (:func:`matmul`, :func:`element_wise`,
:func:`conv`, :func:`sparse_matmul`, :func:`lora_matmul`); the compiler connects each to the hidden
states it drives, and the online algorithms (:class:`D_RTRL`, :class:`ES_D_RTRL` / :func:`pp_prop`)
carry eligibility traces forward in time.
"""

__version__ = "0.3.0"

from ._backend import backend, get_backend, set_backend
from ._etrace_op import (
    ETPPrimitive,
    ETPPrimitiveSpec,
    SparsePattern,
    conv,
    einsum,
    element_wise,
    embedding,
    get_primitive_spec,
    grouped_matmul,
    lora_matmul,
    matmul,
    register_primitive,
    register_primitive_spec,
    sparse_matmul,
)

__all__ = [
    "backend",
    "get_backend",
    "set_backend",
    "ETPPrimitive",
    "ETPPrimitiveSpec",
    "SparsePattern",
    "conv",
    "element_wise",
    "get_primitive_spec",
    "matmul",
    "register_primitive",
    "register_primitive_spec",
    "sparse_matmul",
    "lora_matmul",
    "grouped_matmul",
    "einsum",
    "embedding",
]

from ._algorithm import (  # noqa: E402
    D_RTRL,
    ES_D_RTRL,
    EligibilityTrace,
    ETraceAlgorithm,
    ETraceGraphExecutor,
    ETraceVjpAlgorithm,
    ETraceVjpGraphExecutor,
    IODimVjpAlgorithm,
    ParamDimVjpAlgorithm,
    compile,
    pp_prop,
)
from ._compiler import (  # noqa: E402
    CompilationError,
    CompilationRecord,
    CompilationReport,
    ControlFlowPolicy,
    DiagnosticKind,
    DiagnosticLevel,
    ETraceGraph,
    HiddenGroup,
    HiddenParamOpRelation,
    HiddenPerturbation,
    ModuleInfo,
    NotSupportedError,
    add_hidden_perturbation_from_minfo,
    add_hidden_perturbation_in_module,
    compile_etrace_graph,
    extract_module_info,
    find_hidden_groups_from_minfo,
    find_hidden_groups_from_module,
    find_hidden_param_op_relations_from_minfo,
    find_hidden_param_op_relations_from_module,
)

__all__ += [
    "CompilationError",
    "CompilationRecord",
    "CompilationReport",
    "ControlFlowPolicy",
    "add_hidden_perturbation_from_minfo",
    "find_hidden_groups_from_minfo",
    "find_hidden_param_op_relations_from_minfo",
    "DiagnosticKind",
    "DiagnosticLevel",
    "ETraceGraph",
    "HiddenGroup",
    "HiddenParamOpRelation",
    "HiddenPerturbation",
    "ModuleInfo",
    "NotSupportedError",
    "add_hidden_perturbation_in_module",
    "compile_etrace_graph",
    "extract_module_info",
    "find_hidden_groups_from_module",
    "find_hidden_param_op_relations_from_module",
    "D_RTRL",
    "ES_D_RTRL",
    "EligibilityTrace",
    "ETraceAlgorithm",
    "ETraceGraphExecutor",
    "ETraceVjpAlgorithm",
    "ETraceVjpGraphExecutor",
    "IODimVjpAlgorithm",
    "ParamDimVjpAlgorithm",
    "compile",
    "pp_prop",
    "nn",
    "SingleStepData",
    "MultiStepData",
]

from . import nn  # noqa: E402
from ._input_data import MultiStepData, SingleStepData  # noqa: E402
from ._param_ops import (  # noqa: E402
    ConvOp,
    ElemWiseOp,
    ElemWiseParam,
    ETraceOp,
    ETraceParam,
    FakeElemWiseParam,
    FakeETraceParam,
    LoraOp,
    MatMulOp,
    NonTempParam,
    SpMatMulOp,
)

__all__ += [
    "ETraceParam",
    "ElemWiseParam",
    "NonTempParam",
    "FakeETraceParam",
    "FakeElemWiseParam",
    "ETraceOp",
    "MatMulOp",
    "ElemWiseOp",
    "ConvOp",
    "SpMatMulOp",
    "LoraOp",
]

from ._algorithm import ETraceVmap, SequenceDriverMixin  # noqa: E402
from ._grad_expon import GradExpon  # noqa: E402

__all__ += ["ETraceVmap", "SequenceDriverMixin", "GradExpon"]

from ._algorithm import (  # noqa: E402
    EProp,
    ETraceConfig,
    FixedRandomFeedback,
    KappaFilter,
    OSTLFeedforward,
    OSTLRecurrent,
    ThreeFactor,
)

__all__ += [
    "ETraceConfig",
    "EProp",
    "ThreeFactor",
    "OSTLRecurrent",
    "OSTLFeedforward",
    "FixedRandomFeedback",
    "KappaFilter",
]

from ._algorithm import RTRL, UORO, InfluenceVjpAlgorithm, RandomProjectionVjpAlgorithm, SnAp  # noqa: E402

__all__ += ["InfluenceVjpAlgorithm", "RTRL", "SnAp", "RandomProjectionVjpAlgorithm", "UORO"]

from ._algorithm import DNI, SyntheticGradient, train_synthetic_gradient  # noqa: E402

__all__ += ["DNI", "SyntheticGradient", "train_synthetic_gradient"]

from ._algorithm.postsynaptic_sharding import shard_postsynaptic  # noqa: E402
from ._etrace_op.sparse_partition import PostsynapticPartition, partition_postsynaptic  # noqa: E402

__all__ += ["partition_postsynaptic", "PostsynapticPartition", "shard_postsynaptic"]
