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
