"""Sphinx configuration of the braintrace documentation (Markdown pages through MyST).

Build (warnings are errors, as in CI)::

    pip install -e ".[docs]"
    sphinx-build -W -b html docs docs/_build/html
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import warnings
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the checkout's braintrace, installed or not

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # importing the package for autodoc needs no GPU
warnings.filterwarnings("ignore", category=DeprecationWarning)

import braintrace  # noqa: E402

project = "braintrace"
author = "the braintrace authors"
copyright = "the braintrace authors; Apache License 2.0"
release = braintrace.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_data", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Docstrings are NumPy style (the kernels use Google style); napoleon reads both.
napoleon_numpy_docstring = True
napoleon_google_docstring = True
napoleon_use_rtype = False
# "Attributes" sections become field lists, so dataclass fields that autodoc lists as members are
# not described twice.
napoleon_use_ivar = True
# Custom sections used by the layer docstrings.
napoleon_custom_sections = [("States", "params_style")]

autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_class_signature = "mixed"

html_theme = "alabaster"
html_title = f"braintrace {release}"
html_static_path: list = []

# Links from a page in docs/ to the repository's top-level files (``../README.md#gpu-backend``) lie
# outside the Sphinx source tree and would become downloads of the raw file. On this site they point
# to the page that covers the same ground instead; the Markdown stays as it reads on GitHub.
_OUTSIDE_LINKS = {
    "README.md": "index.md",
    "README.md#demo": "examples.md",
    "README.md#tests": "installation.md",
    "README.md#quickstart": "quickstart.md",
    "README.md#the-wrappers": "quickstart.md",
    "README.md#a-custom-etp-primitive": "primitives.md",
    "README.md#online-learning": "quickstart.md",
    "README.md#gpu-backend": "backend.md",
    "CONTRIBUTING.md": "backend.md#adding-a-kernel",
}
_OUTSIDE_LINK = re.compile(r"\]\((?:\.\./)+((?:README|CONTRIBUTING)\.md)(#[\w-]+)?\)")


def _rewrite_outside_links(app, docname, source):
    def repl(match):
        key = match.group(1) + (match.group(2) or "")
        return "](" + _OUTSIDE_LINKS.get(key, _OUTSIDE_LINKS[match.group(1)]) + ")"

    source[0] = _OUTSIDE_LINK.sub(repl, source[0])


# Every public name must appear in the API reference: the build fails (under -W) otherwise.
_DIRECTIVE = re.compile(r"^\.\. auto(?:function|class|data|module|exception):: (\S+)", re.M)


def _check_api_coverage(app):
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    text = (DOCS / "api.md").read_text()
    documented = set(_DIRECTIVE.findall(text))
    expected = {f"braintrace.{n}" for n in braintrace.__all__ if n != "nn"}
    expected |= {f"braintrace.nn.{n}" for n in braintrace.nn.__all__}
    for name in sorted(expected - documented):
        logger.warning(f"api.md does not document the public name {name}", type="braintrace", subtype="api")


# brainstate modules are built by a metaclass whose ``__call__(*args, **kwargs)`` hides the signature of
# ``__init__`` from autodoc; show ``__init__``'s parameters instead, with short defaults (initializers
# print over several lines, functions with their address).
def _short_default(value) -> str:
    if inspect.isfunction(value) or inspect.isbuiltin(value):
        return value.__name__
    text = repr(value)
    if "\n" in text or " at 0x" in text or len(text) > 40:
        return f"{type(value).__name__}(...)"
    return text


def _class_signature(app, what, name, obj, options, signature, return_annotation):
    if what != "class" or signature != "(*args, **kwargs)":
        return None
    params = list(inspect.signature(obj.__init__).parameters.values())[1:]
    parts = []
    for p in params:
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        default = "" if p.default is p.empty else "=" + _short_default(p.default)
        parts.append(prefix + p.name + default)
    return "(" + ", ".join(parts) + ")", None


def setup(app):
    app.connect("autodoc-process-signature", _class_signature)
    app.connect("source-read", _rewrite_outside_links)
    app.connect("builder-inited", _check_api_coverage)
