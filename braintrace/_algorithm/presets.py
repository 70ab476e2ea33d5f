r"""Named online rules as points on the learning-rule axes (:class:`~braintrace.ETraceConfig`).

=====================  ===================================================================
preset                 coordinates
=====================  ===================================================================
``EProp``              per-parameter traces (D-RTRL's), symmetric or random feedback,
                       optional kappa filter (Bellec et al. 2020)
``ThreeFactor``        per-parameter traces, a caller's modulator as the learning signal
``OSTLRecurrent``      per-parameter traces with the per-unit block of the intrinsic
                       dynamics (OSTL "with H", Bohnstingl et al. 2023; see its notes)
``OSTLFeedforward``    input/output factored traces with a negligible decay (OSTL
                       "without H", as the published releases define it)
=====================  ===================================================================

Each preset is its engine (:class:`~braintrace.ParamDimVjpAlgorithm` or
:class:`~braintrace.IODimVjpAlgorithm`) with a config; the keywords are those of the published
releases.
"""

from __future__ import annotations

import warnings
from typing import Optional

from braintrace._compiler.diagnostics import (
    CompilationRecord,
    DiagnosticKind,
    DiagnosticLevel,
    ETraceCompilationWarning,
)

from .axes import ETraceConfig
from .d_rtrl import ParamDimVjpAlgorithm
from .filters import check_kappa
from .pp_prop import IODimVjpAlgorithm

__all__ = ["EProp", "ThreeFactor", "OSTLRecurrent", "OSTLFeedforward"]


def _no_config(owner: str, kwargs):
    if "config" in kwargs:
        raise TypeError(
            f"{owner} fixes its own coordinates on the learning-rule axes; it takes no `config` (pass the "
            f"config to the engine instead: braintrace.compile(model, braintrace.ETraceConfig(...), x0))."
        )


class EProp(ParamDimVjpAlgorithm):
    r"""E-prop: eligibility traces times a learning signal (Bellec et al. 2020).

    For a weight :math:`W_{ji}` driving neuron :math:`j` (hidden state :math:`h_j`, ``n`` states),
    the eligibility vector :math:`\epsilon_{ji}^t = D_j^t\,\epsilon_{ji}^{t-1} +
    \partial h_j^t/\partial W_{ji}` is D-RTRL's trace (:math:`D_j^t`: the neuron's own
    ``n x n`` Jacobian, recurrent weights' outputs held fixed), and the gradient is

    .. math::
        \nabla_{W_{ji}} L = \sum_t \sum_s \delta_{j,s}^t\,\bar\epsilon_{ji,s}^t, \qquad
        \bar\epsilon^t = \kappa\,\bar\epsilon^{t-1} + \epsilon^t,

    where :math:`\delta_j^t = L_j^t\,\partial z_j^t/\partial h_j^t` is the learning signal
    :math:`L_j^t` at the neuron's output :math:`z_j^t` carried to its states by the neuron's own
    derivative (the pseudo-derivative :math:`\psi_j^t` of a spiking neuron), so that
    :math:`\delta\cdot\epsilon = L\,e` with e-prop's eligibility trace :math:`e = \psi\,\epsilon`.

    * ``feedback='symmetric'``: :math:`L^t = \bar y^t W_{out}^\top`, the exact
      :math:`\partial L_t/\partial z_t` through the read-out (:math:`\bar y^t` the output error).
    * ``feedback='random'``: :math:`L^t = \bar y^t B`, with a fixed random :math:`B`
      (``(n_out, n_layer)``, a :class:`~braintrace.FixedRandomFeedback` per trainable op that reads
      the hidden states, drawn from ``random_feedback_key``; :attr:`random_feedback` after
      compiling) in place of each such op's weight in the backward pass.
    * ``kappa_filter_decay`` :math:`\kappa`: the low-pass of the traces of the weights behind a
      read-out (the read-out's own weights keep their trace, which already carries its leak).
      :math:`\kappa = 0` is :class:`~braintrace.D_RTRL` exactly (with ``feedback='symmetric'``).

    The filter acts on the eligibility vector, before the pseudo-derivative: the gradient is
    :math:`\sum_t L^t \psi^t \bar\epsilon^t`, where the paper filters :math:`e = \psi\epsilon`
    (:math:`\sum_t L^t\,\overline{\psi\epsilon}^t`); the two agree for :math:`\kappa = 0` and
    where :math:`\psi` is constant over the filter's memory. Bellec et al.'s read-out is a leaky
    integrator of the spikes; with :class:`~braintrace.nn.LeakyRateReadout` its weights get its
    exact gradient :math:`\sum_t \bar y^t\,\mathcal F_{\alpha}(z)^t` from their own trace.

    Parameters
    ----------
    model : brainstate.nn.Module
    feedback : ``'symmetric'`` or ``'random'``
    kappa_filter_decay : float
        :math:`\kappa` in ``[0, 1)``; default 0 (no filter).
    random_feedback_key : JAX PRNG key or int, optional
        Required by ``feedback='random'``.
    name, vjp_method, fast_solve
        See :class:`~braintrace.ETraceVjpAlgorithm` (``vjp_method`` must be ``'single-step'``
        when a random feedback is used).
    **kwargs
        Other keywords of :class:`~braintrace.ParamDimVjpAlgorithm` (``trace_dtype``,
        ``chunked_trace``, ``snap_max_jacobian_elements``, ``normalize_matrix_spectrum``, ...);
        not ``config``.

    Raises
    ------
    ValueError
        An unknown ``feedback``; ``feedback='random'`` without a key; at compile time, a random
        feedback with no trainable op reading the hidden states, or a filter with nothing to
        filter (every hidden group a read-out).

    Examples
    --------
    >>> import brainstate, jax, jax.numpy as jnp, braintrace
    >>> class Net(brainstate.nn.Module):  # a recurrent layer and a leaky read-out
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.cell = braintrace.nn.ValinaRNNCell(2, 4)
    ...         self.w_out = brainstate.ParamState(jnp.full((4, 1), 0.5))
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.r = brainstate.HiddenState(jnp.zeros((batch_size, 1)))
    ...     def update(self, x):
    ...         self.r.value = 0.8 * self.r.value + braintrace.matmul(self.cell(x), self.w_out.value)
    ...         return self.r.value
    >>> learner = braintrace.compile(Net(), 'e_prop', jnp.zeros((3, 2)), batch_size=3,
    ...                              feedback='random', random_feedback_key=0, kappa_filter_decay=0.5)
    >>> [fb['weight'].B.shape for fb in learner.random_feedback.values()]  # (n_target, n_layer)
    [(4, 6), (1, 4)]
    >>> xs, ys = jnp.ones((5, 3, 2)), jnp.zeros((5, 3, 1))
    >>> grads = learner.etrace_grad(xs, ys, step_fn=lambda out, y: jnp.sum((out - y) ** 2))
    >>> grads[('w_out',)].shape
    (4, 1)
    """

    def __init__(
        self,
        model,
        feedback: str = "symmetric",
        kappa_filter_decay: float = 0.0,
        random_feedback_key=None,
        name: Optional[str] = None,
        vjp_method: str = "single-step",
        fast_solve: bool = True,
        **kwargs,
    ):
        if feedback not in ("symmetric", "random"):
            raise ValueError(f"EProp: `feedback` must be 'symmetric' or 'random', got {feedback!r}.")
        if feedback == "random" and random_feedback_key is None:
            raise ValueError(
                "EProp: feedback='random' draws its fixed feedback matrices from `random_feedback_key`; pass "
                "one (jax.random.PRNGKey(0), brainstate.random.split_key(), or an int seed)."
            )
        kappa = check_kappa(kappa_filter_decay, "EProp: `kappa_filter_decay`")
        _no_config("EProp", kwargs)
        config = ETraceConfig(
            learning_signal="random_feedback" if feedback == "random" else "symmetric",
            trace_filter="kappa" if kappa > 0 else "none",
            kappa=kappa if kappa > 0 else None,
        )
        super().__init__(
            model,
            name=name,
            vjp_method=vjp_method,
            fast_solve=fast_solve,
            config=config,
            random_feedback_key=random_feedback_key,
            **kwargs,
        )
        self.feedback = feedback
        self.kappa_filter_decay = kappa


class ThreeFactor(ParamDimVjpAlgorithm):
    r"""Three-factor learning: D-RTRL's traces contracted with a caller's modulator.

    .. math::
        \Delta\theta_t = \sum_s m_{t,s} \cdot \epsilon_{t,s}

    The modulator :math:`m_t` (a reward, a neuromodulator, a learning signal computed elsewhere)
    *replaces* :math:`\partial L_t/\partial h_t`: with :math:`m_t = \partial L_t/\partial h_t` the
    rule is :class:`~braintrace.D_RTRL`'s, with :math:`m_t = 0` it gives no trace gradient. One
    array serves every hidden group: a scalar, one value per unit (broadcast to each group's unit
    shape, shared by the unit's states), or one per unit and state. Per call,
    ``learner.update(x, modulator=m)`` (or ``learner(x, modulator=m)``); standing,
    ``learner.modulator = m``. Over a sequence, pass the modulators as a sequence and call the
    learner in ``step_fn``: ``etrace_grad(xs, ms, ys, step_fn=lambda x, m, y:
    loss(learner(x, modulator=m), y))``. The contraction of the previous step's traces (outputs
    reading earlier hidden values) is not formed: the modulator is the whole signal. Parameters
    used through plain ops still get their within-step gradient of the loss.

    Parameters
    ----------
    model : brainstate.nn.Module
    name : str, optional
    vjp_method : ``'single-step'``
        The only method: the modulator is a per-step signal.
    modulator : array, optional
        The standing modulator (as assigning :attr:`modulator`).
    fast_solve, trace_dtype, chunked_trace, control_flow, snap_max_jacobian_elements
        As :class:`~braintrace.ParamDimVjpAlgorithm`.

    Raises
    ------
    ValueError
        ``vjp_method='multi-step'``; a step with no modulator; a modulator whose shape fits no
        hidden group.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, braintrace
    >>> class Net(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = brainstate.ParamState(jnp.full((3, 4), 0.1))
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 4)))
    ...     def update(self, x):
    ...         self.h.value = 0.9 * self.h.value + braintrace.matmul(x, self.w.value)
    ...         return self.h.value
    >>> learner = braintrace.compile(Net(), 'three_factor', jnp.zeros((2, 3)), batch_size=2)
    >>> xs, rewards = jnp.ones((6, 2, 3)), jnp.linspace(-1.0, 1.0, 6)
    >>> step = lambda x, r: learner(x, modulator=r).sum()
    >>> grads = learner.etrace_grad(xs, rewards, step_fn=step, reduction='sum')
    >>> grads[('w',)].shape
    (3, 4)
    """

    def __init__(
        self,
        model,
        name: Optional[str] = None,
        vjp_method: str = "single-step",
        modulator=None,
        fast_solve: bool = True,
        trace_dtype=None,
        chunked_trace: bool = True,
        control_flow=None,
        snap_max_jacobian_elements: int = 16_777_216,
    ):
        if vjp_method != "single-step":
            raise ValueError(
                f"ThreeFactor: the modulator is a per-step learning signal; vjp_method must be "
                f"'single-step', got {vjp_method!r}."
            )
        super().__init__(
            model,
            name=name,
            vjp_method=vjp_method,
            fast_solve=fast_solve,
            trace_dtype=trace_dtype,
            chunked_trace=chunked_trace,
            control_flow=control_flow,
            config=ETraceConfig(learning_signal="modulatory"),
            snap_max_jacobian_elements=snap_max_jacobian_elements,
        )
        self.modulator = modulator


class OSTLRecurrent(ParamDimVjpAlgorithm):
    r"""OSTL with the recurrent Jacobian kept, as this package computes it (Bohnstingl et al. 2023).

    OSTL separates the gradient into a spatial learning signal
    :math:`\partial L_t/\partial h_t` and temporal eligibility traces
    :math:`\epsilon_t = D_t\epsilon_{t-1} + \partial h_t/\partial\theta`, which is
    :class:`~braintrace.D_RTRL`'s trace. This preset is D-RTRL's rule, with :math:`D_t` the
    per-unit block of the neurons' own dynamics (``recurrence_scope='diagonal'``); it equals OSTL's
    definition where no trainable ETP weight reads the hidden values it moves (a feed-forward
    spiking layer, leaky or adaptive units fed by ETP weights). The published releases compute
    OSTL's recurrent term as the per-unit block of the coupled Jacobian
    (``recurrence_scope='coupled'``: a recurrent weight's coupling of each unit to itself), which
    this package does not provide: for every recurrent ETP weight of the model, compiling records
    a ``RECURRENT_ETP_WEIGHT`` warning (one record per weight, one warning per compile) that its
    gradient is D-RTRL's, not OSTL's.

    Parameters
    ----------
    model : brainstate.nn.Module
    name, vjp_method, fast_solve, trace_dtype, chunked_trace, control_flow, random_feedback_key
        As :class:`~braintrace.ParamDimVjpAlgorithm`.
    config : ETraceConfig, optional
        As :class:`~braintrace.ParamDimVjpAlgorithm` (its ``recurrence_scope`` is ``'diagonal'``).

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, braintrace
    >>> class Net(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = brainstate.ParamState(jnp.full((3, 4), 0.1))
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 4)))
    ...     def update(self, x):
    ...         self.h.value = 0.9 * self.h.value + braintrace.matmul(x, self.w.value)
    ...         return self.h.value
    >>> learner = braintrace.compile(Net(), 'ostl_recurrent', jnp.zeros((2, 3)), batch_size=2)
    >>> learner.regime, [rec.kind.value for rec in learner.graph.records]
    ('with-H', [])
    """

    #: The OSTL regime of the published releases.
    regime = "with-H"

    def _build(self):
        super()._build()
        records = self.graph.records
        found = []
        for i, rec in enumerate(records):
            if rec.kind is DiagnosticKind.RECURRENT_ETP_WEIGHT:
                message = (
                    f"OSTLRecurrent: OSTL's with-H rule carries the recurrent weight(s) "
                    f"{list(rec.subject or ())} through their own coupling of each unit (the published "
                    f"recurrence_scope='coupled'); this package computes the per-unit block of the "
                    f"intrinsic dynamics, which leaves that path out, so their online gradient is D-RTRL's, "
                    f"not OSTL's. ({rec.message})"
                )
                records[i] = CompilationRecord(rec.kind, DiagnosticLevel.WARNING, message, rec.subject)
                found.extend(rec.subject or ())
        if found:
            warnings.warn(
                f"OSTLRecurrent: the online gradient of the recurrent weight(s) {sorted(set(found))} is "
                f"D-RTRL's (recurrent coupling left out of D), not OSTL's with-H rule; one record per "
                f"weight in `graph.records`.",
                ETraceCompilationWarning,
                stacklevel=4,
            )


class OSTLFeedforward(IODimVjpAlgorithm):
    r"""OSTL without the recurrent Jacobian, as the published releases define it.

    The temporal term of the traces is dropped: :class:`~braintrace.IODimVjpAlgorithm`'s factored
    traces with a negligible decay, so that

    .. math::
        \nabla_\theta L_t \approx \mathrm{xy\_to\_dw}\!\left(x_t,\;
        \frac{\partial L_t}{\partial h_t} \odot df_t\right)

    (exactly this for ``decay_or_rank=1``, :math:`\lambda = 0`; the default ``1e-6`` keeps the
    published releases' gradients). Biases and element-wise weights keep pp_prop's exact per-unit
    trace. For units with memory (a leak), this is the within-step part of the gradient only.

    Parameters
    ----------
    model : brainstate.nn.Module
    decay_or_rank : float or int
        As :class:`~braintrace.IODimVjpAlgorithm`; default ``1e-6``.
    name : str, optional
    **kwargs
        Other keywords of :class:`~braintrace.IODimVjpAlgorithm`.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, braintrace
    >>> class Net(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = brainstate.ParamState(jnp.full((3, 4), 0.1))
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 4)))
    ...     def update(self, x):
    ...         self.h.value = 0.9 * self.h.value + braintrace.matmul(x, self.w.value)
    ...         return self.h.value
    >>> learner = braintrace.compile(Net(), 'ostl_feedforward', jnp.zeros((2, 3)), batch_size=2)
    >>> learner.regime, learner.decay
    ('without-H', 1e-06)
    """

    #: The OSTL regime of the published releases.
    regime = "without-H"

    def __init__(self, model, decay_or_rank=1e-6, name: Optional[str] = None, **kwargs):
        super().__init__(model, decay_or_rank=decay_or_rank, name=name, **kwargs)

    def _rule_approximations(self):
        return super()._rule_approximations() + [
            "the temporal term of the traces is dropped (the within-step gradient, for units with memory)"
        ]
