"""Run a check module in a fresh Python process on simulated host CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count`` must be set before JAX starts, so the
multi-device checks run as ``python -m <module> <args>`` in a subprocess and print one JSON object
per line.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_on_host_devices(module: str, *args: str, devices: int = 8, timeout: float = 600) -> list:
    """The JSON lines printed by ``python -m module *args`` on ``devices`` host CPU devices (the
    process must exit with status 0; its stderr tail is the failure message otherwise)."""
    flags = f"--xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
