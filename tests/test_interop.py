"""greenback alongside other greenlet users, many tasks, several threads, and
deep or nested use of portals."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, TypeVar

import greenlet
import pytest
import sniffio
import trio

import greenback

from conftest import Lib

T = TypeVar("T")


# ---------------------------------------------------------------------------
# A user's own greenlets inside a task that has a portal
# ---------------------------------------------------------------------------


def test_await_inside_a_child_greenlet(lib: Lib) -> None:
    async def add_one(x: int) -> int:
        await lib.checkpoint()
        return x + 1

    seen: list[Any] = []

    def in_child(start: int) -> int:
        value = start
        for _ in range(5):
            value = greenback.await_(add_one(value))
            seen.append(greenlet.getcurrent())
        return value * 10

    async def main() -> None:
        await greenback.ensure_portal()
        parent = greenlet.getcurrent()
        child = greenlet.greenlet(in_child)
        assert child.parent is parent
        result = child.switch(3)
        assert result == 80
        assert child.dead
        assert greenlet.getcurrent() is parent
        assert seen == [child] * 5
        # The task still works normally afterwards, natively and via await_.
        await lib.checkpoint()
        assert greenback.await_(add_one(1)) == 2

    lib.run(main)


def test_child_greenlet_suspended_across_native_awaits(lib: Lib) -> None:
    """A child greenlet that hands values to its parent one at a time, doing
    await_() between them, while the parent awaits natively in between."""

    async def square(x: int) -> int:
        await lib.checkpoint()
        return x * x

    def producer(count: int) -> str:
        parent = greenlet.getcurrent().parent
        assert parent is not None
        for i in range(count):
            parent.switch(greenback.await_(square(i)))
        return "done"

    async def main() -> list[Any]:
        await greenback.ensure_portal()
        child = greenlet.greenlet(producer)
        got: list[Any] = [child.switch(4)]
        while not child.dead:
            await lib.checkpoint()
            await lib.sleep(0)
            got.append(child.switch())
        return got

    assert lib.run(main) == [0, 1, 4, 9, "done"]


def test_exception_from_await_inside_child_greenlet(lib: Lib) -> None:
    class Oops(Exception):
        pass

    async def fail() -> None:
        await lib.checkpoint()
        raise Oops("from the coroutine")

    def in_child() -> str:
        try:
            greenback.await_(fail())
        except Oops as exc:
            return f"caught {exc}"
        return "not raised"

    def in_child_uncaught() -> None:
        greenback.await_(fail())

    async def main() -> None:
        await greenback.ensure_portal()
        assert greenlet.greenlet(in_child).switch() == "caught from the coroutine"
        child = greenlet.greenlet(in_child_uncaught)
        with pytest.raises(Oops):
            child.switch()
        assert child.dead
        await lib.checkpoint()

    lib.run(main)


class _SpawnedGreenlet(greenlet.greenlet):
    """The child greenlet of a tiny model of SQLAlchemy's greenlet_spawn."""

    def __init__(self, fn: Callable[..., Any], driver: greenlet.greenlet) -> None:
        super().__init__(fn, driver)
        self.driver = driver


def _await_via_driver(awaitable: Awaitable[T]) -> T:
    """Suspend the spawned greenlet; its driver awaits `awaitable` natively."""
    current = greenlet.getcurrent()
    if not isinstance(current, _SpawnedGreenlet):
        raise RuntimeError("not inside greenlet_spawn()")
    result: T = current.driver.switch(awaitable)
    return result


async def _greenlet_spawn(fn: Callable[..., T], *args: Any) -> T:
    child = _SpawnedGreenlet(fn, greenlet.getcurrent())
    request = child.switch(*args)
    while not child.dead:
        try:
            value = await request
        except BaseException:
            request = child.throw(*sys.exc_info())
        else:
            request = child.switch(value)
    result: T = request
    return result


def test_greenlet_spawn_and_greenback_in_one_task(lib: Lib) -> None:
    class Refused(Exception):
        pass

    async def tagged(tag: str) -> str:
        await lib.checkpoint()
        return tag

    async def refuse() -> None:
        await lib.checkpoint()
        raise Refused

    def orm_like(n: int) -> list[str]:
        out: list[str] = []
        for i in range(n):
            out.append(_await_via_driver(tagged(f"spawn{i}")))
            out.append(greenback.await_(tagged(f"greenback{i}")))
            with pytest.raises(Refused):
                _await_via_driver(refuse())
            with pytest.raises(Refused):
                greenback.await_(refuse())
        return out

    async def main() -> list[str]:
        await greenback.ensure_portal()
        result = await _greenlet_spawn(orm_like, 3)
        # greenlet_spawn from sync code reached through await_ as well.
        nested = greenback.await_(_greenlet_spawn(orm_like, 1))
        return result + nested

    assert lib.run(main) == [
        "spawn0", "greenback0", "spawn1", "greenback1", "spawn2", "greenback2",
        "spawn0", "greenback0",
    ]  # fmt: skip


def test_greenlet_spawn_inside_with_portal_run_sync(lib: Lib) -> None:
    async def triple(x: int) -> int:
        await lib.checkpoint()
        return 3 * x

    def inner(x: int) -> int:
        return _await_via_driver(triple(x)) + greenback.await_(triple(x))

    def outer(x: int) -> int:
        return greenback.await_(_greenlet_spawn(inner, x))

    async def main() -> int:
        return await greenback.with_portal_run_sync(outer, 7)

    assert lib.run(main) == 42


def test_greenlet_spawn_exception_reaches_the_task(lib: Lib) -> None:
    class Broken(Exception):
        pass

    async def fail() -> None:
        await lib.checkpoint()
        raise Broken("deep")

    def body() -> None:
        greenback.await_(lib.checkpoint())
        greenback.await_(fail())

    async def main() -> None:
        await greenback.ensure_portal()
        with pytest.raises(Broken, match="deep"):
            await _greenlet_spawn(body)

    lib.run(main)


# ---------------------------------------------------------------------------
# Many tasks at once
# ---------------------------------------------------------------------------

N_TASKS = 2000
STEPS = 5


def test_many_concurrent_portal_tasks(lib: Lib) -> None:
    results: dict[int, list[int]] = {}

    async def tick(i: int, step: int) -> int:
        await lib.checkpoint()
        return i * 100 + step

    def sync_steps(i: int) -> list[int]:
        out = []
        for step in range(STEPS):
            out.append(greenback.await_(tick(i, step)))
            assert greenback.has_portal()
        return out

    async def one(i: int) -> None:
        await greenback.ensure_portal()
        task = lib.current_task()
        results[i] = sync_steps(i)
        assert lib.current_task() is task

    async def main() -> None:
        if lib.sniffio_name == "trio":
            async with trio.open_nursery() as nursery:
                for i in range(N_TASKS):
                    nursery.start_soon(one, i)
        else:
            await asyncio.gather(*(one(i) for i in range(N_TASKS)))

    lib.run(main)
    assert len(results) == N_TASKS
    for i, got in results.items():
        assert got == [i * 100 + step for step in range(STEPS)]


def test_many_tasks_interleave(lib: Lib) -> None:
    """Tasks suspended inside await_() really do interleave: every task
    reaches step k before any task finishes step k+1."""
    order: list[tuple[int, int]] = []
    n = 200

    def sync_steps(i: int) -> None:
        for step in range(3):
            order.append((step, i))
            greenback.await_(lib.sleep(0))

    async def one(i: int) -> None:
        await greenback.ensure_portal()
        sync_steps(i)

    async def main() -> None:
        if lib.sniffio_name == "trio":
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
        else:
            await asyncio.gather(*(one(i) for i in range(n)))

    lib.run(main)
    assert len(order) == 3 * n
    steps = [step for step, _ in order]
    assert steps == sorted(steps)


# ---------------------------------------------------------------------------
# Event loops in several threads
# ---------------------------------------------------------------------------


def _run_loop_with_portal_tasks(flavour: str, n_tasks: int, start: threading.Barrier) -> dict[int, int]:
    results: dict[int, int] = {}
    thread = threading.current_thread()

    async def check_here(value: int) -> int:
        assert threading.current_thread() is thread
        assert sniffio.current_async_library() == flavour
        if flavour == "trio":
            await trio.sleep(0)
        else:
            await asyncio.sleep(0)
        return value + 1

    def sync_body(i: int) -> int:
        total = i
        for _ in range(10):
            total = greenback.await_(check_here(total))
            # Let the other threads' loops run while this one is mid-step,
            # inside its portal's worker greenlet.
            time.sleep(0)
        return total

    async def one(i: int) -> None:
        await greenback.ensure_portal()
        results[i] = sync_body(i)

    async def main() -> None:
        if flavour == "trio":
            async with trio.open_nursery() as nursery:
                for i in range(n_tasks):
                    nursery.start_soon(one, i)
        else:
            await asyncio.gather(*(one(i) for i in range(n_tasks)))

    start.wait()
    if flavour == "trio":
        trio.run(main)
    else:
        asyncio.run(main())
    return results


@pytest.mark.parametrize(
    "flavours",
    [("asyncio", "trio"), ("asyncio", "asyncio"), ("trio", "trio", "asyncio")],
    ids="+".join,
)
def test_event_loops_in_threads_do_not_interfere(flavours: tuple[str, ...]) -> None:
    n_tasks = 300
    start = threading.Barrier(len(flavours))
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads as often as possible
    try:
        with ThreadPoolExecutor(max_workers=len(flavours)) as pool:
            futures = [
                pool.submit(_run_loop_with_portal_tasks, flavour, n_tasks, start)
                for flavour in flavours
            ]
            outcomes = [f.result(timeout=60) for f in futures]
    finally:
        sys.setswitchinterval(old_interval)
    for results in outcomes:
        assert results == {i: i + 10 for i in range(n_tasks)}


def test_portal_task_in_thread_while_main_thread_has_one(lib: Lib) -> None:
    """A portal task in the main thread suspended in await_() while another
    thread runs its own portal tasks to completion."""
    start = threading.Barrier(1)

    def sync_part() -> dict[int, int]:
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(_run_loop_with_portal_tasks, "asyncio", 50, start)
            while not future.done():
                greenback.await_(lib.sleep(0.001))
            return future.result()

    async def main() -> dict[int, int]:
        await greenback.ensure_portal()
        return sync_part()

    assert lib.run(main) == {i: i + 10 for i in range(50)}


def test_await_in_thread_without_event_loop() -> None:
    async def never_run() -> None:
        raise AssertionError("should not run")  # pragma: no cover

    def attempt() -> BaseException | None:
        try:
            greenback.await_(never_run())
        except BaseException as exc:  # noqa: BLE001
            return exc
        return None

    with ThreadPoolExecutor(max_workers=1) as pool:
        exc = pool.submit(attempt).result(timeout=30)
    assert isinstance(exc, sniffio.AsyncLibraryNotFoundError)
    # Same thing on the main thread, outside any event loop.
    with pytest.raises(sniffio.AsyncLibraryNotFoundError):
        greenback.await_(never_run())


# ---------------------------------------------------------------------------
# Deep and nested use
# ---------------------------------------------------------------------------


def test_deep_alternating_sync_async_nesting(lib: Lib) -> None:
    depth = 100

    def sync_level(n: int) -> int:
        if n == 0:
            return 0
        return greenback.await_(async_level(n - 1)) + 1

    async def async_level(n: int) -> int:
        await lib.checkpoint()
        return sync_level(n)

    async def main() -> int:
        await greenback.ensure_portal()
        return sync_level(depth)

    assert lib.run(main) == depth


def test_deep_nesting_through_one_shot_portals(lib: Lib) -> None:
    depth = 100

    def sync_level(n: int) -> int:
        if n == 0:
            return 0
        return greenback.await_(async_level(n - 1)) + 1

    async def async_level(n: int) -> int:
        await lib.checkpoint()
        if n % 2:
            return await greenback.with_portal_run_sync(sync_level, n)
        return await greenback.with_portal_run(async_level_entry, n)

    async def async_level_entry(n: int) -> int:
        return sync_level(n)

    async def main() -> int:
        return await greenback.with_portal_run_sync(sync_level, depth)

    assert lib.run(main) == depth


def test_with_portal_run_inside_with_portal_run(lib: Lib) -> None:
    async def leaf(x: int) -> int:
        await lib.checkpoint()
        return x + 1

    async def inner(x: int) -> int:
        assert greenback.has_portal()
        y = greenback.await_(leaf(x))
        await lib.checkpoint()
        return greenback.await_(leaf(y))

    async def outer(x: int) -> int:
        assert greenback.has_portal()
        y = await greenback.with_portal_run(inner, x)
        assert greenback.has_portal()
        return greenback.await_(leaf(y))

    async def main() -> None:
        assert not greenback.has_portal()
        assert await greenback.with_portal_run(outer, 0) == 3
        # The one-shot portal is gone afterwards.
        assert not greenback.has_portal()

    lib.run(main)


def test_with_portal_run_sync_in_task_that_has_a_portal(lib: Lib) -> None:
    async def leaf(x: int) -> int:
        await lib.checkpoint()
        return x * 2

    def sync_fn(x: int) -> int:
        return greenback.await_(leaf(x)) + greenback.await_(leaf(x))

    async def main() -> None:
        await greenback.ensure_portal()
        assert await greenback.with_portal_run_sync(sync_fn, 5) == 20
        assert greenback.has_portal()
        assert greenback.await_(leaf(1)) == 2
        # And awaited from sync code reached by await_.
        assert greenback.await_(greenback.with_portal_run_sync(sync_fn, 1)) == 4
        assert greenback.await_(greenback.with_portal_run(leaf, 4)) == 8

    lib.run(main)


def test_await_inside_coroutine_awaited_by_await(lib: Lib) -> None:
    async def leaf(x: int) -> int:
        await lib.checkpoint()
        return x + 1

    async def middle(x: int) -> int:
        await lib.checkpoint()
        y = greenback.await_(leaf(x))  # await_ while another await_ is active
        await lib.checkpoint()
        return greenback.await_(leaf(y))

    def sync_fn(x: int) -> int:
        return greenback.await_(middle(x))

    async def main() -> None:
        await greenback.ensure_portal()
        assert sync_fn(0) == 2
        assert await greenback.with_portal_run_sync(sync_fn, 10) == 12

    lib.run(main)
    # And in a one-shot portal with no ensure_portal().

    async def main_one_shot() -> int:
        return await greenback.with_portal_run_sync(sync_fn, 20)

    assert lib.run(main_one_shot) == 22


def test_ensure_portal_inside_with_portal_run(lib: Lib) -> None:
    async def leaf() -> str:
        await lib.checkpoint()
        return "ok"

    async def body() -> str:
        await greenback.ensure_portal()  # already has one: a no-op checkpoint
        return greenback.await_(leaf())

    async def main() -> None:
        assert await greenback.with_portal_run(body) == "ok"

    lib.run(main)


def test_interop_on_every_runner(any_lib: Lib) -> None:
    """The child-greenlet and greenlet_spawn patterns on every loop flavour."""

    async def plus(x: int) -> int:
        await any_lib.checkpoint()
        return x + 1

    def body(x: int) -> int:
        return greenback.await_(plus(_await_via_driver(plus(x))))

    async def main() -> int:
        await greenback.ensure_portal()
        a = greenlet.greenlet(lambda: greenback.await_(plus(1))).switch()
        b = await _greenlet_spawn(body, a)
        return b

    assert any_lib.run(main) == 4
