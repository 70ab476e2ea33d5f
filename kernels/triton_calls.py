"""Which Triton kernels a jitted function launches on a CUDA GPU, found without a GPU.

Lowering for another platform needs no device: ``jax.jit(fn).trace(*args).lower(
lowering_platforms=("cuda",))`` runs the Pallas-to-Triton lowering on any machine. jax 0.11 also asks
which GPU it lowers for (the Triton compute capability), and reads it from the context each equation
was traced in: build, trace and lower inside :func:`cuda_target`, which names the GPU host's
(:data:`ABSTRACT_GPU`) when the machine has none. Each Pallas-Triton
kernel then appears in the lowered module as one ``stablehlo.custom_call`` whose target contains
``xla.gpu.triton``, carrying the kernel's name, its ``num_warps`` and ``num_stages`` and its Triton IR
(an MLIR string attribute). :func:`triton_calls` reads them back in program order.

This is how the tests check that a model step under the ``'pallas'`` backend dispatches to the fused
kernels, and how ``ci/inspect_kernels.py`` obtains the Triton IR it compiles for ``sm_90``::

    >>> import jax, jax.numpy as jnp
    >>> import braintrace_kernels as bk
    >>> from braintrace_kernels.triton_calls import lowered_for_cuda, triton_calls
    >>> S = jax.ShapeDtypeStruct
    >>> args = (S((8, 16, 32, 1), jnp.float32), S((8, 32, 1, 1), jnp.float32),
    ...         S((8, 16), jnp.float32), S((8, 32, 1), jnp.float32))
    >>> [c.name for c in triton_calls(lowered_for_cuda(bk.dense_trace_update, *args))]
    ['dense_trace_update']

The format read here is the lowered module's text, which jax does not promise to keep; a change
shows up as :class:`ValueError` from :func:`triton_calls` in the CPU test suite first.
"""

from __future__ import annotations

import contextlib
import re
from typing import NamedTuple

import jax

__all__ = ["ABSTRACT_GPU", "TritonCall", "cuda_target", "lowered_for_cuda", "triton_calls"]

#: The GPU a lowering for CUDA targets on a machine without one: the GPU host's H200 (compute
#: capability 9.0, the ``sm_90`` that ``ci/inspect_kernels.py`` compiles for).
ABSTRACT_GPU = "NVIDIA H200"

_NAME = re.compile(r', name = "([^"]+)"')
_WARPS = re.compile(r"num_warps = (\d+)")
_STAGES = re.compile(r"num_stages = (\d+)")
_IR = re.compile(r'ir = "((?:[^"\\]|\\.)*)"')


class TritonCall(NamedTuple):
    """One Triton kernel launch in a lowered module.

    Attributes:
      name: the kernel's name (the Pallas kernel function's name, e.g. ``'dense_trace_update'``).
      num_warps: warps per program.
      num_stages: software-pipelining stages Triton is asked for.
      ir: the kernel's Triton IR as MLIR bytecode or text (the string attribute's bytes, unescaped).
    """

    name: str
    num_warps: int
    num_stages: int
    ir: bytes

    def ir_text(self) -> str:
        """The Triton IR as text (``tt.load``, ``tt.store``, ... one operation per line), parsed with
        the Triton dialect that jaxlib ships."""
        from jax._src.lib import triton as jaxlib_triton
        from jax._src.lib.mlir import ir

        context = ir.Context()
        jaxlib_triton.dialect.register_dialect(context)
        with context:
            return ir.Module.parse(self.ir).operation.get_asm()


@contextlib.contextmanager
def cuda_target(mesh=None):
    """A context in which lowering for CUDA knows its GPU on any machine.

    Build, trace and lower inside it: an equation keeps the context it was traced in, so a model whose
    graph was compiled (``compile_graph``) outside it lowers its kernels without a GPU named.

    On a machine whose default backend is a GPU this does nothing: the lowering asks that GPU. Else it
    enters ``jax.sharding.use_abstract_mesh`` with an abstract mesh whose device is
    :data:`ABSTRACT_GPU`. jax 0.11's Pallas-to-Triton lowering raises ``RuntimeError: No supported
    GPU devices found`` without one, and takes the device from the context the function was traced
    in; jax 0.10 lowers for compute capability 9.0 without a GPU either way.

    Example::

        with cuda_target():
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    Args:
      mesh: the ``jax.sharding.Mesh`` the lowered program's shardings name, or ``None`` (no mesh
        axes). The abstract mesh gets its axis names, sizes and types.
    """
    if jax.default_backend() == "gpu":
        yield
        return
    device = jax.sharding.AbstractDevice(device_kind=ABSTRACT_GPU, num_cores=None, platform="gpu")
    if mesh is None:
        abstract = jax.sharding.AbstractMesh((), (), abstract_device=device)
    else:
        abstract = jax.sharding.AbstractMesh(
            mesh.axis_sizes, mesh.axis_names, mesh.axis_types, abstract_device=device
        )
    with jax.sharding.use_abstract_mesh(abstract):
        yield


def lowered_for_cuda(fn, *args) -> str:
    """The text of ``jax.jit(fn)`` lowered for CUDA at ``args`` (arrays or ``jax.ShapeDtypeStruct``),
    traced and lowered in :func:`cuda_target`."""
    with cuda_target():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def triton_calls(lowered_text: str) -> list[TritonCall]:
    """Every Triton custom call in a lowered module's text, in program order.

    Raises:
      ValueError: a Triton custom call lacks one of the attributes read here (the lowered format
        changed).
    """
    calls = []
    for line in lowered_text.splitlines():
        if "xla.gpu.triton" not in line:
            continue
        found = [pattern.search(line) for pattern in (_NAME, _WARPS, _STAGES, _IR)]
        if not all(found):
            missing = [k for k, m in zip(("name", "num_warps", "num_stages", "ir"), found) if not m]
            raise ValueError(f"a Triton custom call without {', '.join(missing)}: {line[:200]}")
        name, warps, stages, ir = (m.group(1) for m in found)
        calls.append(TritonCall(name, int(warps), int(stages), _unescape_mlir_string(ir)))
    return calls


def _unescape_mlir_string(text: str) -> bytes:
    """The bytes of an MLIR string attribute's body (``\\XX`` hex escapes, ``\\\\``, ``\\"``)."""
    return _ESCAPE.sub(_unescape_one, text.encode())


_ESCAPE = re.compile(rb"\\(?:([0-9A-Fa-f]{2})|(.))", re.DOTALL)


def _unescape_one(match: re.Match) -> bytes:
    return bytes([int(match.group(1), 16)]) if match.group(1) else match.group(2)
