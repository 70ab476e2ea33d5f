"""``braintrace.nn`` linear maps: Linear, SparseLinear, LoRA, Conv1d/2d/3d.

Forward results equal ``brainstate.nn`` with the weights copied over (or a plain-``jnp`` formula),
batched and unbatched, in float32 and float64; each layer that feeds a hidden state is found by
``braintrace.compile_etrace_graph`` as a relation of its primitive with the right keys; bad input
raises clear errors.
"""

from __future__ import annotations

import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from saiunit import sparse as ss

import braintrace
from braintrace import nn


@pytest.fixture
def precision(request):
    """Enter ``brainstate.environ.context(precision=...)`` for the test's ``precision`` parameter."""
    with brainstate.environ.context(precision=request.param, dt=1.0 * u.ms):
        yield request.param


def cases(*combos):
    """``(precision, batch)`` cases: float64 where precision matters, batched and unbatched overall."""
    ids = [f"float{p}-{'batched' if b else 'unbatched'}" for p, b in combos]
    return pytest.mark.parametrize("precision, batch", combos, ids=ids, indirect=["precision"])


def tol(precision):
    return dict(rtol=1e-5, atol=1e-5) if precision == 32 else dict(rtol=1e-12, atol=1e-12)


def both(layer, ref, x):
    """``(layer(x), ref(x))`` in one jitted call (one compilation instead of one per eager op)."""
    return jax.jit(lambda x: (layer(x), ref(x)))(x)


def randn(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), brainstate.environ.dftype())


def np_init(seed=0):
    """A numpy-backed initializer: no XLA compilation per shape (unlike brainstate's random ones)."""
    rng = np.random.default_rng(seed)
    return lambda shape: randn(rng, *shape) * 0.5


def random_csr(rng, n_in, n_out, density=0.4):
    """A saiunit CSR built in numpy (``fromdense`` would compile several XLA ops) and its dense twin."""
    dense = (rng.random((n_in, n_out)) < density) * rng.normal(size=(n_in, n_out))
    rows, cols = np.nonzero(dense)
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=n_in))]
    data = jnp.asarray(dense[rows, cols], brainstate.environ.dftype())
    return ss.CSR(
        (data, jnp.asarray(cols, jnp.int32), jnp.asarray(indptr, jnp.int32)), shape=(n_in, n_out)
    ), dense


class Leaky(brainstate.nn.Module):
    """``h = 0.9 h + layer(x)``: a leaky hidden state fed by ``layer``."""

    def __init__(self, layer, out_shape):
        super().__init__()
        self.layer = layer
        self.out_shape = tuple(out_shape)

    def init_state(self, batch_size=None, **kwargs):
        lead = () if batch_size is None else (batch_size,)
        self.h = brainstate.HiddenState(jnp.zeros(lead + self.out_shape, brainstate.environ.dftype()))

    def update(self, x):
        self.h.value = 0.9 * self.h.value + self.layer(x)
        return self.h.value


def relations(layer, out_shape, x, batch_size):
    model = Leaky(layer, out_shape)
    brainstate.nn.init_all_states(model, batch_size=batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = braintrace.compile_etrace_graph(model, x)
    return graph.hidden_param_op_relations


batches = pytest.mark.parametrize("batch", [4, None], ids=["batched", "unbatched"])


# --------------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision, batch, bias",
    [(32, 4, True), (64, None, True), (32, None, False)],
    ids=["float32-batched-bias", "float64-unbatched-bias", "float32-unbatched-nobias"],
    indirect=["precision"],
)
def test_linear_matches_brainstate(precision, batch, bias):
    rng = np.random.default_rng(0)
    ref = brainstate.nn.Linear(5, 3, w_init=np_init(1), b_init=np_init(2) if bias else None)
    layer = nn.Linear(5, 3, w_init=np_init(), b_init=np_init() if bias else None)
    layer.weight.value = ref.weight.value
    x = randn(rng, *((batch,) if batch else ()), 5)
    got, want = both(layer, ref, x)
    np.testing.assert_allclose(got, want, **tol(precision))
    assert got.dtype == x.dtype


def test_linear_mask_and_leading_axes():
    rng = np.random.default_rng(1)
    mask = jnp.asarray(rng.random((4, 6)) < 0.5, jnp.float32)
    layer = nn.Linear((2, 4), (2, 6), w_init=np_init(), b_init=np_init(1), w_mask=mask)
    x = randn(rng, 3, 2, 4)
    p = jax.tree.map(np.asarray, layer.weight.value)
    want = np.asarray(x) @ (p["weight"] * np.asarray(mask)) + p["bias"]
    np.testing.assert_allclose(jax.jit(layer)(x), want, rtol=1e-5, atol=1e-5)


@batches
def test_linear_relation(batch):
    rng = np.random.default_rng(2)
    x = randn(rng, *((batch,) if batch else ()), 5)
    (rel,) = relations(nn.Linear(5, 3, w_init=np_init()), (3,), x, batch)
    assert rel.primitive.name == ("etp_mm" if batch else "etp_mv")
    assert set(rel.trainable_vars) == {"weight", "bias"}
    assert rel.param_paths == {"weight": ("layer.weight",), "bias": ("layer.weight",)}


def test_linear_wrong_feature_size():
    layer = nn.Linear(5, 3, w_init=np_init())
    with pytest.raises(ValueError, match=r"expected 5 input features.*received x of shape \(2, 4\) with 4"):
        layer(jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="w_init"):
        nn.Linear(5, 3, w_init=jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="in_size"):
        nn.Linear(0, 3)


# --------------------------------------------------------------------------------------------------
# SparseLinear
# --------------------------------------------------------------------------------------------------


@cases((32, 4), (64, None))
def test_sparse_linear_matches_brainstate_and_dense(precision, batch):
    rng = np.random.default_rng(3)
    csr, dense = random_csr(rng, 7, 5)
    layer = nn.SparseLinear(csr)
    ref = brainstate.nn.SparseLinear(csr)
    x = randn(rng, *((batch,) if batch else ()), 7)
    got, want = both(layer, ref, x)
    np.testing.assert_allclose(got, want, **tol(precision))
    np.testing.assert_allclose(got, np.asarray(x) @ dense, **tol(precision))
    np.testing.assert_allclose(np.asarray(jax.jit(layer.todense)()), dense, **tol(precision))
    assert layer.weight.value["weight"].shape == (layer.nnz,)


def test_sparse_linear_formats_and_bias():
    rng = np.random.default_rng(4)
    csr, dense = random_csr(rng, 6, 4)
    x = randn(rng, 3, 6)
    bias = randn(rng, 4)
    coo = ss.COO((csr.data, *map(jnp.asarray, np.nonzero(dense))), shape=dense.shape)  # the CSR's data order
    csc_data = dense.T[np.nonzero(dense.T)]
    csc = ss.CSC(
        (
            jnp.asarray(csc_data, jnp.float32),
            jnp.asarray(np.nonzero(dense.T)[1]),
            jnp.asarray(np.r_[0, np.cumsum((dense != 0).sum(0))]),
        ),
        shape=dense.shape,
    )
    layers = [nn.SparseLinear(conn, b_init=bias) for conn in (csr, coo, csc)]
    outs = jax.jit(lambda x: [layer(x) for layer in layers])(x)
    for y in outs:
        np.testing.assert_allclose(y, np.asarray(x) @ dense + np.asarray(bias), rtol=1e-5, atol=1e-5)


def test_sparse_linear_brainevent_csr():
    brainevent = pytest.importorskip("brainevent")
    rng = np.random.default_rng(5)
    csr, dense = random_csr(rng, 6, 4)
    conn = brainevent.CSR(csr.data, csr.indices, csr.indptr, shape=csr.shape)
    layer = nn.SparseLinear(conn)
    x = randn(rng, 2, 6)
    np.testing.assert_allclose(jax.jit(layer)(x), np.asarray(x) @ dense, rtol=1e-5, atol=1e-5)


@batches
def test_sparse_linear_relation_and_index_state(batch):
    rng = np.random.default_rng(6)
    csr, _ = random_csr(rng, 7, 5)
    layer = nn.SparseLinear(csr)
    x = randn(rng, *((batch,) if batch else ()), 7)
    (rel,) = relations(layer, (5,), x, batch)
    assert rel.primitive.name == ("etp_sp_mm" if batch else "etp_sp_mv")
    assert set(rel.trainable_vars) == {"weight"}
    assert rel.param_paths == {"weight": ("layer.weight",)}
    assert len(rel.aux_vars) == 3  # row, col and column-pointer index arrays: operands of the primitive
    assert isinstance(layer.indices, nn.SparseIndices) and not isinstance(
        layer.indices, brainstate.ParamState
    )
    # gradients over parameters leave the indices out
    grads = jax.jit(brainstate.transform.grad(lambda x: layer(x).sum(), layer.states(brainstate.ParamState)))(
        x
    )
    assert set(grads) == {("weight",)}


def test_sparse_linear_shape_mismatch():
    csr, _ = random_csr(np.random.default_rng(7), 7, 5)
    with pytest.raises(ValueError, match=r"shape \(7, 5\).*in_size=\(6,\)"):
        nn.SparseLinear(csr, in_size=6)
    with pytest.raises(ValueError, match=r"shape \(7, 5\).*out_size=\(4,\)"):
        nn.SparseLinear(csr, out_size=4)
    layer = nn.SparseLinear(csr, in_size=7, out_size=5)
    with pytest.raises(ValueError, match=r"expected 7 input features.*with 6"):
        layer(jnp.ones((2, 6)))
    with pytest.raises(TypeError, match="sparse_mat"):
        nn.SparseLinear(jnp.ones((3, 3)))


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------


@cases((32, 4), (64, None))
def test_lora_matches_brainstate(precision, batch):
    rng = np.random.default_rng(8)
    ref = brainstate.nn.LoRA(in_features=6, lora_rank=2, out_features=4, kernel_init=np_init(1))
    # brainstate's 'lora_a' is the input-side (in, r) factor, ours is 'lora_b' (the primitive's naming)
    layer = nn.LoRA(6, 4, rank=2, B_init=ref.weight.value["lora_a"], A_init=ref.weight.value["lora_b"])
    x = randn(rng, *((batch,) if batch else ()), 6)
    scaled = nn.LoRA(
        6,
        4,
        rank=2,
        alpha=0.5,
        B_init=ref.weight.value["lora_a"],
        A_init=ref.weight.value["lora_b"],
        b_init=jnp.ones(4, x.dtype),
    )
    got, got_scaled, want = jax.jit(lambda x: (layer(x), scaled(x), ref(x)))(x)
    np.testing.assert_allclose(got, want, **tol(precision))
    np.testing.assert_allclose(got_scaled, 0.5 * want + 1.0, **tol(precision))


@batches
def test_lora_relation(batch):
    rng = np.random.default_rng(9)
    x = randn(rng, *((batch,) if batch else ()), 6)
    (rel,) = relations(nn.LoRA(6, 4, rank=2, B_init=np_init(), A_init=np_init(1)), (4,), x, batch)
    assert rel.primitive.name == ("etp_lora_mm" if batch else "etp_lora_mv")
    assert set(rel.trainable_vars) == {"lora_b", "lora_a"}
    assert rel.param_paths == {"lora_b": ("layer.weight",), "lora_a": ("layer.weight",)}


def test_lora_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        nn.LoRA(6, 4, rank=0)
    with pytest.raises(ValueError, match=r"expected 6 input features.*with 5"):
        nn.LoRA(6, 4, rank=2, B_init=np_init(), A_init=np_init(1))(jnp.ones((3, 5)))


# --------------------------------------------------------------------------------------------------
# Conv1d / Conv2d / Conv3d
# --------------------------------------------------------------------------------------------------

CONVS = {
    "Conv1d": (nn.Conv1d, brainstate.nn.Conv1d, (9, 3)),
    "Conv2d": (nn.Conv2d, brainstate.nn.Conv2d, (6, 5, 3)),
    "Conv3d": (nn.Conv3d, brainstate.nn.Conv3d, (4, 5, 3, 2)),
}
conv_kinds = pytest.mark.parametrize("kind", list(CONVS))


@pytest.mark.parametrize(
    "precision, batch, kind",
    [(32, 2, "Conv1d"), (64, None, "Conv2d"), (32, 2, "Conv3d")],
    ids=["float32-batched-Conv1d", "float64-unbatched-Conv2d", "float32-batched-Conv3d"],
    indirect=["precision"],
)
def test_conv_matches_brainstate(precision, kind, batch):
    ours_cls, ref_cls, in_size = CONVS[kind]
    rng = np.random.default_rng(10)
    kw = dict(kernel_size=3, stride=2, padding="SAME", rhs_dilation=1)
    ref = ref_cls(in_size, out_channels=4, w_init=np_init(1), b_init=np_init(2), **kw)
    layer = ours_cls(in_size, out_channels=4, w_init=np_init(), **kw)
    layer.weight.value = {"weight": ref.weight.value["weight"], "bias": ref.weight.value["bias"].reshape(-1)}
    x = randn(rng, *((batch,) if batch else ()), *in_size)
    y, want = both(layer, ref, x)
    np.testing.assert_allclose(y, want, **tol(precision))
    assert layer.out_size == ref.out_size == y.shape[-len(in_size) :]


def test_conv_padding_dilation_groups():
    rng = np.random.default_rng(11)
    layer = nn.Conv2d(
        (7, 6, 4),
        out_channels=6,
        kernel_size=(3, 2),
        padding=((1, 0), (2, 1)),
        rhs_dilation=2,
        groups=2,
        w_init=np_init(),
        b_init=np_init(1),
    )
    x = randn(rng, 2, 7, 6, 4)
    p = layer.weight.value
    ref = lambda x: (
        jax.lax.conv_general_dilated(
            x,
            p["weight"],
            (1, 1),
            ((1, 0), (2, 1)),
            rhs_dilation=(2, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=2,
        )
        + p["bias"]
    )
    got, want = both(layer, ref, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@conv_kinds
def test_conv_relation(kind):
    ours_cls, _, in_size = CONVS[kind]
    layer = ours_cls(in_size, out_channels=4, kernel_size=3, w_init=np_init())
    x = randn(np.random.default_rng(12), 2, *in_size)
    (rel,) = relations(layer, layer.out_size, x, 2)
    assert rel.primitive.name == "etp_conv"
    assert set(rel.trainable_vars) == {"weight", "bias"}
    assert rel.param_paths == {"weight": ("layer.weight",), "bias": ("layer.weight",)}


def test_conv_bad_input():
    layer = nn.Conv2d((6, 5, 3), out_channels=4, kernel_size=3, w_init=np_init())
    with pytest.raises(ValueError, match=r"expected 3 input channels.*with 2"):
        layer(jnp.ones((2, 6, 5, 2)))
    with pytest.raises(ValueError, match="expected input size"):
        layer(jnp.ones((2, 6, 4, 3)))
    with pytest.raises(ValueError, match="4 or 3 axes"):
        layer(jnp.ones((6, 3)))
    with pytest.raises(ValueError, match="in_size"):
        nn.Conv2d((6, 3), out_channels=4, kernel_size=3)
    with pytest.raises(ValueError, match="divisible by groups"):
        nn.Conv1d((8, 3), out_channels=4, kernel_size=3, groups=2)
