"""Kernel calls that run once per batch shard when the batch is spread over several devices.

A Pallas kernel lowers to a custom call that XLA's SPMD partitioner cannot look into: left alone, the
partitioner gathers every operand to each device and runs the whole kernel there (the traces end up
replicated and every step all-gathers them). A kernel whose operands and results keep a batch axis
declares where it is (:class:`BatchLayout`); when a program spans several devices, its call is wrapped
in ``jax.experimental.custom_partitioning`` so that each device runs the kernel on its own batch rows:

- operands and results with a batch axis keep the batch sharding of the operands (the mesh axes that
  shard the first batch operand that is sharded along its batch axis);
- operands without one (weights, index arrays) are replicated;
- a result that sums over the batch rows (``BATCH_SUM``, a weight gradient) is summed per device
  over its rows and then added over the devices with one ``psum`` (an all-reduce of the gradient).

Under Shardy the sharding rule says the same: the batch axes share one factor, every other dimension
is a factor that must stay replicated. With one device nothing is wrapped.

This module imports nothing from ``braintrace``: the primitive layer names its kernels' layouts with
:class:`BatchLayout`, the backend (``braintrace/_backend.py``) lowers with the rest. The JAX internals
it reaches (the set of primitives whose lowering sees the devices, the source-info context) are
looked up when used, and their absence leaves the kernels unpartitioned.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import math
from typing import Callable, Mapping, Sequence, Union

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "BATCH_SUM",
    "BatchLayout",
    "batch_partitioned",
    "partitions_over_devices",
    "devices_needed_when_lowering",
    "frameless",
]

#: A result that is a sum over the batch rows: each device sums its rows, then one ``psum``.
BATCH_SUM = "sum"


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Where a kernel keeps the batch axis.

    Attributes:
      operands: ``{operand index: batch axis}`` (negative axes count from the end). Operands not
        listed are shared by every batch row and are replicated on every device.
      results: per result, its batch axis, or :data:`BATCH_SUM` for a result that sums over the
        batch rows.

    Example: the dense trace update ``new = D eps + x (x) df`` with ``eps (B, I, O, n)``,
    ``D (B, O, n, n)``, ``x (B, I)``, ``df (B, O, n)`` is ``BatchLayout({0: 0, 1: 0, 2: 0, 3: 0}, (0,))``;
    its solve ``dW = sum_b sum_s eps ct`` is ``BatchLayout({0: 0, 1: 0}, (BATCH_SUM,))``.
    """

    operands: Mapping[int, int]
    results: tuple[Union[int, str], ...]

    def __post_init__(self):
        operands = dict(self.operands)
        if not operands or not all(
            isinstance(i, int) and i >= 0 and isinstance(a, int) for i, a in operands.items()
        ):
            raise ValueError(
                f"BatchLayout.operands must map operand indices (int >= 0) to batch axes (int), with at "
                f"least one entry; got {self.operands!r}."
            )
        results = tuple(self.results)
        if not results or not all(r == BATCH_SUM or isinstance(r, int) for r in results):
            raise ValueError(
                f"BatchLayout.results must hold one batch axis (int) or {BATCH_SUM!r} per result; got "
                f"{self.results!r}."
            )
        object.__setattr__(self, "operands", tuple(sorted(operands.items())))
        object.__setattr__(self, "results", results)

    def operand_axes(self, avals: Sequence) -> list:
        """The batch axis of each operand (``None`` for a shared operand), as a non-negative int."""
        axes = dict(self.operands)
        return [_axis(axes.get(i), a.ndim, f"operand {i}") for i, a in enumerate(avals)]

    def result_axes(self, avals: Sequence) -> list:
        """The batch axis of each result, ``None`` for a batch sum."""
        if len(avals) != len(self.results):
            raise ValueError(f"BatchLayout has {len(self.results)} results, the kernel returns {len(avals)}.")
        return [
            None if r == BATCH_SUM else _axis(r, a.ndim, f"result {j}")
            for j, (r, a) in enumerate(zip(self.results, avals))
        ]


def _axis(axis, ndim, what):
    if axis is None:
        return None
    if not -ndim <= axis < ndim:
        raise ValueError(f"BatchLayout: batch axis {axis} of {what} is out of range for {ndim} dimensions.")
    return axis % ndim


# --------------------------------------------------------------------------------------------------
# When to partition
# --------------------------------------------------------------------------------------------------


def _device_registry():
    """JAX's set of primitives whose lowering sees the devices (``None`` if this jax has none)."""
    try:
        from jax._src import dispatch
    except ImportError:  # pragma: no cover - internal layout changed
        return None
    return getattr(dispatch, "prim_requires_devices_during_lowering", None)


def devices_needed_when_lowering(primitive, needed: bool) -> None:
    """Mark ``primitive`` as one whose lowering must see the device assignment (or unmark it).

    ``custom_partitioning`` needs the devices of the program to build its mesh; JAX passes them to
    the lowering only when the jaxpr holds a primitive of this set. Our primitives bind
    ``custom_partitioning`` inside their own lowering, so they must be in the set themselves.
    """
    registry = _device_registry()
    if registry is None:  # pragma: no cover - internal layout changed: kernels stay unpartitioned
        return
    if needed:
        registry.add(primitive)
    else:
        registry.discard(primitive)


def partitions_over_devices(ctx) -> bool:
    """Whether the program being lowered spans several devices whose mesh is known.

    ``False`` on one device, inside ``shard_map`` (already per shard) and under ``pmap``, and when
    the device assignment or the mesh is not visible to the lowering (no ``NamedSharding`` in the
    program): the kernel then runs as one call on whole arrays, as on one device.
    """
    context = ctx.module_context.axis_context
    num_devices = getattr(context, "num_devices", None)
    if num_devices is None or num_devices <= 1:
        return False
    return (
        getattr(context, "device_assignment", None) is not None
        and getattr(context, "abstract_mesh", None) is not None
    )


@functools.lru_cache(maxsize=None)
def _traceback_without_user_frames():
    """A traceback of a fresh thread: only standard-library and JAX frames, none of the caller's."""
    from jax._src import source_info_util

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(source_info_util.current).result().traceback


def frameless():
    """A context in which the operations JAX traces carry no source location.

    XLA's partitioner replaces the ``custom_partitioning`` call by the per-shard program, and its
    while-loop simplifier then inlines that program's short loops (a kernel's loops run once when a
    shard holds one batch row), merging the call's stack frames into every inlined instruction. With
    Python stacks in the locations (JAX's default) of the call or of the per-shard program, the CPU
    compile of a scanned step of the dense benchmark RNN did not finish in 10 minutes (jax 0.10.2,
    Shardy); without them it takes about a second. The call and the per-shard program are traced in
    this context: their operations point at no Python line.
    """
    try:
        from jax._src import source_info_util

        return source_info_util.user_context(_traceback_without_user_frames())
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - internal layout changed
        return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# The partitioned call
# --------------------------------------------------------------------------------------------------


def _named(mesh, ndim: int, axis, batch):
    spec = [None] * ndim
    if axis is not None and batch is not None:
        spec[axis] = batch
    return NamedSharding(mesh, P(*spec))


def _batch_mesh_axes(mesh, arg_shapes, in_axes):
    """The mesh axes sharding the batch: those of the first operand sharded along its batch axis.

    ``None`` (run on whole arrays) when no operand is, or when they do not divide the batch evenly.
    """
    for shape, axis in zip(arg_shapes, in_axes):
        if axis is None:
            continue
        spec = getattr(shape.sharding, "spec", None)
        entry = spec[axis] if spec is not None and axis < len(spec) else None
        if entry is None:
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        shards = math.prod(mesh.shape[name] for name in names)
        return entry if shape.shape[axis] % shards == 0 else None
    return None


def _sharding_rule(avals_in, avals_out, in_axes, out_axes):
    """Shardy's rule: the batch axes are one factor ``b``; every other dimension must be replicated."""
    from jax.experimental.custom_partitioning import ArrayMapping, SdyShardingRule

    replicated = []

    def mapping(tag, aval, axis):
        factors = []
        for d in range(aval.ndim):
            if d == axis:
                factors.append("b")
            else:
                factors.append(f"{tag}_{d}")
                replicated.append(factors[-1])
        return ArrayMapping(*factors)

    operands = tuple(mapping(f"in{i}", a, ax) for i, (a, ax) in enumerate(zip(avals_in, in_axes)))
    results = tuple(mapping(f"out{j}", a, ax) for j, (a, ax) in enumerate(zip(avals_out, out_axes)))
    return SdyShardingRule(operands, results, need_replication_factors=tuple(replicated))


def batch_partitioned(fn: Callable, layout: BatchLayout, avals_in, avals_out) -> Callable:
    """``fn(*arrays) -> tuple of results`` as a call that XLA runs once per batch shard.

    ``avals_in`` / ``avals_out`` are the global shapes of the operands and results.
    """
    from jax.experimental.custom_partitioning import custom_partitioning

    in_axes = layout.operand_axes(avals_in)
    out_axes = layout.result_axes(avals_out)
    summed = [r == BATCH_SUM for r in layout.results]

    def shardings(mesh, batch):
        operands = tuple(_named(mesh, a.ndim, ax, batch) for a, ax in zip(avals_in, in_axes))
        results = tuple(_named(mesh, a.ndim, ax, batch) for a, ax in zip(avals_out, out_axes))
        return operands, results

    def partition(mesh, arg_shapes, result_shape):
        batch = _batch_mesh_axes(mesh, arg_shapes, in_axes)
        operands, results = shardings(mesh, batch)

        def per_shard(*args):
            with frameless():
                outs = tuple(fn(*args))
                if batch is None:
                    return outs
                return tuple(jax.lax.psum(o, batch) if s else o for o, s in zip(outs, summed))

        return mesh, per_shard, results, operands

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
        return shardings(mesh, _batch_mesh_axes(mesh, arg_shapes, in_axes))[1]

    call = custom_partitioning(lambda *args: tuple(fn(*args)))
    call.def_partition(
        partition,
        infer_sharding_from_operands=infer_sharding_from_operands,
        sharding_rule=_sharding_rule(avals_in, avals_out, in_axes, out_axes),
    )
    return call
