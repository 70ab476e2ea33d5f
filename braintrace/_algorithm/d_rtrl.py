r"""D-RTRL: real-time recurrent learning with per-unit block-diagonal hidden Jacobians (the
``trace_factorization='per_param'`` engine of :class:`~braintrace.ETraceConfig`).

For each relation ``y = f(x, \theta)`` and hidden group of ``n`` states, a parameter-dimension
trace :math:`\epsilon` (one leaf per trainable key, shape ``(batch?, *leaf_shape, n)``) follows

.. math::
    \epsilon_t = D_t\,\epsilon_{t-1} + \left(\frac{\partial h_t}{\partial \theta}\right)_{\text{immediate}},
    \qquad
    \nabla_\theta L_t = \sum_{s} \frac{\partial L_t}{\partial h_{t,s}} \cdot \epsilon_{t,s},

where :math:`D_t` is the per-unit ``n x n`` block of :math:`\partial h_t/\partial h_{t-1}` with
every ETP output held fixed. The trace operations come from
:func:`braintrace._etrace_op._trace_ops.get_drtrl_trace_ops` (rule-derived, or a primitive's own).

With ``trace_filter='kappa'`` (e-prop's filter, see :mod:`braintrace._algorithm.filters`), the
traces of the weights behind a read-out also keep
:math:`\bar\epsilon_t = \kappa\,\bar\epsilon_{t-1} + \epsilon_t`, and the solve contracts
:math:`\bar\epsilon_t` instead of :math:`\epsilon_t`.
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp

from braintrace._etrace_op._registries import BATCHED_PRIMITIVES
from braintrace._etrace_op._trace_ops import get_drtrl_trace_ops, rule_kwargs
from braintrace._etrace_op.lora import etp_lora_mm_p, etp_lora_mv_p, make_factored_trace_ops

from .executor import StepValues
from .filters import readout_groups
from .pp_prop import decay_from_decay_or_rank
from .vjp_algorithm import ETraceVjpAlgorithm

__all__ = ["ParamDimVjpAlgorithm", "D_RTRL"]


def _key(r, gi):
    return f"r{r}_g{gi}"


def _bar(key):
    """The key of the kappa-filtered copy of trace ``key``."""
    return f"{key}_kbar"


def _filtered(kappa, bar, new):
    """``kappa * bar + new`` leaf by leaf (floating leaves; others kept), in ``bar``'s dtypes."""

    def one(b, e):
        if not jnp.issubdtype(jnp.result_type(b), jnp.floating):
            return e
        return (kappa * b + e).astype(b.dtype)

    return jax.tree.map(one, bar, new)


class ParamDimVjpAlgorithm(ETraceVjpAlgorithm):
    r"""D-RTRL (parameter-dimension eligibility traces).

    Memory: one trace per trainable element and hidden state, ``O(B * |theta| * n)``. Exact where
    the hidden Jacobian is already block diagonal per unit (leaky or multi-state units fed by ETP
    weights, element-wise time constants).

    Parameters
    ----------
    model : brainstate.nn.Module
    name : str, optional
    vjp_method, fast_solve, normalize_matrix_spectrum, mode, control_flow, random_feedback_key
        See :class:`~braintrace.ETraceVjpAlgorithm`.
    config : ETraceConfig, optional
        The rule's coordinates; ``trace_factorization='per_param'`` (the default config). This
        engine computes ``temporal_recursion`` ``'jacobian'`` (:math:`D_t`), ``'scalar_leak'``
        (:math:`\lambda I`) and ``'none'``, ``recurrence_scope='diagonal'``, every
        ``learning_signal`` of :class:`~braintrace.ETraceVjpAlgorithm`, and
        ``trace_filter='kappa'``: the traces of the relations driving a hidden group that feeds a
        further trainable ETP op (the layers behind a read-out) are low-passed,
        :math:`\bar\epsilon_t = \kappa\bar\epsilon_{t-1} + \epsilon_t`, and solved from
        :math:`\bar\epsilon`; a read-out's own traces are not filtered. A model with nothing
        to filter raises ``ValueError`` at compile time. With the filter, one changed hidden
        value restarts every trace (and every filtered trace).
    snap_max_jacobian_elements : int
        Accepted for code written for the published releases (a memory bound of their SnAp scope);
        unused here.
    chunked_trace : bool
        Accepted for code written for the 0.2 releases; the trace layout here is chosen per
        primitive and backend, so it changes nothing.
    lora_factored : bool
        LoRA relations keep the exact trace of their ``B`` factor (a dense ``(B, I, O, n)`` trace)
        by default; ``True`` factors it as in ES-D-RTRL (``B (I + O n)`` memory, approximate),
        with ``A`` and the bias still exact.
    decay_or_rank : float or int
        The decay of the factored LoRA trace (as in :func:`pp_prop`); used only when
        ``lora_factored``.
    trace_dtype : dtype, optional
        The dtype the parameter traces are stored in; by default each weight's own dtype.
        ``jnp.bfloat16`` halves the traces' memory and the bytes every step moves through them; the
        trace operations still compute in float32 (and return float32 gradients), but each trace
        element is rounded to 8 significant bits at every step, so the gradients are exact only to
        about 1e-2 relative.

    Examples
    --------
    >>> import brainstate, jax, jax.numpy as jnp, braintrace
    >>> class RNN(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = brainstate.ParamState(jax.random.normal(jax.random.PRNGKey(0), (3, 3)) * 0.3)
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 3)))
    ...     def update(self, x):
    ...         self.h.value = jnp.tanh(braintrace.matmul(self.h.value, self.w.value) + x)
    ...         return self.h.value
    >>> model = RNN(); _ = brainstate.nn.init_all_states(model, batch_size=2)
    >>> alg = braintrace.D_RTRL(model)
    >>> _ = alg.compile_graph(jnp.zeros((2, 3)))
    >>> params = model.states(brainstate.ParamState)
    >>> grads = brainstate.transform.grad(lambda x: alg(x).sum(), params)(jnp.ones((2, 3)))
    >>> grads[('w',)].shape
    (3, 3)
    """

    def __init__(
        self,
        model,
        name=None,
        vjp_method: str = "single-step",
        fast_solve: bool = True,
        trace_dtype=None,
        chunked_trace: bool = True,
        control_flow=None,
        config=None,
        random_feedback_key=None,
        snap_max_jacobian_elements: int = 16_777_216,
        *,
        lora_factored: bool = False,
        decay_or_rank=0.9,
        normalize_matrix_spectrum: bool = False,
        mode=None,
    ):
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
        if not isinstance(chunked_trace, bool):
            raise TypeError(f"D_RTRL: `chunked_trace` must be a bool, got {chunked_trace!r}.")
        self._kappa_keys = frozenset()
        self.lora_factored = bool(lora_factored)
        self.lora_decay = decay_from_decay_or_rank(decay_or_rank) if lora_factored else None
        self.trace_dtype = _floating_dtype(trace_dtype)

    def _build(self):
        self._kappa_keys = self._find_filtered() if self.config.trace_filter == "kappa" else frozenset()
        super()._build()

    def _find_filtered(self) -> frozenset:
        """The trace keys the kappa filter applies to: relations x groups that are not read-outs."""
        readouts = readout_groups(self.graph)
        keys = set()
        for r, gi, g in self._relation_groups():
            if g.index in readouts:
                continue
            if self.lora_factored and r.primitive in (etp_lora_mm_p, etp_lora_mv_p):
                raise ValueError(
                    f"{type(self).__name__}: trace_filter='kappa' low-passes the per-parameter trace, but "
                    f"the LoRA relation {r.primitive.name} (equation {r.eqn_index}, weights "
                    f"{sorted(p for ps in r.param_paths.values() for p in ps)}) keeps a factored trace "
                    f"(lora_factored=True), whose filtered sum is not a product of filtered factors. Use "
                    f"lora_factored=False."
                )
            keys.add(_key(r.index, gi))
        if not keys:
            raise ValueError(
                f"{type(self).__name__}: trace_filter='kappa' (kappa={self.config.kappa}) low-passes the "
                f"traces of the weights behind a read-out (e-prop's filter for the read-out's leak), but "
                f"every hidden group of {type(self.model).__name__} is a read-out (none feeds a further "
                f"trainable ETP op): there is nothing to filter. Use kappa 0 (trace_filter='none')."
            )
        return frozenset(keys)

    def _ops(self, primitive):
        if self.lora_factored and primitive in (etp_lora_mm_p, etp_lora_mv_p):
            return make_factored_trace_ops(primitive, self.lora_decay)
        return get_drtrl_trace_ops(primitive)

    def _relation_groups(self):
        for r in self.graph.hidden_param_op_relations:
            for gi, g in enumerate(r.hidden_groups):
                yield r, gi, g

    def _init_trace_values(self) -> Dict:
        vals = {}
        for r, gi, g in self._relation_groups():
            ops = self._ops(r.primitive)
            bnd = r.batch_ndims[gi]
            batch_shape = () if r.primitive in BATCHED_PRIMITIVES else tuple(g.shape[:bnd])
            trace = ops.init(
                r.x_var, r.y_var, dict(r.trainable_vars), g.num_state, batch_shape, dict(r.params)
            )
            if self.trace_dtype is not None:
                store = lambda t: t.astype(self.trace_dtype) if jnp.issubdtype(t.dtype, jnp.floating) else t
                trace = jax.tree.map(store, trace)
            vals[_key(r.index, gi)] = trace
            if _key(r.index, gi) in self._kappa_keys:
                vals[_bar(_key(r.index, gi))] = jax.tree.map(jnp.zeros_like, trace)
        return vals

    def _restarts_per_unit(self) -> bool:
        """Per unit whenever every trace leaf propagates through ``D``: the library's own trace
        operations, without the factored LoRA option (whose input trace is per batch row)."""
        if self._kappa_keys:  # the filtered traces do not propagate through D
            return False
        if self.lora_factored and any(
            r.primitive in (etp_lora_mm_p, etp_lora_mv_p) for r in self.graph.hidden_param_op_relations
        ):
            return False
        return all(
            getattr(self._ops(r.primitive).update, "__module__", "").startswith("braintrace.")
            for r in self.graph.hidden_param_op_relations
        )

    def _restart_undecayed(self, traces: Dict, keep) -> Dict:
        """The library's own trace operations propagate every leaf through ``D`` (which the
        restart scales), except the undecayed factors of the factored LoRA trace; a custom
        primitive's own operations may not, so all of its leaves are scaled."""
        out = dict(traces)
        scale = lambda t: t * keep.astype(t.dtype)
        for r, gi, _ in self._relation_groups():
            k = _key(r.index, gi)
            ops = self._ops(r.primitive)
            if self.lora_factored and r.primitive in (etp_lora_mm_p, etp_lora_mv_p):
                out[k] = {n: scale(v) if n in ("eps_x", "eps_f_norm") else v for n, v in traces[k].items()}
            elif not getattr(ops.update, "__module__", "").startswith("braintrace."):
                out[k] = jax.tree.map(scale, traces[k])
            if k in self._kappa_keys:
                out[_bar(k)] = jax.tree.map(scale, traces[_bar(k)])
        return out

    def _update_traces(self, traces: Dict, step: StepValues) -> Dict:
        new = {}
        for r, gi, g in self._relation_groups():
            ops = self._ops(r.primitive)
            k = _key(r.index, gi)
            new[k] = ops.update(
                traces[k],
                step.d[g.index],
                step.xs[r.index],
                step.df[(r.index, gi)],
                step.weights[r.index],
                rule_kwargs(r.params, step.aux[r.index]),
                r.batch_ndims[gi],
            )
            if k in self._kappa_keys:
                new[_bar(k)] = _filtered(self.config.kappa, traces[_bar(k)], new[k])
        return new

    def _update_and_solve(self, traces, step: StepValues, cts):
        if self._kappa_keys:  # the filtered traces are solved: no fused update-and-solve
            new = self._update_traces(traces, step)
            return new, self._solve(new, cts, step.weights, step.aux)
        new, grads = {}, {}
        for r, gi, g in self._relation_groups():
            ops = self._ops(r.primitive)
            k = _key(r.index, gi)
            new[k], part = ops.update_and_solve(
                traces[k],
                step.d[g.index],
                step.xs[r.index],
                step.df[(r.index, gi)],
                cts[(r.index, gi)],
                step.weights[r.index],
                rule_kwargs(r.params, step.aux[r.index]),
                r.batch_ndims[gi],
            )
            prev = grads.get(r.index)
            grads[r.index] = part if prev is None else jax.tree.map(jnp.add, prev, part)
        return new, grads

    def _solve(self, traces, cts, weights, aux):
        grads = {}
        for r, gi, g in self._relation_groups():
            ops = self._ops(r.primitive)
            k = _key(r.index, gi)
            part = ops.solve(
                traces[_bar(k) if k in self._kappa_keys else k],
                cts[(r.index, gi)],
                weights[r.index],
                rule_kwargs(r.params, aux[r.index]),
                r.batch_ndims[gi],
            )
            prev = grads.get(r.index)
            grads[r.index] = part if prev is None else jax.tree.map(jnp.add, prev, part)
        return grads


def _floating_dtype(dtype):
    """``None`` or a floating NumPy dtype; anything else is a ``TypeError`` naming ``trace_dtype``."""
    if dtype is None:
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"D_RTRL: `trace_dtype` must be a floating dtype such as jnp.bfloat16 or jnp.float32, "
            f"got {dtype!r}."
        )
    return dt


#: Public name of :class:`ParamDimVjpAlgorithm`.
D_RTRL = ParamDimVjpAlgorithm
