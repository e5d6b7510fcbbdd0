"""Shared fixtures: every behaviour test runs once per event loop flavour.

The `lib` fixture gives a small adapter so one test body can run on asyncio,
uvloop, Trio, and anyio on either backend.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Coroutine, Callable, TypeVar, cast

import anyio
import pytest
import trio

uvloop: ModuleType | None
try:
    uvloop = importlib.import_module("uvloop")
except ImportError:  # pragma: no cover - uvloop has no wheels for every platform
    uvloop = None


T = TypeVar("T")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-c-extensions",
        action="store_true",
        help="test greenback's pure-Python implementation instead of the compiled one",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Before any test module imports greenback, which picks its
    # implementation once, at import.
    if config.getoption("--no-c-extensions"):
        os.environ["GREENBACK_NO_EXTENSIONS"] = "1"
    else:
        os.environ.pop("GREENBACK_NO_EXTENSIONS", None)
    # Under `make test-asan`, LeakSanitizer checks this process (its options
    # were read at start-up). The interpreters that tests start on purpose
    # with tasks or daemon threads still alive at exit leak by design (CPython
    # frees neither), and LSan's tracer can crash scanning them, so they keep
    # AddressSanitizer's memory checks but not the leak check.
    asan_options = os.environ.get("ASAN_OPTIONS", "")
    if "detect_leaks=1" in asan_options:
        os.environ["ASAN_OPTIONS"] = asan_options.replace("detect_leaks=1", "detect_leaks=0")


def pytest_report_header(config: pytest.Config) -> str:
    pure = config.getoption("--no-c-extensions")
    return f"greenback implementation under test: {'pure-python' if pure else 'compiled'}"


def pure_python() -> bool:
    """True when this run tests the pure-Python twin."""
    return os.environ.get("GREENBACK_NO_EXTENSIONS") == "1"


@dataclass(frozen=True)
class Lib:
    """How to run things and checkpoint on one event loop."""

    name: str  # "asyncio", "uvloop", "trio", "anyio-asyncio", "anyio-trio"
    sniffio_name: str  # what sniffio reports: "asyncio" or "trio"

    def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        if self.name == "asyncio":
            return asyncio.run(fn(*args))
        if self.name == "uvloop":
            assert uvloop is not None
            if sys.version_info >= (3, 11):
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    return runner.run(fn(*args))
            else:
                result: T = uvloop.run(fn(*args))
                return result
        if self.name == "trio":
            return trio.run(fn, *args)
        backend = self.name.split("-", 1)[1]
        return anyio.run(fn, *args, backend=backend)

    async def checkpoint(self) -> None:
        if self.sniffio_name == "trio":
            await trio.lowlevel.checkpoint()
        else:
            await asyncio.sleep(0)

    async def sleep(self, seconds: float) -> None:
        if self.sniffio_name == "trio":
            await trio.sleep(seconds)
        else:
            await asyncio.sleep(seconds)

    def current_task(self) -> Any:
        if self.sniffio_name == "trio":
            return trio.lowlevel.current_task()
        return asyncio.current_task()


_CORE_LIBS = [Lib("asyncio", "asyncio"), Lib("trio", "trio")]
_EXTRA_LIBS = [Lib("anyio-asyncio", "asyncio"), Lib("anyio-trio", "trio")]
if uvloop is not None:
    _EXTRA_LIBS.insert(0, Lib("uvloop", "asyncio"))


@pytest.fixture(params=_CORE_LIBS, ids=lambda lib: lib.name)
def lib(request: pytest.FixtureRequest) -> Lib:
    """asyncio and Trio."""
    return cast(Lib, request.param)


@pytest.fixture(params=_CORE_LIBS + _EXTRA_LIBS, ids=lambda lib: lib.name)
def any_lib(request: pytest.FixtureRequest) -> Lib:
    """Every supported way of running: asyncio, uvloop, Trio, anyio x2."""
    return cast(Lib, request.param)
