"""greenback._select: which implementation greenback uses, and when."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "GREENBACK_NO_EXTENSIONS"}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=environment
    )


def test_compiled_by_default() -> None:
    proc = run_python("import greenback; print(greenback.__implementation__)")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "compiled\n", "")


@pytest.mark.parametrize("value, expected", [("1", "pure-python"), ("0", "compiled"), ("", "compiled")])
def test_environment_variable_selects_pure_python(value: str, expected: str) -> None:
    proc = run_python(
        "import greenback; print(greenback.__implementation__)", GREENBACK_NO_EXTENSIONS=value
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{expected}\n", "")


def test_falls_back_with_one_clear_warning_when_the_extension_fails_to_import() -> None:
    code = (
        "import sys, warnings\n"
        "sys.modules['greenback._core'] = None  # as if the .so could not load\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import greenback, greenback._portal, greenback._tree\n"
        "print(greenback.__implementation__)\n"
        "print(len(caught), caught[0].category.__name__)\n"
        "print(caught[0].message)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    implementation, count, message = proc.stdout.splitlines()
    assert implementation == "pure-python"
    assert count == "1 RuntimeWarning"
    assert "compiled core could not be imported: it is not installed" in message
    assert "GREENBACK_NO_EXTENSIONS=1" in message


def test_a_broken_extension_is_called_broken_not_a_circular_import() -> None:
    # An extension that fails half-way through its import makes Python blame
    # "a circular import"; the warning must say the core is broken, and why.
    code = (
        "import importlib.machinery, sys, warnings\n"
        "class Broken(importlib.machinery.ExtensionFileLoader):\n"
        "    def exec_module(self, module):\n"
        "        raise ImportError(\"cannot import name 'Portal' from partially \"\n"
        "            \"initialized module 'greenback._core' (most likely due to a \"\n"
        "            \"circular import)\")\n"
        "class Finder:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'greenback._core':\n"
        "            spec = importlib.machinery.PathFinder.find_spec(name, path)\n"
        "            spec.loader = Broken(name, spec.origin)\n"
        "            return spec\n"
        "sys.meta_path.insert(0, Finder())\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import greenback\n"
        "print(greenback.__implementation__)\n"
        "print(caught[0].message)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    implementation, message = proc.stdout.splitlines()
    assert implementation == "pure-python"
    assert "compiled core could not be imported: it is installed but broken" in message
    assert "ImportError: cannot import name 'Portal'" in message
    assert "circular import" not in message


def test_pure_python_on_other_implementations() -> None:
    # PyPy and friends get the twin without trying the extension.
    code = (
        "import sys\n"
        "sys.modules['greenback._core'] = None\n"
        "sys.implementation.name = 'pypy'\n"
        "import warnings; warnings.simplefilter('error')\n"
        "import greenback\n"
        "print(greenback.__implementation__)\n"
    )
    proc = run_python(code)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "pure-python\n", "")


def test_pure_python_twin_works_end_to_end() -> None:
    code = (
        "import asyncio, greenback\n"
        "async def double(x):\n"
        "    await asyncio.sleep(0)\n"
        "    return 2 * x\n"
        "async def main():\n"
        "    await greenback.ensure_portal()\n"
        "    return greenback.await_(double(21))\n"
        "print(greenback.__implementation__, asyncio.run(main()))\n"
    )
    proc = run_python(code, GREENBACK_NO_EXTENSIONS="1")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "pure-python 42\n", "")
