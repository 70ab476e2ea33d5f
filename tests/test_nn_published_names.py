"""Every name of the published ``braintrace.nn`` (0.2.6) and its constructor keywords.

* Names: each published name exists; the ones the published package takes from ``brainstate.nn``
  are the same objects here.
* Constructors: every new class builds with the published keywords and runs forward with the
  documented shapes; the keyword aliases (``V_initializer``, ``a_initializer``, ``g_initializer``,
  ``spar_mat``) and ``param_type`` / ``channel_first`` / the grouped sizes of existing classes.
* ``IF``, ``Alpha``, ``DualExpon``, ``STD``, ``STP``: the forward pass equals a plain-``jnp`` step
  written here from their docstring equations (float64), and the per-step ``braintrace.D_RTRL``
  gradients of ``Linear -> <model>`` over T = 4 steps equal BPTT (their dynamics are per unit, so
  the masked-RTRL trace is exact).
* ``Embedding``: a plain parameter (``PLAIN_PARAMETER`` record) with its within-step gradient, while
  the ``Linear`` it feeds keeps its exact online gradient.
* ``channel_first`` convolution equals the channels-last one on transposed arrays and keeps the
  kernel a relation of a channel-first hidden state.
"""

from __future__ import annotations

import inspect
import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest
import saiunit as u
from saiunit import sparse as ss

import braintrace
from braintrace import nn

I, H, B, T = 3, 4, 2, 4
TOL = 1e-10
init = brainstate.nn.init

# dir(braintrace.nn) of the published 0.2.6 (its __all__ and the names it forwards)
PUBLISHED_OWN = (
    "Conv1d Conv2d Conv3d Linear GroupedLinear SignedWLinear ScaledWSLinear SparseLinear LoRA Embedding "
    "LeakyRateReadout ValinaRNNCell GRUCell MGUCell LSTMCell URLSTMCell MinimalRNNCell MiniGRU MiniLSTM "
    "LRUCell CFNCell"
).split()
PUBLISHED_FROM_BRAINPY = "IF LIF ALIF Expon Alpha DualExpon STP STD".split()
PUBLISHED_FROM_BRAINSTATE = (
    "ReLU RReLU Hardtanh ReLU6 Sigmoid Hardsigmoid Tanh SiLU Mish Hardswish ELU CELU SELU GLU GELU "
    "Hardshrink LeakyReLU LogSigmoid Softplus Softshrink PReLU Softsign Tanhshrink Softmin Softmax "
    "Softmax2d LogSoftmax Dropout Dropout1d Dropout2d Dropout3d Identity SpikeBitwise Flatten Unflatten "
    "AvgPool1d AvgPool2d AvgPool3d MaxPool1d MaxPool2d MaxPool3d AdaptiveAvgPool1d AdaptiveAvgPool2d "
    "AdaptiveAvgPool3d AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d BatchNorm0d BatchNorm1d "
    "BatchNorm2d BatchNorm3d LayerNorm RMSNorm GroupNorm"
).split()


@pytest.fixture
def f64():
    """float64 and ``dt = 1 ms``, restored afterwards."""
    with om.float64(), brainstate.environ.context(dt=1.0 * u.ms), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class MyParam(brainstate.ParamState):
    pass


class Chain(brainstate.nn.Module):
    def __init__(self, **layers):
        super().__init__()
        self._order = tuple(layers)
        for name, layer in layers.items():
            setattr(self, name, layer)

    def update(self, x):
        for name in self._order:
            x = getattr(self, name)(x)
        return x


# --------------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------------


def test_every_published_name_exists():
    names = set(dir(nn))
    missing = [
        n for n in PUBLISHED_OWN + PUBLISHED_FROM_BRAINPY + PUBLISHED_FROM_BRAINSTATE if n not in names
    ]
    assert not missing
    for n in PUBLISHED_FROM_BRAINSTATE:
        assert getattr(nn, n) is getattr(brainstate.nn, n), n
    assert sorted(nn.BRAINSTATE_NAMES) == sorted(PUBLISHED_FROM_BRAINSTATE)
    for n in PUBLISHED_OWN + PUBLISHED_FROM_BRAINPY:  # implemented here, with ETP ops where they have weights
        assert getattr(nn, n).__module__.startswith("braintrace.nn"), n
        assert n in nn.__all__


def test_brainstate_layers_run():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 4)), jnp.float32)
    assert nn.ReLU()(x).shape == x.shape and float(nn.ReLU()(x).min()) >= 0
    assert nn.MaxPool2d(2, 2, channel_axis=-1)(x).shape == (2, 3, 3, 4)
    assert nn.LayerNorm(4)(x).shape == x.shape
    assert nn.Flatten(start_axis=1)(x).shape == (2, 144)
    assert nn.Identity()(x) is x


# --------------------------------------------------------------------------------------------------
# constructors with the published keywords
# --------------------------------------------------------------------------------------------------


def test_neurons_and_synapses_published_keywords(f64):
    zero = init.Constant(0.0)
    layers = {
        "IF": nn.IF(
            in_size=H,
            R=1.5,
            tau=5.0 * u.ms,
            V_th=1.0,
            V_initializer=zero,
            spk_fun=nn.surrogate.relu_grad,
            spk_reset="soft",
            name="if",
        ),
        "LIF": nn.LIF(H, R=1.0, tau=5.0 * u.ms, V_th=1.0, V_reset=0.0, V_rest=0.0, V_initializer=zero),
        "ALIF": nn.ALIF(H, tau_a=100.0 * u.ms, beta=0.1, V_initializer=zero, a_initializer=zero),
        "Expon": nn.Expon(H, name="e", tau=8.0 * u.ms, g_initializer=zero),
        "Alpha": nn.Alpha(in_size=H, name="a", tau=8.0 * u.ms, g_initializer=zero),
        "DualExpon": nn.DualExpon(
            in_size=H,
            name="d",
            tau_decay=10.0 * u.ms,
            tau_rise=1.0 * u.ms,
            amplitude=1.0,
            normalize=True,
            g_initializer=zero,
        ),
        "STD": nn.STD(in_size=H, name="std", tau=200.0 * u.ms, U=0.07),
        "STP": nn.STP(in_size=H, name="stp", U=0.15, tau_f=1500.0 * u.ms, tau_d=200.0 * u.ms),
    }
    x = jnp.asarray(np.random.default_rng(1).uniform(0, 2, (B, H)))
    for name, layer in layers.items():
        layer.init_state(batch_size=B)
        assert layer(x).shape == (B, H), name
        for state in layer.states(brainstate.HiddenState).values():
            assert state.value.shape == (B, H) and state.value.dtype == jnp.float64, name
    assert layers["Alpha"].name == "a" and layers["STP"].name == "stp"
    np.testing.assert_allclose(layers["STP"].u.value.shape, (B, H))

    with pytest.raises(TypeError, match="V_initializer"):
        nn.LIF(H, V_init=zero, V_initializer=zero)
    with pytest.raises(TypeError, match="a_initializer"):
        nn.ALIF(H, a_init=zero, a_initializer=zero)
    with pytest.raises(TypeError, match="g_initializer"):
        nn.Expon(H, g_init=zero, g_initializer=zero)
    with pytest.raises(ValueError, match="`tau_decay` must differ from `tau_rise`"):
        nn.DualExpon(H, tau_decay=2.0 * u.ms, tau_rise=2.0 * u.ms)
    nn.DualExpon(H, tau_decay=2.0 * u.ms, tau_rise=2.0 * u.ms, normalize=False)
    with pytest.raises(ValueError, match=r"`U` must be .* in \[0, 1\]"):
        nn.STD(H, U=1.5)
    with pytest.raises(ValueError, match="tau_f"):
        nn.STP(H, tau_f=-1.0 * u.ms)
    with pytest.raises(ValueError, match=r"expected an input of shape \(\.\.\., 4\)"):
        layers["STD"](jnp.ones((B, H + 1)))

    # initialisers are used; V_initializer with a unit
    lif = nn.LIF(
        H,
        V_th=1.0 * u.mV,
        V_reset=0.0 * u.mV,
        V_rest=0.0 * u.mV,
        R=1.0 * u.ohm,
        V_initializer=init.Constant(0.5 * u.mV),
    )
    lif.init_state(batch_size=B)
    assert u.get_unit(lif.V.value) == u.mV
    np.testing.assert_allclose(lif.V.value.to_decimal(u.mV), 0.5)
    ifn = nn.IF(H, V_th=1.0 * u.mV, R=1.0 * u.ohm, V_initializer=init.Constant(0.0 * u.mV))
    ifn.init_state(batch_size=B)
    assert ifn(jnp.full((B, H), 30.0) * u.mA).shape == (B, H)


def test_embedding_published_keywords(f64):
    table = jnp.asarray(np.random.default_rng(2).standard_normal((10, 4)))
    layer = nn.Embedding(
        num_embeddings=10,
        embedding_size=4,
        embedding_init=table,
        padding_idx=None,
        max_norm=None,
        norm_type=2.0,
        scale_grad_by_freq=False,
        freeze=False,
        name="emb",
        param_type=MyParam,
    )
    assert isinstance(layer, brainstate.nn.Embedding) and isinstance(layer.weight, MyParam)
    idx = jnp.array([[0, 3, 3], [9, 1, 0]])
    np.testing.assert_array_equal(layer(idx), table[idx])
    assert layer(jnp.array(5)).shape == (4,)
    assert nn.Embedding(6, (2, 3))(jnp.array([1, 2])).shape == (2, 2, 3)
    pad = nn.Embedding(6, 3, padding_idx=0)  # supported: brainstate's lookup
    np.testing.assert_array_equal(pad(jnp.array([0])), jnp.zeros((1, 3)))


def test_linear_maps_published_keywords(f64):
    rng = np.random.default_rng(3)
    dense = np.where(rng.uniform(size=(I, H)) < 0.6, rng.standard_normal((I, H)), 0.0)
    csr = ss.CSR.fromdense(jnp.asarray(dense))
    x = jnp.asarray(rng.standard_normal((B, I)))

    lin = nn.Linear(
        I, H, w_init=init.KaimingNormal(), b_init=init.ZeroInit(), w_mask=None, name="l", param_type=MyParam
    )
    assert isinstance(lin.weight, MyParam) and lin(x).shape == (B, H)
    masked = nn.Linear(I, H, w_mask=lambda shape: jnp.zeros(shape))  # an initializer as mask
    np.testing.assert_allclose(masked(x), jnp.broadcast_to(masked.weight.value["bias"], (B, H)))

    sp = nn.SparseLinear(spar_mat=csr, b_init=init.Constant(0.5), in_size=I, name="s", param_type=MyParam)
    assert isinstance(sp.weight, MyParam)
    np.testing.assert_allclose(sp(x), x @ dense + 0.5, rtol=1e-12)
    positional = nn.SparseLinear(csr, init.ZeroInit())  # the published positional order: b_init second
    assert set(positional.weight.value) == {"weight", "bias"}
    np.testing.assert_allclose(nn.SparseLinear(conn=csr)(x), x @ dense, rtol=1e-12)
    with pytest.raises(TypeError, match="spar_mat"):
        nn.SparseLinear(csr, conn=csr)
    with pytest.raises(TypeError, match="spar_mat"):
        nn.SparseLinear()

    G, GI, GO = 3, 2, 5
    xg = jnp.asarray(rng.standard_normal((B, G, GI)))
    for layer in (
        nn.GroupedLinear(
            num_groups=G,
            in_features=GI,
            out_features=GO,
            w_init=init.KaimingNormal(),
            b_init=init.ZeroInit(),
            name="g",
            param_type=MyParam,
        ),
        nn.GroupedLinear(G, GI, GO),
        nn.GroupedLinear((G, GI), GO),
        nn.GroupedLinear(in_size=(G, GI), out_size=GO),
    ):
        assert (layer.num_groups, layer.in_features, layer.out_features) == (G, GI, GO)
        assert layer.in_size == (G, GI) and layer.out_size == (G, GO)
        assert layer.weight.value["weight"].shape == (G, GI, GO)
        assert layer(xg).shape == (B, G, GO)
    assert isinstance(nn.GroupedLinear(G, GI, GO, param_type=MyParam).weight, MyParam)
    with pytest.raises(TypeError, match="out_features"):
        nn.GroupedLinear(G, GI)
    with pytest.raises(TypeError, match="not both"):
        nn.GroupedLinear(G, GI, GO, in_size=(G, GI), out_size=GO)

    conv = nn.Conv2d(
        (6, 5, 3),
        out_channels=4,
        kernel_size=3,
        stride=1,
        padding="SAME",
        lhs_dilation=1,
        rhs_dilation=1,
        groups=1,
        w_init=init.XavierNormal(),
        b_init=None,
        w_mask=None,
        channel_first=False,
        name="c",
        param_type=MyParam,
    )
    assert isinstance(conv.weight, MyParam) and set(conv.weight.value) == {"weight"}
    assert conv(jnp.ones((B, 6, 5, 3))).shape == (B, 6, 5, 4)
    for cls in (nn.Conv1d, nn.Conv3d):
        assert isinstance(cls((4,) * (cls.num_spatial_dims + 1), 2, 3, param_type=MyParam).weight, MyParam)


def test_minimal_rnn_published_positional_phi(f64):
    phi = nn.Linear(I, H)
    cell = nn.MinimalRNNCell(I, H, init.Orthogonal(), init.ZeroInit(), init.ZeroInit(), phi, "m")
    assert cell.phi is phi and cell.name == "m"
    params = inspect.signature(nn.MinimalRNNCell.__init__).parameters
    assert list(params)[1:8] == ["in_size", "out_size", "w_init", "b_init", "state_init", "phi", "name"]


# --------------------------------------------------------------------------------------------------
# channel_first convolutions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, spatial", [(nn.Conv1d, (9,)), (nn.Conv2d, (6, 5)), (nn.Conv3d, (4, 5, 3))])
def test_conv_channel_first_equals_transposed(f64, cls, spatial):
    rng = np.random.default_rng(4)
    C_in, C_out, n = 2, 3, len(spatial)
    kw = dict(kernel_size=3, stride=2, padding="SAME", b_init=init.Normal())
    last = cls(spatial + (C_in,), C_out, **kw)
    first = cls((C_in,) + spatial, C_out, channel_first=True, **kw)
    first.weight.value = jax.tree.map(jnp.asarray, last.weight.value)
    assert first.in_channels == C_in and first.channel_first and not last.channel_first
    assert first.out_size == (last.out_size[-1],) + last.out_size[:-1]
    x = jnp.asarray(rng.standard_normal((B, C_in) + spatial))
    to_last = lambda a: jnp.moveaxis(a, 1 if a.ndim == n + 2 else 0, -1)  # noqa: E731
    to_first = lambda a: jnp.moveaxis(a, -1, 1 if a.ndim == n + 2 else 0)  # noqa: E731
    np.testing.assert_allclose(first(x), to_first(last(to_last(x))), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(first(x[0]), to_first(last(to_last(x[0]))), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="input channels"):
        first(jnp.ones((B, C_in + 1) + spatial))


class LeakyConv(brainstate.nn.Module):
    """``h' = 0.6 h + conv(x)`` with a channel-first hidden state ``(B, C_out, L_out)``."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size,) + self.conv.out_size))

    def update(self, x):
        self.h.value = 0.6 * self.h.value + self.conv(x)
        return self.h.value


def test_conv_channel_first_online(f64):
    conv = nn.Conv1d((2, 8), 3, 3, channel_first=True, b_init=init.ZeroInit())
    model = LeakyConv(conv)
    brainstate.nn.init_all_states(model, batch_size=B)
    alg = braintrace.D_RTRL(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no shape-mismatch warning: the kernel is a relation
        alg.compile_graph(jnp.ones((B, 2, 8)))
    (rel,) = alg.graph.hidden_param_op_relations
    assert rel.primitive.name == "etp_conv" and set(rel.trainable_vars) == {"weight", "bias"}

    rng = np.random.default_rng(5)
    xs = jnp.asarray(rng.standard_normal((T, B, 2, 8)))
    ys = jnp.asarray(rng.standard_normal((T, B, 3, 8)))
    w0 = jax.tree.map(jnp.asarray, conv.weight.value)

    def plain(p, x):
        y = jax.lax.conv_general_dilated(
            x, p["weight"], (1,), "SAME", dimension_numbers=("NCW", "WIO", "NCW")
        )
        return y + p["bias"][:, None]

    online = per_step_online(model, alg, xs, ys)
    bptt = per_step_bptt(lambda p, h, x: (0.6 * h + plain(p, x),) * 2, w0, jnp.zeros((B, 3, 8)), xs, ys)
    assert_per_step_close(online[("conv", "weight")], bptt)


# --------------------------------------------------------------------------------------------------
# IF / Alpha / DualExpon / STD / STP: forward against plain steps, D_RTRL against BPTT
# --------------------------------------------------------------------------------------------------


@jax.custom_jvp
def spike(x):
    """Heaviside with the pseudo-derivative ``0.3 max(1 - |x|, 0)`` (``relu_grad`` defaults)."""
    return (x > 0).astype(x.dtype)


@spike.defjvp
def _spike_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return spike(x), 0.3 * jnp.maximum(1.0 - jnp.abs(x), 0.0) * t


def beta(tau_ms):
    return np.exp(-1.0 / tau_ms)


IF_P = dict(tau=4.0, V_th=1.0, R=1.3)
ALPHA_TAU = 3.0
DUAL = dict(tau_decay=6.0, tau_rise=2.0, amplitude=1.7)
STD_P = dict(tau=5.0, U=0.3)
STP_P = dict(U=0.25, tau_f=7.0, tau_d=4.0)


def if_step(reset):
    p = IF_P

    def step(V, y):
        s_prev = spike((V - p["V_th"]) / p["V_th"])
        V_hat = V - (p["V_th"] if reset == "soft" else jax.lax.stop_gradient(V)) * s_prev
        V = beta(p["tau"]) * V_hat + (1 - beta(p["tau"])) * p["R"] * y
        return V, spike((V - p["V_th"]) / p["V_th"])

    return step


def alpha_step(carry, y):
    g, h = carry
    b = beta(ALPHA_TAU)
    g_new = b * g + (1 - b) * h
    return (g_new, b * h + y), g_new


def dual_step(normalize):
    p = DUAL
    r = p["tau_rise"] / p["tau_decay"]
    c = (p["tau_decay"] / (p["tau_decay"] - p["tau_rise"])) * r ** (
        p["tau_rise"] / (p["tau_rise"] - p["tau_decay"])
    )

    def step(carry, y):
        rise, dec = carry
        rise = beta(p["tau_rise"]) * rise + y
        dec = beta(p["tau_decay"]) * dec + y
        return (rise, dec), p["amplitude"] * (c if normalize else 1.0) * (dec - rise)

    return step


def std_step(x, s):
    rec = 1 - beta(STD_P["tau"]) * (1 - x)
    return rec - STD_P["U"] * x * s, rec * s


def stp_step(carry, s):
    uu, x = carry
    p = STP_P
    u_new = beta(p["tau_f"]) * uu + p["U"] * (1 - uu) * s
    x_rec = 1 - beta(p["tau_d"]) * (1 - x)
    return (u_new, x_rec - u_new * x * s), u_new * x_rec * s


def ones_like_state(v):
    return jnp.ones((B, H)) * v


CASES = {
    # name: (layer factory, plain step (carry, y) -> (carry, out), initial carry, state names)
    "IF-soft": (
        lambda: nn.IF(H, tau=IF_P["tau"] * u.ms, V_th=IF_P["V_th"], R=IF_P["R"], spk_reset="soft"),
        if_step("soft"),
        lambda: jnp.zeros((B, H)),
        ("V",),
    ),
    "IF-hard": (
        lambda: nn.IF(H, tau=IF_P["tau"] * u.ms, V_th=IF_P["V_th"], R=IF_P["R"], spk_reset="hard"),
        if_step("hard"),
        lambda: jnp.zeros((B, H)),
        ("V",),
    ),
    "Alpha": (
        lambda: nn.Alpha(H, tau=ALPHA_TAU * u.ms),
        alpha_step,
        lambda: (jnp.zeros((B, H)), jnp.zeros((B, H))),
        ("g", "h"),
    ),
    "DualExpon": (
        lambda: nn.DualExpon(
            H,
            tau_decay=DUAL["tau_decay"] * u.ms,
            tau_rise=DUAL["tau_rise"] * u.ms,
            amplitude=DUAL["amplitude"],
        ),
        dual_step(True),
        lambda: (jnp.zeros((B, H)), jnp.zeros((B, H))),
        ("g_rise", "g_decay"),
    ),
    "DualExpon-raw": (
        lambda: nn.DualExpon(
            H,
            tau_decay=DUAL["tau_decay"] * u.ms,
            tau_rise=DUAL["tau_rise"] * u.ms,
            amplitude=DUAL["amplitude"],
            normalize=False,
        ),
        dual_step(False),
        lambda: (jnp.zeros((B, H)), jnp.zeros((B, H))),
        ("g_rise", "g_decay"),
    ),
    "STD": (
        lambda: nn.STD(H, tau=STD_P["tau"] * u.ms, U=STD_P["U"]),
        std_step,
        lambda: jnp.ones((B, H)),
        ("x",),
    ),
    "STP": (
        lambda: nn.STP(H, U=STP_P["U"], tau_f=STP_P["tau_f"] * u.ms, tau_d=STP_P["tau_d"] * u.ms),
        stp_step,
        lambda: (jnp.full((B, H), STP_P["U"]), jnp.ones((B, H))),
        ("u", "x"),
    ),
}


def _as_tuple(c):
    return c if isinstance(c, tuple) else (c,)


@pytest.mark.parametrize("name", list(CASES))
def test_dynamics_equal_plain_step(f64, name):
    make, step, carry0, state_names = CASES[name]
    layer = make()
    layer.init_state(batch_size=B)
    carry = carry0()
    for want, s in zip(_as_tuple(carry), state_names):
        np.testing.assert_array_equal(getattr(layer, s).value, want)
    rng = np.random.default_rng(6)
    for t in range(6):
        y = jnp.asarray(rng.uniform(0.0, 3.0, (B, H)) if name.startswith("IF") else rng.uniform(0, 1, (B, H)))
        carry, want = step(carry, y)
        got = layer(y)
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)
        for want_s, s in zip(_as_tuple(carry), state_names):
            np.testing.assert_allclose(getattr(layer, s).value, want_s, rtol=1e-13, atol=1e-14)


def per_step_online(model, alg, xs, ys):
    params = model.states(brainstate.ParamState)
    step = brainstate.transform.jit(
        lambda x, y: brainstate.transform.grad(lambda: om.loss_fn(alg(x), y), params)()
    )
    per_step = [step(xs[t], ys[t]) for t in range(xs.shape[0])]
    return {k: jax.tree.map(lambda *a: jnp.stack(a), *[g[k] for g in per_step]) for k in per_step[0]}


def per_step_bptt(step, params, carry0, xs, ys):
    """``d L_t / d params`` for every ``t`` of the unrolled ``carry, out = step(params, carry, x)``."""

    def loss_t(p, t):
        carry = carry0
        for k in range(t + 1):
            carry, out = step(p, carry, xs[k])
        return om.loss_fn(out, ys[t])

    grads = [jax.grad(loss_t)(params, t) for t in range(xs.shape[0])]
    return jax.tree.map(lambda *a: jnp.stack(a), *grads)


def assert_per_step_close(got, want):
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert np.linalg.norm(np.asarray(w)) > 0
        assert om.rel_err(g, w) < TOL, (om.rel_err(g, w), g, w)


@pytest.mark.parametrize("name", list(CASES))
def test_online_gradients_equal_bptt(f64, name):
    make, step, carry0, _ = CASES[name]
    rng = np.random.default_rng(7)
    lin = nn.Linear(I, H)
    spiking = name.startswith("IF")
    w0 = {
        "weight": jnp.asarray(rng.normal(0.8 if spiking else 0.0, 1.0, (I, H))),
        "bias": jnp.asarray(rng.normal(1.0 if spiking else 0.3, 0.3, (H,))),
    }
    lin.weight.value = w0
    model = Chain(inp=lin, syn=make())
    brainstate.nn.init_all_states(model, batch_size=B)
    xs = jnp.asarray(rng.uniform(0.0, 2.0, (T, B, I)))
    ys = jnp.asarray(rng.standard_normal((T, B, H)))
    alg = braintrace.D_RTRL(model)
    alg.compile_graph(xs[0])
    assert not [r for r in alg.graph.records if r.level.name == "WARNING"]
    online = per_step_online(model, alg, xs, ys)[("inp", "weight")]

    def plain(p, carry, x):
        return step(carry, x @ p["weight"] + p["bias"])

    bptt = per_step_bptt(plain, w0, carry0(), xs, ys)
    if spiking:  # the run exercises the surrogate (membranes near threshold) and the reset
        carry, n_spikes = carry0(), 0
        for x in xs:
            carry, s = plain(w0, carry, x)
            n_spikes += int(jnp.sum(s))
        assert 0 < n_spikes < T * B * H
    assert_per_step_close(online, bptt)


# --------------------------------------------------------------------------------------------------
# Embedding: plain parameter, within-step gradient
# --------------------------------------------------------------------------------------------------


def test_embedding_within_step_gradient(f64):
    rng = np.random.default_rng(8)
    V, E, tau = 6, 3, 4.0
    table = jnp.asarray(rng.standard_normal((V, E)))
    w0 = {"weight": jnp.asarray(rng.standard_normal((E, H))), "bias": jnp.asarray(rng.standard_normal(H))}
    emb = nn.Embedding(V, E, embedding_init=table)
    lin = nn.Linear(E, H)
    lin.weight.value = w0
    model = Chain(emb=emb, inp=lin, syn=nn.Expon(H, tau=tau * u.ms))
    brainstate.nn.init_all_states(model, batch_size=B)
    idx = jnp.asarray(rng.integers(0, V, (T, B)))
    ys = jnp.asarray(rng.standard_normal((T, B, H)))
    alg = braintrace.D_RTRL(model)
    alg.compile_graph(idx[0])
    plain_records = [r for r in alg.graph.records if r.kind.name == "PLAIN_PARAMETER"]
    assert [r.subject for r in plain_records] == [("emb.weight",)]
    online = per_step_online(model, alg, idx, ys)

    def step(p, g, i):
        g = beta(tau) * g + p["table"][i] @ p["w"]["weight"] + p["w"]["bias"]
        return g, g

    params = {"table": table, "w": w0}
    bptt = per_step_bptt(step, params, jnp.zeros((B, H)), idx, ys)
    assert_per_step_close(online[("inp", "weight")], bptt["w"])

    # the table: d L_t / d table with the previous state held fixed
    def one_step_loss(tb, g, t):
        return om.loss_fn(step({"table": tb, "w": w0}, g, idx[t])[1], ys[t])

    g, within = jnp.zeros((B, H)), []
    for t in range(T):
        within.append(jax.grad(one_step_loss)(table, g, t))
        g, _ = step(params, g, idx[t])
    assert_per_step_close(online[("emb", "weight")], jnp.stack(within))
    assert om.rel_err(online[("emb", "weight")], bptt["table"]) > 1e-3  # not BPTT: truncated, as documented
