r"""Where the outputs of a step's equations are summed before anything else reads them.

A recurrent cell usually adds its projections before the non-linearity: ``tanh(x W_in + h W_rec)``,
a synaptic current ``W_in x + W_rec s``. An output ``y`` whose only reader is such an addition, of
its own shape and dtype, reaches the rest of the step only through the sum ``s``:
:math:`\partial s/\partial y = 1` elementwise, so :math:`\partial h/\partial y = \partial h/\partial s`
for every state ``h``. Following ``y`` through a chain of such additions gives its *sum root*; two
outputs with the same sum root have the same :math:`\partial h/\partial y`, and an algorithm whose
traces are functions of :math:`\partial h/\partial y` alone (pp_prop's output-side traces) keeps one
trace for both.

The walk is conservative: it stops at a variable read more than once (counting each operand slot
and the step's outputs), at any equation other than ``add`` / ``add_any``, at an addition of a
variable to itself, and at an addition whose output differs from ``y`` in shape or dtype. Readers
inside nested jaxprs (``scan``, ``cond``, ``pjit``) count as readers of another kind.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable

from braintrace._compatible_imports import Literal

__all__ = ["ADDITIONS", "sum_roots"]

#: The primitives that add two operands of one shape.
ADDITIONS = frozenset({"add", "add_any"})


def sum_roots(jaxpr, variables: Iterable) -> Dict:
    """``{v: root}`` for each of ``variables`` (outputs of ``jaxpr``'s equations): the variable the
    chain of additions that alone reads ``v`` ends at (``v`` itself where nothing but an addition of
    its shape and dtype reads it).

    >>> import jax, jax.numpy as jnp
    >>> def cell(x, h, w_in, w_rec, w_gate):
    ...     gate = h @ w_gate  # read twice: by the sum and by the product
    ...     return jnp.tanh(x @ w_in + h @ w_rec + gate) * gate
    >>> w = jnp.ones((3, 3))
    >>> jaxpr = jax.make_jaxpr(cell)(w, w, w, w, w).jaxpr
    >>> [e.primitive.name for e in jaxpr.eqns]
    ['dot_general', 'dot_general', 'dot_general', 'add', 'add', 'tanh', 'mul']
    >>> gate, y_in, y_rec = (e.outvars[0] for e in jaxpr.eqns[:3])
    >>> roots = sum_roots(jaxpr, [gate, y_in, y_rec])
    >>> roots[y_in] is roots[y_rec] is jaxpr.eqns[4].outvars[0], roots[gate] is gate
    (True, True)
    """
    reads: Counter = Counter()
    reader = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, Literal):
                reads[v] += 1
                reader[v] = eqn
    for v in jaxpr.outvars:
        if not isinstance(v, Literal):
            reads[v] += 1
            reader.pop(v, None)  # an output of the step is not summed away
    roots = {}
    for v in variables:
        cur = v
        while reads[cur] == 1 and cur in reader:
            eqn = reader[cur]
            out = eqn.outvars[0]
            if (
                eqn.primitive.name not in ADDITIONS
                or len(eqn.invars) != 2
                or eqn.invars[0] is eqn.invars[1]
                or out.aval.shape != cur.aval.shape
                or out.aval.dtype != cur.aval.dtype
            ):
                break
            cur = out
        roots[v] = cur
    return roots
