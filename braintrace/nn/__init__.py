"""Layers for online learning: every trainable product goes through an ETP primitive.

* linear maps: :class:`Linear`, :class:`SparseLinear` (with its non-trainable
  :class:`SparseIndices` state), :class:`LoRA`, :class:`Conv1d`, :class:`Conv2d`, :class:`Conv3d`;
* recurrent cells: :class:`ValinaRNNCell`, :class:`GRUCell`, :class:`LSTMCell`, :class:`MGUCell`,
  :class:`MinimalRNNCell`;
* spiking: :class:`LIF`, :class:`ALIF`, the synapse :class:`Expon`, and the surrogate spike
  functions in :mod:`braintrace.nn.surrogate`;
* read-outs: :class:`LeakyRateReadout`, :class:`LeakySpikeReadout`.
"""

from . import surrogate
from .conv import Conv1d, Conv2d, Conv3d
from .linear import Linear, LoRA, SparseIndices, SparseLinear
from .neurons import ALIF, LIF
from .readout import LeakyRateReadout, LeakySpikeReadout
from .rnn_cells import GRUCell, LSTMCell, MGUCell, MinimalRNNCell, ValinaRNNCell
from .synapses import Expon

__all__ = [
    "surrogate",
    "Linear",
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
    "LIF",
    "ALIF",
    "Expon",
    "LeakyRateReadout",
    "LeakySpikeReadout",
]
