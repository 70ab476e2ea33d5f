"""The comparison harness's optimizer (``benchmarks/_algorithm_tasks.py``): its Adam step equals
``optax.adam`` step for step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import _algorithm_tasks as A


def test_adam_update_equals_optax_adam():
    optax = pytest.importorskip("optax")  # the `examples` extra
    rng = np.random.default_rng(0)
    values = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.zeros(4, jnp.float32)}
    ours, state = values, A.adam_init(values)
    theirs, opt = values, optax.adam(1e-2)
    opt_state = opt.init(values)
    for _ in range(5):
        grads = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), v.dtype), values)
        ours, state = A.adam_update(grads, state, ours, 1e-2)
        updates, opt_state = opt.update(grads, opt_state, theirs)
        theirs = optax.apply_updates(theirs, updates)
    for k in values:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, atol=1e-7)
    assert not np.allclose(ours["w"], values["w"])  # the parameters moved
