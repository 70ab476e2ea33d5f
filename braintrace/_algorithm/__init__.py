"""Online-learning algorithms: D-RTRL and ES-D-RTRL / pp_prop."""

from .axes import ETraceConfig
from .base import EligibilityTrace, ETraceAlgorithm
from .compiling import ALGORITHMS, compile
from .d_rtrl import D_RTRL, ParamDimVjpAlgorithm
from .dni import DNI, SyntheticGradient, train_synthetic_gradient
from .executor import ETraceGraphExecutor, ETraceVjpGraphExecutor
from .filters import KappaFilter
from .influence import RTRL, UORO, InfluenceVjpAlgorithm, RandomProjectionVjpAlgorithm, SnAp
from .learning_signal import FixedRandomFeedback
from .pp_prop import ES_D_RTRL, IODimVjpAlgorithm, pp_prop
from .presets import EProp, OSTLFeedforward, OSTLRecurrent, ThreeFactor
from .sequence import SequenceDriverMixin
from .vjp_algorithm import ETraceVjpAlgorithm
from .vmap import ETraceVmap

__all__ = [
    "EligibilityTrace",
    "ETraceAlgorithm",
    "ETraceVjpAlgorithm",
    "D_RTRL",
    "ParamDimVjpAlgorithm",
    "ES_D_RTRL",
    "IODimVjpAlgorithm",
    "pp_prop",
    "ALGORITHMS",
    "compile",
    "ETraceGraphExecutor",
    "ETraceVjpGraphExecutor",
    "InfluenceVjpAlgorithm",
    "RTRL",
    "SnAp",
    "RandomProjectionVjpAlgorithm",
    "UORO",
    "ETraceConfig",
    "EProp",
    "ThreeFactor",
    "OSTLRecurrent",
    "OSTLFeedforward",
    "FixedRandomFeedback",
    "KappaFilter",
    "SequenceDriverMixin",
    "ETraceVmap",
    "DNI",
    "SyntheticGradient",
    "train_synthetic_gradient",
]
