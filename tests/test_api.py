"""The public API: ensure_portal, bestow_portal, with_portal_run*,
has_portal and await_, on asyncio and Trio."""

from __future__ import annotations

import asyncio
import inspect
import socket
import sys
import types
from typing import Any, Awaitable, Callable, Generator, TypeVar

import pytest
import trio
import trio.testing

import greenback

from conftest import Lib

T = TypeVar("T")


# --------------------------------------------------------------------------
# Helpers: "does awaiting this yield to the loop / accept a cancellation?"
# --------------------------------------------------------------------------


class _StepWatcher(trio.abc.Instrument):
    """Counts how many times one Trio task gave control back to the loop."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps_ended = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps_ended += 1


async def yields_to_loop(lib: Lib, make: Callable[[], Awaitable[T]]) -> tuple[bool, T]:
    """Await make() and report whether the current task yielded to the event
    loop meanwhile (another task got to run), along with the result."""
    if lib.sniffio_name == "trio":
        watcher = _StepWatcher(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(watcher)
        try:
            result = await make()
        finally:
            trio.lowlevel.remove_instrument(watcher)
        return watcher.steps_ended > 0, result

    other_ran = False

    async def other() -> None:
        nonlocal other_ran
        other_ran = True

    other_task = asyncio.create_task(other())
    result = await make()
    yielded = other_ran
    await other_task
    return yielded, result


def _uncancel(task: asyncio.Task[Any]) -> None:
    if sys.version_info >= (3, 11):
        task.uncancel()


async def is_cancellation_point(lib: Lib, make: Callable[[], Awaitable[object]]) -> bool:
    """Await make() with a cancellation pending and report whether it landed
    there. Leaves no cancellation pending either way."""
    if lib.sniffio_name == "trio":
        with trio.CancelScope() as scope:
            scope.cancel()
            await make()
        return scope.cancelled_caught

    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    try:
        await make()
    except asyncio.CancelledError:
        _uncancel(task)
        return True
    try:  # make() was no cancellation point: take the cancellation here
        await asyncio.sleep(0)
    except asyncio.CancelledError:
        _uncancel(task)
    else:  # pragma: no cover
        raise AssertionError("the pending cancellation got lost")
    return False


def sync_double(lib: Lib, x: int) -> int:
    """Plain sync code that awaits something that really suspends."""

    async def double() -> int:
        await lib.checkpoint()
        return 2 * x

    return greenback.await_(double())


async def returns_at_once(value: T) -> T:
    return value


class ManualAwaitable:
    """An awaitable that is not a coroutine: it only has __await__."""

    def __init__(self, lib: Lib, value: int) -> None:
        self.lib = lib
        self.value = value

    def __await__(self) -> Generator[Any, None, int]:
        yield from self.lib.checkpoint().__await__()
        return self.value


@types.coroutine
def generator_based(lib: Lib, value: int) -> Generator[Any, None, int]:
    yield from lib.checkpoint().__await__()
    return value


# --------------------------------------------------------------------------
# ensure_portal
# --------------------------------------------------------------------------


def test_version_is_a_string() -> None:
    assert isinstance(greenback.__version__, str)
    assert greenback.__version__


def test_ensure_portal_lasts_for_the_task(any_lib: Lib) -> None:
    def deep(level: int) -> int:
        if level == 0:
            return sync_double(any_lib, 21)
        return deep(level - 1)

    async def main() -> None:
        assert not greenback.has_portal()
        await greenback.ensure_portal()
        assert greenback.has_portal()
        assert greenback.has_portal(any_lib.current_task())
        assert deep(3) == 42
        # Still there after many more steps of the task.
        for _ in range(5):
            await any_lib.checkpoint()
            assert greenback.has_portal()
            assert sync_double(any_lib, 5) == 10
        # Calling it again changes nothing.
        await greenback.ensure_portal()
        await greenback.ensure_portal()
        assert greenback.has_portal()
        assert deep(10) == 42

    any_lib.run(main)


def test_ensure_portal_is_always_a_schedule_point(lib: Lib) -> None:
    async def main() -> None:
        yielded, _ = await yields_to_loop(lib, greenback.ensure_portal)
        assert yielded, "first ensure_portal() did not yield to the loop"
        assert greenback.has_portal()
        yielded, _ = await yields_to_loop(lib, greenback.ensure_portal)
        assert yielded, "ensure_portal() with a portal already did not yield"
        assert greenback.has_portal()

    lib.run(main)


def test_ensure_portal_is_always_a_cancellation_point(lib: Lib) -> None:
    async def main() -> None:
        assert await is_cancellation_point(lib, greenback.ensure_portal)
        # The cancellation landed after the portal was put in place.
        await lib.checkpoint()
        assert greenback.has_portal()
        assert sync_double(lib, 4) == 8
        # With a portal already there, it is still a cancellation point.
        assert await is_cancellation_point(lib, greenback.ensure_portal)
        assert sync_double(lib, 5) == 10

    lib.run(main)


# --------------------------------------------------------------------------
# bestow_portal
# --------------------------------------------------------------------------


def test_bestow_portal_on_current_task_needs_a_checkpoint(lib: Lib) -> None:
    async def main() -> None:
        greenback.bestow_portal(lib.current_task())
        assert not greenback.has_portal()
        coro = returns_at_once(1)
        with pytest.raises(RuntimeError, match="must yield to the event loop"):
            greenback.await_(coro)
        # closed, so no "never awaited" warning
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
        # Bestowing again in the same step changes nothing.
        greenback.bestow_portal(lib.current_task())
        assert not greenback.has_portal()

        await lib.checkpoint()
        assert greenback.has_portal()
        assert sync_double(lib, 8) == 16
        greenback.bestow_portal(lib.current_task())  # no-op now
        assert greenback.has_portal()
        assert sync_double(lib, 9) == 18

    lib.run(main)


def test_bestow_portal_on_unstarted_asyncio_task() -> None:
    lib = Lib("asyncio", "asyncio")

    async def child() -> int:
        assert greenback.has_portal()
        return sync_double(lib, 21)

    async def main() -> None:
        task = asyncio.create_task(child())
        assert not greenback.has_portal(task)
        greenback.bestow_portal(task)
        assert greenback.has_portal(task)
        assert not greenback.has_portal()  # the giver got nothing
        assert await task == 42
        assert not greenback.has_portal(task)  # finished

    asyncio.run(main())


def test_bestow_portal_on_another_running_task(any_lib: Lib) -> None:
    """The other task has already started and waits; it gets a portal from
    outside and can then use await_ with no ensure_portal of its own."""
    results: list[int] = []

    async def child(go: Callable[[], Awaitable[object]]) -> None:
        await go()
        assert greenback.has_portal()
        results.append(sync_double(any_lib, 21))
        await any_lib.checkpoint()
        results.append(sync_double(any_lib, 50))

    async def main_asyncio() -> None:
        event = asyncio.Event()
        task = asyncio.create_task(child(event.wait))
        await asyncio.sleep(0)
        assert not greenback.has_portal(task)
        greenback.bestow_portal(task)
        assert greenback.has_portal(task)
        greenback.bestow_portal(task)  # twice is fine
        assert greenback.has_portal(task)
        assert not greenback.has_portal()
        event.set()
        await task

    async def main_trio() -> None:
        event = trio.Event()

        async def start_child(
            task_status: trio.TaskStatus[trio.lowlevel.Task] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            task_status.started(trio.lowlevel.current_task())
            await child(event.wait)

        async with trio.open_nursery() as nursery:
            task = await nursery.start(start_child)
            assert not greenback.has_portal(task)
            greenback.bestow_portal(task)
            assert greenback.has_portal(task)
            greenback.bestow_portal(task)
            assert greenback.has_portal(task)
            assert not greenback.has_portal()
            event.set()

    any_lib.run(main_trio if any_lib.sniffio_name == "trio" else main_asyncio)
    assert results == [42, 100]


# --------------------------------------------------------------------------
# with_portal_run / with_portal_run_sync
# --------------------------------------------------------------------------


@pytest.mark.parametrize("already", [False, True], ids=["fresh", "had_portal"])
def test_with_portal_run_sync_passes_args_and_result(any_lib: Lib, already: bool) -> None:
    def sync_fn(a: int, b: int, *, scale: int, offset: int = 0) -> tuple[int, bool]:
        assert greenback.has_portal()
        return sync_double(any_lib, a * scale + b) + offset, greenback.has_portal()

    async def main() -> None:
        if already:
            await greenback.ensure_portal()
        result = await greenback.with_portal_run_sync(sync_fn, 3, 4, scale=10, offset=1)
        assert result == (69, True)
        assert greenback.has_portal() is already

    any_lib.run(main)


@pytest.mark.parametrize("already", [False, True], ids=["fresh", "had_portal"])
def test_with_portal_run_passes_args_and_result(any_lib: Lib, already: bool) -> None:
    async def async_fn(a: str, *, b: str) -> str:
        await any_lib.checkpoint()
        assert greenback.has_portal()
        doubled = sync_double(any_lib, len(a + b))
        await any_lib.checkpoint()
        return f"{a}{b}{doubled}"

    async def main() -> None:
        if already:
            await greenback.ensure_portal()
        assert await greenback.with_portal_run(async_fn, "xy", b="z") == "xyz6"
        assert greenback.has_portal() is already
        # A non-coroutine awaitable returned by the function works too.
        assert await greenback.with_portal_run(ManualAwaitable, any_lib, 11) == 11
        assert await greenback.with_portal_run(generator_based, any_lib, 12) == 12
        assert greenback.has_portal() is already

    any_lib.run(main)


def test_with_portal_run_accepts_asyncio_future() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        loop.call_soon(fut.set_result, "done")
        assert await greenback.with_portal_run(lambda: fut) == "done"
        assert not greenback.has_portal()

    asyncio.run(main())


@pytest.mark.parametrize("already", [False, True], ids=["fresh", "had_portal"])
def test_with_portal_run_sync_is_no_checkpoint(lib: Lib, already: bool) -> None:
    def sync_fn(x: int) -> int:
        assert greenback.has_portal()
        return greenback.await_(returns_at_once(x)) + 1

    async def main() -> None:
        if already:
            await greenback.ensure_portal()
        yielded, result = await yields_to_loop(
            lib, lambda: greenback.with_portal_run_sync(sync_fn, 4)
        )
        assert (yielded, result) == (False, 5)
        assert not await is_cancellation_point(
            lib, lambda: greenback.with_portal_run_sync(lambda: 5)
        )
        assert not await is_cancellation_point(
            lib, lambda: greenback.with_portal_run_sync(sync_fn, 1)
        )

        if lib.sniffio_name == "trio":
            with trio.CancelScope() as scope:
                scope.cancel()
                assert await greenback.with_portal_run_sync(lambda: 5) == 5
                assert await greenback.with_portal_run_sync(sync_fn, 6) == 7
            assert not scope.cancelled_caught
        assert greenback.has_portal() is already

    lib.run(main)


@pytest.mark.parametrize("already", [False, True], ids=["fresh", "had_portal"])
def test_with_portal_run_is_no_checkpoint(lib: Lib, already: bool) -> None:
    async def quick(x: int) -> int:
        return greenback.await_(returns_at_once(x)) * 3

    async def main() -> None:
        if already:
            await greenback.ensure_portal()
        yielded, result = await yields_to_loop(lib, lambda: greenback.with_portal_run(quick, 2))
        assert (yielded, result) == (False, 6)
        assert not await is_cancellation_point(lib, lambda: greenback.with_portal_run(quick, 1))
        if lib.sniffio_name == "trio":
            with trio.CancelScope() as scope:
                scope.cancel()
                assert await greenback.with_portal_run(quick, 3) == 9
            assert not scope.cancelled_caught
        assert greenback.has_portal() is already

    lib.run(main)


def test_portal_of_with_portal_run_ends_with_the_call(lib: Lib) -> None:
    async def inner() -> int:
        await greenback.ensure_portal()  # does not outlive with_portal_run
        assert greenback.has_portal()
        await lib.checkpoint()
        greenback.bestow_portal(lib.current_task())  # neither does this
        await lib.checkpoint()
        return sync_double(lib, 3)

    async def main() -> None:
        assert await greenback.with_portal_run(inner) == 6
        assert not greenback.has_portal()
        assert not greenback.has_portal(lib.current_task())
        await lib.checkpoint()
        assert not greenback.has_portal()
        coro = returns_at_once(0)
        with pytest.raises(RuntimeError, match="create a greenback portal"):
            greenback.await_(coro)

        assert await greenback.with_portal_run_sync(sync_double, lib, 7) == 14
        assert not greenback.has_portal()
        await lib.checkpoint()
        assert not greenback.has_portal()

    lib.run(main)


def test_with_portal_run_shows_as_coroutine() -> None:
    assert asyncio.iscoroutinefunction(greenback.with_portal_run_sync)
    assert asyncio.iscoroutinefunction(greenback.with_portal_run)
    coros = [
        greenback.with_portal_run_sync(len, "abc"),
        greenback.with_portal_run(returns_at_once, 1),
    ]
    for coro in coros:
        try:
            assert asyncio.iscoroutine(coro)
            assert inspect.isawaitable(coro)
        finally:
            coro.close()


def test_with_portal_run_is_coroutine_function_for_inspect() -> None:
    # Upstream greenback defines these with 'async def'; code that dispatches
    # on inspect.iscoroutinefunction() must keep treating them as such.
    assert inspect.iscoroutinefunction(greenback.with_portal_run_sync)
    assert inspect.iscoroutinefunction(greenback.with_portal_run)
    assert inspect.iscoroutinefunction(greenback.ensure_portal)


# --------------------------------------------------------------------------
# has_portal
# --------------------------------------------------------------------------


def test_has_portal_outside_async_context() -> None:
    assert greenback.has_portal() is False


def test_has_portal_in_asyncio_callbacks() -> None:
    async def main() -> None:
        await greenback.ensure_portal()
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        seen: list[tuple[str, bool, bool]] = []

        def callback(where: str) -> None:
            seen.append((where, greenback.has_portal(), greenback.has_portal(task)))

        done = asyncio.Event()
        loop.call_soon(callback, "call_soon")
        loop.call_soon(done.set)
        await done.wait()

        reader, writer = socket.socketpair()
        try:
            done.clear()

            def on_readable() -> None:
                callback("reader")
                loop.remove_reader(reader.fileno())
                done.set()

            loop.add_reader(reader.fileno(), on_readable)
            writer.send(b"x")
            await done.wait()
        finally:
            reader.close()
            writer.close()
        assert seen == [("call_soon", False, True), ("reader", False, True)]

    asyncio.run(main())


def test_has_portal_in_trio_run_sync_soon() -> None:
    async def main() -> None:
        await greenback.ensure_portal()
        task = trio.lowlevel.current_task()
        seen: list[tuple[bool, bool]] = []
        event = trio.Event()

        def callback() -> None:
            seen.append((greenback.has_portal(), greenback.has_portal(task)))
            event.set()

        trio.lowlevel.current_trio_token().run_sync_soon(callback)
        await event.wait()
        assert seen == [(False, True)]

    trio.run(main)


def test_has_portal_for_other_tasks(lib: Lib) -> None:
    async def main_asyncio() -> None:
        event = asyncio.Event()

        async def with_portal() -> None:
            await greenback.ensure_portal()
            await event.wait()

        plain = asyncio.create_task(event.wait())
        portaled = asyncio.create_task(with_portal())
        await asyncio.sleep(0.01)
        assert not greenback.has_portal(plain)
        assert greenback.has_portal(portaled)
        assert not greenback.has_portal()
        event.set()
        await asyncio.gather(plain, portaled)
        assert not greenback.has_portal(portaled)

    async def main_trio() -> None:
        event = trio.Event()
        tasks: dict[str, trio.lowlevel.Task] = {}

        async def plain() -> None:
            tasks["plain"] = trio.lowlevel.current_task()
            await event.wait()

        async def with_portal() -> None:
            tasks["portaled"] = trio.lowlevel.current_task()
            await greenback.ensure_portal()
            await event.wait()

        async def sync_in_portal() -> None:
            tasks["sync"] = trio.lowlevel.current_task()
            await greenback.with_portal_run_sync(greenback.await_, event.wait())

        async def async_in_portal() -> None:
            tasks["run"] = trio.lowlevel.current_task()
            await greenback.with_portal_run(event.wait)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(plain)
            nursery.start_soon(with_portal)
            nursery.start_soon(sync_in_portal)
            nursery.start_soon(async_in_portal)
            await trio.testing.wait_all_tasks_blocked()
            assert greenback.has_portal(tasks["run"])  # inside with_portal_run
            assert not greenback.has_portal(tasks["plain"])
            assert greenback.has_portal(tasks["portaled"])
            assert greenback.has_portal(tasks["sync"])  # inside with_portal_run_sync
            assert not greenback.has_portal()
            event.set()
        assert not greenback.has_portal(tasks["portaled"])

    lib.run(main_trio if lib.sniffio_name == "trio" else main_asyncio)


def test_has_portal_inside_with_portal_run_seen_from_other_asyncio_task() -> None:
    async def main() -> None:
        event = asyncio.Event()
        task = asyncio.create_task(greenback.with_portal_run_sync(greenback.await_, event.wait()))
        await asyncio.sleep(0.01)
        assert greenback.has_portal(task)
        event.set()
        await task
        assert not greenback.has_portal(task)

    asyncio.run(main())


# --------------------------------------------------------------------------
# await_
# --------------------------------------------------------------------------


def test_await_at_depth(any_lib: Lib) -> None:
    def nested(depth: int, acc: list[int]) -> int:
        if depth == 0:
            return len(acc)
        acc.append(sync_double(any_lib, depth))
        return nested(depth - 1, acc)

    async def main() -> None:
        await greenback.ensure_portal()
        acc: list[int] = []
        assert nested(50, acc) == 50
        assert acc == [2 * d for d in range(50, 0, -1)]
        acc2: list[int] = []
        assert await greenback.with_portal_run_sync(nested, 50, acc2) == 50
        assert acc2 == acc

    any_lib.run(main)


def test_await_returns_or_raises(lib: Lib) -> None:
    class Oops(Exception):
        pass

    async def fail() -> None:
        await lib.checkpoint()
        raise Oops("from the coroutine")

    def sync_code() -> str:
        assert sync_double(lib, 1) == 2
        with pytest.raises(Oops, match="from the coroutine"):
            greenback.await_(fail())
        return "survived"

    async def main() -> None:
        await greenback.ensure_portal()
        assert sync_code() == "survived"
        assert greenback.await_(returns_at_once(None)) is None
        values: tuple[int, ...] = (1, 2)
        assert greenback.await_(returns_at_once(values)) is values

    lib.run(main)


def test_await_of_non_suspending_coroutine_is_no_checkpoint(lib: Lib) -> None:
    async def main() -> None:
        await greenback.ensure_portal()

        async def region() -> str:
            return greenback.await_(returns_at_once("quick"))

        assert await yields_to_loop(lib, region) == (False, "quick")
        assert not await is_cancellation_point(lib, region)
        if lib.sniffio_name == "trio":
            with trio.CancelScope() as scope:
                scope.cancel()
                assert greenback.await_(returns_at_once(3)) == 3
            assert not scope.cancelled_caught
        # Whereas one that does suspend is a checkpoint.
        assert await is_cancellation_point(lib, lambda: returns_at_once(sync_double(lib, 1)))

    lib.run(main)


def test_nested_one_shot_portals_inside_await_(lib: Lib) -> None:
    """await_ of with_portal_run* objects, under a portal that is already
    there, runs them in place."""

    def inner(x: int) -> int:
        return sync_double(lib, x) + 1

    async def inner_async(x: int) -> int:
        await lib.checkpoint()
        return inner(x)

    def outer() -> tuple[int, int]:
        a = greenback.await_(greenback.with_portal_run_sync(inner, 10))
        b = greenback.await_(greenback.with_portal_run(inner_async, 20))
        return a, b

    async def main() -> None:
        assert await greenback.with_portal_run_sync(outer) == (21, 41)
        assert not greenback.has_portal()
        await greenback.ensure_portal()
        assert outer() == (21, 41)

    lib.run(main)


def test_await_non_coroutine_awaitables(any_lib: Lib) -> None:
    async def main() -> None:
        await greenback.ensure_portal()
        assert greenback.await_(ManualAwaitable(any_lib, 5)) == 5
        assert greenback.await_(generator_based(any_lib, 6)) == 6
        if any_lib.sniffio_name == "asyncio":
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[int] = loop.create_future()
            loop.call_later(0.01, fut.set_result, 7)
            assert greenback.await_(fut) == 7
            task = asyncio.create_task(returns_at_once(8))
            assert greenback.await_(task) == 8

    any_lib.run(main)


# --------------------------------------------------------------------------
# What introspection sees of a task with a portal
# --------------------------------------------------------------------------


def test_trio_iter_await_frames_sees_through_portal() -> None:
    async def portal_task_body(event: trio.Event) -> None:
        await greenback.ensure_portal()
        await event.wait()

    async def main() -> None:
        event = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(portal_task_body, event)
            await trio.testing.wait_all_tasks_blocked()
            (task,) = [t for t in nursery.child_tasks]
            assert greenback.has_portal(task)
            names = [frame.f_code.co_name for frame, _ in task.iter_await_frames()]
            assert "portal_task_body" in names
            assert "wait" in names  # and below it, what it awaits
            event.set()

    trio.run(main)


def test_asyncio_get_stack_sees_through_portal() -> None:
    async def portal_task_body(event: asyncio.Event) -> None:
        await greenback.ensure_portal()
        await event.wait()

    async def main() -> None:
        event = asyncio.Event()
        task = asyncio.create_task(portal_task_body(event))
        await asyncio.sleep(0.01)
        assert greenback.has_portal(task)
        names = [frame.f_code.co_name for frame in task.get_stack()]
        assert "portal_task_body" in names
        event.set()
        await task

    asyncio.run(main())
