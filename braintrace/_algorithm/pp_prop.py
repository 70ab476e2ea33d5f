r"""ES-D-RTRL / pp_prop: input-output eligibility traces in ``O(B (I + O))`` memory.

For each relation ``y = f(x, \theta)`` and hidden group with per-unit block ``D_t``:

.. math::
    \epsilon_x \leftarrow \lambda\,\epsilon_x + x_t, \qquad
    \epsilon_f \leftarrow \lambda\,D_t\,\epsilon_f + (1-\lambda)\,df_t,

    \nabla_\theta L_t = \mathrm{xy\_to\_dw}\!\left(\epsilon_x,\;
        \sum_s \frac{\partial L_t}{\partial h_{t,s}} \odot \frac{\epsilon_{f,s}}{1-\lambda^{t+1}}\right).

Keys that need no ``x`` (``bias``, and every key of an input-free primitive such as
``element_wise``) keep the exact per-unit trace :math:`\epsilon \leftarrow D_t\epsilon + df_t`
(the same memory as :math:`\epsilon_f`) and are solved with ``xy_to_dw`` of that trace.

Both output-side traces depend on the relation only through :math:`df_t`. Relations whose outputs
are added together before anything else reads them (``tanh(x W_in + h W_rec)``) have the same
:math:`df_t`, so they share one :math:`\epsilon_f` and one exact trace
(:meth:`IODimVjpAlgorithm._trace_owners`).

``decay_or_rank``: a float is :math:`\lambda \in (0, 1)`; an int ``r > 0`` means
:math:`\lambda = (r-1)/(r+1)`; a pair sets the input and output sides apart,
:math:`(\lambda_x, \lambda_f)` (the ``trace_factorization='io_factorized'`` coordinates of
:class:`~braintrace.ETraceConfig`, whose ``temporal_recursion`` pair also selects the output
side's operator: :math:`D_t` (``'jacobian'``), :math:`I` (``'scalar_leak'``) or 0 (``'none'``);
the exact keys then follow :math:`\epsilon \leftarrow D_t\epsilon + df_t`,
:math:`\lambda_f\epsilon + df_t` or :math:`df_t`).

The bias correction :math:`1-\lambda^{t+1}` is not formed from a power of :math:`\lambda`: the
output traces carry their normaliser :math:`c \leftarrow \lambda\,c + (1-\lambda)` (a scalar, in the
traces' dtype, with the same arithmetic as :math:`\epsilon_f`), which equals
:math:`1-\lambda^{t+1}` in exact arithmetic, and the solve divides by it. Its value depends only on
:math:`\lambda` and the steps since the last restart, and every trace restarts together (one
scalar ``keep``), so the output traces of one dtype share one. The ratio
:math:`\epsilon_f / c` is then exact to rounding for every :math:`\lambda`: ``1 - lam ** t`` loses
all its digits to cancellation when :math:`\lambda` is within a few ulps of 1 (``0.99999999`` is
``1.0`` in float32: an infinite gradient). A :math:`\lambda` the trace dtype rounds to 1 acts as
:math:`\lambda = 1`: :math:`\epsilon_x` a running sum and :math:`\epsilon_f / c` a running mean.
"""

from __future__ import annotations

import numbers
from typing import Dict

import jax
import jax.numpy as jnp

from braintrace._compiler.sum_roots import sum_roots
from braintrace._etrace_op._registries import BATCHED_PRIMITIVES, ETP_PP_X_REPR, ETP_X_INVAR_INDICES, get_rule
from braintrace._etrace_op._trace_ops import rule_kwargs

from .axes import ETraceConfig
from .executor import StepValues
from .vjp_algorithm import ETraceVjpAlgorithm

__all__ = ["IODimVjpAlgorithm", "ES_D_RTRL", "pp_prop", "decay_from_decay_or_rank"]


def decay_from_decay_or_rank(decay_or_rank) -> float:
    """``lambda`` from a float in (0, 1) or an int rank ``r > 0`` (``(r - 1) / (r + 1)``).

    Raises ``ValueError`` for a value outside these ranges, including a rank so large that
    ``(r - 1) / (r + 1)`` rounds to ``1.0`` in float64 (``r`` above about ``2**55``).
    """
    if isinstance(decay_or_rank, bool) or not isinstance(decay_or_rank, numbers.Real):
        raise TypeError(f"`decay_or_rank` must be a float in (0, 1) or an int > 0, got {decay_or_rank!r}.")
    if isinstance(decay_or_rank, numbers.Integral):
        rank = int(decay_or_rank)
        if rank <= 0:
            raise ValueError(f"`decay_or_rank` as a rank must be an int > 0, got {decay_or_rank}.")
        lam = (rank - 1) / (rank + 1)
        if not lam < 1.0:
            raise ValueError(
                f"`decay_or_rank` as a rank gives lambda = (r - 1) / (r + 1), which must be below 1; "
                f"got r = {rank}, for which it rounds to {lam} in float64."
            )
        return lam
    lam = float(decay_or_rank)
    if not 0.0 < lam < 1.0:
        raise ValueError(f"`decay_or_rank` as a decay must lie in (0, 1), got {lam}.")
    return lam


def _decay_pair(decay_or_rank):
    """``(lambda_x, lambda_f)`` from one decay or rank, or from a pair of them."""
    if isinstance(decay_or_rank, (tuple, list)):
        if len(decay_or_rank) != 2:
            raise ValueError(f"`decay_or_rank` as a pair must be (x_side, f_side), got {decay_or_rank!r}.")
        return tuple(decay_from_decay_or_rank(v) for v in decay_or_rank)
    lam = decay_from_decay_or_rank(decay_or_rank)
    return (lam, lam)


def _contract(d, e):
    """``(D e)[..., s] = sum_j D[..., s, j] e[..., j]``, as products and a sum over ``j`` (one fusion;
    as an ``einsum`` XLA:CPU makes it a batched dot of ``n x n`` matrices, one library call per step
    for each trace)."""
    return jnp.sum(d * jnp.expand_dims(e, -2), axis=-1)


def _norm_key(dtype) -> str:
    """The key of the normaliser ``c`` of the output traces of ``dtype``: it depends only on
    ``lambda_f``, the dtype and the steps since the last restart, so those traces share it."""
    return f"c_{jnp.dtype(dtype).name}"


def _is_norm_key(key: str) -> bool:
    return key.startswith("c_")


def _exact_keys(relation):
    if ETP_X_INVAR_INDICES.get(relation.primitive, 0) is None:
        return tuple(relation.trainable_vars)
    return tuple(k for k in relation.trainable_vars if k == "bias")


def _xy_to_dw(relation, x, g, weights, kwargs, batch_ndim):
    """``xy_to_dw`` summed over the batch axes ``y`` does not carry itself."""
    rule = get_rule(relation.primitive, "xy_to_dw")
    if relation.primitive in BATCHED_PRIMITIVES or batch_ndim == 0:
        return rule(x, g, weights, **kwargs)
    fn = lambda gb: rule(x, gb, weights, **kwargs)
    for _ in range(batch_ndim):
        fn = jax.vmap(fn)
    out = fn(g)
    return jax.tree.map(lambda a: a.sum(axis=tuple(range(batch_ndim))), out)


class IODimVjpAlgorithm(ETraceVjpAlgorithm):
    r"""ES-D-RTRL / pp_prop (input-output eligibility traces).

    Parameters
    ----------
    model : brainstate.nn.Module
    decay_or_rank : float, int or pair
        ``lambda`` in (0, 1), or an int rank ``r > 0`` meaning ``lambda = (r-1)/(r+1)``; a pair
        ``(lambda_x, lambda_f)`` sets the two sides apart.
    name : str, optional
    vjp_method, fast_solve, normalize_matrix_spectrum, mode, control_flow, random_feedback_key
        See :class:`~braintrace.ETraceVjpAlgorithm`.
    config : ETraceConfig, optional
        An ``trace_factorization='io_factorized'`` config; its ``decay`` pair and
        ``temporal_recursion`` pair then define the traces (``decay_or_rank`` must agree with it
        or be left at its default).

    Examples
    --------
    >>> import brainstate, jax, jax.numpy as jnp, braintrace
    >>> class Leaky(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = brainstate.ParamState(jnp.ones((2, 3)) * 0.1)
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 3)))
    ...     def update(self, x):
    ...         self.h.value = 0.9 * self.h.value + braintrace.matmul(x, self.w.value)
    ...         return self.h.value
    >>> model = Leaky(); _ = brainstate.nn.init_all_states(model, batch_size=4)
    >>> alg = braintrace.pp_prop(model, decay_or_rank=0.9)
    >>> _ = alg.compile_graph(jnp.zeros((4, 2)))
    >>> params = model.states(brainstate.ParamState)
    >>> g = brainstate.transform.grad(lambda x: alg(x).sum(), params)(jnp.ones((4, 2)))
    >>> g[('w',)].shape
    (2, 3)
    """

    def __init__(
        self,
        model,
        decay_or_rank=0.9,
        name=None,
        vjp_method: str = "single-step",
        fast_solve: bool = True,
        control_flow=None,
        config=None,
        random_feedback_key=None,
        *,
        normalize_matrix_spectrum: bool = False,
        mode=None,
    ):
        pair = _decay_pair(decay_or_rank)
        if config is None:
            config = ETraceConfig(trace_factorization="io_factorized", decay=pair)
        elif (
            isinstance(config, ETraceConfig)
            and config.is_factorized
            and decay_or_rank != 0.9
            and tuple(config.decay) != pair
        ):
            raise ValueError(
                f"{type(self).__name__}: `decay_or_rank={decay_or_rank!r}` (decays {pair}) disagrees with "
                f"config.decay={config.decay}; give the decays once (in the config)."
            )
        super().__init__(
            model,
            name=name,
            vjp_method=vjp_method,
            fast_solve=fast_solve,
            normalize_matrix_spectrum=normalize_matrix_spectrum,
            mode=mode,
            control_flow=control_flow,
            config=config,
            random_feedback_key=random_feedback_key,
        )
        #: The input side's decay :math:`\lambda_x` and the output side's :math:`\lambda_f`.
        self.decay_x, self.decay_f = self.config.decay
        #: Where the input traces live (a ``jax.sharding.Sharding``) when the learner is placed on a
        #: mesh (:func:`braintrace.shard_postsynaptic` replicates them: every block's solve reads its
        #: presynaptic rows, so they are formed from the gathered input, not gathered again); ``None``:
        #: where XLA puts them.
        self.input_trace_sharding = None

    _factorization = "io_factorized"

    @property
    def decay(self) -> float:
        r""":math:`\lambda` when both sides share it (``AttributeError`` otherwise: read
        :attr:`decay_x` and :attr:`decay_f`)."""
        if self.decay_x != self.decay_f:
            raise AttributeError(
                f"{type(self).__name__} has two decays (x-side {self.decay_x}, f-side {self.decay_f}); read "
                f"`decay_x` / `decay_f`."
            )
        return self.decay_x

    def _recursion_operator(self):
        """The output side's operator (its decay multiplies it in the update)."""
        return self.config.temporal_recursion[1], 1.0

    def _relation_groups(self):
        for r in self.graph.hidden_param_op_relations:
            for gi, g in enumerate(r.hidden_groups):
                yield r, gi, g

    def _needs_x(self, r):
        return r.x_var is not None and len(_exact_keys(r)) < len(r.trainable_vars)

    @staticmethod
    def _x_filtered(r, x, weights):
        """What the input trace filters for relation ``r``: its input ``x``, or the real-valued
        representation its primitive declares (:data:`ETP_PP_X_REPR`: an embedding's one-hot rows),
        in a floating dtype (a decayed sum of integer indices or boolean spikes kept in their own
        dtype would be truncated)."""
        repr_fn = ETP_PP_X_REPR.get(r.primitive)
        x = repr_fn(x, weights) if repr_fn is not None else x
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            x = x.astype(r.y_var.aval.dtype)
        return x

    def _restarts_per_unit(self) -> bool:
        """Every trace restarts together: the input traces are per batch row, not per unit, and the
        output traces share their normaliser ``c``."""
        return False

    def _init_trace_values(self) -> Dict:
        vals = {}
        for r in self.graph.hidden_param_op_relations:
            if self._needs_x(r):
                aval = lambda v: jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)  # noqa: E731
                w = {k: aval(v) for k, v in r.trainable_vars.items()}
                shape = jax.eval_shape(lambda x, w: self._x_filtered(r, x, w), aval(r.x_var), w)
                vals[f"x{r.index}"] = jnp.zeros(shape.shape, shape.dtype)
        for r, gi, g in self._relation_groups():
            n = g.num_state
            if self._needs_x(r):
                dtype = self._f_dtype(r, n)
                vals[self._f_key(r, gi)] = jnp.zeros((*g.shape, n), dtype)
                vals[_norm_key(dtype)] = jnp.zeros((), dtype)  # the normaliser 1 - lambda^t
            if _exact_keys(r):
                vals[self._e_key(r, gi)] = jnp.zeros((*g.shape, n), r.y_var.aval.dtype)
        return vals

    @staticmethod
    def _f_dtype(r, n):
        """The dtype of relation ``r``'s output-side trace (its primitive's ``init_pp``)."""
        return get_rule(r.primitive, "init_pp")(r.x_var, r.y_var, dict(r.trainable_vars), n).dtype

    def _trace_owners(self) -> Dict[int, Dict[str, int]]:
        """``{relation index: {'f': owner, 'e': owner}}``: the relation whose output-side traces a
        relation uses, its own index unless it shares them.

        Both output-side traces of a relation and hidden group are functions of ``D`` and
        :math:`df = \\partial h/\\partial y` alone. Relations whose outputs have one sum root
        (:func:`~braintrace._compiler.sum_roots.sum_roots`: added together before anything else reads
        them, as ``tanh(x W_in + h W_rec)``) have the same ``df``, so those with the same hidden
        groups and trace dtype keep one ``f`` trace (those that need ``x``) and one exact trace (those
        with exact keys, e.g. ``bias``), owned by the first of them. Relations whose ``df`` is not
        read from the cut step (``element_wise``) keep their own.
        """
        graph = self.graph
        cached = getattr(self, "_trace_owner_cache", None)
        if cached is not None and cached[0] is graph:
            return cached[1]
        ex = self.executor
        cut = set(ex.cut_eqns)
        relations = [
            r
            for r in graph.hidden_param_op_relations
            if r.eqn_index in cut and ex.jaxpr.eqns[r.eqn_index].outvars[0] is r.y_var
        ]
        roots = sum_roots(ex.jaxpr, [r.y_var for r in relations])
        groups = lambda r: tuple(g.index for g in r.hidden_groups)  # noqa: E731
        owners = {r.index: {"f": r.index, "e": r.index} for r in graph.hidden_param_op_relations}
        first: Dict = {}
        for r in relations:
            n = tuple(g.num_state for g in r.hidden_groups)
            if self._needs_x(r):
                key = ("f", roots[r.y_var], groups(r), tuple(self._f_dtype(r, k) for k in n))
                owners[r.index]["f"] = first.setdefault(key, r.index)
            if _exact_keys(r):
                key = ("e", roots[r.y_var], groups(r), r.y_var.aval.dtype)
                owners[r.index]["e"] = first.setdefault(key, r.index)
        self._trace_owner_cache = (graph, owners)
        return owners

    def _f_key(self, r, gi) -> str:
        """The key of the ``f`` trace relation ``r`` uses for its ``gi``-th hidden group."""
        return f"f{self._trace_owners()[r.index]['f']}_g{gi}"

    def _e_key(self, r, gi) -> str:
        """The key of the exact trace every exact key of relation ``r`` uses for its ``gi``-th group
        (named after its owner's first exact key)."""
        owner = self._trace_owners()[r.index]["e"]
        (owner_relation,) = [o for o in self.graph.hidden_param_op_relations if o.index == owner]
        return f"e{owner}_g{gi}_{_exact_keys(owner_relation)[0]}"

    def _update_traces(self, traces: Dict, step: StepValues) -> Dict:
        lam_x, lam = self.decay_x, self.decay_f
        # the exact keys' operator: D ('jacobian'), lambda_f I ('scalar_leak'; step.d is I), 0
        exact_scale = lam if self.config.temporal_recursion[1] == "scalar_leak" else 1.0
        new = {}
        for r in self.graph.hidden_param_op_relations:
            if self._needs_x(r):
                k = f"x{r.index}"
                x = self._x_filtered(r, step.xs[r.index], step.weights[r.index])
                new[k] = (lam_x * traces[k] + x).astype(traces[k].dtype)
                if self.input_trace_sharding is not None:
                    new[k] = jax.lax.with_sharding_constraint(new[k], self.input_trace_sharding)
        for r, gi, g in self._relation_groups():
            d, df = step.d[g.index], step.df[(r.index, gi)]
            k = self._f_key(r, gi)
            if self._needs_x(r) and k not in new:  # a shared trace is updated once
                new[k] = (lam * _contract(d, traces[k]) + (1 - lam) * df).astype(traces[k].dtype)
            k = self._e_key(r, gi) if _exact_keys(r) else None
            if k is not None and k not in new:
                new[k] = (exact_scale * _contract(d, traces[k]) + df).astype(traces[k].dtype)
        for k in traces:  # the normalisers, with the same arithmetic as eps_f: eps_f / c is exact
            if _is_norm_key(k):
                new[k] = (lam * traces[k] + (1 - lam)).astype(traces[k].dtype)
        return new

    def _solve(self, traces, cts, weights, aux):
        return self._solve_parts(traces, cts, weights, aux, factored=())[0]

    def _solve_parts(self, traces, cts, weights, aux, factored):
        """``(gradients, factors)``: for a relation in ``factored`` (indices), the gradient of its
        ``x``-dependent keys is returned as the factor pair ``(epsilon_x, g)`` of
        ``xy_to_dw(epsilon_x, g)`` instead (see :meth:`_solve_factors`)."""
        grads, factors = {}, {}
        # 1 - lambda^t, accumulated like eps_f (steps taken, this one included); 0 only for traces
        # that have seen no step (all zero, e.g. the previous step's at the first step), which
        # contribute nothing
        correction = {
            k: jnp.where(c == 0, jnp.ones_like(c), c) for k, c in traces.items() if _is_norm_key(k)
        }
        for r, gi, g in self._relation_groups():
            ct = cts[(r.index, gi)]
            kwargs = rule_kwargs(r.params, aux[r.index])
            bnd = r.batch_ndims[gi]
            x_tr = traces[f"x{r.index}"] if self._needs_x(r) else None
            part = {}
            if self._needs_x(r):
                f = traces[self._f_key(r, gi)]
                gsig = (ct * f).sum(-1) / correction[_norm_key(f.dtype)]
                if r.index in factored:
                    # xy_to_dw is linear in its cotangent: the groups' cotangents add up.
                    prev = factors.get(r.index)
                    factors[r.index] = (x_tr, gsig if prev is None else prev[1] + gsig)
                else:
                    full = _xy_to_dw(r, x_tr, gsig, weights[r.index], kwargs, bnd)
                    part.update({k: v for k, v in full.items() if k not in _exact_keys(r)})
            for key in _exact_keys(r):
                gk = (ct * traces[self._e_key(r, gi)]).sum(-1)
                x_for = (
                    x_tr
                    if x_tr is not None
                    else (jnp.zeros(r.x_var.aval.shape, r.x_var.aval.dtype) if r.x_var is not None else None)
                )
                part[key] = _xy_to_dw(r, x_for, gk, weights[r.index], kwargs, bnd)[key]
            prev = grads.get(r.index)
            grads[r.index] = part if prev is None else jax.tree.map(jnp.add, prev, part)
        return grads, factors

    # weight gradients formed once per block of steps (``etrace_grad(..., solve_every=K)``) ------
    def _factored_relations(self):
        """Relations whose ``x``-dependent gradient can be formed once for many steps: a batched
        primitive (its ``xy_to_dw`` sums over the leading batch axis, so ``K`` steps stacked along
        it give the sum of their gradients in one product) whose operands stay fixed over the
        sequence (so the summed gradient routes to the parameters like one step's)."""
        fixed = {r.index for r in self.executor.constant_operand_relations()}
        return tuple(
            r
            for r in self.graph.hidden_param_op_relations
            if self._needs_x(r) and r.primitive in BATCHED_PRIMITIVES and r.index in fixed
        )

    def _update_solve_factored(self, traces, step: StepValues, cts):
        """``(new traces, gradients, factors)``: :meth:`_update_and_solve` with the gradients of
        :meth:`_factored_relations`' ``x``-dependent keys left as factors."""
        new = self._update_traces(traces, step)
        factored = {r.index for r in self._factored_relations()}
        grads, factors = self._solve_parts(new, cts, step.weights, step.aux, factored)
        return new, grads, factors

    def _solve_factors(self, relations, factors, weights, aux):
        r"""Gradients from factors stacked over ``K`` steps: ``x (K, B, ...)``, ``g (K, B, ...)``.

        :math:`\sum_k \mathrm{xy\_to\_dw}(x_k, g_k) = \mathrm{xy\_to\_dw}(x_{1..K}, g_{1..K})` with
        the steps folded into the batch axis: one product of ``K B`` rows (one GEMM for a dense
        layer, one SDDMM for a sparse one) instead of ``K`` products of ``B`` rows.
        """
        out = {}
        for r in relations:
            x, g = factors[r.index]
            x = x.reshape((-1,) + x.shape[2:])
            g = g.reshape((-1,) + g.shape[2:])
            kwargs = rule_kwargs(r.params, aux[r.index])
            full = get_rule(r.primitive, "xy_to_dw")(x, g, weights[r.index], **kwargs)
            out[r.index] = {k: v for k, v in full.items() if k not in _exact_keys(r)}
        return out


#: Public names of :class:`IODimVjpAlgorithm`.
ES_D_RTRL = IODimVjpAlgorithm


def pp_prop(model, decay_or_rank=0.9, name=None, vjp_method="single-step", **kwargs) -> IODimVjpAlgorithm:
    """ES-D-RTRL (pp_prop) around ``model``; see :class:`IODimVjpAlgorithm` (keywords as there)."""
    return IODimVjpAlgorithm(model, decay_or_rank=decay_or_rank, name=name, vjp_method=vjp_method, **kwargs)
