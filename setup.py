"""Build the compiled core. Everything else is in pyproject.toml.

Where the core cannot be built (no C compiler, or GREENBACK_NO_EXTENSIONS=1
at build time), greenback still installs: without the extension it runs its
pure-Python twin, and says so with a warning at import.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError

BUILD_FAILURES = (CCompilerError, CompileError, ExecError, PlatformError, OSError)


class optional_build_ext(build_ext):
    """build_ext that warns instead of failing when the core can't be built."""

    def run(self) -> None:
        try:
            super().run()
        except BUILD_FAILURES as exc:
            self._skip(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except BUILD_FAILURES as exc:
            self._skip(exc)

    def _skip(self, exc: Exception) -> None:
        print(
            f"WARNING: greenback's compiled core could not be built ({exc}); "
            "installing the pure-Python implementation only.",
            file=sys.stderr,
        )


def extensions() -> list:
    if os.environ.get("GREENBACK_NO_EXTENSIONS") == "1":
        return []
    if sys.implementation.name != "cpython":
        return []  # the core uses CPython's C API; other Pythons use the twin
    import greenlet
    from Cython.Build import cythonize

    # greenlet ships greenlet/greenlet.h inside its package directory.
    greenlet_include = os.path.dirname(os.path.dirname(greenlet.__file__))
    core = Extension(
        "greenback._core",
        ["greenback/_core.pyx"],
        include_dirs=[greenlet_include],
        extra_compile_args=os.environ.get("GREENBACK_CFLAGS", "").split(),
        extra_link_args=os.environ.get("GREENBACK_LDFLAGS", "").split(),
    )
    return cythonize(
        [core],
        annotate=os.environ.get("GREENBACK_ANNOTATE") == "1",
        compiler_directives={"linetrace": os.environ.get("GREENBACK_LINETRACE") == "1"},
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": optional_build_ext})
