"""Portals for whole task trees: with_portal_run_tree, portals_for_children,
portals_for_tree and AutoPortalInstrument, on Trio and asyncio (including
uvloop and anyio on top of either)."""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
from typing import Any, Awaitable, Callable, Coroutine, Iterable

import anyio
import pytest
import sniffio
import trio

import greenback
import greenback._trio_instrument
import greenback._tree

from conftest import Lib

uvloop: Any
try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


async def _forty_two() -> int:
    return 42


async def _yield_then(value: int) -> int:
    """Suspends the task once (a real trip through the event loop)."""
    if sniffio.current_async_library() == "trio":
        await trio.lowlevel.checkpoint()
    else:
        await asyncio.sleep(0)
    return value


def portal_works(*, suspend: bool = False) -> bool:
    """From sync code: can the current task use await_() right now?

    Checks that has_portal() agrees with what await_() actually does. With
    suspend=True, the awaited coroutine really yields to the event loop.
    """
    has = greenback.has_portal()
    try:
        value = greenback.await_(_yield_then(7) if suspend else _forty_two())
    except RuntimeError:
        assert not has, "has_portal() is True, but await_() found no portal"
        return False
    assert value == (7 if suspend else 42)
    assert has, "await_() worked, but has_portal() is False"
    return True


async def family(seen: dict[str, bool], name: str, depth: int) -> None:
    """Record whether this task has a portal, then (through anyio, so on any
    library) spawn a child that does the same, `depth` levels down."""
    seen[name] = portal_works(suspend=True)
    if depth:
        async with anyio.create_task_group() as tg:
            tg.start_soon(family, seen, name + ".c", depth - 1)


def family_names(name: str, depth: int) -> list[str]:
    return [name + ".c" * i for i in range(depth + 1)]


class StepCounter(trio.abc.Instrument):
    """Counts how often one Trio task gave control back to the scheduler."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


def _uncancel(task: asyncio.Task[Any]) -> None:
    if sys.version_info >= (3, 11):
        task.uncancel()


# --------------------------------------------------------------------------
# with_portal_run_tree
# --------------------------------------------------------------------------


def test_run_tree_gives_portals_to_fn_and_descendants(any_lib: Lib) -> None:
    seen: dict[str, bool] = {}

    async def fn(a: int, *, b: int) -> tuple[int, int]:
        seen["fn"] = portal_works(suspend=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(family, seen, "deep", 2)
            tg.start_soon(family, seen, "flat", 0)
        seen["fn after children"] = portal_works(suspend=True)
        return a, b

    async def main() -> None:
        seen["before"] = portal_works()
        assert await greenback.with_portal_run_tree(fn, 1, b=2) == (1, 2)
        seen["after"] = portal_works()
        async with anyio.create_task_group() as tg:
            tg.start_soon(family, seen, "late", 1)

    any_lib.run(main)
    expected = {"before": False, "fn": True, "fn after children": True}
    expected.update({n: True for n in family_names("deep", 2)})
    expected.update({n: True for n in family_names("flat", 0)})
    expected["after"] = False
    expected.update({n: False for n in family_names("late", 1)})
    assert seen == expected


def test_run_tree_trio_nurseries_recursively() -> None:
    seen: dict[str, bool] = {}

    async def grandchild() -> None:
        seen["grandchild"] = portal_works(suspend=True)

    async def child(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        seen["child"] = portal_works(suspend=True)
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(grandchild)

    async def started(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        seen["started"] = portal_works(suspend=True)
        task_status.started()
        await family(seen, "started-family", 1)

    async def fn() -> str:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
            await nursery.start(started)
        return "done"

    async def main() -> None:
        assert await greenback.with_portal_run_tree(fn) == "done"

    trio.run(main)
    assert seen == {
        "child": True,
        "grandchild": True,
        "started": True,
        "started-family": True,
        "started-family.c": True,
    }


def test_run_tree_trio_enclosing_nursery_gets_no_portals() -> None:
    seen: dict[str, bool] = {}

    async def fn(outer: trio.Nursery) -> None:
        seen["fn"] = portal_works()
        outer.start_soon(family, seen, "outer-first", 1)
        async with trio.open_nursery() as inner:
            inner.start_soon(family, seen, "inner", 1)
            # The inner nursery is open now, but `outer` still encloses the
            # whole call: its children get nothing.
            outer.start_soon(family, seen, "outer-while-inner-open", 1)
            await trio.lowlevel.checkpoint()
        outer.start_soon(family, seen, "outer-last", 0)

    async def main() -> None:
        async with trio.open_nursery() as outer:
            await greenback.with_portal_run_tree(fn, outer)

    trio.run(main)
    expected = {"fn": True}
    expected.update({n: True for n in family_names("inner", 1)})
    for name, depth in [("outer-first", 1), ("outer-while-inner-open", 1), ("outer-last", 0)]:
        expected.update({n: False for n in family_names(name, depth)})
    assert seen == expected


def test_run_tree_asyncio_tasks_outside_the_call_get_none() -> None:
    seen: dict[str, bool] = {}

    async def probe(name: str, go: asyncio.Event) -> None:
        await go.wait()
        seen[name] = portal_works(suspend=True)

    async def fn(go: asyncio.Event) -> None:
        seen["fn"] = portal_works()
        await asyncio.create_task(family(seen, "inside", 1))
        go.set()
        await asyncio.sleep(0)

    async def main() -> None:
        go = asyncio.Event()
        before = asyncio.create_task(probe("created before", go))
        await asyncio.sleep(0)  # `before` has started and is waiting
        not_started = asyncio.create_task(probe("created before, not started", go))
        await greenback.with_portal_run_tree(fn, go)
        after = asyncio.create_task(family(seen, "created after", 1))
        await asyncio.gather(before, not_started, after)

    asyncio.run(main())
    assert seen == {
        "fn": True,
        "inside": True,
        "inside.c": True,
        "created before": False,
        "created before, not started": False,
        "created after": False,
        "created after.c": False,
    }


def test_run_tree_nested(any_lib: Lib) -> None:
    seen: dict[str, bool] = {}

    async def inner() -> int:
        seen["inner"] = portal_works(suspend=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(family, seen, "inner-child", 1)
        return 1

    async def outer() -> int:
        seen["outer"] = portal_works(suspend=True)
        result = await greenback.with_portal_run_tree(inner)
        # Leaving the inner call doesn't end the outer one's portals.
        seen["outer again"] = portal_works(suspend=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(family, seen, "outer-child", 1)
        return result + 1

    async def main() -> None:
        assert await greenback.with_portal_run_tree(outer) == 2
        seen["main"] = portal_works()
        async with anyio.create_task_group() as tg:
            tg.start_soon(family, seen, "main-child", 0)

    any_lib.run(main)
    expected = {"inner": True, "outer": True, "outer again": True, "main": False}
    expected.update({n: True for n in family_names("inner-child", 1)})
    expected.update({n: True for n in family_names("outer-child", 1)})
    expected["main-child"] = False
    assert seen == expected


def test_run_tree_concurrent_siblings(any_lib: Lib) -> None:
    """Two sibling tasks inside with_portal_run_tree at once, interleaved with
    a third sibling that is not: only the first two's children get portals,
    however the steps interleave."""
    seen: dict[str, bool] = {}

    async def in_tree(name: str, entered: anyio.Event, proceed: anyio.Event) -> None:
        async def body() -> None:
            seen[name] = portal_works(suspend=True)
            entered.set()
            await proceed.wait()
            async with anyio.create_task_group() as tg:
                tg.start_soon(family, seen, name + "-child", 1)
            await any_lib.checkpoint()

        await greenback.with_portal_run_tree(body)

    async def outsider(wait_for: list[anyio.Event], done: anyio.Event) -> None:
        for event in wait_for:
            await event.wait()
        seen["outsider"] = portal_works()
        async with anyio.create_task_group() as tg:
            tg.start_soon(family, seen, "outsider-child", 1)
        done.set()

    async def main() -> None:
        a_in, b_in, outsider_done = anyio.Event(), anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(in_tree, "a", a_in, outsider_done)
            tg.start_soon(in_tree, "b", b_in, outsider_done)
            tg.start_soon(outsider, [a_in, b_in], outsider_done)

    any_lib.run(main)
    expected = {"a": True, "b": True, "outsider": False}
    expected.update({n: True for n in family_names("a-child", 1)})
    expected.update({n: True for n in family_names("b-child", 1)})
    expected.update({n: False for n in family_names("outsider-child", 1)})
    assert seen == expected


def test_overlapping_scopes_in_sibling_tasks(lib: Lib) -> None:
    """Scopes in sibling tasks that overlap without nesting: A enters, B
    enters, A leaves, and B's children still get portals; once B leaves too,
    everything is back as it was."""
    seen: dict[str, bool] = {}

    async def spawn(name: str) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(family, seen, name, 1)

    async def task_a(a_in: anyio.Event, b_in: anyio.Event, a_out: anyio.Event) -> None:
        with greenback.portals_for_children():
            a_in.set()
            await b_in.wait()
            await spawn("a")
        a_out.set()
        await spawn("a after")

    async def task_b(a_in: anyio.Event, b_in: anyio.Event, a_out: anyio.Event) -> None:
        await a_in.wait()
        async with greenback.portals_for_tree():
            b_in.set()
            await a_out.wait()
            await spawn("b")
        await spawn("b after")

    async def main() -> None:
        events = (anyio.Event(), anyio.Event(), anyio.Event())
        async with anyio.create_task_group() as tg:
            tg.start_soon(task_a, *events)
            tg.start_soon(task_b, *events)
        if lib.sniffio_name == "trio":
            assert greenback._trio_instrument.instrument_holder().get() is None
        else:
            assert asyncio.get_running_loop().get_task_factory() is None
        await spawn("main after")

    lib.run(main)
    expected: dict[str, bool] = {}
    for name, value in [("a", True), ("b", True), ("a after", False)]:
        expected.update({n: value for n in family_names(name, 1)})
    for name in ["b after", "main after"]:
        expected.update({n: False for n in family_names(name, 1)})
    assert seen == expected


def test_run_tree_exception_propagates_and_cleans_up(lib: Lib) -> None:
    async def fn() -> None:
        assert portal_works(suspend=True)
        raise KeyError("boom")

    async def main() -> None:
        with pytest.raises(KeyError, match="boom"):
            await greenback.with_portal_run_tree(fn)
        assert not portal_works()
        if lib.sniffio_name == "trio":
            assert greenback._trio_instrument.instrument_holder().get() is None
        else:
            assert asyncio.get_running_loop().get_task_factory() is None
        seen: dict[str, bool] = {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(family, seen, "child", 0)
        assert seen == {"child": False}

    lib.run(main)


def test_run_tree_is_not_a_checkpoint_trio() -> None:
    async def immediate() -> str:
        assert portal_works()
        return "result"

    async def main() -> None:
        counter = StepCounter(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(counter)
        marks = []
        with trio.CancelScope() as scope:
            scope.cancel()
            assert await greenback.with_portal_run_tree(immediate) == "result"
            marks.append("returned")
            assert counter.steps == 0  # no schedule point either
            await trio.lowlevel.checkpoint()
            marks.append("unreachable")  # pragma: no cover
        trio.lowlevel.remove_instrument(counter)
        assert scope.cancelled_caught
        assert marks == ["returned"]

    trio.run(main)


def test_run_tree_is_not_a_checkpoint_asyncio() -> None:
    async def immediate() -> str:
        assert portal_works()
        return "result"

    async def main() -> None:
        ran: list[str] = []

        async def other() -> None:
            ran.append("other")

        task = asyncio.create_task(other())
        assert await greenback.with_portal_run_tree(immediate) == "result"
        assert not ran
        await task
        assert ran

        # Nor is it a cancellation point: a pending cancel waits for the
        # next real await.
        me = asyncio.current_task()
        assert me is not None
        me.cancel()
        assert await greenback.with_portal_run_tree(immediate) == "result"
        with pytest.raises(asyncio.CancelledError):
            await asyncio.sleep(0)
        _uncancel(me)

    asyncio.run(main())


def test_run_tree_as_trio_main() -> None:
    """trio.run(greenback.with_portal_run_tree, main): the whole run except
    system tasks."""
    seen: dict[str, bool] = {}

    async def system_task(done: trio.Event) -> None:
        seen["system"] = portal_works()
        done.set()

    async def main(arg: str) -> str:
        seen["main"] = portal_works(suspend=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(family, seen, "child", 2)
        done = trio.Event()
        trio.lowlevel.spawn_system_task(system_task, done)
        await done.wait()
        return arg

    assert trio.run(greenback.with_portal_run_tree, main, "ok") == "ok"
    expected = {"main": True, "system": False}
    expected.update({n: True for n in family_names("child", 2)})
    assert seen == expected


# --------------------------------------------------------------------------
# portals_for_children
# --------------------------------------------------------------------------


def test_portals_for_children(any_lib: Lib) -> None:
    seen: dict[str, bool] = {}

    async def main() -> None:
        with greenback.portals_for_children():
            seen["self"] = portal_works()
            await any_lib.checkpoint()
            seen["self after checkpoint"] = portal_works()
            async with anyio.create_task_group() as tg:
                tg.start_soon(family, seen, "child", 2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(family, seen, "after", 0)

    any_lib.run(main)
    expected = {"self": False, "self after checkpoint": False, "after": False}
    expected.update({n: True for n in family_names("child", 2)})
    assert seen == expected


def test_portals_for_children_trio_enclosing_nursery() -> None:
    seen: dict[str, bool] = {}

    async def main() -> None:
        async with trio.open_nursery() as outer:
            with greenback.portals_for_children():
                async with trio.open_nursery() as inner:
                    inner.start_soon(family, seen, "inner", 1)
                    outer.start_soon(family, seen, "outer", 1)

    trio.run(main)
    assert seen == {"inner": True, "inner.c": True, "outer": False, "outer.c": False}


def test_portals_for_children_nested_scopes(lib: Lib) -> None:
    seen: dict[str, bool] = {}

    async def spawn(name: str) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(family, seen, name, 1)

    async def main() -> None:
        with greenback.portals_for_children():
            await spawn("outer-before")
            with greenback.portals_for_children():
                await spawn("inner")
            await spawn("outer-after")  # the outer scope is still active
        await spawn("none")
        if lib.sniffio_name == "asyncio":
            assert asyncio.get_running_loop().get_task_factory() is None
        else:
            assert greenback._trio_instrument.instrument_holder().get() is None

    lib.run(main)
    expected: dict[str, bool] = {}
    for name in ["outer-before", "inner", "outer-after"]:
        expected.update({n: True for n in family_names(name, 1)})
    expected.update({n: False for n in family_names("none", 1)})
    assert seen == expected


def test_portals_for_children_outside_async_context() -> None:
    with pytest.raises(sniffio.AsyncLibraryNotFoundError):
        with greenback.portals_for_children():
            pass  # pragma: no cover


def test_unsupported_library() -> None:
    async def never() -> None:  # pragma: no cover
        pass

    async def main() -> None:
        token = sniffio.current_async_library_cvar.set("curio")
        try:
            with pytest.raises(RuntimeError, match="greenback does not support curio"):
                with greenback.portals_for_children():
                    pass  # pragma: no cover
            with pytest.raises(RuntimeError, match="greenback does not support curio"):
                async with greenback.portals_for_tree():
                    pass  # pragma: no cover
            with pytest.raises(RuntimeError, match="greenback does not support curio"):
                await greenback.with_portal_run_tree(never)
        finally:
            sniffio.current_async_library_cvar.reset(token)
        # Nothing was left behind on the loop.
        assert asyncio.get_running_loop().get_task_factory() is None

    asyncio.run(main())


# --------------------------------------------------------------------------
# portals_for_tree
# --------------------------------------------------------------------------


async def _tree_scope_generator() -> Any:
    # The shape of a pytest-asyncio fixture: an async generator whose setup
    # and teardown each run in a task of their own, in one copied context.
    async with greenback.portals_for_tree():
        yield


def _create_task_in(ctx: contextvars.Context, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    if sys.version_info >= (3, 11):
        return asyncio.get_running_loop().create_task(coro, context=ctx)
    else:
        # 3.10 has no context= argument: the task runs in a copy of ctx,
        # which is how pytest-asyncio's fixtures run there.
        return ctx.run(asyncio.create_task, coro)


def test_portals_for_tree_left_by_another_task_after_the_entering_one_ended() -> None:
    """Left by another task once the entering task is done: nothing to take
    back, so leaving works, and the scope's task factory goes away."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        agen, ctx = _tree_scope_generator(), contextvars.copy_context()
        await _create_task_in(ctx, agen.__anext__())
        if sys.version_info >= (3, 11):
            child = _create_task_in(ctx, asyncio.sleep(0, "x"))
            assert greenback.has_portal(child)
            await child
        with pytest.raises(StopAsyncIteration):
            await _create_task_in(ctx, agen.__anext__())
        assert loop.get_task_factory() is None

    asyncio.run(main())


def test_portals_for_tree_left_by_another_task_while_the_entering_one_runs() -> None:
    """Left by another task while the entering task still runs: the portal
    can't be taken back there, and the error says what to use instead."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        agen, ctx = _tree_scope_generator(), contextvars.copy_context()
        entered, release = asyncio.Event(), asyncio.Event()

        async def enter_and_keep_running() -> None:
            await agen.__anext__()
            entered.set()
            await release.wait()

        entering = _create_task_in(ctx, enter_and_keep_running())
        await entered.wait()
        with pytest.raises(RuntimeError, match="portals_for_children"):
            await _create_task_in(ctx, agen.__anext__())
        assert loop.get_task_factory() is None
        release.set()
        await entering

    asyncio.run(main())


def test_portals_for_children_left_in_another_context() -> None:
    """Entered in one copy of a context and left in another (pytest-asyncio
    does this on 3.10): leaving still works and takes the factory away."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        scope = greenback.portals_for_children()
        contextvars.copy_context().run(scope.__enter__)
        assert loop.get_task_factory() is not None
        contextvars.copy_context().run(scope.__exit__, None, None, None)
        assert loop.get_task_factory() is None
        assert not greenback.has_portal(asyncio.create_task(asyncio.sleep(0)))

    asyncio.run(main())


def test_portals_for_tree(any_lib: Lib) -> None:
    seen: dict[str, bool] = {}

    async def main() -> None:
        seen["before"] = portal_works()
        async with greenback.portals_for_tree():
            # Works straight away, with no checkpoint of our own first.
            seen["entered"] = portal_works(suspend=True)
            async with anyio.create_task_group() as tg:
                tg.start_soon(family, seen, "child", 2)
            await any_lib.checkpoint()
            seen["later in block"] = portal_works(suspend=True)
        seen["after"] = portal_works()
        await any_lib.checkpoint()
        seen["after checkpoint"] = portal_works()
        async with anyio.create_task_group() as tg:
            tg.start_soon(family, seen, "late", 1)
        # A second round in the same task works the same way.
        async with greenback.portals_for_tree():
            seen["second entry"] = portal_works(suspend=True)
        seen["second exit"] = portal_works()

    any_lib.run(main)
    expected = {
        "before": False,
        "entered": True,
        "later in block": True,
        "after": False,
        "after checkpoint": False,
        "second entry": True,
        "second exit": False,
    }
    expected.update({n: True for n in family_names("child", 2)})
    expected.update({n: False for n in family_names("late", 1)})
    assert seen == expected


def test_portals_for_tree_trio_enclosing_nursery() -> None:
    seen: dict[str, bool] = {}

    async def main() -> None:
        async with trio.open_nursery() as outer:
            async with greenback.portals_for_tree():
                seen["self"] = portal_works()
                outer.start_soon(family, seen, "outer", 0)
                async with trio.open_nursery() as inner:
                    inner.start_soon(family, seen, "inner", 0)

    trio.run(main)
    assert seen == {"self": True, "outer": False, "inner": True}


@pytest.mark.parametrize("how", ["ensure_portal", "with_portal_run"])
def test_portals_for_tree_keeps_existing_portal(any_lib: Lib, how: str) -> None:
    seen: dict[str, bool] = {}

    async def body() -> None:
        async with greenback.portals_for_tree():
            seen["in block"] = portal_works(suspend=True)
            async with anyio.create_task_group() as tg:
                tg.start_soon(family, seen, "child", 0)
        seen["after block"] = portal_works(suspend=True)
        await any_lib.checkpoint()
        seen["after checkpoint"] = portal_works(suspend=True)

    async def main() -> None:
        if how == "ensure_portal":
            await greenback.ensure_portal()
            await body()
        else:
            await greenback.with_portal_run(body)

    any_lib.run(main)
    assert seen == {
        "in block": True,
        "child": True,
        "after block": True,
        "after checkpoint": True,
    }


def test_portals_for_tree_enter_and_exit_are_schedule_points_trio() -> None:
    async def main() -> None:
        counter = StepCounter(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(counter)
        try:
            async with greenback.portals_for_tree():
                assert counter.steps >= 1
                at_end_of_block = counter.steps
            assert counter.steps > at_end_of_block
        finally:
            trio.lowlevel.remove_instrument(counter)

    trio.run(main)


def test_portals_for_tree_enter_and_exit_are_schedule_points_asyncio() -> None:
    async def main() -> None:
        ran: list[str] = []

        async def other(name: str) -> None:
            ran.append(name)

        first = asyncio.create_task(other("first"))
        async with greenback.portals_for_tree():
            assert ran == ["first"]
            second = asyncio.create_task(other("second"))
        assert ran == ["first", "second"]
        await asyncio.gather(first, second)

    asyncio.run(main())


def test_portals_for_tree_is_not_a_cancellation_point_trio() -> None:
    async def main() -> None:
        marks: list[str] = []
        # Cancelled before entering: entering and leaving don't raise.
        with trio.CancelScope() as scope:
            scope.cancel()
            async with greenback.portals_for_tree():
                marks.append("in")
                assert portal_works()
            marks.append("out")
            await trio.lowlevel.checkpoint()
            marks.append("unreachable")  # pragma: no cover
        assert scope.cancelled_caught
        assert marks == ["in", "out"]

        # The next checkpoint inside the block does raise, even via await_.
        marks.clear()
        with trio.CancelScope() as scope:
            async with greenback.portals_for_tree():
                scope.cancel()
                marks.append("in")
                greenback.await_(trio.lowlevel.checkpoint())
                marks.append("unreachable")  # pragma: no cover
        assert scope.cancelled_caught
        assert marks == ["in"]

        # Cancelled inside the block: leaving doesn't raise.
        marks.clear()
        with trio.CancelScope() as scope:
            async with greenback.portals_for_tree():
                scope.cancel()
            marks.append("out")
            await trio.lowlevel.checkpoint()
            marks.append("unreachable")  # pragma: no cover
        assert scope.cancelled_caught
        assert marks == ["out"]
        assert not portal_works()

    trio.run(main)


def test_portals_for_tree_is_not_a_cancellation_point_asyncio() -> None:
    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        marks: list[str] = []

        # Cancelled before entering: delivered at the first await inside.
        task.cancel("before entry")
        async with greenback.portals_for_tree():
            marks.append("in")
            assert portal_works()
            with pytest.raises(asyncio.CancelledError) as info:
                await asyncio.sleep(0)
            assert info.value.args == ("before entry",)
            if sys.version_info >= (3, 11):
                assert task.cancelling() == 1
            _uncancel(task)
            marks.append("delivered inside")
        assert marks == ["in", "delivered inside"]

        # Cancelled inside the block: delivered after leaving it.
        marks.clear()
        async with greenback.portals_for_tree():
            task.cancel("inside")
        marks.append("out")
        with pytest.raises(asyncio.CancelledError) as info:
            await asyncio.sleep(0)
        assert info.value.args == ("inside",)
        if sys.version_info >= (3, 11):
            assert task.cancelling() == 1
        _uncancel(task)
        assert marks == ["out"]

        # Cancelled inside, delivered through await_ inside.
        async with greenback.portals_for_tree():
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                greenback.await_(asyncio.sleep(0))
            _uncancel(task)
        await asyncio.sleep(0)  # nothing pending any more
        assert not portal_works()

    asyncio.run(main())


if sys.version_info >= (3, 11):  # asyncio.timeout is 3.11+

    def test_portals_for_tree_asyncio_timeout_still_times_out() -> None:
        async def main() -> None:
            marks: list[str] = []
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0):
                    async with greenback.portals_for_tree():
                        marks.append("in")
                        await asyncio.sleep(1)
                        marks.append("unreachable")  # pragma: no cover
            assert marks == ["in"]
            task = asyncio.current_task()
            assert task is not None and task.cancelling() == 0

        asyncio.run(main())


def test_portals_for_tree_body_exception_propagates(lib: Lib) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="from the block"):
            async with greenback.portals_for_tree():
                assert portal_works(suspend=True)
                raise ValueError("from the block")
        assert not portal_works()
        await lib.checkpoint()
        assert not portal_works()

    lib.run(main)


# --------------------------------------------------------------------------
# AutoPortalInstrument (Trio)
# --------------------------------------------------------------------------


def test_auto_portal_instrument_is_a_trio_instrument() -> None:
    instrument = greenback.AutoPortalInstrument()
    assert isinstance(instrument, trio.abc.Instrument)
    assert greenback.AutoPortalInstrument is greenback.AutoPortalInstrument
    assert "AutoPortalInstrument" in getattr(greenback, "__all__")


def test_auto_portal_instrument_in_trio_run() -> None:
    seen: dict[str, bool] = {}

    async def system_task(done: trio.Event) -> None:
        seen["system"] = portal_works(suspend=True)
        done.set()

    async def main() -> None:
        seen["main"] = portal_works(suspend=True)
        root = trio.lowlevel.current_root_task()
        assert root is not None
        seen["root"] = greenback.has_portal(root)
        done = trio.Event()
        sys_task = trio.lowlevel.spawn_system_task(system_task, done)
        seen["system, from outside"] = greenback.has_portal(sys_task)
        await done.wait()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(family, seen, "child", 1)
        # Scopes inside the run reuse the run's instrument and leave it.
        with greenback.portals_for_children():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(family, seen, "scoped", 0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(family, seen, "after scope", 0)

    trio.run(main, instruments=[greenback.AutoPortalInstrument()])
    assert seen == {
        "main": True,
        "root": True,
        "system": True,
        "system, from outside": True,
        "child": True,
        "child.c": True,
        "scoped": True,
        "after scope": True,
    }


def test_tree_scopes_share_one_instrument_trio() -> None:
    seen: dict[str, bool] = {}

    async def main() -> None:
        holder = greenback._trio_instrument.instrument_holder()
        assert holder.get() is None
        instruments: dict[str, object] = {}
        a_in, b_in, a_out = trio.Event(), trio.Event(), trio.Event()

        async def user_a() -> None:
            with greenback.portals_for_children():
                instruments["a"] = holder.get()
                a_in.set()
                await b_in.wait()
            a_out.set()

        async def user_b() -> None:
            async with greenback.portals_for_tree():
                instruments["b"] = holder.get()
                b_in.set()
                await a_out.wait()
                # `a` has left; `b` still holds the same instrument.
                instruments["b after a left"] = holder.get()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(family, seen, "b-child", 0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(user_a)
            nursery.start_soon(user_b)

        shared = instruments["a"]
        assert isinstance(shared, greenback.AutoPortalInstrument)
        assert instruments["b"] is shared
        assert instruments["b after a left"] is shared
        assert holder.get() is None
        # It is no longer installed in the run ...
        with pytest.raises(KeyError):
            trio.lowlevel.remove_instrument(shared)
        # ... and new tasks get no portal.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(family, seen, "after", 1)

        # A later scope gets a fresh instrument.
        with greenback.portals_for_children():
            fresh = holder.get()
            assert fresh is not None and fresh is not shared
        assert holder.get() is None

    trio.run(main)
    assert seen == {"b-child": True, "after": False, "after.c": False}


# --------------------------------------------------------------------------
# asyncio specifics: which ways of creating tasks are covered
# --------------------------------------------------------------------------

_AIO_LIBS = [Lib("asyncio", "asyncio")]
if uvloop is not None:
    _AIO_LIBS.append(Lib("uvloop", "asyncio"))


@pytest.fixture(params=_AIO_LIBS, ids=lambda lib: lib.name)
def aio_lib(request: pytest.FixtureRequest) -> Lib:
    """asyncio and uvloop."""
    return request.param  # type: ignore[no-any-return]


Spawner = Callable[[Iterable[Coroutine[Any, Any, None]]], Awaitable[None]]


async def _spawn_create_task(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    for task in [asyncio.create_task(coro) for coro in coros]:
        await task


async def _spawn_loop_create_task(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    loop = asyncio.get_running_loop()
    for task in [loop.create_task(coro) for coro in coros]:
        await task


async def _spawn_ensure_future(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    for fut in [asyncio.ensure_future(coro) for coro in coros]:
        await fut


async def _spawn_gather(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    await asyncio.gather(*coros)


async def _spawn_task_group(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    async with asyncio.TaskGroup() as tg:  # type: ignore[attr-defined,unused-ignore]
        for coro in coros:
            tg.create_task(coro)


async def _spawn_anyio(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    async def run(coro: Coroutine[Any, Any, None]) -> None:
        await coro

    async with anyio.create_task_group() as tg:
        for coro in coros:
            tg.start_soon(run, coro)


_SPAWNERS = [
    pytest.param(_spawn_create_task, id="create_task"),
    pytest.param(_spawn_loop_create_task, id="loop.create_task"),
    pytest.param(_spawn_ensure_future, id="ensure_future"),
    pytest.param(_spawn_gather, id="gather"),
    pytest.param(
        _spawn_task_group,
        id="TaskGroup",
        marks=pytest.mark.skipif(sys.version_info < (3, 11), reason="3.11+"),
    ),
    pytest.param(_spawn_anyio, id="anyio"),
]


async def aio_family(
    spawn: Spawner, seen: dict[str, bool], name: str, depth: int
) -> None:
    seen[name] = portal_works(suspend=True)
    if depth:
        await spawn(
            [
                aio_family(spawn, seen, name + ".c", depth - 1),
                aio_family(spawn, seen, name + ".d", 0),
            ]
        )


def _aio_family_names(name: str, depth: int) -> list[str]:
    names = [name]
    if depth:
        names += _aio_family_names(name + ".c", depth - 1)
        names.append(name + ".d")
    return names


@pytest.mark.parametrize("spawn", _SPAWNERS)
@pytest.mark.parametrize("api", ["portals_for_children", "portals_for_tree", "run_tree"])
def test_asyncio_ways_of_creating_tasks(aio_lib: Lib, spawn: Spawner, api: str) -> None:
    seen: dict[str, bool] = {}

    async def body() -> None:
        await spawn([aio_family(spawn, seen, "a", 2), aio_family(spawn, seen, "b", 0)])

    async def main() -> None:
        await spawn([aio_family(spawn, seen, "before", 1)])
        if api == "portals_for_children":
            with greenback.portals_for_children():
                await body()
        elif api == "portals_for_tree":
            async with greenback.portals_for_tree():
                await body()
        else:
            await greenback.with_portal_run_tree(body)
        await spawn([aio_family(spawn, seen, "after", 1)])
        assert asyncio.get_running_loop().get_task_factory() is None

    aio_lib.run(main)
    expected = {n: True for n in _aio_family_names("a", 2) + _aio_family_names("b", 0)}
    expected.update({n: False for n in _aio_family_names("before", 1)})
    expected.update({n: False for n in _aio_family_names("after", 1)})
    assert seen == expected


def test_asyncio_tasks_outside_the_scope(aio_lib: Lib) -> None:
    seen: dict[str, bool] = {}

    async def probe(name: str, go: asyncio.Event) -> None:
        await go.wait()
        seen[name] = portal_works(suspend=True)

    async def sibling(scope_entered: asyncio.Event, sibling_done: asyncio.Event) -> None:
        # Runs while main is inside its scope, but is not inside it itself.
        await scope_entered.wait()
        seen["sibling"] = portal_works()
        await asyncio.create_task(aio_family(_spawn_create_task, seen, "sibling-child", 1))
        sibling_done.set()

    async def main() -> None:
        go = asyncio.Event()
        scope_entered, sibling_done = asyncio.Event(), asyncio.Event()
        before = asyncio.create_task(probe("created before", go))
        sib = asyncio.create_task(sibling(scope_entered, sibling_done))
        with greenback.portals_for_children():
            scope_entered.set()
            inside = asyncio.create_task(probe("created inside", go))
            # Visible from the parent too, before the child has run.
            assert greenback.has_portal(inside)
            assert not greenback.has_portal(before)
            await sibling_done.wait()
            go.set()
            await inside
        after = asyncio.create_task(probe("created after", go))
        await asyncio.gather(before, sib, after)

    aio_lib.run(main)
    expected = {
        "created before": False,
        "created inside": True,
        "created after": False,
        "sibling": False,
    }
    expected.update({n: False for n in _aio_family_names("sibling-child", 1)})
    assert seen == expected


def test_asyncio_custom_task_factory_is_chained_and_restored(aio_lib: Lib) -> None:
    seen: dict[str, bool] = {}
    calls: list[str] = []

    def custom(
        loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
    ) -> asyncio.Task[Any]:
        calls.append("call")
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(custom)
        await asyncio.create_task(family(seen, "before", 0))
        assert calls == ["call"]
        with greenback.portals_for_children():
            await asyncio.create_task(aio_family(_spawn_create_task, seen, "inside", 1))
        # One call for each task created inside: inside, inside.c, inside.d.
        assert calls == ["call"] * 4
        assert loop.get_task_factory() is custom
        async with greenback.portals_for_tree():
            await asyncio.gather(family(seen, "tree", 0))
        assert calls == ["call"] * 5
        assert loop.get_task_factory() is custom
        await asyncio.create_task(family(seen, "after", 0))
        assert calls == ["call"] * 6
        loop.set_task_factory(None)

    aio_lib.run(main)
    expected = {n: True for n in _aio_family_names("inside", 1)}
    expected.update({"before": False, "tree": True, "after": False})
    assert seen == expected


def test_asyncio_factory_installed_inside_the_scope_is_left_alone() -> None:
    def custom(
        loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
    ) -> asyncio.Task[Any]:
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with greenback.portals_for_children():
            loop.set_task_factory(custom)
        assert loop.get_task_factory() is custom
        loop.set_task_factory(None)

    asyncio.run(main())


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")
def test_asyncio_eager_task_factory() -> None:
    order: list[str] = []
    seen: dict[str, bool] = {}

    async def child() -> None:
        order.append("child starts")
        # At the very first step, eagerly run inside create_task().
        seen["child first step"] = portal_works()
        greenback.await_(asyncio.sleep(0))  # suspends the eager task
        order.append("child resumes")
        seen["child later"] = portal_works(suspend=True)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        factory = asyncio.eager_task_factory  # type: ignore[attr-defined,unused-ignore]
        loop.set_task_factory(factory)
        with greenback.portals_for_children():
            task = asyncio.create_task(child())
            order.append("create_task returned")
            await task
        assert loop.get_task_factory() is factory
        async def quick(name: str) -> None:
            seen[name] = portal_works()  # no suspension: completes eagerly

        async with greenback.portals_for_tree():
            task = asyncio.create_task(quick("tree child"))
            assert task.done()
        assert loop.get_task_factory() is factory
        task = asyncio.create_task(family(seen, "after", 0))
        await task
        loop.set_task_factory(None)

    asyncio.run(main())
    assert order == ["child starts", "create_task returned", "child resumes"]
    assert seen == {
        "child first step": True,
        "child later": True,
        "tree child": True,
        "after": False,
    }


if sys.version_info >= (3, 11):  # create_task(context=) is 3.11+

    def test_asyncio_task_created_with_explicit_context() -> None:
        """A task created inside the scope with a context copied outside it is
        not in the scope; one with a context copied inside it is."""
        seen: dict[str, bool] = {}

        async def main() -> None:
            outside = contextvars.copy_context()
            with greenback.portals_for_children():
                inside = contextvars.copy_context()
                await asyncio.create_task(family(seen, "outside ctx", 0), context=outside)
                await asyncio.create_task(family(seen, "inside ctx", 0), context=inside)

        asyncio.run(main())
        assert seen == {"outside ctx": False, "inside ctx": True}


def test_asyncio_loop_settings_are_per_loop() -> None:
    """Scopes change only the running loop: another loop, running at the same
    time in another thread or afterwards, keeps its own settings."""
    seen: dict[str, bool] = {}
    factories: dict[str, object] = {}

    async def other_loop_main(name: str) -> None:
        factories[name] = asyncio.get_running_loop().get_task_factory()
        await asyncio.create_task(family(seen, name, 0))

    def run_other_loop(name: str) -> None:
        asyncio.run(other_loop_main(name))

    async def main() -> None:
        with greenback.portals_for_children():
            assert asyncio.get_running_loop().get_task_factory() is not None
            # to_thread copies our context into the thread, so the scope's
            # context travels along: still, that loop gives no portals.
            await asyncio.to_thread(run_other_loop, "to_thread")
            thread = threading.Thread(target=run_other_loop, args=("thread",))
            thread.start()
            while thread.is_alive():
                await asyncio.sleep(0.001)
            thread.join()
            await asyncio.create_task(family(seen, "own", 0))

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
        assert loop.get_task_factory() is None
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
    run_other_loop("later")
    assert factories == {"to_thread": None, "thread": None, "later": None}
    assert seen == {"to_thread": False, "thread": False, "own": True, "later": False}


@pytest.mark.skipif(uvloop is None, reason="uvloop not installed")
def test_uvloop_direct_loop() -> None:
    assert uvloop is not None
    seen: dict[str, bool] = {}

    async def main() -> None:
        async with greenback.portals_for_tree():
            seen["self"] = portal_works(suspend=True)
            await asyncio.create_task(family(seen, "child", 1))
        seen["after"] = portal_works()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
        assert loop.get_task_factory() is None
    finally:
        loop.close()
    assert seen == {"self": True, "child": True, "child.c": True, "after": False}
