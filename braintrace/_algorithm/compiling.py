"""``braintrace.compile``: a model, a rule (a name, a class, or an :class:`ETraceConfig`) and
example inputs in, a compiled learner out."""

from __future__ import annotations

import inspect
from typing import Optional, Union

import brainstate

from .axes import ETraceConfig
from .base import ETraceAlgorithm
from .d_rtrl import D_RTRL, ParamDimVjpAlgorithm
from .dni import DNI
from .pp_prop import IODimVjpAlgorithm
from .presets import EProp, OSTLFeedforward, OSTLRecurrent, ThreeFactor

__all__ = ["compile", "ALGORITHMS", "resolve_algorithm"]

#: Algorithm names accepted by :func:`compile`, and the classes they select.
ALGORITHMS = {
    "d_rtrl": D_RTRL,
    "es_d_rtrl": IODimVjpAlgorithm,
    "esd_rtrl": IODimVjpAlgorithm,
    "pp_prop": IODimVjpAlgorithm,
    "eprop": EProp,
    "e_prop": EProp,
    "three_factor": ThreeFactor,
    "ostl_recurrent": OSTLRecurrent,
    "ostl_feedforward": OSTLFeedforward,
    "dni": DNI,
}

#: Names of the influence-matrix algorithms: ``braintrace.<class>`` looked up when compiling.
_INFLUENCE = {"rtrl": "RTRL", "snap": "SnAp", "uoro": "UORO"}

#: Names of the published releases that this package does not provide.
_NOT_PROVIDED = {}


def _package_class(name: str, why: str):
    import braintrace

    cls = getattr(braintrace, name, None)
    if cls is None:
        raise NotImplementedError(
            f"braintrace.compile: {why} is computed by braintrace.{name}, which this installation does not "
            f"provide."
        )
    return cls


def resolve_algorithm(algorithm):
    """``(class, extra constructor options)`` for a name, a class or an :class:`ETraceConfig`."""
    if isinstance(algorithm, ETraceConfig):
        cfg = algorithm
        if cfg.trace_factorization == "io_factorized":
            return IODimVjpAlgorithm, {"config": cfg}
        if cfg.trace_factorization == "random_projection":
            return _package_class("UORO", "trace_factorization='random_projection'"), {"config": cfg}
        if cfg.recurrence_scope == "full":
            return _package_class("RTRL", "recurrence_scope='full'"), {"config": cfg}
        if cfg.recurrence_scope == "sparse_n":
            return _package_class("SnAp", "recurrence_scope='sparse_n'"), {"config": cfg}
        if cfg.learning_signal == "bootstrapped":
            return DNI, {"config": cfg}
        return ParamDimVjpAlgorithm, {"config": cfg}
    if isinstance(algorithm, str):
        key = algorithm.strip().lower()
        if key in ALGORITHMS:
            return ALGORITHMS[key], {}
        if key in _INFLUENCE:
            return _package_class(_INFLUENCE[key], f"{algorithm!r}"), {}
        if key in _NOT_PROVIDED:
            raise NotImplementedError(
                f"braintrace.compile: {algorithm!r} ({_NOT_PROVIDED[key]}) is an algorithm of the published "
                f"releases that this package does not provide."
            )
        names = sorted({*ALGORITHMS, *_INFLUENCE})
        raise ValueError(
            f"braintrace.compile: unknown algorithm {algorithm!r}; expected one of {names}, an "
            f"ETraceAlgorithm class, or a braintrace.ETraceConfig."
        )
    if isinstance(algorithm, type) and issubclass(algorithm, ETraceAlgorithm):
        return algorithm, {}
    raise TypeError(
        f"braintrace.compile: `algorithm` must be a name, an ETraceAlgorithm class or instance, or a "
        f"braintrace.ETraceConfig; got {algorithm!r}."
    )


def _config_options(cls, cfg: ETraceConfig, options: dict) -> dict:
    """The constructor options for ``cls`` built from the config ``cfg``: the config itself for an
    engine that declares the config's scope (``_scopes``) and factorization (``_factorization``);
    for the influence-matrix algorithms otherwise, the keywords that select the same coordinates
    (``n`` for SnAp), the other axes at their defaults."""
    if "config" in options:
        raise TypeError("braintrace.compile: the config was given twice (as `algorithm` and as `config=`).")
    declared = cfg.recurrence_scope in getattr(cls, "_scopes", ()) and cfg.trace_factorization == getattr(
        cls, "_factorization", None
    )
    if cfg.recurrence_scope in ("full", "sparse_n") or cfg.trace_factorization == "random_projection":
        if not declared:
            default = ETraceConfig()
            for axis in ("learning_signal", "trace_filter", "temporal_recursion", "update_schedule"):
                if getattr(cfg, axis) != getattr(default, axis):
                    raise NotImplementedError(
                        f"braintrace.compile: {cls.__name__} computes its influence matrix with the "
                        f"default {axis}; {axis}={getattr(cfg, axis)!r} is not provided with it."
                    )
            return {**options, "n": cfg.sparse_n} if cfg.recurrence_scope == "sparse_n" else dict(options)
    params = inspect.signature(cls.__init__).parameters
    if "config" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {**options, "config": cfg}
    raise TypeError(
        f"braintrace.compile: {cls.__name__} takes no `config`, so the coordinates {cfg.describe()} cannot "
        f"be given to it."
    )


def compile(
    model,
    algorithm: Union[str, type, ETraceAlgorithm, ETraceConfig] = "d_rtrl",
    *example_inputs,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    verbose: int = 0,
    vmap: bool = False,
    **options,
) -> ETraceAlgorithm:
    """Initialise ``model``'s states, wrap it in ``algorithm`` and compile the graph.

    Parameters
    ----------
    model : brainstate.nn.Module
    algorithm : str, class, ETraceAlgorithm or ETraceConfig
        A name (case-insensitive): ``'d_rtrl'``; ``'pp_prop'`` / ``'es_d_rtrl'`` /
        ``'esd_rtrl'``; ``'eprop'`` / ``'e_prop'`` (:class:`~braintrace.EProp`);
        ``'three_factor'``; ``'ostl_recurrent'``; ``'ostl_feedforward'``; ``'dni'``
        (:class:`~braintrace.DNI`); ``'rtrl'``, ``'snap'``
        (``n=`` its order) and ``'uoro'`` (``braintrace.RTRL`` / ``SnAp`` / ``UORO``). An
        algorithm class, an uncompiled instance wrapping ``model``, or an
        :class:`~braintrace.ETraceConfig`, which selects the engine from its coordinates
        (``'per_param'`` with the diagonal scope: :class:`~braintrace.ParamDimVjpAlgorithm`, or
        :class:`~braintrace.DNI` with ``learning_signal='bootstrapped'``;
        ``'io_factorized'``: :class:`~braintrace.IODimVjpAlgorithm`; the full or SnAp scope and
        the random projection: the influence-matrix algorithms) and is passed to it.
    *example_inputs
        One step's inputs (shapes only).
    batch_size : int, optional
        When given, ``brainstate.nn.init_all_states(model, batch_size=batch_size)`` runs first;
        without it, a model whose states are not initialised yet is initialised unbatched.
    seed : int, optional
        Seeds ``brainstate.random`` before the states are initialised.
    verbose : int
        ``> 0`` prints the compiled graph's summary (relations, groups and records).
    vmap : bool
        ``True``: the model's states are created for one example and the learner compiled for it,
        both mapped over ``batch_size`` lanes (``example_inputs`` carry that batch axis first); returns
        a :class:`~braintrace.ETraceVmap`.
    **options
        Passed to the algorithm's constructor (e.g. ``decay_or_rank=0.9`` for pp_prop,
        ``feedback='random', random_feedback_key=0`` for e-prop).

    Returns
    -------
    ETraceAlgorithm
        Compiled and ready: call it per step, or use :meth:`ETraceAlgorithm.etrace_grad`.

    Raises
    ------
    ValueError
        An unknown name.
    TypeError
        An ``algorithm`` of another kind; a config given both as ``algorithm`` and ``config=``.
    NotImplementedError
        A name or a config coordinate whose algorithm this installation does not provide.

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
    >>> learner = braintrace.compile(Leaky(), 'pp_prop', jnp.zeros((4, 2)), batch_size=4, decay_or_rank=0.8)
    >>> xs, ys = jnp.ones((10, 4, 2)), jnp.zeros((10, 4, 3))
    >>> grads = learner.etrace_grad(xs, ys, step_fn=lambda out, y: jnp.mean((out - y) ** 2))
    >>> grads[('w',)].shape
    (2, 3)
    >>> cfg = braintrace.ETraceConfig(trace_factorization='io_factorized', decay=(0.5, 0.8))
    >>> type(braintrace.compile(Leaky(), cfg, jnp.zeros((4, 2)), batch_size=4)).__name__
    'IODimVjpAlgorithm'
    """
    if isinstance(algorithm, ETraceAlgorithm):
        if options:
            raise TypeError("Options cannot be passed with an algorithm instance.")
        if algorithm.model is not model:
            raise ValueError("The algorithm instance wraps a different model.")
        alg = None
    else:
        cls, extra = resolve_algorithm(algorithm)
        if "config" in extra:
            options = _config_options(cls, extra["config"], options)
    if vmap:  # one learner compiled for one example, its states mapped over batch_size lanes
        from .vmap import compile_vmap

        alg = algorithm if isinstance(algorithm, ETraceAlgorithm) else cls(model, **options)
        return compile_vmap(alg, *example_inputs, batch_size=batch_size, seed=seed, verbose=verbose)
    if seed is not None:
        brainstate.random.seed(seed)
    if batch_size is not None:
        brainstate.nn.init_all_states(model, batch_size=batch_size)
    elif not model.states(brainstate.HiddenState):
        brainstate.nn.init_all_states(model)
    alg = algorithm if isinstance(algorithm, ETraceAlgorithm) else cls(model, **options)
    alg.compile_graph(*example_inputs)
    if verbose:
        print(alg.graph.summary())
    return alg
