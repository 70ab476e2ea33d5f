"""The operand-transform keywords of the wrappers (``weight_fn``, ``bias_fn``, ``b_fn``, ``a_fn``,
``kernel_fn``), the published call forms, and the online gradient through a transform (float64).

* Forward: each wrapper with each keyword equals the plain ``jnp`` / ``lax`` computation with the
  function applied to the operand (to its mantissa for quantities); the primitive's trainable operand
  is the transformed value.
* Online gradient: a leaky model per wrapper (``h <- 0.9 h + op(x, f(w))``, a conv feeding leaky
  units, an element-wise decay ``h <- a h + (1 - a) x`` with ``a = sigmoid(w)``) under
  ``braintrace.D_RTRL`` over T = 4 steps equals ``jax.grad`` of the summed loss through a plain
  unrolled loop (BPTT): the hidden Jacobian is per-unit there, so D-RTRL is exact, and the transform's
  derivative must enter through the chain rule.
* The parameter names, kinds and positions of the published 0.2 signatures.
"""

from __future__ import annotations

import inspect

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest
import saiunit as u
from jax import lax

import braintrace

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

B, T = 2, 4
DECAY = 0.9


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with om.float64():
        yield


def _nrm(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape))


def _close(a, b, tol=1e-12):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def softplus(v):
    return jax.nn.softplus(v)


# ------------------------------------------------------------------------------------------------
# The models: one step through the wrapper and the same step in plain jnp / lax
# ------------------------------------------------------------------------------------------------

N_IN, N_OUT = 3, 4

CONV_DN = ("NWC", "WIO", "NWC")
CONV_W, CONV_K, CONV_CIN, CONV_COUT = 7, 3, 2, 3

G, G_IN, G_OUT = 2, 3, 2

SP_ROWS = np.array([0, 0, 1, 2, 2, 2])
SP_COLS = np.array([1, 3, 0, 0, 2, 3])  # row-major (CSR data order)
SP_INDPTR = np.array([0, 2, 3, 6])


def _csr(data):
    return u.sparse.CSR((data, jnp.asarray(SP_COLS), jnp.asarray(SP_INDPTR)), shape=(N_IN, N_OUT))


def _sparse_dense(data):
    return jnp.zeros((N_IN, N_OUT), data.dtype).at[SP_ROWS, SP_COLS].set(data)


def _plain_conv(x, k):
    return lax.conv_general_dilated(x, k, (1,), "VALID", dimension_numbers=CONV_DN)


CASES = {
    "matmul": dict(
        params=lambda: {"w": _nrm(1, (N_IN, N_OUT)), "b": _nrm(2, (N_OUT,))},
        x_shape=(B, N_IN),
        h_shape=(B, N_OUT),
        op=lambda p, x: braintrace.matmul(x, p["w"], p["b"], weight_fn=jnp.abs, bias_fn=jnp.tanh),
        plain=lambda p, x: x @ jnp.abs(p["w"]) + jnp.tanh(p["b"]),
    ),
    "lora_matmul": dict(
        params=lambda: {"lb": _nrm(3, (N_IN, 2)), "la": _nrm(4, (2, N_OUT)), "b": _nrm(5, (N_OUT,))},
        x_shape=(B, N_IN),
        h_shape=(B, N_OUT),
        op=lambda p, x: braintrace.lora_matmul(
            x, p["lb"], p["la"], alpha=0.5, bias=p["b"], b_fn=jnp.tanh, a_fn=jnp.abs, bias_fn=softplus
        ),
        plain=lambda p, x: 0.5 * (x @ jnp.tanh(p["lb"])) @ jnp.abs(p["la"]) + softplus(p["b"]),
    ),
    "conv": dict(
        params=lambda: {"k": _nrm(6, (CONV_K, CONV_CIN, CONV_COUT)), "b": _nrm(7, (CONV_COUT,))},
        x_shape=(B, CONV_W, CONV_CIN),
        h_shape=(B, CONV_W - CONV_K + 1, CONV_COUT),
        op=lambda p, x: braintrace.conv(
            x,
            p["k"],
            p["b"],
            strides=(1,),
            padding="VALID",
            dimension_numbers=CONV_DN,
            kernel_fn=jnp.abs,
            bias_fn=jnp.tanh,
        ),
        plain=lambda p, x: _plain_conv(x, jnp.abs(p["k"])) + jnp.tanh(p["b"]),
    ),
    "sparse_matmul": dict(
        params=lambda: {"w": _nrm(8, (len(SP_ROWS),)), "b": _nrm(9, (N_OUT,))},
        x_shape=(B, N_IN),
        h_shape=(B, N_OUT),
        op=lambda p, x: braintrace.sparse_matmul(
            x, p["w"], sparse_mat=_csr(p["w"]), bias=p["b"], weight_fn=jnp.abs, bias_fn=jnp.tanh
        ),
        plain=lambda p, x: x @ _sparse_dense(jnp.abs(p["w"])) + jnp.tanh(p["b"]),
    ),
    "grouped_matmul": dict(
        params=lambda: {"w": _nrm(10, (G, G_IN, G_OUT)), "b": _nrm(11, (G, G_OUT))},
        x_shape=(B, G, G_IN),
        h_shape=(B, G, G_OUT),
        op=lambda p, x: braintrace.grouped_matmul(x, p["w"], p["b"], weight_fn=jnp.abs, bias_fn=jnp.tanh),
        plain=lambda p, x: jnp.einsum("bgi,gio->bgo", x, jnp.abs(p["w"])) + jnp.tanh(p["b"]),
    ),
}


def _leaky_step(y_fn):
    return lambda p, h, x: DECAY * h + y_fn(p, x)


def _elem_op(p, h, x):
    a = braintrace.element_wise(p["a"], weight_fn=jax.nn.sigmoid)
    return a * h + (1.0 - a) * x


def _elem_plain(p, h, x):
    a = jax.nn.sigmoid(p["a"])
    return a * h + (1.0 - a) * x


STEP_CASES = {
    **{
        name: dict(
            params=c["params"],
            x_shape=c["x_shape"],
            h_shape=c["h_shape"],
            step=_leaky_step(c["op"]),
            plain=_leaky_step(c["plain"]),
        )
        for name, c in CASES.items()
    },
    "element_wise": dict(
        params=lambda: {"a": _nrm(12, (N_OUT,))},
        x_shape=(B, N_OUT),
        h_shape=(B, N_OUT),
        step=_elem_op,
        plain=_elem_plain,
    ),
}


class Leaky(brainstate.nn.Module):
    """``h <- step(params, h, x)``, output ``h``."""

    def __init__(self, case):
        super().__init__()
        self._case = (case,)
        self._names = tuple(case["params"]())
        for name, value in case["params"]().items():
            setattr(self, name, brainstate.ParamState(value))

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros(self._case[0]["h_shape"]))

    def update(self, x):
        p = {n: getattr(self, n).value for n in self._names}
        self.h.value = self._case[0]["step"](p, self.h.value, x)
        return self.h.value


def _bptt(case, xs, targets):
    def total(p):
        h, loss = jnp.zeros(case["h_shape"]), 0.0
        for t in range(T):
            h = case["plain"](p, h, xs[t])
            loss = loss + om.loss_fn(h, targets[t])
        return loss

    return jax.grad(total)(case["params"]())


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_d_rtrl_through_transform_equals_bptt(name):
    case = STEP_CASES[name]
    rng = np.random.default_rng(20)
    xs = jnp.asarray(rng.standard_normal((T, *case["x_shape"])))
    targets = jnp.asarray(rng.standard_normal((T, *case["h_shape"])))
    module = Leaky(case)
    brainstate.nn.init_all_states(module)
    got, _ = om.run_online(braintrace.D_RTRL(module), module, xs, targets)
    got = {k: v.sum(0) for k, v in got.items()}
    want = _bptt(case, xs, targets)
    om.assert_grads_close(got, want, what=f"D_RTRL {name} with an operand transform, summed over {T} steps")


# ------------------------------------------------------------------------------------------------
# Forward values
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_forward_equals_plain(name):
    case = CASES[name]
    p = case["params"]()
    x = _nrm(13, case["x_shape"])
    _close(case["op"](p, x), case["plain"](p, x))


def _eqn_operands(fn, prim_name, *args):
    """The producer primitive of each operand of the equation ``prim_name`` in ``make_jaxpr(fn)``."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    producer = {v: e.primitive.name for e in jaxpr.eqns for v in e.outvars}
    eqn = next(e for e in jaxpr.eqns if e.primitive.name == prim_name)
    return [producer.get(v) for v in eqn.invars]


def test_the_primitive_binds_the_transformed_operand():
    x, w, b = _nrm(14, (B, N_IN)), _nrm(15, (N_IN, N_OUT)), _nrm(16, (N_OUT,))
    ops = _eqn_operands(
        lambda w_, b_: braintrace.matmul(x, w_, b_, weight_fn=jnp.abs, bias_fn=jnp.tanh), "etp_mm", w, b
    )
    assert ops[1:] == ["abs", "tanh"]
    assert _eqn_operands(lambda a: braintrace.element_wise(a, weight_fn=jnp.abs), "etp_elemwise", b) == [
        "abs"
    ]


@pytest.mark.parametrize("fn_name", ["weight_fn", "bias_fn"])
def test_matmul_single_keyword_and_unbatched(fn_name):
    x, w, b = _nrm(17, (N_IN,)), _nrm(18, (N_IN, N_OUT)), _nrm(19, (N_OUT,))
    y = braintrace.matmul(x, w, b, **{fn_name: jnp.exp})
    want = x @ jnp.exp(w) + b if fn_name == "weight_fn" else x @ w + jnp.exp(b)
    _close(y, want)
    _close(braintrace.matmul(x, w, bias_fn=jnp.exp), x @ w)  # ignored without a bias


@pytest.mark.parametrize("fn_name", ["b_fn", "a_fn", "bias_fn"])
def test_lora_single_keyword(fn_name):
    x, lb, la, b = _nrm(20, (B, N_IN)), _nrm(21, (N_IN, 2)), _nrm(22, (2, N_OUT)), _nrm(23, (N_OUT,))
    y = braintrace.lora_matmul(x, lb, la, alpha=2.0, bias=b, **{fn_name: jnp.exp})
    f = {k: (jnp.exp if k == fn_name else (lambda v: v)) for k in ("b_fn", "a_fn", "bias_fn")}
    _close(y, 2.0 * (x @ f["b_fn"](lb)) @ f["a_fn"](la) + f["bias_fn"](b))


def test_element_wise_weight_fn():
    w = _nrm(24, (N_OUT,))
    _close(braintrace.element_wise(w, weight_fn=jnp.tanh), jnp.tanh(w))
    _close(braintrace.element_wise(w), w)
    y = braintrace.element_wise(w * u.ms, weight_fn=jnp.abs)  # on the mantissa, the unit kept
    assert u.get_unit(y) == u.ms
    _close(u.get_mantissa(y), jnp.abs(w))
    _close(braintrace.element_wise(w, jnp.abs), jnp.abs(w))  # the specification's positional `fn`


def test_quantities():
    x, w, b = _nrm(25, (B, N_IN)), _nrm(26, (N_IN, N_OUT)), _nrm(27, (N_OUT,))
    unit = u.mV * u.mS
    y = braintrace.matmul(x * u.mV, w * u.mS, b * unit, weight_fn=jnp.abs, bias_fn=jnp.tanh)
    assert u.get_unit(y).has_same_dim(unit)
    _close(u.Quantity(y).to_decimal(unit), x @ jnp.abs(w) + jnp.tanh(b))
    # the bias is expressed in the unit of x @ weight before bias_fn sees its mantissa
    y = braintrace.matmul(x * u.mV, w * u.mS, b * 1000.0 * unit, bias_fn=jnp.tanh)
    _close(u.Quantity(y).to_decimal(unit), x @ w + jnp.tanh(1000.0 * b))

    lb, la = _nrm(28, (N_IN, 2)), _nrm(29, (2, N_OUT))
    y = braintrace.lora_matmul(x * u.mV, lb * u.mS, la, b_fn=jnp.abs, a_fn=jnp.tanh)
    _close(u.Quantity(y).to_decimal(unit), (x @ jnp.abs(lb)) @ jnp.tanh(la))

    data = _nrm(30, (len(SP_ROWS),))
    y = braintrace.sparse_matmul(x * u.mV, data * u.mS, sparse_mat=_csr(data), weight_fn=jnp.abs)
    _close(u.Quantity(y).to_decimal(unit), x @ _sparse_dense(jnp.abs(data)))

    xg, wg = _nrm(31, (B, G, G_IN)), _nrm(32, (G, G_IN, G_OUT))
    y = braintrace.grouped_matmul(xg * u.mV, wg * u.mS, weight_fn=jnp.abs)
    _close(u.Quantity(y).to_decimal(unit), jnp.einsum("bgi,gio->bgo", xg, jnp.abs(wg)))

    xc, k = _nrm(33, (B, CONV_W, CONV_CIN)), _nrm(34, (CONV_K, CONV_CIN, CONV_COUT))
    y = braintrace.conv(
        xc * u.mV, k * u.mS, strides=(1,), padding="VALID", dimension_numbers=CONV_DN, kernel_fn=jnp.abs
    )
    _close(u.Quantity(y).to_decimal(unit), _plain_conv(xc, jnp.abs(k)))


def test_under_jit_a_fresh_lambda_is_fine():
    x, w = _nrm(35, (B, N_IN)), _nrm(36, (N_IN, N_OUT))
    f = jax.jit(lambda x_, w_: braintrace.matmul(x_, w_, weight_fn=lambda v: v**2))
    _close(f(x, w), x @ w**2)
    _close(jax.grad(lambda w_: jnp.sum(f(x, w_)))(w), jax.grad(lambda w_: jnp.sum(x @ w_**2))(w))


# ------------------------------------------------------------------------------------------------
# Published call forms and signatures
# ------------------------------------------------------------------------------------------------


def test_published_call_forms():
    x, w, b = _nrm(37, (B, N_IN)), _nrm(38, (N_IN, N_OUT)), _nrm(39, (N_OUT,))
    _close(braintrace.matmul(x, w, bias=b, weight_fn=jnp.abs), x @ jnp.abs(w) + b)

    data = _nrm(40, (len(SP_ROWS),))
    csr = _csr(data)
    want = x @ _sparse_dense(data) + b
    _close(braintrace.sparse_matmul(x, data, sparse_mat=csr, bias=b), want)
    _close(braintrace.sparse_matmul(x, weight=data, sparse_mat=csr, bias=b), want)
    _close(braintrace.sparse_matmul(x, weight_data=data, sparse_mat=csr, bias=b), want)
    _close(
        braintrace.sparse_matmul(x=x, weight=-data, sparse_mat=csr, bias=b, weight_fn=jnp.abs, bias_fn=None),
        x @ _sparse_dense(jnp.abs(data)) + b,
    )

    # conv with the published defaults (stride 1, 'SAME') in the default layout (NCW / OIW)
    xc, k = _nrm(41, (B, CONV_CIN, CONV_W)), _nrm(42, (CONV_COUT, CONV_CIN, CONV_K))
    _close(braintrace.conv(xc, k), lax.conv_general_dilated(xc, k, (1,), "SAME"))
    _close(braintrace.conv(xc, -k, kernel_fn=jnp.abs), lax.conv_general_dilated(xc, jnp.abs(k), (1,), "SAME"))
    x2, k2 = _nrm(43, (B, CONV_CIN, 5, 4)), _nrm(44, (CONV_COUT, CONV_CIN, 3, 2))
    _close(braintrace.conv(x2, k2), lax.conv_general_dilated(x2, k2, (1, 1), "SAME"))

    xg, wg, bg = _nrm(45, (G, G_IN)), _nrm(46, (G, G_IN, G_OUT)), _nrm(47, (G, G_OUT))
    _close(
        braintrace.grouped_matmul(xg, wg, bias=bg, bias_fn=jnp.exp),
        jnp.einsum("gi,gio->go", xg, wg) + jnp.exp(bg),
    )


_POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
_KW = inspect.Parameter.KEYWORD_ONLY

#: (name, kind) of every parameter of the published 0.2 wrappers, in order.
PUBLISHED = {
    "matmul": [("x", _POS), ("weight", _POS), ("bias", _POS), ("weight_fn", _KW), ("bias_fn", _KW)],
    "lora_matmul": [
        ("x", _POS),
        ("B", _POS),
        ("A", _POS),
        ("alpha", _KW),
        ("bias", _KW),
        ("b_fn", _KW),
        ("a_fn", _KW),
        ("bias_fn", _KW),
    ],
    "conv": [
        ("x", _POS),
        ("kernel", _POS),
        ("bias", _POS),
        ("strides", _KW),
        ("padding", _KW),
        ("lhs_dilation", _KW),
        ("rhs_dilation", _KW),
        ("feature_group_count", _KW),
        ("batch_group_count", _KW),
        ("dimension_numbers", _KW),
        ("kernel_fn", _KW),
        ("bias_fn", _KW),
    ],
    "element_wise": [("weight", _POS), ("weight_fn", _KW)],
    "sparse_matmul": [
        ("x", _POS),
        ("weight", _POS),
        ("sparse_mat", _KW),
        ("bias", _KW),
        ("weight_fn", _KW),
        ("bias_fn", _KW),
    ],
    "grouped_matmul": [("x", _POS), ("weight", _POS), ("bias", _POS), ("weight_fn", _KW), ("bias_fn", _KW)],
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_parameters(name):
    params = inspect.signature(getattr(braintrace, name)).parameters
    ours = list(params.items())
    positional = [n for n, p in ours if p.kind == _POS]
    for n, kind in PUBLISHED[name]:
        assert n in params, f"{name}: no parameter {n!r}"
        assert params[n].kind == kind, (name, n, params[n].kind)
        if n.endswith("_fn"):
            assert params[n].default is None, (name, n)
    assert [n for n, k in PUBLISHED[name] if k == _POS] == [
        n for n in positional if n in dict(PUBLISHED[name])
    ]


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_errors():
    x, w = _nrm(48, (B, N_IN)), _nrm(49, (N_IN, N_OUT))
    with pytest.raises(TypeError, match="matmul: `weight_fn` must be callable"):
        braintrace.matmul(x, w, weight_fn=2.0)
    with pytest.raises(ValueError, match="matmul: `weight_fn` must keep the shape"):
        braintrace.matmul(x, w, weight_fn=lambda v: v[:, :2])
    with pytest.raises(TypeError, match="`weight_fn` is applied to the unitless mantissa"):
        braintrace.matmul(x, w * u.mS, weight_fn=lambda v: v * u.mS)
    with pytest.raises(ValueError, match="lora_matmul: `a_fn` must keep the shape"):
        braintrace.lora_matmul(x, _nrm(50, (N_IN, 2)), _nrm(51, (2, N_OUT)), a_fn=lambda v: v.T)
    with pytest.raises(TypeError, match="element_wise: give `fn`"):
        braintrace.element_wise(w, jnp.abs, weight_fn=jnp.abs)
    data = _nrm(52, (len(SP_ROWS),))
    with pytest.raises(TypeError, match="not both"):
        braintrace.sparse_matmul(x, data, weight_data=data, sparse_mat=_csr(data))
    with pytest.raises(TypeError, match="missing the non-zero values"):
        braintrace.sparse_matmul(x, sparse_mat=_csr(data))
    with pytest.raises(ValueError, match="conv: `bias_fn` must keep the shape"):
        braintrace.conv(
            _nrm(53, (B, CONV_CIN, CONV_W)),
            _nrm(54, (CONV_COUT, CONV_CIN, CONV_K)),
            _nrm(55, (CONV_COUT,)),
            bias_fn=lambda v: v[:1],
        )
