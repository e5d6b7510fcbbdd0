"""What goes wrong, and how it is reported: missing portals, unsupported
libraries, bad awaitables, exceptions passing through await_ and
with_portal_run*, and the tracebacks they carry."""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import types
from typing import Any, Callable, Generator

import pytest
import sniffio
import trio

import greenback

from conftest import Lib, pure_python

GREENBACK_DIR = os.path.dirname(os.path.abspath(greenback.__file__))


async def returns_at_once(value: int) -> int:
    return value


def from_greenback(frame: types.FrameType) -> bool:
    filename = frame.f_code.co_filename
    if os.path.isabs(filename):
        return os.path.dirname(os.path.abspath(filename)) == GREENBACK_DIR
    # Cython frames carry the source path relative to the build directory.
    return filename.replace("\\", "/").startswith("greenback/")


def tb_frames(exc: BaseException) -> list[types.FrameType]:
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def tb_names(exc: BaseException) -> list[str]:
    # Exact names: tools and upstream's tests match on co_name == "await_".
    return [frame.f_code.co_name for frame in tb_frames(exc)]


# The pure-Python twin's portal shows its own coroutine-protocol frames when
# an exception leaves it (as upstream greenback does); the compiled core's
# tracebacks show none of its internals.
PURE_SHIM_FRAMES = {"_step", "_step_driver"}  # the pure twin's step (see _purepy)


def greenback_frames(exc: BaseException) -> list[str]:
    """The greenback frames in exc's traceback, minus the pure twin's shim."""
    frames = []
    for frame in tb_frames(exc):
        if not from_greenback(frame):
            continue
        name = frame.f_code.co_name.rsplit(".", 1)[-1]
        if pure_python() and name in PURE_SHIM_FRAMES:
            assert frame.f_code.co_filename.endswith("_purepy.py")
            continue
        frames.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")
    return frames


def public_frames_only(exc: BaseException, public_name: str) -> bool:
    """True if the only greenback frame in the traceback is the public
    function's own (with_portal_run* are plain async functions), and no
    portal or worker internals show up."""
    names = [entry.rsplit(":", 1)[1] for entry in greenback_frames(exc)]
    return names == [public_name]


# --------------------------------------------------------------------------
# No portal, no async library, unsupported library
# --------------------------------------------------------------------------


def test_await_without_portal(lib: Lib) -> None:
    def sync_code() -> None:
        coro = returns_at_once(1)
        with pytest.raises(RuntimeError) as info:
            greenback.await_(coro)
        message = str(info.value)
        assert "create a greenback portal" in message
        assert "greenback.ensure_portal()" in message
        assert "with_portal_run" in message
        # The coroutine was closed rather than left to warn.
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
        del coro
        gc.collect()  # a "never awaited" RuntimeWarning would fail the test

    async def main() -> None:
        sync_code()
        await lib.checkpoint()
        sync_code()
        # The portal of a finished with_portal_run_sync() is gone, too.
        await greenback.with_portal_run_sync(lambda: None)
        sync_code()

    lib.run(main)


def test_await_without_portal_other_awaitables(
    lib: Lib,
) -> None:
    @types.coroutine
    def gen_coro() -> Generator[Any, None, int]:
        yield from lib.checkpoint().__await__()
        return 1

    class Awaitable:
        def __await__(self) -> Generator[Any, None, None]:
            yield from ()

    async def main() -> None:
        with pytest.raises(RuntimeError, match="create a greenback portal"):
            greenback.await_(gen_coro())
        gc.collect()
        with pytest.raises(RuntimeError, match="create a greenback portal"):
            greenback.await_(Awaitable())

    lib.run(main)


def test_await_outside_async_context() -> None:
    coro = returns_at_once(1)
    with pytest.raises(sniffio.AsyncLibraryNotFoundError):
        greenback.await_(coro)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    del coro
    gc.collect()
    assert greenback.has_portal() is False


def test_ensure_portal_outside_async_context() -> None:
    coro = greenback.ensure_portal()
    with pytest.raises(sniffio.AsyncLibraryNotFoundError):
        coro.send(None)
    coro.close()


def test_unsupported_library(lib: Lib) -> None:
    """sniffio reports a library greenback does not know: greenback says so.

    Trio tells sniffio through sniffio.thread_local, which wins over the
    context variable, so pretend there."""

    def pretend_curio() -> Any:
        if lib.sniffio_name == "trio":
            previous = sniffio.thread_local.name
            sniffio.thread_local.name = "curio"
            return lambda: setattr(sniffio.thread_local, "name", previous)
        token = sniffio.current_async_library_cvar.set("curio")
        return lambda: sniffio.current_async_library_cvar.reset(token)

    async def main() -> None:
        undo = pretend_curio()
        try:
            assert sniffio.current_async_library() == "curio"
            coro = returns_at_once(1)
            with pytest.raises(RuntimeError, match="greenback does not support curio"):
                greenback.await_(coro)
            assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
            ensure = greenback.ensure_portal()
            with pytest.raises(RuntimeError, match="greenback does not support curio"):
                ensure.send(None)
            ensure.close()
            assert greenback.has_portal() is False
        finally:
            undo()
        # With the real library back, all is well again.
        await greenback.ensure_portal()
        assert greenback.await_(returns_at_once(3)) == 3

    lib.run(main)
    gc.collect()


def test_await_non_awaitable(lib: Lib) -> None:
    async def main() -> None:
        await greenback.ensure_portal()
        with pytest.raises(TypeError, match="int can't be used in 'await' expression"):
            greenback.await_(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="can't be used in 'await' expression"):
            greenback.await_(returns_at_once)  # type: ignore[arg-type]
        # The portal is unharmed.
        assert greenback.await_(returns_at_once(5)) == 5

    lib.run(main)


def test_with_portal_run_non_awaitable(lib: Lib) -> None:
    async def main() -> None:
        not_async: Callable[[], Any] = lambda: 42
        with pytest.raises(TypeError, match="int can't be used in 'await' expression"):
            await greenback.with_portal_run(not_async)
        assert not greenback.has_portal()

    lib.run(main)


# --------------------------------------------------------------------------
# Exceptions passing through
# --------------------------------------------------------------------------


class FakeInterrupt(BaseException):
    pass


@pytest.mark.parametrize("exc_type", [FakeInterrupt, KeyboardInterrupt, SystemExit])
def test_base_exceptions_pass_through_await(lib: Lib, exc_type: type[BaseException]) -> None:
    raised = exc_type("stop")

    async def raiser() -> None:
        await lib.checkpoint()
        raise raised

    def sync_code() -> BaseException:
        try:
            greenback.await_(raiser())
        except BaseException as exc:  # noqa: B036 - the point of the test
            return exc
        raise AssertionError("nothing raised")

    async def main() -> None:
        await greenback.ensure_portal()
        caught = sync_code()
        assert caught is raised
        assert type(caught) is exc_type
        assert caught.__cause__ is None
        # And out of with_portal_run_sync as well, to the async caller.
        with pytest.raises(exc_type) as info:
            await greenback.with_portal_run_sync(greenback.await_, raiser())
        assert info.value is raised

    lib.run(main)


@pytest.mark.parametrize("already", [False, True], ids=["fresh", "had_portal"])
def test_with_portal_run_sync_propagates_exceptions(lib: Lib, already: bool) -> None:
    class Oops(Exception):
        pass

    raised = Oops("sync")

    def failing_sync(after_await: bool) -> None:
        if after_await:
            greenback.await_(lib.checkpoint())
        raise raised

    async def failing_async() -> None:
        await lib.checkpoint()
        raise raised

    async def main() -> None:
        if already:
            await greenback.ensure_portal()
        for after_await in (False, True):
            raised.__traceback__ = None  # re-raising would extend the old one
            with pytest.raises(Oops) as info:
                await greenback.with_portal_run_sync(failing_sync, after_await)
            assert info.value is raised
            # The public async function itself is the only greenback frame.
            assert public_frames_only(info.value, "with_portal_run_sync")
            assert tb_names(info.value)[-1] == "failing_sync"
        raised.__traceback__ = None
        with pytest.raises(Oops) as info:
            await greenback.with_portal_run(failing_async)
        assert info.value is raised
        assert public_frames_only(info.value, "with_portal_run")
        assert greenback.has_portal() is already

    lib.run(main)


@pytest.mark.parametrize("already", [False, True], ids=["fresh", "had_portal"])
def test_with_portal_run_sync_stopiteration_becomes_runtimeerror(
    lib: Lib, already: bool
) -> None:
    def stops() -> None:
        raise StopIteration(7)

    def stops_after_await() -> None:
        greenback.await_(lib.checkpoint())
        next(iter([]))

    async def main() -> None:
        if already:
            await greenback.ensure_portal()
        for fn in (stops, stops_after_await):
            with pytest.raises(RuntimeError) as info:
                await greenback.with_portal_run_sync(fn)
            assert isinstance(info.value.__cause__, StopIteration)
        # The task is fine afterwards.
        assert await greenback.with_portal_run_sync(lambda: 3) == 3

    lib.run(main)


def test_asyncio_bad_yield_reaches_both_await_and_await_() -> None:
    """A coroutine that yields something asyncio does not understand gets a
    RuntimeError thrown back in by the loop; it must arrive the same way
    through await_ as through a native await."""

    @types.coroutine
    def bad_yield() -> Generator[int, None, None]:
        yield 42

    def sync_code() -> RuntimeError:
        with pytest.raises(RuntimeError) as info:
            greenback.await_(bad_yield())
        return info.value

    async def main() -> None:
        with pytest.raises(RuntimeError) as native:
            await bad_yield()
        await greenback.ensure_portal()
        via_await_ = sync_code()
        assert type(via_await_) is type(native.value)
        assert str(via_await_) == str(native.value)
        assert "42" in str(via_await_)
        # The task carries on.
        await asyncio.sleep(0)
        assert greenback.await_(returns_at_once(1)) == 1

    asyncio.run(main())


# --------------------------------------------------------------------------
# Tracebacks
# --------------------------------------------------------------------------


class Boom(Exception):
    pass


def test_traceback_through_await_(lib: Lib) -> None:
    async def innermost() -> None:
        await lib.checkpoint()
        raise Boom("deep")

    async def user_coro() -> None:
        await lib.checkpoint()
        await innermost()

    def sync_caller() -> Boom:
        try:
            greenback.await_(user_coro())
        except Boom as exc:
            return exc
        raise AssertionError("nothing raised")

    async def main() -> None:
        await greenback.ensure_portal()
        exc = sync_caller()
        assert tb_names(exc) == ["sync_caller", "await_", "user_coro", "innermost"]
        frames = tb_frames(exc)
        assert [from_greenback(f) for f in frames] == [False, True, False, False]
        assert len(greenback_frames(exc)) == 1

        # Same when the portal comes from with_portal_run_sync.
        exc = await greenback.with_portal_run_sync(sync_caller)
        assert tb_names(exc) == ["sync_caller", "await_", "user_coro", "innermost"]

        # Uncaught in sync code, out to the async caller of the sync code.
        def sync_uncaught() -> None:
            greenback.await_(user_coro())

        with pytest.raises(Boom) as info:
            await greenback.with_portal_run_sync(sync_uncaught)
        assert tb_names(info.value) == [
            "main", "with_portal_run_sync", "sync_uncaught", "await_", "user_coro", "innermost"
        ]
        assert len(greenback_frames(info.value)) == 2

    lib.run(main)


def test_traceback_through_nested_await_(lib: Lib) -> None:
    async def bottom() -> None:
        await lib.checkpoint()
        raise Boom("bottom")

    def inner_sync() -> None:
        greenback.await_(bottom())

    async def middle() -> None:
        await lib.checkpoint()
        inner_sync()

    def outer_sync() -> Boom:
        try:
            greenback.await_(middle())
        except Boom as exc:
            return exc
        raise AssertionError("nothing raised")

    async def main() -> None:
        await greenback.ensure_portal()
        exc = outer_sync()
        assert tb_names(exc) == [
            "outer_sync",
            "await_",
            "middle",
            "inner_sync",
            "await_",
            "bottom",
        ]
        assert len(greenback_frames(exc)) == 2

    lib.run(main)


def test_traceback_of_uncaught_exception_in_task(lib: Lib) -> None:
    """An exception that leaves a task with a portal carries no greenback
    frames besides the await_ it went through."""

    async def fails() -> None:
        await lib.checkpoint()
        raise Boom("task")

    def sync_layer() -> None:
        greenback.await_(fails())

    async def task_body() -> None:
        await greenback.ensure_portal()
        sync_layer()

    with pytest.raises(Boom) as info:
        lib.run(task_body)
    names = tb_names(info.value)
    assert names[-4:] == ["task_body", "sync_layer", "await_", "fails"]
    assert len(greenback_frames(info.value)) == 1
