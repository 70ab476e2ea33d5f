r"""Influence-matrix online learning: exact RTRL, SnAp-n and UORO as one engine.

With ``h`` every hidden state element of the model (``N`` per row), ``θ`` the trainable operands
of the ETP ops that move hidden states, flattened (``P``), ``J_t = ∂h_t/∂h_{t-1}`` the full
one-step Jacobian and ``I_t = ∂h_t/∂θ`` the immediate influence (see
:mod:`~braintrace._algorithm.influence_step`), the influence matrix ``M_t = dh_t/dθ`` (``N x P``
per row) follows

.. math::
    M_t = J_t M_{t-1} + I_t, \qquad
    \nabla_\theta L_t = \frac{\partial L_t}{\partial h_t} M_t
        + \frac{\partial L_t}{\partial h_{t-1}}\Big|_{\text{not via } h_t} M_{t-1}
        + \left(\frac{\partial L_t}{\partial \theta}\right)_{\text{direct}},

the last two terms being the step's paths to the loss that avoid ``h_t`` (computed by reverse mode
within the step). The engine has two independent choices:

* **recurrence scope**: ``'full'`` keeps every entry of ``M`` (RTRL, exact: equal to BPTT); an int
  ``n`` keeps the entries reachable within ``n`` steps (SnAp-n):
  ``M_t = mask_n ⊙ (J_t M_{t-1} + I_t)`` with ``mask_n = pattern((|J| + Id)^{n-1} |I|)``, the
  patterns read off ``J`` and ``I`` at random states, weights and inputs when the graph is
  compiled (:meth:`InfluenceGraphExecutor.structural_patterns`);
* **trace layout**: ``'dense'`` stores ``M`` (``R N P`` values; under SnAp, only the mask's entries
  when that takes less memory: ``R P k`` values for ``k`` the most entries a column of the mask
  keeps), ``'projection'`` stores a random rank-one estimate
  ``M ≈ h̃ θ̃ᵀ`` per row (UORO, ``R (N + P)`` values, full scope only): with Rademacher signs
  ``ν`` drawn from a key that advances every step,

  .. math::
      \tilde h \leftarrow \rho_0 J_t \tilde h + \rho_1 \nu, \qquad
      \tilde\theta \leftarrow \tilde\theta / \rho_0 + \nu^\top I_t / \rho_1,

      \rho_0 = \sqrt{\frac{\|\tilde\theta\| + \epsilon}{\|J_t \tilde h\| + \epsilon}}, \qquad
      \rho_1 = \sqrt{\frac{\|\nu^\top I_t\| + \epsilon}{\|\nu\| + \epsilon}},

  and the gradient :math:`(\partial L/\partial h \cdot \tilde h)\, \tilde\theta` (Tallec &
  Ollivier 2017). :math:`J_t \tilde h` is one forward-mode product and :math:`\nu^\top I_t` one
  reverse-mode product per row; no Jacobian is formed. Since :math:`\rho_1` is even in ``ν``, the
  estimate is unbiased: its mean over projection keys is RTRL's gradient.

The named algorithms are presets: :class:`RTRL` (full, dense), :class:`SnAp` (``n``, dense),
:class:`UORO` / :class:`RandomProjectionVjpAlgorithm` (full, projection).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Dict, Optional

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from braintrace._compiler.diagnostics import (
    CompilationRecord,
    DiagnosticKind,
    DiagnosticLevel,
    ETraceCompilationWarning,
)

from .axes import ETraceConfig
from .executor import StepValues
from .influence_layouts import CompressedInfluence, DenseInfluence, RankOneProjection
from .influence_step import InfluenceGraphExecutor
from .vjp_algorithm import ETraceVjpAlgorithm

__all__ = ["InfluenceVjpAlgorithm", "RTRL", "SnAp", "RandomProjectionVjpAlgorithm", "UORO"]

#: The published releases' bound on the Jacobian's elements (``snap_max_jacobian_elements``).
DEFAULT_MAX_JACOBIAN_ELEMENTS = 1 << 24
#: The default bound on the bytes of ``M`` and one step's ``J`` and ``I`` (``max_influence_bytes``).
DEFAULT_MAX_INFLUENCE_BYTES = 1 << 30

#: Compiler records about what a per-unit hidden Jacobian ``D`` leaves out; the influence matrix
#: carries every path of the step, so they do not apply (plain uses of a traced weight are checked
#: again against the influence's own weight slots).
_PER_UNIT_KINDS = frozenset(
    {
        DiagnosticKind.NON_DIAGONAL_PATH,
        DiagnosticKind.CROSS_GROUP_COUPLING,
        DiagnosticKind.CROSS_LAYER_INFLUENCE,
        DiagnosticKind.RECURRENT_ETP_WEIGHT,
        DiagnosticKind.WEIGHT_ALSO_PLAIN,
    }
)

#: Compiler records saying a weight gets no trace; the influence traces the ETP ops that reach
#: hidden states through other ETP ops too, so they are dropped for those ops' weights.
_UNTRACED_KINDS = frozenset({DiagnosticKind.WEIGHT_NOT_REACHING_HIDDEN, DiagnosticKind.PLAIN_PARAMETER})


def _snap_order(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(
            f"`{name}` must be an int >= 1 (SnAp-n keeps the influence entries reached within n steps), "
            f"got {n!r} of type {type(n).__name__}."
        )
    if n < 1:
        raise ValueError(
            f"`{name}` must be an int >= 1 (SnAp-n keeps the influence entries reached within n steps), "
            f"got {n}."
        )
    return int(n)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int >= 1, got {value!r} of type {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value}.")
    return int(value)


def _key_data(projection_key) -> np.ndarray:
    """The raw data of the projection key: from an int seed >= 0, a typed key, or raw key data."""
    if isinstance(projection_key, numbers.Integral) and not isinstance(projection_key, bool):
        if projection_key < 0:
            raise ValueError(f"`projection_key` as a seed must be an int >= 0, got {projection_key}.")
        return np.asarray(jax.random.key_data(jax.random.key(int(projection_key))))
    dtype = getattr(projection_key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(projection_key))
    raw_shape = np.shape(jax.random.key_data(jax.random.key(0)))
    if dtype == jnp.uint32 and np.shape(projection_key) == raw_shape:
        return np.asarray(projection_key)
    raise TypeError(
        f"`projection_key` must be an int seed, a jax.random.key, or raw uint32 key data; "
        f"got {projection_key!r}."
    )


_ADVICE = "RTRL and SnAp are for small models; use UORO (memory R (N + P)) or D_RTRL, or raise the limit"


def _nbytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class InfluenceVjpAlgorithm(ETraceVjpAlgorithm):
    r"""Online learning with the influence matrix ``M = dh/dθ``: RTRL, SnAp-n and UORO.

    See the module docstring for the math; the presets :class:`RTRL`, :class:`SnAp` and
    :class:`UORO` fix the two choices. Shapes, per compiled graph: ``R`` rows (the batch when its
    rows are independent, else 1), ``N`` hidden elements per row, ``P`` traced weight elements.

    Parameters
    ----------
    model : brainstate.nn.Module
    recurrence_scope : ``'full'`` or int ``n >= 1``
        Every entry of ``M`` (exact), or SnAp-n's entries reachable within ``n`` steps.
    trace_layout : ``'dense'`` or ``'projection'``
        ``M`` itself (``R N P`` values, plus ``R N^2`` for ``J`` and ``R N P`` for ``I`` formed at
        every step), or UORO's random rank-one estimate (``R (N + P)`` values; one forward-mode
        and ``R`` reverse-mode products of the step per step). ``'projection'`` needs the full
        scope.
    name, vjp_method, fast_solve, mode, control_flow, config, random_feedback_key
        See :class:`~braintrace.ETraceVjpAlgorithm`. Under ``vjp_method='multi-step'`` a window's
        gradient is exact inside the window and the credit from before it is
        :math:`\partial L/\partial h_{t_0} M_{t_0}`.
    max_influence_bytes : int
        Dense layout: the bytes ``M``, ``I`` and ``J`` may take together; compiling a larger model
        raises ``ValueError`` naming what it would need, before anything is allocated.
    snap_max_jacobian_elements : int
        Dense layout: the elements ``J`` may have (``R N^2``), the bound of the published releases.
    projection_key : int, jax.random.key or raw key data
        Projection layout: the seed of the sign stream. Zeroing the traces (``reset_state``, a
        sequence driver's reset) starts the stream from it again.
    projection_eps : float
        Projection layout: the guard :math:`\epsilon \ge 0` in :math:`\rho_0` and :math:`\rho_1`
        (both traces are zero at the first step).
    trace_dtype : dtype, optional
        The dtype the traces are stored in (by default the step's); they are updated in the step's.

    Raises
    ------
    ValueError
        At construction for a combination that does not exist (SnAp-n with the projection layout);
        at compile time when the dense layout exceeds ``max_influence_bytes`` or
        ``snap_max_jacobian_elements``.

    Examples
    --------
    >>> import brainstate, jax, jax.numpy as jnp, braintrace
    >>> class RNN(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = brainstate.ParamState(jax.random.normal(jax.random.PRNGKey(0), (3, 3)) * 0.5)
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 3)))
    ...     def update(self, x):
    ...         self.h.value = jnp.tanh(braintrace.matmul(self.h.value, self.w.value) + x)
    ...         return self.h.value
    >>> model = RNN(); _ = brainstate.nn.init_all_states(model, batch_size=2)
    >>> rtrl = braintrace.InfluenceVjpAlgorithm(model, recurrence_scope='full', trace_layout='dense')
    >>> _ = rtrl.compile_graph(jnp.zeros((2, 3)))
    >>> rtrl.etrace.value['influence'].shape  # (rows, hidden elements, weight elements)
    (2, 3, 9)
    >>> snap1 = braintrace.InfluenceVjpAlgorithm(model, recurrence_scope=1)
    >>> _ = snap1.compile_graph(jnp.zeros((2, 3)))  # warns: SnAp-1 drops entries of this model
    >>> snap1.etrace.value['influence'].shape  # (rows, weight elements, entries kept per weight)
    (2, 9, 1)
    """

    def __init__(
        self,
        model,
        recurrence_scope="full",
        trace_layout: str = "dense",
        name: Optional[str] = None,
        vjp_method: str = "single-step",
        fast_solve: bool = True,
        mode=None,
        control_flow=None,
        config=None,
        random_feedback_key=None,
        *,
        max_influence_bytes: int = DEFAULT_MAX_INFLUENCE_BYTES,
        snap_max_jacobian_elements: int = DEFAULT_MAX_JACOBIAN_ELEMENTS,
        projection_key=42,
        projection_eps: float = 1e-12,
        trace_dtype=None,
    ):
        if recurrence_scope != "full":
            if isinstance(recurrence_scope, str):
                raise ValueError(
                    f"`recurrence_scope` must be 'full' or an int n >= 1 (SnAp-n), got {recurrence_scope!r}."
                )
            recurrence_scope = _snap_order(recurrence_scope, "recurrence_scope")
        if trace_layout not in ("dense", "projection"):
            raise ValueError(f"`trace_layout` must be 'dense' or 'projection', got {trace_layout!r}.")
        if trace_layout == "projection" and recurrence_scope != "full":
            raise ValueError(
                f"`trace_layout='projection'` (UORO's rank-one estimate) needs recurrence_scope='full', "
                f"got recurrence_scope={recurrence_scope!r}: a SnAp mask does not apply to a rank-one "
                f"estimate. Use trace_layout='dense' for SnAp-n."
            )
        # the engine's coordinates, read by the base class's config check
        self.recurrence_scope = recurrence_scope
        self.trace_layout = trace_layout
        super().__init__(
            model,
            name=name,
            vjp_method=vjp_method,
            fast_solve=fast_solve,
            mode=mode,
            control_flow=control_flow,
            config=config,
            random_feedback_key=random_feedback_key,
        )
        eps = projection_eps
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) >= 0.0:
            raise ValueError(f"`projection_eps` must be a float >= 0, got {projection_eps!r}.")
        if trace_dtype is not None:
            dt = np.dtype(jnp.dtype(trace_dtype))
            if not jnp.issubdtype(dt, jnp.floating):
                raise TypeError(f"`trace_dtype` must be a floating dtype, got {trace_dtype!r}.")
            trace_dtype = dt
        self.max_influence_bytes = _positive_int(max_influence_bytes, "max_influence_bytes")
        self.snap_max_jacobian_elements = _positive_int(
            snap_max_jacobian_elements, "snap_max_jacobian_elements"
        )
        self._projection_seed = brainstate.ShortTermState(jnp.asarray(_key_data(projection_key)))
        self._projection_key = projection_key
        self.projection_eps = float(eps)
        self.trace_dtype = trace_dtype
        self._approximations = []  # (parameter path, why): the records of the last compile
        #: SnAp: the smallest ``n`` whose mask keeps every entry, and the mask ``(N, P)`` of the
        #: entries kept (set when the graph is compiled)
        self.dependency_depth: Optional[int] = None
        self.snap_mask: Optional[np.ndarray] = None

    @property
    def projection_key(self):
        """The seed of the projection layout's sign stream. Setting it takes effect when the traces
        are next zeroed (``reset_state()``, or a sequence driver's ``reset=True``), compiled loops
        included: runs with different keys are independent samples of the estimate."""
        return self._projection_key

    @projection_key.setter
    def projection_key(self, value):
        self._projection_seed.value = jnp.asarray(_key_data(value))
        self._projection_key = value

    # -- compiling ------------------------------------------------------------------------------
    def compile_graph(self, *inputs) -> "InfluenceVjpAlgorithm":
        """Compile as :meth:`~braintrace.ETraceAlgorithm.compile_graph`; the compiler's records about
        what a per-unit ``D`` leaves out, and about ETP weights that reach hidden states only
        through other ETP ops, are dropped (``M`` carries every path of the step and those weights),
        and
        where this algorithm's gradient differs from BPTT by its definition (SnAp-n below the
        model's dependency depth, UORO's estimate, a traced weight also used through plain ops
        outside its operand) the graph gets one record per parameter and the compile one warning."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            super().compile_graph(*inputs)
        records = self.graph.records
        traced = {p for _, _, _, paths in self.executor.extra_ops for p in paths}
        stale = [
            r
            for r in records
            if r.kind in _PER_UNIT_KINDS
            or (r.kind in _UNTRACED_KINDS and r.subject and set(r.subject) <= traced)
        ]
        dropped = {r.message for r in stale}
        records[:] = [r for r in records if all(r is not x for x in stale)]
        for w in caught:
            if not (issubclass(w.category, ETraceCompilationWarning) and str(w.message) in dropped):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        found = [
            (
                path,
                DiagnosticKind.WEIGHT_ALSO_PLAIN,
                f"Parameter {path!r} is traced through an ETP op but also reaches hidden states through "
                f"plain JAX ops that do not read the op's operand; that path is differentiated within the "
                f"step only, its effect at later steps is in no influence entry.",
            )
            for path in self.executor.plain_weight_paths()
        ]
        found += [(p, DiagnosticKind.INFLUENCE_APPROXIMATION, why) for p, why in self._approximations]
        for path, kind, why in found:
            records.append(CompilationRecord(kind, DiagnosticLevel.WARNING, why, (path,)))
        if found:
            causes = "; ".join(dict.fromkeys(why for _, _, why in found))
            warnings.warn(
                f"{type(self).__name__}: the online gradient of {sorted({p for p, _, _ in found})} is "
                f"not BPTT's: {causes}. One record per parameter in `graph.records`.",
                ETraceCompilationWarning,
                stacklevel=2,
            )
        return self

    def _default_config(self) -> ETraceConfig:
        """The coordinates of this engine: the per-parameter factorization (dense layout) or the
        random projection, with the full scope or SnAp's (``sparse_n``; SnAp-1 is ``'coupled'``)."""
        factorization = "random_projection" if self.trace_layout == "projection" else "per_param"
        if self.recurrence_scope == "full":
            return ETraceConfig(trace_factorization=factorization, recurrence_scope="full")
        return ETraceConfig(
            trace_factorization=factorization, recurrence_scope="sparse_n", sparse_n=self.recurrence_scope
        )

    def _check_config(self, config):
        """A ``config`` passed in must be this engine's coordinates (the other axes at their
        defaults: the influence is contracted with the exact ``∂L_t/∂h_t``, unfiltered)."""
        if not isinstance(config, ETraceConfig):
            raise TypeError(
                f"{type(self).__name__}: `config` must be a braintrace.ETraceConfig, got {config!r}."
            )
        want = self._default_config()
        if config != want:
            raise ValueError(
                f"{type(self).__name__}: `config` ({config.describe()}) is not this algorithm's coordinates "
                f"({want.describe()}); braintrace.compile(model, config, x0) picks the engine for a config."
            )

    def _make_executor(self) -> InfluenceGraphExecutor:
        return InfluenceGraphExecutor(self.graph, self._signal_solve)

    def _init_trace_values(self) -> Dict:
        """Check the memory, choose the layout (SnAp's mask is derived here), return zero traces."""
        ex = self.executor
        store = self.trace_dtype or ex.dtype
        self._approximations = []
        if self.trace_layout == "projection":
            self._layout = RankOneProjection(ex, self._projection_seed, self.projection_eps, store)
            why = (
                "UORO keeps a random rank-one estimate of dh/dθ: unbiased (its mean over projection keys "
                "is RTRL's gradient), not equal to it"
            )
            self._approximations = [(p, why) for p in self._theta_paths(range(ex.num_theta))]
        else:
            self._check_jacobian(ex)
            self.snap_mask = None if self.recurrence_scope == "full" else self._snap_mask(ex)
            self._layout = self._dense_layout(ex, store)
        return self._layout.init()

    def _check_jacobian(self, ex: InfluenceGraphExecutor):
        r, n = ex.rows, ex.num_hidden
        if r * n * n > self.snap_max_jacobian_elements:
            raise ValueError(
                f"{type(self).__name__}: each step forms the Jacobian J ({r} row(s) x {n} x {n} = "
                f"{r * n * n} elements), more than `snap_max_jacobian_elements`="
                f"{self.snap_max_jacobian_elements}. {_ADVICE}."
            )

    def _dense_layout(self, ex: InfluenceGraphExecutor, store):
        """``M`` dense, or (SnAp) at its mask's entries when that takes less memory; the memory of
        either is checked against ``max_influence_bytes`` first."""
        r, n, p = ex.rows, ex.num_hidden, ex.num_theta
        item, step_item = np.dtype(store).itemsize, ex.dtype.itemsize
        jac = r * n * n * step_item
        dense = (r * n * p * item, r * n * p * step_item)  # M kept, I formed per step
        k = None if self.snap_mask is None else max(1, int(self.snap_mask.sum(axis=0).max()))
        if k is not None and r * p * k * (item + step_item * (k + 1)) < sum(dense):
            kept, formed = r * p * k * item, r * p * k * (k + 1) * step_item
            what = (
                f"M at the mask's entries ({r} row(s) x {p} weight elements x {k} entries) needs "
                f"{_nbytes(kept)}, and each step also forms J ({_nbytes(jac)}) and I and J at those "
                f"entries ({_nbytes(formed)})"
            )
            layout = CompressedInfluence(ex, self.snap_mask, store)
        else:
            kept, formed = dense
            what = (
                f"the influence matrix M ({r} row(s) x {n} hidden elements x {p} weight elements) needs "
                f"{_nbytes(kept)}, and each step also forms I ({_nbytes(formed)}) and J ({_nbytes(jac)})"
            )
            layout = DenseInfluence(ex, self.snap_mask, store)
        need = kept + formed + jac
        if need > self.max_influence_bytes:
            raise ValueError(
                f"{type(self).__name__}: {what}: {_nbytes(need)} in all, above `max_influence_bytes`="
                f"{self.max_influence_bytes} ({_nbytes(self.max_influence_bytes)}). {_ADVICE}."
            )
        return layout

    def _snap_mask(self, ex: InfluenceGraphExecutor) -> np.ndarray:
        """``mask_n`` ``(N, P)``; records the parameters whose entries it drops."""
        n = self.recurrence_scope
        pat_j, pat_i = ex.structural_patterns(seed=0)
        step = (pat_j | np.eye(ex.num_hidden, dtype=bool)).astype(np.float32)
        masks = [pat_i]
        while True:  # mask_(k+1) = pattern((|J| + Id) mask_k), up to its fixed point
            nxt = (step @ masks[-1].astype(np.float32)) > 0
            if np.array_equal(nxt, masks[-1]):
                break
            masks.append(nxt)
        depth = len(masks)
        self.dependency_depth = depth
        mask = masks[min(n, depth) - 1]
        lost = np.flatnonzero(np.any(masks[-1] & ~mask, axis=0))
        why = (
            f"SnAp-{n} keeps the entries of dh/dθ reached within {n} step(s); this model's weights reach "
            f"hidden states through up to {depth} (its dependency depth), so entries reached later are "
            f"dropped (SnAp-n with n >= {depth} equals RTRL)"
        )
        self._approximations = [(p, why) for p in self._theta_paths(lost)]
        return mask

    def _theta_paths(self, columns):
        """The parameter paths owning the given columns of ``θ``."""
        columns = set(int(c) for c in columns)
        paths = []
        for owners, sl in zip(self.executor.theta_paths(), self.executor.theta_slices()):
            if columns.intersection(range(sl.start, sl.stop)):
                paths += [p for p in owners if p not in paths]
        return paths

    # -- traces -----------------------------------------------------------------------------------
    def _reset_traces(self):
        self.etrace.value = {**self._layout.init(), "epoch": jnp.asarray(self._epoch, jnp.int32)}

    def _update_traces(self, traces: Dict, step: StepValues) -> Dict:
        return self._layout.update(traces, step)

    def _solve(self, traces, cts, weights, aux):
        return self.executor.theta_grads(self._layout.solve(traces, cts))

    def _restart_if_reset(self, traces, state_leaves, step: Optional[StepValues] = None):
        """As :meth:`~braintrace.ETraceVjpAlgorithm._restart_if_reset`, restarting the traces per
        hidden element: the rows of ``M`` (or entries of ``h̃``) of a hidden value that changed
        outside the step are zeroed (a row whose values all changed also zeroes its ``θ̃``)."""
        traces, keep = super()._restart_if_reset(traces, state_leaves, step)
        body = {k: v for k, v in traces.items() if k != "epoch"}
        body = self._layout.restart(body, self.executor.hidden_mask(keep))
        return {**body, "epoch": traces["epoch"]}, keep

    def _restarts_per_unit(self) -> bool:
        return True

    def _restart_undecayed(self, traces: Dict, keep) -> Dict:
        return traces  # restarted per hidden element in _restart_if_reset

    def _prepare_jacobians(self, step: StepValues, keep=None):
        pass  # no per-unit D: the layouts form J (or J h̃) from the step's point


class RTRL(InfluenceVjpAlgorithm):
    r"""Real-time recurrent learning: the exact influence matrix, equal to BPTT.

    ``M_t = J_t M_{t-1} + I_t`` per row with the full one-step Jacobian ``J_t`` (``N x N``) and the
    immediate influence ``I_t`` (``N x P``); the gradient of ``L_t`` is
    :math:`\partial L_t/\partial h_t\, M_t` plus the step's direct paths (see
    :class:`InfluenceVjpAlgorithm`). Memory ``R N P`` for ``M``, plus ``R N^2 + R N P`` formed at
    every step; time ``O(R N^2 P)`` per step: small models only. Compiling a model above
    ``max_influence_bytes`` (1 GiB by default) raises ``ValueError`` naming the memory it needs.

    Parameters
    ----------
    model : brainstate.nn.Module
    name, vjp_method, fast_solve, mode, control_flow, config, random_feedback_key
        See :class:`~braintrace.ETraceVjpAlgorithm`.
    max_influence_bytes, snap_max_jacobian_elements, trace_dtype
        See :class:`InfluenceVjpAlgorithm`.

    Examples
    --------
    The online gradient summed over a sequence equals BPTT's:

    >>> import brainstate, jax, jax.numpy as jnp, braintrace
    >>> class RNN(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = brainstate.ParamState(jax.random.normal(jax.random.PRNGKey(0), (3, 3)) * 0.5)
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 3)))
    ...     def update(self, x):
    ...         self.h.value = jnp.tanh(braintrace.matmul(self.h.value, self.w.value) + x)
    ...         return self.h.value
    >>> model = RNN(); _ = brainstate.nn.init_all_states(model, batch_size=2)
    >>> w0 = model.w.value
    >>> learner = braintrace.RTRL(model).compile_graph(jnp.zeros((2, 3)))
    >>> xs = jax.random.normal(jax.random.PRNGKey(1), (6, 2, 3))
    >>> loss = lambda out, y: jnp.sum((out - y) ** 2)
    >>> online = learner.etrace_grad(xs, xs, step_fn=loss, reduction='sum')[('w',)]
    >>> def bptt(w):
    ...     def body(h, x):
    ...         h = jnp.tanh(h @ w + x)
    ...         return h, loss(h, x)
    ...     return jax.lax.scan(body, jnp.zeros((2, 3)), xs)[1].sum()
    >>> bool(jnp.allclose(online, jax.grad(bptt)(w0), rtol=1e-4, atol=1e-5))
    True
    """

    def __init__(
        self,
        model,
        name: Optional[str] = None,
        vjp_method: str = "single-step",
        fast_solve: bool = True,
        mode=None,
        control_flow=None,
        config=None,
        random_feedback_key=None,
        *,
        max_influence_bytes: int = DEFAULT_MAX_INFLUENCE_BYTES,
        snap_max_jacobian_elements: int = DEFAULT_MAX_JACOBIAN_ELEMENTS,
        trace_dtype=None,
    ):
        super().__init__(
            model,
            recurrence_scope="full",
            trace_layout="dense",
            name=name,
            vjp_method=vjp_method,
            fast_solve=fast_solve,
            mode=mode,
            control_flow=control_flow,
            config=config,
            random_feedback_key=random_feedback_key,
            max_influence_bytes=max_influence_bytes,
            snap_max_jacobian_elements=snap_max_jacobian_elements,
            trace_dtype=trace_dtype,
        )


class SnAp(InfluenceVjpAlgorithm):
    r"""SnAp-n: the influence entries reachable within ``n`` steps (Menick et al. 2021).

    ``M_t = mask_n ⊙ (J_t M_{t-1} + I_t)`` with ``mask_n = pattern((|J| + Id)^{n-1} |I|)``: entry
    ``(i, p)`` is kept when weight element ``p`` moves hidden element ``i`` within ``n`` steps. The
    patterns of ``J`` and ``I`` are structural: read off the step's Jacobians at two random points
    (random states, weights and inputs) when the graph is compiled, a non-zero in either counting.
    ``n = 1`` keeps ``I``'s pattern; ``n`` at least the model's dependency depth (the ``n`` at which
    the mask stops growing, :attr:`dependency_depth` after compiling; 2 for a dense recurrent layer)
    keeps every entry and equals :class:`RTRL`. Below it, the graph records each parameter whose
    entries are dropped, with one warning per compile.

    Storage: the mask's entries only, ``(R, P, k)`` with ``k`` the most entries a column of the mask
    keeps (1 for SnAp-1 on units fed by their own weights), whenever that takes less memory than
    ``M`` itself; then each step forms ``J`` ``(R, N, N)``, ``J`` gathered per column
    ``(R, P, k, k)`` and ``I`` at the kept entries ``(R, P, k)`` (``P`` forward-mode products of the
    step). Otherwise ``M`` is dense with the mask applied, RTRL's memory and time (``R N P``). The
    mask is :attr:`snap_mask` after compiling.

    Parameters
    ----------
    model : brainstate.nn.Module
    n : int
        The number of steps, ``>= 1``.
    name, vjp_method, fast_solve, mode, control_flow, config, random_feedback_key
        See :class:`~braintrace.ETraceVjpAlgorithm`.
    snap_max_jacobian_elements, max_influence_bytes, trace_dtype
        See :class:`InfluenceVjpAlgorithm`.
    chunked_trace : bool
        Accepted for code written for the published releases; changes nothing.

    Examples
    --------
    >>> import brainstate, jax, jax.numpy as jnp, braintrace
    >>> class RNN(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = brainstate.ParamState(jax.random.normal(jax.random.PRNGKey(0), (3, 3)) * 0.5)
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 3)))
    ...     def update(self, x):
    ...         self.h.value = jnp.tanh(braintrace.matmul(self.h.value, self.w.value) + x)
    ...         return self.h.value
    >>> model = RNN(); _ = brainstate.nn.init_all_states(model, batch_size=2)
    >>> snap = braintrace.SnAp(model, n=1).compile_graph(jnp.zeros((2, 3)))  # warns: entries dropped
    >>> snap.dependency_depth
    2
    >>> [r.subject for r in snap.graph.records if r.kind.value == 'influence_approximation']
    [('w',)]
    """

    def __init__(
        self,
        model,
        n: int = 2,
        name: Optional[str] = None,
        vjp_method: str = "single-step",
        fast_solve: bool = True,
        snap_max_jacobian_elements: int = DEFAULT_MAX_JACOBIAN_ELEMENTS,
        *,
        max_influence_bytes: int = DEFAULT_MAX_INFLUENCE_BYTES,
        mode=None,
        control_flow=None,
        config=None,
        random_feedback_key=None,
        trace_dtype=None,
        chunked_trace: bool = True,
    ):
        n = _snap_order(n, "n")
        if not isinstance(chunked_trace, bool):
            raise TypeError(f"SnAp: `chunked_trace` must be a bool, got {chunked_trace!r}.")
        super().__init__(
            model,
            recurrence_scope=n,
            trace_layout="dense",
            name=name,
            vjp_method=vjp_method,
            fast_solve=fast_solve,
            mode=mode,
            control_flow=control_flow,
            config=config,
            random_feedback_key=random_feedback_key,
            max_influence_bytes=max_influence_bytes,
            snap_max_jacobian_elements=snap_max_jacobian_elements,
            trace_dtype=trace_dtype,
        )
        self.n = n


class RandomProjectionVjpAlgorithm(InfluenceVjpAlgorithm):
    r"""The influence engine with the random rank-one projection layout (UORO's estimator).

    Per row, ``M ≈ h̃ θ̃ᵀ`` (``N + P`` values), advanced with Rademacher signs ``ν`` drawn from a key
    that advances every step (kept with the traces):
    ``h̃ ← ρ0 J h̃ + ρ1 ν``, ``θ̃ ← θ̃ / ρ0 + νᵀ I / ρ1`` with
    ``ρ0 = sqrt((‖θ̃‖ + ε) / (‖J h̃‖ + ε))`` and ``ρ1 = sqrt((‖νᵀ I‖ + ε) / (‖ν‖ + ε))``; the gradient
    is ``(∂L/∂h · h̃) θ̃`` summed over rows. ``J h̃`` is one forward-mode product of the step and
    ``νᵀ I`` one reverse-mode product per row (``R`` in all, computed together): no Jacobian is
    formed. The estimate is unbiased for RTRL's gradient (its mean over ``projection_key``); one
    sample is not equal to it, so the graph records every traced parameter, with one warning per
    compile.

    Parameters
    ----------
    model : brainstate.nn.Module
    name, vjp_method, fast_solve, control_flow, config, random_feedback_key, mode
        See :class:`~braintrace.ETraceVjpAlgorithm`. The published releases default to
        ``vjp_method='multi-step'``; here the single-step rule is the default and works with
        :meth:`~braintrace.ETraceAlgorithm.etrace_grad` directly.
    projection_key, projection_eps, trace_dtype
        See :class:`InfluenceVjpAlgorithm`.
    snap_max_jacobian_elements : int
        Accepted for code written for the published releases; no Jacobian is formed here.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, braintrace
    >>> class Leaky(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = brainstate.ParamState(jnp.full((2, 3), 0.1))
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 3)))
    ...     def update(self, x):
    ...         self.h.value = 0.9 * self.h.value + braintrace.matmul(x, self.w.value)
    ...         return self.h.value
    >>> model = Leaky(); _ = brainstate.nn.init_all_states(model, batch_size=4)
    >>> alg = braintrace.RandomProjectionVjpAlgorithm(model, projection_key=0)
    >>> _ = alg.compile_graph(jnp.zeros((4, 2)))
    >>> {k: v.shape for k, v in alg.etrace.value.items() if k.endswith('tilde')}
    {'h_tilde': (4, 3), 'theta_tilde': (4, 6)}
    """

    def __init__(
        self,
        model,
        name: Optional[str] = None,
        vjp_method: str = "single-step",
        fast_solve: bool = True,
        control_flow=None,
        config=None,
        projection_key=42,
        projection_eps: float = 1e-12,
        random_feedback_key=None,
        snap_max_jacobian_elements: int = DEFAULT_MAX_JACOBIAN_ELEMENTS,
        *,
        mode=None,
        trace_dtype=None,
    ):
        super().__init__(
            model,
            recurrence_scope="full",
            trace_layout="projection",
            name=name,
            vjp_method=vjp_method,
            fast_solve=fast_solve,
            mode=mode,
            control_flow=control_flow,
            config=config,
            random_feedback_key=random_feedback_key,
            snap_max_jacobian_elements=snap_max_jacobian_elements,
            projection_key=projection_key,
            projection_eps=projection_eps,
            trace_dtype=trace_dtype,
        )


class UORO(RandomProjectionVjpAlgorithm):
    r"""Unbiased online recurrent optimisation (Tallec & Ollivier 2017).

    :class:`RandomProjectionVjpAlgorithm` under its published name: a rank-one unbiased estimate
    ``h̃ θ̃ᵀ`` of the influence matrix per row, ``R (N + P)`` values, one forward-mode and ``R``
    reverse-mode products of the step per step. Its gradient's mean over projection keys is
    :class:`RTRL`'s; a single run is noisy (the variance grows with the sequence length).

    Parameters
    ----------
    model : brainstate.nn.Module
    name, vjp_method, fast_solve, control_flow, random_feedback_key, mode
        See :class:`RandomProjectionVjpAlgorithm` (``vjp_method`` defaults to ``'single-step'``
        here, ``'multi-step'`` in the published releases).
    projection_key, projection_eps, snap_max_jacobian_elements, trace_dtype
        See :class:`RandomProjectionVjpAlgorithm`.

    Examples
    --------
    >>> import brainstate, jax, jax.numpy as jnp, braintrace
    >>> class RNN(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = brainstate.ParamState(0.1 * jnp.ones((4, 4)))
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 4)))
    ...     def update(self, x):
    ...         self.h.value = jnp.tanh(x + braintrace.matmul(self.h.value, self.w.value))
    ...         return self.h.value
    >>> model = RNN(); _ = brainstate.nn.init_all_states(model, batch_size=1)
    >>> learner = braintrace.UORO(model, projection_key=0).compile_graph(jnp.zeros((1, 4)))
    >>> xs = jnp.ones((10, 1, 4))
    >>> grads = learner.etrace_grad(xs, xs, step_fn=lambda out, y: jnp.mean((out - y) ** 2))
    >>> grads[('w',)].shape
    (4, 4)
    """

    def __init__(
        self,
        model,
        name: Optional[str] = None,
        vjp_method: str = "single-step",
        fast_solve: bool = True,
        control_flow=None,
        projection_key=42,
        projection_eps: float = 1e-12,
        random_feedback_key=None,
        snap_max_jacobian_elements: int = DEFAULT_MAX_JACOBIAN_ELEMENTS,
        *,
        mode=None,
        trace_dtype=None,
    ):
        super().__init__(
            model,
            name=name,
            vjp_method=vjp_method,
            fast_solve=fast_solve,
            control_flow=control_flow,
            projection_key=projection_key,
            projection_eps=projection_eps,
            random_feedback_key=random_feedback_key,
            snap_max_jacobian_elements=snap_max_jacobian_elements,
            mode=mode,
            trace_dtype=trace_dtype,
        )
