"""Comparison and array helpers shared by the primitive tests."""

import jax
import numpy as np

F32, F64 = np.float32, np.float64


def assert_close(actual, expected, dtype=F32, tol32=2e-6):
    """Normwise relative comparison: ``tol32`` in float32, 1e-12 in float64."""
    tol = tol32 if np.dtype(dtype) == F32 else 1e-12
    a, b = np.asarray(actual, F64), np.asarray(expected, F64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err < tol, f"normwise relative error {err:.3e} >= {tol:.0e}"


def npy(a):
    """A float64 NumPy copy of ``a``."""
    return np.asarray(a, F64)


def arr(a, dtype):
    """A device array of ``dtype`` from host data (converted on the host: no conversion kernel to compile)."""
    return jax.device_put(np.asarray(a, dtype))


def assert_vmap_keeps_marker(f, xs, reference, batched: str, unbatched: str):
    """``vmap(f)`` keeps the ETP marker: a batched primitive folds the mapped axis into its batch
    (``xs`` batched), an unbatched one becomes its batched twin (``xs[0]``); values stay right."""
    assert batched in str(jax.make_jaxpr(jax.vmap(f))(xs))
    assert_close(jax.vmap(f)(xs), reference(xs))
    text = str(jax.make_jaxpr(jax.vmap(f))(xs[0]))
    assert batched in text and unbatched not in text
    assert_close(jax.vmap(f)(xs[0]), reference(xs[0]))


def under_pallas_interpret(fn):
    """``fn`` called under ``braintrace.backend('pallas', interpret=True)`` (kernels in interpret mode)."""
    import braintrace

    def run(*args):
        with braintrace.backend("pallas", interpret=True):
            return fn(*args)

    return run
