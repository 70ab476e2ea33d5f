#!/usr/bin/env python3
"""Render the JSON of ``pytest benchmarks --benchmark-json=...`` into ``docs/performance.md`` and a plot.

Usage (from the repository root)::

    python3 ci/render_performance.py bench-out/bench.json \
        --out docs/performance.md --plot docs/performance.png

Reads the rows that ``benchmarks/`` writes (their figures are in each benchmark's ``extra_info``)
and replaces what lies between ``<!-- results:start -->`` and ``<!-- results:end -->`` in ``--out``
(the markers are appended if the file lacks them; the text around them is kept) with:

* a header: the machine (device kind), jax, braintrace and Python versions, the date, the command
  that produced the JSON and the roofline measured in the same run;
* one table per kernel family (op, size, backend, us per call, GB/s, % of the roofline, Pallas/XLA
  time ratio);
* the end-to-end table (us per step, steps per second, Pallas/XLA ratio; BPTT beside the online
  algorithms);
* memory against the sequence length T (peak device memory, the compiled program's temporary
  memory, time per step).

``--plot`` writes a matplotlib figure (kernel bandwidth, time per step, memory against T) and links it.
Needs only the standard library and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections import OrderedDict, defaultdict

START = "<!-- results:start -->"
END = "<!-- results:end -->"

FAMILY_TITLES = OrderedDict(
    [
        ("op:dense", "Dense D-RTRL trace kernels"),
        ("op:csr", "CSR D-RTRL trace kernels (kernel layout `(nnz, n, B)`)"),
        ("op:csr_matmul", "CSR layer products"),
        ("op:lora", "LoRA D-RTRL trace kernels (exact: `E` and `TA`)"),
    ]
)
WORKLOAD_ORDER = ("dense", "csr", "lora", "snn")
ALGORITHM_ORDER = ("bptt", "d_rtrl", "d_rtrl_factored", "d_rtrl_bf16", "pp_prop", "pp_prop_solve32")
ALGORITHM_NAMES = {
    "bptt": "BPTT",
    "d_rtrl": "D_RTRL",
    "d_rtrl_factored": "D_RTRL (factored LoRA)",
    "d_rtrl_bf16": "D_RTRL (bfloat16 traces)",
    "pp_prop": "pp_prop",
    "pp_prop_solve32": "pp_prop (solve_every=32)",
}
BACKEND_ORDER = ("xla", "pallas")
STATUS_TEXT = {"oom": "OOM", "skipped": "skipped", "timeout": "timeout", "error": "error"}


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def load(paths):
    """``(machine_info, rows)``: each row is a benchmark's ``extra_info`` plus its group and name."""
    machine, rows = {}, []
    for path in paths:
        with open(path) as handle:
            data = json.load(handle)
        machine = machine or data.get("machine_info", {})
        machine.setdefault("_datetime", data.get("datetime"))
        for bench in data.get("benchmarks", []):
            info = dict(bench.get("extra_info") or {})
            if "kind" not in info:
                continue
            info["_group"] = bench.get("group")
            info["_name"] = bench.get("name")
            rows.append(info)
    return machine, rows


def _index(seq, value):
    return seq.index(value) if value in seq else len(seq)


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------


def num(x, digits=3):
    """A number with ``digits`` significant figures and thousands separators; '–' for None."""
    if x is None:
        return "–"
    x = float(x)
    if x == 0:
        return "0"
    magnitude = len(str(int(abs(x)))) if abs(x) >= 1 else 0
    decimals = max(digits - magnitude, 0) if abs(x) >= 1 else digits
    return f"{x:,.{decimals}f}"


def mib(nbytes):
    return None if nbytes is None else nbytes / (1 << 20)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def header_lines(machine, json_paths):
    bt = machine.get("braintrace", {})
    lines = []
    device = bt.get("device_kind", "unknown device")
    lines.append(
        f"- **Machine:** {device} ({bt.get('platform', '?')}), jax {bt.get('jax_version', '?')}, "
        f"braintrace {bt.get('braintrace_version', '?')}, Python {bt.get('python_version', '?')}"
    )
    lines.append(f"- **Date:** {bt.get('date') or machine.get('_datetime', '?')}")
    if bt.get("command"):
        lines.append(f"- **Command:** `{bt['command']}`")
    lines.append(
        "- **Rendered by:** `python3 ci/render_performance.py "
        + " ".join(str(p) for p in json_paths)
        + " ...`"
    )
    if bt.get("roofline_gb_per_s") is not None:
        lines.append(
            f"- **Roofline:** {num(bt['roofline_gb_per_s'])} GB/s ({bt.get('roofline_method', '')}), "
            "measured in the same run"
        )
    if bt.get("skipped_over_budget"):
        lines.append(
            f"- **Skipped** because the run's time budget was spent: {len(bt['skipped_over_budget'])} "
            "benchmarks (" + ", ".join(f"`{n.split('::')[-1]}`" for n in bt["skipped_over_budget"]) + ")"
        )
    if bt.get("scale") == "cpu":
        lines.append(
            "- **CPU smoke run** at tiny sizes (Pallas kernels in interpret mode): these figures check "
            "the pipeline, not the performance."
        )
    return lines


def _diff(r):
    """The pallas row's normwise difference from the xla row's output, for the table."""
    d = r.get("rel_diff_vs_other_backend")
    return "" if d is None else f"{d:.1e}"


def _pair_ratios(rows, key_fields):
    """``{key: t_pallas / t_xla}`` from rows holding both backends, time field given per kind."""
    times = defaultdict(dict)
    for r in rows:
        t = r.get("us_per_call", r.get("us_per_step"))
        if t is not None:
            times[tuple(r.get(k) for k in key_fields)][r.get("backend")] = t
    return {k: v["pallas"] / v["xla"] for k, v in times.items() if "pallas" in v and v.get("xla")}


def op_sections(rows):
    out = []
    ops = [r for r in rows if r["kind"] == "op"]
    groups = OrderedDict((g, []) for g in FAMILY_TITLES)
    for r in ops:
        groups.setdefault(r["_group"], []).append(r)
    for group, members in groups.items():
        if not members:
            continue
        ratios = _pair_ratios(members, ("op", "size"))
        sizes = list(OrderedDict.fromkeys(r["size"] for r in members))  # in the order they ran
        op_names = list(OrderedDict.fromkeys(r["op"] for r in members))
        members.sort(
            key=lambda r: (
                sizes.index(r["size"]),
                op_names.index(r["op"]),
                _index(BACKEND_ORDER, r["backend"]),
            )
        )
        body = []
        for r in members:
            ratio = ratios.get((r["op"], r["size"])) if r["backend"] == "pallas" else None
            backend = r["backend"] + (" (interpret)" if r.get("mode") == "interpret" else "")
            body.append(
                [
                    f"`{r['op']}`",
                    r["size"],
                    num(mib(r.get("trace_bytes"))),
                    backend,
                    num(r.get("us_per_call")),
                    num(r.get("gb_per_s")),
                    num(r.get("pct_roofline"), 2),
                    num(ratio) if ratio is not None else "",
                    _diff(r),
                ]
            )
        title = FAMILY_TITLES.get(group, group)
        out.append(f"### {title}\n")
        out.append(
            table(
                [
                    "op",
                    "size",
                    "trace MiB",
                    "backend",
                    "µs/call",
                    "GB/s",
                    "% roofline",
                    "Pallas/XLA time",
                    "diff",
                ],
                body,
            )
        )
        out.append("")
    if ops:
        out.append(
            "`diff`: normwise relative difference between the outputs of the Pallas and the XLA loops "
            "(the same inputs, `iters` calls each).\n"
        )
    return out


def _e2e_key(r):
    return (
        _index(WORKLOAD_ORDER, r.get("workload")),
        r.get("batch", 0) * -1,
        _index(ALGORITHM_ORDER, r.get("algorithm")),
        _index(BACKEND_ORDER, r.get("backend")),
    )


def e2e_section(rows):
    e2e = sorted((r for r in rows if r["kind"] == "e2e"), key=_e2e_key)
    if not e2e:
        return []
    ratios = _pair_ratios(e2e, ("label", "algorithm"))
    body = []
    for r in e2e:
        ratio = ratios.get((r["label"], r["algorithm"])) if r["backend"] == "pallas" else None
        backend = r["backend"] + (" (interpret)" if r.get("mode") == "interpret" else "")
        body.append(
            [
                r["label"],
                ALGORITHM_NAMES.get(r["algorithm"], r["algorithm"]),
                backend,
                r.get("T", ""),
                num(r.get("us_per_step")),
                num(r.get("steps_per_s")),
                num(ratio) if ratio is not None else "",
                _diff(r),
            ]
        )
    return [
        "### End to end: one online-learning step\n",
        table(["model", "algorithm", "backend", "T", "µs/step", "steps/s", "Pallas/XLA time", "diff"], body),
        "",
        "`diff`: normwise relative difference between the gradients summed over the `T` steps under the "
        "two backends.\n",
    ]


def _memory_cell(r, field, scale=mib):
    if r is None:
        return "–"
    if r.get("status") != "ok":
        return STATUS_TEXT.get(r.get("status"), r.get("status", "?"))
    value = r.get(field)
    return num(scale(value) if scale else value)


def memory_section(rows):
    mem = [r for r in rows if r["kind"] == "memory"]
    if not mem:
        return []
    Ts = sorted({r["T"] for r in mem})
    cells = {}
    labels = {}
    for r in mem:
        cells[(r["workload"], r["algorithm"], r["T"])] = r
        labels.setdefault(r["workload"], r.get("label") or r["workload"])
    configs = sorted(
        {(r["workload"], r["algorithm"]) for r in mem},
        key=lambda k: (_index(WORKLOAD_ORDER, k[0]), _index(ALGORITHM_ORDER, k[1])),
    )
    has_peak = any(r.get("peak_bytes") is not None for r in mem)
    out = ["### Memory against the sequence length\n"]
    if has_peak:
        out.append(
            "Peak device memory in MiB (`peak_bytes_in_use`, one configuration per process; it includes "
            "the parameters, the traces and the input sequences):\n"
        )
        body = [
            [labels[w], ALGORITHM_NAMES.get(a, a)]
            + [_memory_cell(cells.get((w, a, T)), "peak_bytes") for T in Ts]
            for w, a in configs
        ]
        out += [table(["model", "algorithm"] + [f"T={T:,}" for T in Ts], body), ""]
    out.append(
        "Temporary memory of the compiled program in MiB (`memory_analysis().temp_size_in_bytes`: "
        "the working set without the inputs):\n"
    )
    body = [
        [labels[w], ALGORITHM_NAMES.get(a, a)]
        + [_memory_cell(cells.get((w, a, T)), "temp_bytes") for T in Ts]
        for w, a in configs
    ]
    out += [table(["model", "algorithm"] + [f"T={T:,}" for T in Ts], body), ""]
    if any(r.get("us_per_step") is not None for r in mem):
        out.append("Time per step in µs of the same configurations (one timed run each, backend `xla`):\n")
        body = [
            [labels[w], ALGORITHM_NAMES.get(a, a)]
            + [_memory_cell(cells.get((w, a, T)), "us_per_step", scale=None) for T in Ts]
            for w, a in configs
        ]
        out += [table(["model", "algorithm"] + [f"T={T:,}" for T in Ts], body), ""]
    notes = sorted({r["message"] for r in mem if r.get("status") != "ok" and r.get("message")})
    if notes:
        out.append("Notes: " + "; ".join(notes) + "\n")
    return out


def render(machine, rows, json_paths, plot_rel=None) -> str:
    parts = ["_Generated by `ci/render_performance.py`; edit the text outside the markers only._", ""]
    parts += header_lines(machine, json_paths)
    parts.append("")
    if plot_rel:
        parts += [f"![Kernel bandwidth, time per step and memory against T]({plot_rel})", ""]
    parts += op_sections(rows)
    parts += e2e_section(rows)
    parts += memory_section(rows)
    return "\n".join(parts).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------


def plot(rows, path, machine):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [r for r in rows if r["kind"] == "op"]
    e2e = sorted((r for r in rows if r["kind"] == "e2e"), key=_e2e_key)
    mem = [r for r in rows if r["kind"] == "memory" and r.get("status") == "ok"]
    families = list(FAMILY_TITLES)
    ops.sort(key=lambda r: _index(families, r["_group"]))  # stable: run order within a family
    pairs = list(OrderedDict.fromkeys((r["op"], r["size"]) for r in ops))
    fig = plt.figure(figsize=(13, 4 + 0.22 * max(len(pairs), 10)))
    grid = fig.add_gridspec(2, 2, height_ratios=[max(len(pairs), 10) * 0.22, 4])

    ax = fig.add_subplot(grid[0, :])
    pct = {(r["op"], r["size"], r["backend"]): r.get("pct_roofline") or 0 for r in ops}
    for k, backend in enumerate(BACKEND_ORDER):
        ys = [i + (k - 0.5) * 0.4 for i in range(len(pairs))]
        ax.barh(ys, [pct.get((op, size, backend), 0) for op, size in pairs], height=0.4, label=backend)
    ax.set_yticks(range(len(pairs)))
    ax.set_yticklabels([f"{op}  {size}" for op, size in pairs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% of the roofline measured in the same run")
    ax.set_title("Kernels: achieved bandwidth")
    ax.legend(loc="lower right")

    ax = fig.add_subplot(grid[1, 0])
    labels = [
        f"{ALGORITHM_NAMES.get(r['algorithm'], r['algorithm'])} {r['workload']} B{r['batch']} {r['backend']}"
        for r in e2e
    ]
    colors = {"xla": "tab:blue", "pallas": "tab:orange"}
    ax.barh(
        range(len(e2e)),
        [r.get("us_per_step") or 0 for r in e2e],
        color=[colors.get(r["backend"], "tab:gray") if r["algorithm"] != "bptt" else "tab:gray" for r in e2e],
    )
    ax.set_yticks(range(len(e2e)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    if e2e:
        ax.set_xscale("log")
    ax.set_xlabel("µs per step (blue: xla, orange: pallas, gray: BPTT)")
    ax.set_title("End to end")

    ax = fig.add_subplot(grid[1, 1])
    series = defaultdict(list)
    for r in mem:
        value = r.get("peak_bytes", r.get("temp_bytes"))
        if value:
            series[(r["workload"], r["algorithm"])].append((r["T"], value / (1 << 20)))
    for (w, a), points in sorted(series.items()):
        points.sort()
        ax.plot(
            *zip(*points),
            marker="o",
            label=f"{w} {ALGORITHM_NAMES.get(a, a)}",
            linestyle="--" if a == "bptt" else "-",
        )
    if series:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    which = "peak" if any(r.get("peak_bytes") for r in mem) else "compiled temp"
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(f"{which} memory (MiB)")
    ax.set_title("Memory against T")

    bt = machine.get("braintrace", {})
    fig.suptitle(f"braintrace benchmarks: {bt.get('device_kind', '?')}, jax {bt.get('jax_version', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def plot_link(draw, path, out) -> str | None:
    """Call ``draw(path)`` and return ``path`` relative to the Markdown file ``out``; ``None`` (and a
    line on stderr) when matplotlib, which is in the ``examples`` extra, cannot be imported: the
    tables are then written alone."""
    try:
        draw(path)
    except ImportError as err:
        print(f"no plot: {err}", file=sys.stderr)
        return None
    return os.path.relpath(pathlib.Path(path).resolve(), pathlib.Path(out).resolve().parent)


def replace_between_markers(text: str, block: str, start=START, end=END, heading="## Results") -> str:
    """``text`` with what lies between the markers ``start`` and ``end`` replaced by ``block``; without
    the markers, ``heading`` and the marked block are appended."""
    if start in text and end in text and text.index(start) < text.index(end):
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        return f"{head}{start}\n{block}{end}{tail}"
    return text.rstrip() + f"\n\n{heading}\n\n{start}\n{block}{end}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s)")
    parser.add_argument("--out", default="docs/performance.md", help="Markdown file to update")
    parser.add_argument("--plot", default=None, help="PNG to write (and link from --out)")
    opts = parser.parse_args(argv)

    machine, rows = load(opts.json)
    if not rows:
        print(f"no braintrace benchmark rows in {opts.json}", file=sys.stderr)
        return 1
    out = pathlib.Path(opts.out)
    plot_rel = None
    if opts.plot:
        plot_rel = plot_link(lambda path: plot(rows, path, machine), opts.plot, out)
    block = render(machine, rows, opts.json, plot_rel)
    text = out.read_text() if out.exists() else "# Performance\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(replace_between_markers(text, block))
    counts = defaultdict(int)
    for r in rows:
        counts[r["kind"]] += 1
    print(f"wrote {out} ({dict(counts)})" + (f" and {opts.plot}" if plot_rel else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
