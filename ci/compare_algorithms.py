#!/usr/bin/env python3
"""Measure every online-learning algorithm on the two synthetic tasks and render the table of
``docs/algorithms.md``.

Usage (from the repository root; needs the ``examples`` extra for the plot's matplotlib)::

    python ci/compare_algorithms.py --json docs/_data/algorithms-cpu.json      # measure (minutes)
    python ci/compare_algorithms.py --render docs/_data/algorithms-cpu.json    # table + plot only

The rows come from :func:`benchmarks._algorithm_tasks.run_row` (``--size cpu`` by default: three
seeds, a few hundred optimizer steps per run). The renderer replaces what lies between
``<!-- table:start -->`` and ``<!-- table:end -->`` in ``--out`` with the machine, the versions, the
command and one table per task, and writes the accuracy-against-memory plot to ``--plot``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
START = "<!-- table:start -->"
END = "<!-- table:end -->"

NAMES = {
    "bptt": "BPTT (reference)",
    "rtrl": "RTRL",
    "snap2": "SnAp-2",
    "uoro": "UORO",
    "d_rtrl": "D_RTRL",
    "e_prop": "EProp (κ = 0.8)",
    "ostl_recurrent": "OSTLRecurrent",
    "ostl_feedforward": "OSTLFeedforward",
    "pp_prop": "pp_prop",
}
TASK_TITLES = {
    "evidence_lif": "Evidence accumulation, recurrent LIF network",
    "recall_gru": "Delayed recall, GRU",
}


def measure(size: str, algorithms, tasks, seeds) -> dict:
    sys.path.insert(0, str(ROOT))
    import jax

    import braintrace
    from benchmarks import _algorithm_tasks as A

    rows = []
    for task in tasks:
        cfg = A.SIZES[size][task]
        for alg in algorithms:
            print(f"[compare_algorithms] {task} / {alg}", flush=True)
            try:
                rows.append(A.run_row(cfg, alg, seeds=seeds))
            except Exception as err:  # a row that cannot run is reported, not hidden
                rows.append({"task": task, "algorithm": alg, "error": f"{type(err).__name__}: {err}"})
            print("   ", {k: v for k, v in rows[-1].items() if k != "config"}, flush=True)
    return {
        "machine": {
            "device": jax.devices()[0].device_kind,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "braintrace": getattr(braintrace, "__version__", "dev"),
            "date": datetime.date.today().isoformat(),
            "command": "python ci/compare_algorithms.py " + " ".join(sys.argv[1:]),
        },
        "rows": rows,
    }


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render_table(data: dict) -> str:
    m = data["machine"]
    lines = [
        f"Measured {m['date']} on {m['device']} ({m['processor']}, {m['cpus']} cores), Python "
        f"{m['python']}, jax {m['jax']}; command: `{m['command']}`.",
        "",
    ]
    by_task: dict = {}
    for row in data["rows"]:
        by_task.setdefault(row["task"], []).append(row)
    for task, rows in by_task.items():
        cfg = next((r["config"] for r in rows if "config" in r), None)
        lines.append(f"**{TASK_TITLES.get(task, task)}**" + (
            f" ({cfg['n_hidden']} hidden units, T = {cfg['t_steps']}, batch {cfg['batch']}, "
            f"{cfg['iterations']} Adam steps, {len(rows[0].get('seeds', []))} seeds)" if cfg else ""))
        lines.append("")
        lines.append("| algorithm | accuracy (mean ± half-range) | gradient cosine to BPTT | "
                     "compiled memory of a sequence | µs per step |")
        lines.append("|---|---|---|---|---|")
        for row in rows:
            name = NAMES.get(row["algorithm"], row["algorithm"])
            if "error" in row:
                lines.append(f"| {name} | does not run: {row['error'].splitlines()[0][:120]} | | | |")
                continue
            lines.append(
                f"| {name} | {row['accuracy_mean']:.3f} ± {row['accuracy_spread'] / 2:.3f} | "
                f"{row['grad_cosine_to_bptt']:.4f} | {_bytes(row['temp_bytes'])} | {row['us_per_step']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def render_plot(data: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in data["rows"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for row in (r for r in data["rows"] if r["task"] == task and "error" not in r):
            ax.errorbar(row["temp_bytes"] / 1024, row["accuracy_mean"], yerr=row["accuracy_spread"] / 2,
                        fmt="o", capsize=3)
            ax.annotate(NAMES.get(row["algorithm"], row["algorithm"]), (row["temp_bytes"] / 1024,
                        row["accuracy_mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("compiled memory of a training sequence (KiB)")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(TASK_TITLES.get(task, task))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(data: dict, out: pathlib.Path, plot) -> None:
    text = out.read_text() if out.exists() else f"# Algorithms\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    out.write_text(f"{head}{START}\n{render_table(data)}\n{END}{tail}")
    if plot:
        render_plot(data, pathlib.Path(plot))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="measure and write the rows to this file")
    p.add_argument("--render", help="render this JSON (no measurement)")
    p.add_argument("--size", default="cpu", choices=("tiny", "cpu"))
    p.add_argument("--algorithms", default=None, help="comma-separated rows (default: all)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: both)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=str(ROOT / "docs" / "algorithms.md"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "algorithms.png"))
    args = p.parse_args(argv)
    if not args.json and not args.render:
        p.error("give --json PATH (measure) or --render PATH")
    if args.json:
        sys.path.insert(0, str(ROOT))
        from benchmarks import _algorithm_tasks as A

        algorithms = args.algorithms.split(",") if args.algorithms else list(A.ALGORITHMS)
        tasks = args.tasks.split(",") if args.tasks else list(A.TASKS)
        seeds = tuple(int(s) for s in args.seeds.split(","))
        data = measure(args.size, algorithms, tasks, seeds)
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(data, indent=1))
    else:
        data = json.loads(pathlib.Path(args.render).read_text())
    render(data, pathlib.Path(args.out), args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
