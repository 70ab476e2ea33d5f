"""Layers for online learning: every trainable product goes through an ETP primitive.

* linear maps: :class:`Linear`, :class:`SignedWLinear`, :class:`ScaledWSLinear`,
  :class:`GroupedLinear`, :class:`SparseLinear` (with its non-trainable :class:`SparseIndices`
  state), :class:`LoRA`, :class:`Conv1d`, :class:`Conv2d`, :class:`Conv3d`;
* the lookup table :class:`Embedding` (a plain parameter: within-step gradient);
* recurrent cells: :class:`ValinaRNNCell`, :class:`GRUCell`, :class:`LSTMCell`, :class:`MGUCell`,
  :class:`MinimalRNNCell`, :class:`MiniGRU`, :class:`MiniLSTM`, :class:`URLSTMCell`,
  :class:`CFNCell`, :class:`LRUCell`;
* spiking: the neurons :class:`LIF`, :class:`IF`, :class:`ALIF`, the synapses :class:`Expon`,
  :class:`Alpha`, :class:`DualExpon`, the short-term plasticity models :class:`STD` and
  :class:`STP`, and the surrogate spike functions in :mod:`braintrace.nn.surrogate`;
* read-outs: :class:`LeakyRateReadout`, :class:`LeakySpikeReadout`.

Layers without trainable products or without weights of their own (activations, pooling,
normalisation, dropout, reshaping) are the ``brainstate.nn`` classes themselves, re-exported here
under the names of the published ``braintrace.nn`` (listed in ``BRAINSTATE_NAMES``; e.g.
``braintrace.nn.ReLU is brainstate.nn.ReLU``; as there, they are not in ``__all__``). Their
parameters, where they have any (``PReLU``'s slope, the affine parameters of the normalisations),
are plain parameters with their within-step gradient.
"""

from brainstate.nn import (
    CELU,
    ELU,
    GELU,
    GLU,
    SELU,
    AdaptiveAvgPool1d,
    AdaptiveAvgPool2d,
    AdaptiveAvgPool3d,
    AdaptiveMaxPool1d,
    AdaptiveMaxPool2d,
    AdaptiveMaxPool3d,
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
    BatchNorm0d,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    Dropout,
    Dropout1d,
    Dropout2d,
    Dropout3d,
    Flatten,
    GroupNorm,
    Hardshrink,
    Hardsigmoid,
    Hardswish,
    Hardtanh,
    Identity,
    LayerNorm,
    LeakyReLU,
    LogSigmoid,
    LogSoftmax,
    MaxPool1d,
    MaxPool2d,
    MaxPool3d,
    Mish,
    PReLU,
    ReLU,
    ReLU6,
    RMSNorm,
    RReLU,
    Sigmoid,
    SiLU,
    Softmax,
    Softmax2d,
    Softmin,
    Softplus,
    Softshrink,
    Softsign,
    SpikeBitwise,
    Tanh,
    Tanhshrink,
    Unflatten,
)

from . import surrogate
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .grouped import GroupedLinear
from .linear import Linear, LoRA, ScaledWSLinear, SignedWLinear, SparseIndices, SparseLinear
from .neurons import ALIF, IF, LIF
from .readout import LeakyRateReadout, LeakySpikeReadout
from .rnn_cells import (
    CFNCell,
    GRUCell,
    LRUCell,
    LSTMCell,
    MGUCell,
    MiniGRU,
    MiniLSTM,
    MinimalRNNCell,
    URLSTMCell,
    ValinaRNNCell,
)
from .synapses import STD, STP, Alpha, DualExpon, Expon

#: The ``brainstate.nn`` classes re-exported unchanged (the same objects), in the groups of the published
#: ``braintrace.nn``: activations, dropout / identity / reshaping, pooling, normalisation.
_BRAINSTATE_CLASSES = (
    # activations
    ReLU,
    RReLU,
    Hardtanh,
    ReLU6,
    Sigmoid,
    Hardsigmoid,
    Tanh,
    SiLU,
    Mish,
    Hardswish,
    ELU,
    CELU,
    SELU,
    GLU,
    GELU,
    Hardshrink,
    LeakyReLU,
    LogSigmoid,
    Softplus,
    Softshrink,
    PReLU,
    Softsign,
    Tanhshrink,
    Softmin,
    Softmax,
    Softmax2d,
    LogSoftmax,
    SpikeBitwise,
    # dropout, identity, reshaping
    Dropout,
    Dropout1d,
    Dropout2d,
    Dropout3d,
    Identity,
    Flatten,
    Unflatten,
    # pooling
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
    MaxPool1d,
    MaxPool2d,
    MaxPool3d,
    AdaptiveAvgPool1d,
    AdaptiveAvgPool2d,
    AdaptiveAvgPool3d,
    AdaptiveMaxPool1d,
    AdaptiveMaxPool2d,
    AdaptiveMaxPool3d,
    # normalisation
    BatchNorm0d,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LayerNorm,
    RMSNorm,
    GroupNorm,
)
BRAINSTATE_NAMES = tuple(cls.__name__ for cls in _BRAINSTATE_CLASSES)

__all__ = [
    "surrogate",
    "Linear",
    "SignedWLinear",
    "ScaledWSLinear",
    "GroupedLinear",
    "SparseLinear",
    "SparseIndices",
    "LoRA",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "ValinaRNNCell",
    "GRUCell",
    "LSTMCell",
    "MGUCell",
    "MinimalRNNCell",
    "MiniGRU",
    "MiniLSTM",
    "URLSTMCell",
    "CFNCell",
    "LRUCell",
    "LIF",
    "IF",
    "ALIF",
    "Expon",
    "Alpha",
    "DualExpon",
    "STD",
    "STP",
    "LeakyRateReadout",
    "LeakySpikeReadout",
]  # the brainstate names are attributes of this module but, as in the published package, not in __all__
