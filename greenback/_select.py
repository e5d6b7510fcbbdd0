"""Chooses, once at import, between the compiled core and its pure-Python twin.

The twin is used when GREENBACK_NO_EXTENSIONS=1 is set, on Python
implementations other than CPython, and (with a warning) when the compiled
core fails to import, for example when greenback was installed from source
on a machine without a C compiler.
"""

from __future__ import annotations

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
                f"greenback's compiled core could not be imported ({exc}), so the "
                "slower pure-Python implementation is in use. Reinstall greenback "
                "where a C compiler is available (or from a wheel) to get the "
                "compiled one, or set GREENBACK_NO_EXTENSIONS=1 to choose the "
                "pure-Python one and silence this warning.",
                RuntimeWarning,
                stacklevel=2,
            )
            from . import _purepy

            return _purepy, "pure-python"
        return _core, "compiled"

    impl, IMPLEMENTATION = _choose()
    del _choose
