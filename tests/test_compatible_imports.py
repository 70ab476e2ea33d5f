"""The version-sensitive helpers of ``braintrace._compatible_imports`` against JAX's own evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from braintrace._compatible_imports import consts_of, jaxpr_of, scan_operand_counts


def _scan_eqn(fn, *args):
    closed = jax.make_jaxpr(fn)(*args)
    [eqn] = [e for e in jaxpr_of(closed).eqns if e.primitive.name == "scan"]
    return closed, eqn


def _run_scan_by_hand(eqn, env):
    """The scan equation evaluated step by step from its operand split: the body on
    ``consts, carry, xs[i]``, its outputs split into ``carry, ys``."""
    p = eqn.params
    n_c, n_carry = scan_operand_counts(p)
    invals = [env[v] if not hasattr(v, "val") else v.val for v in eqn.invars]
    consts, carry, xs = invals[:n_c], invals[n_c : n_c + n_carry], invals[n_c + n_carry :]
    body = p["jaxpr"]
    ys = []
    for i in range(int(p["length"])):
        outs = jax.core.eval_jaxpr(jaxpr_of(body), consts_of(body), *consts, *carry, *[x[i] for x in xs])
        carry, y = outs[:n_carry], outs[n_carry:]
        ys.append(y)
    return [*carry, *[jnp.stack(col) for col in zip(*ys)]]


@pytest.mark.parametrize("passthrough", [False, True], ids=["all-carried", "one-carry-unchanged"])
def test_scan_operand_counts_split_the_operands_as_jax_does(passthrough):
    k = jnp.linspace(0.5, 1.5, 3)

    def fn(c, xs):
        def body(c, x):
            a, b = c
            new_b = b if passthrough else b + x.sum()
            return (jnp.tanh(a * k + x), new_b), a.sum() * b

        return jax.lax.scan(body, c, xs)

    c = (jnp.ones(3), jnp.float32(2.0))
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    closed, eqn = _scan_eqn(fn, c, xs)
    n_c, n_carry = scan_operand_counts(eqn.params)
    assert n_c + n_carry <= len(eqn.invars)
    assert len(eqn.outvars) - n_carry >= 1  # the ys
    jaxpr = jaxpr_of(closed)
    env = dict(zip(jaxpr.constvars, consts_of(closed)))
    env.update(zip(jaxpr.invars, [*c, xs]))
    by_hand = _run_scan_by_hand(eqn, env)
    by_jax = eqn.primitive.bind(*[env[v] for v in eqn.invars], **eqn.params)
    assert len(by_hand) == len(by_jax)
    for h, j in zip(by_hand, by_jax):
        np.testing.assert_allclose(np.asarray(h), np.asarray(j), rtol=1e-6)
