"""Models written only with the public names this package and the published braintrace share.

Imported by the scripts that run the same model through both packages (``compare_published_grads.py``,
``compare_published_timing.py``), each in its own interpreter: whichever ``braintrace`` the running
interpreter imports is the one the models use. Nothing here imports this checkout, so the module
runs under an environment that has only the published package (run it from a directory in which
``import braintrace`` does not find the checkout).

Shared names: ``brainstate.ParamState`` / ``HiddenState``, ``braintrace.matmul``,
``braintrace.sparse_matmul`` (with a ``brainevent.CSR`` structure), ``braintrace.lora_matmul``.

* :func:`small_models`: three tiny models with a plain-``jnp`` twin each, for gradients against BPTT.
* :func:`build_workload`: the end-to-end workloads of ``benchmarks/_models.py`` at a given size:
  leaky tanh RNNs ``h' = 0.8 h + 0.2 tanh(x W_in + b + rec(h))`` with a dense, CSR or rank-``r``
  LoRA recurrence and a plain read-out ``h' W_out``, and a recurrent LIF network (current synapse
  ``g``, membrane ``v`` with a soft reset, a sparse recurrence on the spikes, a leaky read-out).
  :func:`rnn_step` and :func:`snn_step` are their plain-``jnp`` steps, for independent oracles
  (``side_by_side_oracles.py``).
"""

from __future__ import annotations

import numpy as np

#: Sizes of the tiny models of :func:`small_models`.
SMALL_B, SMALL_I, SMALL_H = 2, 3, 4
#: The RNNs' leak ``a`` in ``h' = (1 - a) h + a tanh(...)``.
LEAK = 0.2
#: The spiking network: synaptic and membrane decay per step, threshold, read-out decay, and the
#: slope of the surrogate gradient (a logistic of ``SLOPE (v - V_TH)``).
SYN_DECAY, MEM_DECAY, V_TH, OUT_DECAY, SLOPE = 0.8, 0.9, 1.0, 0.9, 4.0
#: Probability of an input spike per input and step.
INPUT_RATE = 0.2


def small_models():
    """``{name: (module class, plain step (weights, x_t, h) -> (h', out or None), weights)}``."""
    import brainstate
    import jax.numpy as jnp

    import braintrace

    B, I, H = SMALL_B, SMALL_I, SMALL_H  # noqa: N806
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(I, H)) * 0.5)
    u = jnp.asarray(rng.normal(size=(H, H)) * 0.5)
    del B

    class TanhRNN(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = brainstate.ParamState(w)
            self.u = brainstate.ParamState(u)

        def init_state(self, batch_size=None, **kw):
            self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

        def update(self, x):
            pre = braintrace.matmul(x, self.w.value) + braintrace.matmul(self.h.value, self.u.value)
            self.h.value = jnp.tanh(pre)
            return self.h.value

    class Leaky(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = brainstate.ParamState(w)

        def init_state(self, batch_size=None, **kw):
            self.h = brainstate.HiddenState(jnp.zeros((batch_size, H)))

        def update(self, x):
            self.h.value = 0.9 * self.h.value + braintrace.matmul(x, self.w.value)
            return jnp.tanh(self.h.value)

    class DirectOutput(Leaky):
        def update(self, x):
            y = braintrace.matmul(x, self.w.value)
            self.h.value = 0.9 * self.h.value + y
            return self.h.value + y

    def tanh_rnn(ws, xs_t, h):
        return jnp.tanh(xs_t @ ws["w"] + h @ ws["u"]), None

    def leaky(ws, xs_t, h):
        new = 0.9 * h + xs_t @ ws["w"]
        return new, jnp.tanh(new)

    def direct(ws, xs_t, h):
        y = xs_t @ ws["w"]
        new = 0.9 * h + y
        return new, new + y

    return {
        "tanh_rnn": (TanhRNN, tanh_rnn, {"w": w, "u": u}),
        "leaky": (Leaky, leaky, {"w": w}),
        "direct_output": (DirectOutput, direct, {"w": w}),
    }


# --------------------------------------------------------------------------------------------------
# The end-to-end workloads
# --------------------------------------------------------------------------------------------------


def fixed_in_degree_pattern(n_pre: int, n_post: int, k: int, seed: int):
    """``(indices, indptr)`` of an ``(n_pre, n_post)`` CSR pattern with ``k`` distinct sorted columns
    per row (one per stratum of width ``n_post / k``), built in numpy in O(nnz)."""
    rng = np.random.default_rng(seed)
    width = n_post / k
    starts = np.floor(np.arange(k) * width).astype(np.int64)
    ends = np.floor((np.arange(k) + 1) * width).astype(np.int64)
    cols = starts[None, :] + (rng.random((n_pre, k)) * (ends - starts)[None, :]).astype(np.int64)
    indptr = np.arange(0, n_pre * k + 1, k, dtype=np.int32)
    return cols.reshape(-1).astype(np.int32), indptr


def in_degree(n: int, density: float) -> int:
    return max(1, int(round(n * density)))


def initial_weights(spec: dict, seed: int = 0) -> dict:
    """The workload's weights as numpy float64 arrays (cast by the model), and its sparse pattern.

    ``spec``: ``name`` (``'dense'``, ``'csr'``, ``'lora'``, ``'snn'``), ``n_in``, ``n_hid``, ``n_out``,
    and ``density`` (csr), ``rank`` (lora) or ``syn_per_neuron`` (snn).
    """
    rng = np.random.default_rng(seed)
    name, n_in, H, n_out = spec["name"], spec["n_in"], spec["n_hid"], spec["n_out"]  # noqa: N806
    w = {}
    if name == "snn":
        k = spec["syn_per_neuron"]
        w["w_in"] = rng.normal(0.0, 2.0, (n_in, H)) / np.sqrt(n_in)
        w["indices"], w["indptr"] = fixed_in_degree_pattern(H, H, k, seed + 1)
        w["w_rec"] = rng.standard_normal(H * k) * 0.5 / np.sqrt(k)
        w["w_out"] = rng.normal(0.0, 0.1, (H, n_out))
        return w
    w["w_in"] = rng.standard_normal((n_in, H)) / np.sqrt(n_in)
    w["b_in"] = np.zeros(H)
    if name == "dense":
        w["w_rec"] = rng.standard_normal((H, H)) / np.sqrt(H)
    elif name == "csr":
        k = in_degree(H, spec["density"])
        w["indices"], w["indptr"] = fixed_in_degree_pattern(H, H, k, seed + 1)
        w["w_rec"] = rng.standard_normal(H * k) / np.sqrt(k)
    elif name == "lora":
        r = spec["rank"]
        w["lora_b"] = rng.standard_normal((H, r)) / np.sqrt(H)
        w["lora_a"] = rng.standard_normal((r, H)) / np.sqrt(r)
    else:
        raise ValueError(f"spec['name'] must be one of 'dense', 'csr', 'lora', 'snn', got {name!r}")
    w["w_out"] = rng.standard_normal((H, n_out)) / np.sqrt(H)
    return w


def spike(v):
    """Heaviside of ``v - V_TH`` with the derivative of a logistic of ``SLOPE (v - V_TH)`` as its
    gradient (element-wise operations only, so either package's compiler sees a per-unit map)."""
    import jax

    s = jax.nn.sigmoid(SLOPE * (v - V_TH))
    return (v > V_TH).astype(v.dtype) + (s - jax.lax.stop_gradient(s))


def csr_product(h, data, indices, indptr, n_post: int):
    """``h @ W`` for the CSR matrix ``W`` (numpy ``indices`` / ``indptr``), in plain ``jnp``."""
    import jax.numpy as jnp

    indptr = np.asarray(indptr)
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    out = jnp.zeros(h.shape[:-1] + (n_post,), h.dtype)
    return out.at[..., np.asarray(indices)].add(h[..., rows] * data)


def snn_step(ws: dict, state, x):
    """The LIF network's step in plain ``jnp``: ``state = (g, v, r)`` to the next one (the read-out
    ``r`` is the output)."""
    g, v, r = state
    drive = x @ ws["w_in"] + csr_product(spike(v), ws["w_rec"], ws["indices"], ws["indptr"], g.shape[-1])
    g, v = snn_intrinsic(g, v, drive)
    r = OUT_DECAY * r + spike(v) @ ws["w_out"]
    return g, v, r


def snn_intrinsic(g, v, drive):
    """The LIF units' own dynamics: ``(g, v)`` to the next ``(g, v)`` given the synaptic drive (the sum
    of the step's ETP outputs, held fixed in the hidden Jacobian)."""
    g = SYN_DECAY * g + drive
    v = MEM_DECAY * (v - V_TH * spike(v)) + (1.0 - MEM_DECAY) * g
    return g, v


def rnn_preactivation(kind: str, ws: dict, h, x):
    """``x W_in + b + rec(h)`` of the RNNs in plain ``jnp`` (``ws`` as :func:`initial_weights`)."""
    pre = x @ ws["w_in"] + ws["b_in"]
    if kind == "dense":
        return pre + h @ ws["w_rec"]
    if kind == "csr":
        return pre + csr_product(h, ws["w_rec"], ws["indices"], ws["indptr"], h.shape[-1])
    return pre + (h @ ws["lora_b"]) @ ws["lora_a"]


def rnn_step(kind: str, ws: dict, h, x):
    """The RNNs' step in plain ``jnp``: ``(h', output)``."""
    import jax.numpy as jnp

    h = (1.0 - LEAK) * h + LEAK * jnp.tanh(rnn_preactivation(kind, ws, h, x))
    return h, h @ ws["w_out"]


def build_workload(spec: dict, dtype, seed: int = 0):
    """The workload's ``brainstate`` module (states not yet initialised) and its per-step loss
    ``(output, target) -> scalar``."""
    import brainevent
    import brainstate
    import jax.numpy as jnp

    import braintrace

    w = initial_weights(spec, seed)
    name, H = spec["name"], spec["n_hid"]  # noqa: N806

    def param(key):
        return brainstate.ParamState(jnp.asarray(w[key], dtype))

    def csr_structure():
        data = jnp.asarray(w["w_rec"], dtype)
        indices, indptr = jnp.asarray(w["indices"]), jnp.asarray(w["indptr"])
        return brainevent.CSR((data, indices, indptr), shape=(H, H))

    class RNN(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in, self.b_in, self.w_out = param("w_in"), param("b_in"), param("w_out")
            if name == "lora":
                self.lora_b, self.lora_a = param("lora_b"), param("lora_a")
            else:
                self.w_rec = param("w_rec")
            if name == "csr":
                self.csr = csr_structure()

        def init_state(self, batch_size=None, **kw):
            self.h = brainstate.HiddenState(jnp.zeros((batch_size, H), dtype))

        def recurrence(self, h):
            if name == "dense":
                return braintrace.matmul(h, self.w_rec.value)
            if name == "csr":
                return braintrace.sparse_matmul(h, self.w_rec.value, sparse_mat=self.csr)
            return braintrace.lora_matmul(h, self.lora_b.value, self.lora_a.value, alpha=1.0)

        def update(self, x):
            h = self.h.value
            pre = braintrace.matmul(x, self.w_in.value, self.b_in.value) + self.recurrence(h)
            h = (1.0 - LEAK) * h + LEAK * jnp.tanh(pre)
            self.h.value = h
            return h @ self.w_out.value

    class LIFNetwork(brainstate.nn.Module):
        """``g' = SYN_DECAY g + x W_in + rec(spike(v))``, ``v' = MEM_DECAY (v - V_TH spike(v)) +
        (1 - MEM_DECAY) g'``, read-out ``r' = OUT_DECAY r + spike(v') W_out``; returns ``(r', spike(v'))``."""

        def __init__(self):
            super().__init__()
            self.w_in, self.w_rec, self.w_out = param("w_in"), param("w_rec"), param("w_out")
            self.csr = csr_structure()

        def init_state(self, batch_size=None, **kw):
            self.g = brainstate.HiddenState(jnp.zeros((batch_size, H), dtype))
            self.v = brainstate.HiddenState(jnp.zeros((batch_size, H), dtype))
            self.r = brainstate.HiddenState(jnp.zeros((batch_size, spec["n_out"]), dtype))

        def update(self, x):
            v = self.v.value
            spk = spike(v)
            rec = braintrace.sparse_matmul(spk, self.w_rec.value, sparse_mat=self.csr)
            g, v = snn_intrinsic(self.g.value, v, braintrace.matmul(x, self.w_in.value) + rec)
            out_spk = spike(v)
            r = OUT_DECAY * self.r.value + braintrace.matmul(out_spk, self.w_out.value)
            self.g.value, self.v.value, self.r.value = g, v, r
            return r

    def loss(out, y):
        return jnp.mean((out - y) ** 2)

    return (LIFNetwork() if name == "snn" else RNN()), loss


def make_sequences(spec: dict, T: int, dtype, seed: int = 0):
    """``xs (T, B, n_in)`` and ``ys (T, B, n_out)`` (numpy, so both interpreters see the same values)."""
    rng = np.random.default_rng(seed + 100)
    shape_x = (T, spec["batch"], spec["n_in"])
    if spec["name"] == "snn":
        xs = (rng.random(shape_x) < INPUT_RATE).astype(dtype)
    else:
        xs = rng.standard_normal(shape_x).astype(dtype)
    ys = rng.standard_normal((T, spec["batch"], spec["n_out"])).astype(dtype)
    return xs, ys
