"""``CompilationReport``: a read-only summary of a compiled :class:`~braintrace.ETraceGraph`.

The published report object: the hidden groups, the parameters that carry eligibility traces (with
the groups they drive), the parameters that do not (with the reason the compiler recorded), the
non-hidden short-term states, and the compiler's records, as data and as text. Paths are the state
paths of ``model.states()`` (tuples such as ``('cell', 'weight')``).
"""

from __future__ import annotations

from typing import IO, Dict, List, Optional, Tuple

import brainstate

from .diagnostics import CompilationRecord, DiagnosticKind, DiagnosticLevel

__all__ = ["CompilationReport"]

Path = Tuple[str, ...]

#: Record kinds that say why a parameter carries no eligibility trace.
_EXCLUSION_KINDS = (
    DiagnosticKind.WEIGHT_NOT_REACHING_HIDDEN,
    DiagnosticKind.TRAINABLE_DEPENDS_ON_STATE,
    DiagnosticKind.SHAPE_MISMATCH,
    DiagnosticKind.PLAIN_PARAMETER,
)


class CompilationReport:
    """A read-only view of a compiled graph: what carries a trace, what does not, and why.

    Parameters
    ----------
    graph : ETraceGraph
        From :func:`~braintrace.compile_etrace_graph` (or ``learner.graph``).

    Attributes
    ----------
    graph : ETraceGraph
    hidden_groups : list of (int, list of path)
        Each hidden group's index and its hidden states' paths.
    etrace_weights : list of (path, list of int)
        Each parameter of each relation, with the indices of the groups the relation drives.
    excluded_weights : list of (path, str or None)
        Parameters in no relation, with the kind of the first record that says why (its value, e.g.
        ``'weight_not_reaching_hidden'``, ``'plain_parameter'``).
    dynamic_states : list of path
        Short-term states in no hidden group (non-float hidden states included).
    diagnostics : tuple of CompilationRecord
        The compiler's records, in order.
    counts : dict
        ``hidden_groups``, ``etrace_weights``, ``excluded_weights``, ``warnings``, ``errors``.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, braintrace
    >>> class Cell(brainstate.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = brainstate.ParamState(jnp.ones((2, 3)) * 0.1)
    ...         self.b = brainstate.ParamState(jnp.zeros(3))
    ...     def init_state(self, batch_size=None, **kw):
    ...         self.h = brainstate.HiddenState(jnp.zeros((batch_size, 3)))
    ...     def update(self, x):
    ...         self.h.value = 0.9 * self.h.value + braintrace.matmul(x, self.w.value) + self.b.value
    ...         return self.h.value
    >>> model = Cell(); _ = brainstate.nn.init_all_states(model, batch_size=4)
    >>> report = braintrace.CompilationReport(braintrace.compile_etrace_graph(model, jnp.zeros((4, 2))))
    >>> report
    CompilationReport(hidden_groups=1, etrace_weights=1, excluded_weights=1, warnings=0, errors=0)
    >>> report.etrace_weights, report.excluded_weights
    ([(('w',), [0])], [(('b',), 'plain_parameter')])
    """

    def __init__(self, graph):
        if not hasattr(graph, "hidden_param_op_relations") or not hasattr(graph, "module_info"):
            raise TypeError(f"CompilationReport: `graph` must be an ETraceGraph, got {type(graph).__name__}.")
        self._graph = graph

    @property
    def graph(self):
        """The wrapped :class:`~braintrace.ETraceGraph`."""
        return self._graph

    def _path(self, state_index: int) -> Path:
        return tuple(self._graph.module_info.paths[state_index])

    @property
    def hidden_groups(self) -> List[Tuple[int, List[Path]]]:
        out = []
        for g in self._graph.hidden_groups:
            paths: List[Path] = []
            for h in g.hidden_leaves:
                if self._path(h.state_index) not in paths:
                    paths.append(self._path(h.state_index))
            out.append((g.index, paths))
        return out

    def _paths_by_name(self) -> Dict[str, Path]:
        info = self._graph.module_info
        return {info.path_of(i): self._path(i) for i in info.param_states}

    @property
    def etrace_weights(self) -> List[Tuple[Path, List[int]]]:
        by_name = self._paths_by_name()
        out = []
        for r in self._graph.hidden_param_op_relations:
            groups = [g.index for g in r.hidden_groups]
            seen: List[Path] = []
            for names in r.param_paths.values():
                for name in names:
                    path = by_name[name]
                    if path not in seen:
                        seen.append(path)
                        out.append((path, groups))
        return out

    @property
    def excluded_weights(self) -> List[Tuple[Path, Optional[str]]]:
        info = self._graph.module_info
        by_name = self._paths_by_name()
        traced = {path for path, _ in self.etrace_weights}
        reasons: Dict[Path, str] = {}
        for rec in self._graph.records:
            if rec.kind not in _EXCLUSION_KINDS:
                continue
            paths = [rec.weight_path] if rec.weight_path is not None else []
            paths += [by_name[n] for n in rec.subject or () if n in by_name]
            for path in paths:
                reasons.setdefault(tuple(path), rec.kind.value)
        params = [self._path(i) for i in info.param_states]
        return [(p, reasons.get(p)) for p in params if p not in traced]

    @property
    def dynamic_states(self) -> List[Path]:
        info = self._graph.module_info
        hidden = {h.state_index for g in self._graph.hidden_groups for h in g.hidden_leaves}
        return [
            self._path(i)
            for i, s in enumerate(info.states)
            if isinstance(s, brainstate.ShortTermState) and i not in hidden
        ]

    @property
    def diagnostics(self) -> Tuple[CompilationRecord, ...]:
        return tuple(self._graph.records)

    @property
    def counts(self) -> Dict[str, int]:
        records = self._graph.records
        return {
            "hidden_groups": len(self._graph.hidden_groups),
            "etrace_weights": len(self.etrace_weights),
            "excluded_weights": len(self.excluded_weights),
            "warnings": sum(r.level is DiagnosticLevel.WARNING for r in records),
            "errors": sum(r.level is DiagnosticLevel.ERROR for r in records),
        }

    def to_str(self, level: int = 1) -> str:
        """The report as text: the structure (``level=1``), and the compiler's warnings and errors
        (``level=2``)."""
        if level not in (1, 2):
            raise ValueError(f"CompilationReport.to_str: `level` must be 1 or 2, got {level!r}.")
        rule = "=" * 120
        lines = [rule, "The hidden groups are:", ""]
        lines += [f"   Group {i}: {paths}" for i, paths in self.hidden_groups]
        dynamic = self.dynamic_states
        if dynamic:
            lines += ["", "The dynamic (non-hidden) states are:", ""]
            lines += [f"   Dynamic state {i}: {p}" for i, p in enumerate(dynamic)]
        weights = self.etrace_weights
        if weights:
            lines += ["", "The weight parameters which are associated with the hidden states are:", ""]
            for i, (path, groups) in enumerate(weights):
                which = f"hidden group {groups[0]}" if len(groups) == 1 else f"hidden groups {groups}"
                lines.append(f"   Weight {i}: {path}  is associated with {which}")
        excluded = self.excluded_weights
        if excluded:
            lines += ["", "The non-etrace weight parameters are:", ""]
            for i, (path, reason) in enumerate(excluded):
                lines.append(f"   Weight {i}: {path}" + (f"  (excluded: {reason})" if reason else ""))
        if level >= 2:
            serious = [r for r in self._graph.records if r.level is not DiagnosticLevel.INFO]
            if serious:
                lines += ["", "Compiler diagnostics (warnings / errors):", ""]
                lines += [f"   {r}" for r in serious]
        return "\n".join(lines) + "\n"

    def show(self, level: int = 1, *, file: Optional[IO[str]] = None) -> None:
        """Print :meth:`to_str` to ``file`` (standard output by default)."""
        print(self.to_str(level), file=file)

    def __repr__(self) -> str:
        c = self.counts
        return (
            f"CompilationReport(hidden_groups={c['hidden_groups']}, etrace_weights={c['etrace_weights']}, "
            f"excluded_weights={c['excluded_weights']}, warnings={c['warnings']}, errors={c['errors']})"
        )
