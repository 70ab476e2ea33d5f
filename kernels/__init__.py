"""Pallas kernels of braintrace, imported as ``braintrace_kernels``: pure functions of arrays.

One module per op, each kernel beside a plain-``jnp`` ``*_reference`` with the same signature:

- :mod:`.dense`: D-RTRL trace of a dense layer (update, solve, both in one pass; bias = ``I = 1``).
- :mod:`.csr`: D-RTRL trace of a CSR layer in the kernel layout ``(nnz, n, B)``.
- :mod:`.csr_matmul`: the CSR layer's products (``csr_matmul`` with its gradient,
  ``csr_matmul_transpose``, ``csr_sddmm``, which is also the ES-D-RTRL solve).
- :mod:`.lora`: exact D-RTRL traces of a LoRA layer, built on the dense kernels.

Kernels run compiled through Pallas-Triton on a CUDA GPU (float32, bfloat16 storage) or in Pallas
interpret mode anywhere (``interpret=True``; float64 too). Nothing here imports ``braintrace``.
"""

from .csr import (
    CsrBlockSizes,
    csr_trace_from_kernel_layout,
    csr_trace_solve,
    csr_trace_solve_reference,
    csr_trace_to_kernel_layout,
    csr_trace_update,
    csr_trace_update_reference,
    csr_trace_update_solve,
    csr_trace_update_solve_reference,
    csr_unit_major,
)
from .csr_matmul import (
    CsrMatmulBlockSizes,
    csr_matmul,
    csr_matmul_reference,
    csr_matmul_transpose,
    csr_matmul_transpose_reference,
    csr_row_pointers,
    csr_sddmm,
    csr_sddmm_reference,
    csr_to_csc,
)
from .dense import (
    DenseBlockSizes,
    dense_trace_solve,
    dense_trace_solve_reference,
    dense_trace_update,
    dense_trace_update_reference,
    dense_trace_update_solve,
    dense_trace_update_solve_reference,
)
from .lora import (
    lora_trace_solve,
    lora_trace_solve_reference,
    lora_trace_update,
    lora_trace_update_reference,
    lora_trace_update_solve,
    lora_trace_update_solve_reference,
)

__all__ = [
    # dense
    "DenseBlockSizes",
    "dense_trace_update",
    "dense_trace_solve",
    "dense_trace_update_solve",
    "dense_trace_update_reference",
    "dense_trace_solve_reference",
    "dense_trace_update_solve_reference",
    # csr
    "CsrBlockSizes",
    "csr_trace_to_kernel_layout",
    "csr_trace_from_kernel_layout",
    "csr_unit_major",
    "csr_trace_update",
    "csr_trace_solve",
    "csr_trace_update_solve",
    "csr_trace_update_reference",
    "csr_trace_solve_reference",
    "csr_trace_update_solve_reference",
    # csr_matmul
    "CsrMatmulBlockSizes",
    "csr_to_csc",
    "csr_row_pointers",
    "csr_matmul",
    "csr_matmul_transpose",
    "csr_sddmm",
    "csr_matmul_reference",
    "csr_matmul_transpose_reference",
    "csr_sddmm_reference",
    # lora
    "lora_trace_update",
    "lora_trace_solve",
    "lora_trace_update_solve",
    "lora_trace_update_reference",
    "lora_trace_solve_reference",
    "lora_trace_update_solve_reference",
]
