"""greenback must not leak references, tasks, greenlets or coroutines, and
must cope with tasks that are dropped or still alive at interpreter exit."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import subprocess
import sys
import textwrap
import types
import weakref
from typing import Any, Callable, Generator

import greenlet
import outcome
import pytest
import trio

import greenback
import greenback._core

from conftest import Lib

N_CALLS = 1000


class Carrier(Exception):
    """An exception that carries the payload whose references we count."""


async def _deliver(lib: Lib, payload: object) -> object:
    """Have the event loop itself hand `payload` back to this task: for Trio
    it travels through the coroutine's send(), for asyncio through a future."""
    if lib.sniffio_name == "trio":
        task = trio.lowlevel.current_task()
        trio.lowlevel.current_trio_token().run_sync_soon(
            trio.lowlevel.reschedule, task, outcome.Value(payload)
        )
        return await trio.lowlevel.wait_task_rescheduled(
            lambda _: trio.lowlevel.Abort.FAILED
        )
    fut = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(fut.set_result, payload)
    return await fut


async def _deliver_error(lib: Lib, payload: object) -> object:
    """Like _deliver, but the loop raises Carrier(payload) into the task."""
    if lib.sniffio_name == "trio":
        task = trio.lowlevel.current_task()
        trio.lowlevel.current_trio_token().run_sync_soon(
            trio.lowlevel.reschedule, task, outcome.Error(Carrier(payload))
        )
        return await trio.lowlevel.wait_task_rescheduled(
            lambda _: trio.lowlevel.Abort.FAILED
        )
    fut = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(fut.set_exception, Carrier(payload))
    return await fut


# ---------------------------------------------------------------------------
# Reference counts
# ---------------------------------------------------------------------------


def test_await_keeps_refcounts_balanced(lib: Lib) -> None:
    payload = object()

    async def give_back() -> object:
        await lib.checkpoint()
        return payload

    async def raise_it() -> None:
        await lib.checkpoint()
        raise Carrier(payload)

    def sync_rounds(n: int) -> None:
        for _ in range(n):
            assert greenback.await_(give_back()) is payload
            assert greenback.await_(_deliver(lib, payload)) is payload
            try:
                greenback.await_(raise_it())
            except Carrier as exc:
                assert exc.args[0] is payload
                del exc
            else:  # pragma: no cover
                raise AssertionError("no exception")
            try:
                greenback.await_(_deliver_error(lib, payload))
            except Carrier as exc:
                assert exc.args[0] is payload
                del exc
            else:  # pragma: no cover
                raise AssertionError("no exception")

    async def main() -> tuple[int, int]:
        await greenback.ensure_portal()
        sync_rounds(5)  # warm up caches, pools, lazily created state
        gc.collect()
        before = sys.getrefcount(payload)
        sync_rounds(N_CALLS)
        gc.collect()
        after = sys.getrefcount(payload)
        return before, after

    before, after = lib.run(main)
    assert after == before


def test_one_shot_portal_arguments_are_released(lib: Lib) -> None:
    payload = object()
    returned = object()

    def sync_fn(arg: object, *, kw: object = None) -> object:
        assert arg is payload
        greenback.await_(lib.checkpoint())
        return returned

    async def async_fn(arg: object, *, kw: object = None) -> object:
        assert arg is payload
        greenback.await_(lib.checkpoint())
        return returned

    def sync_raises(arg: object) -> None:
        greenback.await_(lib.checkpoint())
        raise Carrier(arg)

    async def rounds(n: int) -> None:
        for _ in range(n):
            assert await greenback.with_portal_run_sync(sync_fn, payload) is returned
            assert await greenback.with_portal_run(async_fn, payload) is returned
            assert await greenback.with_portal_run_sync(sync_fn, payload, kw=payload) is returned
            assert await greenback.with_portal_run(async_fn, payload, kw=payload) is returned
            with pytest.raises(Carrier):
                await greenback.with_portal_run_sync(sync_raises, payload)

    async def main() -> tuple[int, int, int, int]:
        await rounds(5)
        gc.collect()
        before = sys.getrefcount(payload), sys.getrefcount(returned)
        await rounds(N_CALLS)
        gc.collect()
        after = sys.getrefcount(payload), sys.getrefcount(returned)
        return before + after

    b_payload, b_returned, a_payload, a_returned = lib.run(main)
    assert (a_payload, a_returned) == (b_payload, b_returned)


@types.coroutine
def _trap(request: object) -> Generator[object, object, object]:
    """Yield `request` to whoever drives us; return what they send back."""
    return (yield request)


def test_refcounts_when_driving_a_portal_by_hand() -> None:
    """No event loop: drive with_portal_run_sync's portal with send() and
    throw(), so values and exceptions cross the worker greenlet switch."""
    request = object()
    payload = object()

    def sync_fn() -> object:
        first = greenback.await_(_trap(request))
        assert first is payload
        try:
            greenback.await_(_trap(request))
        except Carrier as exc:
            assert exc.args[0] is payload
        return first

    def one_round() -> None:
        portal = greenback.with_portal_run_sync(sync_fn)
        assert portal.send(None) is request
        assert portal.send(payload) is request
        with pytest.raises(StopIteration) as info:
            portal.throw(Carrier(payload))
        assert info.value.value is payload
        del info

    for _ in range(5):
        one_round()
    gc.collect()
    before = sys.getrefcount(payload), sys.getrefcount(request)
    for _ in range(N_CALLS):
        one_round()
    gc.collect()
    assert (sys.getrefcount(payload), sys.getrefcount(request)) == before


# ---------------------------------------------------------------------------
# Tasks and coroutines are freed
# ---------------------------------------------------------------------------


def test_portal_tasks_are_garbage_collected(lib: Lib) -> None:
    task_refs: list[weakref.ref[Any]] = []
    coro_refs: list[weakref.ref[Any]] = []

    def current_coro() -> Any:
        task = lib.current_task()
        return task.coro if lib.sniffio_name == "trio" else task.get_coro()

    async def worker(i: int) -> int:
        task_refs.append(weakref.ref(lib.current_task()))
        coro_refs.append(weakref.ref(current_coro()))
        await greenback.ensure_portal()
        value = greenback.await_(lib.sleep(0))
        assert value is None
        if i % 3 == 0:
            raise Carrier(i)
        return i

    async def main() -> None:
        if lib.sniffio_name == "trio":
            async with trio.open_nursery() as nursery:
                for i in range(1, 30, 3):  # none of them raise
                    nursery.start_soon(worker, i)
        else:
            tasks = [asyncio.create_task(worker(i)) for i in range(30)]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert sum(isinstance(r, Carrier) for r in results) == 10
            del tasks, results

    lib.run(main)
    gc.collect()
    assert task_refs and coro_refs
    assert [r() for r in task_refs] == [None] * len(task_refs)
    assert [r() for r in coro_refs] == [None] * len(coro_refs)


def test_bestowed_task_is_freed_after_it_finishes_asyncio() -> None:
    refs: list[weakref.ref[Any]] = []

    async def body() -> str:
        await asyncio.sleep(0)
        return greenback.await_(asyncio.sleep(0, "done"))

    async def main() -> None:
        task = asyncio.create_task(body())
        greenback.bestow_portal(task)
        assert greenback.has_portal(task)
        refs.append(weakref.ref(task))
        assert await task == "done"
        del task

    asyncio.run(main())
    gc.collect()
    assert refs[0]() is None


def test_bestowed_task_is_freed_after_it_finishes_trio() -> None:
    refs: list[weakref.ref[Any]] = []

    async def body(bestowed: trio.Event, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(trio.lowlevel.current_task())
        await bestowed.wait()
        greenback.await_(trio.sleep(0))

    async def main() -> None:
        bestowed = trio.Event()
        async with trio.open_nursery() as nursery:
            task = await nursery.start(body, bestowed)
            greenback.bestow_portal(task)
            assert greenback.has_portal(task)
            refs.append(weakref.ref(task))
            del task
            bestowed.set()

    trio.run(main)
    gc.collect()
    assert refs[0]() is None


def test_awaitables_are_released_after_await(lib: Lib) -> None:
    class CustomAwaitable:
        def __init__(self, value: int) -> None:
            self.value = value

        def __await__(self) -> Generator[Any, Any, int]:
            yield from lib.checkpoint().__await__()
            return self.value

    async def coro_fn(value: int) -> int:
        await lib.checkpoint()
        return value

    def sync_part() -> None:
        aw = CustomAwaitable(1)
        aw_ref = weakref.ref(aw)
        assert greenback.await_(aw) == 1
        del aw
        assert aw_ref() is None

        coro = coro_fn(2)
        coro_ref = weakref.ref(coro)
        assert greenback.await_(coro) == 2
        del coro
        assert coro_ref() is None

        # Also when the awaitable raises.
        async def failing() -> None:
            await lib.checkpoint()
            raise Carrier

        coro2 = failing()
        coro2_ref = weakref.ref(coro2)
        with pytest.raises(Carrier):
            greenback.await_(coro2)
        del coro2
        gc.collect()  # the traceback may hold the frame in a cycle
        assert coro2_ref() is None

    async def main() -> None:
        await greenback.ensure_portal()
        sync_part()
        await greenback.with_portal_run_sync(sync_part)

    lib.run(main)


# ---------------------------------------------------------------------------
# Greenlets don't accumulate
# ---------------------------------------------------------------------------


def _count_greenlets() -> int:
    gc.collect()
    return sum(isinstance(obj, greenlet.greenlet) for obj in gc.get_objects())


def _count_portals() -> int:
    gc.collect()
    return sum(type(obj) is greenback._core.Portal for obj in gc.get_objects())


def _churn(lib: Lib) -> None:
    def sync_fn(i: int) -> int:
        greenback.await_(lib.checkpoint())
        return i

    async def portal_task(i: int) -> None:
        await greenback.ensure_portal()
        assert greenback.await_(lib.checkpoint()) is None
        await lib.checkpoint()

    async def main() -> None:
        for i in range(2000):
            assert await greenback.with_portal_run_sync(sync_fn, i) == i
        if lib.sniffio_name == "trio":
            async with trio.open_nursery() as nursery:
                for i in range(500):
                    nursery.start_soon(portal_task, i)
        else:
            await asyncio.gather(*(portal_task(i) for i in range(500)))

    lib.run(main)


def test_worker_greenlets_do_not_accumulate(lib: Lib) -> None:
    pool_limit = 64
    start = _count_greenlets()
    _churn(lib)
    first = _count_greenlets()
    # At most a full pool of parked workers (plus a few stragglers).
    assert first - start <= pool_limit + 4
    _churn(lib)
    _churn(lib)
    # Once the pool is full, nothing more is kept.
    assert _count_greenlets() - first <= 4
    assert _count_portals() == 0


# ---------------------------------------------------------------------------
# Tasks dropped while suspended
# ---------------------------------------------------------------------------


def test_cancelled_asyncio_task_runs_finally_in_sync_code() -> None:
    log: list[str] = []

    def sync_part() -> None:
        try:
            greenback.await_(asyncio.sleep(100))
        except asyncio.CancelledError:
            log.append("cancelled")
            raise
        finally:
            log.append("finally")

    async def portal_task() -> None:
        await greenback.ensure_portal()
        sync_part()

    async def main() -> None:
        task = asyncio.create_task(portal_task())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(main())
    assert log == ["cancelled", "finally"]


def test_cancelled_trio_task_runs_finally_in_sync_code() -> None:
    log: list[str] = []

    def sync_part() -> None:
        try:
            greenback.await_(trio.sleep_forever())
        except trio.Cancelled:
            log.append("cancelled")
            raise
        finally:
            log.append("finally")

    async def portal_task(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await greenback.ensure_portal()
        task_status.started()
        sync_part()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(portal_task)
            await trio.sleep(0)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert log == ["cancelled", "finally"]


def _run_and_close_loop_with_pending_task(
    portal_task: Callable[[], Any],
) -> weakref.ref[Any]:
    refs: list[weakref.ref[Any]] = []

    async def main() -> None:
        task = asyncio.create_task(portal_task())
        refs.append(weakref.ref(task))
        for _ in range(4):
            await asyncio.sleep(0)
        assert not task.done()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    del loop
    return refs[0]


def test_loop_closed_with_task_suspended_in_await(caplog: pytest.LogCaptureFixture) -> None:
    """The task is stuck in await_() inside sync code when its loop is
    closed and dropped. Nothing may crash or warn, and the task stays alive
    with its finally not run: the suspended worker greenlet's stack is a
    root for the garbage collector (upstream greenback behaves alike, and
    the caveats page says so). Closing its portal by hand unwinds it."""
    log: list[str] = []

    def sync_part() -> None:
        try:
            greenback.await_(asyncio.sleep(100))
        finally:
            log.append("finally")

    async def portal_task() -> None:
        await greenback.ensure_portal()
        sync_part()

    with caplog.at_level(logging.CRITICAL, logger="asyncio"):
        task_ref = _run_and_close_loop_with_pending_task(portal_task)
        gc.collect()
        gc.collect()
    task = task_ref()
    assert task is not None
    assert not task.done()
    assert log == []
    # Closing its portal unwinds the sync frames (their finally runs), after
    # which the task can be freed.
    task._log_destroy_pending = False
    portal = task.get_coro()
    assert portal is not None
    portal.close()
    assert log == ["finally"]
    del task


def _natively_suspended(log: list[str]) -> Callable[[], Any]:
    """ensure_portal(), used await_(), now parked at a native await: its
    worker greenlet is idle, nothing of it is on a greenlet stack."""

    async def portal_task() -> None:
        await greenback.ensure_portal()
        greenback.await_(asyncio.sleep(0))
        try:
            await asyncio.sleep(100)
        finally:
            log.append(f"finally {sys.exc_info()[0].__name__}")  # type: ignore[union-attr]

    return portal_task


def _spinning_in_await(log: list[str]) -> Callable[[], Any]:
    """Suspended in await_(asyncio.sleep(0)) from sync code: the task sits in
    the loop's ready queue, so dropping the loop drops the task."""

    def spin() -> None:
        try:
            while True:
                greenback.await_(asyncio.sleep(0))
        finally:
            log.append(f"finally {sys.exc_info()[0].__name__}")  # type: ignore[union-attr]

    async def portal_task() -> None:
        await greenback.ensure_portal()
        spin()

    return portal_task


def _inside_with_portal_run(log: list[str]) -> Callable[[], Any]:
    """A native coroutine awaiting with_portal_run(), whose function is parked
    at a native await."""

    async def body() -> None:
        greenback.await_(asyncio.sleep(0))
        try:
            await asyncio.sleep(100)
        finally:
            log.append(f"finally {sys.exc_info()[0].__name__}")  # type: ignore[union-attr]

    async def portal_task() -> None:
        await greenback.with_portal_run(body)

    return portal_task


@pytest.mark.parametrize(
    "make_task",
    [_natively_suspended, _spinning_in_await, _inside_with_portal_run],
    ids=lambda f: f.__name__.strip("_"),
)
def test_dropped_loop_with_pending_portal_task(
    make_task: Callable[[list[str]], Callable[[], Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When the closed loop is dropped, nothing keeps the task alive: the
    garbage collector frees it, which unwinds its code with GeneratorExit,
    quietly (no 'Exception ignored' from greenback)."""
    log: list[str] = []
    unraisable: list[Any] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with caplog.at_level(logging.CRITICAL, logger="asyncio"):
            task_ref = _run_and_close_loop_with_pending_task(make_task(log))
            gc.collect()
            gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert [(u.exc_type, str(u.exc_value), u.object) for u in unraisable] == []
    assert task_ref() is None
    assert log == ["finally GeneratorExit"]


def _live_coroutines_of(fn: Callable[..., Any]) -> list[Any]:
    return [
        obj
        for obj in gc.get_objects()
        if inspect.iscoroutine(obj) and obj.cr_code is fn.__code__
    ]


def test_closing_portal_after_its_coroutine_was_closed() -> None:
    """Garbage collection finalizes everything in a cycle in no set order, so
    a portal may be closed after the coroutine it wraps was already closed.
    Like a native coroutine awaiting a closed one, that must be a no-op."""
    log: list[str] = []

    async def body() -> None:
        try:
            await _trap("request")
        finally:
            log.append("finally")

    async def native_wrapper(coro: Any) -> None:
        await coro

    inner = body()
    wrapper = native_wrapper(inner)
    assert wrapper.send(None) == "request"
    inner.close()
    wrapper.close()  # native coroutines: fine
    assert log == ["finally"]
    del inner, wrapper

    portal = greenback.with_portal_run(body)
    assert portal.send(None) == "request"
    (wrapped,) = _live_coroutines_of(body)
    wrapped.close()
    assert log == ["finally", "finally"]
    portal.close()


def test_closing_task_portal_after_its_coroutine_was_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same for the portal that ensure_portal() installs in a task."""
    log: list[str] = []

    async def portal_task() -> None:
        await greenback.ensure_portal()
        greenback.await_(asyncio.sleep(0))
        try:
            await asyncio.sleep(100)
        finally:
            log.append("finally")

    tasks: list[asyncio.Task[None]] = []

    async def main() -> None:
        tasks.append(asyncio.create_task(portal_task()))
        for _ in range(4):
            await asyncio.sleep(0)

    loop = asyncio.new_event_loop()
    # The task is left pending: keep asyncio from logging about it when it goes.
    with caplog.at_level(logging.CRITICAL, logger="asyncio"):
        try:
            loop.run_until_complete(main())
            (task,) = tasks
            assert greenback.has_portal(task)
            (original,) = _live_coroutines_of(portal_task)
            assert task.get_coro() is not original  # the portal stands in for it
            original.close()
            assert log == ["finally"]
            portal = task.get_coro()
            assert portal is not None
            portal.close()
        finally:
            loop.close()
            tasks.clear()
            gc.collect()


# ---------------------------------------------------------------------------
# Interpreter shutdown with portal tasks alive
# ---------------------------------------------------------------------------

_PRELUDE = """\
import asyncio, logging, sys, threading, time
import greenback, trio
logging.getLogger("asyncio").disabled = True
"""

_SHUTDOWN_SCRIPTS = {
    # run_until_complete() returns while a portal task is blocked in await_();
    # the loop is neither closed nor stopped.
    "asyncio-in-await": """
        def sync_part():
            greenback.await_(asyncio.sleep(1000))

        async def portal_task():
            await greenback.ensure_portal()
            sync_part()

        async def main():
            global task
            task = asyncio.create_task(portal_task())
            for _ in range(3):
                await asyncio.sleep(0)

        loop = asyncio.new_event_loop()
        loop.run_until_complete(main())
        print("exiting")
    """,
    # The same, with the task parked at a native await after using await_().
    "asyncio-native": """
        async def portal_task():
            await greenback.ensure_portal()
            greenback.await_(asyncio.sleep(0))
            await asyncio.sleep(1000)

        async def main():
            global task
            task = asyncio.create_task(portal_task())
            for _ in range(3):
                await asyncio.sleep(0)

        loop = asyncio.new_event_loop()
        loop.run_until_complete(main())
        print("exiting")
    """,
    # As above, and the loop closed before exit.
    "asyncio-native-closed-loop": """
        async def portal_task():
            await greenback.ensure_portal()
            greenback.await_(asyncio.sleep(0))
            await asyncio.sleep(1000)

        async def main():
            global task
            task = asyncio.create_task(portal_task())
            for _ in range(3):
                await asyncio.sleep(0)

        loop = asyncio.new_event_loop()
        loop.run_until_complete(main())
        loop.close()
        print("exiting")
    """,
    # Blocked in await_(asyncio.sleep(0)) in a loop: the task sits in the
    # loop's ready queue when the interpreter exits.
    "asyncio-spinning-in-await": """
        def spin():
            while True:
                greenback.await_(asyncio.sleep(0))

        async def portal_task():
            await greenback.ensure_portal()
            spin()

        async def main():
            asyncio.create_task(portal_task())
            for _ in range(3):
                await asyncio.sleep(0)

        loop = asyncio.new_event_loop()
        loop.run_until_complete(main())
        print("exiting")
    """,
    # A native coroutine awaiting with_portal_run(), parked at a native await.
    "asyncio-inside-with-portal-run": """
        async def body():
            greenback.await_(asyncio.sleep(0))
            await asyncio.sleep(1000)

        async def outer():
            await greenback.with_portal_run(body)

        async def main():
            global task
            task = asyncio.create_task(outer())
            for _ in range(3):
                await asyncio.sleep(0)

        asyncio.new_event_loop().run_until_complete(main())
        print("exiting")
    """,
    # The same without an event loop: driven by hand and left suspended.
    "no-loop-inside-with-portal-run": """
        import types

        @types.coroutine
        def trap():
            yield "suspended"

        async def body():
            await trap()

        async def outer():
            await greenback.with_portal_run(body)

        coro = outer()
        assert coro.send(None) == "suspended"
        print("exiting")
    """,
    # Event loops still running in daemon threads, tasks blocked in await_().
    "daemon-threads": """
        blocked = {"trio": threading.Semaphore(0), "asyncio": threading.Semaphore(0)}

        def sync_block(lib):
            blocked[lib].release()
            greenback.await_(trio.sleep_forever() if lib == "trio" else asyncio.sleep(1000))

        async def portal_task(lib, i):
            await greenback.ensure_portal()
            greenback.await_(trio.sleep(0) if lib == "trio" else asyncio.sleep(0))
            sync_block(lib)

        async def trio_main():
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(portal_task, "trio", i)

        async def asyncio_main():
            await asyncio.gather(*(portal_task("asyncio", i) for i in range(20)))

        threading.Thread(target=trio.run, args=(trio_main,), daemon=True).start()
        threading.Thread(target=asyncio.run, args=(asyncio_main(),), daemon=True).start()
        for lib in blocked:
            for _ in range(20):
                assert blocked[lib].acquire(timeout=30)
        time.sleep(0.05)  # let the last ones get into their await_()
        print("exiting")
    """,
}


@pytest.mark.parametrize("scenario", sorted(_SHUTDOWN_SCRIPTS))
def test_interpreter_exit_with_portal_tasks_alive(scenario: str) -> None:
    script = _PRELUDE + textwrap.dedent(_SHUTDOWN_SCRIPTS[scenario])
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "exiting\n", "")

