"""``etrace_grad`` looks for a restart of the traces once, before its scan: nothing but the steps
writes the states inside the loop. Where the driver resets rows itself (``resets=``), each step
looks. The restart itself (states set by hand between two calls) against the oracles."""

from __future__ import annotations

import brainstate
import jax.numpy as jnp
import numpy as np
import online_models as om
import pytest

import braintrace
from braintrace._compatible_imports import Literal, jaxpr_of
from braintrace._compiler.jaxpr_tools import sub_jaxprs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 6
ALGORITHMS = {"d_rtrl": {}, "pp_prop": {"decay_or_rank": 0.8}}


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with om.float64():
        yield


def _count(jaxpr, name, into_scans=True):
    """Equations of primitive ``name`` on values (not only on constants) in ``jaxpr`` and the
    jaxprs nested in it (scans' bodies only with ``into_scans``)."""
    n = 0
    for eqn in jaxpr_of(jaxpr).eqns:
        n += eqn.primitive.name == name and not all(isinstance(v, Literal) for v in eqn.invars)
        if into_scans or eqn.primitive.name != "scan":
            n += sum(_count(sub, name, into_scans) for sub in sub_jaxprs(eqn))
    return n


def _scan_bodies(jaxpr):
    """The outermost ``scan`` equations' bodies, looking through calls."""
    found = []
    for eqn in jaxpr_of(jaxpr).eqns:
        if eqn.primitive.name == "scan":
            found.append(eqn.params["jaxpr"])
        else:
            for sub in sub_jaxprs(eqn):
                found.extend(_scan_bodies(sub))
    return found


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_the_restart_check_leaves_the_scan_unless_the_driver_resets_rows(name):
    """The check compares each hidden value with the one last written (``!=``, and ``isnan``, itself
    a ``!=``): before the loop once; inside it only with ``resets=``."""
    spec = om.two_state(batch=3)
    xs, ys = om.make_data(spec, STEPS)
    learner = braintrace.compile(om.build_module(spec), name, xs[0], **ALGORITHMS[name])
    n_hidden = len(learner._hidden_leaf_ids)
    resets = jnp.zeros((STEPS, spec.batch), bool)

    def jaxpr(**kw):
        run = lambda xs, ys: learner.etrace_grad(xs, ys, step_fn=om.loss_fn, **kw)
        return brainstate.transform.make_jaxpr(run)(xs, ys)[0]

    once, each = jaxpr(), jaxpr(resets=resets)
    (body,) = _scan_bodies(once)
    (body_each,) = _scan_bodies(each)
    assert n_hidden >= 2
    assert _count(body, "ne") == 0
    assert _count(once, "ne", into_scans=False) >= 2 * n_hidden  # the check, before the scan
    assert _count(body_each, "ne") >= 2 * n_hidden


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_states_set_by_hand_between_calls_restart_the_traces(name):
    """After a run, the hidden states set back to their initial values by hand: the next call with
    ``reset=False`` starts the traces anew (the oracles from the initial states), also where the
    loop is a scan of blocks (``solve_every``)."""
    spec = om.dense_rnn(batch=3)
    xs, ys = om.make_data(spec, STEPS)
    module = om.build_module(spec)
    learner = braintrace.compile(module, name, xs[0], **ALGORITHMS[name])
    if name == "d_rtrl":
        want = om.masked_rtrl(spec, xs, ys)
    else:
        want = om.pp_prop_oracle(spec, xs, ys, ALGORITHMS[name]["decay_or_rank"])
    want = {k: v.sum(0) for k, v in want.items()}
    for solve_every in (1, 3) if name == "pp_prop" else (1,):
        rng = np.random.default_rng(solve_every)
        learner.etrace_grad(xs + jnp.asarray(rng.normal(size=xs.shape)), ys, step_fn=om.loss_fn)
        for key, value in spec.init_hidden().items():
            getattr(module, key).value = value
        got = learner.etrace_grad(xs, ys, step_fn=om.loss_fn, reset=False, solve_every=solve_every)
        om.assert_grads_close({om._name(k): v for k, v in got.items()}, want, tol=1e-10, what=name)
