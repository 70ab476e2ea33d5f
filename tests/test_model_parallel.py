"""Model-parallel online learning on 8 host CPU devices (a subprocess: the device count must be set
before jax starts). ``tests/_model_parallel_check.py`` partitions a recurrent LIF network's sparse
layers into postsynaptic blocks, places the learner with ``braintrace.shard_postsynaptic`` on 1, 2,
4 and 8 devices, and reports the gradients' difference to the unpartitioned network, where the
traces and hidden states live, the bytes per device and the all-gathers of the compiled step."""

import pytest

from tests._host_devices import run_on_host_devices


@pytest.fixture(scope="module")
def rows():
    out = run_on_host_devices("tests._model_parallel_check", "devices=2,4,8")
    cases = [("xla", a, n) for a in ("d_rtrl", "pp_prop") for n in (1, 2, 4, 8)] + [("pallas", "d_rtrl", 8)]
    assert [(r["backend"], r["algorithm"], r["devices"]) for r in out] == cases
    return out


def test_gradients_equal_the_unpartitioned_network(rows):
    for row in rows:
        assert row["rel_err"] < 1e-6, row


def test_traces_and_hidden_states_stay_sharded(rows):
    """After ``etrace_grad``, and in the compile-time snapshot it restores from; traces zeroed by
    ``reset_state`` keep their placement."""
    for row in rows:
        assert row["traces_sharded"] and row["hidden_sharded"], row
        assert row["snapshot_sharded"] and row["reset_traces_sharded"], row


def test_synapse_and_trace_bytes_per_device_fall_as_one_over_p(rows):
    one = {r["algorithm"]: r for r in rows if r["devices"] == 1}
    assert len(one) == 2
    for row in rows:
        p, base = row["devices"], one[row["algorithm"]]
        padding = row["nnz_stored"] / row["nnz_unpadded"]  # the blocks' padding to equal size
        assert padding < 1.05, row
        for kind in ("trace", "synapse"):
            per_device, total = row[f"{kind}_bytes_per_device"], row[f"{kind}_bytes"]
            assert per_device * p == total, row  # every device holds one block
            assert per_device <= base[f"{kind}_bytes"] / p * padding, row


def test_all_gathers_per_step(rows):
    """One all-gather per step, of the spikes (for the product and the trace update under D_RTRL; for
    the product and the replicated input trace under pp_prop); none outside the loop, and the same
    count at both sequence lengths."""
    largest = [r for r in rows if r["devices"] == 8]
    assert len(largest) == 3
    for row in largest:
        per_step = 1
        lengths = ("3",) if row["backend"] == "pallas" else ("3", "6")
        assert row["loop_all_gathers"] == dict.fromkeys(lengths, per_step), row
        assert row["all_gathers"] == row["loop_all_gathers"], row


def test_pallas_backend_keeps_the_blocked_form(rows):
    """Under ``'pallas'`` a blocked layer lowers to its XLA implementation: no kernel call (which
    XLA would run on gathered operands), the same placement and gradients (checked above)."""
    (row,) = [r for r in rows if r["backend"] == "pallas"]
    assert row["custom_calls"] == {"3": 0}, row
