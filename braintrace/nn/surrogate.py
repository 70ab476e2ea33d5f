r"""Surrogate spike functions: a Heaviside step forward, a smooth pseudo-derivative backward.

Every function here maps a dimensionless, threshold-centred input ``x`` (e.g.
``(V - V_th) / (V_th - V_reset)``) to spikes

.. math::
    s(x) = H(x) = \begin{cases} 1 & x > 0 \\ 0 & x \le 0 \end{cases}

in the dtype of ``x``, and is a :func:`jax.custom_jvp` whose derivative is replaced by the
documented shape :math:`\sigma'(x)` (forward- and reverse-mode, any order of ``jax.grad`` /
``jax.jvp`` / ``jax.vmap``). Shape parameters (``alpha``, ``width``, ``sigma``) are ordinary
arguments (Python numbers or arrays); they receive no gradient.

To configure a neuron, pass a function of ``x`` alone, e.g.
``functools.partial(braintrace.nn.surrogate.sigmoid, alpha=2.)``.

==================  ==========================================================================
function            derivative :math:`\sigma'(x)`
==================  ==========================================================================
``sigmoid``         :math:`\alpha\,\mathrm{sig}(\alpha x)\,(1-\mathrm{sig}(\alpha x))`
``relu_grad``       :math:`\alpha\,\max(w - |x|, 0)`
``triangle``        :math:`\max(1 - |x|/w, 0)\,/\,w` (unit area)
``gaussian``        :math:`\exp(-x^2 / 2\sigma^2) / (\sqrt{2\pi}\,\sigma)` (unit area)
==================  ==========================================================================
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["heaviside", "sigmoid", "relu_grad", "triangle", "gaussian"]


def heaviside(x):
    """``1`` where ``x > 0``, else ``0``, in the floating dtype of ``x`` (no surrogate)."""
    x = _as_float(x)
    return (x > 0).astype(x.dtype)


def _as_float(x):
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.result_type(float))


def _make_surrogate(name, derivative):
    """A ``custom_jvp`` spike function ``f(x, p)`` with ``df/dx = derivative(x, p)``."""

    @jax.custom_jvp
    def spike(x, p):
        return (x > 0).astype(x.dtype)

    @spike.defjvp
    def _jvp(primals, tangents):
        x, p = primals
        tx, _ = tangents
        return spike(x, p), (derivative(x, p) * tx).astype(x.dtype)

    spike.__name__ = name
    return spike


def _param(value, x, name, owner, positive=True):
    p = jnp.asarray(value, dtype=x.dtype)
    if positive and not isinstance(p, jax.core.Tracer) and not np.all(np.asarray(p) > 0):
        raise ValueError(f"surrogate.{owner}: `{name}` must be positive, got {value!r}.")
    return p


def _sigmoid_derivative(x, alpha):
    s = jax.nn.sigmoid(alpha * x)
    return alpha * s * (1 - s)


def _relu_derivative(x, p):
    alpha, width = p
    return alpha * jnp.maximum(width - jnp.abs(x), 0)


def _triangle_derivative(x, width):
    return jnp.maximum(1 - jnp.abs(x) / width, 0) / width


def _gaussian_derivative(x, sigma):
    return jnp.exp(-(x**2) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)


_sigmoid_spike = _make_surrogate("sigmoid", _sigmoid_derivative)
_relu_spike = _make_surrogate("relu_grad", _relu_derivative)
_triangle_spike = _make_surrogate("triangle", _triangle_derivative)
_gaussian_spike = _make_surrogate("gaussian", _gaussian_derivative)


def sigmoid(x, alpha: float = 4.0):
    r"""Heaviside spike with the sigmoid pseudo-derivative
    :math:`\alpha\,\mathrm{sig}(\alpha x)(1 - \mathrm{sig}(\alpha x))` (peak :math:`\alpha/4` at 0).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from braintrace.nn import surrogate
    >>> surrogate.sigmoid(jnp.array([-0.5, 0.0, 0.5]))
    Array([0., 0., 1.], dtype=float32)
    >>> float(jax.grad(surrogate.sigmoid)(0.0))
    1.0
    """
    x = _as_float(x)
    return _sigmoid_spike(x, _param(alpha, x, "alpha", "sigmoid"))


def relu_grad(x, alpha: float = 0.3, width: float = 1.0):
    r"""Heaviside spike with the piecewise-linear pseudo-derivative :math:`\alpha \max(w - |x|, 0)`.

    Examples
    --------
    >>> import jax
    >>> from braintrace.nn import surrogate
    >>> round(float(jax.grad(surrogate.relu_grad)(0.5)), 6)
    0.15
    """
    x = _as_float(x)
    p = (_param(alpha, x, "alpha", "relu_grad"), _param(width, x, "width", "relu_grad"))
    return _relu_spike(x, p)


def triangle(x, width: float = 1.0):
    r"""Heaviside spike with the unit-area triangular pseudo-derivative
    :math:`\max(1 - |x|/w, 0)/w` (support ``(-w, w)``, peak ``1/w``).

    Examples
    --------
    >>> import jax
    >>> from braintrace.nn import surrogate
    >>> float(jax.grad(lambda x: surrogate.triangle(x, width=2.0))(1.0))
    0.25
    """
    x = _as_float(x)
    return _triangle_spike(x, _param(width, x, "width", "triangle"))


def gaussian(x, sigma: float = 0.5):
    r"""Heaviside spike with the Gaussian pseudo-derivative
    :math:`\exp(-x^2/2\sigma^2)/(\sqrt{2\pi}\,\sigma)` (unit area).

    Examples
    --------
    >>> import jax
    >>> from braintrace.nn import surrogate
    >>> round(float(jax.grad(lambda x: surrogate.gaussian(x, sigma=1.0))(0.0)), 6)
    0.398942
    """
    x = _as_float(x)
    return _gaussian_spike(x, _param(sigma, x, "sigma", "gaussian"))
