"""The backend switch: ``set_backend`` / ``get_backend`` / ``backend`` and kernel lowerings.

A test primitive has ``impl`` computing ``x * w`` and a ``kernel_fn`` computing ``x * w + 1000``, so
each result shows which lowering ran. The autouse fixture in ``conftest.py`` restores ``'xla'``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace
from braintrace import _backend

MARK = 1000.0


@pytest.fixture
def kernel_p(temp_primitives, unique_name):
    calls = {"interpret": []}

    def kernel(x, w, *, interpret):
        calls["interpret"].append(interpret)
        return x * w + MARK

    p = braintrace.register_primitive(unique_name("etp_test_kernel"), lambda x, w: x * w, kernel_fn=kernel)
    temp_primitives.append(p)
    p.calls = calls
    return p


@pytest.fixture
def fresh_warning_state():
    saved = _backend._state["warned"]
    _backend._state["warned"] = False
    yield
    _backend._state["warned"] = saved


X = jnp.arange(4.0)
W = jnp.float32(2.0)
IMPL = np.arange(4.0) * 2.0


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        braintrace.set_backend("nope")
    assert "'xla'" in str(info.value) and "'pallas'" in str(info.value) and "nope" in str(info.value)
    assert braintrace.get_backend() == "xla"


def test_get_backend_and_context_manager_restore():
    assert braintrace.get_backend() == "xla"
    braintrace.set_backend("pallas", interpret=True)
    assert braintrace.get_backend() == "pallas"
    with braintrace.backend("xla"):
        assert braintrace.get_backend() == "xla"
        with braintrace.backend("pallas", interpret=True):
            assert braintrace.get_backend() == "pallas"
        assert braintrace.get_backend() == "xla"
    assert braintrace.get_backend() == "pallas" and _backend._state["interpret"] is True
    braintrace.set_backend("xla")
    assert braintrace.get_backend() == "xla"


def test_context_manager_restores_after_an_exception():
    with pytest.raises(KeyError):
        with braintrace.backend("pallas", interpret=True):
            raise KeyError("boom")
    assert braintrace.get_backend() == "xla"
    assert _backend._state["interpret"] is False


@pytest.mark.parametrize("transform", ["jit", "grad", "vmap"])
def test_switching_inside_a_trace_raises(transform):
    def f(x):
        braintrace.set_backend("pallas", interpret=True)
        return x.sum()

    def g(x):
        with braintrace.backend("pallas", interpret=True):
            return x.sum()

    wrap = {"jit": jax.jit, "grad": jax.grad, "vmap": jax.vmap}[transform]
    for fn in (f, g):
        with pytest.raises(RuntimeError, match="inside a traced function"):
            wrap(fn)(jnp.ones((2, 3)) if transform == "vmap" else jnp.ones(3))
    assert braintrace.get_backend() == "xla"


def test_pallas_without_interpret_on_cpu_warns_once(fresh_warning_state):
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present: 'pallas' compiles kernels and does not warn")
    with pytest.warns(RuntimeWarning, match="interpret=True"):
        braintrace.set_backend("pallas")
    braintrace.set_backend("xla")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        braintrace.set_backend("pallas")  # a second time: silent
        braintrace.set_backend("pallas", interpret=True)


def test_kernel_mode_follows_the_backend():
    assert _backend.kernel_mode("cpu") is None and _backend.kernel_mode("cuda") is None
    with braintrace.backend("pallas", interpret=True):
        assert _backend.kernel_mode("cpu") == "interpret" and _backend.kernel_mode("cuda") == "interpret"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with braintrace.backend("pallas"):
            assert _backend.kernel_mode("cuda") == "compiled"
            assert _backend.kernel_mode("cpu") is None


def test_kernel_lowering_under_pallas_interpret(kernel_p):
    f = lambda x, w: kernel_p.bind(x, w)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(X, W)), IMPL)
    with braintrace.backend("pallas", interpret=True):
        np.testing.assert_allclose(np.asarray(jax.jit(f)(X, W)), IMPL + MARK)
        assert kernel_p.calls["interpret"] and all(kernel_p.calls["interpret"])
    np.testing.assert_allclose(np.asarray(jax.jit(f)(X, W)), IMPL)


def test_pallas_without_gpu_falls_back_to_the_reference(kernel_p, fresh_warning_state):
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        braintrace.set_backend("pallas")
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: kernel_p.bind(x, W))(X)), IMPL)
    assert kernel_p.calls["interpret"] == []


def test_switching_never_reuses_a_compiled_function(kernel_p):
    f = jax.jit(lambda x, w: kernel_p.bind(x, w))
    np.testing.assert_allclose(np.asarray(f(X, W)), IMPL)
    braintrace.set_backend("pallas", interpret=True)
    np.testing.assert_allclose(np.asarray(f(X, W)), IMPL + MARK)  # the SAME jitted function
    braintrace.set_backend("xla")
    np.testing.assert_allclose(np.asarray(f(X, W)), IMPL)
    with braintrace.backend("pallas", interpret=True):
        np.testing.assert_allclose(np.asarray(f(X, W)), IMPL + MARK)
    np.testing.assert_allclose(np.asarray(f(X, W)), IMPL)


def test_same_backend_again_keeps_the_caches(kernel_p, monkeypatch):
    cleared = []
    monkeypatch.setattr(jax, "clear_caches", lambda: cleared.append(1))
    braintrace.set_backend("xla")
    assert cleared == []
    braintrace.set_backend("pallas", interpret=True)
    braintrace.set_backend("pallas", interpret=True)
    assert cleared == [1]
    braintrace.set_backend("xla")
    assert cleared == [1, 1]


def test_builtin_primitives_are_unaffected_by_the_switch(rng):
    """Primitives without a kernel lower to their reference under either backend."""
    x = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)
    want = np.asarray(x @ w)
    f = jax.jit(braintrace.matmul)
    with braintrace.backend("pallas", interpret=True):
        np.testing.assert_allclose(np.asarray(f(x, w)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(f(x, w)), want, rtol=1e-5, atol=1e-6)
