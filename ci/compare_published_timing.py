#!/usr/bin/env python3
"""Time per online step, compile time, compiled memory and gradients of this package against the
published braintrace, on the same models, in one run.

Usage (from the repository root)::

    python3 ci/compare_published_timing.py --json cmp.json              # creates/reuses the venv
    python3 ci/compare_published_timing.py --published-python /tmp/pub/bin/python --json cmp.json
    python3 ci/render_performance.py --published-timing cmp.json --out docs/performance.md \\
        --plot docs/performance-published.png

The models are those of ``side_by_side_models.build_workload`` (the dense, CSR and LoRA RNNs and
the LIF network of ``benchmarks/_models.py``, at its ``cpu`` sizes by default, ``--scale gpu`` for the
real ones), written with the names both packages share. Each package runs in a worker process of its
own interpreter (this script with ``--worker``, answering one JSON line per request): ours with this
interpreter, the published one with ``--published-python`` or with the venv at ``--venv`` (created
with ``pip install braintrace==<--version>`` when missing, reused when present). Both workers stay
alive for the whole run; the runner alternates between them (ours first in even rounds, theirs first
in odd ones), so slow phases of a shared machine hit both.

Per workload and algorithm (``D_RTRL``, ``pp_prop`` with ``decay_or_rank=0.9``), each package's
online step is ``learner.etrace_grad`` over ``T`` steps in one ``brainstate.transform.jit`` call:
this package's form (``step_fn`` gets the output; the states restart each call) and the published
form (``step_fn`` runs the learner, ``reduction='sum'``). Reported: µs per step (each round's value
is the median of ``--reps`` calls; median and minimum over the rounds), the ratio ours/theirs of both,
the compile time of the jitted call (``lower(...).compile()``), and XLA's temporary memory of the
compiled program. Gradients are compared in a separate float64 run (``--grad-T`` steps from the
initial states): ours against theirs, and for D_RTRL on the RNNs both against an independent
plain-``jnp`` masked-RTRL recursion (the hidden Jacobian with the ETP outputs held fixed is
``(1 - a) I``), which decides which one is right where they differ.

On a CPU without ``numba``, the published package's sparse products (``brainevent``) use its
``jax_raw`` backend (its default, ``numba``, is not one of its dependencies); the JSON says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
MARK = "COMPARE_PUBLISHED_RESULT "
ALGORITHMS = {"d_rtrl": {}, "pp_prop": {"decay_or_rank": 0.9}}
WORKLOADS = ("dense", "csr", "lora", "snn")
DEFAULT_VENV = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "braintrace"
#: Relative gradient difference below which two float64 gradients count as equal.
GRAD_TOL = 1e-6


# --------------------------------------------------------------------------------------------------
# The worker: runs in either package's interpreter, imports only that interpreter's braintrace
# --------------------------------------------------------------------------------------------------


class _Session:
    """The worker's state: one compiled online step per (workload, algorithm)."""

    def __init__(self):
        import warnings

        warnings.simplefilter("ignore")
        import brainstate
        import jax

        if os.environ.get("COMPARE_PUBLISHED_X64") == "1":
            jax.config.update("jax_enable_x64", True)
            brainstate.environ.set(precision=64)
        import braintrace

        self.braintrace = braintrace
        self.ours = hasattr(braintrace, "set_backend")  # the published 0.2 releases have no backends
        self.notes = []
        if not self.ours and jax.default_backend() == "cpu":
            try:
                import numba  # noqa: F401
            except ImportError:
                import brainevent

                brainevent.config.set_backend("cpu", "jax_raw")
                self.notes.append("brainevent backend 'jax_raw' on CPU (numba is not installed)")
        self.steps = {}

    def info(self):
        import brainstate
        import jax

        return {
            "braintrace": self.braintrace.__version__,
            "jax": jax.__version__,
            "brainstate": brainstate.__version__,
            "python": platform.python_version(),
            "device_kind": jax.devices()[0].device_kind,
            "platform": jax.devices()[0].platform,
            "ours": self.ours,
            "notes": self.notes,
        }

    def _build(self, spec, algorithm, dtype):
        import brainstate
        import jax.numpy as jnp
        from side_by_side_models import build_workload

        model, loss = build_workload(spec, dtype)
        x0 = jnp.zeros((spec["batch"], spec["n_in"]), dtype)
        learner = self.braintrace.compile(
            model, algorithm, x0, batch_size=spec["batch"], **ALGORITHMS[algorithm]
        )
        if self.ours:

            def run(xs, ys):
                return learner.etrace_grad(xs, ys, step_fn=loss)
        else:

            def run(xs, ys):
                def step(x, y):
                    return loss(learner(x), y)

                return learner.etrace_grad(xs, ys, step_fn=step, reduction="sum")

        return brainstate.transform.jit(run)

    def setup(self, key, spec, algorithm, T, hlo=None):
        """Build and compile the step; report compile time and compiled memory."""
        import jax
        import jax.numpy as jnp
        import numpy as np
        from side_by_side_models import make_sequences

        run = self._build(spec, algorithm, jnp.float32)
        xs, ys = (jnp.asarray(a) for a in make_sequences(spec, T, np.float32))
        start = time.perf_counter()
        compiled = run.lower(xs, ys).compile()
        compile_s = time.perf_counter() - start
        analysis = compiled.memory_analysis()
        if hlo:
            pathlib.Path(hlo).write_text(compiled.as_text())
        start = time.perf_counter()
        jax.block_until_ready(run(xs, ys))
        first_call_s = time.perf_counter() - start
        self.steps[key] = (run, xs, ys, T)
        return {
            "compile_s": compile_s,
            "first_call_s": first_call_s,
            "temp_bytes": None if analysis is None else int(analysis.temp_size_in_bytes),
            "argument_bytes": None if analysis is None else int(analysis.argument_size_in_bytes),
        }

    def time(self, key, reps):
        """Seconds per step of ``reps`` calls."""
        import jax

        run, xs, ys, T = self.steps[key]
        out = []
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(run(xs, ys))
            out.append((time.perf_counter() - start) / T)
        return {"s_per_step": out}

    def grads(self, spec, algorithm, T):
        """The summed online gradients over ``T`` steps from the initial states, float64."""
        import jax.numpy as jnp
        import numpy as np
        from side_by_side_models import make_sequences

        run = self._build(spec, algorithm, jnp.float64)
        xs, ys = (jnp.asarray(a) for a in make_sequences(spec, T, np.float64))
        grads = run(xs, ys)
        return {"grads": {_leaf_name(k): np.asarray(v).tolist() for k, v in grads.items()}}


def _leaf_name(key) -> str:
    return str(key[-1]) if isinstance(key, tuple) else str(key)


def serve() -> int:
    """Answer JSON requests, one per line on stdin, with one ``MARK``-prefixed line each."""
    session = None
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            if session is None:
                session = _Session()
            command = request.pop("cmd")
            if command == "info":
                result = session.info()
            elif command == "quit":
                return 0
            else:
                result = getattr(session, command)(**request)
            reply = {"ok": True, **result}
        except Exception as err:  # noqa: BLE001 - the runner records the failure as a result
            import traceback

            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
            reply["traceback"] = traceback.format_exc()[-3000:]
        print(MARK + json.dumps(reply), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------------


class Worker:
    """One worker process; ``request(cmd, **kw)`` sends a line and waits for the answer."""

    def __init__(self, label, python, env, log_path, cwd):
        self.label = label
        self.log = open(log_path, "a")
        self.proc = subprocess.Popen(
            [python, str(HERE / "compare_published_timing.py"), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=cwd,
        )

    def request(self, cmd, **kw):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        code = self.proc.wait()
        return {
            "ok": False,
            "error": f"the {self.label} worker exited with status {code} (log: {self.log.name})",
        }

    def close(self):
        if self.proc.poll() is None:
            try:
                self.request("quit")
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def published_python(args) -> str:
    """The published package's interpreter: ``--published-python``, or the venv at ``--venv``
    (created and filled with ``braintrace==--version`` when it has no such package)."""
    if args.published_python:
        return args.published_python
    venv = pathlib.Path(args.venv or DEFAULT_VENV / f"published-{args.version}")
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('braintrace'))"]
    if python.exists():
        found = subprocess.run(probe, capture_output=True, text=True, cwd="/")
        if found.returncode == 0 and found.stdout.strip() == args.version:
            return str(python)
    print(f"creating {venv} with braintrace=={args.version}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", f"braintrace=={args.version}"]
    subprocess.run(pip, check=True)
    return str(python)


def worker_env(ours: bool, extra_path: str | None, x64: bool) -> dict:
    """Ours sees this checkout first; the published worker never does (its directory is the run's
    cwd, outside the checkout, and the checkout is taken off ``PYTHONPATH``)."""
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)
    if "COMPARE_PUBLISHED_JAX_PLATFORMS" in env:
        env["JAX_PLATFORMS"] = env["COMPARE_PUBLISHED_JAX_PLATFORMS"]
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    parts = [p for p in parts if pathlib.Path(p).resolve() != ROOT]
    parts = ([str(ROOT)] if ours else ([extra_path] if extra_path else [])) + parts
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env["COMPARE_PUBLISHED_X64"] = "1" if x64 else "0"
    return env


def specs_of(scale: str, names) -> dict:
    """The benchmark workloads' sizes (``benchmarks/_models.py``) as plain dicts."""
    sys.path.insert(0, str(ROOT))
    import dataclasses

    from benchmarks import _models as M

    out = {}
    for name in names:
        s = M.spec(name, scale)
        out[name] = {**dataclasses.asdict(s), "nnz": s.nnz}
    return out


def rel(a, b) -> float:
    """``||a - b|| / max(||a||, ||b||)`` (symmetric: a zero gradient against a non-zero one is 1)."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300))


def compare_grads(ours: dict, theirs: dict, oracle: dict | None) -> dict:
    """Per parameter: ours vs theirs, and each against the oracle; a sentence saying who is right."""
    row = {"params": {}}
    for p in sorted(ours):
        entry = {"ours_vs_published": rel(ours[p], theirs[p]) if p in theirs else None}
        if oracle is not None and p in oracle:
            entry["ours_vs_oracle"] = rel(ours[p], oracle[p])
            entry["published_vs_oracle"] = rel(theirs[p], oracle[p]) if p in theirs else None
        row["params"][p] = entry
    worst = max((e["ours_vs_published"] for e in row["params"].values()), default=None)
    row["max_ours_vs_published"] = worst
    if worst is not None and worst <= GRAD_TOL:
        row["verdict"] = "equal"
        return row
    if oracle is None:
        row["verdict"] = "differ (no independent oracle here)"
        return row
    ours_ok = all(e.get("ours_vs_oracle", 0) <= GRAD_TOL for e in row["params"].values())
    wrong = [
        p
        for p, e in row["params"].items()
        if e.get("published_vs_oracle") is not None and e["published_vs_oracle"] > GRAD_TOL
    ]
    if ours_ok and wrong:
        detail = ", ".join(
            f"{p} {row['params'][p]['published_vs_oracle']:.2g}" + (" (zero)" if _is_zero(theirs[p]) else "")
            for p in wrong
        )
        row["verdict"] = f"published off the oracle in {detail}; ours equal to it"
    elif not ours_ok:
        row["verdict"] = "ours off the oracle"
    else:
        row["verdict"] = "differ"
    unexplained = [
        p
        for p, e in row["params"].items()
        if "ours_vs_oracle" not in e and (e["ours_vs_published"] is None or e["ours_vs_published"] > GRAD_TOL)
    ]
    if unexplained:
        row["verdict"] += f"; {', '.join(unexplained)} differ with no oracle here"
    return row


def _is_zero(values) -> bool:
    import numpy as np

    return not np.any(np.asarray(values))


def summarize(result):
    """Each row's µs per step (median and minimum over its rounds) and the ratios ours / published,
    from the rounds measured so far (``s_per_step_rounds``)."""
    for row in result["rows"]:
        for who in ("ours", "published"):
            rounds = [x * 1e6 for x in row[who].get("s_per_step_rounds", [])]
            if rounds:
                row[who].update(us_median=statistics.median(rounds), us_min=min(rounds), us_rounds=rounds)
        if row["ours"].get("us_min") and row["published"].get("us_min"):
            row["ratio_median"] = row["ours"]["us_median"] / row["published"]["us_median"]
            row["ratio_min"] = row["ours"]["us_min"] / row["published"]["us_min"]
    return result


def run_comparison(args, save=lambda result: None) -> dict:
    """The comparison's rows; ``save(result)`` is called whenever a part of it is done (a run cut
    short by a timeout keeps what it measured)."""
    names = args.workloads
    specs = specs_of(args.scale, names)
    configs = [(w, a) for w in names for a in args.algorithms]
    theirs_python = published_python(args)
    out_dir = pathlib.Path(args.log_dir or os.environ.get("TMPDIR", "/tmp")) / "compare-published"
    out_dir.mkdir(parents=True, exist_ok=True)
    cwd = str(out_dir)  # outside the checkout: the published worker must not import it
    started = time.monotonic()

    def over_budget():
        return bool(args.budget_s) and time.monotonic() - started > args.budget_s

    def spawn(x64):
        suffix = "-x64" if x64 else ""
        return {
            "ours": Worker(
                "ours", sys.executable, worker_env(True, None, x64), out_dir / f"ours{suffix}.log", cwd
            ),
            "published": Worker(
                "published",
                theirs_python,
                worker_env(False, args.published_pythonpath, x64),
                out_dir / f"published{suffix}.log",
                cwd,
            ),
        }

    result = {"rows": [], "skipped": []}
    workers = spawn(False)
    try:
        info = {k: w.request("info") for k, w in workers.items()}
        for k, v in info.items():
            if not v.get("ok"):
                raise SystemExit(
                    f"the {k} worker failed to start: {v.get('error')}\n{v.get('traceback', '')}"
                )
        result["versions"] = {k: {kk: vv for kk, vv in v.items() if kk != "ok"} for k, v in info.items()}
        rows = {}
        for w, a in configs:
            if over_budget():
                result["skipped"].append(f"{w}/{a}: the {args.budget_s:.0f} s budget is spent")
                continue
            row = {"workload": w, "algorithm": a, "label": specs[w]["label"], "T": args.T, **_sizes(specs[w])}
            for who, worker in workers.items():
                hlo = str(pathlib.Path(args.hlo_dir) / f"{who}-{w}-{a}.hlo.txt") if args.hlo_dir else None
                if hlo:
                    pathlib.Path(args.hlo_dir).mkdir(parents=True, exist_ok=True)
                r = worker.request("setup", key=f"{w}/{a}", spec=specs[w], algorithm=a, T=args.T, hlo=hlo)
                row[who] = {k: v for k, v in r.items() if k != "ok"}
                row[who]["status"] = "ok" if r.get("ok") else "error"
                row[who]["s_per_step_rounds"] = []
            rows[(w, a)] = row
            result["rows"].append(row)
            save(result)
        for rnd in range(args.rounds):
            if over_budget():
                result["skipped"].append(
                    f"rounds {rnd + 1}-{args.rounds}: the {args.budget_s:.0f} s budget is spent"
                )
                break
            order = ("ours", "published") if rnd % 2 == 0 else ("published", "ours")
            for key in rows:
                for who in order:
                    entry = rows[key][who]
                    if entry["status"] != "ok":
                        continue
                    r = workers[who].request("time", key=f"{key[0]}/{key[1]}", reps=args.reps)
                    if r.get("ok"):
                        entry["s_per_step_rounds"].append(statistics.median(r["s_per_step"]))
                    else:
                        entry.update(status="error", error=r.get("error"), traceback=r.get("traceback"))
            save(summarize(result))
    finally:
        for worker in workers.values():
            worker.close()
    if args.grad_T > 0 and not over_budget():
        _add_gradients(args, result, specs, spawn)
    result["wall_s"] = time.monotonic() - started
    return summarize(result)


def _sizes(spec):
    keys = ("batch", "n_hid", "n_in", "n_out", "rank", "density", "syn_per_neuron", "nnz")
    return {k: spec[k] for k in keys if spec.get(k)}


def _add_gradients(args, result, specs, spawn):
    workers = spawn(True)
    try:
        for row in result["rows"]:
            w, a = row["workload"], row["algorithm"]
            got = {}
            for who, worker in workers.items():
                r = worker.request("grads", spec=specs[w], algorithm=a, T=args.grad_T)
                got[who] = r.get("grads") if r.get("ok") else None
                if not r.get("ok"):
                    row.setdefault("grad_errors", {})[who] = r.get("error")
            if got["ours"] is None or got["published"] is None:
                row["grads"] = {"verdict": "not compared: " + "; ".join(row.get("grad_errors", {}).values())}
                continue
            oracle = _oracle(specs[w], a, args.grad_T)
            row["grads"] = compare_grads(got["ours"], got["published"], oracle)
            row["grads"]["T"] = args.grad_T
            row["grads"]["oracle"] = None if oracle is None else ORACLE_NAMES[a]
    finally:
        for worker in workers.values():
            worker.close()


ORACLE_NAMES = {"d_rtrl": "masked RTRL, plain jnp", "pp_prop": "pp_prop recursion, plain jnp"}


def _oracle(spec, algorithm, T):
    sys.path.insert(0, str(HERE))
    import side_by_side_oracles as oracles

    if algorithm == "d_rtrl":
        return oracles.d_rtrl_oracle(spec, T)
    return oracles.pp_prop_oracle(spec, T, ALGORITHMS["pp_prop"]["decay_or_rank"])


def machine_text() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--published-python", help="an interpreter whose environment has the published package"
    )
    parser.add_argument(
        "--published-pythonpath",
        help="prepended to PYTHONPATH for the published worker (wheels unpacked there)",
    )
    parser.add_argument(
        "--venv", help=f"the published package's venv (default {DEFAULT_VENV}/published-VERSION)"
    )
    parser.add_argument("--version", default="0.2.6", help="the published version to install (default 0.2.6)")
    parser.add_argument("--scale", choices=["cpu", "gpu"], default="cpu", help="model sizes (default cpu)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--T", type=int, default=None, help="steps per timed call (default 200 cpu, 500 gpu)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (default 7)")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per round and package (default 3)")
    parser.add_argument("--grad-T", type=int, default=12, help="steps of the float64 gradient run (0: none)")
    parser.add_argument(
        "--budget-s", type=float, default=0, help="stop starting rounds after this many seconds"
    )
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    parser.add_argument("--hlo-dir", help="write each compiled step's optimised HLO here")
    parser.add_argument(
        "--log-dir", help="the workers' cwd and stderr logs (default $TMPDIR/compare-published)"
    )
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(HERE))
        return serve()
    args.T = args.T or (500 if args.scale == "gpu" else 200)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the runner's own jax (the oracle) stays on the CPU
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_text(),
        "command": "python3 ci/compare_published_timing.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "scale": args.scale,
        "T": args.T,
        "rounds": args.rounds,
        "reps": args.reps,
        "grad_T": args.grad_T,
    }

    def save(result):
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({**result, "meta": meta}, indent=1) + "\n")

    result = run_comparison(args, save)
    save(result)
    for row in result["rows"]:
        o, p = row["ours"], row["published"]
        nan = float("nan")
        print(
            f"{row['workload']:6s} {row['algorithm']:8s} ours {o.get('us_min', nan):9.1f} "
            f"theirs {p.get('us_min', nan):9.1f} us/step (min)  ratio {row.get('ratio_min', nan):.2f}"
            f"  grads: {row.get('grads', {}).get('verdict', '-')}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
