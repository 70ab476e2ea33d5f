"""Data-parallel online learning on 8 host CPU devices (a subprocess: the device count must be set
before jax starts). ``tests/_sharded_check.py`` runs ``etrace_grad`` on batch-sharded sequences
and reports the gradients' difference to one device, where the learner's traces and hidden states
live, the traces' bytes per device and the collectives of the compiled program."""

import pytest

from tests._host_devices import run_on_host_devices


def _run(cases: str, backend: str = "xla"):
    return run_on_host_devices("tests._sharded_check", f"cases={cases}", f"backend={backend}", timeout=900)


@pytest.fixture(scope="module")
def xla_rows():
    cases = ";".join(
        ["dense:d_rtrl:2,4,8", "dense:pp_prop:2,4,8"]
        + [f"{w}:{a}:8" for w in ("csr", "lora", "snn") for a in ("d_rtrl", "pp_prop")]
    )
    return _run(cases)


def test_batch_sharded_gradients_equal_one_device(xla_rows):
    assert len(xla_rows) == 12
    for row in xla_rows:
        assert row["rel_err"] < 1e-6, row
        assert row["traces_batch_sharded"] and row["hidden_batch_sharded"], row


def test_trace_bytes_per_device_fall_as_one_over_p(xla_rows):
    for row in xla_rows:
        per_device = row["trace_bytes_per_device"] * row["devices"]
        assert per_device == pytest.approx(row["trace_bytes"], rel=0.05), row


def test_collectives_do_not_grow_with_the_sequence(xla_rows):
    for row in (r for r in xla_rows if r["all_reduce"]):
        counts = set(row["all_reduce"].values())
        assert len(counts) == 1 and 1 <= counts.pop() <= 2, row  # the gradients' batch sum, in the loop
        assert set(row["all_gather"].values()) == {0}, row  # no trace or state is gathered
