"""The examples in docstrings and in the documentation pages run, and print what they say.

* Every module of ``braintrace`` (and of its kernel package ``braintrace_kernels``) that has docstring
  examples runs them with :func:`doctest.testmod`, in a subprocess: the examples register primitives
  and switch backends, which must not leak into the other tests. Modules whose examples change global
  numerical settings (``brainstate.environ.set(precision=64)``, ``jax_enable_x64``) each get a
  subprocess of their own; the others share one.
* The ``python`` code blocks of each page in ``docs/`` run in order in one fresh interpreter.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
GLOBAL_SETTINGS = re.compile(r"precision\s*=\s*64|enable_x64|environ\.set\(")

_RUNNER = r"""
import doctest, importlib, json, sys, warnings
warnings.simplefilter("ignore")
flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
results = {}
for name in sys.argv[1:]:
    runner_out = []
    mod = importlib.import_module(name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=flags)
    for test in finder.find(mod, name):
        runner.run(test, out=runner_out.append)
    summary = runner.summarize(verbose=False)
    results[name] = {"attempted": summary.attempted, "failed": summary.failed, "report": "".join(runner_out)}
print("DOCTEST-RESULTS " + json.dumps(results))
"""


def _modules():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import braintrace
        from braintrace._kernel_import import load_kernels

        kernels = load_kernels()
        names = ["braintrace"] + [m.name for m in pkgutil.walk_packages(braintrace.__path__, "braintrace.")]
        names += ["braintrace_kernels"] + [
            m.name for m in pkgutil.walk_packages(kernels.__path__, "braintrace_kernels.")
        ]
        with_examples, isolated = [], []
        for name in names:
            tests = doctest.DocTestFinder().find(importlib.import_module(name), name)
            sources = [ex.source for t in tests for ex in t.examples]
            if sources:
                with_examples.append(name)
                if any(GLOBAL_SETTINGS.search(s) for s in sources):
                    isolated.append(name)
    return with_examples, isolated


MODULES, ISOLATED = _modules()


def _env():
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "MPLBACKEND": "Agg"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run_doctests(names, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, *names],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("DOCTEST-RESULTS ")), None)
    assert line is not None, f"the doctest runner failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(line[len("DOCTEST-RESULTS ") :])


@pytest.fixture(scope="module")
def shared_results(tmp_path_factory):
    """Results of every module that changes no global setting, from one subprocess."""
    return _run_doctests([m for m in MODULES if m not in ISOLATED], tmp_path_factory.mktemp("doctest"))


def test_modules_with_examples_were_found():
    assert "braintrace._etrace_op.dense" in MODULES and "braintrace.nn.neurons" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module, shared_results, tmp_path):
    result = _run_doctests([module], tmp_path)[module] if module in ISOLATED else shared_results[module]
    assert result["attempted"] > 0
    assert result["failed"] == 0, f"{result['failed']} failing example(s) in {module}:\n{result['report']}"


# --------------------------------------------------------------------------------------------------
# code blocks of the documentation pages
# --------------------------------------------------------------------------------------------------

DOC_PAGES = sorted(p.name for p in (ROOT / "docs").glob("*.md") if "```python" in p.read_text())


@pytest.mark.parametrize("page", DOC_PAGES)
def test_docs_code_blocks(page, tmp_path):
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "docs" / page).read_text(), re.S | re.M)
    for name in sorted(set(re.findall(r"^(?:import|from) (\w+)", "\n".join(blocks), re.M))):
        if importlib.util.find_spec(name) is None:  # optax: the `examples` extra, which .ci/run installs
            pytest.skip(f"docs/{page} imports {name}, which is not installed")
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(f"# --- block {i}\n{b}" for i, b in enumerate(blocks)))
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", str(script)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"docs/{page}: a code block failed:\n{proc.stdout}\n{proc.stderr}"


def test_docs_pages_with_code_were_found():
    assert {"quickstart.md", "primitives.md"} <= set(DOC_PAGES)
