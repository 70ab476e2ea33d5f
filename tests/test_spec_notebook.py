"""Replay of the specification notebook ``etp-primitives-deep-dive.ipynb`` and of the registration
example of ``custom-etp-primitives.rst``.

Every code cell of the notebook from the imports up to (not including) the ``TinyRNN`` online-learning
cell is executed in order, in one namespace, with its stdout captured and compared with the output the
notebook recorded (both embedded below). Comparison rule: the same text (runs of whitespace count as
one space, so a re-flowed numpy array still matches), integers equal, floats within 1e-6 relative to
the largest float the same cell prints (float32 sums reordered by a different XLA build move a small
element by more than 1e-6 of itself, not of the array). stderr (warnings) is ignored.

The registry-listing cell expects exactly the eight built-in primitives, so this module needs every
other test to unregister what it registers; it checks that first.
"""

from __future__ import annotations

import contextlib
import io
import re
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace
from braintrace._etrace_op import ETP_PRIMITIVES, unregister_primitive
from braintrace._etrace_op._registries import ETP_PRIMITIVES_BY_NAME

BUILTIN_NAMES = {
    "etp_conv",
    "etp_elemwise",
    "etp_lora_mm",
    "etp_lora_mv",
    "etp_mm",
    "etp_mv",
    "etp_sp_mm",
    "etp_sp_mv",
}
NOTEBOOK_PRIMITIVES = ("etp_scaled_mm", "etp_spec_demo")
REL_TOL = 1e-6

_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|nan|inf")


def _tokens(text):
    """Split ``text`` into ``('text', str)`` / ``('int', int)`` / ``('float', float)`` tokens."""
    out, pos = [], 0
    for m in _NUMBER.finditer(text):
        out.append(("text", " ".join(text[pos : m.start()].split())))
        tok = m.group()
        if re.fullmatch(r"[-+]?\d+", tok):
            out.append(("int", int(tok)))
        else:
            out.append(("float", float(tok)))
        pos = m.end()
    out.append(("text", " ".join(text[pos:].split())))
    # Drop empty text tokens so that "a 1" and "a  1" tokenize alike.
    return [t for t in out if t != ("text", "")]


def compare_output(got: str, want: str):
    """``None`` when ``got`` matches ``want`` under the rule in the module docstring, else a message."""
    tg, tw = _tokens(got), _tokens(want)
    if [k for k, _ in tg] != [k for k, _ in tw]:
        return f"different structure:\n--- got ---\n{got}\n--- want ---\n{want}"
    floats = [abs(v) for k, v in tw if k == "float" and np.isfinite(v)]
    scale = max(floats, default=0.0)
    for (kind, g), (_, w) in zip(tg, tw):
        if kind == "float":
            same = (np.isnan(g) and np.isnan(w)) or abs(g - w) <= REL_TOL * max(abs(w), scale)
        else:
            same = g == w
        if not same:
            return f"{kind} token {g!r} != {w!r}:\n--- got ---\n{got}\n--- want ---\n{want}"
    return None


def test_comparator():
    assert compare_output("a: [1. 2.5]\n", "a:  [1.0000001 2.5]") is None
    assert compare_output("x (4, 5)", "x (4, 6)") is not None
    assert compare_output("x 1.0", "x 1.1") is not None
    assert compare_output("True", "False") is not None
    assert compare_output("Conv1D 3", "Conv1D 3\n") is None
    assert compare_output("[1e-05 1.0]", "[1.000001e-05 1.0]") is None  # small next to large
    assert compare_output("[3e-05 1.0]", "[1e-05 1.0]") is not None


def _registered_names():
    return {p.name for p in ETP_PRIMITIVES}


NOTEBOOK_CELLS = [
    (
        2,
        r"""
import jax
import jax.numpy as jnp

import braintrace
""",
        "",
    ),
    (
        5,
        r"""
# Batched matmul: x has shape (batch, in_features)
x_batched = jnp.ones((4, 3))    # batch=4, in_features=3
w = jnp.ones((3, 5))            # in_features=3, out_features=5

y_batched = braintrace.matmul(x_batched, w)
print("Batched output shape:", y_batched.shape)   # (4, 5)

# Unbatched matmul: x has shape (in_features,)
x_single = jnp.ones((3,))       # in_features=3

y_single = braintrace.matmul(x_single, w)
print("Unbatched output shape:", y_single.shape)   # (5,)
""",
        """\
Batched output shape: (4, 5)
Unbatched output shape: (5,)
""",
    ),
    (
        6,
        r"""
# With bias
b = jnp.zeros((5,))

y_with_bias = braintrace.matmul(x_batched, w, bias=b)
print("With bias:", y_with_bias.shape)              # (4, 5)
""",
        """\
With bias: (4, 5)
""",
    ),
    (
        8,
        r"""
# Identity (default fn): just marks the weight for ETP
w_gate = jnp.array([0.5, -0.3, 0.8, 0.1])

y_identity = braintrace.element_wise(w_gate)
print("Identity:", y_identity)

# With a transformation function
y_sigmoid = braintrace.element_wise(w_gate, fn=jax.nn.sigmoid)
print("Sigmoid:", y_sigmoid)

# With absolute value (e.g., enforcing positive time constants)
y_abs = braintrace.element_wise(w_gate, fn=jnp.abs)
print("Abs:", y_abs)
""",
        """\
Identity: [ 0.5 -0.3  0.8  0.1]
Sigmoid: [0.62245935 0.4255575  0.6899745  0.5249792 ]
Abs: [0.5 0.3 0.8 0.1]
""",
    ),
    (
        10,
        r"""
# 1D convolution example
# x: (batch, spatial, channels) with dimension_numbers
x_1d = jnp.ones((2, 16, 3))         # batch=2, length=16, in_channels=3
kernel_1d = jnp.ones((4, 3, 8))     # kernel_size=4, in_channels=3, out_channels=8

y_conv = braintrace.conv(
    x_1d, kernel_1d,
    strides=(1,),
    padding='SAME',
    dimension_numbers=('NWC', 'WIO', 'NWC'),
)
print("Conv1D output shape:", y_conv.shape)  # (2, 16, 8)
""",
        """\
Conv1D output shape: (2, 16, 8)
""",
    ),
    (
        11,
        r"""
# 2D convolution example
x_2d = jnp.ones((2, 32, 32, 3))          # batch=2, H=32, W=32, in_channels=3
kernel_2d = jnp.ones((3, 3, 3, 16))      # kH=3, kW=3, in_channels=3, out_channels=16

y_conv2d = braintrace.conv(
    x_2d, kernel_2d,
    strides=(1, 1),
    padding='SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
)
print("Conv2D output shape:", y_conv2d.shape)  # (2, 32, 32, 16)
""",
        """\
Conv2D output shape: (2, 32, 32, 16)
""",
    ),
    (
        13,
        r"""
import saiunit as u
from saiunit import sparse as ss

# Create a sparse connectivity matrix
dense_w = jnp.where(
    jax.random.uniform(jax.random.PRNGKey(0), (50, 50)) < 0.1,
    jax.random.normal(jax.random.PRNGKey(1), (50, 50)),
    0.0
)
sparse_mat = ss.CSR.fromdense(dense_w)

# The learnable parameter is just the non-zero data
weight_data = sparse_mat.data

x_sp = jnp.ones((4, 50))  # batch=4, features=50
y_sp = braintrace.sparse_matmul(x_sp, weight_data, sparse_mat=sparse_mat)
print("Sparse matmul output shape:", y_sp.shape)  # (4, 50)
""",
        """\
Sparse matmul output shape: (4, 50)
""",
    ),
    (
        15,
        r"""
in_features, out_features, rank = 64, 32, 4

B = jax.random.normal(jax.random.PRNGKey(0), (in_features, rank)) * 0.01
A = jax.random.normal(jax.random.PRNGKey(1), (rank, out_features)) * 0.01

x_lora = jnp.ones((8, in_features))  # batch=8

y_lora = braintrace.lora_matmul(x_lora, B, A, alpha=2.0)
print("LoRA output shape:", y_lora.shape)  # (8, 32)
print("LoRA output (first sample):", y_lora[0])
""",
        """\
LoRA output shape: (8, 32)
LoRA output (first sample): [ 1.2993842e-04  2.9886682e-03 -5.7171844e-04  1.7000248e-03
  2.8961061e-03 -1.4734608e-03  1.5826351e-03  1.1692893e-04
 -5.4561032e-04 -1.3646147e-03  1.0654312e-04  2.0160272e-03
  3.1371990e-03  1.8710974e-03  2.9124888e-03 -8.2047645e-04
  9.7736251e-04 -1.1875220e-03 -2.1796541e-03 -5.8191392e-05
 -1.5415263e-03 -1.3381819e-03 -2.1044153e-03 -8.4472442e-04
  1.6430757e-05 -2.9564608e-04  4.5550600e-04 -1.6011632e-03
 -1.4516843e-03 -1.3209208e-03  3.2850087e-04 -6.0276774e-04]
""",
    ),
    (
        17,
        r"""
import saiunit as u

# Quantity-valued inputs pass through unchanged.
x_q = jnp.ones((4, 3)) * u.volt          # shape (4, 3), unit = V
w_q = jnp.ones((3, 5)) * u.siemens       # shape (3, 5), unit = S
b_q = jnp.zeros((5,)) * u.amp             # must match V * S = A

y_q = braintrace.matmul(x_q, w_q, bias=b_q)
print("Output:", y_q)
print("Unit :", u.get_unit(y_q))
""",
        """\
Output: [[3. 3. 3. 3. 3.]
 [3. 3. 3. 3. 3.]
 [3. 3. 3. 3. 3.]
 [3. 3. 3. 3. 3.]] A
Unit : A
""",
    ),
    (
        19,
        r"""
x = jnp.ones((4, 3))
w = jnp.ones((3, 5))

# ---- JIT compilation ----
y_jit = jax.jit(braintrace.matmul)(x, w)
print("JIT output shape:", y_jit.shape)
""",
        """\
JIT output shape: (4, 5)
""",
    ),
    (
        20,
        r"""
# ---- Gradient computation ----
grad_fn = jax.grad(lambda w: jnp.sum(braintrace.matmul(x, w)))
dw = grad_fn(w)
print("Gradient shape:", dw.shape)
print("Gradient values:\n", dw)
""",
        """\
Gradient shape: (3, 5)
Gradient values:
 [[4. 4. 4. 4. 4.]
 [4. 4. 4. 4. 4.]
 [4. 4. 4. 4. 4.]]
""",
    ),
    (
        21,
        r"""
# ---- Vectorized mapping (vmap) ----
# vmap over a batch of inputs, each of shape (4, 3)
xs = jnp.ones((8, 4, 3))  # 8 different batches
vmap_fn = jax.vmap(lambda x_i: braintrace.matmul(x_i, w))
ys = vmap_fn(xs)
print("vmap output shape:", ys.shape)  # (8, 4, 5)
""",
        """\
vmap output shape: (8, 4, 5)
""",
    ),
    (
        22,
        r"""
# ---- JVP (forward-mode differentiation) ----
primals = (x, w)
tangents = (jnp.ones_like(x), jnp.ones_like(w))

y_primal, y_tangent = jax.jvp(braintrace.matmul, primals, tangents)
print("JVP primal shape:", y_primal.shape)
print("JVP tangent shape:", y_tangent.shape)
""",
        """\
JVP primal shape: (4, 5)
JVP tangent shape: (4, 5)
""",
    ),
    (
        23,
        r'''
# ---- Composability: JIT + grad + vmap ----
@jax.jit
def batched_grad(xs, w):
    """Compute per-sample gradients w.r.t. the weight."""
    def single_grad(x_i):
        return jax.grad(lambda w_: jnp.sum(braintrace.matmul(x_i, w_)))(w)
    return jax.vmap(single_grad)(xs)

xs = jnp.ones((8, 4, 3))
per_sample_grads = batched_grad(xs, w)
print("Per-sample gradients shape:", per_sample_grads.shape)  # (8, 3, 5)
''',
        """\
Per-sample gradients shape: (8, 3, 5)
""",
    ),
    (
        26,
        r"""
from braintrace._etrace_op import (
    ETP_RULES_YW_TO_W,
    ETP_RULES_XY_TO_DW,
    ETP_RULES_INIT_DRTRL,
    ETP_RULES_INIT_PP,
    ETP_PRIMITIVES,
    BATCHED_PRIMITIVES,
)

print("All ETP primitives:")
for p in sorted(ETP_PRIMITIVES, key=lambda p: p.name):
    batched_tag = " [batched]" if p in BATCHED_PRIMITIVES else ""
    print(f"  {p.name}{batched_tag}")

print("\nTrace propagation rules (ETP_RULES_YW_TO_W):")
for p in sorted(ETP_RULES_YW_TO_W.keys(), key=lambda p: p.name):
    print(f"  {p.name}")

print("\nWeight gradient rules (ETP_RULES_XY_TO_DW):")
for p in sorted(ETP_RULES_XY_TO_DW.keys(), key=lambda p: p.name):
    print(f"  {p.name}")

print("\nD-RTRL init rules (ETP_RULES_INIT_DRTRL):")
for p in sorted(ETP_RULES_INIT_DRTRL.keys(), key=lambda p: p.name):
    print(f"  {p.name}")

print("\npp_prop init rules (ETP_RULES_INIT_PP):")
for p in sorted(ETP_RULES_INIT_PP.keys(), key=lambda p: p.name):
    print(f"  {p.name}")
""",
        """\
All ETP primitives:
  etp_conv [batched]
  etp_elemwise
  etp_lora_mm [batched]
  etp_lora_mv
  etp_mm [batched]
  etp_mv
  etp_sp_mm [batched]
  etp_sp_mv

Trace propagation rules (ETP_RULES_YW_TO_W):
  etp_conv
  etp_elemwise
  etp_lora_mm
  etp_lora_mv
  etp_mm
  etp_mv
  etp_sp_mm
  etp_sp_mv

Weight gradient rules (ETP_RULES_XY_TO_DW):
  etp_conv
  etp_elemwise
  etp_lora_mm
  etp_lora_mv
  etp_mm
  etp_mv
  etp_sp_mm
  etp_sp_mv

D-RTRL init rules (ETP_RULES_INIT_DRTRL):
  etp_conv
  etp_elemwise
  etp_lora_mm
  etp_lora_mv
  etp_mm
  etp_mv
  etp_sp_mm
  etp_sp_mv

pp_prop init rules (ETP_RULES_INIT_PP):
  etp_conv
  etp_elemwise
  etp_lora_mm
  etp_lora_mv
  etp_mm
  etp_mv
  etp_sp_mm
  etp_sp_mv
""",
    ),
    (
        28,
        r"""
import braintrace
from braintrace import register_primitive


# Step 1: Define the implementation.
# Plain JAX function — no special annotations needed.
def _scaled_matmul_impl(*args, scale=1.0, has_bias=False):
    x, w = args[0], args[1]
    y = scale * (x @ w)
    if has_bias:
        y = y + args[2]
    return y


# Step 2: Register as an ETP primitive.
# register_primitive() returns an ``ETPPrimitive`` and auto-derives all
# standard JAX rules (abstract_eval, lowering, JVP, transpose, batching).
scaled_mm_p = register_primitive('etp_scaled_mm', _scaled_matmul_impl, batched=True)

print("Primitive registered:", scaled_mm_p)
print("Type:", type(scaled_mm_p).__name__)
""",
        """\
Primitive registered: etp_scaled_mm
Type: ETPPrimitive
""",
    ),
    (
        29,
        r'''
# Step 3: Register the four ETP-specific rules (dict API).
# Each rule accepts / returns ``Dict[str, Array]`` keyed by the names
# in ``trainable_invars_fn`` — here ``'weight'`` and (optionally) ``'bias'``.


def _scaled_trainable_invars(params):
    """Tell the compiler which invars are trainable."""
    base = {'weight': 1}
    if params.get('has_bias', False):
        base['bias'] = 2
    return base


def _scaled_yw_to_w(hidden_dim, trace, *, scale=1.0, has_bias=False):
    # y = scale * x @ w + b
    #   -> ∂y/∂w along the "out" axis is scaled by `scale`; the y→w chain
    #      link is still elementwise along `out` axis (singleton at axis=-2).
    out = {'weight': trace['weight'] * jnp.expand_dims(hidden_dim, axis=-2) * scale}
    if has_bias:
        out['bias'] = trace['bias'] * hidden_dim
    return out


def _scaled_xy_to_dw(x, hidden_dim, weights, *, scale=1.0, has_bias=False):
    # Single fused VJP over a dict-valued forward function — returns
    # gradients for both 'weight' and 'bias' in one pass.
    def _fwd(w_dict):
        y = scale * (x @ w_dict['weight'])
        if has_bias:
            y = y + w_dict['bias']
        return y
    _, vjp_fn = jax.vjp(_fwd, weights)
    return vjp_fn(hidden_dim)[0]


def _scaled_init_drtrl(x_var, y_var, weight_vars, num_hidden_state):
    """D-RTRL parameter-dim trace: one leaf per trainable key."""
    batch = x_var.aval.shape[0]
    out = {
        'weight': jnp.zeros(
            (batch, *weight_vars['weight'].aval.shape, num_hidden_state)
        )
    }
    if 'bias' in weight_vars:
        out['bias'] = jnp.zeros(
            (batch, *weight_vars['bias'].aval.shape, num_hidden_state)
        )
    return out


def _scaled_init_pp(x_var, y_var, weight_vars, num_hidden_state):
    """pp-prop df trace: single array shaped like the output."""
    return jnp.zeros(
        (*y_var.aval.shape, num_hidden_state),
        dtype=y_var.aval.dtype,
    )


scaled_mm_p.register_etp_rules(
    yw_to_w=_scaled_yw_to_w,
    xy_to_dw=_scaled_xy_to_dw,
    init_drtrl=_scaled_init_drtrl,
    init_pp=_scaled_init_pp,
)

# Shorthand: every ``register_*`` method also exists as a standalone call,
# and ``ETPPrimitiveSpec`` (below) bundles the whole thing in one record.

print("yw_to_w registered:  ", scaled_mm_p in ETP_RULES_YW_TO_W)
print("xy_to_dw registered: ", scaled_mm_p in ETP_RULES_XY_TO_DW)
print("init_drtrl registered:", scaled_mm_p in ETP_RULES_INIT_DRTRL)
print("init_pp registered:  ", scaled_mm_p in ETP_RULES_INIT_PP)
''',
        """\
yw_to_w registered:   True
xy_to_dw registered:  True
init_drtrl registered: True
init_pp registered:   True
""",
    ),
    (
        30,
        r"""
# Step 4: Use the custom primitive via ``primitive.bind()``.

x = jnp.ones((4, 3))
w = jnp.ones((3, 5))

y = scaled_mm_p.bind(x, w, scale=2.0, has_bias=False)
y_expected = 2.0 * (x @ w)

print("Output shape :", y.shape)
print("Matches 2·xw :", bool(jnp.allclose(y, y_expected)))

# With bias:
b = jnp.full((5,), 0.1)
y_bias = scaled_mm_p.bind(x, w, b, scale=2.0, has_bias=True)
print("With bias    :", y_bias[0])
""",
        """\
Output shape : (4, 5)
Matches 2·xw : True
With bias    : [6.1 6.1 6.1 6.1 6.1]
""",
    ),
    (
        31,
        r"""
# All JAX transformations work automatically for the custom primitive.

# JIT
y_jit = jax.jit(lambda x, w: scaled_mm_p.bind(x, w, scale=2.0, has_bias=False))(x, w)
print("JIT works:", bool(jnp.allclose(y_jit, y_expected)))

# Grad
dw = jax.grad(lambda w: jnp.sum(scaled_mm_p.bind(x, w, scale=2.0, has_bias=False)))(w)
print("Grad shape:", dw.shape)

# Vmap
xs = jnp.ones((8, 4, 3))
ys = jax.vmap(lambda xi: scaled_mm_p.bind(xi, w, scale=2.0, has_bias=False))(xs)
print("Vmap output shape:", ys.shape)
""",
        """\
JIT works: True
Grad shape: (3, 5)
Vmap output shape: (8, 4, 5)
""",
    ),
    (
        34,
        r"""
import braintrace


def _spec_impl(*args, scale=1.0, has_bias=False):
    x, w = args[0], args[1]
    y = scale * (x @ w)
    if has_bias:
        y = y + args[2]
    return y


def _spec_trainable_invars(params):
    base = {'weight': 1}
    if params.get('has_bias', False):
        base['bias'] = 2
    return base


def _spec_yw_to_w(hidden_dim, trace, *, scale=1.0, has_bias=False):
    out = {'weight': trace['weight'] * jnp.expand_dims(hidden_dim, axis=-2) * scale}
    if has_bias:
        out['bias'] = trace['bias'] * hidden_dim
    return out


def _spec_xy_to_dw(x, hidden_dim, weights, *, scale=1.0, has_bias=False):
    def _fwd(w_dict):
        y = scale * (x @ w_dict['weight'])
        if has_bias:
            y = y + w_dict['bias']
        return y
    _, vjp_fn = jax.vjp(_fwd, weights)
    return vjp_fn(hidden_dim)[0]


def _spec_init_drtrl(x_var, y_var, weight_vars, n):
    batch = x_var.aval.shape[0]
    out = {
        'weight': jnp.zeros(
            (batch, *weight_vars['weight'].aval.shape, n)
        )
    }
    if 'bias' in weight_vars:
        out['bias'] = jnp.zeros(
            (batch, *weight_vars['bias'].aval.shape, n)
        )
    return out


def _spec_init_pp(x_var, y_var, weight_vars, n):
    return jnp.zeros((*y_var.aval.shape, n), dtype=y_var.aval.dtype)


spec = braintrace.ETPPrimitiveSpec(
    name='etp_spec_demo',
    impl=_spec_impl,
    yw_to_w=_spec_yw_to_w,
    xy_to_dw=_spec_xy_to_dw,
    init_drtrl=_spec_init_drtrl,
    init_pp=_spec_init_pp,
    trainable_invars_fn=_spec_trainable_invars,
    x_invar_index=0,   # ``invars[0]`` is the input; trainable invars are
                       # fully described by ``trainable_invars_fn`` above.
    batched=True,
)

spec_p = braintrace.register_primitive_spec(spec)

# The spec is recoverable from the primitive at any time:
assert braintrace.get_primitive_spec(spec_p) is spec

# Quick sanity check of the invar layout:
print("trainable (no bias):", spec.resolve_trainable_invars({'has_bias': False}))
print("trainable (bias)   :", spec.resolve_trainable_invars({'has_bias': True}))

# And the primitive binds normally:
y_spec = spec_p.bind(x, w, scale=3.0, has_bias=False)
print("spec bind output  :", y_spec.shape)
""",
        """\
trainable (no bias): {'weight': 1}
trainable (bias)   : {'weight': 1, 'bias': 2}
spec bind output  : (4, 5)
""",
    ),
]


def test_notebook_cells_reproduce_recorded_output():
    extra = _registered_names() - BUILTIN_NAMES
    if extra:
        pytest.fail(
            f"other tests left ETP primitives registered: {sorted(extra)}; unregister them in a finalizer"
        )
    namespace = {"__name__": "__notebook__"}
    failures = []
    try:
        for index, source, want in NOTEBOOK_CELLS:
            buffer = io.StringIO()
            try:
                with contextlib.redirect_stdout(buffer):
                    exec(compile(source, f"<notebook cell {index}>", "exec"), namespace)
            except Exception:
                failures.append(f"cell {index} raised:\n{traceback.format_exc(limit=-3)}")
                continue
            problem = compare_output(buffer.getvalue(), want)
            if problem is not None:
                failures.append(f"cell {index}: {problem}")
    finally:
        for name in NOTEBOOK_PRIMITIVES:
            p = ETP_PRIMITIVES_BY_NAME.get(name)
            if p is not None:
                unregister_primitive(p)
    assert not failures, "\n\n".join(failures)
    assert _registered_names() - BUILTIN_NAMES == set()


def test_rst_registration_example():
    """The registration example of ``custom-etp-primitives.rst``: rules one by one, then bind and grad."""
    from braintrace._etrace_op import (
        BATCHED_PRIMITIVES,
        ETP_RULES_INIT_DRTRL,
        ETP_RULES_INIT_PP,
        ETP_RULES_XY_TO_DW,
        ETP_RULES_YW_TO_W,
        ETP_X_INVAR_INDICES,
    )

    def _my_impl(x, w, *, scale=1.0):
        return scale * (x @ w)

    my_p = braintrace.register_primitive(
        "etp_my_op", _my_impl, batched=True, trainable_invars_fn=lambda params: {"weight": 1}, x_invar_index=0
    )
    try:
        my_p.register_yw_to_w(lambda hidden, trace, **params: trace * hidden[None, :])
        my_p.register_xy_to_dw(
            lambda x, hidden, w, **params: jax.vjp(lambda w_: _my_impl(x, w_, **params), w)[1](hidden)[0]
        )
        my_p.register_init_drtrl(
            lambda x_var, y_var, w, ns: jnp.zeros((x_var.aval.shape[0], *jnp.shape(w.value), ns))
        )
        my_p.register_init_pp(
            lambda x_var, y_var, w, ns: jnp.zeros((*y_var.aval.shape, ns), dtype=y_var.aval.dtype)
        )
        for table in (ETP_RULES_YW_TO_W, ETP_RULES_XY_TO_DW, ETP_RULES_INIT_DRTRL, ETP_RULES_INIT_PP):
            assert my_p in table
        assert my_p in BATCHED_PRIMITIVES and ETP_X_INVAR_INDICES[my_p] == 0

        x = jnp.ones((4, 3))
        w = jnp.ones((3, 5))
        y = my_p.bind(x, w, scale=0.5)
        gw = jax.grad(lambda w_: my_p.bind(x, w_, scale=0.5).sum())(w)
        np.testing.assert_allclose(np.asarray(y), np.full((4, 5), 1.5))
        np.testing.assert_allclose(np.asarray(gw), np.full((3, 5), 2.0))
        dw = ETP_RULES_XY_TO_DW[my_p](x, jnp.ones((4, 5)), w, scale=0.5)
        np.testing.assert_allclose(np.asarray(dw), np.asarray(gw))
    finally:
        unregister_primitive(my_p)
    assert "etp_my_op" not in _registered_names()
