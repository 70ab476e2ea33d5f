r"""Two-operand einsum ETP primitives ``etp_einsum`` (batched) and ``etp_einsum_v`` (unbatched).

Forward: :math:`y = \mathrm{einsum}(\mathrm{equation}, x, W)`, any explicit two-operand equation
``'x_spec,w_spec->y_spec'`` (one letter per axis). The output is linear in ``W``.

Invars: ``x, W``; static param ``equation`` (normalised, no ellipsis); trainable layout
``{'weight': 1}``. ``etp_einsum`` is batched: the first letter of ``x_spec`` and of ``y_spec`` is
the batch letter and does not appear in ``w_spec`` (the form of the published releases);
``etp_einsum_v`` is every other equation, its ``y`` broadcast over the batch axes of the hidden
states it drives.

Axis classes. The compiler takes ``y``'s axes as the hidden states' unit axes, so every output
letter indexes units. A weight letter is *diagonal* when it is in ``y_spec`` (the unit owns that
slice of ``W``) and *contracted* otherwise (it must then be in ``x_spec``). An output letter absent
from ``w_spec`` is a *position*: the batch letter, and every *shared* letter along which ``W`` is
reused (``t`` in ``'btk,kn->btn'``). Letters of ``x_spec`` alone are summed.

ETP rules (``g = \partial h/\partial y`` for one hidden state, shape of ``y``):

* ``xy_to_dw(x, g, {W})`` — the VJP of the op: ``einsum('x_spec,y_spec->w_spec', x, g)``.
* ``yw_to_w(d, trace)`` — the ``y -> W`` link on a trace laid out as
  ``(*lead, *positions, *W.shape)`` (``lead``: the batch axes of ``d`` that ``y`` lacks):
  :math:`\epsilon_{\dots p w} \leftarrow d_{\dots y(p, w)}\,\epsilon_{\dots p w}`, where the unit
  :math:`y(p, w)` is fixed by the position letters and the diagonal letters of ``w``. Without shared
  letters the trace is weight-shaped (``(B, *W.shape)`` for ``etp_einsum``), as for ``matmul``.
* ``init_drtrl`` — ``{'weight': zeros(*positions, *W.shape, n)}`` (positions include the batch).
* ``init_pp`` — the output-shaped df trace ``(*y.shape, n)``.

D-RTRL trace. One leaf per relation and hidden group,
``(*lead, *positions, *W.shape, n)``: exact for every equation, because each unit keeps its own
column of the trace: along a shared axis ``t`` the trace keeps one slice per position (as ``conv``
keeps one per output position), so a ``D`` that varies along ``t`` is applied per position. With
:math:`U` the unit of each trace entry,

.. math::
    \epsilon_t[\dots, s] = \sum_j D_t[U, s, j]\,\epsilon_{t-1}[\dots, j]
        + \frac{\partial y_U}{\partial W_w}\, df_t[U, s], \qquad
    \nabla W_w = \sum_{\text{lead},\,\text{positions},\,s}
        \frac{\partial L}{\partial h_{U,s}}\,\epsilon[\dots, s],

each one ``einsum`` (``_trace_update`` / ``_trace_solve``). Without shared letters the trace is the
dense layout ``(B, *W.shape, n)``.

Registration: the two primitives are registered on first use (the first call of :func:`einsum`),
as the grouped ones are (see :mod:`braintrace._etrace_op.grouped`).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Tuple

import jax
import jax.numpy as jnp

from . import _trace_ops
from ._registries import ETP_PRIMITIVES
from ._spec import ETPPrimitiveSpec, register_primitive_spec
from ._units import attach, split
from .dense import apply_operand_fn

__all__ = ["einsum", "einsum_primitives", "parse_einsum_equation", "EinsumEquation"]

_LETTERS = frozenset(string.ascii_letters)


@dataclasses.dataclass(frozen=True)
class EinsumEquation:
    """A validated two-operand equation ``x,w->y`` without ellipsis, classified for the rules."""

    x: str
    w: str
    y: str

    @property
    def text(self) -> str:
        return f"{self.x},{self.w}->{self.y}"

    @property
    def positions(self) -> str:
        """Output letters absent from the weight (batch and shared letters), in output order."""
        return "".join(c for c in self.y if c not in self.w)

    @property
    def shared(self) -> str:
        """Positions other than a leading batch letter."""
        return self.positions[1:] if self.has_batch_form else self.positions

    @property
    def has_batch_form(self) -> bool:
        """The first letters of ``x`` and ``y`` agree and are not weight letters (``etp_einsum``)."""
        return bool(self.x) and bool(self.y) and self.x[0] == self.y[0] and self.x[0] not in self.w

    def fresh(self, k: int) -> str:
        """``k`` letters that the equation does not use."""
        free = sorted(_LETTERS - set(self.x + self.w + self.y))
        if k > len(free):
            raise ValueError(f"einsum: `equation` {self.text!r} leaves too few free letters.")
        return "".join(free[:k])


def _bad(equation, why: str) -> ValueError:
    return ValueError(f"einsum: `equation` {equation!r} is not supported: {why}")


def parse_einsum_equation(equation: str, x_ndim=None) -> Tuple[EinsumEquation, int]:
    """Validate ``equation`` and expand an ellipsis: ``(EinsumEquation, number of ellipsis axes)``.

    Rules: explicit (``'->'``), two operands, letters ``a-z A-Z`` only, no letter twice in one
    operand or in the output; an ellipsis only at the start of ``x`` and of the output (broadcast
    batch axes, expanded with ``x_ndim``), never in the weight; every output letter in ``x`` or the
    weight; every weight letter in ``x`` or the output (a weight axis that meets neither would be
    summed away). Violations raise ``ValueError`` naming ``equation``.
    """
    if not isinstance(equation, str):
        raise TypeError(
            f"einsum: `equation` must be a str such as 'bi,ij->bj', got {type(equation).__name__}."
        )
    eq = equation.replace(" ", "")
    if eq.count("->") != 1:
        raise _bad(equation, "give the output explicitly, one '->' (e.g. 'bi,ij->bj').")
    lhs, y = eq.split("->")
    ops = lhs.split(",")
    if len(ops) != 2:
        raise _bad(equation, f"it has {len(ops)} operand(s); exactly two (x, weight) are required.")
    x, w = ops
    if "." in w:
        raise _bad(equation, "the weight's axes must be named, without an ellipsis.")
    n_ell = 0
    if "." in x or "." in y:
        if not (x.startswith("...") and y.startswith("...")) or "." in x[3:] or "." in y[3:]:
            raise _bad(equation, "an ellipsis may only lead both x and the output ('...i,ij->...j').")
        x, y = x[3:], y[3:]
        if x_ndim is None:
            raise _bad(equation, "an ellipsis needs the rank of x.")
        n_ell = x_ndim - len(x)
        if n_ell < 0:
            raise _bad(equation, f"x has rank {x_ndim}, fewer than the {len(x)} named axes of x.")
    for name, spec in (("x", x), ("weight", w), ("output", y)):
        if not set(spec) <= _LETTERS:
            raise _bad(equation, f"the {name} axes must be letters, got {spec!r}.")
        if len(set(spec)) != len(spec):
            raise _bad(equation, f"a letter repeats in the {name} axes {spec!r}.")
    if not w:
        raise _bad(equation, "the weight needs at least one axis.")
    stray = sorted(set(y) - set(x) - set(w))
    if stray:
        raise _bad(equation, f"output letters {stray} appear in no operand.")
    orphan = sorted(set(w) - set(x) - set(y))
    if orphan:
        raise _bad(
            equation,
            f"weight letters {orphan} appear neither in x nor in the output; every weight axis must be "
            f"contracted with x or index the output.",
        )
    if n_ell:
        lead = EinsumEquation(x, w, y).fresh(n_ell)
        x, y = lead + x, lead + y
    return EinsumEquation(x, w, y), n_ell


def _spec_of(params) -> EinsumEquation:
    return parse_einsum_equation(params["equation"])[0]


# ---------------------------------------------------------------------------------------------
# Implementation and rules
# ---------------------------------------------------------------------------------------------


def _einsum_impl(x, w, *, equation):
    return jnp.einsum(equation, x, w)


def _einsum_trainable_invars(params):
    return {"weight": 1}


def _einsum_xy_to_dw(x, hidden_dim, weights, *, equation):
    """``{'weight': einsum('x_spec,y_spec->w_spec', x, g)}``: the VJP of the op."""
    e = _spec_of({"equation": equation})
    w = weights["weight"]
    g = jnp.asarray(hidden_dim, dtype=jnp.result_type(x, w))
    return {"weight": jnp.einsum(f"{e.x},{e.y}->{e.w}", x, g).astype(w.dtype)}


def _lead_letters(e: EinsumEquation, d_ndim: int) -> str:
    k = d_ndim - len(e.y)
    if k < 0:
        raise ValueError(f"einsum rules: `hidden_dim` of rank {d_ndim} is shorter than the output {e.y!r}.")
    return e.fresh(k)


def _einsum_yw_to_w(hidden_dim, trace, *, equation):
    """Scale the trace ``(*lead, *positions, *W.shape)`` by ``hidden_dim`` ``(*lead, *y.shape)`` at
    each entry's unit (see the module docstring)."""
    e = _spec_of({"equation": equation})
    lead = _lead_letters(e, jnp.ndim(hidden_dim))
    t = f"{lead}{e.positions}{e.w}"
    return {"weight": jnp.einsum(f"{lead}{e.y},{t}->{t}", hidden_dim, trace["weight"])}


def _trace_shape(e: EinsumEquation, y_shape, w_shape):
    return tuple(y_shape[e.y.index(c)] for c in e.positions) + tuple(w_shape)


def _make_init_drtrl(batched: bool):
    """The rule ``init_drtrl``: ``{'weight': zeros(B, *W.shape, n)}`` (``etp_einsum``) or
    ``zeros(*W.shape, n)`` (``etp_einsum_v``), the weight-shaped layout of an equation without shared
    letters. Init rules do not receive the equation; the D-RTRL trace operations use
    :func:`_trace_init`, which adds the shared axes."""

    def init_drtrl(x_var, y_var, weight_vars, num_hidden_state):
        lead = tuple(x_var.aval.shape[:1]) if batched else ()
        return _trace_ops.param_trace_zeros(lead, weight_vars, num_hidden_state)

    return init_drtrl


def _trace_init(x_var, y_var, weight_vars, n, batch_shape, params):
    e = _spec_of(params)
    w = weight_vars["weight"].aval
    shape = (*batch_shape, *_trace_shape(e, y_var.aval.shape, w.shape), n)
    return {"weight": jnp.zeros(shape, w.dtype)}


def _compute_dtype(dtype):
    """float64 for a float64 trace, float32 otherwise (a bfloat16 trace is storage only)."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _trace_update(trace, d, x, df, weights, params, batch_ndim):
    r"""``new[..., s] = sum_j D[U, s, j] eps[..., j] + einsum(x, df[..., s])`` (one einsum each)."""
    e = _spec_of(params)
    tr = trace["weight"]
    acc = _compute_dtype(tr.dtype)
    lead = _lead_letters(e, df.ndim - 1)
    s, j = EinsumEquation(e.x + lead, e.w, e.y).fresh(2)
    t = f"{lead}{e.positions}{e.w}"
    prop = jnp.einsum(f"{lead}{e.y}{s}{j},{t}{j}->{t}{s}", d.astype(acc), tr.astype(acc))
    inst = jnp.einsum(f"{e.x},{lead}{e.y}{s}->{t}{s}", x.astype(acc), df.astype(acc))
    return {"weight": (prop + inst).astype(tr.dtype)}


def _trace_solve(trace, ct, weights, params, batch_ndim):
    r"""``dW = sum_{lead, positions, s} ct[U, s] eps[..., s]``."""
    e = _spec_of(params)
    tr = trace["weight"]
    acc = _compute_dtype(tr.dtype)
    lead = _lead_letters(e, ct.ndim - 1)
    (s,) = EinsumEquation(e.x + lead, e.w, e.y).fresh(1)
    dw = jnp.einsum(f"{lead}{e.y}{s},{lead}{e.positions}{e.w}{s}->{e.w}", ct.astype(acc), tr.astype(acc))
    return {"weight": dw.astype(weights["weight"].dtype)}


def _einsum_batching(args, dims, *, equation):
    """Keep the marker when only ``x`` is mapped: ``etp_einsum_v`` gains a batch letter and becomes
    ``etp_einsum``; ``etp_einsum`` folds the mapped axis into its batch axis."""
    (x, w), (dx, dw) = args, dims
    if dw is not None or dx is None:
        return jax.vmap(lambda a, b: _einsum_impl(a, b, equation=equation), in_axes=(dx, dw))(x, w), 0
    x = jnp.moveaxis(x, dx, 0)
    e = _spec_of({"equation": equation})
    batched = _registered("etp_einsum")
    if e.has_batch_form:
        v, b = x.shape[:2]
        y = batched.bind(x.reshape((v * b, *x.shape[2:])), w, equation=equation)
        return y.reshape((v, b, *y.shape[1:])), 0
    (c,) = e.fresh(1)
    return batched.bind(x, w, equation=f"{c}{e.x},{e.w}->{c}{e.y}"), 0


_SPECS = {
    name: ETPPrimitiveSpec(
        name=name,
        impl=_einsum_impl,
        yw_to_w=_einsum_yw_to_w,
        xy_to_dw=_einsum_xy_to_dw,
        init_drtrl=_make_init_drtrl(batched),
        init_pp=_trace_ops.output_trace_zeros,
        trainable_invars_fn=_einsum_trainable_invars,
        x_invar_index=0,
        batched=batched,
        batching_rule=_einsum_batching,
    )
    for name, batched in (("etp_einsum", True), ("etp_einsum_v", False))
}
_TRACE_OPS = _trace_ops.DRTRLTraceOps(init=_trace_init, update=_trace_update, solve=_trace_solve)
_live = {}


def _registered(name):
    """The primitive ``name`` (``'etp_einsum'`` or ``'etp_einsum_v'``), registered now if it is not."""
    p = _live.get(name)
    if p is None or p not in ETP_PRIMITIVES:
        p = _live[name] = register_primitive_spec(_SPECS[name])
        _trace_ops.ETP_DRTRL_TRACE_OPS[p] = _TRACE_OPS
    return p


def einsum_primitives():
    """``(etp_einsum_p, etp_einsum_v_p)``, registering them on first use."""
    return _registered("etp_einsum"), _registered("etp_einsum_v")


def __getattr__(name):
    if name in ("etp_einsum_p", "etp_einsum_v_p"):
        return _registered(name[:-2])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# User-facing wrapper
# ---------------------------------------------------------------------------------------------


def einsum(equation: str, x, weight, *, weight_fn=None):
    r"""ETP-marked two-operand einsum, linear in the weight: :math:`y = \mathrm{einsum}(eq, x, f(W))`.

    Any explicit equation ``'x_spec,w_spec->y_spec'`` whose weight axes each meet ``x`` or the
    output: a dense layer (``'bi,io->bo'``, ``'...i,io->...o'``), per-head weights
    (``'bhi,hio->bho'``), a weight shared along an axis of the output (``'bti,io->bto'``). The
    output's axes are the hidden states' unit axes: the hidden states ``y`` drives must have ``y``'s
    shape (or ``y``'s shape after leading batch axes that ``y`` lacks). The D-RTRL trace is exact for
    every such equation; it has shape ``(*batch, *shared, *weight.shape, n)`` (``shared``: the output
    axes absent from the weight besides the batch axis), the dense layout when there are none.

    Binds ``etp_einsum`` when the first letters of ``x`` and the output agree and are not weight
    letters (the batch axis, the published form) or when an ellipsis stands for at least one leading
    axis (folded into one batch axis, as :func:`matmul` folds them); ``etp_einsum_v`` otherwise.

    Parameters
    ----------
    equation : str
        Explicit, two operands, letters ``a-z A-Z``; an ellipsis may lead ``x`` and the output.
    x : array or Quantity
        The non-trainable operand.
    weight : array or Quantity
        The trainable operand (named axes only).
    weight_fn : callable, optional
        Shape-preserving transform of the weight's mantissa, applied with plain JAX ops before the
        primitive (the online gradient of ``weight`` is the chain rule through it).

    Returns
    -------
    array or Quantity
        ``jnp.einsum(equation, x, weight_fn(weight))`` in the unit ``unit(x) * unit(weight)``.

    Raises
    ------
    ValueError
        For an unsupported ``equation`` (see :func:`parse_einsum_equation`), or operands whose ranks
        or axis sizes do not fit it.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> braintrace.einsum('bi,io->bo', jnp.ones((5, 3)), jnp.ones((3, 4))).shape
    (5, 4)
    >>> braintrace.einsum('bhi,hio->bho', jnp.ones((5, 2, 3)), jnp.ones((2, 3, 4))).shape
    (5, 2, 4)
    >>> braintrace.einsum('...i,io->...o', jnp.ones((2, 5, 3)), jnp.ones((3, 1)))[0, 0]
    Array([3.], dtype=float32)
    """
    x_m, x_u = split(x)
    w_m, w_u = split(weight)
    x_m, w_m = jnp.asarray(x_m), jnp.asarray(w_m)
    w_m = apply_operand_fn(weight_fn, w_m, name="weight_fn", op="einsum")
    e, n_ell = parse_einsum_equation(equation, x_m.ndim)
    if x_m.ndim != len(e.x):
        raise ValueError(
            f"einsum: `x` has shape {x_m.shape} (rank {x_m.ndim}) but `equation` {equation!r} names "
            f"{len(e.x)} axes for it."
        )
    if w_m.ndim != len(e.w):
        raise ValueError(
            f"einsum: `weight` has shape {w_m.shape} (rank {w_m.ndim}) but `equation` {equation!r} names "
            f"{len(e.w)} axes for it."
        )
    for c in set(e.x) & set(e.w):
        if x_m.shape[e.x.index(c)] != w_m.shape[e.w.index(c)]:
            raise ValueError(
                f"einsum: axis {c!r} of `equation` {equation!r} has size {x_m.shape[e.x.index(c)]} in `x` "
                f"(shape {x_m.shape}) but {w_m.shape[e.w.index(c)]} in `weight` (shape {w_m.shape})."
            )
    lead = x_m.shape[:n_ell]
    if n_ell:
        (b,) = EinsumEquation(e.x[n_ell:], e.w, e.y[n_ell:]).fresh(1)
        e = EinsumEquation(b + e.x[n_ell:], e.w, b + e.y[n_ell:])
        x_m = x_m.reshape((-1, *x_m.shape[n_ell:]))
    p = _registered("etp_einsum" if e.has_batch_form else "etp_einsum_v")
    y = p.bind(x_m, w_m, equation=e.text)
    if n_ell:
        y = y.reshape((*lead, *y.shape[1:]))
    return attach(y, x_u * w_u)
