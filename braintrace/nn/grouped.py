r"""Grouped (block-diagonal) linear map through :func:`braintrace.grouped_matmul`: :class:`GroupedLinear`."""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Union

import brainstate
import jax.numpy as jnp
import saiunit as u

from braintrace._etrace_op.grouped import grouped_matmul

from ._common import Size, init_weight, shape_of, to_size

__all__ = ["GroupedLinear"]

init = brainstate.nn.init


class GroupedLinear(brainstate.nn.Module):
    r"""``G`` independent linear maps on groups of features, :math:`y_{\dots g} = x_{\dots g} W_g + b_g`,
    through :func:`braintrace.grouped_matmul`.

    Input ``x``: ``(..., G, I)``; output ``(..., G, O)``; weight ``W`` ``(G, I, O)``, bias ``(G, O)``. It
    equals a :class:`~braintrace.nn.Linear` with the block-diagonal weight
    :math:`\mathrm{diag}(W_1, \dots, W_G)` on the flattened features, with ``G`` times fewer weights
    and a ``G`` times smaller ``D_RTRL`` trace ``(batch, G, I, O, n)``. Keep the hidden states it
    drives in the grouped shape ``(batch, G, O)``: flattening the output to ``(batch, G O)`` before
    it reaches a state leaves the weights with their within-step gradient only (the compiler then
    reports a shape mismatch).

    Two ways to give the sizes: the published ``GroupedLinear(num_groups, in_features, out_features)``
    (three ints, as braintrace 0.2) or ``GroupedLinear(in_size, out_size)`` with ``in_size = (..., G, I)``
    (a tuple as first argument, or the keywords ``in_size`` / ``out_size``).

    Parameters
    ----------
    num_groups, in_features, out_features : int
        ``G``, ``I`` and ``O``.
    w_init : initializer or array
        A callable is called once per group with the shape ``(I, O)`` (each block is initialised like
        a ``Linear(I, O)``); an array must have the shape ``(G, I, O)``. Default ``KaimingNormal()``.
    b_init : initializer, array of shape ``(G, O)``, or None
        Default ``ZeroInit()``; ``None`` for no bias.
    name : str, optional
    param_type : type
        The ``brainstate.ParamState`` subclass holding the weights; default ``ParamState``.
    in_size : tuple of int, optional
        ``(..., G, I)``: the number of groups and the features per group (last two entries), instead
        of ``num_groups`` and ``in_features``.
    out_size : int or tuple of int, optional
        ``O``, or ``(..., G, O)`` with the same ``G``; with ``in_size``.

    Attributes
    ----------
    weight : param_type
        ``{'weight': (G, I, O)[, 'bias': (G, O)]}``.
    groups, in_features, out_features : int
        ``G``, ``I``, ``O``.
    in_size, out_size : tuple of int
        ``(G, I)`` and ``(G, O)`` (with the leading entries of ``in_size``).

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> layer = braintrace.nn.GroupedLinear(4, 3, 5)
    >>> layer(jnp.ones((2, 4, 3))).shape
    (2, 4, 5)
    >>> layer.weight.value['weight'].shape
    (4, 3, 5)
    >>> braintrace.nn.GroupedLinear((4, 3), 5).out_size
    (4, 5)
    """

    def __init__(
        self,
        num_groups: Optional[Union[int, Size]] = None,
        in_features: Optional[Union[int, Size]] = None,
        out_features: Optional[int] = None,
        w_init: Union[Callable, jnp.ndarray] = init.KaimingNormal(),
        b_init: Optional[Union[Callable, jnp.ndarray]] = init.ZeroInit(),
        name: Optional[str] = None,
        param_type: type = brainstate.ParamState,
        *,
        in_size: Optional[Size] = None,
        out_size: Optional[Size] = None,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        in_size, out_size = _sizes(num_groups, in_features, out_features, in_size, out_size, owner)
        in_size = to_size(in_size, "in_size", owner)
        if len(in_size) < 2:
            raise ValueError(
                f"{owner}: `in_size` must end with (groups, in_features), e.g. (4, 3); got {in_size}."
            )
        out = to_size(out_size, "out_size", owner)
        G, I, O = in_size[-2], in_size[-1], out[-1]
        if len(out) > 1 and out[-2] != G:
            raise ValueError(
                f"{owner}: `out_size` {out} has {out[-2]} groups but `in_size` {in_size} has {G}; give "
                f"out_size as the features per group ({O}) or as (..., {G}, {O})."
            )
        self.groups, self.in_features, self.out_features = G, I, O
        self.in_size = in_size
        self.out_size = in_size[:-1] + (O,)
        if callable(w_init):
            weight = u.math.stack([init_weight(w_init, (I, O), owner, "w_init") for _ in range(G)])
        else:
            weight = init_weight(w_init, (G, I, O), owner, "w_init")
        params = {"weight": weight}
        if b_init is not None:
            params["bias"] = init_weight(b_init, (G, O), owner, "b_init")
        self.weight = param_type(params)

    @property
    def num_groups(self) -> int:
        """``G`` (the name of braintrace 0.2; the same as ``groups``)."""
        return self.groups

    def update(self, x):
        owner = type(self).__name__
        shape = shape_of(x)
        if len(shape) < 2 or shape[-2:] != (self.groups, self.in_features):
            raise ValueError(
                f"{owner}: expected an input of shape (..., {self.groups}, {self.in_features}) "
                f"(groups, features per group), but received x of shape {shape}."
            )
        params = self.weight.value
        return grouped_matmul(x, params["weight"], params.get("bias"))


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _sizes(num_groups, in_features, out_features, in_size, out_size, owner):
    """``(in_size, out_size)`` from either the published three ints or the ``in_size``/``out_size`` form."""
    if in_size is not None or out_size is not None:  # keywords in_size= / out_size=
        if num_groups is not None or in_features is not None or out_features is not None:
            raise TypeError(
                f"{owner}: give either num_groups, in_features, out_features or in_size, out_size, not both."
            )
        if in_size is None or out_size is None:
            raise TypeError(f"{owner}: `in_size` and `out_size` go together.")
        return in_size, out_size
    if num_groups is not None and not _is_int(num_groups):  # GroupedLinear((G, I), O)
        if out_features is not None:
            raise TypeError(
                f"{owner}: with in_size={num_groups!r} as first argument the second is out_size; the "
                f"third ({out_features!r}) must be left out (give w_init by keyword)."
            )
        if in_features is None:
            raise TypeError(f"{owner}: missing out_size (the features per group).")
        return num_groups, in_features
    given = {"num_groups": num_groups, "in_features": in_features, "out_features": out_features}
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise TypeError(f"{owner}: missing {', '.join(f'`{k}`' for k in missing)}.")
    for k, v in given.items():
        if not _is_int(v):
            raise TypeError(f"{owner}: `{k}` must be an int, got {v!r}.")
    return (num_groups, in_features), out_features
