"""Cancellation reaching sync code that is blocked in await_."""

from __future__ import annotations

import asyncio
import sys
from typing import Awaitable, Callable, ContextManager

import pytest
import trio
import trio.testing

import greenback

from conftest import Lib


def blocked_deep(
    depth: int, sleep: Callable[[], Awaitable[object]], cleanups: list[int], reached: list[int]
) -> None:
    """Sync code `depth` frames deep, each with a finally block, blocked in an
    await_ at the bottom."""
    try:
        if depth == 0:
            reached.append(0)
            greenback.await_(sleep())
            reached.append(1)  # not reached: cancelled above
        else:
            blocked_deep(depth - 1, sleep, cleanups, reached)
    finally:
        cleanups.append(depth)


async def still_works(lib: Lib) -> int:
    async def double(x: int) -> int:
        await lib.checkpoint()
        await lib.sleep(0.001)
        return 2 * x

    def sync_code() -> int:
        return greenback.await_(double(21))

    assert greenback.has_portal()
    return sync_code()


# --------------------------------------------------------------------------
# asyncio
# --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["ensure_portal", "with_portal_run_sync"])
def test_asyncio_task_cancel_reaches_await_(how: str) -> None:
    cleanups: list[int] = []
    reached: list[int] = []
    seen_cancelled: list[BaseException] = []

    def sync_code() -> None:
        try:
            blocked_deep(5, lambda: asyncio.sleep(10), cleanups, reached)
        except asyncio.CancelledError as exc:
            seen_cancelled.append(exc)
            raise

    async def body() -> None:
        if how == "ensure_portal":
            await greenback.ensure_portal()
            sync_code()
        else:
            await greenback.with_portal_run_sync(sync_code)

    async def main() -> None:
        task = asyncio.create_task(body())
        await asyncio.sleep(0.01)
        assert reached == [0]
        assert task.cancel("stop it")
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        assert cleanups == [0, 1, 2, 3, 4, 5]
        assert reached == [0]
        assert len(seen_cancelled) == 1
        assert seen_cancelled[0].args == ("stop it",)

    asyncio.run(main())


@pytest.mark.parametrize("how", ["ensure_portal", "with_portal_run_sync"])
def test_asyncio_timeout_around_sync_code(how: str) -> None:
    lib = Lib("asyncio", "asyncio")
    cleanups: list[int] = []
    reached: list[int] = []

    def sync_code() -> None:
        blocked_deep(3, lambda: asyncio.sleep(10), cleanups, reached)

    async def run_sync_code() -> None:
        if how == "ensure_portal":
            # Before 3.11, wait_for runs this in a task of its own.
            await greenback.ensure_portal()
            sync_code()
        else:
            await greenback.with_portal_run_sync(sync_code)

    async def main() -> None:
        if how == "ensure_portal":
            await greenback.ensure_portal()
        loop = asyncio.get_running_loop()
        start = loop.time()
        if sys.version_info >= (3, 11):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await run_sync_code()
        else:  # pragma: no cover - older Pythons
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(run_sync_code(), 0.05)
        assert loop.time() - start < 5
        assert cleanups == [0, 1, 2, 3]
        assert reached == [0]
        # The task was not left cancelled, and its portal (if any) still works.
        await asyncio.sleep(0.001)
        if how == "ensure_portal":
            assert await still_works(lib) == 42
        else:
            assert not greenback.has_portal()
            assert await greenback.with_portal_run(still_works, lib) == 42

    asyncio.run(main())


def test_asyncio_wait_for_around_sync_code() -> None:
    lib = Lib("asyncio", "asyncio")
    cleanups: list[int] = []
    reached: list[int] = []

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(
                greenback.with_portal_run_sync(
                    blocked_deep, 2, lambda: asyncio.sleep(10), cleanups, reached
                ),
                0.05,
            )
        assert cleanups == [0, 1, 2]
        await greenback.ensure_portal()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(
                greenback.with_portal_run_sync(
                    blocked_deep, 1, lambda: asyncio.sleep(10), cleanups, reached
                ),
                0.05,
            )
        assert cleanups == [0, 1, 2, 0, 1]
        assert reached == [0, 0]
        assert await still_works(lib) == 42

    asyncio.run(main())


def test_asyncio_cancellation_caught_in_sync_code() -> None:
    """Sync code can catch the CancelledError, clean up with more await_
    calls, and return; the task then ends normally."""
    lib = Lib("asyncio", "asyncio")

    def sync_code() -> str:
        task = asyncio.current_task()
        assert task is not None
        try:
            greenback.await_(asyncio.sleep(10))
        except asyncio.CancelledError:
            if sys.version_info >= (3, 11):
                task.uncancel()
            greenback.await_(asyncio.sleep(0.001))  # cleanup that awaits
            return "handled"
        return "not cancelled"

    async def body() -> tuple[str, int]:
        await greenback.ensure_portal()
        result = sync_code()
        return result, await still_works(lib)

    async def main() -> None:
        task = asyncio.create_task(body())
        await asyncio.sleep(0.01)
        task.cancel()
        assert await task == ("handled", 42)

    asyncio.run(main())


# --------------------------------------------------------------------------
# Trio
# --------------------------------------------------------------------------


def _move_on() -> ContextManager[trio.CancelScope]:
    return trio.move_on_after(0.02)


def _fail() -> ContextManager[trio.CancelScope]:
    return trio.fail_after(0.02)


TRIO_SCOPES = {"move_on_after": _move_on, "fail_after": _fail}


@pytest.mark.parametrize("kind", ["move_on_after", "fail_after"])
@pytest.mark.parametrize("how", ["ensure_portal", "with_portal_run_sync"])
def test_trio_timeouts_cancel_await_deep_in_sync_code(kind: str, how: str) -> None:
    lib = Lib("trio", "trio")
    cleanups: list[int] = []
    reached: list[int] = []

    def sync_code() -> None:
        blocked_deep(4, lambda: trio.sleep(10), cleanups, reached)

    async def main() -> None:
        if how == "ensure_portal":
            await greenback.ensure_portal()
        start = trio.current_time()
        timed_out = False
        try:
            with TRIO_SCOPES[kind]() as scope:
                if how == "ensure_portal":
                    sync_code()
                else:
                    await greenback.with_portal_run_sync(sync_code)
        except trio.TooSlowError:
            timed_out = True
        assert trio.current_time() - start < 5
        assert scope.cancelled_caught or timed_out
        assert timed_out == (kind == "fail_after")
        assert cleanups == [0, 1, 2, 3, 4]
        assert reached == [0]
        # The task goes on, and await_ still works.
        await trio.sleep(0.001)
        if how == "ensure_portal":
            assert await still_works(lib) == 42
            assert await still_works(lib) == 42
        else:
            assert not greenback.has_portal()
            assert await greenback.with_portal_run(still_works, lib) == 42

    trio.run(main)


@pytest.mark.parametrize("how", ["ensure_portal", "with_portal_run_sync"])
def test_trio_cancel_scope_cancelled_by_another_task(how: str) -> None:
    lib = Lib("trio", "trio")
    cleanups: list[int] = []
    reached: list[int] = []

    async def main() -> None:
        scope = trio.CancelScope()

        async def victim() -> None:
            if how == "ensure_portal":
                await greenback.ensure_portal()
            with scope:
                if how == "ensure_portal":
                    blocked_deep(3, lambda: trio.sleep_forever(), cleanups, reached)
                else:
                    await greenback.with_portal_run_sync(
                        blocked_deep, 3, trio.sleep_forever, cleanups, reached
                    )
            assert scope.cancelled_caught
            # Carry on in the same task, using the portal again.
            if how == "ensure_portal":
                assert await still_works(lib) == 42
            else:
                assert await greenback.with_portal_run(still_works, lib) == 42
            cleanups.append(-1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(victim)
            await trio.testing.wait_all_tasks_blocked()
            assert reached == [0]
            scope.cancel()
        assert cleanups == [0, 1, 2, 3, -1]
        assert reached == [0]

    trio.run(main)


def test_trio_nursery_cancel_kills_blocked_sync_code() -> None:
    cleanups: list[int] = []
    reached: list[int] = []

    async def victim() -> None:
        await greenback.ensure_portal()
        blocked_deep(2, trio.sleep_forever, cleanups, reached)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(victim)
            nursery.start_soon(greenback.with_portal_run_sync, blocked_deep, 1,
                               trio.sleep_forever, cleanups, reached)
            await trio.testing.wait_all_tasks_blocked()
            assert reached == [0, 0]
            nursery.cancel_scope.cancel()
        assert sorted(cleanups) == [0, 0, 1, 1, 2]

    trio.run(main)


def test_cancellation_is_checked_at_await_that_suspends(lib: Lib) -> None:
    """A cancellation already pending when sync code calls await_ on
    something that yields lands at that await_ (and later ones still work)."""
    cleanups: list[int] = []
    reached: list[int] = []

    async def main() -> None:
        await greenback.ensure_portal()
        if lib.sniffio_name == "trio":
            with trio.CancelScope() as scope:
                scope.cancel()
                blocked_deep(2, trio.lowlevel.checkpoint, cleanups, reached)
            assert scope.cancelled_caught
        else:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                blocked_deep(2, lambda: asyncio.sleep(0), cleanups, reached)
            if sys.version_info >= (3, 11):
                task.uncancel()
        assert cleanups == [0, 1, 2]
        assert reached == [0]
        assert await still_works(lib) == 42

    lib.run(main)
