#!/usr/bin/env python3
"""The GPU host's whole check in one command, each part with its own time budget (run it through
``bash ci/gpu_check.sh``, which installs the carried wheels first).

Parts, in order (each in a process of its own, so a crash or a hang costs only its own budget):

1. ``tests``: ``pytest tests -m gpu`` (junit XML: passed / failed / skipped counts);
2. ``bench``: the benchmark suite with ``--gpu`` (``benchmarks/bench_online.py`` first, then the
   kernels; ``BENCH_BUDGET_S`` set to the part's budget, so benchmarks that would start after it are
   skipped and listed), without its memory rows (part 3 has them);
3. ``measure`` (``--part measure``), in this order: the 140,000-neuron, 50-million-synapse LIF
   network under pp_prop at batch 1 (steps per second; goal at least 1,000), with
   ``solve_every=32`` and ``'xla'`` beside it; the compiled temporary memory of BPTT, D_RTRL and
   pp_prop at ``T`` = 1,000 and 10,000 (``ci/compiled_memory.py``); the bytes one step of each
   end-to-end row of part 2 must move (read from its compiled program's HLO, ``ci/gpu_program.py``)
   against the roofline measured in the same run;
4. ``published``: ``ci/compare_published_timing.py --scale gpu`` when the published package is
   available (``PUBLISHED_PYTHON``, and ``PUBLISHED_PYTHONPATH`` for carried wheels), else skipped;
5. ``render``: ``$OUT/performance.md`` (a copy of ``docs/performance.md`` with every results block
   replaced) and its plots.

Writes ``$OUT/gpu_check.json`` (every part's status, seconds, budget, outputs, and the figures of
part 3), ``$OUT/gpu_check.log`` (what ran, when, and why a part was skipped) and one log per part.
The whole run is planned for 9 minutes: a part starts only if its minimum fits in what is left, and
runs for at most its budget or what is left. ``--smoke`` runs the same parts at tiny sizes on a CPU
(Pallas in interpret mode) in well under a minute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

#: Per part: (budget in seconds, the least it needs to be worth starting), and the whole run's budget.
PLAN = {
    "gpu": {
        # the gpu-marked tests took 132 s on the H100 (2026-11-23)
        "total_s": 540,
        "tests": (150, 60),
        "bench": (160, 60),
        "measure": (150, 40),
        "published": (60, 40),
    },
    "smoke": {
        # about 20 s on an idle 2-core CPU; the budgets leave room for a machine loaded by other tests
        "total_s": 420,
        "tests": (60, 5),
        "bench": (180, 10),
        "measure": (120, 10),
        "published": (60, 10),
    },
}
#: Seconds kept for rendering at the end.
RENDER_RESERVE_S = 10

BENCH_FILES = ["bench_online.py", "bench_dense.py", "bench_csr.py", "bench_lora.py"]
#: The smoke run's benchmarks: one end-to-end row (part 3 then measures the roofline itself).
SMOKE_BENCH_K = "test_online_step and dense-d_rtrl-xla"
SMOKE_TESTS = ["tests/gpu"]


class Log:
    def __init__(self, path, start):
        self.path, self.start = path, start

    def __call__(self, text):
        line = f"[{time.monotonic() - self.start:7.1f} s] {text}"
        print(line, flush=True)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")


def run_part(name, cmd, *, out, log, timeout, env=None):
    """Run ``cmd`` with its output in ``out/<name>.log``; ``(status, seconds, returncode)``."""
    part_log = out / f"{name}.log"
    start = time.monotonic()
    log(f"{name}: start (at most {timeout:.0f} s): {' '.join(cmd)}")
    with open(part_log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=timeout)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code, status = None, "timeout"
    seconds = time.monotonic() - start
    log(f"{name}: {status} after {seconds:.1f} s" + (f" (exit status {code})" if status == "failed" else ""))
    if status != "ok":
        tail = part_log.read_text()[-1500:]
        log(f"{name}: last output:\n" + "\n".join("    " + line for line in tail.splitlines()[-15:]))
    return status, seconds, code


def junit_counts(path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


# --------------------------------------------------------------------------------------------------
# Part 3: measured in one process (jax imported here only)
# --------------------------------------------------------------------------------------------------


def _large_snn_spec(smoke):
    from benchmarks import _models as M

    if smoke:
        return M.Spec("snn", "LIF SNN, 128 neurons, 1k synapses, B=1", 128, 1, 8, 4, syn_per_neuron=8)
    return M.Spec("snn", "LIF SNN, 140k neurons, 50M synapses, B=1", 140_000, 1, 100, 10, syn_per_neuron=357)


def measure_large_snn(smoke, deadline, log, rows) -> list:
    """Steps per second of the large spiking network under pp_prop at batch 1, both backends;
    appended to ``rows`` one configuration at a time (``log`` saves them)."""
    import jax

    import braintrace
    from benchmarks import _models as M

    s = _large_snn_spec(smoke)
    T = 4 if smoke else 200
    configs = [("pp_prop", "pallas")] + ([] if smoke else [("pp_prop_solve32", "pallas"), ("pp_prop", "xla")])
    interpret = jax.default_backend() != "gpu"  # the smoke run: Pallas kernels in interpret mode
    for algorithm, backend in configs:
        if time.monotonic() > deadline:
            rows.append({"algorithm": algorithm, "backend": backend, "status": "skipped", "reason": "budget"})
            continue
        row = {"label": s.label, "n_neurons": s.n_hid, "synapses": s.nnz, "batch": s.batch, "T": T}
        row.update(algorithm=algorithm, backend=backend)
        try:
            with braintrace.backend(backend, interpret=interpret and backend == "pallas"):
                start = time.perf_counter()
                run = M.online_fn(s, algorithm)
                xs, ys = M.make_data(s, T)
                jax.block_until_ready(run(xs, ys))
                row["build_and_compile_s"] = time.perf_counter() - start
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    jax.block_until_ready(run(xs, ys))
                    times.append(time.perf_counter() - start)
            best = min(times) / T
            row.update(status="ok", us_per_step=best * 1e6, steps_per_s=1.0 / best)
            row["goal_steps_per_s"] = 1000
            row["goal_met"] = row["steps_per_s"] >= 1000
            del run, xs, ys
        except Exception as err:  # noqa: BLE001 - recorded, the next configuration still runs
            row.update(status="error", error=f"{type(err).__name__}: {err}"[:400])
        rows.append(row)
        log(f"measure: large SNN {algorithm}/{backend}: {row.get('status')} {row.get('steps_per_s', '')}")
    return rows


def _bench_roofline(bench_json) -> float | None:
    try:
        info = json.loads(pathlib.Path(bench_json).read_text())["machine_info"]["braintrace"]
        return info["roofline_gb_per_s"] * 1e9
    except (OSError, KeyError, ValueError, TypeError):
        return None


def measure_step_bytes(bench_json, smoke, deadline, log) -> dict:
    """Bytes per step of each end-to-end row of ``bench_json``, from its compiled program, against the
    roofline of the same run."""
    import gpu_program

    import braintrace
    from benchmarks import _models as M
    from benchmarks._timing import roofline_bytes_per_s

    roofline = _bench_roofline(bench_json)
    source = "the benchmark run's roofline fixture"
    if roofline is None:
        roofline = roofline_bytes_per_s(iters=2 if smoke else 10, repeats=2 if smoke else 5)
        source = "measured here (the benchmark run has none)"
    rows = []
    try:
        benches = json.loads(pathlib.Path(bench_json).read_text()).get("benchmarks", [])
    except (OSError, ValueError):
        benches = []
    scale = "cpu" if smoke else "gpu"
    for bench in benches:
        info = bench.get("extra_info") or {}
        if info.get("kind") != "e2e":
            continue
        keys = ("workload", "label", "algorithm", "backend", "mode", "us_per_step", "batch")
        row = {k: info.get(k) for k in keys}
        if time.monotonic() > deadline:
            rows.append({**row, "status": "skipped", "reason": "budget"})
            continue
        try:
            name = next(n for n, sp in M.SPECS[scale].items() if sp.label == info.get("label"))
            s = M.spec(name, scale)
            block = M.ETRACE_GRAD_OPTIONS.get(info["algorithm"], {}).get("solve_every", 1)
            T = 4 * block if block > 1 else 4  # bytes per step do not depend on T
            interpret = info.get("mode") == "interpret"
            with braintrace.backend(info["backend"], interpret=interpret):
                text = M.compiled_program(s, info["algorithm"], T).as_text()
            launches = gpu_program.step_launches(gpu_program.parse_hlo(text), T, block)
            step_bytes = sum(r["bytes"] * r["per_step"] for r in launches)
            floor_us = step_bytes / roofline * 1e6
            row.update(status="ok", step_bytes=step_bytes, launches=sum(r["per_step"] for r in launches))
            row.update(floor_us=floor_us, pct_of_roofline=100.0 * floor_us / info["us_per_step"])
        except Exception as err:  # noqa: BLE001
            row.update(status="error", error=f"{type(err).__name__}: {err}"[:400])
        rows.append(row)
    log(f"measure: bytes per step of {sum(r['status'] == 'ok' for r in rows)} of {len(rows)} end-to-end rows")
    return {"roofline_gb_per_s": roofline / 1e9, "roofline_source": source, "rows": rows}


def measure_memory(smoke, deadline, log) -> list:
    """Compiled temporary memory of BPTT, D_RTRL and pp_prop at two sequence lengths."""
    import compiled_memory

    workloads = ("dense",) if smoke else ("dense", "csr", "lora")
    lengths = (4, 16) if smoke else (1000, 10000)
    algorithms = ("bptt", "pp_prop") if smoke else ("bptt", "d_rtrl", "pp_prop")
    rows = []
    for T in lengths:
        for workload in workloads:
            for algorithm in algorithms:
                if time.monotonic() > deadline:
                    rows.append({"workload": workload, "algorithm": algorithm, "T": T, "status": "skipped"})
                    continue
                try:
                    row = compiled_memory.compiled_memory(workload, algorithm, T, "cpu" if smoke else "gpu")
                    row["status"] = "ok"
                except Exception as err:  # noqa: BLE001
                    row = {"workload": workload, "algorithm": algorithm, "T": T, "status": "error"}
                    row["error"] = f"{type(err).__name__}: {err}"[:400]
                rows.append(row)
    log(f"measure: compiled memory of {sum(r['status'] == 'ok' for r in rows)} of {len(rows)} configurations")
    return rows


def part_measure(args) -> int:
    import warnings

    warnings.simplefilter("ignore")
    sys.path[:0] = [str(ROOT), str(HERE)]
    import jax

    out = pathlib.Path(args.out)
    log = Log(out / "gpu_check.log", time.monotonic())
    start = time.monotonic()
    end = start + args.budget_s
    result = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}

    def save():
        (out / "measure.json").write_text(json.dumps(result, indent=1) + "\n")

    def log_and_save(text):
        log(text)
        save()

    # shares of the part's budget: the large network first (the headline), then memory against T,
    # then the bytes per step of the benchmark rows (in the benchmark's order: the RNNs first)
    result["large_snn"] = []
    measure_large_snn(args.smoke, start + 0.4 * args.budget_s, log_and_save, result["large_snn"])
    result["memory"] = measure_memory(args.smoke, start + 0.7 * args.budget_s, log)
    save()
    result["step_bytes"] = measure_step_bytes(out / "bench.json", args.smoke, end - 5, log)
    save()
    return 0


# --------------------------------------------------------------------------------------------------
# The orchestrator (no jax here)
# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU (Pallas interpret mode)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_out", help="results ($OUT, ./gpu_out)")
    parser.add_argument("--skip", nargs="*", default=[], help="parts not to run")
    parser.add_argument("--total-s", type=float, help="the whole run's budget (default 540; --smoke: 420)")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--budget-s", type=float, default=60, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part == "measure":
        return part_measure(args)

    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("bench.json", "measure.json", "published.json", "gpu_check.json", "gpu_check.log"):
        (out / stale).unlink(missing_ok=True)  # never report a previous run's results
    plan = dict(PLAN["smoke" if args.smoke else "gpu"])
    plan["total_s"] = args.total_s or plan["total_s"]
    started = time.monotonic()
    deadline = started + plan["total_s"] - RENDER_RESERVE_S
    log = Log(out / "gpu_check.log", started)
    # a caller's pytest-xdist worker variables would make pytest-benchmark time nothing in the parts
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env["PYTHONUNBUFFERED"] = "1"
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    summary = {
        "meta": {
            "mode": "smoke" if args.smoke else "gpu",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": f"{platform.node()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
            "command": "bash ci/gpu_check.sh" + (" --smoke" if args.smoke else ""),
            "total_budget_s": plan["total_s"],
        },
        "parts": {},
    }
    log(f"gpu check ({summary['meta']['mode']}): results in {out}, {plan['total_s']} s in all")

    def save():
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")

    def start_part(name):
        """``timeout`` for the part, or None (recorded as skipped) if it does not fit."""
        budget, least = plan[name]
        left = deadline - time.monotonic()
        if name in args.skip:
            reason = "skipped on request (--skip)"
        elif left < least:
            reason = (
                f"the run's budget is spent: {max(left, 0):.0f} s left, the part needs at least {least} s"
            )
        else:
            return min(budget, left)
        summary["parts"][name] = {"status": "skipped", "reason": reason, "seconds": 0, "budget_s": budget}
        log(f"{name}: skipped: {reason}")
        save()
        return None

    def finish(name, status, seconds, timeout, **extra):
        summary["parts"][name] = {"status": status, "seconds": round(seconds, 1), "budget_s": round(timeout)}
        summary["parts"][name].update(extra)
        save()

    py = sys.executable
    # 1. the gpu-marked tests
    timeout = start_part("tests")
    if timeout:
        xml = out / "gpu-tests.xml"
        paths = SMOKE_TESTS if args.smoke else ["tests"]
        cmd = [py, "-m", "pytest", *paths, "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}"]
        status, seconds, code = run_part("tests", cmd, out=out, log=log, timeout=timeout, env=env)
        counts = junit_counts(xml) if xml.exists() else {}
        if status == "failed" and code == 5:  # pytest: nothing collected (no gpu-marked test selected)
            status = "ok"
        finish("tests", status, seconds, timeout, counts=counts, outputs=["gpu-tests.xml", "tests.log"])

    # 2. the benchmark suite
    timeout = start_part("bench")
    if timeout:
        cmd = [py, "-m", "pytest", *(f"benchmarks/{f}" for f in BENCH_FILES), "-q", "-p", "no:cacheprovider"]
        cmd += [f"--benchmark-json={out / 'bench.json'}"]
        cmd += ["-k", SMOKE_BENCH_K] if args.smoke else ["--gpu", "-k", "not memory"]
        bench_env = {**env, "BENCH_BUDGET_S": str(max(timeout - 45, 20))}  # room to finish the last one
        status, seconds, _ = run_part("bench", cmd, out=out, log=log, timeout=timeout, env=bench_env)
        finish("bench", status, seconds, timeout, outputs=["bench.json", "bench.log"])

    # 3. the large network, bytes per step against the roofline, memory against T
    timeout = start_part("measure")
    if timeout:
        cmd = [py, str(HERE / "gpu_check.py"), "--part", "measure", "--out", str(out)]
        cmd += ["--budget-s", str(timeout - 5)] + (["--smoke"] if args.smoke else [])
        status, seconds, _ = run_part("measure", cmd, out=out, log=log, timeout=timeout, env=env)
        path = out / "measure.json"
        measured = json.loads(path.read_text()) if path.exists() else {}
        summary.update({k: measured[k] for k in ("large_snn", "step_bytes", "memory") if k in measured})
        finish("measure", status, seconds, timeout, outputs=["measure.json", "measure.log"])

    # 4. this package against the published one
    published = env.get("PUBLISHED_PYTHON")
    if not published and "published" not in args.skip:
        reason = (
            "no published package: set PUBLISHED_PYTHON (gpu_check.sh does when .whl/published holds wheels)"
        )
        summary["parts"]["published"] = {"status": "skipped", "reason": reason, "seconds": 0}
        log(f"published: skipped: {reason}")
        save()
    else:
        timeout = start_part("published")
        if timeout:
            cmd = [py, str(HERE / "compare_published_timing.py"), "--published-python", published]
            if env.get("PUBLISHED_PYTHONPATH"):
                cmd += ["--published-pythonpath", env["PUBLISHED_PYTHONPATH"]]
            cmd += ["--json", str(out / "published.json"), "--log-dir", str(out / "published-workers")]
            if args.smoke:
                cmd += ["--workloads", "dense", "--algorithms", "d_rtrl", "--T", "4", "--rounds", "1"]
                cmd += ["--reps", "1", "--grad-T", "3"]
            else:
                # the rows the CPU comparison found slowest first; the spiking network's 25 million
                # synapses would be compile-time constants in the published package's program
                cmd += ["--scale", "gpu", "--workloads", "csr", "lora", "dense", "--rounds", "3"]
                cmd += ["--grad-T", "0", "--budget-s", str(timeout - 30)]
            status, seconds, _ = run_part("published", cmd, out=out, log=log, timeout=timeout, env=env)
            finish("published", status, seconds, timeout, outputs=["published.json", "published.log"])

    # 5. tables and plots
    summary["meta"]["seconds"] = round(time.monotonic() - started, 1)
    save()
    render(out, summary, log)
    log(f"gpu check done after {time.monotonic() - started:.1f} s")
    failed = [k for k, v in summary["parts"].items() if v["status"] not in ("ok", "skipped")]
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

START = "<!-- gpu-check:start -->"
END = "<!-- gpu-check:end -->"


def render(out, summary, log):
    """``out/performance.md``: docs/performance.md with the benchmark, comparison and gpu-check
    blocks replaced by this run's figures."""
    sys.path.insert(0, str(HERE))
    import render_performance as rp

    target = out / "performance.md"
    shutil.copyfile(ROOT / "docs" / "performance.md", target)
    if (out / "bench.json").exists():
        cmd = [
            sys.executable,
            str(HERE / "render_performance.py"),
            str(out / "bench.json"),
            "--out",
            str(target),
        ]
        cmd += ["--plot", str(out / "performance.png")]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        log(f"render: benchmarks: {(result.stdout or result.stderr).strip()[-300:]}")
    if (out / "published.json").exists():
        cmd = [sys.executable, str(HERE / "render_published_timing.py"), str(out / "published.json")]
        cmd += ["--out", str(target), "--plot", str(out / "performance-published.png")]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        log(f"render: published: {(result.stdout or result.stderr).strip()[-300:]}")
    text = rp.replace_between_markers(
        target.read_text(), render_summary(summary), START, END, "## The GPU check"
    )
    target.write_text(text)
    log(f"render: wrote {target}")


def render_summary(summary) -> str:
    from render_performance import mib, num, table

    meta = summary["meta"]
    lines = ["_Generated by `ci/gpu_check.py`; edit the text outside the markers only._", ""]
    seconds = f"{meta.get('seconds', '?')} s of {meta['total_budget_s']} s"
    lines.append(f"- **Run:** `{meta['command']}`, {meta['date']}, {seconds}")
    lines.append(f"- **Host:** {meta['host']}")
    lines.append("")
    body = []
    for name, part in summary["parts"].items():
        note = part.get("reason", "")
        if name == "tests" and part.get("counts"):
            c = part["counts"]
            note = f"{c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped"
        body.append([name, part["status"], num(part.get("seconds")), num(part.get("budget_s")), note])
    lines += [table(["part", "status", "seconds", "budget s", "note"], body), ""]
    snn = summary.get("large_snn") or []
    if snn:
        lines.append("**Large spiking network, batch 1** (goal: at least 1,000 steps per second):\n")
        body = [
            [
                r.get("label", ""),
                r["algorithm"],
                r["backend"],
                r["status"],
                num(r.get("us_per_step")),
                num(r.get("steps_per_s")),
                {True: "met", False: "missed"}.get(r.get("goal_met"), ""),
            ]
            for r in snn
        ]
        lines += [table(["model", "algorithm", "backend", "status", "µs/step", "steps/s", "goal"], body), ""]
    sb = summary.get("step_bytes") or {}
    if sb.get("rows"):
        lines.append(
            f"**End to end against the roofline** ({num(sb['roofline_gb_per_s'])} GB/s, "
            f"{sb['roofline_source']}): "
            "the bytes one step's launches must read and write, from the compiled program, at the roofline "
            "(`floor`), against the measured step:\n"
        )
        body = [
            [
                r.get("label", ""),
                r.get("algorithm", ""),
                r.get("backend", ""),
                num(r.get("us_per_step")),
                num(mib(r.get("step_bytes"))),
                num(r.get("launches")),
                num(r.get("floor_us")),
                num(r.get("pct_of_roofline"), 2) if r.get("status") == "ok" else r.get("status"),
            ]
            for r in sb["rows"]
        ]
        header = [
            "model",
            "algorithm",
            "backend",
            "µs/step",
            "MiB/step",
            "launches",
            "floor µs",
            "% of roofline",
        ]
        lines += [table(header, body), ""]
    mem = summary.get("memory") or []
    if mem:
        Ts = sorted({r["T"] for r in mem})
        cells = {(r["workload"], r["algorithm"], r["T"]): r for r in mem}
        configs = list(dict.fromkeys((r["workload"], r["algorithm"]) for r in mem))
        lines.append("**Compiled temporary memory in MiB** (`memory_analysis().temp_size_in_bytes`):\n")
        body = []
        for w, a in configs:
            row = [w, a]
            for T in Ts:
                r = cells.get((w, a, T), {})
                row.append(num(mib(r.get("temp_bytes"))) if r.get("status") == "ok" else r.get("status", "–"))
            body.append(row)
        lines += [table(["model", "algorithm"] + [f"T={T:,}" for T in Ts], body), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.exit(main())
