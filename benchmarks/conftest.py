"""pytest configuration of the benchmark suite (run it explicitly: ``pytest benchmarks``).

* ``--gpu``: the real sizes on a CUDA GPU; without a GPU the session stops at once with a message
  and exit status 3. Without ``--gpu`` the same benchmarks run at tiny sizes (a CPU smoke run; the
  Pallas kernels run in interpret mode when there is no GPU).
* Files named ``bench_*.py`` here are collected as test modules (the repository's ``testpaths`` is
  ``tests``, so ``python -m pytest`` from the root never collects them).
* Every result lands in the pytest-benchmark JSON (``--benchmark-json=PATH``) with its figures in
  ``extra_info``; ``ci/render_performance.py`` turns that file into ``docs/performance.md``.
  ``machine_info['braintrace']`` records the device, the versions, the roofline and the command.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import jax
import pytest

from ._config import SESSION_START, SETTINGS, scale_of, seconds_left
from ._timing import BackendPairs, device_kind, has_gpu, make_loop, roofline_bytes_per_s

#: Exit status of ``pytest benchmarks --gpu`` on a machine without a GPU.
NO_GPU_EXIT_STATUS = 3

#: Filled during the session; written into the JSON's ``machine_info``.
RUN_INFO: dict = {}


def pytest_addoption(parser):
    parser.addoption(
        "--gpu",
        action="store_true",
        default=False,
        help="braintrace benchmarks: run the real sizes on a CUDA GPU (stops when JAX sees no GPU)",
    )


def pytest_configure(config):
    SESSION_START[0] = time.monotonic()
    # The memory benchmarks run configurations in subprocesses that share the GPU with this process,
    # which must therefore not take 75% of the GPU's memory up front. JAX reads this variable when it
    # creates its GPU client, which happens below, not at import.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if config.getoption("gpu") and not has_gpu():
        pytest.exit(
            "pytest benchmarks --gpu needs a CUDA GPU, but JAX sees only "
            f"{[d.platform for d in jax.devices()]} (jax {jax.__version__}). Run it on a GPU host with a "
            "CUDA-enabled jaxlib, or run `pytest benchmarks` without --gpu for the CPU smoke run.",
            returncode=NO_GPU_EXIT_STATUS,
        )


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself, whatever its name
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_benchmark_update_machine_info(config, machine_info):
    import braintrace

    args = " ".join(config.invocation_params.args)
    machine_info["braintrace"] = {
        "device_kind": device_kind(),
        "platform": jax.devices()[0].platform,
        "jax_version": jax.__version__,
        "braintrace_version": braintrace.__version__,
        "python_version": sys.version.split()[0],
        "scale": scale_of(config),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"python3 -m pytest {args}".strip(),
        **RUN_INFO,
    }


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def scale(pytestconfig) -> str:
    """``'gpu'`` or ``'cpu'``."""
    return scale_of(pytestconfig)


@pytest.fixture(scope="session")
def settings(scale) -> dict:
    return SETTINGS[scale]


@pytest.fixture(scope="session")
def interpret() -> bool:
    """Run Pallas kernels in interpret mode (no GPU)."""
    return not has_gpu()


@pytest.fixture(scope="session")
def kernels():
    """The kernel package ``braintrace_kernels``."""
    from braintrace._kernel_import import load_kernels

    return load_kernels()


@pytest.fixture(scope="session")
def roofline(settings) -> float:
    """Bytes per second of a float32 elementwise op (1 GiB on a GPU), measured once in this run."""
    value = roofline_bytes_per_s(iters=max(settings["op_iters"] // 5, 2), repeats=settings["op_rounds"])
    RUN_INFO["roofline_gb_per_s"] = value / 1e9
    RUN_INFO["roofline_method"] = (
        f"float32 elementwise op on {'1 GiB' if has_gpu() else '16 MiB'}, bytes read + written"
    )
    return value


@pytest.fixture(autouse=True)
def _within_budget(request, scale):
    """Skip a timing benchmark once the session's wall-clock budget is spent (noted in the JSON).

    The memory benchmarks record their own skipped configurations as rows.
    """
    if getattr(request.node, "originalname", request.node.name).startswith("test_memory"):
        return
    if seconds_left(scale) <= 0:
        RUN_INFO.setdefault("skipped_over_budget", []).append(request.node.nodeid)
        pytest.skip(f"the session's {SETTINGS[scale]['budget_s']:.0f} s budget is spent (BENCH_BUDGET_S)")


@pytest.fixture(autouse=True)
def _restore_backend():
    """Every test starts and ends on the ``'xla'`` backend."""
    from braintrace import _backend

    yield
    if (_backend._state["name"], _backend._state["interpret"]) != ("xla", False):
        import braintrace

        braintrace.set_backend("xla")


_PAIRS = BackendPairs()


@pytest.fixture
def op_benchmark(benchmark, settings, roofline, interpret):
    """``op_benchmark(case, backend, family)``: time one kernel case (``benchmarks._ops.Case``).

    Runs ``op_iters`` calls in one jitted loop per round and records, in ``extra_info``: the time per
    call, the bytes that must move, the achieved GB/s, the roofline of this run and the fraction of
    it, and, for the second backend of an (op, size) pair, the Pallas/XLA time ratio and the
    normwise difference of the two loops' outputs.
    """

    def run(case, backend: str, family: str):
        iters, rounds = settings["op_iters"], settings["op_rounds"]
        loop = make_loop(case.function(backend), case.args, carry=case.carry, vary=case.vary, iters=iters)
        benchmark.group = f"op:{family}"
        benchmark.name = f"{case.op}[{case.size}, {backend}]"
        out = benchmark.pedantic(loop, rounds=rounds, iterations=1, warmup_rounds=0)
        if benchmark.stats is None:  # --benchmark-disable
            return None
        seconds = benchmark.stats.stats.median / iters
        info = {
            "kind": "op",
            "family": family,
            "op": case.op,
            "size": case.size,
            "backend": backend,
            "mode": "reference" if backend == "xla" else ("interpret" if interpret else "compiled"),
            "iters_per_round": iters,
            "us_per_call": seconds * 1e6,
            "bytes_moved": case.moved,
            "trace_bytes": case.trace_bytes,
            "gb_per_s": case.moved / seconds / 1e9,
            "roofline_gb_per_s": roofline / 1e9,
            "pct_roofline": 100.0 * case.moved / seconds / roofline,
        }
        info.update(_PAIRS.record((case.op, case.size), backend, seconds, out))
        benchmark.extra_info.update(info)
        return info

    return run
