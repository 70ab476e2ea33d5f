r"""The learning-signal axis: what the eligibility traces are contracted with.

* ``'symmetric'``: :math:`\partial L_t/\partial h_t`, the exact gradient of the step's loss with
  respect to the new hidden states (reverse mode through the step).
* ``'random_feedback'`` (feedback alignment, Lillicrap et al. 2016; e-prop's random variant,
  Bellec et al. 2020): the same reverse pass, except that every trainable ETP op
  :math:`y = f(x, \theta)` sends its input the cotangent :math:`\partial f(x, B)/\partial x^\top\,
  \bar y` of a fixed random operand :math:`B` in place of its weight :math:`\theta`. For a dense
  read-out :math:`y = zW` of spikes :math:`z`, the cotangent it multiplies is the output error
  :math:`\bar y = \partial L_t/\partial y_t` and the neurons' learning signal is
  :math:`L_t = \bar y_t B^\top` (``B^T`` of the weight's shape ``(I, O)``, a
  :class:`FixedRandomFeedback` of shape ``(O, I)``), carried to the hidden states through the
  neurons' own derivatives (the pseudo-derivative of a spiking unit). Plain (non-ETP) operations
  on the path are differentiated exactly.
* ``'modulatory'`` (three-factor rules): a caller's modulator replaces
  :math:`\partial L_t/\partial h_t`; one array, broadcast to every hidden group's unit shape
  ``(*unit,)`` (then shared by the group's ``n`` states) or to ``(*unit, n)``.
"""

from __future__ import annotations

import numbers
from typing import Callable, Dict

import brainstate
import jax
import jax.numpy as jnp
import saiunit as u

from braintrace._compatible_imports import bind_equation
from braintrace._compiler.jaxpr_tools import is_trainable_etp_eqn
from braintrace._compiler.perturbation import add_hidden_perturbation_in_module
from braintrace._etrace_op._registries import (
    ETP_TRAINABLE_INVARS_FNS,
    ETP_X_INVAR_INDICES,
    default_trainable_invars,
)
from braintrace._etrace_op.dense import etp_mm_p, etp_mv_p

__all__ = [
    "FixedRandomFeedback",
    "as_prng_key",
    "random_feedback_operands",
    "feedback_alignment_step",
    "expand_modulator",
]


def as_prng_key(key, owner: str = "random_feedback_key"):
    """A JAX PRNG key from a key (typed, or raw ``uint32[2]``) or an int seed."""
    if isinstance(key, bool):
        raise TypeError(f"`{owner}` must be a JAX PRNG key or an int seed, got {key!r}.")
    if isinstance(key, numbers.Integral):
        return jax.random.PRNGKey(int(key))
    try:
        jax.random.fold_in(key, 0)
    except Exception:  # noqa: BLE001 - any failure means it is not a key
        raise TypeError(
            f"`{owner}` must be a JAX PRNG key (jax.random.PRNGKey(0), brainstate.random.split_key()) or an "
            f"int seed, got {key!r}."
        ) from None
    return key


class FixedRandomFeedback:
    r"""A fixed random feedback matrix :math:`B` of shape ``(n_target, n_layer)``.

    :math:`B_{kj} = s\,\xi_{kj}`, :math:`\xi \sim \mathcal N(0, 1)` drawn once from ``key``; it
    carries no gradient (``jax.lax.stop_gradient``). :meth:`project` maps an error on the targets
    to a signal on the layer, :math:`L = e\,B` (``(..., n_target) -> (..., n_layer)``). The
    ``learning_signal='random_feedback'`` rules (``EProp(feedback='random')``) draw one per dense
    op on the path from the hidden states to the outputs and use it in place of that op's weight
    :math:`W` ``(n_layer, n_target)`` in the backward pass (:math:`\bar x = \bar y B` instead of
    :math:`\bar y W^\top`).

    Parameters
    ----------
    n_target : int
        Rows of ``B`` (the target dimension, e.g. a read-out's outputs).
    n_layer : int
        Columns of ``B`` (the layer's units).
    key : JAX PRNG key or int
        The key (or a seed) ``B`` is drawn from.
    init_scale : float
        The standard deviation :math:`s`; default ``0.1``.

    Attributes
    ----------
    B : jax.Array, shape ``(n_target, n_layer)``
    n_target, n_layer : int

    Examples
    --------
    >>> import jax, jax.numpy as jnp, braintrace
    >>> fb = braintrace.FixedRandomFeedback(2, 3, jax.random.PRNGKey(0))
    >>> fb.B.shape
    (2, 3)
    >>> fb.project(jnp.ones((4, 2))).shape
    (4, 3)
    """

    def __init__(self, n_target: int, n_layer: int, key, init_scale: float = 0.1):
        for name, n in (("n_target", n_target), ("n_layer", n_layer)):
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise ValueError(f"FixedRandomFeedback: `{name}` must be an int >= 1, got {n!r}.")
        if isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real) or not init_scale > 0:
            raise ValueError(f"FixedRandomFeedback: `init_scale` must be a float > 0, got {init_scale!r}.")
        self.n_target, self.n_layer = int(n_target), int(n_layer)
        self.init_scale = float(init_scale)
        noise = jax.random.normal(
            as_prng_key(key, "key"), (self.n_target, self.n_layer), brainstate.environ.dftype()
        )
        self.B = jax.lax.stop_gradient(self.init_scale * noise)

    def project(self, error):
        """``error @ B``: ``(..., n_target) -> (..., n_layer)``."""
        error = u.get_mantissa(error)
        if jnp.shape(error)[-1:] != (self.n_target,):
            raise ValueError(
                f"FixedRandomFeedback.project: `error` must end with n_target={self.n_target}, got shape "
                f"{jnp.shape(error)}."
            )
        return error @ self.B

    def __repr__(self):
        return (
            f"FixedRandomFeedback(n_target={self.n_target}, n_layer={self.n_layer}, "
            f"init_scale={self.init_scale})"
        )


def _trainable_layout(eqn) -> Dict[str, int]:
    return ETP_TRAINABLE_INVARS_FNS.get(eqn.primitive, default_trainable_invars)(dict(eqn.params))


def random_feedback_operands(jaxpr, key, init_scale: float = 0.1) -> Dict[int, Dict[str, object]]:
    """``{equation index: {trainable key: random operand}}`` for every trainable ETP equation of
    ``jaxpr`` that has an input ``x``: a :class:`FixedRandomFeedback` for a dense op's ``'weight'``
    (used transposed, the weight's shape ``(I, O)``), ``init_scale``-scaled normal noise of the
    operand's shape for other ops' operands. Biases keep their own value (they do not enter the
    cotangent of ``x``). Each equation's operands come from ``fold_in(key, index)``."""
    key = as_prng_key(key)
    out = {}
    for i, eqn in enumerate(jaxpr.eqns):
        if not is_trainable_etp_eqn(eqn) or ETP_X_INVAR_INDICES.get(eqn.primitive, 0) is None:
            continue
        k_eqn = jax.random.fold_in(key, i)
        ops = {}
        for j, (name, idx) in enumerate(sorted(_trainable_layout(eqn).items())):
            if name == "bias":
                continue
            aval = eqn.invars[idx].aval
            if eqn.primitive in (etp_mm_p, etp_mv_p) and name == "weight":
                n_in, n_out = aval.shape
                ops[name] = FixedRandomFeedback(n_out, n_in, k_eqn, init_scale)
            else:
                noise = jax.random.normal(jax.random.fold_in(k_eqn, j), aval.shape, aval.dtype)
                ops[name] = init_scale * noise
        out[i] = ops
    return out


def _operand_value(op, dtype):
    value = op.B.T if isinstance(op, FixedRandomFeedback) else op
    return jnp.asarray(value, dtype)


def feedback_alignment_step(info, operands: Dict[int, Dict[str, object]], relation_eqns) -> Callable:
    r"""The step with hidden perturbations (as
    :func:`~braintrace.add_hidden_perturbation_in_module`) in which every trainable ETP equation
    listed in ``operands`` computes its usual output but sends its input ``x`` the cotangent of
    ``f(x, B)`` (its random operands ``B`` in place of its trainable ones):
    ``y = f(sg(x), W) + (f(x, B) - sg(f(x, B)))``, whose value is ``f(x, W)`` exactly.

    Returns ``fn(state_leaves, arg_leaves, perts, old_perts=None) -> (out_leaves, new_states)``;
    the gradient of a loss of its outputs with respect to ``perts`` is the random-feedback
    learning signal of the hidden states."""

    def hook(i, eqn, invals):
        ops = operands.get(i)
        if ops is None:
            return None
        xi = ETP_X_INVAR_INDICES.get(eqn.primitive, 0)
        layout = _trainable_layout(eqn)
        stopped = list(invals)
        stopped[xi] = jax.lax.stop_gradient(invals[xi])
        for idx in layout.values():
            stopped[idx] = jax.lax.stop_gradient(invals[idx])
        true_outs = bind_equation(eqn, stopped)
        random_in = [jax.lax.stop_gradient(v) if j != xi else v for j, v in enumerate(invals)]
        for name, op in ops.items():
            idx = layout[name]
            random_in[idx] = _operand_value(op, invals[idx].dtype)
        rand_outs = bind_equation(eqn, random_in)
        return [t + (r - jax.lax.stop_gradient(r)) for t, r in zip(true_outs, rand_outs)]

    fn, _ = add_hidden_perturbation_in_module(info, hook, relation_eqns)
    return fn


def expand_modulator(modulator, shape, owner: str = "the modulator"):
    r"""``modulator`` as an array of ``shape`` = ``(*unit, n)``: broadcast from ``(*unit,)``
    (shared by the ``n`` states of a unit) or directly to ``(*unit, n)``. ``ValueError`` names both
    shapes when neither works."""
    m = jnp.asarray(u.get_mantissa(modulator))
    if not jnp.issubdtype(m.dtype, jnp.number) or jnp.issubdtype(m.dtype, jnp.complexfloating):
        raise TypeError(f"{owner} must be a real number or array, got dtype {m.dtype}.")
    unit = tuple(shape[:-1])
    try:
        if m.ndim <= len(unit):
            return jnp.broadcast_to(jnp.broadcast_to(m, unit)[..., None], tuple(shape))
        return jnp.broadcast_to(m, tuple(shape))
    except ValueError:
        raise ValueError(
            f"{owner} of shape {m.shape} broadcasts neither to a hidden group's unit shape {unit} "
            f"nor to {tuple(shape)} (units and the group's {shape[-1]} state(s)); pass a scalar, one "
            f"value per unit, "
            f"or one per unit and state."
        ) from None


def check_modulator(modulator, shapes, owner: str = "the modulator") -> jax.Array:
    """``modulator`` checked against every hidden group's ``(*unit, n)`` in ``shapes`` (a dict
    ``{description: shape}``; ``ValueError`` naming the group it does not fit); returns its
    mantissa as an array."""
    for what, s in shapes.items():
        expand_modulator(modulator, s, f"{owner} (for {what})")
    return jnp.asarray(u.get_mantissa(modulator))
