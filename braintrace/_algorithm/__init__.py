"""Online-learning algorithms: D-RTRL and ES-D-RTRL / pp_prop."""

from .base import EligibilityTrace, ETraceAlgorithm, ETraceVjpAlgorithm
from .d_rtrl import D_RTRL, ParamDimVjpAlgorithm
from .executor import ETraceGraphExecutor, ETraceVjpGraphExecutor

__all__ = [
    "EligibilityTrace",
    "ETraceAlgorithm",
    "ETraceVjpAlgorithm",
    "D_RTRL",
    "ParamDimVjpAlgorithm",
    "ETraceGraphExecutor",
    "ETraceVjpGraphExecutor",
]
