"""Layers for online learning: every trainable product goes through an ETP primitive.

* linear maps: :class:`Linear`, :class:`SignedWLinear`, :class:`ScaledWSLinear`,
  :class:`GroupedLinear`, :class:`SparseLinear` (with its non-trainable :class:`SparseIndices`
  state), :class:`LoRA`, :class:`Conv1d`, :class:`Conv2d`, :class:`Conv3d`;
* recurrent cells: :class:`ValinaRNNCell`, :class:`GRUCell`, :class:`LSTMCell`, :class:`MGUCell`,
  :class:`MinimalRNNCell`, :class:`MiniGRU`, :class:`MiniLSTM`, :class:`URLSTMCell`,
  :class:`CFNCell`, :class:`LRUCell`;
* spiking: :class:`LIF`, :class:`ALIF`, the synapse :class:`Expon`, and the surrogate spike
  functions in :mod:`braintrace.nn.surrogate`;
* read-outs: :class:`LeakyRateReadout`, :class:`LeakySpikeReadout`.
"""

from . import surrogate
from .conv import Conv1d, Conv2d, Conv3d
from .grouped import GroupedLinear
from .linear import Linear, LoRA, ScaledWSLinear, SignedWLinear, SparseIndices, SparseLinear
from .neurons import ALIF, LIF
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
from .synapses import Expon

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
    "ALIF",
    "Expon",
    "LeakyRateReadout",
    "LeakySpikeReadout",
]
