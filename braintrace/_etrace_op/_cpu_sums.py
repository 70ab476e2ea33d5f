"""Sums over a few batch rows (and hidden states) as the CPU lowering of the trace solves.

XLA:CPU (jax 0.10) hands a reduction of :data:`MIN_ELEMENTS` elements or more to its YNNPACK
fusion, which is 2-10x slower than a loop fusion on the reductions of the trace solves (a sum of
products over a few batch rows); below that size it keeps the reduction in a loop fusion, which is
the fastest form. The solves therefore lower on the CPU to an unrolled sum of the terms' slices
where the reduction is large and the terms few (one loop fusion, often sharing its pass with the
trace update), and keep the reduction elsewhere and on every other platform.
"""

from __future__ import annotations

from functools import reduce
from typing import Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["MIN_ELEMENTS", "unrolls", "unrolled_sum"]

#: The size from which XLA:CPU lowers a reduction through YNNPACK (measured with jax 0.10.2:
#: ``(4, 32, 32)`` summed over the first axis is a YNNPACK fusion, ``(3, 32, 32)`` a loop fusion).
MIN_ELEMENTS = 4096


def unrolls(shape: Sequence[int], axes: Sequence[int], max_terms: int) -> bool:
    """Whether a sum of an array of ``shape`` over ``axes`` is lowered unrolled on the CPU: at least
    :data:`MIN_ELEMENTS` elements, and at most ``max_terms`` terms (the product of the summed axes'
    lengths; each term is a strided pass over the array)."""
    terms = int(np.prod([shape[a] for a in axes]))
    return terms <= max_terms and int(np.prod(shape)) >= MIN_ELEMENTS


def unrolled_sum(products, axes: Sequence[int]):
    """``products`` summed over ``axes`` as a sum of slices (``axes`` sorted, non-negative)."""
    axes = tuple(axes)
    kept = [a for a in range(products.ndim) if a not in axes]
    terms = jnp.transpose(products, (*axes, *kept))
    terms = terms.reshape((-1, *[products.shape[a] for a in kept]))
    return reduce(jnp.add, [terms[i] for i in range(terms.shape[0])])
