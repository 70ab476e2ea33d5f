"""``braintrace.nn`` names of the published braintrace 0.2 releases: constructor signatures, shapes,
public attributes, and online gradient values (float64).

* Signatures: every published parameter name, in the published order for positional parameters;
  constructing with the published keywords works.
* Recurrent cells (``MiniGRU``, ``MiniLSTM``, ``URLSTMCell``, ``CFNCell``, ``LRUCell``): the forward
  pass equals an independent plain-``jnp`` step written from the published equations; the per-step
  ``braintrace.D_RTRL`` gradients over 4 steps (batch 2) equal the masked-RTRL oracle of
  ``online_models`` built on that plain step, and the first step's gradient (from the zero state)
  equals ``jax.grad`` of the one-step loss. ``LRUCell``'s recurrence is the per-unit rotation kept
  in its hidden Jacobian, so its online gradient also equals BPTT.
* ``SignedWLinear`` / ``ScaledWSLinear`` feeding leaky units (``D_RTRL`` exact): the online gradients,
  pulled back through ``|W|`` and the weight standardisation, equal BPTT.
* ``LoRA``: the published constructor (scale ``1 / lora_rank``, ``lora_a`` input side, ``base_module``)
  and the earlier ``LoRA(in_size, out_size, rank=r)``.
"""

from __future__ import annotations

import inspect
import types
import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest
import saiunit as u

import braintrace
from braintrace import nn

I, H, B, T = 3, 4, 2, 4
TOL = 1e-10


@pytest.fixture
def f64():
    """float64 (``jax_enable_x64`` and brainstate's precision) and ``dt = 1 ms``, restored afterwards."""
    with om.float64(), brainstate.environ.context(dt=1.0 * u.ms), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        brainstate.random.seed(3)
        yield


def lead(batch):
    return () if batch is None else (batch,)


# --------------------------------------------------------------------------------------------------
# signatures
# --------------------------------------------------------------------------------------------------

# (positional-or-keyword names in order, keyword-only names) of the published constructors
PUBLISHED = {
    "LoRA": (
        ["in_features", "lora_rank", "out_features"],
        ["base_module", "kernel_init", "param_type", "in_size"],
    ),
    "SignedWLinear": (["in_size", "out_size", "w_init", "w_sign", "name", "param_type"], []),
    "ScaledWSLinear": (
        ["in_size", "out_size", "w_init", "b_init", "w_mask", "ws_gain", "eps", "name", "param_type"],
        [],
    ),
    "MiniGRU": (["in_size", "out_size", "w_init", "b_init", "state_init", "name"], []),
    "MiniLSTM": (["in_size", "out_size", "w_init", "b_init", "state_init", "name"], []),
    "URLSTMCell": (["in_size", "out_size", "w_init", "state_init", "activation", "name"], []),
    "CFNCell": (["in_size", "out_size", "w_init", "b_init", "state_init", "activation", "name"], []),
    "LRUCell": (["d_model", "d_hidden", "r_min", "r_max", "max_phase"], []),
    "LeakyRateReadout": (["in_size", "out_size", "tau", "w_init", "r_init", "name"], []),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_signature(name):
    positional, keyword_only = PUBLISHED[name]
    params = inspect.signature(getattr(nn, name).__init__).parameters
    ours = [p for p, v in params.items() if v.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]
    assert ours[: len(positional)] == positional
    assert set(keyword_only) <= set(params)
    assert name in nn.__all__


def test_published_keywords_construct(f64):
    init = brainstate.nn.init
    x = jnp.ones((B, I))
    cells = [
        nn.MiniGRU(
            in_size=I,
            out_size=H,
            w_init=init.Orthogonal(),
            b_init=init.ZeroInit(),
            state_init=init.ZeroInit(),
            name="g",
        ),
        nn.MiniLSTM(
            in_size=I,
            out_size=H,
            w_init=init.Orthogonal(),
            b_init=init.ZeroInit(),
            state_init=init.ZeroInit(),
        ),
        nn.URLSTMCell(
            in_size=I, out_size=H, w_init=init.XavierNormal(), state_init=init.ZeroInit(), activation="tanh"
        ),
        nn.CFNCell(
            in_size=I, out_size=H, w_init=init.Orthogonal(), b_init=init.ZeroInit(), activation=jnp.tanh
        ),
    ]
    for cell in cells:
        cell.init_state(batch_size=B)
        assert cell(x).shape == (B, H)
        assert cell.h.value.shape == (B, H)
    lru = nn.LRUCell(d_model=I, d_hidden=5, r_min=0.2, r_max=0.9, max_phase=3.14)
    lru.init_state(batch_size=B)
    assert lru(x).shape == (B, I) and lru.h_re.value.shape == lru.h_im.value.shape == (B, 5)
    modulus = np.exp(-np.exp(np.asarray(lru.nu_log.value)))
    assert np.all((modulus >= 0.2 - 1e-12) & (modulus <= 0.9 + 1e-12))
    assert np.all(np.exp(np.asarray(lru.theta_log.value)) <= 3.14)
    lru.init_state()
    assert lru(jnp.ones(I)).shape == (I,)
    assert nn.SignedWLinear(in_size=I, out_size=H, w_init=init.KaimingNormal(), w_sign=None)(x).shape == (
        B,
        H,
    )
    layer = nn.ScaledWSLinear(
        in_size=I, out_size=H, b_init=None, w_mask=jnp.ones((I, 1)), ws_gain=False, eps=1e-3
    )
    assert layer(x).shape == (B, H) and set(layer.weight.value) == {"weight"}
    with pytest.raises(ValueError, match="broadcast"):
        nn.SignedWLinear(I, H, w_sign=jnp.ones((I + 1, H)))
    with pytest.raises(ValueError, match="r_min <= r_max"):
        nn.LRUCell(3, 4, r_min=0.9, r_max=0.5)


# --------------------------------------------------------------------------------------------------
# recurrent cells: plain-jnp steps written from the published equations
# --------------------------------------------------------------------------------------------------


def flat(tree):
    """``{path: array or {key: array}}`` -> ``{'a.b.key': array}``."""
    out = {}
    for path, value in tree.items():
        name = ".".join(map(str, path))
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            out[name] = value
    return out


def param_values(module):
    return flat({k: s.value for k, s in module.states(brainstate.ParamState).items()})


def dense(p, layer, x_fn):
    keys = {"weight": f"{layer}.weight.weight"}
    if f"{layer}.weight.bias" in p:
        keys["bias"] = f"{layer}.weight.bias"
    return om.Op("dense", keys, x_fn=x_fn)


def x_only(p, h, x):
    return x


def x_and_h(p, h, x):
    return jnp.concatenate([x, h["h"]], axis=-1)


sig = jax.nn.sigmoid


def spec_minigru(p, batch):
    ops = {"z": dense(p, "W_z", x_and_h), "x": dense(p, "W_x", x_only)}

    def step(p, h, x, ys):
        z = sig(ys["z"])
        return {"h": (1 - z) * h["h"] + z * ys["x"]}

    return om.PlainSpec("MiniGRU", p, {"h": (H,)}, (("h",),), ops, step, lambda p, h, x: h["h"], (I,), batch)


def spec_minilstm(p, batch):
    ops = {"f": dense(p, "W_f", x_and_h), "i": dense(p, "W_i", x_and_h), "x": dense(p, "W_x", x_only)}

    def step(p, h, x, ys):
        return {"h": sig(ys["f"]) * h["h"] + sig(ys["i"]) * ys["x"]}

    return om.PlainSpec("MiniLSTM", p, {"h": (H,)}, (("h",),), ops, step, lambda p, h, x: h["h"], (I,), batch)


def spec_urlstm(p, batch):
    ops = {g: dense(p, f"W{g}", x_and_h) for g in "frou"}
    ops["b"] = om.Op("elem", {"weight": "bias"}, fn=lambda v: v)

    def step(p, h, x, ys):
        f = sig(ys["f"] + ys["b"])
        r = sig(ys["r"] - ys["b"])
        g = r * (1 - (1 - f) ** 2) + (1 - r) * f**2
        c = g * h["c"] + (1 - g) * jnp.tanh(ys["u"])
        return {"h": sig(ys["o"]) * jnp.tanh(c), "c": c}

    hidden = {"h": (H,), "c": (H,)}
    return om.PlainSpec(
        "URLSTMCell", p, hidden, (("h", "c"),), ops, step, lambda p, h, x: h["h"], (I,), batch
    )


def spec_cfn(p, batch):
    ops = {"f": dense(p, "Wf", x_and_h), "i": dense(p, "Wi", x_and_h), "x": dense(p, "Wh", x_only)}

    def step(p, h, x, ys):
        return {"h": sig(ys["f"]) * jnp.tanh(h["h"]) + sig(ys["i"]) * jnp.tanh(ys["x"])}

    return om.PlainSpec("CFNCell", p, {"h": (H,)}, (("h",),), ops, step, lambda p, h, x: h["h"], (I,), batch)


LRU_H = 5


def spec_lru(p, batch):
    ops = {
        "B_re": dense(p, "B_re", x_only),
        "B_im": dense(p, "B_im", x_only),
        "modulus": om.Op("elem", {"weight": "nu_log"}, fn=lambda v: jnp.exp(-jnp.exp(v))),
        "phase": om.Op("elem", {"weight": "theta_log"}, fn=jnp.exp),
        "gamma": om.Op("elem", {"weight": "gamma_log"}, fn=jnp.exp),
    }

    def step(p, h, x, ys):
        lam = ys["modulus"] * jnp.exp(1j * ys["phase"])  # complex form, independent of the cell's
        new = lam * (h["re"] + 1j * h["im"]) + ys["gamma"] * (ys["B_re"] + 1j * ys["B_im"])
        return {"re": jnp.real(new), "im": jnp.imag(new)}

    def readout(p, h, x):
        return h["re"] @ p["C_re.weight.weight"] - h["im"] @ p["C_im.weight.weight"] + x * p["D"]

    hidden = {"re": (LRU_H,), "im": (LRU_H,)}
    return om.PlainSpec("LRUCell", p, hidden, (("re", "im"),), ops, step, readout, (I,), batch)


CELLS = {
    "MiniGRU": (lambda: nn.MiniGRU(I, H), spec_minigru),
    "MiniLSTM": (lambda: nn.MiniLSTM(I, H), spec_minilstm),
    "URLSTMCell": (lambda: nn.URLSTMCell(I, H), spec_urlstm),
    "CFNCell": (lambda: nn.CFNCell(I, H), spec_cfn),
    "LRUCell": (lambda: nn.LRUCell(I, LRU_H, r_min=0.5, r_max=0.95), spec_lru),
}


def randomise(module, seed):
    """Every parameter replaced by random values (the LRU's log-parameters kept in their range)."""
    rng = np.random.default_rng(seed)
    for path, state in module.states(brainstate.ParamState).items():
        if path[-1] in ("nu_log", "theta_log", "gamma_log"):
            state.value = state.value + 0.1 * rng.standard_normal(state.value.shape)
        else:
            state.value = jax.tree.map(lambda v: jnp.asarray(0.6 * rng.standard_normal(v.shape)), state.value)


def online_per_step(module, xs, targets, batch, algorithm=braintrace.D_RTRL):
    """Per-step online gradients (``D_RTRL`` by default) ``{name: (T, *shape)}`` from the initial
    (zero) state."""
    brainstate.nn.init_all_states(module, batch_size=batch)
    alg = algorithm(module)
    alg.compile_graph(xs[0])
    params = module.states(brainstate.ParamState)
    step = brainstate.transform.jit(
        lambda x, y: brainstate.transform.grad(lambda: om.loss_fn(alg(x), y), params)()
    )
    per_step = [flat(step(xs[t], targets[t])) for t in range(xs.shape[0])]
    return {k: jnp.stack([g[k] for g in per_step]) for k in per_step[0]}


def plain_forward(spec, xs):
    h, outs = spec.init_hidden(), []
    for x in xs:
        h = spec.step(spec.params, h, x, om.ys_plain(spec, spec.params, h, x))
        outs.append(spec.readout(spec.params, h, x))
    return jnp.stack(outs)


@pytest.mark.parametrize(
    "name, batch",
    [(name, B) for name in CELLS] + [("URLSTMCell", None), ("LRUCell", None)],
    ids=[f"{name}-batched" for name in CELLS] + ["URLSTMCell-unbatched", "LRUCell-unbatched"],
)
def test_cell_online_gradients(f64, name, batch):
    make, make_spec = CELLS[name]
    cell = make()
    randomise(cell, seed=len(name))
    spec = make_spec(param_values(cell), batch)
    xs, targets = om.make_data(spec, T, seed=11)

    brainstate.nn.init_all_states(cell, batch_size=batch)
    got_out = brainstate.transform.for_loop(cell, xs)
    assert got_out.shape == (T, *lead(batch), *spec.output_shape()[len(lead(batch)) :])
    assert got_out.dtype == jnp.float64
    np.testing.assert_allclose(got_out, plain_forward(spec, xs), rtol=1e-12, atol=1e-12)

    got = online_per_step(cell, xs, targets, batch)
    assert set(got) == set(spec.params)
    om.assert_grads_close(got, om.masked_rtrl(spec, xs, targets), tol=TOL, what=f"{name} vs masked RTRL")
    # from the zero state some first-step gradients vanish (a gate multiplying h_{t-1} = 0): compare
    # normwise where the reference is non-zero, absolutely where it is zero
    first = om.bptt_grads(spec, xs[:1], targets[:1])
    errs = {k: om.rel_err(got[k][0], first[k]) for k in first}
    assert max(errs.values()) < TOL, f"{name} T=1 vs jax.grad: {errs}"
    assert sum(float(jnp.linalg.norm(g)) > 0 for g in first.values()) >= len(first) // 2
    if name == "LRUCell":
        om.assert_grads_close(
            {k: v.sum(0) for k, v in got.items()},
            om.bptt_grads(spec, xs, targets),
            tol=TOL,
            what="LRU vs BPTT",
        )


def test_cell_relations(f64):
    """Which weights carry eligibility traces, and the hidden groups."""
    want = {
        "MiniGRU": ({"W_x.weight", "W_z.weight"}, [("h",)]),
        "MiniLSTM": ({"W_x.weight", "W_f.weight", "W_i.weight"}, [("h",)]),
        "URLSTMCell": ({"Wu.weight", "Wf.weight", "Wr.weight", "Wo.weight", "bias"}, [("h", "c")]),
        "CFNCell": ({"Wf.weight", "Wi.weight", "Wh.weight"}, [("h",)]),
        "LRUCell": ({"B_re.weight", "B_im.weight", "nu_log", "theta_log", "gamma_log"}, [("h_re", "h_im")]),
    }
    for name, (make, _) in CELLS.items():
        cell = make()
        brainstate.nn.init_all_states(cell, batch_size=B)
        graph = braintrace.compile_etrace_graph(cell, jnp.zeros((B, I)))
        params, groups = want[name]
        assert {r.param_paths["weight"][0] for r in graph.hidden_param_op_relations} == params, name
        assert [tuple(sorted(g.names)) for g in graph.hidden_groups] == [tuple(sorted(g)) for g in groups]


def test_minimal_rnn_phi(f64):
    phi = nn.Linear(I, H)
    cell = nn.MinimalRNNCell(I, H, phi=phi)
    assert cell.phi is phi
    cell.init_state(batch_size=B)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, I)))
    z = phi(x)  # no activation on a given phi
    gate = sig(
        jnp.concatenate([z, jnp.zeros((B, H))], -1) @ cell.W_u.weight.value["weight"]
        + cell.W_u.weight.value["bias"]
    )
    np.testing.assert_allclose(cell(x), (1 - gate) * z, rtol=1e-12)
    with pytest.raises(TypeError, match="phi"):
        nn.MinimalRNNCell(I, H, phi=3)


# --------------------------------------------------------------------------------------------------
# SignedWLinear / ScaledWSLinear: forward as brainstate, online gradients through the weight transform
# --------------------------------------------------------------------------------------------------


class Leaky(brainstate.nn.Module):
    """``h' = 0.8 h + layer(x)``: leaky units fed by a linear layer (D_RTRL is exact)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((*lead(batch_size), H)))

    def update(self, x):
        self.h.value = 0.8 * self.h.value + self.layer(x)
        return self.h.value


def bptt(forward, params, xs, targets):
    def total(p):
        def body(h, xy):
            h = 0.8 * h + forward(p, xy[0])
            return h, om.loss_fn(h, xy[1])

        return jax.lax.scan(body, jnp.zeros((B, H)), (xs, targets))[1].sum()

    return jax.grad(total)(params)


def test_signed_linear(f64):
    rng = np.random.default_rng(1)
    sign = jnp.asarray(np.where(rng.random((I, 1)) < 0.5, -1.0, 1.0))
    w = jnp.asarray(rng.standard_normal((I, H)))
    layer = nn.SignedWLinear(I, H, w_init=w, w_sign=sign)
    ref = brainstate.nn.SignedWLinear((I,), (H,), w_init=w, w_sign=sign)
    x = jnp.asarray(rng.standard_normal((B, I)))
    np.testing.assert_allclose(layer(x), ref(x), rtol=1e-12)
    assert layer.weight.value.shape == (I, H) and layer.w_sign is sign

    xs, targets = jnp.asarray(rng.standard_normal((T, B, I))), jnp.asarray(rng.standard_normal((T, B, H)))
    learner = braintrace.compile(Leaky(layer), braintrace.D_RTRL, xs[0], batch_size=B)
    got = learner.etrace_grad(xs, targets, step_fn=om.loss_fn)[("layer", "weight")]
    want = bptt(lambda p, x: x @ (jnp.abs(p) * sign), w, xs, targets)
    assert om.rel_err(got, want) < TOL


def test_scaled_ws_linear(f64):
    rng = np.random.default_rng(2)
    mask = jnp.asarray((rng.random((I, 1)) < 0.7).astype(float))
    layer = nn.ScaledWSLinear(I, H, w_mask=mask, eps=1e-4)
    ref = brainstate.nn.ScaledWSLinear((I,), (H,), w_mask=mask, eps=1e-4)
    params = {
        "weight": jnp.asarray(rng.standard_normal((I, H))),
        "bias": jnp.asarray(rng.standard_normal(H)),
        "gain": jnp.asarray(rng.uniform(0.5, 1.5, (1, H))),
    }
    layer.weight.value = ref.weight.value = params
    x = jnp.asarray(rng.standard_normal((B, I)))
    np.testing.assert_allclose(layer(x), ref(x), rtol=1e-12)

    def forward(p, x):
        w = p["weight"]
        mean, var = w.mean(0, keepdims=True), w.var(0, keepdims=True)
        w_hat = p["gain"] * (w - mean) / jnp.sqrt(jnp.maximum(var * I, 1e-4))
        return x @ (w_hat * mask) + p["bias"]

    xs, targets = jnp.asarray(rng.standard_normal((T, B, I))), jnp.asarray(rng.standard_normal((T, B, H)))
    learner = braintrace.compile(Leaky(layer), braintrace.D_RTRL, xs[0], batch_size=B)
    got = learner.etrace_grad(xs, targets, step_fn=om.loss_fn)[("layer", "weight")]
    want = bptt(forward, params, xs, targets)
    for key in params:
        assert om.rel_err(got[key], want[key]) < TOL, key


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------


def test_lora_published_constructor(f64):
    rng = np.random.default_rng(3)
    kernel = lambda shape: jnp.asarray(rng.standard_normal(shape))
    base = nn.Linear(6, 4)
    layer = nn.LoRA(in_features=6, lora_rank=2, out_features=4, kernel_init=kernel, base_module=base)
    assert layer.base_module is base and layer.lora_rank == layer.rank == 2 and layer.alpha == 0.5
    assert layer.in_features == 6 and layer.out_features == 4
    p = layer.weight.value
    assert p["lora_a"].shape == (6, 2) and p["lora_b"].shape == (2, 4) and "bias" not in p
    x = jnp.asarray(rng.standard_normal((B, 6)))
    np.testing.assert_allclose(layer(x), 0.5 * x @ p["lora_a"] @ p["lora_b"] + base(x), rtol=1e-12)
    # brainstate's LoRA has the same keys and layout (without the 1 / rank scale)
    ref = brainstate.nn.LoRA(6, 2, 4)
    ref.weight.value = dict(p)
    plain = nn.LoRA(6, 2, 4)
    plain.weight.value = dict(p)
    np.testing.assert_allclose(plain(x), 0.5 * ref(x), rtol=1e-12)
    # positional published order, and in_size
    wide = nn.LoRA(3, 2, 4, in_size=(7, 3))
    assert (wide.in_size, wide.out_size) == ((7, 3), (7, 4))


def test_lora_earlier_signature(f64):
    rng = np.random.default_rng(4)
    b, a = jnp.asarray(rng.standard_normal((6, 2))), jnp.asarray(rng.standard_normal((2, 4)))
    layer = nn.LoRA(6, 4, rank=2, alpha=0.7, B_init=b, A_init=a, b_init=jnp.ones(4))
    assert (layer.in_features, layer.out_features, layer.rank) == (6, 4, 2)
    x = jnp.asarray(rng.standard_normal((B, 6)))
    np.testing.assert_allclose(layer(x), 0.7 * x @ b @ a + 1.0, rtol=1e-12)
    assert nn.LoRA(in_size=6, out_size=4, rank=2).alpha == 1.0
    with pytest.raises(TypeError, match="rank once"):
        nn.LoRA(6, 2, 4, rank=2)
    with pytest.raises(ValueError, match="positive int"):
        nn.LoRA(6, 0, 4)
    with pytest.raises(TypeError, match="base_module"):
        nn.LoRA(6, 2, 4, base_module=3)


# --------------------------------------------------------------------------------------------------
# read-outs: public attributes
# --------------------------------------------------------------------------------------------------


def test_readout_attributes(f64):
    ro = nn.LeakyRateReadout(in_size=I, out_size=2, tau=4.0 * u.ms, w_init=brainstate.nn.init.KaimingNormal())
    assert ro.W is ro.weight and ro.W.value.shape == (I, 2)
    assert ro.in_size == (I,) and ro.out_size == (2,) and ro.tau.shape == (2,)
    np.testing.assert_allclose(ro.decay, np.exp(-1.0 / 4.0) * np.ones(2), rtol=1e-12)
    assert len(ro.states(brainstate.ParamState)) == 1
    ro.init_state(batch_size=B)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((B, I)))
    np.testing.assert_allclose(ro(x), x @ ro.W.value, rtol=1e-12)
    with brainstate.environ.context(dt=2.0 * u.ms):
        np.testing.assert_allclose(ro.decay, np.exp(-2.0 / 4.0) * np.ones(2), rtol=1e-12)

    spk = nn.LeakySpikeReadout(I, 2, tau=jnp.array([3.0, 5.0]) * u.ms, V_th=0.5, spk_reset="soft")
    spk.init_state(batch_size=B)
    assert spk.varshape == spk.out_size == (2,) and spk.W is spk.weight
    assert spk.spk_reset == "subtract" and spk.tau.shape == (2,)
    np.testing.assert_allclose(spk.decay, np.exp(-1.0 / np.array([3.0, 5.0])), rtol=1e-12)
    out = spk(jnp.ones((B, I)))
    np.testing.assert_array_equal(spk.spike, out)
    np.testing.assert_array_equal(spk.spike, spk.get_spike(spk.V.value))


# --------------------------------------------------------------------------------------------------
# grouped_matmul / GroupedLinear
# --------------------------------------------------------------------------------------------------

G, GI, GO = 3, 2, 4  # groups, inputs and outputs per group


def grouped_ref(x, w, b=None):
    """``y[..., g, o] = sum_i x[..., g, i] w[g, i, o] (+ b[g, o])`` with a Python loop over groups."""
    y = jnp.stack([x[..., g, :] @ w[g] for g in range(w.shape[0])], axis=-2)
    return y if b is None else y + b


@pytest.mark.parametrize("lead_shape", [(), (B,), (2, B)], ids=["unbatched", "batched", "two-leading"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["no-bias", "bias"])
def test_grouped_matmul_forward(f64, lead_shape, has_bias, primitive_names):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((*lead_shape, G, GI)))
    w = jnp.asarray(rng.standard_normal((G, GI, GO)))
    b = jnp.asarray(rng.standard_normal((G, GO))) if has_bias else None
    y = braintrace.grouped_matmul(x, w, b)
    assert y.shape == (*lead_shape, G, GO)
    np.testing.assert_allclose(y, grouped_ref(x, w, b), rtol=1e-12)
    names = primitive_names(jax.make_jaxpr(braintrace.grouped_matmul)(x, w, b))
    assert ("etp_gmv" if not lead_shape else "etp_gmm") in names


@pytest.mark.parametrize("has_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("batched", [False, True], ids=["gmv", "gmm"])
def test_grouped_rules(f64, has_bias, batched):
    from braintrace._etrace_op import get_rule
    from braintrace._etrace_op.grouped import grouped_primitives

    etp_gmm_p, etp_gmv_p = grouped_primitives()
    assert braintrace.get_primitive_spec(etp_gmm_p).name == "etp_gmm"
    p = etp_gmm_p if batched else etp_gmv_p
    rng = np.random.default_rng(7)
    lead_shape = (B,) if batched else ()
    x = jnp.asarray(rng.standard_normal((*lead_shape, G, GI)))
    W = {"weight": jnp.asarray(rng.standard_normal((G, GI, GO)))}
    if has_bias:
        W["bias"] = jnp.asarray(rng.standard_normal((G, GO)))
    g = jnp.asarray(rng.standard_normal((*lead_shape, G, GO)))
    v = jnp.asarray(rng.standard_normal((*lead_shape, G, GO)))
    xy, yw = get_rule(p, "xy_to_dw"), get_rule(p, "yw_to_w")

    # xy_to_dw is the VJP of the op, and has the closed form sum_b x_bgi g_bgo
    got = xy(x, g, W, has_bias=has_bias)
    _, vjp = jax.vjp(
        lambda w: p.impl_fn(x, w["weight"], *([w["bias"]] if has_bias else []), has_bias=has_bias), W
    )
    want = vjp(g)[0]
    for k in W:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12)
    np.testing.assert_allclose(got["weight"], jnp.einsum("...gi,...go->gio", x, g), rtol=1e-12)

    # the chain-rule identity of the two rules, per batch element
    for i in range(B if batched else 1):
        xb, gb, vb = (x[i : i + 1], g[i : i + 1], v[i]) if batched else (x, g, v)
        lhs = yw(vb, xy(xb, gb, W, has_bias=has_bias), has_bias=has_bias)
        rhs = xy(xb, vb * gb, W, has_bias=has_bias)
        for k in W:
            np.testing.assert_allclose(lhs[k], rhs[k], rtol=1e-12, atol=1e-14)

    # the trace layouts
    avals = lambda a: types.SimpleNamespace(aval=jax.core.ShapedArray(a.shape, a.dtype))
    trace = get_rule(p, "init_drtrl")(avals(x), avals(g), {k: avals(a) for k, a in W.items()}, 2)
    assert trace["weight"].shape == (*lead_shape, G, GI, GO, 2)
    if has_bias:
        assert trace["bias"].shape == (*lead_shape, G, GO, 2)
    assert get_rule(p, "init_pp")(avals(x), avals(g), {}, 2).shape == (*lead_shape, G, GO, 2)


def test_grouped_matmul_vmap_units_and_errors(f64, primitive_names):
    rng = np.random.default_rng(8)
    w = jnp.asarray(rng.standard_normal((G, GI, GO)))
    xs = jnp.asarray(rng.standard_normal((5, B, G, GI)))
    unbatched = jax.make_jaxpr(jax.vmap(lambda x: braintrace.grouped_matmul(x, w)))(xs[0])
    folded = jax.make_jaxpr(jax.vmap(lambda x: braintrace.grouped_matmul(x, w)))(xs)
    assert "etp_gmm" in primitive_names(unbatched) and "etp_gmm" in primitive_names(folded)
    np.testing.assert_allclose(jax.vmap(lambda x: braintrace.grouped_matmul(x, w))(xs), grouped_ref(xs, w))

    y = braintrace.grouped_matmul(xs[0] * u.mV, w * u.siemens, bias=jnp.ones((G, GO)) * u.uA)
    assert u.get_unit(y).has_same_dim(u.amp)
    np.testing.assert_allclose(y.to_decimal(u.uA), 1e3 * grouped_ref(xs[0], w) + 1.0, rtol=1e-12)

    with pytest.raises(ValueError, match="3-D"):
        braintrace.grouped_matmul(xs[0], w[0])
    with pytest.raises(ValueError, match=r"x.shape\[-2:\] must equal weight.shape\[:2\]"):
        braintrace.grouped_matmul(xs[0][..., :1], w)
    with pytest.raises(ValueError, match="bias"):
        braintrace.grouped_matmul(xs[0], w, bias=jnp.ones(GO))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 2\)"):
        nn.GroupedLinear((G, GI), GO)(jnp.ones((B, G * GI)))
    with pytest.raises(ValueError, match="groups"):
        nn.GroupedLinear((G, GI), (G + 1, GO))


class GroupedRNN(brainstate.nn.Module):
    """``h' = tanh(inp(x) + rec(h) + 0.5 h)``, grouped input and recurrent weights, ``h``: ``(B, G, O)``."""

    def __init__(self, w_in, b, w_rec):
        super().__init__()
        self.inp = nn.GroupedLinear((G, GI), GO, w_init=w_in, b_init=b)
        self.rec = nn.GroupedLinear((G, GO), GO, w_init=w_rec, b_init=None)

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((*lead(batch_size), G, GO)))

    def update(self, x):
        self.h.value = jnp.tanh(self.inp(x) + self.rec(self.h.value) + 0.5 * self.h.value)
        return self.h.value


def block_diag(w):
    """``(G, I, O)`` -> the ``(G I, G O)`` block-diagonal matrix."""
    return jax.scipy.linalg.block_diag(*w)


def blocks(full, n_in, n_out):
    """The ``G`` diagonal blocks ``(..., G, n_in, n_out)`` of ``(..., G n_in, G n_out)``."""
    return jnp.stack(
        [full[..., g * n_in : (g + 1) * n_in, g * n_out : (g + 1) * n_out] for g in range(G)], axis=-3
    )


def dense_equivalent(w_in, b, w_rec, batch):
    """The same RNN on flattened features with block-diagonal dense weights, as a plain spec."""
    params = {"W_in": block_diag(w_in), "b": b.reshape(-1), "W_rec": block_diag(w_rec)}
    ops = {
        "in": om.Op("dense", {"weight": "W_in", "bias": "b"}, x_fn=x_only),
        "rec": om.Op("dense", {"weight": "W_rec"}, x_fn=lambda p, h, x: h["h"]),
    }

    def step(p, h, x, ys):
        return {"h": jnp.tanh(ys["in"] + ys["rec"] + 0.5 * h["h"])}

    hidden = {"h": (G * GO,)}
    return om.PlainSpec(
        "grouped", params, hidden, (("h",),), ops, step, lambda p, h, x: h["h"], (G * GI,), batch
    )


@pytest.mark.parametrize("algorithm", ["d_rtrl", "pp_prop"])
@pytest.mark.parametrize("batch", [B, None], ids=["batched", "unbatched"])
def test_grouped_rnn_online_gradients(f64, algorithm, batch):
    """Online gradients of a grouped RNN equal the diagonal blocks of the oracle's gradients for the
    same RNN written with block-diagonal dense weights (masked RTRL, or the pp_prop recursion)."""
    rng = np.random.default_rng(9)
    w_in = jnp.asarray(0.7 * rng.standard_normal((G, GI, GO)))
    b = jnp.asarray(0.3 * rng.standard_normal((G, GO)))
    w_rec = jnp.asarray(0.5 * rng.standard_normal((G, GO, GO)))
    spec = dense_equivalent(w_in, b, w_rec, batch)
    xs_flat, ys_flat = om.make_data(spec, T, seed=12)
    xs = xs_flat.reshape((T, *lead(batch), G, GI))
    ys = ys_flat.reshape((T, *lead(batch), G, GO))

    model = GroupedRNN(w_in, b, w_rec)
    make = (
        braintrace.D_RTRL if algorithm == "d_rtrl" else (lambda m: braintrace.pp_prop(m, decay_or_rank=0.8))
    )
    got = online_per_step(model, xs, ys, batch, make)
    if algorithm == "d_rtrl":
        oracle = om.masked_rtrl(spec, xs_flat, ys_flat)
    else:
        oracle = om.pp_prop_oracle(spec, xs_flat, ys_flat, 0.8)
    want = {
        "inp.weight.weight": blocks(oracle["W_in"], GI, GO),
        "inp.weight.bias": oracle["b"].reshape(T, G, GO),
        "rec.weight.weight": blocks(oracle["W_rec"], GO, GO),
    }
    om.assert_grads_close(got, want, tol=TOL, what=f"GroupedRNN {algorithm}")
