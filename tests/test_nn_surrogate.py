"""Surrogate spike functions: a Heaviside step forward, the documented pseudo-derivative backward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from braintrace.nn import surrogate


def sig(v):
    return 1.0 / (1.0 + np.exp(-v))


# name -> (function with its shape parameters, documented derivative in numpy)
SHAPES = {
    "sigmoid": (
        functools.partial(surrogate.sigmoid, alpha=3.0),
        lambda x: 3.0 * sig(3.0 * x) * (1 - sig(3.0 * x)),
    ),
    "relu_grad": (
        functools.partial(surrogate.relu_grad, alpha=0.4, width=0.8),
        lambda x: 0.4 * np.maximum(0.8 - np.abs(x), 0.0),
    ),
    "triangle": (
        functools.partial(surrogate.triangle, width=0.7),
        lambda x: np.maximum(1 - np.abs(x) / 0.7, 0) / 0.7,
    ),
    "gaussian": (
        functools.partial(surrogate.gaussian, sigma=0.6),
        lambda x: np.exp(-(x**2) / (2 * 0.6**2)) / (np.sqrt(2 * np.pi) * 0.6),
    ),
}
names = pytest.mark.parametrize("name", list(SHAPES))


@names
def test_forward_is_heaviside(name, dtype, rng):
    fn, _ = SHAPES[name]
    x = jnp.asarray(np.concatenate([rng.normal(size=64), [0.0, -0.0, 1e-6, -1e-6]]), dtype)
    y = jax.jit(fn)(x)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_array_equal(np.asarray(y), (np.asarray(x) > 0).astype(dtype))


@names
def test_gradient_is_documented_shape(name, dtype, rng):
    fn, derivative = SHAPES[name]
    x = jnp.asarray(rng.uniform(-1.5, 1.5, size=(5, 7)), dtype)
    grad = jax.jit(jax.vmap(jax.vmap(jax.grad(fn))))(x)
    assert grad.dtype == dtype
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(np.asarray(grad), derivative(np.asarray(x, np.float64)), rtol=rtol, atol=rtol)
    # forward mode and the chain rule agree with reverse mode
    v = jnp.asarray(rng.normal(size=x.shape), dtype)
    _, tangent = jax.jit(lambda x, v: jax.jvp(fn, (x,), (v,)))(x, v)
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(grad * v), rtol=rtol, atol=rtol)


def test_unit_area_shapes():
    x = np.linspace(-6.0, 6.0, 24001)
    fns = (surrogate.triangle, surrogate.gaussian, lambda v: surrogate.sigmoid(v, alpha=2.0))
    grads = jax.jit(lambda x: [jax.vmap(jax.grad(fn))(x) for fn in fns])(jnp.asarray(x, jnp.float32))
    for g in grads:
        assert np.trapezoid(np.asarray(g, np.float64), x) == pytest.approx(1.0, abs=1e-3)


def test_parameters_as_arrays_and_defaults():
    x = jnp.array([-0.5, 0.2, 0.9])
    alpha = jnp.array([1.0, 2.0, 3.0])
    grad = jax.jit(jax.grad(lambda v: surrogate.sigmoid(v, alpha).sum()))(x)
    np.testing.assert_allclose(
        np.asarray(grad),
        np.asarray(alpha) * sig(np.asarray(alpha * x)) * (1 - sig(np.asarray(alpha * x))),
        rtol=1e-6,
    )
    defaults = jax.jit(
        lambda v: (
            jax.grad(surrogate.relu_grad)(v),
            jax.grad(surrogate.sigmoid)(v),
            surrogate.heaviside(jnp.array([-1, 0, 2])),
        )
    )
    d_relu, d_sigmoid, steps = defaults(0.0)
    assert float(d_relu) == pytest.approx(0.3) and float(d_sigmoid) == pytest.approx(1.0)
    np.testing.assert_array_equal(np.asarray(steps), [0.0, 0.0, 1.0])


def test_bad_parameters():
    with pytest.raises(ValueError, match="alpha"):
        surrogate.sigmoid(jnp.ones(3), alpha=0.0)
    with pytest.raises(ValueError, match="width"):
        surrogate.triangle(jnp.ones(3), width=-1.0)
    with pytest.raises(ValueError, match="sigma"):
        surrogate.gaussian(jnp.ones(3), sigma=0.0)
