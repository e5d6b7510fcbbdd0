"""Build the compiled core. Everything else is in pyproject.toml."""

import os

import greenlet
from Cython.Build import cythonize
from setuptools import Extension, setup

# greenlet ships greenlet/greenlet.h inside its package directory.
greenlet_include = os.path.dirname(os.path.dirname(greenlet.__file__))

extra_compile_args = os.environ.get("GREENBACK_CFLAGS", "").split()
extra_link_args = os.environ.get("GREENBACK_LDFLAGS", "").split()

extensions = [
    Extension(
        "greenback._core",
        ["greenback/_core.pyx"],
        include_dirs=[greenlet_include],
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        annotate=os.environ.get("GREENBACK_ANNOTATE") == "1",
        compiler_directives={"linetrace": os.environ.get("GREENBACK_LINETRACE") == "1"},
    )
)
