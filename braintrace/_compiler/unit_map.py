r"""Which units of a step's values depend on which units of its hidden states: a structural proof.

D-RTRL keeps one ``n x n`` block of :math:`\partial h_t/\partial h_{t-1}` per unit, and one value of
:math:`\partial h/\partial y` per unit. Both are exact only where the step is *unit-diagonal*: the
value of unit ``u`` of every hidden state depends on unit ``u`` of the sources only. This module
decides that from the jaxpr instead of from a list of known mixing primitives, so that an unknown
primitive can only make the compiler more careful.

For every variable and every source (a hidden state's previous value, or an ETP output ``y``), the
analysis keeps an **axis map**: a tuple with one entry per axis of the variable, the unit axis of
the source that the axis enumerates (an ``int``), or ``None`` for an axis along which the value
does not move between units (a broadcast axis, or the slot axis of a ``HiddenGroupState``). A
variable whose dependence on a source cannot be described by such a map is :data:`MIXED` for that
source. Rules:

* element-wise primitives (and ``select_n``): each source's maps must agree over the operands;
* ``broadcast_in_dim``, ``reshape`` (only inserting or removing size-1 axes), ``squeeze``,
  ``expand_dims``, ``transpose``, ``stack``, ``rev``/``slice``/``pad``/``concatenate``/``split``
  along non-unit axes,
  reductions over non-unit axes, ``dot_general`` contracting non-unit axes of one hidden operand:
  the map follows the index map of the primitive;
* calls, ``custom_jvp_call`` / ``custom_vjp_call`` and ``cond`` are analysed through their bodies
  (the branches of a ``cond`` must agree; an index that depends on a source mixes it);
* ``scan`` and ``while`` through their bodies, the loop-carried values to a fixed point (the maps
  of the initial carry combined with those the body returns, until they stop changing); a scanned
  operand's leading axis and a stacked output's are non-unit axes (scanning over a unit axis mixes);
  a ``while`` predicate that depends on a source mixes it (the trip count is a decision over units);
* every other primitive reached by a source (``gather``, ``scatter``, ``sort``, a slice of a unit
  axis, ...) is :data:`MIXED` for it.

A hidden state's new value is unit-diagonal in a source when its map for that source is the
identity over the unit axes (leading axes that the source lacks may be ``None``: a ``y`` without
the batch axis broadcast over the batch).
"""

from __future__ import annotations

from typing import Callable, Dict, Hashable, Optional, Tuple

from braintrace._compatible_imports import Literal, jaxpr_of, scan_operand_counts

__all__ = ["MIXED", "ELEMENTWISE", "propagate_unit_maps", "identity_map", "is_diagonal"]


class _Mixed:
    def __repr__(self):
        return "MIXED"


#: The dependence of a value on a source that mixes units.
MIXED = _Mixed()

#: Primitives whose output element depends on the same element of each operand only.
ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp conj convert_element_type
    copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma igammac
    imag integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow
    population_count real reduce_precision rem round rsqrt select_n shift_left shift_right_arithmetic
    shift_right_logical sign sin sinh sqrt square sub tan tanh xor stop_gradient""".split()
)

_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or"})
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "remat2"})
_CUSTOM = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})

Map = Tuple[Optional[int], ...]
Labels = Dict[Hashable, object]  # source -> Map or MIXED


def identity_map(ndim: int, slot_axis: bool = False) -> Map:
    """The map of a source of ``ndim`` unit axes onto itself. Unit axes are numbered from the
    end (``-ndim .. -1``), so that a source without leading batch axes (an unbatched ``y``) lines
    up with the trailing axes of the hidden state it drives. ``slot_axis``: a trailing non-unit
    axis (the states of a ``HiddenGroupState``)."""
    return tuple(range(-ndim, 0)) + ((None,) if slot_axis else ())


def is_diagonal(m, unit_ndim: int, lead_free: int = 0) -> bool:
    """Whether ``m`` is the identity map of a value with ``unit_ndim`` unit axes (followed only by
    non-unit axes); its ``lead_free`` leading positions may be ``None`` instead (a broadcast over
    batch axes that the source lacks)."""
    if m is MIXED or len(m) < unit_ndim:
        return False
    for k in range(unit_ndim):
        if m[k] != k - unit_ndim and not (k < lead_free and m[k] is None):
            return False
    return all(a is None for a in m[unit_ndim:])


def _unit_axes(m) -> set:
    return {i for i, a in enumerate(m) if a is not None}


def _combine(inputs) -> Labels:
    """Element-wise combination: each source's maps must agree over the operands."""
    out: Labels = {}
    for labels in inputs:
        for src, m in labels.items():
            prev = out.get(src)
            if prev is None:
                out[src] = m
            elif prev is MIXED or m is MIXED or prev != m:
                out[src] = MIXED
    return out


def _map_all(labels: Labels, fn: Callable) -> Labels:
    return {src: (MIXED if m is MIXED else fn(m)) for src, m in labels.items()}


def _broadcast_in_dim(eqn, labels, in_shapes):
    shape = tuple(eqn.params["shape"])
    dims = tuple(eqn.params["broadcast_dimensions"])
    in_shape = in_shapes[0]

    def fn(m):
        out = [None] * len(shape)
        for j, d in enumerate(dims):
            if m[j] is not None and in_shape[j] != shape[d]:
                return MIXED  # one unit broadcast over many
            out[d] = m[j]
        return tuple(out)

    return _map_all(labels[0], fn)


def _reshape(eqn, labels, in_shapes, out_shape):
    in_shape = in_shapes[0]
    kept_in = [i for i, s in enumerate(in_shape) if s != 1]
    kept_out = [i for i, s in enumerate(out_shape) if s != 1]
    if [in_shape[i] for i in kept_in] != [out_shape[i] for i in kept_out]:
        return _map_all(labels[0], lambda m: MIXED if _unit_axes(m) else m)

    def fn(m):
        if any(m[i] is not None for i, s in enumerate(in_shape) if s == 1 and i not in kept_in):
            # a size-1 unit axis removed: still a single unit, but keep it simple and careful
            return MIXED
        out = [None] * len(out_shape)
        for a, b in zip(kept_in, kept_out):
            out[b] = m[a]
        return tuple(out)

    return _map_all(labels[0], fn)


def _squeeze(eqn, labels, in_shapes):
    dims = set(d % len(in_shapes[0]) for d in eqn.params["dimensions"])
    return _map_all(
        labels[0],
        lambda m: (
            MIXED
            if any(m[d] is not None for d in dims)
            else tuple(a for i, a in enumerate(m) if i not in dims)
        ),
    )


def _transpose(eqn, labels):
    perm = tuple(eqn.params["permutation"])
    return _map_all(labels[0], lambda m: tuple(m[p] for p in perm))


def _along_axes(labels, axes, keep_fn):
    """A primitive that moves values only along ``axes``: fine when they are non-unit axes."""
    return _map_all(labels, lambda m: MIXED if any(m[a] is not None for a in axes) else keep_fn(m))


def _slice(eqn, labels, in_shapes):
    shape = in_shapes[0]
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params.get("strides") or (1,) * len(shape)
    moved = [i for i in range(len(shape)) if (starts[i], limits[i], strides[i]) != (0, shape[i], 1)]
    return _along_axes(labels[0], moved, lambda m: m)


def _reduce(eqn, labels):
    axes = tuple(eqn.params["axes"])
    return _along_axes(labels[0], axes, lambda m: tuple(a for i, a in enumerate(m) if i not in axes))


def _dot_general(eqn, labels, in_shapes):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = labels[0], labels[1]
    if lhs and rhs:
        return {src: MIXED for src in (*lhs, *rhs)}
    nl, nr = len(in_shapes[0]), len(in_shapes[1])
    if lhs:
        free = [i for i in range(nl) if i not in lc and i not in lb]

        def fn(m):
            if any(m[i] is not None for i in lc):
                return MIXED
            return tuple([m[i] for i in lb] + [m[i] for i in free] + [None] * (nr - len(rc) - len(rb)))

        return _map_all(lhs, fn)
    free = [i for i in range(nr) if i not in rc and i not in rb]

    def fn(m):
        if any(m[i] is not None for i in rc):
            return MIXED
        return tuple([m[i] for i in rb] + [None] * (nl - len(lc) - len(lb)) + [m[i] for i in free])

    return _map_all(rhs, fn)


def _concatenate(eqn, labels):
    axis = eqn.params["dimension"]
    return _along_axes(_combine(labels), [axis], lambda m: m)


def _body(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    return None


def _through(body, labels_in, env_hooks):
    """Analyse ``body`` (a closed or open jaxpr) with its invars labelled ``labels_in``."""
    jaxpr = jaxpr_of(body)
    seeds = dict(zip(jaxpr.invars, labels_in))
    env = propagate_unit_maps(jaxpr, seeds, **env_hooks)
    return [({} if isinstance(v, Literal) else env.get(v, {})) for v in jaxpr.outvars]


def _mixed(labels) -> Labels:
    return {src: MIXED for lab in labels for src in lab}


def _carry_fixed_point(body_fn, carry_init, max_rounds: int = 8):
    """Loop-carried labels: ``carry = combine(init, body(carry))`` until it stops changing (each
    round can only turn maps into ``MIXED`` or add sources, so it ends; ``max_rounds`` is a guard)."""
    carry = [dict(c) for c in carry_init]
    for _ in range(max_rounds):
        carry_out, extra = body_fn(carry)
        new = [_combine([c0, c1]) for c0, c1 in zip(carry_init, carry_out)]
        if new == carry:
            return carry, extra
        carry = new
    mixed = [_mixed(carry)] * len(carry)
    return mixed, body_fn(mixed)[1]


def _scan(eqn, labels, hooks):
    """``scan``: operands ``consts, carry, xs``; outputs ``carry, ys`` (stacked on axis 0)."""
    p = eqn.params
    n_c, n_carry = scan_operand_counts(p)
    consts, init, xs = labels[:n_c], labels[n_c : n_c + n_carry], labels[n_c + n_carry :]
    # the body sees one slice of each scanned operand: its axis 0 is gone (a unit axis there mixes)
    xs_body = [_along_axes(lab, [0], lambda m: m[1:]) for lab in xs]

    def body(carry):
        outs = _through(p["jaxpr"], [*consts, *carry, *xs_body], hooks)
        return outs[:n_carry], outs[n_carry:]

    carry, ys = _carry_fixed_point(body, init)
    return [*carry, *[_map_all(lab, lambda m: (None,) + m) for lab in ys]]


def _while(eqn, labels, hooks):
    """``while``: operands ``cond_consts, body_consts, carry``; outputs the final carry."""
    p = eqn.params
    n_cc, n_bc = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, init = labels[:n_cc], labels[n_cc : n_cc + n_bc], labels[n_cc + n_bc :]

    def body(carry):
        return _through(p["body_jaxpr"], [*body_consts, *carry], hooks), _through(
            p["cond_jaxpr"], [*cond_consts, *carry], hooks
        )

    carry, pred = _carry_fixed_point(body, init)
    if any(pred):  # the number of iterations depends on the sources' values
        mixed = _mixed([*labels, *carry, *pred])
        return [mixed] * len(carry)
    return carry


def _eqn_maps(eqn, labels, in_shapes, hooks):
    """The labels of each output of ``eqn`` given its operands' labels."""
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    out_shape = tuple(getattr(eqn.outvars[0].aval, "shape", ()))
    if name in ELEMENTWISE:
        return [_combine(labels)] * n_out
    if name == "broadcast_in_dim":
        return [_broadcast_in_dim(eqn, labels, in_shapes)]
    if name == "reshape":
        return [_reshape(eqn, labels, in_shapes, out_shape)]
    if name == "squeeze":
        return [_squeeze(eqn, labels, in_shapes)]
    if name == "expand_dims":
        return [_reshape(eqn, labels, in_shapes, out_shape)]
    if name == "transpose":
        return [_transpose(eqn, labels)]
    if name == "slice":
        return [_slice(eqn, labels, in_shapes)]
    if name in ("rev",):
        return [_along_axes(labels[0], eqn.params["dimensions"], lambda m: m)]
    if name == "pad":
        moved = [i for i, cfg in enumerate(eqn.params["padding_config"]) if tuple(cfg) != (0, 0, 0)]
        return [_along_axes(_combine(labels), moved, lambda m: m)]
    if name in _REDUCTIONS:
        return [_reduce(eqn, labels)]
    if name == "dot_general":
        return [_dot_general(eqn, labels, in_shapes)]
    if name == "concatenate":
        return [_concatenate(eqn, labels)]
    if name == "stack":  # a new non-unit axis at ``axis`` (jax >= 0.10 binds jnp.stack as one primitive)
        axis = eqn.params["axis"]
        return [_map_all(_combine(labels), lambda m: m[:axis] + (None,) + m[axis:])]
    if name == "split":  # pieces along one axis: fine when it is not a unit axis
        return [_along_axes(labels[0], [eqn.params["axis"]], lambda m: m)] * n_out
    if name in _CALLS or name in _CUSTOM:
        body = _body(eqn)
        if body is not None:
            n_in = len(jaxpr_of(body).invars)
            # custom_vjp_call binds its operands last; calls bind them one to one
            return _through(body, labels[len(labels) - n_in :], hooks)
    if name == "cond":
        branches = eqn.params["branches"]
        if labels[0]:  # the branch index depends on hidden values: a decision over many units
            return [_mixed(labels)] * n_out
        outs = [_through(b, labels[1:], hooks) for b in branches]
        return [_combine([o[k] for o in outs]) for k in range(n_out)]
    if name == "scan":
        return _scan(eqn, labels, hooks)
    if name == "while":
        return _while(eqn, labels, hooks)
    return [_mixed(labels)] * n_out


def propagate_unit_maps(jaxpr, seeds: Dict, blocks: Callable = lambda eqn: False, on_eqn=None) -> Dict:
    """``{var: {source: map or MIXED}}`` for every variable of ``jaxpr`` reached by a seed.

    ``seeds``: var -> labels (applied to invars and to equation outputs, where they replace
    what the equation computes). ``blocks(eqn)``: the equation's outputs get only their seeds
    (an ETP output held fixed). ``on_eqn(eqn, in_labels, out_labels)`` is called for every
    equation an input label reaches (diagnostics: which primitive made a map ``MIXED``).
    """
    jaxpr = jaxpr_of(jaxpr)
    hooks = {"blocks": blocks, "on_eqn": on_eqn}
    env: Dict = {}
    for v in jaxpr.invars:
        if v in seeds:
            env[v] = dict(seeds[v])
    for eqn in jaxpr.eqns:
        labels = [({} if isinstance(v, Literal) else env.get(v, {})) for v in eqn.invars]
        if blocks(eqn) or not any(labels):
            outs = [{} for _ in eqn.outvars]
        else:
            in_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
            outs = _eqn_maps(eqn, labels, in_shapes, hooks)
            if on_eqn is not None:
                on_eqn(eqn, labels, outs)
        for v, lab in zip(eqn.outvars, outs):
            seed = seeds.get(v)
            lab = {**lab, **seed} if seed else lab
            if lab:
                env[v] = lab
    return env
