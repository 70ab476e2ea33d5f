"""Timing and bandwidth helpers shared by the benchmarks and ``ci/gpu_kernel_smoke.py``.

The rule: time many calls inside one jitted ``lax.fori_loop`` and block on the result, never a
single Python-dispatched call, whose dispatch overhead (tens of microseconds) is larger than many
kernels. Achieved bandwidth is the bytes that must move (the trace read and written once, each index
array and each per-unit vector read once) divided by the time per call, and it is compared with a
roofline measured in the same run: a large float32 elementwise op, bytes read + written.

Only jax, numpy and the standard library are imported here, so the GPU smoke script can use this
module on a host where braintrace's own dependencies are missing.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "ROOFLINE_BYTES_GPU",
    "ROOFLINE_BYTES_CPU",
    "make_loop",
    "time_per_call",
    "roofline_bytes_per_s",
    "nbytes",
    "normal",
    "rel_err",
    "has_gpu",
    "device_kind",
    "BackendPairs",
]

#: Size of the roofline array: 1 GiB float32 on a GPU.
ROOFLINE_BYTES_GPU = 1 << 30
#: A CPU smoke run only needs the number to exist: 16 MiB.
ROOFLINE_BYTES_CPU = 1 << 24


def has_gpu() -> bool:
    """Whether JAX sees a GPU."""
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:  # no backend could be initialised
        return False


def device_kind() -> str:
    """The first device's kind, e.g. ``'NVIDIA H100 80GB HBM3'`` or ``'cpu'``."""
    return jax.devices()[0].device_kind


def make_loop(
    fn: Callable,
    args: Sequence,
    *,
    carry: Mapping[int, int] | None = None,
    vary: Sequence[int] = (),
    iters: int = 100,
) -> Callable[[], object]:
    """A zero-argument callable that runs ``iters`` calls of ``fn(*args)`` in one jitted loop and blocks.

    ``carry`` maps an output index to the argument it replaces in the next call (the trace);
    arguments listed in ``vary`` are rescaled every call (small arrays, so a function that does not
    carry its big operand is not loop-invariant); every other output is summed into an accumulator,
    so nothing is dead code. The loop is compiled and run once before it is returned.
    """
    carry = dict(carry or {})
    outs = jax.eval_shape(fn, *args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    accumulated = [k for k in range(len(outs)) if k not in carry]

    def body(_, state):
        args, accs = state
        out = fn(*args)
        out = out if isinstance(out, tuple) else (out,)
        args = list(args)
        for k, a in carry.items():
            args[a] = out[k]
        for a in vary:
            args[a] = args[a] * jnp.asarray(1.0 + 1e-7, args[a].dtype)
        return tuple(args), tuple(acc + out[k] for acc, k in zip(accs, accumulated))

    loop = jax.jit(lambda args, accs: lax.fori_loop(0, iters, body, (args, accs)))
    state = (tuple(args), tuple(jnp.zeros(outs[k].shape, outs[k].dtype) for k in accumulated))

    def run():
        return jax.block_until_ready(loop(*state))

    run()  # compile and warm up
    return run


def time_per_call(fn, args, *, carry=None, vary=(), iters=100, repeats=5) -> float:
    """Median seconds per ``fn(*args)`` over ``repeats`` jitted loops of ``iters`` calls.

    See :func:`make_loop` for ``carry`` and ``vary``.
    """
    run = make_loop(fn, args, carry=carry, vary=vary, iters=iters)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def roofline_bytes_per_s(iters: int = 10, repeats: int = 5, size_bytes: int | None = None) -> float:
    """Bandwidth (bytes read + written per second) of a float32 elementwise op on ``size_bytes``.

    Default size: 1 GiB on a GPU, 16 MiB elsewhere. Same loop style as every other measurement.
    """
    if size_bytes is None:
        size_bytes = ROOFLINE_BYTES_GPU if has_gpu() else ROOFLINE_BYTES_CPU
    x = jnp.ones((size_bytes // 4,), jnp.float32)
    seconds = time_per_call(
        lambda a: a * jnp.float32(1.0000001), (x,), carry={0: 0}, iters=iters, repeats=repeats
    )
    del x
    return 2 * size_bytes / seconds


def nbytes(*arrays) -> int:
    """Total bytes of arrays or ``ShapeDtypeStruct`` s."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


def normal(key, shape, scale: float = 1.0, dtype=jnp.float32):
    return scale * jax.random.normal(key, shape, dtype)


def rel_err(got, want) -> float:
    """Normwise relative error ``max over outputs ||a - b|| / ||b||``."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    errs = []
    for a, b in zip(got, want):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape or not np.all(np.isfinite(a)):
            return float("inf")
        errs.append(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)))
    return max(errs)


def _rel_diff_on_device(a, b) -> float:
    """Normwise relative difference of two pytrees of arrays, computed on the device."""
    num = den = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
        num += float(jnp.sum((x - y) ** 2))
        den += float(jnp.sum(y**2))
    return (num / den) ** 0.5 if den > 0 else float(num > 0)


class BackendPairs:
    """Pairs the ``'xla'`` and ``'pallas'`` measurements of one case, in whichever order they come.

    :meth:`record` keeps the first of a pair (its time and its output) and, given the second,
    returns ``{'pallas_xla_ratio': t_pallas / t_xla, 'rel_diff_vs_other_backend': ...}`` and forgets
    both; until then it returns ``{}``. Only incomplete pairs are held (device memory).
    """

    def __init__(self):
        self._first = {}

    def record(self, key, backend: str, seconds: float, out) -> dict:
        other = self._first.pop(key, None)
        if other is None or other[0] == backend:
            self._first[key] = (backend, seconds, out)
            return {}
        times = {backend: seconds, other[0]: other[1]}
        return {
            "pallas_xla_ratio": times["pallas"] / times["xla"],
            "rel_diff_vs_other_backend": _rel_diff_on_device(out, other[2]),
        }
