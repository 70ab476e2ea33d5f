"""Import the kernel package ``braintrace_kernels`` from a wheel or from a source checkout.

An installed wheel ships the top-level ``kernels/`` folder as the package ``braintrace_kernels``
(the name ``kernels`` belongs to an unrelated PyPI project). A source checkout on ``PYTHONPATH``
has only the folder, so it is loaded from ``<checkout>/kernels`` under the same name.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys

__all__ = ["load_kernels", "kernel_module"]


def load_kernels():
    """The ``braintrace_kernels`` module (imported once, then cached in ``sys.modules``)."""
    if "braintrace_kernels" in sys.modules:
        return sys.modules["braintrace_kernels"]
    try:
        return importlib.import_module("braintrace_kernels")
    except ImportError:
        pass
    folder = pathlib.Path(__file__).resolve().parent.parent / "kernels"
    init = folder / "__init__.py"
    if not init.exists():
        raise ImportError(
            "braintrace_kernels is not installed and no `kernels/` folder sits beside the braintrace "
            "package; install braintrace (pip install .) or run from a source checkout."
        )
    spec = importlib.util.spec_from_file_location(
        "braintrace_kernels", init, submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["braintrace_kernels"] = module
    spec.loader.exec_module(module)
    return module


def kernel_module(name: str):
    """The kernel module ``braintrace_kernels.<name>`` (e.g. ``'dense'``, ``'csr'``, ``'lora'``)."""
    load_kernels()
    return importlib.import_module(f"braintrace_kernels.{name}")
