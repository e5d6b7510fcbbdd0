"""The package under test is the compiled, installed build, not the source tree."""

from __future__ import annotations

import importlib.machinery
import subprocess
import sys
import sysconfig
import tarfile
import types
from pathlib import Path

import greenback
import greenback._core

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_core_is_a_compiled_extension_module() -> None:
    core_file = greenback._core.__file__
    assert core_file is not None
    assert core_file.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), core_file
    loader = greenback._core.__spec__.loader
    assert isinstance(loader, importlib.machinery.ExtensionFileLoader)


def test_await_is_a_compiled_function() -> None:
    fn = greenback._core.await_
    assert not isinstance(fn, types.FunctionType)
    kind = type(fn).__name__
    assert "cython" in kind.lower() or kind == "builtin_function_or_method", kind
    # The public name is the compiled object itself, not a Python wrapper.
    assert greenback.await_ is fn


def test_portal_is_a_static_c_type() -> None:
    portal_type = greenback._core.Portal
    assert isinstance(portal_type, type)
    Py_TPFLAGS_HEAPTYPE = 1 << 9
    assert not portal_type.__flags__ & Py_TPFLAGS_HEAPTYPE
    assert portal_type.__module__ == "greenback._core"


def _site_dirs() -> set[Path]:
    paths = sysconfig.get_paths()
    return {Path(paths[key]).resolve() for key in ("purelib", "platlib")}


def test_imported_package_is_the_installed_copy() -> None:
    assert greenback.__file__ is not None
    pkg_dir = Path(greenback.__file__).resolve().parent
    assert pkg_dir != (REPO_ROOT / "greenback").resolve()
    assert not pkg_dir.is_relative_to(REPO_ROOT / "greenback")
    assert any(pkg_dir.parent == site for site in _site_dirs()), (pkg_dir, _site_dirs())
    core_dir = Path(greenback._core.__file__ or "").resolve().parent
    assert core_dir == pkg_dir


def test_py_typed_ships_with_the_installed_package() -> None:
    assert greenback.__file__ is not None
    pkg_dir = Path(greenback.__file__).resolve().parent
    assert (pkg_dir / "py.typed").is_file()


def test_sdist_ships_sources_and_types_but_no_generated_c(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path), str(REPO_ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (sdist,) = tmp_path.glob("greenback-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for shipped in (
        "greenback/py.typed",
        "greenback/__init__.pyi",
        "greenback/_core.pyi",
        "greenback/_core.pyx",
        "greenback/_greenlet.pxd",
    ):
        assert shipped in names
    assert not [name for name in names if name.endswith((".c", ".so", ".html"))]
