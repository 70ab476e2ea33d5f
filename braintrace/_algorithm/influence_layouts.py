r"""The two trace layouts of the influence-matrix engine (see :mod:`.influence` for the math).

* :class:`DenseInfluence`: ``M`` itself, ``(R, N, P)``, updated with the step's ``J`` and ``I``
  (and SnAp's mask);
* :class:`CompressedInfluence`: SnAp's ``M`` at its mask's entries only, ``(R, P, k)`` for ``k`` the
  most entries a column of the mask keeps;
* :class:`RankOneProjection`: UORO's ``h̃`` ``(R, N)``, ``θ̃`` ``(R, P)`` and the key of its sign
  stream, updated with one forward-mode product ``J h̃`` and one reverse-mode product ``νᵀ I`` per row.

Each has ``init() -> traces``, ``restart(traces, kept (R, N)) -> traces``,
``update(traces, step) -> traces`` and ``solve(traces, ∂L/∂h (R, N)) -> ∂L/∂θ (P,)``.
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from .executor import StepValues
from .influence_step import InfluenceGraphExecutor

__all__ = ["DenseInfluence", "CompressedInfluence", "RankOneProjection"]


class DenseInfluence:
    """``M`` ``(R, N, P)``: ``M_t = mask ⊙ (J_t M_{t-1} + I_t)`` (no mask under the full scope)."""

    def __init__(self, executor: InfluenceGraphExecutor, mask, store_dtype):
        self.ex, self.store_dtype = executor, store_dtype
        self.mask = None if mask is None else jnp.asarray(mask, executor.dtype)

    def init(self) -> Dict:
        ex = self.ex
        return {"influence": jnp.zeros((ex.rows, ex.num_hidden, ex.num_theta), self.store_dtype)}

    def restart(self, traces, kept) -> Dict:
        m = traces["influence"]
        return {"influence": m * kept[..., None].astype(m.dtype)}

    def update(self, traces, step: StepValues) -> Dict:
        jac, imm = self.ex.jacobians(step)
        m = jnp.einsum("rij,rjp->rip", jac, traces["influence"].astype(jac.dtype)) + imm
        if self.mask is not None:
            m = m * self.mask
        return {"influence": m.astype(self.store_dtype)}

    def solve(self, traces, cts) -> jax.Array:
        m = traces["influence"].astype(self.ex.dtype)
        return jnp.einsum("ri,rip->p", cts.astype(m.dtype), m)


class CompressedInfluence:
    """SnAp's ``M`` stored at its mask's entries only: column ``j`` of ``M`` lives on the ``k_j``
    hidden elements ``index[j, :k_j]`` of the mask's column (``k = max k_j``, shorter columns padded
    and kept at zero), ``(R, P, k)`` values. Since ``M[:, j]`` is zero off those elements, the kept
    entries follow ``M[i, j] ← Σ_{l ∈ index[j]} J[i, l] M[l, j] + I[i, j]`` exactly: ``J`` is gathered
    per column, ``(R, P, k, k)``, and ``I`` is read at the kept entries only, ``(R, P, k)``."""

    def __init__(self, executor: InfluenceGraphExecutor, mask: np.ndarray, store_dtype):
        self.ex, self.store_dtype = executor, store_dtype
        counts = mask.sum(axis=0)
        self.k = max(1, int(counts.max()))
        index = np.zeros((mask.shape[1], self.k), np.int32)
        valid = np.zeros((mask.shape[1], self.k), bool)
        for j in range(mask.shape[1]):
            rows = np.flatnonzero(mask[:, j])
            index[j, : len(rows)], valid[j, : len(rows)] = rows, True
        self.index, self.valid = index, valid

    def init(self) -> Dict:
        ex = self.ex
        return {"influence": jnp.zeros((ex.rows, ex.num_theta, self.k), self.store_dtype)}

    def restart(self, traces, kept) -> Dict:
        m = traces["influence"]
        return {"influence": m * kept[:, self.index].astype(m.dtype)}

    def update(self, traces, step: StepValues) -> Dict:
        jac, imm = self.ex.jacobian_and_columns(step, self.index)
        sub = jac[:, self.index[:, :, None], self.index[:, None, :]]  # (R, P, k, k)
        m = jnp.einsum("rjab,rjb->rja", sub, traces["influence"].astype(jac.dtype)) + imm
        return {"influence": (m * self.valid).astype(self.store_dtype)}

    def solve(self, traces, cts) -> jax.Array:
        m = traces["influence"].astype(self.ex.dtype)
        return jnp.einsum("rja,rja->j", cts.astype(m.dtype)[:, self.index], m)


class RankOneProjection:
    """Per row, ``M ≈ h̃ θ̃ᵀ`` with ``h̃`` ``(R, N)``, ``θ̃`` ``(R, P)`` and the key (see the module
    docstring)."""

    def __init__(self, executor: InfluenceGraphExecutor, seed_state, eps: float, store_dtype):
        self.ex, self.seed_state, self.eps, self.store_dtype = executor, seed_state, eps, store_dtype

    def init(self) -> Dict:
        ex = self.ex
        return {
            "h_tilde": jnp.zeros((ex.rows, ex.num_hidden), self.store_dtype),
            "theta_tilde": jnp.zeros((ex.rows, ex.num_theta), self.store_dtype),
            "key": self.seed_state.value,  # a state: a compiled loop's reset reads the current seed
        }

    def restart(self, traces, kept) -> Dict:
        h = traces["h_tilde"]
        row = jnp.any(kept != 0, axis=1, keepdims=True)  # a row with no element kept starts anew
        return {
            "h_tilde": h * kept.astype(h.dtype),
            "theta_tilde": traces["theta_tilde"] * row.astype(h.dtype),
            "key": traces["key"],
        }

    def update(self, traces, step: StepValues) -> Dict:
        ex, eps, dt = self.ex, self.eps, self.ex.dtype
        key, sub = jax.random.split(jax.random.wrap_key_data(traces["key"]))
        nu = jax.random.rademacher(sub, (ex.rows, ex.num_hidden), dt)
        h, th = traces["h_tilde"].astype(dt), traces["theta_tilde"].astype(dt)
        jh = ex.jvp_hidden(step, h)
        proj = ex.vjp_theta_rows(step, nu)
        norm = lambda a: jnp.linalg.norm(a, axis=1, keepdims=True)
        rho0 = jnp.sqrt((norm(th) + eps) / (norm(jh) + eps))
        rho1 = jnp.sqrt((norm(proj) + eps) / (norm(nu) + eps))
        return {
            "h_tilde": (rho0 * jh + rho1 * nu).astype(self.store_dtype),
            "theta_tilde": (th / rho0 + proj / rho1).astype(self.store_dtype),
            "key": jax.random.key_data(key),
        }

    def solve(self, traces, cts) -> jax.Array:
        dt = self.ex.dtype
        h, th = traces["h_tilde"].astype(dt), traces["theta_tilde"].astype(dt)
        return jnp.einsum("r,rp->p", jnp.sum(cts.astype(dt) * h, axis=1), th)
