"""The ETP primitive layer: registries, ``ETPPrimitive``, ``ETPPrimitiveSpec``, the built-in
primitives with their four rules, and the user-facing wrappers."""

from ._primitive import ETPPrimitive, register_primitive, unregister_primitive
from ._registries import (
    BATCHED_PRIMITIVES,
    ETP_PRIMITIVE_SPECS,
    ETP_PRIMITIVES,
    ETP_RULES_INIT_DRTRL,
    ETP_RULES_INIT_PP,
    ETP_RULES_XY_TO_DW,
    ETP_RULES_YW_TO_W,
    ETP_TRAINABLE_INVARS_FNS,
    ETP_X_INVAR_INDICES,
    ETP_Y_OUTVAR_INDICES,
    GRADIENT_ENABLED_PRIMITIVES,
    get_rule,
    get_trainable_invars,
    get_x_invar_index,
    get_y_outvar_index,
    is_batched_primitive,
    is_etp_enable_gradient_primitive,
    is_etp_primitive,
)
from ._spec import ETPPrimitiveSpec, get_primitive_spec, register_primitive_spec
from .conv import conv, etp_conv_p
from .dense import etp_mm_p, etp_mv_p, matmul
from .einsum import einsum
from .elemwise import element_wise, etp_elemwise_p
from .embedding import embedding
from .grouped import grouped_matmul
from .lora import etp_lora_mm_p, etp_lora_mv_p, lora_matmul
from .sparse import SparsePattern, etp_sp_mm_p, etp_sp_mv_p, sparse_matmul

__all__ = [
    "BATCHED_PRIMITIVES",
    "ETP_PRIMITIVE_SPECS",
    "ETP_PRIMITIVES",
    "ETP_RULES_INIT_DRTRL",
    "ETP_RULES_INIT_PP",
    "ETP_RULES_XY_TO_DW",
    "ETP_RULES_YW_TO_W",
    "ETP_TRAINABLE_INVARS_FNS",
    "ETP_X_INVAR_INDICES",
    "ETP_Y_OUTVAR_INDICES",
    "GRADIENT_ENABLED_PRIMITIVES",
    "get_rule",
    "is_etp_primitive",
    "is_etp_enable_gradient_primitive",
    "is_batched_primitive",
    "get_trainable_invars",
    "get_x_invar_index",
    "get_y_outvar_index",
    "ETPPrimitive",
    "register_primitive",
    "unregister_primitive",
    "ETPPrimitiveSpec",
    "get_primitive_spec",
    "register_primitive_spec",
    "etp_mm_p",
    "etp_mv_p",
    "matmul",
    "etp_elemwise_p",
    "element_wise",
    "etp_conv_p",
    "conv",
    "etp_sp_mm_p",
    "etp_sp_mv_p",
    "SparsePattern",
    "sparse_matmul",
    "etp_lora_mm_p",
    "etp_lora_mv_p",
    "lora_matmul",
    "grouped_matmul",
    "einsum",
    "embedding",
]
