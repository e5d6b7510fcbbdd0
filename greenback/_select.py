"""Chooses, once at import, between the compiled core and its pure-Python twin.

The twin is used when GREENBACK_NO_EXTENSIONS=1 is set, on Python
implementations other than CPython, and (with a warning) when the compiled
core fails to import, for example when greenback was installed from source
on a machine without a C compiler.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    # Both modules have the same names; _core.pyi is the reference.
    from . import _core

    impl = _core
    IMPLEMENTATION: Literal["compiled", "pure-python"]
else:

    def _choose():
        if os.environ.get("GREENBACK_NO_EXTENSIONS") == "1":
            from . import _purepy

            return _purepy, "pure-python"
        if sys.implementation.name != "cpython":
            from . import _purepy

            return _purepy, "pure-python"
        try:
            from . import _core
        except ImportError as exc:
            warnings.warn(
                f"greenback's compiled core could not be imported: {_why(exc)} "
                "The slower pure-Python implementation is in use instead. "
                "Reinstall greenback from a wheel, or from source where a C "
                "compiler is available, to get the compiled one; or set "
                "GREENBACK_NO_EXTENSIONS=1 to choose the pure-Python one and "
                "silence this warning.",
                RuntimeWarning,
                stacklevel=2,
            )
            from . import _purepy

            return _purepy, "pure-python"
        return _core, "compiled"

    def _why(exc):
        try:
            missing = importlib.util.find_spec(__package__ + "._core") is None
        except (ImportError, ValueError):
            missing = True
        if missing:
            return (
                "it is not installed: there is no compiled greenback._core beside "
                "greenback's Python files (greenback was installed from source "
                "where no C compiler was found, or this is a source checkout "
                "that has not been built)."
            )
        # Python's own wording would blame a circular import whenever a module
        # fails half-way through its import; that points users the wrong way.
        detail = str(exc).replace(" (most likely due to a circular import)", "")
        return (
            "it is installed but broken, and failed to load with "
            f"{type(exc).__name__}: {detail}. A wheel built for another Python "
            "version or another greenlet release, or a partial install, does this."
        )

    impl, IMPLEMENTATION = _choose()
    del _choose, _why
