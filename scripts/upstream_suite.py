#!/usr/bin/env python3
"""Run upstream greenback 1.3.0's own test suite against the installed greenback.

    python scripts/upstream_suite.py --implementation compiled|pure-python
                                     [--refresh] [[--] PYTEST_ARG ...]

`make test-upstream` runs it once per implementation with the venv's python.

1. Downloads the upstream sdist from the package registry with
   `pip download --no-deps --no-binary :all: greenback==1.3.0` into
   .upstream-suite/sdist/ (gitignored; kept between runs, --refresh fetches it
   again) and checks its SHA-256.
2. Reads greenback-1.3.0/greenback/_tests/{conftest,test_impl,test_util}.py
   from it and writes them, rewritten by REWRITES below, into a fresh
   .upstream-suite/<venv>-<implementation>/ directory, next to a small harness
   module (upstream_compat.py, HARNESS below) and a minimal pytest.ini. The
   upstream conftest.py is used as is. The package's empty __init__.py is not
   copied: the directory is a plain rootdir, so pytest imports the files as
   top-level modules, with the directory on sys.path.
3. Runs pytest there, outside the source tree, so `import greenback` is the
   installed wheel: `-c pytest.ini` keeps the repository's pyproject.toml
   pytest settings (testpaths, filterwarnings = error) away from upstream's
   tests; `-p upstream_compat` checks that the installed greenback, with the
   implementation asked for, is what gets imported.

Every rewrite states how many times its text occurs in the upstream file,
every deselected test must be defined exactly once, and no package-relative
import or upstream internal may be left outside the deselected tests, so a
changed upstream file fails loudly here instead of silently testing something
else. Exits non-zero
when a rewrite or deselection does not match, or when pytest fails.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import NamedTuple

UPSTREAM_VERSION = "1.3.0"
SDIST_NAME = f"greenback-{UPSTREAM_VERSION}.tar.gz"
# What the registry serves for greenback 1.3.0's sdist.
SDIST_SHA256 = "d1441f542ec9c6efb32a9250dd954a5b1cc1eb789294c19b1eb747f49cab818c"
TESTS_IN_SDIST = f"greenback-{UPSTREAM_VERSION}/greenback/_tests"
# Everything upstream's _tests directory holds; the first three are run.
RUN_FILES = ("conftest.py", "test_impl.py", "test_util.py")
ALL_FILES = frozenset(RUN_FILES + ("__init__.py",))

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".upstream-suite"

IMPLEMENTATIONS = ("compiled", "pure-python")


class Rewrite(NamedTuple):
    file: str
    old: str
    new: str
    expected_count: int  # how many times `old` occurs in upstream's file
    why: str


class Deselect(NamedTuple):
    file: str
    test: str
    why: str


REWRITES: tuple[Rewrite, ...] = (
    Rewrite(
        "test_impl.py",
        "from .._impl import ",
        "from greenback import ",
        1,
        "the tests run outside the package here; these names are all public",
    ),
    Rewrite(
        "test_util.py",
        "from .._impl import ",
        "from greenback import ",
        1,
        "the tests run outside the package here; these names are all public",
    ),
    Rewrite(
        "test_util.py",
        "from .._util import ",
        "from greenback import ",
        1,
        "the tests run outside the package here; these names are all public",
    ),
    Rewrite(
        "test_impl.py",
        "\nimport greenback\n",
        "\nimport greenback\nimport upstream_compat\n",
        1,
        "the harness that stands in for the upstream internals used below",
    ),
    Rewrite(
        "test_impl.py",
        "greenback._impl.current_task()",
        "upstream_compat.current_task()",
        4,
        "upstream-internal helper; the harness returns the same task via the public "
        "trio.lowlevel.current_task() / asyncio.current_task()",
    ),
    Rewrite(
        "test_impl.py",
        "assert not greenback._impl.task_portals\n",
        "assert not upstream_compat.live_portals()\n",
        1,
        "upstream's task->portal map does not exist here; the harness lists every "
        "Portal object still alive (via gc), which must be none once the tasks are gone",
    ),
    Rewrite(
        "test_impl.py",
        '    with pytest.raises(RuntimeError, match="only supported.*running under Trio"):\n'
        '        anyio.run(greenback.with_portal_run_tree, anyio.sleep, 1, backend="asyncio")\n',
        "    # Upstream raised here; this package supports tree portals on asyncio.\n"
        '    anyio.run(greenback.with_portal_run_tree, anyio.sleep, 0, backend="asyncio")\n',
        1,
        "tree portals on asyncio are a deliberate extension here: the call must work",
    ),
)

DESELECTED: tuple[Deselect, ...] = (
    Deselect(
        "test_impl.py",
        "test_find_ptr_in_object",
        "internal-only: tests upstream's ctypes pointer finder, which has no "
        "counterpart here",
    ),
    Deselect(
        "test_impl.py",
        "test_uncleanable_traceback",
        "this package drives the object's __await__ (as `await` does) instead of "
        "calling its broken send(); the repository's own tests pin that behaviour",
    ),
)

# Left as is on purpose:
# - conftest.py: used unchanged (it drives the async tests through anyio/Trio).
# - test_exit_task_with_error uses trio.testing.RaisesGroup, deprecated since
#   Trio 0.33: it passes, and its DeprecationWarning shows in the summary. It
#   would fail under the repository's filterwarnings = error, which is why
#   pytest.ini below does not turn warnings into errors.

PYTEST_INI = """\
# Generated by scripts/upstream_suite.py: upstream greenback's tests run with
# pytest's defaults, not the repository's pyproject.toml settings.
[pytest]
addopts = -ra
xfail_strict = true
faulthandler_timeout = 120
"""

HARNESS = '''\
"""Public stand-ins for the upstream internals that upstream's tests use.

Generated by scripts/upstream_suite.py next to the rewritten upstream tests.
Also a pytest plugin (-p upstream_compat): before any test runs, it checks
that the greenback imported is the installed one, with the implementation
that GREENBACK_NO_EXTENSIONS asks for, and that live_portals() sees a
task's portal while the task runs (so its emptiness after the tasks end means
something).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import sniffio
import trio

import greenback

__upstream_version__ = "@UPSTREAM_VERSION@"


def current_task() -> Any:
    """The running task, as upstream's greenback._impl.current_task() gives it."""
    if sniffio.current_async_library() == "trio":
        return trio.lowlevel.current_task()
    return asyncio.current_task()


def live_portals() -> list[object]:
    """Stands in for upstream's greenback._impl.task_portals (task -> portal,
    emptied as tasks go away): every Portal object of the implementation in
    use that is still alive. Once every task has ended and been collected,
    none may be left, whether or not it still provides a portal: a task's
    portal is finished (provides_portal False) once its task returns, so a
    filter on provides_portal would miss a portal kept alive past its task."""
    portal_type: type[Any]
    if greenback.__implementation__ == "compiled":
        from greenback import _core

        portal_type = _core.Portal
    else:
        from greenback import _purepy

        portal_type = _purepy.Portal
    return [obj for obj in gc.get_objects() if isinstance(obj, portal_type)]


def _expected_implementation() -> str:
    if os.environ.get("GREENBACK_NO_EXTENSIONS") == "1":
        return "pure-python"
    return "compiled"


def _installed_greenback() -> Path:
    return Path(greenback.__file__).resolve().parent


async def _sees_own_portal() -> bool:
    await greenback.ensure_portal()
    task = current_task()
    portal = task.coro if isinstance(task, trio.lowlevel.Task) else task.get_coro()
    return any(obj is portal for obj in live_portals())


def pytest_configure(config: pytest.Config) -> None:
    expected = _expected_implementation()
    if greenback.__implementation__ != expected:
        raise pytest.UsageError(
            f"greenback's {greenback.__implementation__} implementation was "
            f"imported, but this run is meant to test the {expected} one"
        )
    site_dirs = {
        Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")
    }
    if _installed_greenback().parent not in site_dirs:
        raise pytest.UsageError(
            f"greenback was imported from {_installed_greenback()}, not from this "
            f"interpreter's site-packages ({sorted(map(str, site_dirs))})"
        )
    if not trio.run(_sees_own_portal) or not asyncio.run(_sees_own_portal()):
        raise pytest.UsageError("live_portals() does not see a live task portal")


def pytest_report_header(config: pytest.Config) -> str:
    return (
        f"upstream greenback {__upstream_version__} tests (rewritten) against "
        f"greenback {greenback.__version__} ({greenback.__implementation__}) "
        f"at {_installed_greenback()}"
    )
'''


class SuiteError(Exception):
    """The upstream files are not what the rewrites expect."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_sdist(refresh: bool) -> Path:
    """The upstream sdist, downloaded from the registry unless already here."""
    sdist_dir = WORK / "sdist"
    sdist = sdist_dir / SDIST_NAME
    if refresh or not sdist.exists():
        sdist_dir.mkdir(parents=True, exist_ok=True)
        # Download beside the final place, then rename: runs for several
        # venvs may share this directory.
        with tempfile.TemporaryDirectory(dir=sdist_dir) as tmp:
            pip = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                 "--no-deps", "--no-binary", ":all:",
                 f"greenback=={UPSTREAM_VERSION}", "-d", tmp],
            )
            if pip.returncode != 0:
                raise SuiteError(f"pip download failed (exit status {pip.returncode})")
            downloaded = Path(tmp) / SDIST_NAME
            if not downloaded.exists():
                raise SuiteError(
                    f"pip download did not produce {SDIST_NAME}: "
                    f"{sorted(p.name for p in Path(tmp).iterdir())}"
                )
            os.replace(downloaded, sdist)
    digest = sha256(sdist)
    if digest != SDIST_SHA256:
        raise SuiteError(
            f"{sdist} has SHA-256 {digest}, expected {SDIST_SHA256}; "
            "rerun with --refresh, or check what the registry serves"
        )
    return sdist


def read_upstream_tests(sdist: Path) -> dict[str, str]:
    """The upstream _tests files, by name, read straight from the archive."""
    files: dict[str, str] = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parent, _, name = member.name.rpartition("/")
            if parent != TESTS_IN_SDIST or not member.isfile():
                continue
            extracted = tar.extractfile(member)
            assert extracted is not None
            files[name] = extracted.read().decode("utf-8")
    if set(files) != ALL_FILES:
        raise SuiteError(
            f"{TESTS_IN_SDIST} holds {sorted(files)}, expected {sorted(ALL_FILES)}"
        )
    if files["__init__.py"].strip():
        raise SuiteError(f"{TESTS_IN_SDIST}/__init__.py is not empty any more")
    return files


def rewrite(files: dict[str, str]) -> dict[str, str]:
    """Apply REWRITES, checking every expected count; check DESELECTED."""
    problems: list[str] = []
    out = dict(files)
    for rw in REWRITES:
        found = out[rw.file].count(rw.old)
        if found != rw.expected_count:
            problems.append(
                f"{rw.file}: expected {rw.expected_count} occurrence(s) of {rw.old!r}, "
                f"found {found} (rewrite: {rw.why})"
            )
            continue
        out[rw.file] = out[rw.file].replace(rw.old, rw.new)
    deselected_lines: dict[str, set[int]] = {name: set() for name in out}
    for de in DESELECTED:
        # Defined once exactly, and no other test whose name starts the same
        # way: pytest's --deselect matches node id prefixes.
        tests = [
            node for node in ast.parse(out[de.file]).body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name.startswith(de.test)
        ]
        if [node.name for node in tests] != [de.test]:
            problems.append(
                f"{de.file}: expected one test named {de.test}, found "
                f"{[node.name for node in tests]} (deselected: {de.why})"
            )
            continue
        first = min([tests[0].lineno] + [d.lineno for d in tests[0].decorator_list])
        last = tests[0].end_lineno or tests[0].lineno
        deselected_lines[de.file].update(range(first, last + 1))
    for name, text in out.items():
        # What must be gone once the rewrites are done, outside the tests
        # that do not run: package-relative imports and upstream internals.
        for lineno, line in enumerate(text.splitlines(), 1):
            if lineno in deselected_lines[name]:
                continue
            for leftover in ("from .", "import .", "greenback._impl", "greenback._util"):
                if leftover in line:
                    problems.append(
                        f"{name}:{lineno}: {leftover!r} is left after rewriting"
                    )
    if problems:
        raise SuiteError("upstream tests changed:\n  " + "\n  ".join(problems))
    return out


def prepare(run_dir: Path, files: dict[str, str]) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    for name in RUN_FILES:
        (run_dir / name).write_text(files[name], encoding="utf-8")
    (run_dir / "upstream_compat.py").write_text(
        HARNESS.replace("@UPSTREAM_VERSION@", UPSTREAM_VERSION), encoding="utf-8"
    )
    (run_dir / "pytest.ini").write_text(PYTEST_INI, encoding="utf-8")


def run_pytest(run_dir: Path, implementation: str, pytest_args: list[str]) -> int:
    env = dict(os.environ)
    if implementation == "pure-python":
        env["GREENBACK_NO_EXTENSIONS"] = "1"
    else:
        env.pop("GREENBACK_NO_EXTENSIONS", None)
    cmd = [
        sys.executable, "-m", "pytest",
        "-c", "pytest.ini", "--rootdir", ".", "--confcutdir", ".",
        "-p", "no:cacheprovider", "-p", "upstream_compat",
    ]
    for de in DESELECTED:
        cmd += ["--deselect", f"{de.file}::{de.test}"]
    cmd += pytest_args
    print(f"=== upstream greenback {UPSTREAM_VERSION} tests, {implementation}, "
          f"in {run_dir.relative_to(REPO)}", flush=True)
    return subprocess.run(cmd, cwd=run_dir, env=env).returncode


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Run upstream greenback's test suite against the installed greenback.",
        epilog="Other arguments go to pytest.",
        allow_abbrev=False,
    )
    parser.add_argument("--implementation", choices=IMPLEMENTATIONS, required=True,
                        help="which implementation of greenback to test")
    parser.add_argument("--refresh", action="store_true",
                        help="download the upstream sdist again")
    args, pytest_args = parser.parse_known_args()
    if pytest_args[:1] == ["--"]:
        del pytest_args[0]
    implementation: str = args.implementation
    try:
        files = rewrite(read_upstream_tests(fetch_sdist(args.refresh)))
    except SuiteError as exc:
        print(f"upstream_suite: {exc}", file=sys.stderr)
        return 2
    # One directory per venv and implementation, so runs for several venvs
    # can happen at once.
    run_dir = WORK / f"{Path(sys.prefix).name}-{implementation}"
    prepare(run_dir, files)
    return run_pytest(run_dir, implementation, pytest_args)


if __name__ == "__main__":
    sys.exit(main())
