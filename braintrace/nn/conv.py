r"""Convolutions through :func:`braintrace.conv`: ``Conv1d``, ``Conv2d``, ``Conv3d``.

:math:`y = \mathrm{conv}(x, K) + b` with ``x`` of shape ``(B, *spatial, C_in)`` (or unbatched
``(*spatial, C_in)``), kernel ``K`` of shape ``(*kernel_size, C_in / groups, C_out)`` and bias
``(C_out,)``, like ``brainstate.nn.Conv2d`` (its bias has shape ``(1, ..., 1, C_out)``; ours is the
flat ``(C_out,)``). With ``channel_first=True`` the channel axis comes before the spatial axes in
the input, ``in_size`` and the output (``(B, C_in, *spatial)`` -> ``(B, C_out, *spatial_out)``, as
PyTorch); the kernel keeps its layout. The result equals the channels-last layer on the transposed
input, transposed back; the layout is handed to the ETP op itself (``NCHW`` dimension numbers), so
the output feeds a channel-first hidden state directly and the kernel stays a relation (a transpose
between the op and the state would leave it with its within-step gradient only).

Online learning: the ETP conv primitive always carries a batch axis. A batched input gives a
relation whose trace is kept per output position (exact under ``D_RTRL`` when ``D`` varies over
positions). An unbatched input is run as a batch of one and squeezed, so its output no longer has
the shape of an unbatched hidden state; the compiler then reports a shape mismatch and the kernel
is learned with its within-step gradient. Initialise models with a batch size to train convolutions
online.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence, Tuple, Union

import brainstate
import jax
import jax.numpy as jnp
import saiunit as u

from braintrace._etrace_op import conv

from ._common import init_weight, shape_of

__all__ = ["Conv1d", "Conv2d", "Conv3d"]

init = brainstate.nn.init

_LAYOUTS = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}
_LAYOUTS_CHANNEL_FIRST = {
    1: ("NCW", "WIO", "NCW"),
    2: ("NCHW", "HWIO", "NCHW"),
    3: ("NCDHW", "DHWIO", "NCDHW"),
}


def _replicate(value, n, name, owner) -> Tuple[int, ...]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        out = (int(value),) * n
    else:
        try:
            out = tuple(int(v) for v in value)
        except TypeError:
            raise TypeError(
                f"{owner}: `{name}` must be an int or a sequence of {n} ints, got {value!r}."
            ) from None
        if len(out) == 1:
            out = out * n
    if len(out) != n or min(out) < 1:
        raise ValueError(f"{owner}: `{name}` must be a positive int or {n} positive ints, got {value!r}.")
    return out


def _padding(padding, n, owner):
    """``'SAME'``/``'VALID'`` or ``n`` ``(low, high)`` pairs, from an int, pairs, or per-dim ints."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(
                f"{owner}: string `padding` must be 'SAME', 'VALID' or 'SAME_LOWER', got {padding!r}."
            )
        return padding.upper()
    if isinstance(padding, numbers.Integral):
        return ((int(padding), int(padding)),) * n
    try:
        items = list(padding)
    except TypeError:
        raise TypeError(f"{owner}: invalid `padding` {padding!r}.") from None
    if items and all(isinstance(p, numbers.Integral) for p in items):
        if n == 1 and len(items) == 2:
            return ((int(items[0]), int(items[1])),)
        if len(items) == n:
            return tuple((int(p), int(p)) for p in items)
    elif items and all(isinstance(p, Sequence) and len(p) == 2 for p in items):
        pairs = tuple((int(lo), int(hi)) for lo, hi in items)
        if len(pairs) == 1:
            return pairs * n
        if len(pairs) == n:
            return pairs
    raise ValueError(
        f"{owner}: `padding` must be 'SAME', 'VALID', an int, {n} ints, or {n} (low, high) pairs; "
        f"got {padding!r}."
    )


class _Conv(brainstate.nn.Module):
    num_spatial_dims: int = 0

    def __init__(
        self,
        in_size: Sequence[int],
        out_channels: int,
        kernel_size: Union[int, Sequence[int]],
        stride: Union[int, Sequence[int]] = 1,
        padding: Union[str, int, Sequence] = "SAME",
        lhs_dilation: Union[int, Sequence[int]] = 1,
        rhs_dilation: Union[int, Sequence[int]] = 1,
        groups: int = 1,
        w_init: Union[Callable, jnp.ndarray] = init.XavierNormal(),
        b_init: Optional[Union[Callable, jnp.ndarray]] = init.ZeroInit(),
        w_mask=None,
        channel_first: bool = False,
        name: Optional[str] = None,
        param_type: type = brainstate.ParamState,
    ):
        super().__init__(name=name)
        owner = type(self).__name__
        n = self.num_spatial_dims
        self.channel_first = bool(channel_first)
        self.channels_last = not self.channel_first
        layout = "(channels, *spatial)" if self.channel_first else "(*spatial, channels)"
        order = "channels first" if self.channel_first else "channels last"
        try:
            in_size = tuple(int(s) for s in in_size)
        except TypeError:
            raise TypeError(f"{owner}: `in_size` must be {layout}, got {in_size!r}.") from None
        if len(in_size) != n + 1 or min(in_size) < 1:
            raise ValueError(
                f"{owner}: `in_size` must have {n + 1} positive entries ({n} spatial + channels, "
                f"{order}, no batch axis), got {in_size}."
            )
        for name_, v in (("out_channels", out_channels), ("groups", groups)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{owner}: `{name_}` must be a positive int, got {v!r}.")
        self.in_size = in_size
        self.in_channels = in_size[0] if self.channel_first else in_size[-1]
        self.out_channels = int(out_channels)
        self.groups = int(groups)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"{owner}: in_channels ({self.in_channels}) and out_channels ({self.out_channels}) must be "
                f"divisible by groups ({self.groups})."
            )
        self.kernel_size = _replicate(kernel_size, n, "kernel_size", owner)
        self.stride = _replicate(stride, n, "stride", owner)
        self.lhs_dilation = _replicate(lhs_dilation, n, "lhs_dilation", owner)
        self.rhs_dilation = _replicate(rhs_dilation, n, "rhs_dilation", owner)
        self.padding = _padding(padding, n, owner)
        self.dimension_numbers = (_LAYOUTS_CHANNEL_FIRST if self.channel_first else _LAYOUTS)[n]
        self.kernel_shape = self.kernel_size + (self.in_channels // self.groups, self.out_channels)
        params = {"weight": init_weight(w_init, self.kernel_shape, owner, "w_init")}
        if b_init is not None:
            params["bias"] = init_weight(b_init, (self.out_channels,), owner, "b_init")
        self.weight = param_type(params)
        self.w_mask = None if w_mask is None else init_weight(w_mask, self.kernel_shape, owner, "w_mask")
        dtype = u.math.get_dtype(params["weight"])
        out = jax.eval_shape(self._conv, jax.ShapeDtypeStruct((1,) + in_size, dtype), params)
        self.out_size = tuple(out.shape[1:])

    def _conv(self, x, params):
        w = params["weight"]
        if self.w_mask is not None:
            w = w * self.w_mask
        dtype = jnp.result_type(u.math.get_dtype(x), u.math.get_dtype(w))
        x = x if u.math.get_dtype(x) == dtype else x.astype(dtype)  # lax.conv needs equal dtypes
        w = w if u.math.get_dtype(w) == dtype else w.astype(dtype)
        return conv(
            x,
            w,
            params.get("bias"),
            strides=self.stride,
            padding=self.padding,
            lhs_dilation=self.lhs_dilation,
            rhs_dilation=self.rhs_dilation,
            feature_group_count=self.groups,
            dimension_numbers=self.dimension_numbers,
        )

    def update(self, x):
        owner = type(self).__name__
        shape = shape_of(x)
        n = self.num_spatial_dims
        spatial = ", ".join(["..."] * n)
        if len(shape) not in (n + 1, n + 2):
            expected = (
                f"(batch, {self.in_channels}, {spatial})"
                if self.channel_first
                else f"(batch, {spatial}, {self.in_channels})"
            )
            raise ValueError(
                f"{owner}: expected an input of shape {expected} or without the batch axis, i.e. {n + 2} "
                f"or {n + 1} axes; received shape {shape}."
            )
        axis = -(n + 1) if self.channel_first else -1
        if shape[axis] != self.in_channels:
            where = f"x.shape[{axis}]" + (", channels first" if self.channel_first else ", channels last")
            raise ValueError(
                f"{owner}: expected {self.in_channels} input channels ({where}), but received x of shape "
                f"{shape} with {shape[axis]}."
            )
        if tuple(shape[-(n + 1) :]) != self.in_size:
            raise ValueError(
                f"{owner}: expected input size {self.in_size} (without batch), received {shape}."
            )
        if len(shape) == n + 1:
            return u.math.squeeze(self._conv(u.math.expand_dims(x, 0), self.weight.value), axis=0)
        return self._conv(x, self.weight.value)


_DOC = r"""{n}-D convolution through :func:`braintrace.conv` (channels last by default).

    Parameters
    ----------
    in_size : tuple of int
        ``({spatial}, C_in)`` without the batch axis (``(C_in, {spatial})`` when ``channel_first``).
    out_channels : int
    kernel_size, stride, lhs_dilation, rhs_dilation : int or {n} ints
    padding : 'SAME', 'VALID', int, {n} ints, or {n} (low, high) pairs
        Default ``'SAME'``.
    groups : int
        Feature groups; ``C_in`` and ``C_out`` must be divisible by it.
    w_init : initializer or array, shape ``(*kernel_size, C_in / groups, C_out)``
        Default ``XavierNormal()``.
    b_init : initializer, array of shape ``(C_out,)``, or None
        Default ``ZeroInit()``; ``None`` for no bias.
    w_mask : array of the kernel's shape or an initializer called with it, optional
    channel_first : bool
        Channels before the spatial axes in the input, ``in_size`` and the output (default False:
        channels last). The kernel layout does not change.
    name : str, optional
    param_type : type
        The ``brainstate.ParamState`` subclass holding the weights; default ``ParamState``.

    Attributes
    ----------
    weight : param_type
        ``{{'weight': kernel[, 'bias': (C_out,)]}}``.
    out_size : tuple of int
        The output size without the batch axis.

    Input ``(B, {spatial}, C_in)`` or ``({spatial}, C_in)`` (``(B, C_in, {spatial})`` or
    ``(C_in, {spatial})`` when ``channel_first``); a wrong channel count or size raises
    ``ValueError``. See the module docstring for online learning of unbatched inputs.

    Unlike ``brainstate.nn`` / braintrace 0.2 (``b_init=None``), the bias is on by default.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> layer = braintrace.nn.{cls}({example_in}, out_channels=4, kernel_size=3)
    >>> layer(jnp.ones((2,) + {example_in})).shape
    {example_out}
    """


class Conv1d(_Conv):
    __doc__ = _DOC.format(n=1, spatial="W", cls="Conv1d", example_in="(16, 3)", example_out="(2, 16, 4)")
    num_spatial_dims = 1


class Conv2d(_Conv):
    __doc__ = _DOC.format(
        n=2, spatial="H, W", cls="Conv2d", example_in="(8, 8, 3)", example_out="(2, 8, 8, 4)"
    )
    num_spatial_dims = 2


class Conv3d(_Conv):
    __doc__ = _DOC.format(
        n=3, spatial="D, H, W", cls="Conv3d", example_in="(4, 4, 4, 2)", example_out="(2, 4, 4, 4, 4)"
    )
    num_spatial_dims = 3
