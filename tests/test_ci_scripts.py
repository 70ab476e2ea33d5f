"""The scripts in ``ci/`` that run without a GPU."""

import json
import os
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


def test_kernel_tuning_sweep_runs_in_interpret_mode(tmp_path):
    out = tmp_path / "tune.json"
    cmd = [sys.executable, "ci/tune_kernels.py", "--smoke", "--json", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == {"dense_trace_update_solve", "csr_trace_update_solve"}
    cases = {r["case"] for r in rows}
    assert len(cases) == 3  # two dense (one in bfloat16 storage), one CSR
    for case in cases:
        mine = [r for r in rows if r["case"] == case]
        # the default, more tiles, then the second stage at the fastest tile
        assert len(mine) >= 3 and sum(r["default"] for r in mine) == 1
        assert len({json.dumps(r["block_sizes"], sort_keys=True) for r in mine}) == len(mine)
        assert all(r["us"] > 0 for r in mine)


def test_kernel_tuning_sweep_selects_cases(tmp_path):
    out = tmp_path / "tune.json"
    cmd = [sys.executable, "ci/tune_kernels.py", "--smoke", "--cases", "csr", "--json", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert rows and {r["op"] for r in rows} == {"csr_trace_update_solve"}


def test_kernel_tuning_sweep_needs_a_gpu():
    cmd = [sys.executable, "ci/tune_kernels.py"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "no CUDA GPU" in result.stderr


def test_kernel_inspection_writes_the_triton_ir(tmp_path):
    """Without the ``triton`` package the script still lowers every kernel and writes its Triton IR."""
    cmd = [sys.executable, "ci/inspect_kernels.py", "--ttir-only", "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600).stdout
    names = [line.split()[-3] for line in out.splitlines()[1:]]
    assert {"dense_trace_update_solve", "csr_trace_update_solve", "csr_segment_sum", "csr_sddmm"} <= set(
        names
    )
    files = sorted(tmp_path.glob("*.ttir"))
    assert len(files) == len(names)
    assert all("tt.func public" in f.read_text() and "tt.load" in f.read_text() for f in files)


def test_programs_per_sm():
    sys.path.insert(0, str(ROOT / "ci"))
    from inspect_kernels import programs_per_sm

    assert programs_per_sm(122, 4, 1024) == 4  # 128 registers x 128 threads: 4 programs in 64K
    assert programs_per_sm(158, 4, 1024) == 3
    assert programs_per_sm(32, 4, 0) == 16  # the warp limit (64 per SM)
    assert programs_per_sm(16, 1, 0) == 32  # the program limit
    assert programs_per_sm(32, 4, 100 * 1024) == 2  # shared memory


def _gpu_program():
    sys.path.insert(0, str(ROOT / "ci"))
    import gpu_program

    return gpu_program


def test_gpu_program_counts_the_launches_and_bytes_of_a_step():
    """The HLO reader on a real compiled program (this machine's backend; the format is XLA's on
    every backend): the loop body over T is found, and a dynamic slice of the sequence counts only
    the slice, the in-place stacking of the outputs only the update."""
    import jax
    import jax.numpy as jnp

    gp = _gpu_program()
    T, n = 7, 256

    def run(c, xs):
        def body(c, x):
            c = jnp.tanh(c + x)
            return c, c * 2.0

        return jax.lax.scan(body, c, xs)

    text = jax.jit(run).lower(jnp.ones((n, n)), jnp.ones((T, n, n))).compile().as_text()
    launches = gp.step_launches(gp.parse_hlo(text), T)
    assert launches and gp.step_launches(gp.parse_hlo(text), T + 1) == []
    plane = 4 * n * n
    # read c and x_t, write c; read c, write 2c into the stacked outputs: 5 planes (+ a few scalars)
    assert 5 * plane <= sum(r["bytes"] for r in launches) < 5 * plane + 1024
    assert max(r["bytes"] for r in launches) < T * plane  # never the whole sequence


def test_gpu_program_counts_blocked_loops_per_step():
    """``solve_every=K`` programs: a loop over blocks holding the loop over a block's steps, and a
    loop over the remainder. The inner body runs once per step, the block's own work once per K
    steps, the remainder loop in proportion; nothing is counted for a K the program does not have."""
    import jax
    import jax.numpy as jnp

    gp = _gpu_program()
    T, K, n = 11, 4, 64  # 2 blocks of 4, 3 remaining steps

    def step(c, x):
        c = jnp.tanh(c + x)
        return c, c * 2.0

    def block(c, xs):
        c, ys = jax.lax.scan(step, c, xs)
        return jnp.sin(c) + ys.sum(0), ys.sum(0)

    def run(c, xs):
        c, _ = jax.lax.scan(block, c, xs[: 2 * K].reshape(2, K, n, n))
        return jax.lax.scan(step, c, xs[2 * K :])

    text = jax.jit(run).lower(jnp.ones((n, n)), jnp.ones((T, n, n))).compile().as_text()
    computations = gp.parse_hlo(text)
    launches = gp.step_launches(computations, T, block=K)
    weights = {r["loop"]: r["per_step"] for r in launches}
    assert sorted(weights.values()) == sorted([2 / T, 2 * K / T, 3 / T]), weights
    assert not any(r["kind"] == "while" for r in launches)
    inner = [r for r in launches if r["per_step"] == 2 * K / T]
    assert inner and max(r["bytes"] for r in inner) < K * 4 * n * n  # stacking: the update only
    assert gp.step_launches(computations, T, block=K + 1) == []
    assert gp.step_launches(computations, T) == []  # no loop runs T times


def test_gpu_program_bytes_of_hlo_types():
    gp = _gpu_program()
    assert gp.array_bytes("f32[64,512,512,1]{3,2,1,0}") == 4 * 64 * 512 * 512
    assert gp.array_bytes("(bf16[3,5]{1,0}, /*index=1*/s32[], pred[7])") == 2 * 15 + 4 + 7


def test_gpu_program_needs_the_cuda_plugin_or_compiles_for_an_h100(tmp_path):
    """Without JAX's CUDA plugin the script stops with exit status 2 and says what to install; with
    it (no GPU needed), a D-RTRL step of the dense RNN (a) under 'pallas' launches the fused kernel
    for the recurrent weight's trace only (the input weight's and the bias's are small one-state
    traces, left to XLA's fusion)."""
    import importlib.util

    out = tmp_path / "program.json"
    cmd = [sys.executable, "ci/gpu_program.py", "--workloads", "dense"]
    cmd += ["--algorithms", "d_rtrl", "--backends", "pallas", "--T", "5", "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    has_plugin = importlib.util.find_spec("jax_plugins") is not None and any(
        importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)
    )
    if not has_plugin:
        assert result.returncode == 2 and "needs JAX's CUDA plugin" in result.stderr, result.stderr
        return
    assert result.returncode == 0, result.stderr
    [row] = json.loads(out.read_text())["rows"]
    kinds = [r["kind"] for r in row["launches"]]
    assert kinds.count("triton:dense_trace_update_solve") == 1


# --------------------------------------------------------------------------------------------------
# ci/gpu_check.sh, ci/compare_published_timing.py and the side-by-side models
# --------------------------------------------------------------------------------------------------


def _ci_module(name):
    sys.path.insert(0, str(ROOT / "ci"))
    import importlib

    return importlib.import_module(name)


def test_gpu_check_smoke_runs_every_part_and_renders_the_tables(tmp_path):
    """``bash ci/gpu_check.sh --smoke``: the GPU check's parts at tiny sizes on the CPU. Each part
    reports in the JSON and the log; the published comparison is skipped with its reason (no
    published package here); the figures of the measure part are well formed (BPTT's memory grows
    with T, pp_prop's does not); the tables land between the markers of a copy of the performance
    page."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUBLISHED_")}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    cmd = ["bash", "ci/gpu_check.sh", "--smoke"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = summary["parts"]
    assert {p: parts[p]["status"] for p in ("tests", "bench", "measure")} == dict.fromkeys(
        ("tests", "bench", "measure"), "ok"
    )
    assert parts["tests"]["counts"]["tests"] >= 1  # the gpu-marked tests were collected (and skipped)
    assert parts["published"]["status"] == "skipped" and "PUBLISHED_PYTHON" in parts["published"]["reason"]
    log = (tmp_path / "gpu_check.log").read_text()
    for part in ("tests", "bench", "measure"):
        assert f"{part}: ok after" in log and (tmp_path / f"{part}.log").exists()
    assert "published: skipped: no published package" in log
    [snn] = summary["large_snn"]
    assert snn["status"] == "ok" and snn["steps_per_s"] > 0 and snn["backend"] == "pallas"
    [row] = summary["step_bytes"]["rows"]
    assert row["status"] == "ok" and row["step_bytes"] > 0 and row["launches"] > 0
    # a positive, finite share: at these sizes the step's data stays in the CPU's caches, so it can
    # run faster than the 16 MiB copy that sets the roofline (over 100%, as loaded runs have shown)
    assert 0 < row["floor_us"] and 0 < row["pct_of_roofline"] < float("inf")
    temp = {(r["algorithm"], r["T"]): r["temp_bytes"] for r in summary["memory"]}
    assert temp[("bptt", 16)] > temp[("bptt", 4)] and temp[("pp_prop", 16)] == temp[("pp_prop", 4)]
    page = (tmp_path / "performance.md").read_text()
    block = page.split("<!-- gpu-check:start -->")[1].split("<!-- gpu-check:end -->")[0]
    assert "| measure | ok |" in block and "Large spiking network" in block and "T=16" in block
    results = page.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    assert "(a) dense RNN, 32 units, B=4" in results and "CPU smoke run" in results


def test_gpu_check_skips_the_parts_that_do_not_fit_its_budget(tmp_path):
    """With too little time left for a part's minimum, the part is skipped with the reason logged,
    and the summary is still rendered."""
    cmd = [sys.executable, "ci/gpu_check.py", "--smoke", "--total-s", "12", "--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUBLISHED_")}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    for part in ("tests", "bench", "measure"):
        assert parts[part]["status"] == "skipped" and "budget is spent" in parts[part]["reason"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "tests: skipped: the run's budget is spent" in log
    assert "| bench | skipped |" in (tmp_path / "performance.md").read_text()


def test_published_comparison_says_which_package_is_off_the_oracle():
    cmp = _ci_module("compare_published_timing")
    w = [1.0, 2.0]
    equal = cmp.compare_grads({"w": w}, {"w": [1.0, 2.0 + 1e-9]}, None)
    assert equal["verdict"] == "equal" and equal["max_ours_vs_published"] < 1e-6
    theirs = {"w": w, "b": [0.0, 0.0], "o": [1.0, 3.0]}
    row = cmp.compare_grads({"w": w, "b": w, "o": w}, theirs, {"w": w, "b": w})
    assert row["verdict"].startswith("published off the oracle in b 1 (zero); ours equal to it")
    assert row["verdict"].endswith("o differ with no oracle here")
    assert cmp.compare_grads({"w": [1.0, 3.0]}, {"w": w}, {"w": w})["verdict"] == "ours off the oracle"
    assert cmp.rel([0.0], [2.0]) == 1.0 and cmp.rel([1.0, 1.0], [1.0]) == float("inf")


def test_published_comparison_renders_a_table_and_a_plot(tmp_path):
    render = _ci_module("render_published_timing")
    timing = {"us_median": 12.0, "us_min": 10.0, "compile_s": 1.5, "temp_bytes": 2048, "status": "ok"}
    row = {"workload": "csr", "algorithm": "pp_prop", "label": "(b) CSR RNN", "ours": timing}
    row["published"] = {**timing, "us_min": 8.0, "us_median": 9.0}
    row.update(ratio_min=1.25, ratio_median=12.0 / 9.0)
    row["grads"] = {"verdict": "equal", "max_ours_vs_published": 3e-16}
    versions = {"ours": {"braintrace": "0.3.0", "device_kind": "cpu"}, "published": {"braintrace": "0.2.6"}}
    data = {"rows": [row], "versions": versions, "meta": {"machine": "test host", "T": 8, "rounds": 3}}
    path = tmp_path / "cmp.json"
    path.write_text(json.dumps(data))
    page = tmp_path / "performance.md"
    page.write_text("# Performance\n\nkept text\n")
    plot = tmp_path / "cmp.png"
    assert render.main([str(path), "--out", str(page), "--plot", str(plot)]) == 0
    text = page.read_text()
    assert "kept text" in text and "<!-- published:start -->" in text
    cells = "| (b) CSR RNN | pp_prop | 12.0 / 9.00 | 10.0 / 8.00 | **1.25** | 1.50 / 1.50 | 2.00 / 2.00 |"
    assert cells + " equal (3e-16) |" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # matplotlib is in the `examples` extra: the table is written alone
        assert not plot.exists() and "(cmp.png)" not in text
    else:
        assert plot.stat().st_size > 0 and "(cmp.png)" in text


def test_side_by_side_oracles_equal_this_package_on_a_two_state_unit():
    """The plain-jnp D_RTRL and pp_prop definitions the comparison judges by equal this package's
    online gradients (float64) on the shared LIF network, whose units have two states, with spikes
    flowing through the sparse recurrence; and the shared CSR RNN under pp_prop (the bias's exact
    trace, the SDDMM of the sparse weight)."""
    import brainstate
    import jax
    import jax.numpy as jnp
    import numpy as np

    import braintrace

    models, oracles = _ci_module("side_by_side_models"), _ci_module("side_by_side_oracles")
    snn = {"name": "snn", "n_hid": 24, "batch": 2, "n_in": 6, "n_out": 3, "syn_per_neuron": 4}
    csr = {"name": "csr", "n_hid": 10, "batch": 2, "n_in": 3, "n_out": 2, "density": 0.3}
    T = 14
    previous = bool(jax.config.jax_enable_x64)
    try:
        for spec, algorithm in ((snn, "d_rtrl"), (snn, "pp_prop"), (csr, "pp_prop")):
            jax.config.update("jax_enable_x64", True)
            model, loss = models.build_workload(spec, jnp.float64)
            xs, ys = (jnp.asarray(a) for a in models.make_sequences(spec, T, np.float64))
            options = {"decay_or_rank": 0.9} if algorithm == "pp_prop" else {}
            with brainstate.environ.context(precision=64):
                learner = braintrace.compile(model, algorithm, xs[0], batch_size=spec["batch"], **options)
                grads = learner.etrace_grad(xs, ys, step_fn=loss)
            grads = {k[-1]: np.asarray(v) for k, v in grads.items()}
            if algorithm == "d_rtrl":
                want = oracles.d_rtrl_oracle(spec, T)
            else:
                want = oracles.pp_prop_oracle(spec, T, 0.9)
            assert set(grads) == set(want)
            for name, value in grads.items():
                ref = np.asarray(want[name])
                assert np.linalg.norm(ref) > 0, (spec["name"], algorithm, name)  # the test can fail
                err = np.linalg.norm(value - ref) / np.linalg.norm(ref)
                assert err < 1e-10, (spec["name"], algorithm, name, err)
    finally:
        jax.config.update("jax_enable_x64", previous)
