"""The backend switch: which implementation an ETP primitive lowers to.

``'xla'`` lowers every primitive to its reference implementation (ordinary JAX ops).
``'pallas'`` lowers primitives that have a kernel (``kernel_fn``) to Pallas kernels on CUDA GPUs;
with ``interpret=True`` the same kernels run in Pallas interpret mode on any platform (that is how
CPU tests exercise them). On a machine without a GPU, ``'pallas'`` without ``interpret`` falls back
to the reference with one warning.

The choice is read when a function is *lowered*. JAX caches compiled functions, so every switch
clears JAX's caches (``jax.clear_caches()``): nothing compiled under one backend is reused under
the other.

A kernel installed with a :class:`~braintrace._batch_sharding.BatchLayout` runs once per batch shard
when the program spans several devices (``braintrace/_batch_sharding.py``); on one device its call
is the same as without a layout.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Iterator, Optional

import jax

from braintrace._batch_sharding import (
    BatchLayout,
    batch_partitioned,
    devices_needed_when_lowering,
    frameless,
    partitions_over_devices,
)
from braintrace._compatible_imports import mlir

__all__ = [
    "set_backend",
    "get_backend",
    "backend",
    "kernel_mode",
    "install_kernel_lowerings",
    "declare_batch_layout",
    "BACKENDS",
]

BACKENDS = ("xla", "pallas")

_state = {"name": "xla", "interpret": False, "warned": False}

#: Primitives with a kernel that declared where it keeps the batch axis.
_BATCH_LAYOUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:  # pragma: no cover - no backend initialised
        return False


def _in_trace() -> bool:
    try:
        from jax._src import core as _core

        return not isinstance(_core.trace_ctx.trace, _core.EvalTrace)
    except Exception:  # pragma: no cover - internal layout changed
        return False


def set_backend(name: str, *, interpret: bool = False) -> None:
    """Select the lowering backend of the ETP primitives and the fused trace updates.

    Parameters
    ----------
    name : {'xla', 'pallas'}
        ``'xla'``: reference implementations. ``'pallas'``: Pallas kernels on GPU.
    interpret : bool
        With ``'pallas'``, run the kernels in Pallas interpret mode on any platform.

    Examples
    --------
    >>> import braintrace
    >>> braintrace.set_backend('pallas', interpret=True)
    >>> braintrace.get_backend()
    'pallas'
    >>> braintrace.set_backend('xla')
    """
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}; valid backends are {', '.join(map(repr, BACKENDS))}.")
    if _in_trace():
        raise RuntimeError(
            "braintrace.set_backend / braintrace.backend cannot be called inside a traced function "
            "(jit, grad, vmap, scan); switch the backend before tracing."
        )
    interpret = bool(interpret)
    changed = (name, interpret) != (_state["name"], _state["interpret"])
    _state["name"], _state["interpret"] = name, interpret
    if name == "pallas" and not interpret and not _has_gpu() and not _state["warned"]:
        _state["warned"] = True
        warnings.warn(
            "braintrace backend 'pallas' needs a CUDA GPU; none is present, so the reference (XLA) "
            "implementations are used. Pass interpret=True to run the kernels in interpret mode.",
            RuntimeWarning,
            stacklevel=2,
        )
    if changed:
        for primitive in list(_BATCH_LAYOUTS):
            devices_needed_when_lowering(primitive, name == "pallas")
        jax.clear_caches()


def get_backend() -> str:
    """The selected backend name, ``'xla'`` or ``'pallas'``."""
    return _state["name"]


def kernel_mode(platform: str) -> str | None:
    """How a kernel should run when lowering for ``platform`` right now.

    Returns ``'interpret'``, ``'compiled'`` or ``None`` (use the reference implementation).
    """
    if _state["name"] != "pallas":
        return None
    if _state["interpret"]:
        return "interpret"
    return "compiled" if platform == "cuda" else None


@contextlib.contextmanager
def backend(name: str, *, interpret: bool = False) -> Iterator[None]:
    """Context manager that selects a backend and restores the previous one on exit.

    >>> import braintrace
    >>> with braintrace.backend('pallas', interpret=True):
    ...     braintrace.get_backend()
    'pallas'
    >>> braintrace.get_backend()
    'xla'
    """
    previous = (_state["name"], _state["interpret"])
    set_backend(name, interpret=interpret)
    try:
        yield
    finally:
        set_backend(previous[0], interpret=previous[1])


def _dispatching_lowering(primitive, platform: str):
    multiple = primitive.multiple_results

    def rule(ctx, *args, **params):
        # Read the implementations when lowering, so a kernel swapped in later is used.
        mode = kernel_mode(platform)
        declines = getattr(primitive, "kernel_declines", None)  # params -> True: use the reference
        if mode is None or (declines is not None and declines(params)):
            fn = primitive.impl_fn
        else:
            kernel_fn = primitive.kernel_fn

            def fn(*a, **p):
                return kernel_fn(*a, interpret=(mode == "interpret"), **p)

            layout = _BATCH_LAYOUTS.get(primitive)
            if layout is not None and partitions_over_devices(ctx):
                return _lower_per_batch_shard(ctx, fn, layout, multiple, args, params)

        return mlir.lower_fun(fn, multiple_results=multiple)(ctx, *args, **params)

    return rule


def _lower_per_batch_shard(ctx, fn, layout, multiple, args, params):
    """Lower ``fn`` as a call that XLA's partitioner runs once per batch shard."""

    def whole(*a):
        out = fn(*a, **params)
        return tuple(out) if multiple else (out,)

    call = batch_partitioned(whole, layout, ctx.avals_in, ctx.avals_out)

    def lowered(*a):
        out = call(*a)
        return list(out) if multiple else out[0]

    with frameless():
        return mlir.lower_fun(lowered, multiple_results=multiple)(ctx, *args)


def install_kernel_lowerings(primitive, batch_layout: Optional[BatchLayout] = None) -> None:
    """Give ``primitive`` lowerings that pick ``kernel_fn`` or ``impl_fn`` from the backend.

    With ``batch_layout``, the kernel runs once per batch shard on a program that spans several
    devices (see :class:`~braintrace._batch_sharding.BatchLayout`); without one, XLA gathers its
    operands to every device and runs it whole.
    """
    for platform in ("cuda", "cpu"):
        mlir.register_lowering(primitive, _dispatching_lowering(primitive, platform), platform=platform)
    if batch_layout is not None:
        declare_batch_layout(primitive, batch_layout)


def declare_batch_layout(primitive, layout: BatchLayout) -> None:
    """Record where ``primitive``'s kernel keeps the batch axis (read when it is lowered)."""
    if not isinstance(layout, BatchLayout):
        raise TypeError(f"layout must be a BatchLayout, got {type(layout).__name__}.")
    _BATCH_LAYOUTS[primitive] = layout
    devices_needed_when_lowering(primitive, _state["name"] == "pallas")
