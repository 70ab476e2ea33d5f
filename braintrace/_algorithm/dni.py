r"""DNI: decoupled neural interfaces for recurrent models (synthetic gradients, Jaderberg et al. 2017),
the ``learning_signal='bootstrapped'`` coordinate of :class:`~braintrace.ETraceConfig`.

The multi-step rule (``vjp_method='multi-step'``) differentiates a window of steps
:math:`[a, b)` exactly and sends :math:`\partial L_{[a,b)}/\partial h_a` through the eligibility
traces at its start. What it cannot see is the credit the *future* would send back through the
window's exit :math:`h_b`. For the parameters of the trainable ETP ops the traces carry that
credit forward (the next windows contract their :math:`\partial L/\partial h` with traces that
include this window's steps); for every other path (plain parameters, inputs, non-hidden states)
it is lost. DNI learns a synthesiser :math:`M` with :math:`M(h_b) \approx \partial L_{\ge b}/\partial
h_b` and injects its prediction at the exit of every window, on the paths the traces do not carry.

* :class:`SyntheticGradient`: one affine map (optionally with a hidden layer) per hidden group,
  its last layer zero-initialised.
* :class:`DNI`: :class:`~braintrace.ParamDimVjpAlgorithm`'s multi-step rule with the injected
  exit cotangent.
* :func:`train_synthetic_gradient`: fits :math:`M` by regression on bootstrapped targets.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from braintrace._compatible_imports import bind_equation
from braintrace._input_data import MultiStepData, split_window

from .axes import ETraceConfig
from .base import ETraceAlgorithm
from .d_rtrl import ParamDimVjpAlgorithm

__all__ = ["SyntheticGradient", "DNI", "train_synthetic_gradient"]

#: The compiled loops of the drivers: they hold the state objects they traced.
_LOOP_CACHES = (
    "_etrace_grad_cache",
    "_etrace_train_cache",
    "_etrace_evolve_cache",
    "_synthetic_gradient_cache",
)


def _int_at_least(value, name: str, low: int, where: str) -> int:
    """``value`` as a Python int ``>= low``; ``TypeError`` / ``ValueError`` naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{where}: `{name}` must be an int >= {low}, got {value!r}.")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: `{name}` must be an int >= {low}, got {value!r}.") from None
    if value < low:
        raise ValueError(f"{where}: `{name}` must be an int >= {low}, got {value}.")
    return value


def _features(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The axes a synthesiser maps: the last unit axis and the state axis (the state axis alone for
    a group of scalar units)."""
    return tuple(shape[-2:])


class SyntheticGradient(brainstate.nn.Module):
    r"""A learned estimate of the future cotangent of each hidden group (the synthesiser of DNI).

    For a hidden group ``g`` of ``n`` states whose values are stacked as ``h`` of shape
    ``(*lead, H, n)`` (``lead``: batch and other leading unit axes, ``H``: the last unit axis), the
    prediction is affine in the ``F = H n`` features, shared over ``lead``:

    .. math::
        M_g(h) = \operatorname{vec}(h)\,A_g + b_g, \qquad A_g \in \mathbb{R}^{F\times F},\;
        b_g \in \mathbb{R}^{F},

    or, with ``hidden_width=m``, :math:`M_g(h) = \operatorname{relu}(\operatorname{vec}(h)\,C_g +
    c_g)\,A_g + b_g` with :math:`C_g \in \mathbb{R}^{F\times m}`. The output has the shape of
    ``h``. :math:`A_g` is drawn with standard deviation ``scale`` (0 by default) and
    :math:`b_g = 0`, so an untrained synthesiser predicts exactly zero and :class:`DNI` computes
    the plain multi-step rule, bit for bit.

    The parameters are ordinary ``brainstate.ParamState`` objects, outside the model: the online
    gradient does not reach them (:class:`DNI` stops it); :func:`train_synthetic_gradient` fits them.

    Parameters
    ----------
    group_shapes : dict of int to tuple of int
        ``group index -> (*unit_shape, n)`` (:meth:`DNI.group_signal_shapes`). Only the last two
        entries set the parameters' shapes; the leading ones are checked against the values given
        to :meth:`apply`.
    hidden_width : int, optional
        The width ``m`` of a hidden ReLU layer (drawn with standard deviation
        :math:`1/\sqrt{F}`); ``None`` (default): the affine map of the paper.
    scale : float
        Standard deviation of the initial :math:`A_g` (the last layer); ``0.0`` makes the untrained
        synthesiser predict zero.
    seed : int
        Seed of the draws (``numpy.random.default_rng(seed)``).
    dtype : dtype, optional
        Of the parameters; ``brainstate.environ.dftype()`` by default.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> synth = braintrace.SyntheticGradient({0: (2, 4, 1)})
    >>> pred = synth.apply(synth.param_values(), {0: jnp.ones((2, 4, 1))})
    >>> pred[0].shape, float(jnp.abs(pred[0]).max())
    ((2, 4, 1), 0.0)
    >>> sorted(synth.states_dict())
    [('biases', 0), ('weights', 0)]
    """

    def __init__(
        self,
        group_shapes: Mapping[int, Tuple[int, ...]],
        hidden_width: Optional[int] = None,
        scale: float = 0.0,
        seed: int = 0,
        dtype=None,
    ):
        super().__init__()
        where = "SyntheticGradient"
        if not isinstance(group_shapes, Mapping) or not group_shapes:
            raise TypeError(
                f"{where}: `group_shapes` must be a non-empty dict {{group index: (*unit_shape, n)}} "
                f"(DNI.group_signal_shapes()), got {group_shapes!r}."
            )
        shapes = {}
        for gid, shape in group_shapes.items():
            if isinstance(gid, bool) or not isinstance(gid, numbers.Integral) or gid < 0:
                raise TypeError(
                    f"{where}: the keys of `group_shapes` are group indices (ints >= 0), got {gid!r}."
                )
            gid = int(gid)
            try:
                shape = tuple(_int_at_least(d, "group_shapes", 1, where) for d in shape)
            except TypeError:
                raise TypeError(
                    f"{where}: `group_shapes[{gid}]` must be a tuple of positive ints (*unit_shape, n), "
                    f"got {shape!r}."
                ) from None
            if not shape:
                raise ValueError(f"{where}: `group_shapes[{gid}]` must hold at least the state axis, got ().")
            shapes[gid] = shape
        if hidden_width is not None:
            hidden_width = _int_at_least(hidden_width, "hidden_width", 1, where)
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise TypeError(f"{where}: `scale` must be a finite float >= 0, got {scale!r}.")
        if scale < 0:
            raise ValueError(f"{where}: `scale` must be >= 0 (a standard deviation), got {scale}.")
        seed = _int_at_least(seed, "seed", 0, where)
        dtype = brainstate.environ.dftype() if dtype is None else jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{where}: `dtype` must be a floating dtype, got {dtype}.")
        #: ``group index -> (*unit_shape, n)``.
        self.group_shapes = shapes
        self.hidden_width = hidden_width
        self.scale = float(scale)
        self.weights, self.biases = {}, {}
        self.hidden_weights, self.hidden_biases = {}, {}
        rng = np.random.default_rng(seed)  # host draws: no device program per parameter
        for gid in sorted(shapes):
            width = math.prod(_features(shapes[gid]))
            fan_in = width
            if hidden_width is not None:
                c = rng.standard_normal((width, hidden_width)) / math.sqrt(width)
                self.hidden_weights[gid] = brainstate.ParamState(jnp.asarray(c, dtype))
                self.hidden_biases[gid] = brainstate.ParamState(jnp.asarray(np.zeros(hidden_width), dtype))
                fan_in = hidden_width
            a = scale * rng.standard_normal((fan_in, width))
            self.weights[gid] = brainstate.ParamState(jnp.asarray(a, dtype))
            self.biases[gid] = brainstate.ParamState(jnp.asarray(np.zeros(width), dtype))

    def states_dict(self) -> Dict[Tuple[str, int], brainstate.ParamState]:
        """The parameters, keyed ``(kind, group index)`` (kinds ``'weights'``, ``'biases'`` and,
        with a hidden layer, ``'hidden_weights'``, ``'hidden_biases'``): register an optimizer
        against this dict."""
        out = {}
        for kind in ("hidden_weights", "hidden_biases", "weights", "biases"):
            for gid, st in getattr(self, kind).items():
                out[(kind, gid)] = st
        return out

    def param_values(self) -> Dict[Tuple[str, int], jax.Array]:
        """The parameters' values, keyed as :meth:`states_dict` (the input of :meth:`apply`)."""
        return {k: st.value for k, st in self.states_dict().items()}

    def apply(self, param_values: Mapping, group_hiddens: Mapping[int, Any]) -> Dict[int, jax.Array]:
        """``{group index: M_g(h_g)}`` for ``group_hiddens`` ``{group index: h_g (..., *features)}``,
        computed from ``param_values`` (keyed as :meth:`states_dict`): a pure function of both."""
        if set(group_hiddens) != set(self.group_shapes):
            raise ValueError(
                f"SyntheticGradient: `group_hiddens` has the groups {sorted(group_hiddens)}, but the "
                f"synthesiser was built for {sorted(self.group_shapes)}."
            )
        out = {}
        for gid, h in group_hiddens.items():
            feat = _features(self.group_shapes[gid])
            h = jnp.asarray(h)
            if h.ndim < len(feat) or tuple(h.shape[h.ndim - len(feat) :]) != feat:
                raise ValueError(
                    f"SyntheticGradient: `group_hiddens[{gid}]` must end with the axes {feat} (the last "
                    f"unit axis and the states of group_shapes[{gid}]={self.group_shapes[gid]}), got "
                    f"shape {h.shape}."
                )
            x = h.reshape(h.shape[: h.ndim - len(feat)] + (math.prod(feat),))
            if self.hidden_width is not None:
                c, cb = param_values[("hidden_weights", gid)], param_values[("hidden_biases", gid)]
                x = jax.nn.relu(x @ c.astype(x.dtype) + cb.astype(x.dtype))
            a, b = param_values[("weights", gid)], param_values[("biases", gid)]
            out[gid] = (x @ a.astype(x.dtype) + b.astype(x.dtype)).reshape(h.shape)
        return out

    def update(self, group_hiddens: Mapping[int, Any]) -> Dict[int, jax.Array]:
        """:meth:`apply` with the current parameter values (``synth(group_hiddens)``)."""
        return self.apply(self.param_values(), group_hiddens)

    def fits(self, group_shapes: Mapping[int, Tuple[int, ...]]) -> bool:
        """Whether this synthesiser maps the groups ``group_shapes`` (same groups, same last unit
        axis and number of states)."""
        if set(group_shapes) != set(self.group_shapes):
            return False
        return all(_features(tuple(s)) == _features(self.group_shapes[g]) for g, s in group_shapes.items())


def _exit_tap(outs, exits, estimate):
    """``outs`` unchanged; in reverse mode, ``estimate`` is the cotangent of ``exits`` (the exit
    cotangent of the window, whatever the loss does with ``outs``)."""

    @jax.custom_vjp
    def tap(outs, exits, estimate):
        return outs

    def fwd(outs, exits, estimate):
        return outs, estimate

    def bwd(estimate, cts):
        return cts, estimate, jax.tree.map(jnp.zeros_like, estimate)

    tap.defvjp(fwd, bwd)
    return tap(outs, exits, estimate)


class DNI(ParamDimVjpAlgorithm):
    r"""D-RTRL's multi-step rule with a learned estimate of the truncated future (synthetic gradients,
    Jaderberg et al. 2017): ``ETraceConfig(learning_signal='bootstrapped')``.

    The learner is driven in windows of steps (``alg(braintrace.MultiStepData(xs))``,
    ``etrace_grad(..., window=K)``; a call without ``MultiStepData`` is a window of one step). For
    window :math:`k` over steps :math:`[a_k, b_k)` with loss :math:`L_k`, the synthesiser's
    estimate :math:`g_k = \operatorname{sg}(M(h_{b_k}))` (gradient stopped) of
    :math:`\partial \sum_{j>k} L_j / \partial h_{b_k}` enters as the cotangent of the exit hidden
    values :math:`h_{b_k}`, as if the window's loss were :math:`L_k + \langle g_k, h_{b_k}\rangle`,
    along every path inside the window except through the trainable operands of the ETP ops (the
    relations): the gradient of a parameter :math:`\theta` is

    .. math::
        \nabla_\theta^{(k)} = \frac{\partial L_k}{\partial \theta}\Big|_{\text{window}}
        + \frac{\partial L_k}{\partial h_{a_k}}\,\epsilon_{a_k}
        + g_k^\top \frac{\partial h_{b_k}}{\partial \theta}\Big|_{\text{window, ETP operands fixed}},

    the first two terms being D-RTRL's multi-step rule (:math:`\epsilon_{a_k}`: the traces at the
    window's start). The ETP parameters' credit from later windows already arrives through the
    traces, so their gradients are D-RTRL's, bit for bit, whatever :math:`M` predicts; the plain
    parameters (and the inputs, and non-hidden states) get the estimated future credit. With
    :math:`g_k` the true :math:`\partial \sum_{j>k} L_j/\partial h_{b_k}` (and :math:`g = 0` at the
    end of the sequence), the windows' gradients of the plain parameters sum to BPTT's.

    The cotangent of the hidden values at the window's entry (``brainstate.transform.grad`` of the
    window's loss with respect to the hidden states) is the bootstrapped target of the paper,
    :math:`\partial L_k/\partial h_{a_k} + (\partial h_{b_k}/\partial h_{a_k})^\top g_k`, which
    :func:`train_synthetic_gradient` regresses :math:`M(h_{a_k})` on.

    Parameters
    ----------
    model : brainstate.nn.Module
    synthesizer : SyntheticGradient, optional
        The estimator :math:`M`. By default a zero-initialised affine :class:`SyntheticGradient`
        (in the hidden states' dtype) is created when the graph is compiled; an untrained DNI
        computes the plain multi-step rule.
    name, fast_solve, trace_dtype, chunked_trace, control_flow, snap_max_jacobian_elements
        As :class:`~braintrace.ParamDimVjpAlgorithm`.
    normalize_matrix_spectrum, mode, lora_factored, decay_or_rank
        As :class:`~braintrace.ParamDimVjpAlgorithm` (keyword-only here).
    vjp_method : ``'multi-step'``
        The only value: the estimate is injected at a window's exit.
    config : ETraceConfig, optional
        ``ETraceConfig(learning_signal='bootstrapped')`` by default; any ``'per_param'`` config with
        ``learning_signal='bootstrapped'`` (``temporal_recursion``, ``trace_filter`` as
        :class:`~braintrace.ParamDimVjpAlgorithm` computes them). The traces are contracted with
        the exact :math:`\partial L/\partial h` of the window, so :attr:`learning_signal` (the
        signal the engine contracts the traces with) is ``'symmetric'`` and :attr:`config` keeps
        ``'bootstrapped'``.

    Notes
    -----
    The estimate reaches the window through the model's outputs (a ``custom_vjp`` identity on
    them whose backward pass also emits :math:`g_k`): a loss must depend on the window's outputs,
    and each window is differentiated on its own (as the sequence drivers do). The paths with the
    ETP operands fixed are a second evaluation of the window's steps, so a window costs about
    twice D-RTRL's multi-step forward and backward pass.

    Examples
    --------
    >>> import brainstate, jax, jax.numpy as jnp, braintrace
    >>> class RNN(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    ...         self.w = brainstate.ParamState(jax.random.normal(k1, (2, 3)) * 0.5)  # ETP input weight
    ...         self.u = brainstate.ParamState(jax.random.normal(k2, (3, 3)) * 0.3)  # plain recurrence
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 3)))
    ...     def update(self, x):
    ...         self.h.value = jnp.tanh(braintrace.matmul(x, self.w.value) + self.h.value @ self.u.value)
    ...         return self.h.value
    >>> xs, ys = jnp.ones((6, 2, 2)), jnp.zeros((6, 2, 3))
    >>> loss = lambda out, y: jnp.sum((out - y) ** 2)
    >>> dni = braintrace.compile(RNN(), 'dni', xs[0], batch_size=2)
    >>> dni.config.learning_signal, dni.group_signal_shapes()
    ('bootstrapped', {0: (2, 3, 1)})
    >>> g_dni = dni.etrace_grad(xs, ys, step_fn=loss, window=2)
    >>> ref = braintrace.compile(RNN(), 'd_rtrl', xs[0], batch_size=2, vjp_method='multi-step')
    >>> g_ref = ref.etrace_grad(xs, ys, step_fn=loss, window=2)
    >>> all(bool(jnp.array_equal(g_dni[k], g_ref[k])) for k in g_ref)  # untrained: the plain rule
    True
    """

    def __init__(
        self,
        model,
        synthesizer: Optional[SyntheticGradient] = None,
        name: Optional[str] = None,
        vjp_method: str = "multi-step",
        fast_solve: bool = True,
        trace_dtype=None,
        chunked_trace: bool = True,
        control_flow=None,
        snap_max_jacobian_elements: int = 16_777_216,
        *,
        config: Optional[ETraceConfig] = None,
        normalize_matrix_spectrum: bool = False,
        mode=None,
        lora_factored: bool = False,
        decay_or_rank=0.9,
    ):
        if vjp_method != "multi-step":
            raise ValueError(
                f"DNI: the synthetic gradient is injected at the exit of a window of steps; `vjp_method` "
                f"must be 'multi-step', got {vjp_method!r}."
            )
        if synthesizer is not None and not isinstance(synthesizer, SyntheticGradient):
            raise TypeError(
                f"DNI: `synthesizer` must be a braintrace.SyntheticGradient or None, got "
                f"{type(synthesizer).__name__}."
            )
        if config is None:
            config = ETraceConfig(learning_signal="bootstrapped")
        if not isinstance(config, ETraceConfig):
            raise TypeError(f"DNI: `config` must be a braintrace.ETraceConfig, got {config!r}.")
        if config.learning_signal != "bootstrapped":
            raise ValueError(
                f"DNI: `config.learning_signal` must be 'bootstrapped' (a learned synthetic gradient), got "
                f"{config.learning_signal!r}; use braintrace.ParamDimVjpAlgorithm for the other signals."
            )
        super().__init__(
            model,
            name=name,
            vjp_method=vjp_method,
            fast_solve=fast_solve,
            trace_dtype=trace_dtype,
            chunked_trace=chunked_trace,
            control_flow=control_flow,
            config=config.replace(learning_signal="symmetric"),  # what the traces are contracted with
            snap_max_jacobian_elements=snap_max_jacobian_elements,
            lora_factored=lora_factored,
            decay_or_rank=decay_or_rank,
            normalize_matrix_spectrum=normalize_matrix_spectrum,
            mode=mode,
        )
        #: The rule's coordinates: D-RTRL's with ``learning_signal='bootstrapped'``.
        self.config = config
        #: The estimator of the future cotangent (:class:`SyntheticGradient`).
        self.synthesizer = synthesizer

    # the synthesiser -------------------------------------------------------------------------
    def group_signal_shapes(self) -> Dict[int, Tuple[int, ...]]:
        """``{group index: (*unit_shape, n)}`` of the compiled graph: the shapes a
        :class:`SyntheticGradient` maps."""
        if not self.is_compiled:
            raise RuntimeError("DNI is not compiled: call `compile_graph` (or braintrace.compile) first.")
        return {g.index: (*g.shape, g.num_state) for g in self.graph.hidden_groups}

    def attach_synthesizer(self, synthesizer: SyntheticGradient) -> None:
        """Use ``synthesizer`` from the next window on (its groups must match
        :meth:`group_signal_shapes` once compiled)."""
        if not isinstance(synthesizer, SyntheticGradient):
            raise TypeError(
                f"DNI.attach_synthesizer: `synthesizer` must be a braintrace.SyntheticGradient, got "
                f"{type(synthesizer).__name__}."
            )
        if self.is_compiled:
            self._check_synthesizer(synthesizer)
        self.synthesizer = synthesizer
        for name in _LOOP_CACHES:  # compiled loops keep the state objects they traced
            self.__dict__.pop(name, None)

    def _check_synthesizer(self, synthesizer):
        shapes = self.group_signal_shapes()
        if not synthesizer.fits(shapes):
            raise ValueError(
                f"DNI: `synthesizer` maps the groups {synthesizer.group_shapes}, but the compiled graph has "
                f"{shapes} (the last unit axis and the number of states must match); build it with "
                f"braintrace.SyntheticGradient(learner.group_signal_shapes())."
            )

    def _build(self):
        super()._build()
        if self.synthesizer is None:
            dtype = jnp.result_type(*[g.dtype for g in self.graph.hidden_groups])
            self.synthesizer = SyntheticGradient(self.group_signal_shapes(), dtype=dtype)
        else:
            self._check_synthesizer(self.synthesizer)

    def _grouped(self, leaves) -> Dict[int, jax.Array]:
        """``{group index: (*unit_shape, n)}`` from the flat state leaves ``leaves``."""
        out = {}
        for g in self.graph.hidden_groups:
            vals = [
                leaves[h.leaf] if h.slot is None else leaves[h.leaf][..., h.slot] for h in g.hidden_leaves
            ]
            out[g.index] = jnp.stack(vals, axis=-1)
        return out

    # the window ------------------------------------------------------------------------------
    def _exit_with_etp_operands_fixed(self, entry_leaves, inputs):
        """The state leaves after the window's steps from ``entry_leaves``, differentiable along
        every path but through the relations' trainable operands (their gradient is stopped)."""
        ex = self.executor
        relations = {r.eqn_index: r for r in self.graph.hidden_param_op_relations}

        def fixed_operands(i, eqn, invals):
            r = relations.get(i)
            if r is None:
                return None
            invals = list(invals)
            for idx in r.trainable_invar_indices.values():
                invals[idx] = jax.lax.stop_gradient(invals[idx])
            return bind_equation(eqn, invals)

        leaves, stepped = split_window(*inputs)
        seq = [leaf for leaf, s in zip(leaves, stepped) if s]

        def body(cur, seq_t):
            it = iter(seq_t)
            args = [next(it) if s else leaf for leaf, s in zip(leaves, stepped)]
            _, new, _ = ex.evaluate(cur, args, eqn_hook=fixed_operands)
            return new, None

        final, _ = jax.lax.scan(body, list(entry_leaves), seq)
        return final

    def _window(self, inputs, stacked: bool):
        r"""D-RTRL's window (:meth:`ETraceVjpAlgorithm._window`), its outputs carrying the
        synthesiser's estimate as the cotangent of the exit hidden values (see the class docstring)."""
        _, entry = self._current_states()
        outs = super()._window(inputs, stacked)
        exits = self._grouped(self._exit_with_etp_operands_fixed(entry, inputs))
        seen = {gi: jax.lax.stop_gradient(h) for gi, h in exits.items()}
        estimate = self.synthesizer.apply(self.synthesizer.param_values(), seen)
        estimate = {gi: jax.lax.stop_gradient(e).astype(exits[gi].dtype) for gi, e in estimate.items()}
        leaves, tree = jax.tree.flatten(outs)
        inexact = [i for i, o in enumerate(leaves) if jnp.issubdtype(jnp.result_type(o), jnp.inexact)]
        if not inexact:  # no output a loss could be differentiated through
            return outs
        tapped = _exit_tap([leaves[i] for i in inexact], exits, estimate)
        for i, o in zip(inexact, tapped):
            leaves[i] = o
        return jax.tree.unflatten(tree, leaves)

    def _step_grad(self, step_fn, params, inputs, targets, factored=False):
        """One step of ``etrace_train``: a window of one step (not the single-step rule)."""
        if factored:  # pragma: no cover - solve_every > 1 is refused for this engine first
            raise ValueError("DNI forms its gradients per window; `solve_every` must be 1.")
        return ETraceAlgorithm._step_grad(self, step_fn, params, inputs, targets)


# ------------------------------------------------------------------------------------------------
# fitting the synthesiser
# ------------------------------------------------------------------------------------------------


def _as_args(inputs) -> Tuple:
    """The model's positional arguments as sequences ``(T, ...)``: a tuple is several, else one."""
    return tuple(inputs) if isinstance(inputs, tuple) else (inputs,)


def _optimizer_kind(optimizer) -> str:
    if optimizer is None:
        return "sgd"
    if callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None)):
        return "optax"
    if callable(getattr(optimizer, "update", None)):
        return "stateful"
    raise TypeError(
        f"train_synthetic_gradient: `optimizer` must be None (plain SGD with `lr`), an optax-style "
        f"GradientTransformation (init(params), update(grads, state, params)), or an optimizer with "
        f"update(grads) registered against learner.synthesizer.states_dict(); got "
        f"{type(optimizer).__name__}."
    )


def _sum_of_squares(out):
    return sum(jnp.sum(o**2) for o in jax.tree.leaves(out))


def _sum_of_squared_errors(out, target):
    return sum(jnp.sum((o - t) ** 2) for o, t in zip(jax.tree.leaves(out), jax.tree.leaves(target)))


def train_synthetic_gradient(
    learner: DNI,
    inputs,
    *,
    chunk_size: int = 1,
    loss_fn: Optional[Callable] = None,
    optimizer=None,
    lr: float = 1e-2,
    epochs: int = 1,
    reset: bool = True,
    batch_size: Optional[int] = None,
    targets=None,
) -> list:
    r"""Fit ``learner.synthesizer`` by regression on bootstrapped targets; the model does not change.

    The sequence is run in windows of ``chunk_size`` steps :math:`[a_k, b_k)`. For each window the
    target of the prediction at its entry is the cotangent of the entry hidden values of the
    window's loss, with the synthesiser's own estimate at the exit (Jaderberg et al. 2017):

    .. math::
        \hat g_{a_k} = \frac{\partial L_k}{\partial h_{a_k}}
        + \Big(\frac{\partial h_{b_k}}{\partial h_{a_k}}\Big)^\top \operatorname{sg}(M(h_{b_k})),
        \qquad
        E_k = \sum_g \operatorname{mean}\big(M_g(h_{a_k}) - \operatorname{sg}(\hat g_{a_k})\big)^2,

    and one optimizer step on :math:`E_k` follows each window. After the last window, the final
    hidden values are fitted to the target 0 (nothing follows them). The windows must be those the
    learner is then trained with (the same ``chunk_size`` and the same loss): the synthesiser
    estimates the future of a window boundary of that loss.

    Parameters
    ----------
    learner : DNI
        Compiled.
    inputs : array or tuple of arrays
        ``(T, ...)``: the model's argument (a tuple: its positional arguments), consumed
        ``chunk_size`` steps at a time.
    chunk_size : int
        Steps per window; must divide ``T``. A window of one step is an unstacked call
        (``learner(x_t)``), a longer one a :class:`~braintrace.MultiStepData` call.
    loss_fn : callable, optional
        ``loss_fn(output) -> scalar`` (``loss_fn(output, target)`` with ``targets``), where
        ``output`` is the window's output (stacked ``(chunk_size, ...)`` when ``chunk_size > 1``).
        Default: the sum of squares of the output (of ``output - target`` with ``targets``).
    optimizer : optional
        ``None``: plain SGD with step ``lr``. An optax-style ``GradientTransformation``
        (``init``/``update(grads, state, params)``; its state starts anew at each call), or an
        object with ``update(grads)`` that updates the synthesiser's states itself (registered
        against ``learner.synthesizer.states_dict()``); the gradients are keyed as that dict.
    lr : float
        The SGD step (``optimizer=None`` only).
    epochs : int
        Passes over the sequence.
    reset : bool
        Start every pass from the same states, the traces zeroed: the model's compile-time values
        (for inputs of this shape), or, with ``batch_size``, the values
        ``brainstate.nn.init_all_states(model, batch_size=...)`` gives once, before the first pass.
        ``False``: each pass continues from the states the previous one left.
    batch_size : int, optional
        See ``reset`` (the learner compiles its graph again when the batch size changes).
    targets : array or pytree, optional
        ``(T, ...)``: per-step targets, passed to ``loss_fn`` window by window.

    Returns
    -------
    list of float
        Per epoch, the mean of :math:`E_k` over the windows and the final state, each taken before
        its optimizer step. The targets move with :math:`M` (they contain its estimate at the
        exits): while :math:`M` picks up the future, the targets grow and so may this error; what
        falls is the error against the targets of the current :math:`M` relative to that of
        :math:`M = 0`.

    Raises
    ------
    TypeError
        ``learner`` not a :class:`DNI`; an argument of the wrong type.
    ValueError
        ``learner`` not compiled; ``chunk_size`` not dividing ``T``; inputs of different lengths;
        a non-positive ``lr``, ``epochs`` or ``batch_size``.

    Examples
    --------
    >>> import brainstate, jax, jax.numpy as jnp, braintrace
    >>> class Leaky(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    ...         self.w = brainstate.ParamState(jax.random.normal(k1, (2, 4)) * 0.5)
    ...         self.u = brainstate.ParamState(jax.random.normal(k2, (4, 4)) * 0.2)
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 4)))
    ...     def update(self, x):
    ...         h = self.h.value
    ...         self.h.value = 0.8 * h + h @ self.u.value + braintrace.matmul(x, self.w.value)
    ...         return self.h.value
    >>> learner = braintrace.compile(Leaky(), 'dni', jnp.zeros((8, 2)), batch_size=8)
    >>> xs = jax.random.normal(jax.random.PRNGKey(2), (12, 8, 2))
    >>> errors = braintrace.train_synthetic_gradient(learner, xs, chunk_size=3, lr=0.05, epochs=5)
    >>> len(errors), bool(jnp.any(learner.synthesizer.weights[0].value != 0))
    (5, True)
    >>> loss = lambda out: jnp.sum(out**2)  # the loss and the windows the synthesiser was fitted for
    >>> grads = learner.etrace_grad(xs, step_fn=loss, window=3)
    >>> grads[('u',)].shape
    (4, 4)
    """
    where = "train_synthetic_gradient"
    if not isinstance(learner, DNI):
        raise TypeError(f"{where}: `learner` must be a braintrace.DNI, got {type(learner).__name__}.")
    if not learner.is_compiled:
        raise ValueError(f"{where}: `learner` is not compiled; call `learner.compile_graph(x0)` first.")
    args = _as_args(inputs)
    lengths = set()
    for a in jax.tree.leaves(args):
        if jnp.ndim(a) == 0:
            raise ValueError(f"{where}: `inputs` must have a leading time axis (T, ...), got a scalar.")
        lengths.add(int(jnp.shape(a)[0]))
    if len(lengths) != 1:
        raise ValueError(
            f"{where}: every array of `inputs` must have the same length T, got {sorted(lengths)}."
        )
    (length,) = lengths
    if targets is not None:
        t_lengths = {int(jnp.shape(a)[0]) if jnp.ndim(a) else None for a in jax.tree.leaves(targets)}
        if t_lengths != {length}:
            raise ValueError(
                f"{where}: `targets` must have the leading time axis of `inputs` (T={length}), got lengths "
                f"{sorted(t_lengths, key=str)}."
            )
    k = _int_at_least(chunk_size, "chunk_size", 1, where)
    if length % k:
        raise ValueError(
            f"{where}: `chunk_size={k}` must divide the sequence length {length} (the synthesiser is fitted "
            f"at the boundaries of windows of that length); trim the sequence to {length - length % k} "
            f"steps or pick another chunk_size."
        )
    if loss_fn is None:
        loss_fn = _sum_of_squares if targets is None else _sum_of_squared_errors
    elif not callable(loss_fn):
        raise TypeError(f"{where}: `loss_fn` must be callable, got {loss_fn!r}.")
    kind = _optimizer_kind(optimizer)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"{where}: `lr` must be a positive float, got {lr!r}.")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{where}: `lr` must be a positive finite float, got {lr}.")
    epochs = _int_at_least(epochs, "epochs", 1, where)
    if not isinstance(reset, bool):
        raise TypeError(f"{where}: `reset` must be a bool, got {reset!r}.")
    if batch_size is not None:
        batch_size = _int_at_least(batch_size, "batch_size", 1, where)

    n_windows = length // k
    windows = jax.tree.map(lambda a: a.reshape((n_windows, k) + a.shape[1:]), args)
    window_targets = (
        None if targets is None else jax.tree.map(lambda a: a.reshape((n_windows, k) + a.shape[1:]), targets)
    )
    synth = learner.synthesizer
    synth_states = synth.states_dict()
    opt_state = optimizer.init(synth.param_values()) if kind == "optax" else None

    def fit(entry, target, opt_state):
        def error(values):
            pred = synth.apply(values, entry)
            return sum(jnp.mean((pred[g] - target[g]) ** 2) for g in sorted(entry))

        values = synth.param_values()
        err, grads = jax.value_and_grad(error)(values)
        if kind == "sgd":
            for key, st in synth_states.items():
                st.value = st.value - lr * grads[key]
        elif kind == "optax":
            updates, opt_state = optimizer.update(grads, opt_state, values)
            for key, st in synth_states.items():
                st.value = st.value + updates[key]
        else:
            optimizer.update(grads)
        return err, opt_state

    def epoch(opt_state, windows, window_targets, start):
        if start is not None:  # the states' values at the start of every pass, traces zeroed
            learner._write_values(start)
            learner._reset_traces()
        states, _ = learner._current_states()
        info = learner.graph.module_info
        hidden = {h.state_index: states[h.state_index] for h in info.hidden_leaves}

        def leaf_values(by_state):
            leaves = [None] * info.num_state_leaves
            for i, value in by_state.items():
                start = info.state_leaf_ranges[i][0]
                for j, leaf in enumerate(jax.tree.leaves(value)):
                    leaves[start + j] = leaf
            return leaves

        def one_window(opt_state, data):
            xs_w, ys_w = data
            entry = learner._grouped(leaf_values({i: st.value for i, st in hidden.items()}))
            window = xs_w if k > 1 else jax.tree.map(lambda a: a[0], xs_w)
            if k > 1:
                window = tuple(MultiStepData(a) for a in window)
            call = lambda: learner(*window)  # noqa: E731
            if ys_w is None:
                objective = lambda: loss_fn(call())  # noqa: E731
            else:
                y = ys_w if k > 1 else jax.tree.map(lambda a: a[0], ys_w)
                objective = lambda: loss_fn(call(), y)  # noqa: E731
            cts = brainstate.transform.grad(objective, hidden)()
            target = jax.lax.stop_gradient(learner._grouped(leaf_values(cts)))
            entry = jax.lax.stop_gradient(entry)
            err, opt_state = fit(entry, target, opt_state)
            return opt_state, err

        opt_state, errs = brainstate.transform.scan(one_window, opt_state, (windows, window_targets))
        final = jax.lax.stop_gradient(
            learner._grouped(leaf_values({i: st.value for i, st in hidden.items()}))
        )
        last, opt_state = fit(final, {g: jnp.zeros_like(v) for g, v in final.items()}, opt_state)
        return opt_state, jnp.mean(jnp.concatenate([errs, last[None]]))

    # one compiled pass per configuration, kept with the learner: a loop alternating the
    # synthesiser's fit and the model's training does not compile every call
    compiled = learner._driver_cache("_synthetic_gradient_cache")
    start = None
    if reset and batch_size is not None:
        brainstate.nn.init_all_states(learner.model, batch_size=batch_size)
        learner.follow_shapes(*jax.tree.map(lambda a: a[0], args))
        start = [s.value for s in learner._current_states()[0]]
    elif reset:
        learner.follow_shapes(*jax.tree.map(lambda a: a[0], args), reset=True)
        start = learner._initial_values
    key = (
        loss_fn,
        kind,
        id(optimizer),
        float(lr),
        k,
        id(learner.graph),
        tuple(id(s) for s in learner._current_states()[0]),
        tuple(id(s) for s in synth_states.values()),
    )
    if key not in compiled:
        compiled[key] = brainstate.transform.jit(epoch)
    history = []
    for _ in range(epochs):
        opt_state, err = compiled[key](opt_state, windows, window_targets, start)
        history.append(float(err))
    return history
