"""The package under test is the compiled, installed build, not the source tree."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import tarfile
import types
from pathlib import Path

import pytest

import greenback
import greenback._core
import greenback._purepy
from conftest import pure_python

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_core_is_a_compiled_extension_module() -> None:
    core_file = greenback._core.__file__
    assert core_file is not None
    assert core_file.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), core_file
    loader = greenback._core.__spec__.loader
    assert isinstance(loader, importlib.machinery.ExtensionFileLoader)


def test_await_switch_is_a_c_function() -> None:
    # The switch is a plain C function (no Cython traceback entry of its
    # own); in a compiled run the public await_ is the one-line facade around
    # it, whose frame is the single "await_" entry in tracebacks.
    fn = greenback._core.await_
    assert type(fn).__name__ == "builtin_function_or_method"
    assert fn.__module__ == "greenback._core"
    if not pure_python():
        from greenback import _portal

        assert greenback.await_ is _portal.await_
        assert greenback.await_.__code__.co_name == "await_"
        assert _portal._switch_out is fn


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


def test_installed_metadata_carries_the_license_expression_and_texts() -> None:
    dist = importlib.metadata.distribution("greenback")
    assert dist.metadata["License-Expression"] == "MIT OR Apache-2.0"
    shipped = {Path(str(f)).name: f for f in dist.files or () if "licenses" in str(f)}
    assert set(shipped) == {"LICENSE", "LICENSE-MIT", "LICENSE-APACHE"}
    assert "Permission is hereby granted" in shipped["LICENSE-MIT"].read_text()
    assert "Apache License" in shipped["LICENSE-APACHE"].read_text()


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
        "LICENSE",
        "LICENSE-MIT",
        "LICENSE-APACHE",
    ):
        assert shipped in names
    assert not [name for name in names if name.endswith((".c", ".so", ".html"))]


def test_implementation_under_test_is_the_one_requested() -> None:
    # `pytest --no-c-extensions` must really exercise the pure-Python twin,
    # and a plain run the compiled core.
    if pure_python():
        assert greenback.__implementation__ == "pure-python"
        assert greenback.await_ is greenback._purepy.await_
    else:
        assert greenback.__implementation__ == "compiled"
        assert greenback.await_.__globals__["_switch_out"] is greenback._core.await_


def test_pure_python_twin_is_plain_python() -> None:
    import greenback._purepy

    assert greenback._purepy.__file__ is not None
    assert greenback._purepy.__file__.endswith(".py")
    assert isinstance(greenback._purepy.await_, types.FunctionType)


@pytest.mark.skipif(sys.platform == "win32", reason="CC=/bin/false stands in for no compiler on POSIX")
def test_sdist_installs_without_a_c_compiler_and_falls_back(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path), str(REPO_ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (sdist,) = tmp_path.glob("greenback-*.tar.gz")
    site = tmp_path / "site"
    environment = {k: v for k, v in os.environ.items() if k != "GREENBACK_NO_EXTENSIONS"}
    environment["CC"] = "/bin/false"  # every compile fails, as with no compiler at all
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
         "--no-cache-dir", "--target", str(site), str(sdist)],
        capture_output=True, text=True, timeout=300, env=environment,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    assert not list(site.glob("greenback/_core*.so"))
    run = subprocess.run(
        [sys.executable, "-c",
         "import warnings; warnings.simplefilter('always')\n"
         "import greenback, asyncio\n"
         "async def main():\n"
         "    await greenback.ensure_portal()\n"
         "    return greenback.await_(asyncio.sleep(0, 'works'))\n"
         "print(greenback.__implementation__, asyncio.run(main()), greenback.__file__)"],
        capture_output=True, text=True, timeout=60,
        env={**environment, "PYTHONPATH": str(site)}, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    implementation, result, location = run.stdout.split()
    assert (implementation, result) == ("pure-python", "works")
    assert location.startswith(str(site))
    assert run.stderr.count("compiled core could not be imported") == 1
