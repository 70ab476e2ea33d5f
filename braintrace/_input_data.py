"""Markers for an algorithm's inputs: one time step, or a window of steps along a leading axis.

``alg(x)`` runs one step. ``alg(braintrace.MultiStepData(xs))`` runs ``K = xs.shape[0]`` steps,
feeding ``xs[k]`` at step ``k``; an argument that is a plain array or a :class:`SingleStepData`
is fed unchanged at every step of the window. The outputs of a window are stacked along a leading
axis of length ``K``.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import jax
import jax.numpy as jnp

__all__ = [
    "SingleStepData",
    "MultiStepData",
    "has_multistep_data",
    "get_single_step_data",
    "window_length",
    "split_window",
]


class _InputData:
    def __init__(self, data: Any) -> None:
        self.data = data

    def tree_flatten(self):
        return (self.data,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    def __repr__(self):
        shapes = jax.tree.map(lambda a: tuple(jnp.shape(a)), self.data)
        return f"{type(self).__name__}({shapes})"


@jax.tree_util.register_pytree_node_class
class SingleStepData(_InputData):
    """An input of one time step (used unchanged at every step of a window).

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> braintrace.SingleStepData(jnp.ones((2, 3))).data.shape
    (2, 3)
    """


@jax.tree_util.register_pytree_node_class
class MultiStepData(_InputData):
    """An input of ``K`` time steps: every leaf has a leading time axis of length ``K``.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> braintrace.MultiStepData(jnp.ones((5, 2, 3))).data.shape
    (5, 2, 3)
    """


def _is_marker(x) -> bool:
    return isinstance(x, _InputData)


def has_multistep_data(*args: Any) -> bool:
    """Whether any argument (at any depth of its pytree) is a :class:`MultiStepData`."""
    return any(isinstance(leaf, MultiStepData) for leaf in jax.tree.leaves(args, is_leaf=_is_marker))


def get_single_step_data(*args: Any) -> Tuple:
    """``args`` with every marker unwrapped and every :class:`MultiStepData` at its first step."""
    return tuple(
        jax.tree.map(
            lambda a: (
                jax.tree.map(lambda v: v[0], a.data)
                if isinstance(a, MultiStepData)
                else (a.data if isinstance(a, SingleStepData) else a)
            ),
            args,
            is_leaf=_is_marker,
        )
    )


def window_length(*args: Any) -> int:
    """The common leading length of every :class:`MultiStepData` leaf (``ValueError`` otherwise)."""
    lengths = set()
    for leaf in jax.tree.leaves(args, is_leaf=_is_marker):
        if isinstance(leaf, MultiStepData):
            for v in jax.tree.leaves(leaf.data):
                if not jnp.ndim(v):
                    raise ValueError("MultiStepData: every array needs a leading time axis; got a scalar.")
                lengths.add(int(jnp.shape(v)[0]))
    if not lengths:
        raise ValueError("MultiStepData: no array found in the window's inputs.")
    if len(lengths) != 1:
        raise ValueError(
            f"MultiStepData: every array must have the same number of steps, got {sorted(lengths)}."
        )
    (k,) = lengths
    if k < 1:
        raise ValueError("MultiStepData: a window needs at least one step.")
    return k


def split_window(*args: Any) -> Tuple[Any, List[bool]]:
    """``(leaves, stepped)``: the flat leaves of the unwrapped ``args`` (their tree is that of
    :func:`get_single_step_data`) and, per leaf, whether it has a leading time axis to step over."""
    leaves, stepped = [], []
    for a in jax.tree.leaves(args, is_leaf=_is_marker):
        if isinstance(a, MultiStepData):
            vs = jax.tree.leaves(a.data)
            leaves += vs
            stepped += [True] * len(vs)
        else:
            vs = jax.tree.leaves(a.data if isinstance(a, SingleStepData) else a)
            leaves += vs
            stepped += [False] * len(vs)
    return leaves, stepped
