"""Every difference from greenback 1.3.0 that this package keeps on purpose,
one test each. docs/differences.md lists them, with the reason for each; a
line there and a test here go together."""

from __future__ import annotations

import asyncio
import collections.abc
import gc
import importlib.metadata
import inspect
import re
import types
from typing import Any, Generator

import pytest
import sniffio
import trio
from awaitlet import awaitlet

import greenback
import greenback._core
import greenback._purepy
from conftest import Lib, pure_python
from test_misuse import CycleWithFinalizer, returns


def portal_type() -> type[Any]:
    if greenback.__implementation__ == "compiled":
        return greenback._core.Portal
    return greenback._purepy.Portal


def test_await_in_a_finalizer_run_by_the_collector_is_refused(lib: Lib) -> None:
    """Stricter: upstream runs the await_, stalling the collection until the
    task resumes. The error says what to do instead, and the coroutine it was
    given is closed, not leaked."""
    seen: list[tuple[BaseException, Any]] = []

    def on_del() -> None:
        coro = returns(1, lib)
        try:
            greenback.await_(coro)
        except RuntimeError as exc:
            seen.append((exc, coro))

    async def main() -> None:
        await greenback.ensure_portal()
        CycleWithFinalizer(on_del)
        gc.collect()
        ((error, coro),) = seen
        assert "outside the finalizer" in str(error)
        assert "loop.call_soon()" in str(error)
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED

    lib.run(main)


def test_bestow_portal_on_a_finished_task_raises(lib: Lib) -> None:
    """Stricter: upstream silently does nothing. The error says to skip
    finished tasks."""

    async def main() -> None:
        if lib.sniffio_name == "trio":
            done: list[trio.lowlevel.Task] = []

            async def child() -> None:
                done.append(trio.lowlevel.current_task())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(child)
            task: Any = done[0]
        else:
            task = asyncio.create_task(asyncio.sleep(0))
            await task
        with pytest.raises(RuntimeError, match="already finished") as info:
            greenback.bestow_portal(task)
        assert "Skip finished tasks" in str(info.value)

    lib.run(main)


def test_bestow_portal_on_a_non_task_is_a_type_error() -> None:
    """Upstream fails an internal assert (AssertionError, no message)."""
    with pytest.raises(TypeError, match="takes an asyncio.Task or a trio.lowlevel.Task, not int"):
        greenback.bestow_portal(42)  # type: ignore[arg-type]


def test_has_portal_of_a_non_task_is_false() -> None:
    """Upstream raises TypeError from its weak-keyed task map; has_portal()
    here keeps its documented promise never to raise."""
    assert greenback.has_portal(42) is False  # type: ignore[arg-type]
    assert greenback.has_portal("task") is False  # type: ignore[arg-type]


def test_a_portal_task_runs_a_coroutine_look_alike(lib: Lib) -> None:
    """The task's coroutine becomes a Portal object, not upstream's
    `greenback_shim` coroutine: asyncio.iscoroutine() holds and it shows the
    wrapped coroutine's names and code, but inspect.iscoroutine() is false."""

    async def task_body() -> None:
        await greenback.ensure_portal()
        task = lib.current_task()
        coro: Any = task.get_coro() if lib.sniffio_name == "asyncio" else task.coro
        assert isinstance(coro, portal_type())
        looks_like = (asyncio.iscoroutine(coro), inspect.iscoroutine(coro))
        assert looks_like == (True, False)
        assert issubclass(type(coro), collections.abc.Coroutine)
        assert coro.__qualname__ == task_body.__qualname__
        assert coro.__name__ == "task_body"
        assert coro.cr_code is task_body.__code__

    lib.run(task_body)


class RegisteredCoroutineWithBrokenSend(collections.abc.Coroutine):  # type: ignore[type-arg]
    """Registers as a Coroutine, but only its __await__ works."""

    def __await__(self) -> Generator[Any, None, str]:
        yield from ()
        return "via __await__"

    def send(self) -> None:  # type: ignore[override]
        raise StopIteration

    def throw(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass


def test_await_drives_dunder_await_as_native_await_does(lib: Lib) -> None:
    """`await_(x)` does what `await x` does, even for an object that claims
    to be a Coroutine: upstream calls its send() directly and fails here."""

    async def main() -> None:
        await greenback.ensure_portal()
        native = await RegisteredCoroutineWithBrokenSend()
        assert native == "via __await__"
        assert greenback.await_(RegisteredCoroutineWithBrokenSend()) == native

    lib.run(main)


def test_tree_portals_work_on_asyncio() -> None:
    """Upstream's tree portals are Trio-only (RuntimeError on asyncio)."""

    async def child() -> str:
        return str(greenback.await_(asyncio.sleep(0, "child has a portal")))

    async def subsystem() -> str:
        return await asyncio.create_task(child())

    async def main() -> str:
        return await greenback.with_portal_run_tree(subsystem)

    assert asyncio.run(main()) == "child has a portal"


def test_awaitlet_works_under_a_portal(lib: Lib) -> None:
    """Upstream's portals raise awaitlet's NoAwaitletContext (and
    SQLAlchemy's MissingGreenlet) here: its greenlets are no providers."""

    async def value() -> str:
        await lib.checkpoint()
        return "awaited through the provider protocol"

    async def main() -> str:
        await greenback.ensure_portal()
        return awaitlet(value())

    assert lib.run(main) == "awaited through the provider protocol"


def test_tracebacks_show_no_portal_internals(lib: Lib) -> None:
    """Upstream shows its shim's frames (greenback_shim, _greenback_shim,
    adapt_awaitable). Here the only greenback frame is await_ itself; the
    pure-Python twin also shows its Portal's coroutine-protocol frames."""

    async def fails() -> None:
        await lib.checkpoint()
        raise ValueError("from the awaited code")

    async def task_body() -> None:
        await greenback.ensure_portal()
        greenback.await_(fails())

    with pytest.raises(ValueError) as info:
        lib.run(task_body)
    error: BaseException = info.value
    names = []
    tb = error.__traceback__
    while tb is not None:
        if "greenback" in tb.tb_frame.f_code.co_filename.replace("\\", "/").split("/")[-2:-1]:
            names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    if pure_python():
        assert [name for name in names if name not in {"_step_driver", "_step"}] == [
            "await_"
        ]
    else:
        assert names == ["await_"]


def test_upstream_private_names_are_not_provided() -> None:
    """greenback._impl is upstream's private module; here it holds only what
    stackscope's built-in glue looks up, none of upstream's internals."""
    impl = getattr(greenback, "_impl")
    for name in ("task_portals", "current_task", "greenback_shim", "_aligned_ptr_offset_in_object"):
        assert not hasattr(impl, name), name


def test_version_is_this_package_s_own() -> None:
    """Not upstream's 1.3.0, so that pip and bug reports tell the two apart;
    semantic versioning, major 2 for the differences listed here."""
    version = greenback.__version__
    assert re.fullmatch(r"2\.\d+\.\d+", version), version
    assert importlib.metadata.version("greenback") == version
    assert greenback.__implementation__ in ("compiled", "pure-python")


def test_error_messages_keep_upstream_s_key_phrases(lib: Lib) -> None:
    """Same leading words as upstream (programs match on them), then what to
    do."""

    async def main() -> None:
        with pytest.raises(RuntimeError, match="^You must create a greenback portal for this task") as info:
            greenback.await_(returns(1, lib))
        assert "with_portal_run_sync" in str(info.value)
        greenback.bestow_portal(lib.current_task())
        with pytest.raises(RuntimeError, match="^You must yield to the event loop") as info:
            greenback.await_(returns(1, lib))
        assert "ensure_portal()" in str(info.value)

    lib.run(main)


def test_await_outside_async_code_raises_sniffio_s_error() -> None:
    """Not a difference: kept as upstream (AsyncLibraryNotFoundError), and the
    coroutine is closed."""
    coro = returns(1, None)  # type: ignore[arg-type]
    with pytest.raises(sniffio.AsyncLibraryNotFoundError):
        greenback.await_(coro)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    assert isinstance(greenback.await_, types.FunctionType)
