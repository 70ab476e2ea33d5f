"""Smoke tests of the scripts in ``examples/`` at their tiny sizes.

Each script runs as a subprocess (``sys.executable``, working directory a temporary folder) with a
timeout; the test checks its exit status, the line it prints with the loss or the accuracy, and the
figure the SNN demo writes. The runs are started together, two at a time (the CI machine has two
cores), when the first test of this module asks for one; each test then waits for its own.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT_S = 240  # per script; each takes about 10 s alone on a 2-core CPU

# name -> arguments after the script path ("{tmp}" is the run's own temporary folder)
SNN_TINY = ["snn_online.py", "--tiny", "--out", "{tmp}/snn_online.png"]
RUNS = {
    "snn_pp_prop": SNN_TINY,
    "snn_d_rtrl": [*SNN_TINY, "--steps", "3", "--algorithm", "d_rtrl"],
    "snn_bptt": [*SNN_TINY, "--steps", "3", "--algorithm", "bptt"],
    "gru_copy_task": ["gru_copy_task.py", "--tiny"],
    "custom_primitive": ["custom_primitive.py", "--tiny"],
    "lora_rnn": ["lora_rnn.py", "--tiny"],
    "lora_rnn_pp_prop": ["lora_rnn.py", "--tiny", "--algorithm", "pp_prop"],
    "quickstart": ["quickstart.py"],
}

pytestmark = pytest.mark.filterwarnings("ignore")

for _module in ("optax", "tqdm", "matplotlib"):  # the `examples` extra; .ci/run installs it
    pytest.importorskip(
        _module, reason="the examples need the `examples` extra: pip install -e '.[examples]'"
    )


def _run(args, tmp: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(EXAMPLES / args[0]), *(a.replace("{tmp}", str(tmp)) for a in args[1:])]
    env = {**os.environ, "MPLBACKEND": "Agg", "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    try:
        return subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(argv)} ran past {TIMEOUT_S} s:\n{err.stdout}\n{err.stderr}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{name: (future of the CompletedProcess, tmp folder)}``, all started at once, two at a time."""
    pool = ThreadPoolExecutor(max_workers=2)
    started = {}
    for name, args in RUNS.items():
        tmp = tmp_path_factory.mktemp(name)
        started[name] = (pool.submit(_run, args, tmp), tmp)
    yield started
    pool.shutdown(wait=True, cancel_futures=True)


def finished(runs, name):
    """The run's stdout, after checking that it exited with status 0."""
    future, tmp = runs[name]
    proc = future.result()
    assert proc.returncode == 0, f"{RUNS[name]} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout, tmp


def number(pattern, text):
    match = re.search(pattern, text)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return float(match.group(1))


@pytest.mark.parametrize("name", ["snn_pp_prop", "snn_d_rtrl", "snn_bptt"])
def test_snn_online(runs, name):
    out, tmp = finished(runs, name)
    assert "Poisson inputs ->" in out
    accuracy = number(r"held-out accuracy (\d+\.\d+)", out)
    assert 0.0 <= accuracy <= 1.0
    assert math.isfinite(number(r"final: loss (\S+),", out))
    png = Path(re.search(r"saved figure to (\S+)", out).group(1))
    assert png.parent == tmp and png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_gru_copy_task(runs):
    out, _ = finished(runs, "gru_copy_task")
    line = re.search(r"final loss: D_RTRL (\S+), BPTT (\S+) \(chance (\S+)\);", out)
    assert line, out
    online, bptt, chance = (float(v) for v in line.groups())
    assert math.isfinite(online) and math.isfinite(bptt)
    assert chance == pytest.approx(math.log(4), abs=1e-4)
    assert 0.0 <= number(r"recall accuracy: D_RTRL (\d\.\d+)", out) <= 1.0


def test_custom_primitive(runs):
    out, _ = finished(runs, "custom_primitive")
    # the rules are right: the online gradient is BPTT's (float32); a scale in yw_to_w compounds
    assert number(r"etp_scaled_mm\s+relative error to BPTT (\S+)", out) < 1e-4
    assert number(r"etp_scaled_mm_compounding\s+relative error to BPTT (\S+)", out) > 1e-2
    assert number(r"== xy_to_dw\(x, v \* g\): error (\S+)", out) < 1e-5
    first = number(r"first iteration (\S+)\)", out)
    assert number(r"final: loss (\S+) ", out) < 0.5 * first


@pytest.mark.parametrize("name", ["lora_rnn", "lora_rnn_pp_prop"])
def test_lora_rnn(runs, name):
    out, _ = finished(runs, name)
    assert "relation etp_lora_mm ['lora_a', 'lora_b']" in out
    final, first = number(r"final: loss (\S+) ", out), number(r"first iteration (\S+),", out)
    assert final < first


def test_quickstart(runs):
    out, _ = finished(runs, "quickstart")
    assert "matches plain JAX: False" not in out
    assert out.count("matches plain JAX: True") >= 5
    assert out.rstrip().endswith("Done.")
