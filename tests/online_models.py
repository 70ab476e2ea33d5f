"""Small recurrent models for the online-learning tests, and independent plain-``jnp`` oracles.

A :class:`PlainSpec` describes one step of a model in plain ``jax.numpy``:

* ``params``: every parameter (name -> array), marked or not;
* ``ops``: the ETP-marked operations ``y = f(x, θ)`` (name -> :class:`Op`); an op's input ``x`` is
  computed from the previous hidden values and the step input (``Op.x_fn``);
* ``step(params, h, x, ys) -> new h``: the step with every ETP output ``ys[name]`` an explicit input;
* ``readout(params, h_new, x) -> output``.

:func:`build_module` turns a spec into a ``brainstate`` module whose ``update`` computes each ``y``
with the braintrace wrapper (``braintrace.matmul``, ``conv``, ``sparse_matmul``, ``lora_matmul``,
``element_wise``) and then runs the same ``step``. The oracles use only the plain form; each ``y``
is recomputed there with plain ``jnp`` (:func:`op_forward`), never through braintrace.

Oracles (``h_s`` one hidden state, units of a group indexed by ``u``):

* :func:`masked_rtrl` (the D-RTRL oracle): the full sensitivity ``P_s = ∂h_s/∂θ`` of every hidden
  state to every traced parameter, propagated with the hidden Jacobian masked to per-unit blocks,
  ``P_{t,s} = Σ_{j in group(s)} D_t[u, s, j] P_{t-1,j} + ∂h_{t,s}/∂θ |_{h_{t-1}}``, where
  ``D_t[u, s, j] = ∂h_{t,s}[u]/∂h_{t-1,j}[u]`` is read off ``jax.jacfwd`` of ``step`` with the ETP
  outputs ``ys`` held fixed and the immediate term is ``jax.jacfwd`` of the step with respect to
  ``θ`` (every ``y`` recomputed from ``θ``, ``h_{t-1}`` fixed): the exact ``∂h/∂θ`` through ``y``.
  Gradient ``Σ_s ∂L_t/∂h_{t,s} · P_{t,s}`` with ``∂L_t/∂h_{t,s}`` the partial derivative of the step
  loss with respect to the state's new value. Parameters that are not traced get their within-step
  gradient ``∂L_t/∂θ`` with ``h_{t-1}`` fixed.
* :func:`pp_prop_oracle`: ``ε_x ← λ ε_x + x_t``, ``ε_f ← λ D_t ε_f + (1−λ) df_t``, weight gradient
  ``xy_to_dw(ε_x, Σ_s ∂L/∂h_s ⊙ ε_{f,s} / (1−λ^{t+1}))`` with ``xy_to_dw`` written out by hand per op
  (:func:`xy_to_dw`); bias keys and element-wise weights use the exact trace ``ε ← D ε + df``.
  ``df_t[u, s] = ∂h_{t,s}[u]/∂y_t[u]`` is the per-unit diagonal of ``jax.jacfwd`` of ``step`` with
  respect to ``y``.
* :func:`bptt_grads`: ``jax.grad`` of the summed loss through ``lax.scan`` of the plain step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Callable, Dict, Mapping, Optional, Tuple

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import saiunit as u

import braintrace

__all__ = [
    "Op",
    "PlainSpec",
    "float64",
    "op_forward",
    "op_braintrace",
    "ys_plain",
    "loss_fn",
    "build_module",
    "make_data",
    "run_online",
    "masked_rtrl",
    "pp_prop_oracle",
    "bptt_grads",
    "xy_to_dw",
    "rel_err",
    "assert_grads_close",
    "dense_rnn",
    "leaky_ff",
    "elemwise_tau",
    "two_state",
    "two_groups",
    "conv_leaky",
    "sparse_rnn",
    "lora_rnn",
    "tiny_rnn_plain_input",
    "cond_leaky",
]


@contextlib.contextmanager
def float64():
    """float64 everywhere (``jax_enable_x64`` and brainstate's precision), restored afterwards."""
    old_x64 = bool(jax.config.jax_enable_x64)
    old_precision = brainstate.environ.get_precision()
    jax.config.update("jax_enable_x64", True)
    brainstate.environ.set(precision=64)
    try:
        yield
    finally:
        brainstate.environ.set(precision=old_precision)
        jax.config.update("jax_enable_x64", old_x64)


# ------------------------------------------------------------------------------------------------
# Model description
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Op:
    """One ETP-marked operation ``y = f(x, θ)``.

    ``kind``: ``'dense'`` (``x W + b``), ``'sparse'`` (``x W + b`` with ``W`` sparse: non-zeros at
    ``rows``/``cols``, in CSR data order), ``'lora'`` (``alpha x B A + b``), ``'conv'`` (1-D,
    ``NWC``/``WIO``/``NWC``, ``VALID`` padding, ``stride``), ``'elem'`` (``y = fn(w)``).
    ``keys``: trainable key -> parameter name (``weight``/``bias``, ``lora_b``/``lora_a``/``bias``).
    """

    kind: str
    keys: Mapping[str, str]
    x_fn: Optional[Callable] = None
    fn: Optional[Callable] = None
    alpha: float = 1.0
    stride: int = 1
    shape: Optional[Tuple[int, int]] = None
    rows: Optional[np.ndarray] = None
    cols: Optional[np.ndarray] = None
    indices: Optional[np.ndarray] = None
    indptr: Optional[np.ndarray] = None

    def weights(self, params):
        return {k: params[n] for k, n in self.keys.items()}


@dataclasses.dataclass
class PlainSpec:
    """A model step in plain ``jnp`` (see the module docstring)."""

    name: str
    params: Dict[str, jax.Array]
    hidden: Dict[str, Tuple[int, ...]]  # per-sample shapes (no batch axis)
    groups: Tuple[Tuple[str, ...], ...]
    ops: Dict[str, Op]
    step: Callable
    readout: Callable
    x_shape: Tuple[int, ...]  # per-sample input shape
    batch: Optional[int] = None

    def batch_shape(self):
        return () if self.batch is None else (self.batch,)

    def init_hidden(self):
        return {n: jnp.zeros((*self.batch_shape(), *s)) for n, s in self.hidden.items()}

    def input_shape(self):
        return (*self.batch_shape(), *self.x_shape)

    def output_shape(self):
        h = self.init_hidden()
        x = jnp.zeros(self.input_shape())
        return jax.eval_shape(lambda: self.readout(self.params, h, x)).shape

    def traced_params(self):
        return tuple(dict.fromkeys(n for op in self.ops.values() for n in op.keys.values()))

    def group_of(self, name):
        return next(g for g in self.groups if name in g)


def _conv1d(x, kernel, stride):
    """``y[b, p, o] = Σ_k Σ_c x[b, p·stride + k, c] K[k, c, o]`` (VALID), written with slices."""
    k_w = kernel.shape[0]
    n_out = (x.shape[-2] - k_w) // stride + 1
    patches = jnp.stack([x[..., k : k + stride * (n_out - 1) + 1 : stride, :] for k in range(k_w)], axis=-2)
    return jnp.einsum("...pkc,kco->...po", patches, kernel)


def op_forward(op: Op, params, h, x):
    """``y`` of ``op`` in plain ``jnp`` (independent of braintrace)."""
    w = op.weights(params)
    if op.kind == "elem":
        return op.fn(w["weight"])
    xin = op.x_fn(params, h, x)
    if op.kind == "dense":
        y = xin @ w["weight"]
    elif op.kind == "sparse":
        dense = jnp.zeros(op.shape, w["weight"].dtype).at[op.rows, op.cols].set(w["weight"])
        y = xin @ dense
    elif op.kind == "lora":
        y = op.alpha * ((xin @ w["lora_b"]) @ w["lora_a"])
    elif op.kind == "conv":
        y = _conv1d(xin, w["weight"], op.stride)
    else:  # pragma: no cover - a typo in a test
        raise ValueError(op.kind)
    if "bias" in w:
        y = y + w["bias"]
    return y


def op_braintrace(op: Op, params, h, x):
    """``y`` of ``op`` through the braintrace wrapper (what the module runs)."""
    w = op.weights(params)
    if op.kind == "elem":
        return braintrace.element_wise(w["weight"], fn=op.fn)
    xin = op.x_fn(params, h, x)
    bias = w.get("bias")
    if op.kind == "dense":
        return braintrace.matmul(xin, w["weight"], bias)
    if op.kind == "sparse":
        csr = u.sparse.CSR((w["weight"], jnp.asarray(op.indices), jnp.asarray(op.indptr)), shape=op.shape)
        return braintrace.sparse_matmul(xin, w["weight"], sparse_mat=csr, bias=bias)
    if op.kind == "lora":
        return braintrace.lora_matmul(xin, w["lora_b"], w["lora_a"], alpha=op.alpha, bias=bias)
    if op.kind == "conv":
        return braintrace.conv(
            xin,
            w["weight"],
            bias,
            strides=(op.stride,),
            padding="VALID",
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
    raise ValueError(op.kind)  # pragma: no cover


def ys_plain(spec: PlainSpec, params, h, x):
    return {name: op_forward(op, params, h, x) for name, op in spec.ops.items()}


class SpecModule(brainstate.nn.Module):
    """The brainstate form of a :class:`PlainSpec`: ETP ops through braintrace, then ``spec.step``."""

    def __init__(self, spec: PlainSpec):
        super().__init__()
        self._spec_box = (spec,)  # a tuple: brainstate does not look into it
        for name, value in spec.params.items():
            setattr(self, name, brainstate.ParamState(jnp.asarray(value)))

    @property
    def spec(self) -> PlainSpec:
        return self._spec_box[0]

    def init_state(self, batch_size=None, **kwargs):
        lead = () if batch_size is None else (batch_size,)
        for name, shape in self.spec.hidden.items():
            setattr(self, name, brainstate.HiddenState(jnp.zeros((*lead, *shape))))

    def update(self, x):
        spec = self.spec
        params = {n: getattr(self, n).value for n in spec.params}
        h = {n: getattr(self, n).value for n in spec.hidden}
        ys = {name: op_braintrace(op, params, h, x) for name, op in spec.ops.items()}
        new = spec.step(params, h, x, ys)
        for n in spec.hidden:
            getattr(self, n).value = new[n]
        return spec.readout(params, new, x)


def build_module(spec: PlainSpec, init: bool = True) -> SpecModule:
    module = SpecModule(spec)
    if init:
        brainstate.nn.init_all_states(module, batch_size=spec.batch)
    return module


def make_data(spec: PlainSpec, steps: int, seed: int = 7):
    """Random inputs ``(T, *input_shape)`` and targets ``(T, *output_shape)``."""
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((steps, *spec.input_shape()))
    ys = rng.standard_normal((steps, *spec.output_shape()))
    return jnp.asarray(xs), jnp.asarray(ys)


def loss_fn(out, target):
    return 0.5 * jnp.sum((out - target) ** 2)


# ------------------------------------------------------------------------------------------------
# Running an algorithm
# ------------------------------------------------------------------------------------------------


def _name(key) -> str:
    return str(key[-1]) if isinstance(key, tuple) else str(key)


def run_online(alg, module, xs, targets, loss=loss_fn, compile_graph=True):
    """Per-step gradients ``{param name: (T, *shape)}`` and losses ``(T,)`` of ``alg`` over ``xs``."""
    if compile_graph:
        alg.compile_graph(xs[0])
    params = module.states(brainstate.ParamState)
    step = brainstate.transform.jit(
        lambda x, y: brainstate.transform.grad(lambda: loss(alg(x), y), params, return_value=True)()
    )
    per_step, losses = [], []
    for t in range(xs.shape[0]):
        g, value = step(xs[t], targets[t])
        per_step.append({_name(k): v for k, v in g.items()})
        losses.append(value)
    stacked = {k: u.math.stack([g[k] for g in per_step]) for k in per_step[0]}  # keeps units
    return stacked, jnp.stack(losses)


# ------------------------------------------------------------------------------------------------
# Oracles
# ------------------------------------------------------------------------------------------------


def _unit_diag(jac, unit_shape, y_shape):
    """Per-unit diagonal of ``jac`` ``(*unit_shape, *y_shape)`` where ``y`` indexes the trailing
    axes of a unit (``unit_shape = batch + y_shape``): ``out[b, i] = jac[b, i, i]``."""
    k = len(unit_shape) - len(y_shape)
    assert k >= 0 and tuple(unit_shape[k:]) == tuple(y_shape), (unit_shape, y_shape)
    nb, ny = math.prod(unit_shape[:k]), math.prod(y_shape)
    return jnp.einsum("bii->bi", jac.reshape(nb, ny, ny)).reshape(unit_shape)


def _fits(unit_shape, y_shape):
    k = len(unit_shape) - len(y_shape)
    return k >= 0 and tuple(unit_shape[k:]) == tuple(y_shape)


def _blocks(spec, params, h, x, ys):
    """``D[s][j]``: per-unit ``∂h_s/∂h_j`` (ETP outputs fixed), for ``j`` in the group of ``s``."""
    jac = jax.jacfwd(lambda hh: spec.step(params, hh, x, ys))(h)
    return {
        s: {j: _unit_diag(jac[s][j], h[s].shape, h[j].shape) for j in spec.group_of(s)} for s in spec.hidden
    }


def _step_loss_partials(spec, params, h_new, x, target, loss):
    return jax.grad(lambda hn: loss(spec.readout(params, hn, x), target))(h_new)


def _within_step_grads(spec, params, names, h, x, target, loss):
    """``∂L_t/∂θ`` with ``h_{t-1}`` fixed, for the parameters ``names``."""

    def step_loss(sub):
        p = {**params, **sub}
        hn = spec.step(p, h, x, ys_plain(spec, p, h, x))
        return loss(spec.readout(p, hn, x), target)

    return jax.grad(step_loss)({n: params[n] for n in names}) if names else {}


def _masked_rtrl_step(spec, traced, loss, params, h, P, x, target):
    ys = ys_plain(spec, params, h, x)
    h_new = spec.step(params, h, x, ys)
    D = _blocks(spec, params, h, x, ys)

    def immediate(theta):
        p = {**params, **theta}
        return spec.step(p, h, x, ys_plain(spec, p, h, x))

    imm = jax.jacfwd(immediate)({n: params[n] for n in traced}) if traced else {}  # [s][n]: (*unit_s, *θ_n)
    P_new = {}
    for s in spec.hidden:
        P_new[s] = {}
        for n in traced:
            acc = imm[s][n]
            for j, d in D[s].items():
                acc = acc + d.reshape(d.shape + (1,) * params[n].ndim) * P[j][n]
            P_new[s][n] = acc
    ct = _step_loss_partials(spec, params, h_new, x, target, loss)
    grads = {n: sum(jnp.tensordot(ct[s], P_new[s][n], axes=ct[s].ndim) for s in spec.hidden) for n in traced}
    plain = [n for n in spec.params if n not in traced]
    grads.update(_within_step_grads(spec, params, plain, h, x, target, loss))
    return h_new, P_new, grads


def masked_rtrl(spec: PlainSpec, xs, targets, loss=loss_fn, traced=None):
    """Per-step D-RTRL oracle gradients ``{name: (T, *shape)}`` (see the module docstring)."""
    traced = spec.traced_params() if traced is None else tuple(traced)
    params = spec.params
    h = spec.init_hidden()
    P = {s: {n: jnp.zeros((*h[s].shape, *params[n].shape)) for n in traced} for s in spec.hidden}
    step = jax.jit(functools.partial(_masked_rtrl_step, spec, traced, loss))
    out = []
    for t in range(xs.shape[0]):
        h, P, g = step(params, h, P, xs[t], targets[t])
        out.append(g)
    return {k: jnp.stack([g[k] for g in out]) for k in out[0]}


def xy_to_dw(op: Op, params, x_trace, g):
    """The weight-key gradient of ``op`` for input ``x_trace`` and output cotangent ``g``, summed over
    the batch: written out per op with ``einsum`` / gathers (not via braintrace)."""
    w = op.weights(params)
    if op.kind == "dense":
        return {"weight": jnp.einsum("...i,...k->ik", x_trace, g)}
    if op.kind == "sparse":
        prod = x_trace[..., op.rows] * g[..., op.cols]  # (..., nnz)
        return {"weight": prod.reshape(-1, prod.shape[-1]).sum(0)}
    if op.kind == "lora":
        z = x_trace @ w["lora_b"]  # (..., r)
        return {
            "lora_a": op.alpha * jnp.einsum("...r,...k->rk", z, g),
            "lora_b": op.alpha * jnp.einsum("...i,...r->ir", x_trace, g @ w["lora_a"].T),
        }
    if op.kind == "conv":
        k_w = w["weight"].shape[0]
        n_out = g.shape[-2]
        s = op.stride
        return {
            "weight": jnp.stack(
                [
                    jnp.einsum("bpc,bpo->co", x_trace[:, k : k + s * (n_out - 1) + 1 : s, :], g)
                    for k in range(k_w)
                ]
            )
        }
    raise ValueError(op.kind)  # pragma: no cover


def _exact_keys(op: Op):
    return tuple(op.keys) if op.kind == "elem" else tuple(k for k in op.keys if k == "bias")


def _sum_to(g, shape):
    """Sum ``g`` over its leading axes down to ``shape``."""
    return g.reshape(-1, *shape).sum(0) if g.ndim > len(shape) else g


def _pp_step(spec, lam, traced_ops, loss, params, h, tr, x, target, t):
    ys = ys_plain(spec, params, h, x)
    h_new = spec.step(params, h, x, ys)
    D = _blocks(spec, params, h, x, ys)
    jy = jax.jacfwd(lambda yy: spec.step(params, h, x, yy))(ys)  # jy[s][op]: (*unit_s, *y_op)
    ct = _step_loss_partials(spec, params, h_new, x, target, loss)
    correction = 1.0 - lam ** (t + 1)
    new_tr, grads = {}, {}
    for name in traced_ops:
        op = spec.ops[name]
        y_shape = ys[name].shape
        # states whose units y indexes (the models' y never reaches a state of another shape)
        states = [s for s in spec.hidden if _fits(h[s].shape, y_shape)]
        df = {s: _unit_diag(jy[s][name], h[s].shape, y_shape) for s in states}
        old = tr[name]
        new = {"f": {}, "e": {k: {} for k in _exact_keys(op)}}
        for s in states:
            prop = lambda e: sum(D[s][j] * e[j] for j in D[s] if j in e)
            new["f"][s] = lam * prop(old["f"]) + (1 - lam) * df[s]
            for k in _exact_keys(op):
                new["e"][k][s] = prop(old["e"][k]) + df[s]
        w = op.weights(params)
        for k in _exact_keys(op):
            g = _sum_to(sum(ct[s] * new["e"][k][s] for s in states), y_shape)
            if op.kind == "elem":  # y = fn(w): chain through fn
                g = jax.vjp(op.fn, w[k])[1](g)[0]
            elif k == "bias":
                g = _sum_to(g, w[k].shape)
            grads[op.keys[k]] = g
        weight_keys = [k for k in op.keys if k not in _exact_keys(op)]
        if weight_keys:
            new["x"] = lam * old["x"] + op.x_fn(params, h, x)
            gf = sum(ct[s] * new["f"][s] for s in states) / correction
            full = xy_to_dw(op, params, new["x"], gf)
            for k in weight_keys:
                grads[op.keys[k]] = full[k]
        new_tr[name] = new
    traced = {n for name in traced_ops for n in spec.ops[name].keys.values()}
    plain = [n for n in spec.params if n not in traced]
    grads.update(_within_step_grads(spec, params, plain, h, x, target, loss))
    return h_new, new_tr, grads


def pp_prop_oracle(spec: PlainSpec, xs, targets, lam: float, loss=loss_fn, traced_ops=None):
    """Per-step pp_prop / ES-D-RTRL oracle gradients ``{name: (T, *shape)}``."""
    traced_ops = tuple(spec.ops) if traced_ops is None else tuple(traced_ops)
    params = spec.params
    h = spec.init_hidden()
    x0 = jnp.zeros(spec.input_shape())
    ys0 = ys_plain(spec, params, h, x0)
    tr = {}
    for name in traced_ops:
        op = spec.ops[name]
        states = [s for s in spec.hidden if _fits(h[s].shape, ys0[name].shape)]
        zeros = {s: jnp.zeros(h[s].shape) for s in states}
        tr[name] = {"f": dict(zeros), "e": {k: dict(zeros) for k in _exact_keys(op)}}
        if op.kind != "elem" and any(k not in _exact_keys(op) for k in op.keys):
            tr[name]["x"] = jnp.zeros_like(op.x_fn(params, h, x0))
    step = jax.jit(functools.partial(_pp_step, spec, lam, traced_ops, loss))
    out = []
    for t in range(xs.shape[0]):
        h, tr, g = step(params, h, tr, xs[t], targets[t], t)
        out.append(g)
    return {k: jnp.stack([g[k] for g in out]) for k in out[0]}


def bptt_grads(spec: PlainSpec, xs, targets, loss=loss_fn):
    """``jax.grad`` of ``Σ_t L_t`` through ``lax.scan`` of the plain step: ``{name: grad}``."""

    def total(params):
        def body(h, inp):
            x, target = inp
            hn = spec.step(params, h, x, ys_plain(spec, params, h, x))
            return hn, loss(spec.readout(params, hn, x), target)

        _, losses = jax.lax.scan(body, spec.init_hidden(), (xs, targets))
        return losses.sum()

    return jax.jit(jax.grad(total))(spec.params)


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(b.ravel())
    num = np.linalg.norm((a - b).ravel())
    return float(num / den) if den > 0 else float(num)


def assert_grads_close(got, want, tol=1e-10, names=None, what=""):
    """Every ``want[name]`` equals ``got[name]`` to ``tol`` (normwise relative); lists all failures."""
    names = sorted(want) if names is None else names
    missing = [n for n in names if n not in got]
    assert not missing, f"{what}: no gradient for {missing}; got keys {sorted(got)}"
    errs = {n: rel_err(got[n], want[n]) for n in names}
    for n in names:
        assert np.asarray(got[n]).shape == np.asarray(want[n]).shape, (n, np.shape(got[n]), np.shape(want[n]))
        assert np.all(np.isfinite(np.asarray(got[n]))), f"{what}: non-finite gradient for {n}"
        assert np.linalg.norm(np.asarray(want[n]).ravel()) > 0, (
            f"{what}: the oracle's gradient of {n} is zero"
        )
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"{what}: relative errors above {tol:g}: {bad} (all: {errs})"


# ------------------------------------------------------------------------------------------------
# The models
# ------------------------------------------------------------------------------------------------


def _keys(seed, n):
    """``n`` independent numpy generators (numpy: no compilation for a handful of small arrays)."""
    return [np.random.default_rng([seed, i]) for i in range(n)]


def _nrm(rng, shape, scale):
    return jnp.asarray(scale * rng.standard_normal(shape))


def _uniform(rng, shape, low, high):
    return jnp.asarray(rng.uniform(low, high, shape))


def _x_in(p, h, x):
    return x


def dense_rnn(batch=3, n_in=3, n_hid=4, n_out=2, seed=0) -> PlainSpec:
    """``h' = tanh(x W_in + b + h W_rec + 0.5 h)``, output ``h' W_out`` (``W_out`` plain)."""
    k = _keys(seed, 4)
    params = {
        "W_in": _nrm(k[0], (n_in, n_hid), 0.7),
        "b": _nrm(k[1], (n_hid,), 0.3),
        "W_rec": _nrm(k[2], (n_hid, n_hid), 0.5),
        "W_out": _nrm(k[3], (n_hid, n_out), 0.6),
    }
    ops = {
        "in": Op("dense", {"weight": "W_in", "bias": "b"}, x_fn=_x_in),
        "rec": Op("dense", {"weight": "W_rec"}, x_fn=lambda p, h, x: h["h"]),
    }

    def step(p, h, x, ys):
        return {"h": jnp.tanh(ys["in"] + ys["rec"] + 0.5 * h["h"])}

    return PlainSpec(
        "dense_rnn",
        params,
        {"h": (n_hid,)},
        (("h",),),
        ops,
        step,
        lambda p, h, x: h["h"] @ p["W_out"],
        (n_in,),
        batch,
    )


def leaky_ff(batch=3, n_in=3, n_hid=4, n_out=2, seed=1) -> PlainSpec:
    """Leaky units fed by an ETP input weight: ``h' = 0.9 tanh(h) + tanh(x W + b)``, output ``h' W_out``."""
    k = _keys(seed, 3)
    params = {
        "W": _nrm(k[0], (n_in, n_hid), 0.7),
        "b": _nrm(k[1], (n_hid,), 0.3),
        "W_out": _nrm(k[2], (n_hid, n_out), 0.6),
    }
    ops = {"in": Op("dense", {"weight": "W", "bias": "b"}, x_fn=_x_in)}

    def step(p, h, x, ys):
        return {"h": 0.9 * jnp.tanh(h["h"]) + jnp.tanh(ys["in"])}

    return PlainSpec(
        "leaky_ff",
        params,
        {"h": (n_hid,)},
        (("h",),),
        ops,
        step,
        lambda p, h, x: h["h"] @ p["W_out"],
        (n_in,),
        batch,
    )


def _alpha(tau):
    return jnp.exp(-1.0 / tau)


def elemwise_tau(batch=3, n_in=3, n_hid=4, seed=2) -> PlainSpec:
    """``h' = α h + (1 − α) tanh(x W)``, ``α = element_wise(τ, exp(−1/τ))`` with ``τ`` of shape ``(H,)``."""
    k = _keys(seed, 2)
    params = {
        "W": _nrm(k[0], (n_in, n_hid), 0.8),
        "tau": _uniform(k[1], (n_hid,), 1.5, 6.0),
    }
    ops = {
        "alpha": Op("elem", {"weight": "tau"}, fn=_alpha),
        "in": Op("dense", {"weight": "W"}, x_fn=_x_in),
    }

    def step(p, h, x, ys):
        a = ys["alpha"]
        return {"h": a * h["h"] + (1 - a) * jnp.tanh(ys["in"])}

    return PlainSpec(
        "elemwise_tau", params, {"h": (n_hid,)}, (("h",),), ops, step, lambda p, h, x: h["h"], (n_in,), batch
    )


def two_state(batch=3, n_in=3, n_hid=4, recurrent=True, seed=3) -> PlainSpec:
    """Synaptic current ``I`` driving membrane ``V``::

    I' = 0.8 I + x W + b [+ V W_rec]
    V' = α V + (1 − α) tanh(I'),  α = element_wise(τ, exp(−1/τ))
    """
    k = _keys(seed, 4)
    params = {
        "W": _nrm(k[0], (n_in, n_hid), 0.6),
        "b": _nrm(k[1], (n_hid,), 0.2),
        "tau": _uniform(k[2], (n_hid,), 2.0, 8.0),
    }
    ops = {
        "in": Op("dense", {"weight": "W", "bias": "b"}, x_fn=_x_in),
        "alpha": Op("elem", {"weight": "tau"}, fn=_alpha),
    }
    if recurrent:
        params["W_rec"] = _nrm(k[3], (n_hid, n_hid), 0.5)
        ops["rec"] = Op("dense", {"weight": "W_rec"}, x_fn=lambda p, h, x: h["V"])

    def step(p, h, x, ys):
        i_new = 0.8 * h["I"] + ys["in"] + (ys["rec"] if recurrent else 0.0)
        a = ys["alpha"]
        return {"I": i_new, "V": a * h["V"] + (1 - a) * jnp.tanh(i_new)}

    return PlainSpec(
        "two_state",
        params,
        {"I": (n_hid,), "V": (n_hid,)},
        (("I", "V"),),
        ops,
        step,
        lambda p, h, x: h["V"],
        (n_in,),
        batch,
    )


def two_groups(batch=3, n_in=3, n1=4, n2=3, seed=4) -> PlainSpec:
    """Two hidden groups of different sizes, coupled only through ETP weights::

    h1' = tanh(x W1 + h2 W21 + 0.5 h1)          (n1 units)
    h2' = 0.7 h2 + 0.3 tanh(h1 W12 + b2)        (n2 units)
    """
    k = _keys(seed, 4)
    params = {
        "W1": _nrm(k[0], (n_in, n1), 0.7),
        "W21": _nrm(k[1], (n2, n1), 0.6),
        "W12": _nrm(k[2], (n1, n2), 0.6),
        "b2": _nrm(k[3], (n2,), 0.3),
    }
    ops = {
        "in": Op("dense", {"weight": "W1"}, x_fn=_x_in),
        "fb": Op("dense", {"weight": "W21"}, x_fn=lambda p, h, x: h["h2"]),
        "ff": Op("dense", {"weight": "W12", "bias": "b2"}, x_fn=lambda p, h, x: h["h1"]),
    }

    def step(p, h, x, ys):
        return {
            "h1": jnp.tanh(ys["in"] + ys["fb"] + 0.5 * h["h1"]),
            "h2": 0.7 * h["h2"] + 0.3 * jnp.tanh(ys["ff"]),
        }

    return PlainSpec(
        "two_groups",
        params,
        {"h1": (n1,), "h2": (n2,)},
        (("h1",), ("h2",)),
        ops,
        step,
        lambda p, h, x: jnp.concatenate([h["h1"], h["h2"]], axis=-1),
        (n_in,),
        batch,
    )


def conv_leaky(batch=2, length=8, c_in=2, c_out=3, width=3, stride=2, seed=5) -> PlainSpec:
    """``braintrace.conv`` over ``(B, L, C_in)`` feeding leaky units ``(B, L', C_out)``:
    ``h' = 0.8 tanh(h) + tanh(conv(x, K) + b)``."""
    k = _keys(seed, 2)
    n_pos = (length - width) // stride + 1
    params = {"K": _nrm(k[0], (width, c_in, c_out), 0.6), "b": _nrm(k[1], (c_out,), 0.3)}
    ops = {"conv": Op("conv", {"weight": "K", "bias": "b"}, x_fn=_x_in, stride=stride)}

    def step(p, h, x, ys):
        return {"h": 0.8 * jnp.tanh(h["h"]) + jnp.tanh(ys["conv"])}

    return PlainSpec(
        "conv_leaky",
        params,
        {"h": (n_pos, c_out)},
        (("h",),),
        ops,
        step,
        lambda p, h, x: h["h"],
        (length, c_in),
        batch,
    )


def _random_pattern(rng, shape, density):
    mask = rng.uniform(size=shape) < density
    mask[0, 0] = True
    return mask


def sparse_rnn(batch=3, n_in=3, n_hid=5, density=0.5, seed=6) -> PlainSpec:
    """``h' = tanh(x W_in + sparse(w) h + b + 0.5 h)`` with a saiunit CSR pattern."""
    k = _keys(seed, 4)
    mask = _random_pattern(k[0], (n_hid, n_hid), density)
    rows, cols = np.nonzero(mask)  # row-major: the CSR data order
    indptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)
    params = {
        "W_in": _nrm(k[1], (n_in, n_hid), 0.7),
        "w_sp": _nrm(k[2], (rows.size,), 0.6),
        "b": _nrm(k[3], (n_hid,), 0.3),
    }
    ops = {
        "in": Op("dense", {"weight": "W_in"}, x_fn=_x_in),
        "rec": Op(
            "sparse",
            {"weight": "w_sp", "bias": "b"},
            x_fn=lambda p, h, x: h["h"],
            shape=(n_hid, n_hid),
            rows=rows,
            cols=cols,
            indices=cols.astype(np.int32),
            indptr=indptr,
        ),
    }

    def step(p, h, x, ys):
        return {"h": jnp.tanh(ys["in"] + ys["rec"] + 0.5 * h["h"])}

    return PlainSpec(
        "sparse_rnn", params, {"h": (n_hid,)}, (("h",),), ops, step, lambda p, h, x: h["h"], (n_in,), batch
    )


def lora_rnn(batch=3, n_in=3, n_hid=5, rank=2, alpha=0.7, seed=8) -> PlainSpec:
    """``h' = tanh(x W_in + alpha h B A + b + 0.5 h)`` (recurrent LoRA)."""
    k = _keys(seed, 4)
    params = {
        "W_in": _nrm(k[0], (n_in, n_hid), 0.7),
        "lora_B": _nrm(k[1], (n_hid, rank), 0.7),
        "lora_A": _nrm(k[2], (rank, n_hid), 0.7),
        "b": _nrm(k[3], (n_hid,), 0.3),
    }
    ops = {
        "in": Op("dense", {"weight": "W_in"}, x_fn=_x_in),
        "rec": Op(
            "lora",
            {"lora_b": "lora_B", "lora_a": "lora_A", "bias": "b"},
            x_fn=lambda p, h, x: h["h"],
            alpha=alpha,
        ),
    }

    def step(p, h, x, ys):
        return {"h": jnp.tanh(ys["in"] + ys["rec"] + 0.5 * h["h"])}

    return PlainSpec(
        "lora_rnn", params, {"h": (n_hid,)}, (("h",),), ops, step, lambda p, h, x: h["h"], (n_in,), batch
    )


def tiny_rnn_plain_input(batch=3, n_in=3, n_hid=4, seed=9) -> PlainSpec:
    """The notebook's TinyRNN: plain input weight, ETP recurrent weight, ``h' = tanh(x W_in + h W_rec)``."""
    k = _keys(seed, 2)
    params = {"W_in": _nrm(k[0], (n_in, n_hid), 0.7), "W_rec": _nrm(k[1], (n_hid, n_hid), 0.6)}
    ops = {"rec": Op("dense", {"weight": "W_rec"}, x_fn=lambda p, h, x: h["h"])}

    def step(p, h, x, ys):
        return {"h": jnp.tanh(x @ p["W_in"] + ys["rec"] + 0.3 * h["h"])}

    return PlainSpec(
        "tiny_rnn", params, {"h": (n_hid,)}, (("h",),), ops, step, lambda p, h, x: h["h"], (n_in,), batch
    )


def cond_leaky(batch=3, n_in=3, n_hid=4, seed=10) -> PlainSpec:
    """A plain ``lax.cond`` in the intrinsic dynamics (no ETP op inside it)::

    h' = cond(Σx > 0, 0.9 tanh(h), 0.5 h) + tanh(x W + b)
    """
    k = _keys(seed, 2)
    params = {"W": _nrm(k[0], (n_in, n_hid), 0.7), "b": _nrm(k[1], (n_hid,), 0.3)}
    ops = {"in": Op("dense", {"weight": "W", "bias": "b"}, x_fn=_x_in)}

    def step(p, h, x, ys):
        leak = jax.lax.cond(jnp.sum(x) > 0, lambda v: 0.9 * jnp.tanh(v), lambda v: 0.5 * v, h["h"])
        return {"h": leak + jnp.tanh(ys["in"])}

    return PlainSpec(
        "cond_leaky", params, {"h": (n_hid,)}, (("h",),), ops, step, lambda p, h, x: h["h"], (n_in,), batch
    )
