"""Context variables: sync code under a portal runs in its task's context."""

from __future__ import annotations

import asyncio
import contextvars
import sys
from typing import Any, Coroutine, TypeVar

import trio
import trio.testing

import greenback


from conftest import Lib

var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
T = TypeVar("T")


def create_task_in_context(
    coro: Coroutine[Any, Any, T], ctx: contextvars.Context
) -> asyncio.Task[T]:
    if sys.version_info >= (3, 11):
        return asyncio.create_task(coro, context=ctx)
    else:
        # 3.10 has no context= argument: the task runs in a copy of ctx instead.
        return ctx.run(asyncio.create_task, coro)


async def get_after_checkpoint(lib: Lib) -> str:
    await lib.checkpoint()
    return var.get()


async def set_after_checkpoint(lib: Lib, value: str) -> None:
    await lib.checkpoint()
    var.set(value)
    await lib.checkpoint()


def test_sync_code_and_awaited_coroutines_share_the_task_context(any_lib: Lib) -> None:
    def sync_code(tag: str) -> str:
        assert var.get() == f"{tag}: from async"
        var.set(f"{tag}: from sync")
        seen = greenback.await_(get_after_checkpoint(any_lib))
        assert seen == f"{tag}: from sync"
        greenback.await_(set_after_checkpoint(any_lib, f"{tag}: from awaited"))
        assert var.get() == f"{tag}: from awaited"
        return seen

    async def main() -> None:
        var.set("portal: from async")
        await greenback.ensure_portal()
        assert sync_code("portal") == "portal: from sync"
        assert var.get() == "portal: from awaited"
        await any_lib.checkpoint()
        assert var.get() == "portal: from awaited"

    async def main_one_shot() -> None:
        var.set("sync: from async")
        assert await greenback.with_portal_run_sync(sync_code, "sync") == "sync: from sync"
        assert var.get() == "sync: from awaited"

        async def async_fn() -> str:
            await any_lib.checkpoint()
            return sync_code("run")

        var.set("run: from async")
        assert await greenback.with_portal_run(async_fn) == "run: from sync"
        assert var.get() == "run: from awaited"

    any_lib.run(main)
    any_lib.run(main_one_shot)


def test_context_run_around_await_(lib: Lib) -> None:
    async def in_ctx() -> str:
        assert var.get() == "ctx"
        await lib.checkpoint()
        assert var.get() == "ctx"
        var.set("set in ctx")
        await lib.checkpoint()
        assert var.get() == "set in ctx"
        return "done"

    def sync_code() -> None:
        var.set("task")
        ctx = contextvars.copy_context()
        ctx.run(var.set, "ctx")
        assert ctx.run(greenback.await_, in_ctx()) == "done"
        assert ctx[var] == "set in ctx"
        assert var.get() == "task"
        # The task context is followed again by later await_ calls.
        assert greenback.await_(get_after_checkpoint(lib)) == "task"

    async def main() -> None:
        await greenback.ensure_portal()
        sync_code()
        assert var.get() == "task"
        await lib.checkpoint()
        assert var.get() == "task"
        var.set("async")
        await greenback.with_portal_run_sync(sync_code)
        assert var.get() == "task"

    lib.run(main)


def test_trio_task_context_assignment_is_respected() -> None:
    lib = Lib("trio", "trio")

    def sync_reassigns() -> None:
        new_ctx = contextvars.copy_context()
        new_ctx.run(var.set, "second")
        trio.lowlevel.current_task().context = new_ctx
        # Trio switches contexts at the task's next step.
        assert greenback.await_(get_after_checkpoint(lib)) == "second"
        assert var.get() == "second"
        greenback.await_(set_after_checkpoint(lib, "second, changed"))
        assert new_ctx[var] == "second, changed"

    async def main() -> None:
        await greenback.ensure_portal()
        var.set("first")
        new_ctx = contextvars.copy_context()
        new_ctx.run(var.set, "assigned")
        trio.lowlevel.current_task().context = new_ctx
        await trio.lowlevel.checkpoint()
        assert var.get() == "assigned"
        assert greenback.await_(get_after_checkpoint(lib)) == "assigned"
        greenback.await_(set_after_checkpoint(lib, "changed"))
        assert new_ctx[var] == "changed"

        # Assigned from sync code in the middle of a portal step.
        sync_reassigns()
        assert var.get() == "second, changed"
        await trio.lowlevel.checkpoint()
        assert var.get() == "second, changed"

    trio.run(main)


def test_tasks_keep_their_own_contexts(lib: Lib) -> None:
    """Task A bestows a portal on task B; both then set the variable in sync
    code around await_ calls, interleaved; neither sees the other's value."""
    log: list[str] = []

    def sync_loop(name: str) -> None:
        for i in range(5):
            var.set(f"{name}{i}")
            greenback.await_(lib.sleep(0.001))
            assert var.get() == f"{name}{i}", (name, var.get())
            assert greenback.await_(get_after_checkpoint(lib)) == f"{name}{i}"
        log.append(name)

    async def task_b_body() -> None:
        assert var.get() == "unset"
        sync_loop("b")

    async def main_asyncio() -> None:
        var.set("a")
        await greenback.ensure_portal()
        task_b = create_task_in_context(task_b_body(), contextvars.Context())
        greenback.bestow_portal(task_b)
        sync_loop("a")
        await task_b
        assert var.get() == "a4"

    async def main_trio() -> None:
        var.set("a")
        await greenback.ensure_portal()
        go = trio.Event()
        async with trio.open_nursery() as nursery:
            # Spawned tasks start from a copy of the spawner's context; clear
            # the variable in B so that a leak from A would be seen.
            async def start_b(
                task_status: trio.TaskStatus[trio.lowlevel.Task] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                var.set("unset")
                task_status.started(trio.lowlevel.current_task())
                await go.wait()
                await task_b_body()

            task_b = await nursery.start(start_b)
            greenback.bestow_portal(task_b)
            go.set()
            sync_loop("a")
        assert var.get() == "a4"

    lib.run(main_trio if lib.sniffio_name == "trio" else main_asyncio)
    assert sorted(log) == ["a", "b"]


def test_worker_reuse_does_not_carry_contexts(lib: Lib) -> None:
    """Portals are torn down and set up again, one task after the other; a
    value set by sync code in one never shows up in the next."""

    def set_and_check(value: str) -> str:
        before = var.get()
        var.set(value)
        greenback.await_(lib.checkpoint())
        assert var.get() == value
        return before

    async def one_task(value: str) -> str:
        return await greenback.with_portal_run_sync(set_and_check, value)

    async def portal_task(value: str) -> str:
        await greenback.ensure_portal()
        return set_and_check(value)

    for i in range(3):
        assert lib.run(one_task, f"one-shot {i}") == "unset"
        assert lib.run(portal_task, f"portal {i}") == "unset"

    async def siblings() -> None:
        results: list[str] = []

        async def child(value: str) -> None:
            results.append(await one_task(value))
            results.append(await portal_task(value))

        if lib.sniffio_name == "trio":
            for i in range(3):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(child, f"child {i}")
        else:
            for i in range(3):
                await create_task_in_context(child(f"child {i}"), contextvars.Context())
        # one_task sees "unset"; portal_task in the same task sees its own
        # earlier value, never another task's.
        assert results == [v for i in range(3) for v in ("unset", f"child {i}")]

    lib.run(siblings)


def test_with_portal_run_functions_see_callers_context(lib: Lib) -> None:
    def sync_fn() -> str:
        return var.get()

    async def async_fn() -> str:
        return var.get() + " " + sync_fn()

    async def main() -> None:
        var.set("caller")
        assert await greenback.with_portal_run_sync(sync_fn) == "caller"
        assert await greenback.with_portal_run(async_fn) == "caller caller"
        await greenback.ensure_portal()
        var.set("after portal")
        assert await greenback.with_portal_run_sync(sync_fn) == "after portal"
        assert await greenback.with_portal_run(async_fn) == "after portal after portal"

    lib.run(main)


def test_asyncio_task_with_explicit_context() -> None:
    """asyncio.create_task(context=...) runs the task and its sync code in
    that context."""

    def sync_code() -> str:
        greenback.await_(asyncio.sleep(0))
        var.set(var.get() + "+sync")
        return var.get()

    async def child() -> str:
        await greenback.ensure_portal()
        return sync_code()

    async def main() -> None:
        ctx = contextvars.Context()
        ctx.run(var.set, "explicit")
        assert await create_task_in_context(child(), ctx) == "explicit+sync"
        # 3.10 can only start the task in a copy of ctx.
        assert ctx[var] == ("explicit+sync" if sys.version_info >= (3, 11) else "explicit")
        assert var.get() == "unset"

    asyncio.run(main())
