"""Sparse layers split into postsynaptic blocks (``SparsePattern.blocks = P``) compute what the
unblocked layer computes.

Every case is drawn at random (hypothesis, few examples): a sparse ``(I, O)`` matrix in one of the
three formats with some blocks empty, split by :func:`braintrace.partition_postsynaptic` into
``P in {1, 2, 3, 4}`` blocks padded to equal size. The reference is the unblocked primitive on the
matrix's own order; blocked results are mapped back through ``partition.to_source`` and must equal
it to 1e-10 in float64, while every padding entry (given a non-zero weight on purpose) gets exactly
zero: in the product, its gradient, every rule, the D-RTRL trace operations, and the ``etrace_grad``
and BPTT gradients of a recurrent network.
"""

from __future__ import annotations

import dataclasses
import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from saiunit import sparse as ss

import braintrace
from braintrace._etrace_op import etp_sp_mm_p, etp_sp_mv_p, get_rule
from braintrace._etrace_op._trace_ops import ETP_DRTRL_TRACE_OPS, _default_ops, rule_kwargs
from braintrace._etrace_op.sparse import SparsePattern, bind_sparse_matmul, sparse_pattern

TOL = 1e-10
FEW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ONE = settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _float64():
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _close(actual, expected):
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err < TOL, f"normwise relative error {err:.3e} >= {TOL:.0e}"


def _matrix(n_in, blocks, units, density, empty, fmt, seed):
    """A random ``(n_in, blocks * units)`` sparse matrix (float64) with the blocks in ``empty`` empty."""
    rng = np.random.default_rng(seed)
    mask = rng.random((n_in, blocks * units)) < density
    for p, e in enumerate(empty):
        mask[:, p * units : (p + 1) * units] &= not e
    if not mask.any():  # at least one non-zero, in a block that is not empty
        p = next(p for p, e in enumerate(empty) if not e)
        mask[rng.integers(n_in), p * units + rng.integers(units)] = True
    rows, cols = np.nonzero(mask)  # row-major: the CSR order
    order = {
        "csr": np.arange(rows.size),
        "csc": np.lexsort((rows, cols)),
        "coo": rng.permutation(rows.size),  # an arbitrary order of the non-zeros
    }[fmt]
    rows, cols = rows[order], cols[order]
    data = jnp.asarray(rng.standard_normal(rows.size))
    i32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
    if fmt == "csr":
        return ss.CSR((data, i32(cols), i32(np.searchsorted(rows, np.arange(n_in + 1)))), shape=mask.shape)
    if fmt == "csc":
        ptr = np.searchsorted(cols, np.arange(mask.shape[1] + 1))
        return ss.CSC((data, i32(rows), i32(ptr)), shape=mask.shape)
    return ss.COO((data, i32(rows), i32(cols)), shape=mask.shape)


@st.composite
def matrices(draw, max_in=5):
    blocks = draw(st.sampled_from([1, 2, 3, 4]))
    empty = draw(st.lists(st.booleans(), min_size=blocks, max_size=blocks))
    if all(empty):
        empty[draw(st.integers(0, blocks - 1))] = False
    return _matrix(
        n_in=draw(st.integers(1, max_in)),
        blocks=blocks,
        units=draw(st.integers(1, 3)),
        density=draw(st.floats(0.2, 0.9)),
        empty=empty,
        fmt=draw(st.sampled_from(["csr", "csc", "coo"])),
        seed=draw(st.integers(0, 2**16)),
    ), blocks


class Blocked:
    """A matrix, its unblocked pattern (the reference) and its partition, with random operands."""

    def __init__(self, mat, blocks, seed=0):
        self.mat = mat
        self.pattern, self.rows, self.cols = sparse_pattern(mat)
        self.part = braintrace.partition_postsynaptic(mat, blocks)
        self.bp = self.part.pattern
        self.rng = np.random.default_rng(seed)
        self.data = jnp.asarray(mat.data)
        # the padding entries carry weights that must have no effect
        self.bdata = jnp.asarray(self.blocked(np.asarray(mat.data), self.rng.standard_normal(self.bp.nnz)))
        self.aux = (self.rows, self.cols)
        self.baux = tuple(jnp.asarray(i) for i in self.part.indices)

    def normal(self, *shape):
        return jnp.asarray(self.rng.standard_normal(shape))

    def blocked(self, values, padding):
        """Per-entry ``values (..., nnz)`` in the blocked order, ``padding`` at the padding entries
        (NumPy, no compiled program)."""
        real = self.part.real
        return np.where(real, np.asarray(values)[..., np.maximum(self.part.source, 0)], padding)

    def source(self, values, axis=-1):
        """Blocked per-entry ``values`` (entries along ``axis``) in the matrix's order."""
        values = np.moveaxis(np.asarray(values), axis, -1)
        out = np.zeros(values.shape[:-1] + (self.pattern.nnz,))
        out[..., self.part.source[self.part.real]] = values[..., self.part.real]
        return np.moveaxis(out, -1, axis)

    def assert_padding_zero(self, values, axis=-1):
        pad = np.moveaxis(np.asarray(values), axis, -1)[..., ~self.part.real]
        assert np.all(pad == 0), pad


# ---------------------------------------------------------------------------------------------
# the pattern and the partition
# ---------------------------------------------------------------------------------------------


def test_pattern_repr_and_validation():
    assert repr(SparsePattern((50, 40), 200, "csr")) == (
        "SparsePattern(shape=(50, 40), nnz=200, format='csr', col_sorted=False)"
    )
    p = SparsePattern((4, 6), 6, "coo", blocks=3, block_nnz=(2, 0, 1))
    assert "blocks=3, block_nnz=(2, 0, 1)" in repr(p) and p.padded and (p.block_size, p.block_units) == (2, 2)
    assert SparsePattern((4, 6), 6, blocks=3) == SparsePattern((4, 6), 6, blocks=3, block_nnz=(2, 2, 2))
    with pytest.raises(ValueError, match="`blocks`=4 must divide the output features O = 6"):
        SparsePattern((4, 6), 8, blocks=4)
    with pytest.raises(ValueError, match="`nnz` must be divisible by `blocks`"):
        SparsePattern((4, 6), 7, blocks=3)
    with pytest.raises(ValueError, match="`block_nnz` must hold blocks=3 ints in"):
        SparsePattern((4, 6), 6, blocks=3, block_nnz=(2, 3, 1))
    with pytest.raises(ValueError, match="`block_nnz` must hold blocks=3 ints in"):
        SparsePattern((4, 6), 6, blocks=3, block_nnz=(2, 2))
    with pytest.raises(ValueError, match="one block has no padding"):
        SparsePattern((4, 6), 6, block_nnz=(5,))
    with pytest.raises(TypeError, match="`blocks` must be an int >= 1"):
        SparsePattern((4, 6), 6, blocks=True)
    with pytest.raises(ValueError, match="`blocks` must be an int >= 1, got 0"):
        SparsePattern((4, 6), 6, blocks=0)


def test_entries_outside_their_block_are_rejected():
    pattern = SparsePattern((3, 4), 4, blocks=2)
    x, w = jnp.ones((2, 3)), jnp.ones(4)
    rows = jnp.array([0, 1, 2, 0], jnp.int32)
    with pytest.raises(ValueError, match=r"got col_ids\[1\] = 2, expected a column in \[0, 2\)"):
        bind_sparse_matmul(x, w, pattern, [rows, jnp.array([0, 2, 2, 3], jnp.int32)])
    bind_sparse_matmul(x, w, pattern, [rows, jnp.array([0, 1, 2, 3], jnp.int32)])  # accepted


@FEW
@given(matrices())
def test_partition_layout(case):
    mat, blocks = case
    b = Blocked(mat, blocks)
    part, p = b.part, b.bp
    k, units = p.block_size, p.block_units
    assert (p.blocks, p.nnz, p.col_sorted) == (blocks, blocks * k, True)
    assert sum(p.block_nnz) == b.pattern.nnz and (blocks == 1 or k >= 1)
    block = np.repeat(np.arange(blocks), k)
    assert np.all(part.col_ids // units == block)  # entry p K + i ends on block p
    assert np.all(np.diff(part.col_ids) >= 0)  # column order (padding on the block's last column)
    real = np.arange(k)[None, :] < np.asarray(p.block_nnz)[:, None]
    assert np.array_equal(part.real, real.reshape(-1))
    np.testing.assert_array_equal(part.col_ptr, np.searchsorted(part.col_ids, np.arange(p.shape[1] + 1)))
    src = part.source[part.real]
    assert sorted(src.tolist()) == list(range(b.pattern.nnz))
    np.testing.assert_array_equal(part.row_ids[part.real], np.asarray(b.rows)[src])
    np.testing.assert_array_equal(part.col_ids[part.real], np.asarray(b.cols)[src])
    np.testing.assert_array_equal(part.to_source(part.weight), b.data)
    np.testing.assert_array_equal(part.from_source(b.data), part.weight)
    np.testing.assert_array_equal(part.weight, b.blocked(b.data, 0.0))
    b.assert_padding_zero(part.weight)


def test_partition_input_errors():
    mat = _matrix(3, 2, 2, 0.5, [False, False], "csr", 0)
    with pytest.raises(ValueError, match="`blocks`=3 must divide the output features O = 4"):
        braintrace.partition_postsynaptic(mat, 3)
    with pytest.raises(ValueError, match="`weight` must hold the matrix's"):
        braintrace.partition_postsynaptic(mat, 2, weight=jnp.ones(mat.data.shape[0] + 1))
    with pytest.raises(TypeError, match="`sparse_mat` must be one of"):
        braintrace.partition_postsynaptic(np.ones((3, 4)), 2)
    part = braintrace.partition_postsynaptic(mat, 2)
    with pytest.raises(ValueError, match="to_source: `values` must have"):
        part.to_source(jnp.ones(part.pattern.nnz + 1))


# ---------------------------------------------------------------------------------------------
# the primitive, its rules and its trace operations
# ---------------------------------------------------------------------------------------------


def _relation(pattern, aux, batch):
    """The ``etp_sp_mm`` equation of ``x (batch, I) -> y (batch, O)`` with a bias, and its rule kwargs."""
    n_in, n_out = pattern.shape
    f64 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float64)  # noqa: E731
    jaxpr = jax.make_jaxpr(
        lambda x, w, bias, *aux: bind_sparse_matmul(x, w, pattern, list(aux), bias, validate=False)
    )(f64(batch, n_in), f64(pattern.nnz), f64(n_out), *aux)
    eqn = jaxpr.jaxpr.eqns[-1]
    assert eqn.primitive is etp_sp_mm_p
    return eqn, rule_kwargs(dict(eqn.params), aux)


def _everything(pattern, aux, batch, n):
    """One jitted function computing, for one pattern, the product (batched and not) and its
    gradients, both rules (batched and not), and two steps of the fused and of the rule-derived
    D-RTRL trace operations (update then solve, then update-and-solve), from the same operands."""
    eqn, kw = _relation(pattern, aux, batch)
    kw_mv = rule_kwargs(dict(sparse_mat=pattern, has_bias=True), aux)
    wv = {"weight": eqn.invars[1], "bias": eqn.invars[2]}
    trace_ops = {"fused": ETP_DRTRL_TRACE_OPS[etp_sp_mm_p], "derived": _default_ops(etp_sp_mm_p)}
    traces0 = {
        t: ops.init(eqn.invars[0], eqn.outvars[0], wv, n, (batch,), kw) for t, ops in trace_ops.items()
    }
    product = lambda x, w, bias: bind_sparse_matmul(x, w, pattern, list(aux), bias, validate=False)  # noqa: E731

    def run(o):
        w, bias, x = o["w"], o["bias"], o["x"]
        weights, out = {"weight": w, "bias": bias}, {}
        for tag, prim, xx, ct, kws in (
            ("mm", etp_sp_mm_p, x, o["ct"], kw),
            ("mv", etp_sp_mv_p, o["x1"], o["ct1"], kw_mv),
        ):
            out[f"y_{tag}"] = product(xx, w, bias)
            loss = lambda xx, w: jnp.sum(ct * product(xx, w, bias))  # noqa: E731
            out[f"dx_{tag}"], out[f"dw_{tag}"] = jax.grad(loss, (0, 1))(xx, w)
            r = get_rule(prim, "xy_to_dw")(xx, ct, weights, **kws)
            out[f"xy_to_dw_{tag}"], out[f"xy_to_dw_bias_{tag}"] = r["weight"], r["bias"]
        r = get_rule(etp_sp_mm_p, "yw_to_w")(o["v"], {"weight": o["trace_rule"], "bias": o["ct"]}, **kw)
        out["yw_to_w"], out["yw_to_w_bias"] = r["weight"], r["bias"]
        for tag, ops in trace_ops.items():
            trace = traces0[tag]
            for step in range(2):
                d, df, ct = o["d"][step], o["df"][step], o["ctn"][step]
                if step == 0:
                    trace = ops.update(trace, d, x, df, weights, kw, 0)
                    grads = ops.solve(trace, ct, weights, kw, 0)
                else:
                    trace, grads = ops.update_and_solve(trace, d, x, df, ct, weights, kw, 0)
                out[f"{tag}_trace{step}"], out[f"{tag}_trace_bias{step}"] = trace["weight"], trace["bias"]
                out[f"{tag}_dw{step}"], out[f"{tag}_db{step}"] = grads["weight"], grads["bias"]
        return out

    return jax.jit(run)


#: The entries' axis of each per-entry result: the fused trace is ``(nnz, n, B)``, the rule-derived
#: one ``(B, nnz, n)``; weight gradients and ``yw_to_w`` have them last.
_ENTRY_AXIS = {"dw_mm": -1, "dw_mv": -1, "xy_to_dw_mm": -1, "xy_to_dw_mv": -1, "yw_to_w": -1}
_ENTRY_AXIS |= {f"fused_trace{s}": 0 for s in range(2)} | {f"derived_trace{s}": 1 for s in range(2)}
_ENTRY_AXIS |= {f"{t}_dw{s}": -1 for t in ("fused", "derived") for s in range(2)}


@FEW
@given(data=st.data())
def test_product_rules_and_trace_operations_equal_unblocked(data):
    """The blocked pattern against the unblocked one on the same operands (the padding entries'
    weights and rule traces set to noise): equal to 1e-10 through the permutation, exactly zero at
    padding. ``I = 5``, ``O = 12``, some blocks empty, any of the three formats."""
    blocks = data.draw(st.sampled_from([1, 2, 3, 4]))
    empty = data.draw(st.lists(st.booleans(), min_size=blocks, max_size=blocks))
    if all(empty):
        empty[0] = False
    density = data.draw(st.floats(0.15, 0.8))
    fmt, seed = data.draw(st.sampled_from(["csr", "csc", "coo"])), data.draw(st.integers(0, 2**16))
    b = Blocked(_matrix(5, blocks, 12 // blocks, density, empty, fmt, seed), blocks, seed)
    batch, n, n_out = 2, data.draw(st.sampled_from([1, 2])), 12
    operands = dict(
        x=b.normal(batch, 5),
        x1=b.normal(5),
        bias=b.normal(n_out),
        ct=b.normal(batch, n_out),
        ct1=b.normal(n_out),
        v=b.normal(batch, n_out),
        d=b.normal(2, batch, n_out, n, n),
        df=b.normal(2, batch, n_out, n),
        ctn=b.normal(2, batch, n_out, n),
    )
    trace_rule = b.normal(batch, b.pattern.nnz)
    blocked_rule = jnp.asarray(b.blocked(trace_rule, b.rng.standard_normal((batch, b.bp.nnz))))
    want = _everything(b.pattern, b.aux, batch, n)(dict(operands, w=b.data, trace_rule=trace_rule))
    got = _everything(b.bp, b.baux, batch, n)(dict(operands, w=b.bdata, trace_rule=blocked_rule))
    assert set(got) == set(want)
    for key in want:
        if key in _ENTRY_AXIS:
            _close(b.source(got[key], _ENTRY_AXIS[key]), want[key])
            b.assert_padding_zero(got[key], _ENTRY_AXIS[key])
        else:
            _close(got[key], want[key])


def test_pallas_backend_uses_the_reference_for_blocked_patterns():
    """Under ``'pallas'`` (kernels in interpret mode) a blocked pattern keeps the XLA implementation:
    the same values, padding inert."""
    b = Blocked(_matrix(6, 4, 2, 0.5, [False, True, False, False], "csr", 3), 4, seed=3)
    x = b.normal(3, 6)
    want = bind_sparse_matmul(x, b.data, b.pattern, list(b.aux))
    with braintrace.backend("pallas", interpret=True):
        got = jax.jit(lambda x, w: bind_sparse_matmul(x, w, b.bp, list(b.baux)))(x, b.bdata)
        ops, (_, bkw) = ETP_DRTRL_TRACE_OPS[etp_sp_mm_p], _relation(b.bp, b.baux, 3)
        tr = jnp.zeros((b.bp.nnz, 1, 3))
        d, df, ct = b.normal(3, 8, 1, 1), b.normal(3, 8, 1), b.normal(3, 8, 1)
        w = {"weight": b.bdata, "bias": jnp.zeros(8)}
        new, grads = jax.jit(
            lambda t: ops.update_and_solve(
                {"weight": t, "bias": jnp.zeros((3, 8, 1))}, d, x, df, ct, w, bkw, 0
            )
        )(tr)
    _close(got, want)
    b.assert_padding_zero(grads["weight"])
    b.assert_padding_zero(new["weight"], 0)


# ---------------------------------------------------------------------------------------------
# learners: a leaky RNN whose input and recurrent weights are blocked sparse layers
# ---------------------------------------------------------------------------------------------


class RNN(brainstate.nn.Module):
    """``h' = 0.8 h + 0.2 tanh(inp(x) + rec(h))`` with ``SparseLinear`` input and recurrence."""

    def __init__(self, mat_in, mat_rec, blocks):
        super().__init__()
        self.inp = braintrace.nn.SparseLinear(mat_in, postsynaptic_blocks=blocks)
        bias = jnp.asarray(np.random.default_rng(5).standard_normal(mat_rec.shape[1]) * 0.1)
        self.rec = braintrace.nn.SparseLinear(mat_rec, b_init=bias, postsynaptic_blocks=blocks)
        self.n = mat_rec.shape[1]

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, self.n)))

    def update(self, x):
        self.h.value = 0.8 * self.h.value + 0.2 * jnp.tanh(self.inp(x) + self.rec(self.h.value))
        return self.h.value


def _loss(out, y):
    return jnp.mean((out - y) ** 2)


@st.composite
def networks(draw, blocks):
    """``(input matrix (3, N), recurrent matrix (N, N))`` of ``N = blocks * units`` units, with some
    blocks receiving nothing."""
    units = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    empty_rec = draw(st.lists(st.booleans(), min_size=blocks, max_size=blocks))
    empty_in = draw(st.lists(st.booleans(), min_size=blocks, max_size=blocks))
    for empty in (empty_rec, empty_in):
        if all(empty):
            empty[0] = False
    n = blocks * units
    mat_rec = _matrix(n, blocks, units, draw(st.floats(0.2, 0.8)), empty_rec, "csr", seed)
    mat_rec = ss.CSR(
        (mat_rec.data * 0.5, mat_rec.indices, mat_rec.indptr), shape=mat_rec.shape
    )  # contracting
    mat_in = _matrix(3, blocks, units, draw(st.floats(0.3, 0.9)), empty_in, "coo", seed + 1)
    return mat_in, mat_rec


def _bptt(model, xs, ys):
    """``jax.grad`` of the summed loss through a scan over the sequence, from zero states."""
    brainstate.nn.init_all_states(model, batch_size=xs.shape[1])

    def total():
        body = lambda acc, xy: (acc + _loss(model(xy[0]), xy[1]), None)  # noqa: E731
        return brainstate.transform.scan(body, jnp.zeros(()), (xs, ys))[0]

    return brainstate.transform.grad(total, model.states(brainstate.ParamState))()


def _in_source_order(model, grads, mats):
    """The weight gradients in each matrix's own order; padding entries must be exactly zero."""
    out = {}
    for name, mat in mats.items():
        layer, g = getattr(model, name), grads[(name, "weight")]
        part = layer.partition
        np.testing.assert_array_equal(np.asarray(g["weight"])[~part.real], 0.0)
        out[name] = part.to_source(g["weight"])
        if "bias" in g:
            out[name + ".bias"] = g["bias"]
    return out


@pytest.mark.parametrize("blocks", [2, 3, 4])
@ONE
@given(data=st.data())
def test_learner_and_bptt_gradients_equal_unblocked(blocks, data):
    """D_RTRL and pp_prop ``etrace_grad`` and BPTT through the sequence, blocked against unblocked."""
    mat_in, mat_rec = data.draw(networks(blocks))
    seed = data.draw(st.integers(0, 2**16))
    mats = {"inp": mat_in, "rec": mat_rec}
    rng = np.random.default_rng(seed)
    T, B, n = 4, 2, mat_rec.shape[1]
    xs, ys = jnp.asarray(rng.standard_normal((T, B, 3))), jnp.asarray(rng.standard_normal((T, B, n)))
    results = {}
    for p in (1, blocks):
        for alg in ("d_rtrl", "pp_prop", "bptt"):
            model = RNN(mat_in, mat_rec, p)
            if alg == "bptt":
                grads = _bptt(model, xs, ys)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opts = {"decay_or_rank": 0.9} if alg == "pp_prop" else {}
                    learner = braintrace.compile(model, alg, xs[0], batch_size=B, **opts)
                grads = learner.etrace_grad(xs, ys, step_fn=_loss)
            results[(alg, p)] = _in_source_order(model, grads, mats)
    for alg in ("d_rtrl", "pp_prop", "bptt"):
        for key, want in results[(alg, 1)].items():
            assert np.linalg.norm(np.asarray(want)) > 0 or key == "inp", (alg, key)  # a gradient flows
            _close(results[(alg, blocks)][key], want)


# ---------------------------------------------------------------------------------------------
# SparseLinear(postsynaptic_blocks=P) and shard_postsynaptic's errors
# ---------------------------------------------------------------------------------------------


def test_sparse_linear_blocks():
    mat = _matrix(5, 2, 3, 0.5, [False, True], "csr", 7)
    plain = braintrace.nn.SparseLinear(mat)
    blocked = braintrace.nn.SparseLinear(mat, postsynaptic_blocks=2)
    assert plain.partition.pattern.blocks == 1 and blocked.partition.pattern.blocks == 2
    assert plain._pattern == dataclasses.replace(sparse_pattern(mat)[0], format="csc", col_sorted=True)
    assert blocked.nnz == blocked.weight.value["weight"].shape[0] == blocked.partition.pattern.nnz
    np.testing.assert_array_equal(blocked.todense(), plain.todense())
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)))
    _close(blocked(x), plain(x))
    with pytest.raises(ValueError, match="SparseLinear: `postsynaptic_blocks`=4 must divide the output"):
        braintrace.nn.SparseLinear(mat, postsynaptic_blocks=4)
    with pytest.raises(TypeError, match="SparseLinear: `postsynaptic_blocks` must be an int >= 1"):
        braintrace.nn.SparseLinear(mat, postsynaptic_blocks=2.0)


def test_shard_postsynaptic_errors():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    mat = _matrix(4, 2, 2, 0.6, [False, False], "csr", 1)
    x = jnp.zeros((2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = braintrace.compile(RNN(mat, _rec(4), 2), "d_rtrl", x, batch_size=2)
        with pytest.raises(ValueError, match=r"has 2 postsynaptic blocks, but the mesh axis has 1 devices"):
            braintrace.shard_postsynaptic(learner, mesh)
        with pytest.raises(ValueError, match="`axis` 'x' is not an axis of the mesh"):
            braintrace.shard_postsynaptic(learner, mesh, axis="x")
        with pytest.raises(TypeError, match="`mesh` must be a jax.sharding.Mesh"):
            braintrace.shard_postsynaptic(learner, "model")
        with pytest.raises(TypeError, match="compile the learner first"):
            braintrace.shard_postsynaptic(braintrace.D_RTRL(RNN(mat, _rec(4), 1)), mesh)
        dense = braintrace.compile(_Dense(), "d_rtrl", x, batch_size=2)
        with pytest.raises(ValueError, match="_Dense has no sparse layer split into 1 postsynaptic blocks"):
            braintrace.shard_postsynaptic(dense, mesh)
        rtrl = braintrace.compile(RNN(mat, _rec(4), 1), "rtrl", x, batch_size=2)
        with pytest.raises(TypeError, match="must be a D_RTRL .* or pp_prop .* learner, got RTRL"):
            braintrace.shard_postsynaptic(rtrl, mesh)
        one = braintrace.compile(RNN(mat, _rec(4), 1), "pp_prop", x, batch_size=2)
        assert braintrace.shard_postsynaptic(one, mesh) is one  # a mesh of one device: one block


def _rec(n):
    return ss.CSR.fromdense(jnp.asarray(np.eye(n) * 0.5 + np.eye(n, k=1) * 0.3))


class _Dense(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = braintrace.nn.Linear(4, 4)

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, 4)))

    def update(self, x):
        self.h.value = 0.5 * self.h.value + self.lin(x)
        return self.h.value
