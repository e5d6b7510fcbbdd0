"""Sphinx configuration for greenback's documentation.

`make docs` runs Sphinx from this directory with the package's venv, so
autodoc and the doctests import the installed wheel, never the source tree.
"""

from __future__ import annotations

import os
import sys

import greenback

# Importing the source tree would quietly document (and doctest) the
# pure-Python fallback; the site describes what users install.
if os.path.dirname(os.path.dirname(os.path.abspath(greenback.__file__))) == os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))
):
    sys.exit("docs: greenback was imported from the source tree; run `make docs`")

project = "greenback"
author = "the greenback contributors"
copyright = "2026, the greenback contributors"
release = greenback.__version__
version = ".".join(release.split(".")[:2])

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext"))

extensions = [
    "api_reference",
    "sphinx.ext.doctest",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"greenback {release}"
myst_heading_anchors = 3

# Every cross-reference must resolve. Names from outside this project are
# listed here one by one (no intersphinx: the build must work offline), so a
# typo in a reference to greenback's own API still fails the build.
nitpicky = True
nitpick_ignore = [
    ("py:class", name)
    for name in (
        "Any",
        "Awaitable",
        "AsyncGenerator",
        "AsyncIterable",
        "AsyncIterator",
        "Callable",
        "Coroutine",
        "Iterator",
        "Generator",
        "ContextManager",
        "AbstractAsyncContextManager",
        "AbstractContextManager",
        "AsyncContextManager",
        "TracebackType",
        "asyncio.Task",
        "trio.lowlevel.Task",
        "trio.abc.Instrument",
        "trio.lowlevel.RunVar",
        "T",
        "R",
        "S",
        "Y",
        "P",
        "P.args",
        "P.kwargs",
        "Q",
        "Q.args",
        "Q.kwargs",
        # decorate_as_sync()'s overloads: protocols of "a decorator that keeps
        # the signature", explained in its entry.
        "_SignaturePreserving",
        "_AsyncSignaturePreserving",
    )
] + [
    # Exceptions named in the docstrings' ":raises X:" fields that come from
    # other packages (the built-in ones resolve without help).
    ("py:exc", name)
    for name in (
        "sniffio.AsyncLibraryNotFoundError",
        "asyncio.CancelledError",
        "trio.Cancelled",
    )
]


# The doctests run against the installed package; each page's examples share
# one namespace, and these names are available to all of them.
doctest_global_setup = """
import asyncio
import functools
import trio
import greenback
"""
