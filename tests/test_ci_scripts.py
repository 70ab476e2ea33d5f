"""The scripts in ``ci/`` that run without a GPU."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_compiled_memory_is_flat_online_and_grows_under_bptt(tmp_path):
    out = tmp_path / "memory.json"
    cmd = [sys.executable, "ci/compiled_memory.py", "--scale", "cpu", "--workloads", "dense"]
    cmd += ["--T", "5", "50"]
    subprocess.run([*cmd, "--json", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    temp = {(r["algorithm"], r["T"]): r["temp_bytes"] for r in rows}
    assert set(temp) == {(a, T) for a in ("bptt", "d_rtrl", "pp_prop") for T in (5, 50)}
    for algorithm in ("d_rtrl", "pp_prop"):
        assert temp[(algorithm, 5)] == temp[(algorithm, 50)]
    assert temp[("bptt", 50)] > temp[("bptt", 5)]
