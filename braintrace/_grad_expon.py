r"""``GradExpon``: an exponentially decaying running sum of gradients (the published name)."""

from __future__ import annotations

import math
import numbers

import brainstate
import jax
import jax.numpy as jnp
import saiunit as u

__all__ = ["GradExpon"]


def _is_quantity(x) -> bool:
    return isinstance(x, u.Quantity)


class GradExpon(brainstate.nn.Module):
    r"""Accumulate gradients with a leak: :math:`g_{t+1} = \lambda\, g_t + \nabla_t`.

    Smooths an online-learning signal over steps (an eligibility-style average of the gradients).

    Parameters
    ----------
    grad_shape : pytree of arrays
        Gives the structure, shapes and dtypes of the gradients (``learner.param_states`` values, or
        the gradients of one step); the accumulator starts at zeros like it.
    tau_or_decay : float or Quantity
        The decay :math:`\lambda \in (0, 1)`, or a time constant :math:`\tau` (a ``saiunit``
        quantity of time), from which :math:`\lambda = \exp(-\mathrm{d}t / \tau)` with
        ``dt = brainstate.environ.get_dt()``.

    Attributes
    ----------
    gradients : brainstate.LongTermState
        The accumulator (same pytree as ``grad_shape``).
    decay : float
        :math:`\lambda`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> acc = braintrace.GradExpon(jnp.zeros(3), 0.9)
    >>> acc.update(jnp.ones(3))
    >>> acc.update(jnp.ones(3))
    >>> acc.gradients.value
    Array([1.9, 1.9, 1.9], dtype=float32)
    """

    def __init__(self, grad_shape, tau_or_decay):
        super().__init__()
        if _is_quantity(tau_or_decay):
            dt = brainstate.environ.get_dt()
            ratio = u.maybe_decimal(dt / tau_or_decay)
            if _is_quantity(ratio):
                raise TypeError(
                    f"GradExpon: `tau_or_decay` as a time constant must have the unit of dt "
                    f"({u.get_unit(dt)}), got {tau_or_decay}."
                )
            decay = float(jnp.exp(-jnp.asarray(ratio)))
            if not (0.0 < decay < 1.0):
                raise ValueError(
                    f"GradExpon: `tau_or_decay` must be a positive time constant, got {tau_or_decay}."
                )
        elif isinstance(tau_or_decay, numbers.Real) and not isinstance(
            tau_or_decay, (bool, numbers.Integral)
        ):
            decay = float(tau_or_decay)
            if not (0.0 < decay < 1.0) or math.isnan(decay):
                raise ValueError(
                    f"GradExpon: `tau_or_decay` as a decay must lie in (0, 1), got {tau_or_decay}."
                )
        else:
            raise TypeError(
                f"GradExpon: `tau_or_decay` must be a float decay in (0, 1) or a time constant (a saiunit "
                f"quantity), got {tau_or_decay!r}."
            )
        self.decay = decay
        self.gradients = brainstate.LongTermState(
            jax.tree.map(u.math.zeros_like, grad_shape, is_leaf=_is_quantity)
        )

    def update(self, grads) -> None:
        r"""``gradients <- decay * gradients + grads`` (``grads``: the pytree of ``grad_shape``)."""
        if jax.tree.structure(grads, is_leaf=_is_quantity) != jax.tree.structure(
            self.gradients.value, is_leaf=_is_quantity
        ):
            raise ValueError(
                "GradExpon.update: `grads` must have the pytree structure of `grad_shape`; got "
                f"{jax.tree.structure(grads, is_leaf=_is_quantity)}, expected "
                f"{jax.tree.structure(self.gradients.value, is_leaf=_is_quantity)}."
            )
        self.gradients.value = jax.tree.map(
            lambda g, new: g * self.decay + new, self.gradients.value, grads, is_leaf=_is_quantity
        )
