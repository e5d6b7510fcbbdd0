"""Misuse gets a clear error that names the way out, and corrupts nothing:
the portal that was in use keeps working afterwards."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
import threading
import weakref
from typing import Any, Callable

import greenlet
import pytest
import trio

import greenback
from conftest import Lib


async def returns(value: int, lib: Lib) -> int:
    await lib.checkpoint()
    return value


def still_works(lib: Lib) -> None:
    assert greenback.await_(returns(7, lib)) == 7


class CycleWithFinalizer:
    """Only the cyclic garbage collector can free this, so its __del__ runs
    during a collection."""

    def __init__(self, on_del: Callable[[], None]) -> None:
        self.me = self
        self.on_del = on_del

    def __del__(self) -> None:
        self.on_del()


def test_await_from_a_finalizer_run_by_the_collector(lib: Lib) -> None:
    errors: list[BaseException] = []

    def on_del() -> None:
        try:
            greenback.await_(returns(1, lib))
        except RuntimeError as exc:
            errors.append(exc)

    async def main() -> None:
        await greenback.ensure_portal()
        CycleWithFinalizer(on_del)
        gc.collect()
        (error,) = errors
        assert "garbage collector" in str(error)
        assert "outside the finalizer" in str(error)
        still_works(lib)

    lib.run(main)  # and no "coroutine ... was never awaited" warning


def test_await_from_a_weakref_callback_run_by_the_collector(lib: Lib) -> None:
    errors: list[BaseException] = []

    class Node:
        def __init__(self) -> None:
            self.me = self

    def callback(_: weakref.ref[Node]) -> None:
        try:
            greenback.await_(returns(1, lib))
        except RuntimeError as exc:
            errors.append(exc)

    async def main() -> None:
        await greenback.ensure_portal()
        node = Node()
        ref = weakref.ref(node, callback)
        del node
        gc.collect()
        assert ref() is None
        (error,) = errors
        assert "garbage collector" in str(error)
        still_works(lib)

    lib.run(main)


def test_await_from_a_greenlet_the_portal_did_not_start(lib: Lib) -> None:
    outcome: dict[str, Any] = {}

    def stray_body() -> None:
        try:
            greenback.await_(returns(1, lib))
        except RuntimeError as exc:
            outcome["error"] = exc
        # Go back where we came from, not to our parent (the main greenlet).
        outcome["back"].switch()

    stray = greenlet.greenlet(stray_body)  # started outside any portal

    async def main() -> None:
        await greenback.ensure_portal()
        outcome["back"] = greenlet.getcurrent()
        stray.switch()
        assert "did not start" in str(outcome["error"])
        still_works(lib)

    lib.run(main)
    del stray


def test_await_from_another_thread_while_a_portal_is_in_use(lib: Lib) -> None:
    seen: list[BaseException] = []

    def other_thread() -> None:
        coro = asyncio.sleep(0)
        try:
            greenback.await_(coro)
        except BaseException as exc:
            seen.append(exc)

    async def main() -> None:
        await greenback.ensure_portal()
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        still_works(lib)

    lib.run(main)
    (error,) = seen
    # That thread runs no event loop: there is no async library to find.
    assert isinstance(error, RuntimeError)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGUSR1 is POSIX")
def test_signal_handler_awaiting_under_a_portal_and_without(lib: Lib) -> None:
    results: list[object] = []

    def handler(signum: int, frame: object) -> None:
        try:
            results.append(greenback.await_(returns(3, lib)))
        except RuntimeError as exc:
            results.append(exc)

    async def main() -> None:
        previous = signal.signal(signal.SIGUSR1, handler)
        try:
            # Without a portal: a clear error, raised inside the handler.
            signal.raise_signal(signal.SIGUSR1)
            # Under a portal, a handler that runs inside the task's sync code
            # awaits like any other sync code there.
            await greenback.ensure_portal()
            signal.raise_signal(signal.SIGUSR1)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        still_works(lib)

    lib.run(main)
    error, value = results
    assert isinstance(error, RuntimeError) and "create a greenback portal" in str(error)
    assert value == 3


def test_reentering_the_running_task(lib: Lib) -> None:
    async def main() -> None:
        await greenback.ensure_portal()
        task = lib.current_task()
        coro = task.coro if lib.sniffio_name == "trio" else task.get_coro()
        with pytest.raises(ValueError, match="already executing"):
            coro.send(None)
        with pytest.raises(ValueError, match="already executing"):
            coro.throw(KeyError("x"))
        still_works(lib)

    lib.run(main)


# bestow_portal() on a non-task and on a finished task: tests/test_differences.py
# (both are deliberate differences from upstream, pinned there).


def test_bestow_portal_on_a_task_of_a_loop_in_another_thread() -> None:
    started, release = threading.Event(), threading.Event()
    box: list[asyncio.Task[None]] = []

    async def victim() -> None:
        started.set()
        while not release.is_set():
            await asyncio.sleep(0.001)

    async def other_loop() -> None:
        box.append(asyncio.create_task(victim()))
        await box[0]

    thread = threading.Thread(target=asyncio.run, args=(other_loop(),))
    thread.start()
    try:
        assert started.wait(10)

        async def main() -> None:
            with pytest.raises(RuntimeError, match="call_soon_threadsafe"):
                greenback.bestow_portal(box[0])

        asyncio.run(main())
        with pytest.raises(RuntimeError, match="running elsewhere"):
            greenback.bestow_portal(box[0])  # from no loop at all
        assert not greenback.has_portal(box[0])
    finally:
        release.set()
        thread.join()


def test_bestow_portal_on_a_task_of_another_trio_run() -> None:
    async def main() -> None:
        box: list[trio.lowlevel.Task] = []
        errors: list[BaseException] = []

        async def sleeper() -> None:
            box.append(trio.lowlevel.current_task())
            await trio.sleep(0.05)

        async def from_another_run() -> None:
            try:
                greenback.bestow_portal(box[0])
            except RuntimeError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleeper)
            await trio.sleep(0.01)
            await trio.to_thread.run_sync(trio.run, from_another_run)
            (error,) = errors
            assert "another Trio run" in str(error)
            assert not greenback.has_portal(box[0])
            greenback.bestow_portal(box[0])  # from its own run: fine
            assert greenback.has_portal(box[0])

    trio.run(main)

