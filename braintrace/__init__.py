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
    element_wise,
    get_primitive_spec,
    matmul,
    register_primitive,
    register_primitive_spec,
)

__all__ = [
    "backend",
    "get_backend",
    "set_backend",
    "ETPPrimitive",
    "ETPPrimitiveSpec",
    "element_wise",
    "get_primitive_spec",
    "matmul",
    "register_primitive",
    "register_primitive_spec",
]
