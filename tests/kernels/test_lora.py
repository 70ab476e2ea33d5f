"""LoRA trace operations (built on the dense kernels) against their references; GPU twins."""

from __future__ import annotations

import braintrace_kernels as bk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ._util import assert_close, normals, require_gpu

# The same (B, I, O) and blocks as test_dense.py, so the E-trace launches reuse its compilations.
SMALL = bk.DenseBlockSizes(block_i=16, block_o=8, block_b=2, min_programs=1)
I, O, R = 37, 29, 5
ALPHA = 0.75


def _operands(B, n, seed=0):
    E, TA, x, z, df, ct, A = normals(
        seed, (B, I, O, n), (B, R, O, n), (B, I), (B, R), (B, O, n), (B, O, n), (R, O)
    )
    (d,) = normals(seed + 1, (B, O, n, n), scale=0.5)
    return tuple(jnp.asarray(a) for a in (E, TA, d, x, z, df, ct, A))


def _check_update_solve(B, n, *, block_sizes, interpret):
    E, TA, d, x, z, df, ct, A = _operands(B, n)
    refs = bk.lora_trace_update_solve_reference(E, TA, d, x, z, df, ct, A, ALPHA)
    got = bk.lora_trace_update_solve(
        E, TA, d, x, z, df, ct, A, ALPHA, block_sizes=block_sizes, interpret=interpret
    )
    assert got[2].shape == (I, R) and got[3].shape == (R, O)
    for g, r, what in zip(got, refs, ["E_new", "TA_new", "dB", "dA"]):
        assert_close(g, r, what=f"update_solve: {what}")


def _check_update_and_solve(B, n, *, block_sizes, interpret):
    E, TA, d, x, z, df, ct, A = _operands(B, n)
    kw = dict(block_sizes=block_sizes, interpret=interpret)
    for g, r, what in zip(
        bk.lora_trace_update(E, TA, d, x, z, df, ALPHA, **kw),
        bk.lora_trace_update_reference(E, TA, d, x, z, df, ALPHA),
        ["E_new", "TA_new"],
    ):
        assert_close(g, r, what=f"update: {what}")
    for g, r, what in zip(
        bk.lora_trace_solve(E, TA, ct, A, ALPHA, **kw),
        bk.lora_trace_solve_reference(E, TA, ct, A, ALPHA),
        ["dB", "dA"],
    ):
        assert_close(g, r, what=f"solve: {what}")


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("B", [3, 1], ids=["batched", "B1"])
def test_update_solve_matches_reference(B, n):
    _check_update_solve(B, n, block_sizes=SMALL, interpret=True)


# lora_trace_update / lora_trace_solve launch the same dense kernels on E and TA (tested for every n
# and batch size in test_dense.py); here two configurations check the composition, to keep the
# interpret-mode compile time of the suite down.
@pytest.mark.parametrize("B, n", [(3, 2), (1, 3)], ids=["batched-2", "B1-3"])
def test_update_and_solve_match_reference(B, n):
    _check_update_and_solve(B, n, block_sizes=SMALL, interpret=True)


def test_reference_equals_gradient_of_one_step():
    """From zero traces, one update then the solve gives d/dB and d/dA of the linearised step.

    ``L = sum_{b,o,s} ct[b,o,s] df[b,o,s] y[b,o]`` with ``y = alpha x B A`` is what the hidden states
    see through ``df`` in one step; its gradient is the exact one the traces must reproduce.
    """
    B, n = 3, 2
    _, _, d, x, _, df, ct, A = _operands(B, n)
    (Bmat,) = (jnp.asarray(a) for a in normals(9, (I, R)))
    z = x @ Bmat

    def loss(Bmat, A):
        y = ALPHA * (x @ Bmat) @ A
        return jnp.sum(ct * df * y[:, :, None])

    want_dB, want_dA = jax.grad(loss, argnums=(0, 1))(Bmat, A)
    zeros_E, zeros_TA = jnp.zeros((B, I, O, n)), jnp.zeros((B, R, O, n))
    *_, dB, dA = bk.lora_trace_update_solve_reference(zeros_E, zeros_TA, d, x, z, df, ct, A, ALPHA)
    assert_close(dB, want_dB, tol=1e-5, what="dB vs jax.grad")
    assert_close(dA, want_dA, tol=1e-5, what="dA vs jax.grad")


def test_reference_against_explicit_B_trace():
    """dB from the kept E equals the solve of the explicit exact trace eps_B = alpha A[r,k] E[i,k]."""
    B, n = 3, 2
    E, TA, _, _, _, _, ct, A = (np.asarray(a, np.float64) for a in _operands(B, n))
    eps_B = ALPHA * A[None, None, :, :, None] * E[:, :, None, :, :]  # (B, I, r, O, n)
    want_dB = np.einsum("birks,bks->ir", eps_B, ct)
    want_dA = np.einsum("brks,bks->rk", TA, ct)
    dB, dA = bk.lora_trace_solve_reference(*(jnp.asarray(a, jnp.float32) for a in (E, TA, ct, A)), ALPHA)
    assert_close(dB, want_dB, what="dB")
    assert_close(dA, want_dA, what="dA")


def test_shapes_checked():
    E, TA, d, x, z, df, ct, A = _operands(3, 2)
    with pytest.raises(ValueError, match="^TA has shape"):
        bk.lora_trace_update(E, TA[:, :, 1:], d, x, z, df, ALPHA, interpret=True)
    with pytest.raises(ValueError, match="^z has shape"):
        bk.lora_trace_update(E, TA, d, x, z[:, 1:], df, ALPHA, interpret=True)
    with pytest.raises(ValueError, match="^A has shape"):
        bk.lora_trace_solve(E, TA, ct, A.T, ALPHA, interpret=True)
    with pytest.raises(ValueError, match="^x has shape"):
        bk.lora_trace_update(E, TA, d, x[:, 1:], z, df, ALPHA, interpret=True)
    with pytest.raises(ValueError, match="block_o"):
        bk.lora_trace_solve(E, TA, ct, A, ALPHA, block_sizes=bk.DenseBlockSizes(block_o=100), interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("B", [3, 1], ids=["batched", "B1"])
def test_kernels_match_reference_gpu(B, n):
    require_gpu()
    for block_sizes in (SMALL, None):
        _check_update_solve(B, n, block_sizes=block_sizes, interpret=False)
        _check_update_and_solve(B, n, block_sizes=block_sizes, interpret=False)
