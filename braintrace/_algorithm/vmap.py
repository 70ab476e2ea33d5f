"""``ETraceVmap`` and ``braintrace.compile(..., vmap=True)``: one unbatched learner per example.

``compile(model, algorithm, *example_inputs, batch_size=B, vmap=True)`` initialises the model's
states and compiles the learner for *one* example (``example_inputs[...][0]``) under
``brainstate.transform.vmap_new_states(state_tag='new', axis_size=B)``: every state created there
(the model's hidden states, the learner's eligibility traces) gets a leading axis of ``B`` lanes,
while the parameters, created with the model, stay shared. The result is an :class:`ETraceVmap`, a
``brainstate.nn.Vmap`` of the learner over those states: calling it with ``(B, ...)`` inputs runs
the unbatched learner once per lane, and the gradient with respect to the shared parameters is the
sum over lanes, which is what the batched learner (``batch_size=B`` without ``vmap``) computes.
"""

from __future__ import annotations

from typing import Optional

import brainstate
import jax
import jax.numpy as jnp

from .base import ETraceAlgorithm
from .sequence import SequenceDriverMixin

__all__ = ["ETraceVmap", "compile_vmap"]


class ETraceVmap(SequenceDriverMixin, brainstate.nn.Vmap):
    """A ``brainstate.nn.Vmap`` of a learner with the sequence drivers (published name).

    Returned by ``braintrace.compile(..., vmap=True)``: ``.module`` is the unbatched learner, whose
    per-example states carry the mapped axis. Call the wrapper (``wrapper(x)`` with ``x`` of shape
    ``(batch, ...)``) and its :meth:`etrace_grad` / :meth:`etrace_evolve` (the published forms, with
    ``step_fn`` calling the wrapper), never ``.module`` directly: the learner alone would see the
    batched states as one example. Windows (``chunk_size > 1``) are refused.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, braintrace
    >>> class Leaky(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = brainstate.ParamState(jnp.full((2, 3), 0.1))
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros(3))  # one example's state
    ...     def update(self, x):
    ...         self.h.value = 0.9 * self.h.value + braintrace.matmul(x, self.w.value)
    ...         return self.h.value
    >>> learner = braintrace.compile(Leaky(), 'd_rtrl', jnp.zeros((4, 2)), batch_size=4, vmap=True)
    >>> isinstance(learner, braintrace.ETraceVmap), learner(jnp.ones((4, 2))).shape
    (True, (4, 3))
    >>> xs, ys = jnp.ones((10, 4, 2)), jnp.zeros((10, 4, 3))
    >>> grads = learner.etrace_grad(xs, ys, step_fn=lambda x, y: jnp.sum((learner(x) - y) ** 2))
    >>> grads[('w',)].shape
    (2, 3)
    """

    _seq_is_vmapped = True

    @property
    def _seq_param_states(self):
        return self.module.model.states(brainstate.ParamState)

    @property
    def _seq_vjp_method(self) -> Optional[str]:
        return getattr(self.module, "vjp_method", None)


def _one_example(example_inputs, batch_size: int):
    def take(a):
        shape = jnp.shape(a)
        if len(shape) == 0 or shape[0] != batch_size:
            raise ValueError(
                f"compile(..., vmap=True): every leaf of example_inputs must have the batch axis "
                f"(batch_size={batch_size}) first, got a leaf of shape {tuple(shape)}."
            )
        return a[0]

    return jax.tree.map(take, example_inputs)


def compile_vmap(learner, *example_inputs, batch_size=None, seed=None, verbose=0) -> ETraceVmap:
    """``braintrace.compile(..., vmap=True)`` for an uncompiled ``learner`` (see the module docstring).

    Raises ``ValueError`` without a positive ``batch_size``, without example inputs, when an example
    input leaf lacks the batch axis, or for a learner that is already compiled.
    """
    if not isinstance(learner, ETraceAlgorithm):
        raise TypeError(f"`learner` must be an ETraceAlgorithm, got {type(learner).__name__}.")
    if learner.is_compiled:
        raise ValueError(
            "compile(..., vmap=True) needs an uncompiled learner: it compiles it for one example."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"compile(..., vmap=True) needs batch_size, a positive int (the number of lanes, the size "
            f"of the leading axis of example_inputs); got {batch_size!r}."
        )
    if not example_inputs:
        raise ValueError("compile(..., vmap=True) needs example inputs (one step, batch axis first).")
    one = _one_example(example_inputs, batch_size)
    if seed is not None:
        brainstate.random.seed(seed)

    @brainstate.transform.vmap_new_states(state_tag="new", axis_size=batch_size)
    def init():
        brainstate.nn.init_all_states(learner.model)
        learner.compile_graph(*one)

    init()
    if verbose:
        print(learner.graph.summary())
    return ETraceVmap(learner, vmap_states="new")
