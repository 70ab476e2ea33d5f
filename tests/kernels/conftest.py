"""Make ``braintrace_kernels`` importable from a source checkout; the tests import it by that name.

The loader lives in ``braintrace/_kernel_import.py``. Importing it through ``braintrace`` pulls in
braintrace's own dependencies (brainstate, saiunit); where they are missing, as on a bare GPU host
running only these tests (``pytest tests/kernels --confcutdir=tests/kernels -m gpu``), the loader
file is executed on its own, since it needs nothing but the standard library.
"""

from __future__ import annotations

import importlib.util
import pathlib

try:
    from braintrace._kernel_import import load_kernels
except ImportError:
    _path = pathlib.Path(__file__).resolve().parents[2] / "braintrace" / "_kernel_import.py"
    _spec = importlib.util.spec_from_file_location("_braintrace_kernel_import", _path)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    load_kernels = _module.load_kernels

load_kernels()
