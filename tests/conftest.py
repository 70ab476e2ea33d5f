"""Shared fixtures for the braintrace test suite.

* ``dtype``: runs a test once in float32 and once in float64, switching ``jax_enable_x64`` on for
  the float64 run and restoring the previous setting afterwards.
* ``rng``: a seeded ``numpy.random.Generator`` (inputs are random, never all ones).
* ``temp_primitives``: a list; every ETP primitive appended to it is removed from the global
  registries when the test ends, so other tests see only the built-ins.
* ``primitive_names``: the names of every primitive in a jaxpr, nested jaxprs included.
* the autouse ``_restore_backend`` fixture puts the backend back to ``'xla'`` after every test.

Tests marked ``gpu`` are skipped when JAX sees no GPU.
"""

from __future__ import annotations

import uuid

import jax
import numpy as np
import pytest

import braintrace
from braintrace import _backend


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU: jax.devices() has no 'gpu' device (run `pytest -m gpu` on a GPU host)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """``jnp.float32`` or ``jnp.float64``; x64 is enabled only for the float64 run."""
    previous = bool(jax.config.jax_enable_x64)
    want_x64 = np.dtype(request.param) == np.float64
    jax.config.update("jax_enable_x64", want_x64)
    try:
        yield np.dtype(request.param)
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def rng():
    return np.random.default_rng(20261123)


@pytest.fixture
def temp_primitives():
    """Primitives appended here are unregistered after the test."""
    created = []
    yield created
    from braintrace._etrace_op import unregister_primitive

    for p in created:
        unregister_primitive(p)


@pytest.fixture
def unique_name():
    """``unique_name('etp_foo')`` -> ``'etp_foo_<hex>'``, distinct for every call."""
    return lambda prefix: f"{prefix}_{uuid.uuid4().hex[:10]}"


def _primitive_names(jaxpr) -> set:
    """Names of every primitive in a (closed) jaxpr, descending into sub-jaxprs (jit, scan, ...)."""
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    names = set()
    for eqn in inner.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    names |= _primitive_names(sub)
    return names


@pytest.fixture
def primitive_names():
    """``primitive_names(closed_jaxpr) -> set of primitive names`` (recursive)."""
    return _primitive_names


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    if (_backend._state["name"], _backend._state["interpret"]) != ("xla", False):
        braintrace.set_backend("xla")


#: Primitives registered on first use.
LAZY_PRIMITIVES = ("etp_gmm", "etp_gmv", "etp_einsum", "etp_einsum_v", "etp_emb", "etp_emb_v")


@pytest.fixture(autouse=True, scope="module")
def _unregister_lazy_primitives():
    """The grouped, einsum and embedding primitives register on first use: each test module leaves
    the registries as it found them (the specification's notebook lists the registered primitives)."""
    from braintrace._etrace_op import unregister_primitive
    from braintrace._etrace_op._registries import ETP_PRIMITIVES_BY_NAME

    before = {n: ETP_PRIMITIVES_BY_NAME.get(n) for n in LAZY_PRIMITIVES}
    yield
    for name, p in before.items():
        if p is None and name in ETP_PRIMITIVES_BY_NAME:
            unregister_primitive(ETP_PRIMITIVES_BY_NAME[name])
