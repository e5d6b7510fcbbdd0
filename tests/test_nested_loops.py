"""Event loops run from inside a task that has a portal.

A portal belongs to one task. When sync code under a portal runs an event
loop itself (a nest_asyncio program calling loop.run_until_complete(), a sync
library calling trio.run() or asyncio.run()), that loop's tasks are other
tasks: each one has a portal only if it gets one itself, await_() in it
serves that task alone, and the outer task's portal keeps working around the
nested loop. Escapes that stay in the same task (contextvars.Context.run, a
greenlet started by the sync code) still count as that task.

nest_asyncio.apply() patches asyncio for the whole process, so every test
that uses it runs a script in a fresh interpreter (which inherits
GREENBACK_NO_EXTENSIONS, and so the implementation under test).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import subprocess
import sys
import textwrap
from typing import Any, Callable, Coroutine, TypeVar

import greenlet
import pytest
import trio

import greenback

from conftest import Lib

T = TypeVar("T")

var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

NO_PORTAL = "must create a greenback portal"
PORTAL_WAYS = ["ensure_portal", "with_portal_run_sync", "with_portal_run", "bestow_portal"]
NEST_WAYS = ["create_task", "run_until_complete"]


# ---------------------------------------------------------------------------
# Helpers shared by the in-process tests
# ---------------------------------------------------------------------------


async def with_portal(way: str, sync_fn: Callable[[], T], library: str) -> T:
    """Run *sync_fn* in the current task (of *library*) under a portal
    obtained *way*."""
    if way == "ensure_portal":
        await greenback.ensure_portal()
        return sync_fn()
    if way == "with_portal_run_sync":
        return await greenback.with_portal_run_sync(sync_fn)
    if way == "with_portal_run":

        async def call() -> T:
            return sync_fn()

        return await greenback.with_portal_run(call)
    assert way == "bestow_portal"
    if library == "trio":
        greenback.bestow_portal(trio.lowlevel.current_task())
        await trio.lowlevel.checkpoint()
    else:
        task = asyncio.current_task()
        assert task is not None
        greenback.bestow_portal(task)
        await asyncio.sleep(0)
    return sync_fn()


def attempt(aw: Coroutine[Any, Any, str]) -> str:
    """await_(aw)'s result, or "no portal" if it gave the clear error."""
    try:
        return greenback.await_(aw)
    except RuntimeError as exc:
        return "no portal" if NO_PORTAL in str(exc) else f"other error: {exc!r}"
    finally:
        aw.close()


async def trio_nap(value: str) -> str:
    await trio.sleep(0.001)  # a timer: the task really suspends
    return value


async def asyncio_nap(value: str) -> str:
    await asyncio.sleep(0.001)
    return value


def assert_asyncio_logged_nothing(caplog: pytest.LogCaptureFixture) -> None:
    logged = [
        (r.levelno, f"{r.getMessage()} {r.exc_info[1] if r.exc_info else ''}")
        for r in caplog.records
        if r.name.startswith("asyncio")
    ]
    assert [text for level, text in logged if level >= logging.ERROR] == []
    assert [text for level, text in logged if "Leaving task" in text] == []


# ---------------------------------------------------------------------------
# nest_asyncio: loop.run_until_complete() inside a task with a portal
# ---------------------------------------------------------------------------

PRELUDE = '''
import asyncio, contextvars, logging
import greenlet, nest_asyncio, greenback
nest_asyncio.apply()

class ShowLog(logging.Handler):
    def emit(self, record):
        text = record.getMessage().splitlines()[0]
        if record.exc_info and record.exc_info[1] is not None:
            text += f" ({record.exc_info[1]!r})"
        print("asyncio log:", record.levelname, text, flush=True)

logging.getLogger("asyncio").addHandler(ShowLog())

var = contextvars.ContextVar("var", default="unset")

def show(*args):
    print(*args, flush=True)

async def nap(value):
    await asyncio.sleep(0.001)  # a timer: the task really suspends
    return value

def await_nap(value):
    return greenback.await_(nap(value))

def attempt(value):
    """await_(nap(value))'s result, or "no portal" if it gave the clear error."""
    coro = nap(value)
    try:
        return greenback.await_(coro)
    except RuntimeError as exc:
        return "no portal" if NO_PORTAL in str(exc) else f"other error: {exc!r}"
    finally:
        coro.close()

def run_nested(coro):
    """Run coro as a task of a nested run of the running loop: a task made
    beforehand with create_task, or the coroutine given to run_until_complete."""
    loop = asyncio.get_event_loop()
    if HOW == "create_task":
        task = asyncio.create_task(coro)
        loop.run_until_complete(asyncio.wait([task]))
        return task.result()
    return loop.run_until_complete(coro)

async def with_portal(way, sync_fn):
    if way == "ensure_portal":
        await greenback.ensure_portal()
        return sync_fn()
    if way == "with_portal_run_sync":
        return await greenback.with_portal_run_sync(sync_fn)
    if way == "with_portal_run":
        async def call():
            return sync_fn()
        return await greenback.with_portal_run(call)
    assert way == "bestow_portal"
    greenback.bestow_portal(asyncio.current_task())
    await asyncio.sleep(0)
    return sync_fn()
'''


def run_nest_asyncio(script: str, how: str = "run_until_complete", **names: object) -> list[str]:
    """Run *script* in a fresh interpreter, after *names* (and HOW, NO_PORTAL)
    as variables and PRELUDE; return the lines it printed, having checked
    that it exited cleanly and asyncio logged nothing."""
    names.update(HOW=how, NO_PORTAL=NO_PORTAL)
    code = "".join(f"{name} = {value!r}\n" for name, value in names.items())
    code += PRELUDE + textwrap.dedent(script)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
    except subprocess.TimeoutExpired as exc:
        # A portal that serves the wrong task can leave the script waiting forever.
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else ""
        proc = subprocess.CompletedProcess(exc.cmd, -1, stdout, "(killed: hung for 30 s)\n")
    lines = proc.stdout.splitlines()
    report = f"exit status {proc.returncode}\n--- stdout:\n{proc.stdout}--- stderr:\n{proc.stderr}"
    assert [line for line in lines if line.startswith("asyncio log:")] == [], report
    assert (proc.returncode, proc.stderr) == (0, ""), report
    return lines


@pytest.mark.parametrize("outer_way", PORTAL_WAYS)
@pytest.mark.parametrize("how", NEST_WAYS)
def test_nest_asyncio_task_without_portal_has_none(how: str, outer_way: str) -> None:
    """A nested task that never asked for a portal has none (has_portal() is
    False, await_() gives the clear error) while the outer task's portal keeps
    working before, after and around the nested loop."""
    lines = run_nest_asyncio(
        """
        async def no_portal():
            await asyncio.sleep(0)
            show("nested has_portal", greenback.has_portal(), greenback.has_portal(asyncio.current_task()))
            show("nested await_", attempt("ran"))
            await asyncio.sleep(0.001)
            return "nested done"

        def outer_sync():
            outer_task = asyncio.current_task()
            show("outer before", await_nap("ok"))
            show("nested result", run_nested(no_portal()))
            show("outer after", await_nap("ok"), greenback.has_portal(), asyncio.current_task() is outer_task)
            return "outer done"

        async def main():
            show(await with_portal(OUTER_WAY, outer_sync))
            await asyncio.sleep(0)

        asyncio.run(main())
        """,
        how,
        OUTER_WAY=outer_way,
    )
    assert lines == [
        "outer before ok",
        "nested has_portal False False",
        "nested await_ no portal",
        "nested result nested done",
        "outer after ok True True",
        "outer done",
    ]


def test_nest_asyncio_reproduction() -> None:
    """The reported program: a task started before run_until_complete() and
    run by it, with no portal, in a task that has one."""
    lines = run_nest_asyncio(
        """
        async def no_portal_task():
            await asyncio.sleep(0)
            show(greenback.has_portal())
            show(attempt("ran"))

        async def main():
            await greenback.ensure_portal()
            asyncio.create_task(no_portal_task())
            asyncio.get_event_loop().run_until_complete(asyncio.sleep(0.01))
            show(await_nap("outer ok"))

        asyncio.run(main())
        """
    )
    assert lines == ["False", "no portal", "outer ok"]


@pytest.mark.parametrize("way", PORTAL_WAYS)
@pytest.mark.parametrize("how", NEST_WAYS)
def test_nest_asyncio_task_gets_its_own_portal(how: str, way: str) -> None:
    """A nested task that gets a portal (in each of the four ways) can
    await_() in it, through sleeps that really suspend, and the outer task's
    portal works after the nested loop returns."""
    lines = run_nest_asyncio(
        """
        def nested_sync():
            show("nested has_portal", greenback.has_portal(), greenback.has_portal(asyncio.current_task()))
            return [await_nap(str(i)) for i in range(3)]

        async def nested():
            show("nested before", greenback.has_portal())
            got = await with_portal(WAY, nested_sync)
            await asyncio.sleep(0.001)
            return got

        async def main():
            await greenback.ensure_portal()
            show("nested result", run_nested(nested()))
            show("outer after", await_nap("ok"))

        asyncio.run(main())
        """,
        how,
        WAY=way,
    )
    assert lines == [
        "nested before False",
        "nested has_portal True True",
        "nested result ['0', '1', '2']",
        "outer after ok",
    ]


@pytest.mark.parametrize("how", NEST_WAYS)
def test_nest_asyncio_one_shot_portals_end_with_their_call(how: str) -> None:
    """with_portal_run_sync() and with_portal_run() in a nested task give that
    task a portal for the call only: before and after it, the task has none."""
    lines = run_nest_asyncio(
        """
        def nested_sync(tag):
            return f"{tag} {greenback.has_portal()} {await_nap('ok')}"

        async def nested_async(tag):
            await asyncio.sleep(0)
            return nested_sync(tag)

        async def nested():
            show("before", greenback.has_portal(), attempt("ran"))
            show(await greenback.with_portal_run_sync(nested_sync, "sync"))
            show("between", greenback.has_portal(), attempt("ran"))
            show(await greenback.with_portal_run(nested_async, "async"))
            show("after", greenback.has_portal(), attempt("ran"))

        def outer_sync():
            run_nested(nested())
            return await_nap("outer ok")

        async def main():
            show(await greenback.with_portal_run_sync(outer_sync))

        asyncio.run(main())
        """,
        how,
    )
    assert lines == [
        "before False no portal",
        "sync True ok",
        "between False no portal",
        "async True ok",
        "after False no portal",
        "outer ok",
    ]


def test_nest_asyncio_portal_bestowed_before_the_nested_loop_runs() -> None:
    """bestow_portal() on a task made by the outer task, before the nested
    loop starts it, gives that task (and only it) a portal."""
    lines = run_nest_asyncio(
        """
        async def nested(tag):
            show(tag, greenback.has_portal(), attempt("ran") if tag == "plain" else await_nap("ok"))

        def outer_sync():
            with_portal = asyncio.create_task(nested("bestowed"))
            plain = asyncio.create_task(nested("plain"))
            greenback.bestow_portal(with_portal)
            show("has_portal(task)", greenback.has_portal(with_portal), greenback.has_portal(plain))
            asyncio.get_event_loop().run_until_complete(asyncio.wait([with_portal, plain]))
            return await_nap("outer ok")

        async def main():
            await greenback.ensure_portal()
            show(outer_sync())

        asyncio.run(main())
        """
    )
    assert lines[:1] + sorted(lines[1:3]) + lines[3:] == [
        "has_portal(task) True False",
        "bestowed True ok",
        "plain False no portal",
        "outer ok",
    ]


@pytest.mark.parametrize("how", NEST_WAYS)
def test_nest_asyncio_contextvars_stay_with_their_task(how: str) -> None:
    """await_() in a nested task runs in that task's context, and the outer
    task's await_() in the outer task's, on either side of the nested loop."""
    lines = run_nest_asyncio(
        """
        async def read():
            await asyncio.sleep(0.001)
            return var.get()

        async def nested():
            inherited = var.get()
            var.set("nested")
            await greenback.ensure_portal()
            seen = greenback.await_(read())
            var.set("nested sync")
            return inherited, seen, greenback.await_(read())

        def outer_sync():
            var.set("outer sync")
            show("outer before", greenback.await_(read()))
            show("nested", run_nested(nested()))
            show("outer after", greenback.await_(read()), var.get())

        async def main():
            var.set("outer")
            await greenback.ensure_portal()
            outer_sync()
            show("main", var.get(), greenback.await_(read()))

        asyncio.run(main())
        """,
        how,
    )
    assert lines == [
        "outer before outer sync",
        "nested ('outer sync', 'nested', 'nested sync')",
        "outer after outer sync outer sync",
        "main outer sync outer sync",
    ]


@pytest.mark.parametrize("nested_portal", [False, True], ids=["plain-nested-task", "nested-task-with-portal"])
@pytest.mark.parametrize("how", NEST_WAYS)
def test_nest_asyncio_same_task_escapes_keep_the_portal(how: str, nested_portal: bool) -> None:
    """In a task's sync code, before and after a nested loop (and in a nested
    task with a portal of its own), await_() still works inside
    contextvars.Context.run() (where has_portal() is True) and inside a
    greenlet that the sync code starts."""
    lines = run_nest_asyncio(
        """
        async def read():
            await asyncio.sleep(0.001)
            return var.get()

        def escapes(tag):
            ctx = contextvars.copy_context()
            ctx.run(var.set, "ctx")
            in_ctx = ctx.run(greenback.await_, read())
            show(tag, "ctx.run", ctx.run(greenback.has_portal), in_ctx)
            child = greenlet.greenlet(lambda: (greenback.has_portal(), var.get(), greenback.await_(read())))
            has, own, seen = child.switch()
            show(tag, "greenlet", has, own == seen, child.dead)

        async def nested():
            if NESTED_PORTAL:
                await greenback.ensure_portal()
                escapes("nested")
            await asyncio.sleep(0.001)
            return "nested done"

        def outer_sync():
            escapes("before")
            show(run_nested(nested()))
            escapes("after")

        async def main():
            var.set("outer")
            await greenback.ensure_portal()
            outer_sync()

        asyncio.run(main())
        """,
        how,
        NESTED_PORTAL=nested_portal,
    )
    in_nested = ["nested ctx.run True ctx", "nested greenlet True True True"] if nested_portal else []
    assert lines == [
        "before ctx.run True ctx",
        "before greenlet True True True",
        *in_nested,
        "nested done",
        "after ctx.run True ctx",
        "after greenlet True True True",
    ]


@pytest.mark.parametrize("how", NEST_WAYS)
def test_nest_asyncio_loop_run_from_a_same_task_escape(how: str) -> None:
    """A nested loop run from inside contextvars.Context.run() or a greenlet
    that the outer task's sync code started: its tasks have only the portals
    they get themselves, and await_() in the escape works afterwards."""
    lines = run_nest_asyncio(
        """
        async def no_portal():
            await asyncio.sleep(0)
            return greenback.has_portal(), attempt("ran")

        async def own_portal():
            await greenback.ensure_portal()
            return greenback.has_portal(), await_nap("own")

        def escape(tag):
            nested = run_nested(no_portal()), run_nested(own_portal())
            return tag, nested, greenback.has_portal(), await_nap("ok")

        def outer_sync():
            show(contextvars.copy_context().run(escape, "ctx.run"))
            show(greenlet.greenlet(escape).switch("greenlet"))
            show("outer", greenback.has_portal(), await_nap("ok"))

        async def main():
            await greenback.ensure_portal()
            outer_sync()

        asyncio.run(main())
        """,
        how,
    )
    assert lines == [
        "('ctx.run', ((False, 'no portal'), (True, 'own')), True, 'ok')",
        "('greenlet', ((False, 'no portal'), (True, 'own')), True, 'ok')",
        "outer True ok",
    ]


def test_nest_asyncio_task_outlives_the_nested_run() -> None:
    """A task started by a nested run_until_complete() that is still
    suspended in await_() when that run returns finishes later on the outer
    run, with its own portal; the outer task's await_() works meanwhile."""
    # greenback 1.3.0 fails this one: the outer task's await_() there gets
    # the suspended task's switch ("'tuple' object has no attribute 'send'").
    lines = run_nest_asyncio(
        """
        async def with_portal_task(entered, gate):
            await greenback.ensure_portal()
            entered.set()
            opened = greenback.await_(gate.wait())  # suspended across the nested run's end
            return greenback.has_portal(), opened, await_nap("ok")

        async def no_portal_task(entered, gate):
            entered.set()
            await gate.wait()
            return greenback.has_portal(), attempt("ran")

        async def main():
            await greenback.ensure_portal()
            entered = [asyncio.Event(), asyncio.Event()]
            gate = asyncio.Event()
            tasks = [
                asyncio.create_task(with_portal_task(entered[0], gate)),
                asyncio.create_task(no_portal_task(entered[1], gate)),
            ]
            asyncio.get_event_loop().run_until_complete(asyncio.wait([asyncio.create_task(e.wait()) for e in entered]))
            show("outer", greenback.has_portal(), await_nap("ok"), [t.done() for t in tasks])
            gate.set()
            show("tasks", greenback.await_(asyncio.gather(*tasks)))
            show("outer", greenback.has_portal(), await_nap("ok"))

        asyncio.run(main())
        """
    )
    assert lines == [
        "outer True ok [False, False]",
        "tasks [(True, True, 'ok'), (False, 'no portal')]",
        "outer True ok",
    ]


def test_nest_asyncio_loops_nested_twice() -> None:
    """Three levels of tasks, each with its own portal (or none), one loop
    run nested in the next: every level sees only its own."""
    lines = run_nest_asyncio(
        """
        def run(coro):
            return asyncio.get_event_loop().run_until_complete(coro)

        async def innermost(with_portal):
            if with_portal:
                await greenback.ensure_portal()
                return greenback.has_portal(), await_nap("innermost ok")
            return greenback.has_portal(), attempt("ran")

        async def middle():
            await greenback.ensure_portal()
            before = await_nap("middle ok")
            inner = run(innermost(True)), run(innermost(False))
            return before, inner, await_nap("middle ok")

        async def main():
            await greenback.ensure_portal()
            show(run(middle()))
            show(greenback.has_portal(), await_nap("outer ok"))

        asyncio.run(main())
        """
    )
    assert lines == [
        "('middle ok', ((True, 'innermost ok'), (False, 'no portal')), 'middle ok')",
        "True outer ok",
    ]


# ---------------------------------------------------------------------------
# trio.run() inside an asyncio task with a portal
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("outer_way", PORTAL_WAYS)
def test_trio_run_inside_asyncio_portal_task(outer_way: str, caplog: pytest.LogCaptureFixture) -> None:
    """trio.run() from the sync code of an asyncio task with a portal: Trio's
    tasks have no portal until they get one, then their own; the asyncio
    task's portal works before and after."""
    seen: list[object] = []

    async def child(get_portal: bool) -> None:
        if get_portal:
            await greenback.ensure_portal()
            seen.append(("child", greenback.has_portal(), greenback.await_(trio_nap("ok"))))
        else:
            seen.append(("child", greenback.has_portal(), attempt(trio_nap("ok"))))

    async def trio_main() -> str:
        task = trio.lowlevel.current_task()
        seen.append(("main", greenback.has_portal(), greenback.has_portal(task)))
        seen.append(("main", attempt(trio_nap("ok"))))
        await greenback.ensure_portal()
        seen.append(("main", greenback.has_portal(), greenback.await_(trio_nap("ok"))))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child, True)
            nursery.start_soon(child, False)
        return greenback.await_(trio_nap("trio done"))

    def outer_sync() -> str:
        seen.append(("outer", greenback.await_(asyncio_nap("before"))))
        result = trio.run(trio_main)
        seen.append(("outer", greenback.has_portal(), greenback.await_(asyncio_nap("after"))))
        return result

    async def main() -> str:
        result = await with_portal(outer_way, outer_sync, "asyncio")
        await asyncio.sleep(0)
        return result

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        assert asyncio.run(main()) == "trio done"
    assert sorted(map(repr, seen[4:6])) == ["('child', False, 'no portal')", "('child', True, 'ok')"]
    assert seen[:4] + seen[6:] == [
        ("outer", "before"),
        ("main", False, False),
        ("main", "no portal"),
        ("main", True, "ok"),
        ("outer", True, "after"),
    ]
    assert_asyncio_logged_nothing(caplog)


@pytest.mark.parametrize("way", PORTAL_WAYS)
def test_trio_tasks_inside_asyncio_portal_task_get_portals_every_way(way: str) -> None:
    """Each way of getting a portal works for a Trio task run inside an
    asyncio task's portal; the one-shot ways end with their call."""

    def trio_sync() -> tuple[bool, str]:
        return greenback.has_portal(), greenback.await_(trio_nap("ok"))

    async def trio_main() -> tuple[object, ...]:
        during = await with_portal(way, trio_sync, "trio")
        return during, (greenback.has_portal(), attempt(trio_nap("ok")))

    async def main() -> tuple[object, ...]:
        await greenback.ensure_portal()
        result = trio.run(trio_main)
        return result, greenback.await_(asyncio_nap("outer ok"))

    # ensure_portal and bestow_portal last for the rest of the task; the
    # with_portal_run* portals end with their call.
    after = (True, "ok") if way in ("ensure_portal", "bestow_portal") else (False, "no portal")
    assert asyncio.run(main()) == (((True, "ok"), after), "outer ok")


def test_trio_run_inside_asyncio_portal_task_contextvars() -> None:
    """await_() in the Trio task runs in the Trio task's context, the
    asyncio task's await_() in the asyncio task's."""

    async def read_trio() -> str:
        await trio.sleep(0.001)
        return var.get()

    async def read_asyncio() -> str:
        await asyncio.sleep(0.001)
        return var.get()

    async def trio_main() -> tuple[str, str]:
        inherited = var.get()
        var.set("trio")
        await greenback.ensure_portal()
        return inherited, greenback.await_(read_trio())

    def outer_sync() -> tuple[object, ...]:
        before = greenback.await_(read_asyncio())
        nested = trio.run(trio_main)
        return before, nested, greenback.await_(read_asyncio()), var.get()

    async def main() -> tuple[object, ...]:
        var.set("asyncio")
        await greenback.ensure_portal()
        return outer_sync()

    assert asyncio.run(main()) == ("asyncio", ("asyncio", "trio"), "asyncio", "asyncio")


# ---------------------------------------------------------------------------
# asyncio inside a Trio task with a portal
# ---------------------------------------------------------------------------


def run_asyncio_loop(how: str, coro: Coroutine[Any, Any, T]) -> T:
    if how == "asyncio.run":
        return asyncio.run(coro)
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


ASYNCIO_LOOPS = ["asyncio.run", "new_event_loop"]

# Trio sets sniffio's thread-local library name for the whole of trio.run(),
# so in an asyncio loop run from a Trio task sniffio still says "trio":
# greenback has to notice the running asyncio task itself. (greenback 1.3.0
# does not: there it sends the asyncio task's yields to the Trio task.)


@pytest.mark.parametrize("how", ASYNCIO_LOOPS)
def test_asyncio_loop_inside_trio_portal_task_has_no_portal_of_its_own(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncio.run() (or a new loop's run_until_complete()) from the sync code
    of a Trio task with a portal: the asyncio task has no portal, and its
    await_() gives the clear error; the Trio task's portal works after."""

    async def asyncio_main() -> tuple[object, ...]:
        task = asyncio.current_task()
        return greenback.has_portal(), greenback.has_portal(task), attempt(asyncio_nap("ok"))

    def outer_sync() -> tuple[object, ...]:
        before = greenback.await_(trio_nap("before"))
        nested = run_asyncio_loop(how, asyncio_main())
        return before, nested, greenback.has_portal(), greenback.await_(trio_nap("after"))

    async def main() -> tuple[object, ...]:
        await greenback.ensure_portal()
        return outer_sync()

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        assert trio.run(main) == ("before", (False, False, "no portal"), True, "after")
    assert_asyncio_logged_nothing(caplog)


@pytest.mark.parametrize("way", PORTAL_WAYS)
@pytest.mark.parametrize("how", ASYNCIO_LOOPS)
def test_asyncio_loop_inside_trio_portal_task_gets_its_own_portal(
    how: str, way: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An asyncio task run from the sync code of a Trio task with a portal
    gets a working portal of its own (in each of the four ways); the Trio
    task's portal works after."""

    def asyncio_sync() -> tuple[bool, str]:
        return greenback.has_portal(), greenback.await_(asyncio_nap("ok"))

    async def asyncio_main() -> tuple[bool, str]:
        return await with_portal(way, asyncio_sync, "asyncio")

    def outer_sync() -> tuple[object, ...]:
        nested = run_asyncio_loop(how, asyncio_main())
        return nested, greenback.await_(trio_nap("after"))

    async def main() -> tuple[object, ...]:
        await greenback.ensure_portal()
        return outer_sync()

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        assert trio.run(main) == ((True, "ok"), "after")
    assert_asyncio_logged_nothing(caplog)


# ---------------------------------------------------------------------------
# Escapes within the same task keep its portal
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("way", PORTAL_WAYS)
def test_context_run_is_the_same_task(lib: Lib, way: str) -> None:
    """await_() inside contextvars.Context.run() in a portal's sync code is
    still that task's await_(): has_portal() is True there, and the awaited
    coroutine sees the copied context."""

    async def read() -> str:
        await lib.sleep(0.001)
        return var.get()

    def sync_code() -> tuple[object, ...]:
        var.set("task")
        ctx = contextvars.copy_context()
        ctx.run(var.set, "ctx")
        return ctx.run(greenback.has_portal), ctx.run(greenback.await_, read()), greenback.await_(read())

    async def main() -> tuple[object, ...]:
        return await with_portal(way, sync_code, lib.sniffio_name)

    assert lib.run(main) == (True, "ctx", "task")


@pytest.mark.parametrize("way", PORTAL_WAYS)
def test_fresh_greenlet_is_the_same_task(lib: Lib, way: str) -> None:
    """await_() inside a greenlet that a portal's sync code starts is still
    that task's await_(), as is has_portal(); the awaited coroutine runs in
    the calling greenlet's context."""

    async def read() -> str:
        await lib.sleep(0.001)
        return var.get()

    async def nap(value: str) -> str:
        await lib.sleep(0.001)
        return value

    def in_greenlet() -> tuple[object, ...]:
        return greenback.has_portal(), var.get() == greenback.await_(read())

    def sync_code() -> tuple[object, ...]:
        var.set("task")
        child = greenlet.greenlet(in_greenlet)
        first = child.switch()
        direct = greenlet.greenlet(greenback.await_).switch(nap("direct"))
        return first, child.dead, direct, greenback.await_(read())

    async def main() -> tuple[object, ...]:
        return await with_portal(way, sync_code, lib.sniffio_name)

    assert lib.run(main) == ((True, True), True, "direct", "task")


# ---------------------------------------------------------------------------
# The mechanism: a task's steps run in the task's own context
# ---------------------------------------------------------------------------


def test_task_context_is_the_context_each_step_runs_in(any_lib: Lib) -> None:
    """greenback tells a portal's own task from a nested loop's task by the
    context its steps run in; it reads that context from the task (asyncio's
    C Task of Python 3.10/3.11 has no getter for it)."""
    from greenback import _tasks

    async def main() -> None:
        for _ in range(2):  # first step, and a later one
            here = greenlet.getcurrent().gr_context
            task = any_lib.current_task()
            assert _tasks.task_context(task) is here
            assert _tasks.current_task_context() is here
            await any_lib.checkpoint()

    any_lib.run(main)
    assert _tasks.current_task_context() is None  # outside any task


def test_interrupt_during_the_task_lookup_is_not_taken_for_no_portal(
    lib: Lib, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a context other than its step's, await_() looks the running task
    up. A KeyboardInterrupt raised during that lookup (by a signal handler)
    is the program's: it must propagate from await_(), has_portal() and
    ensure_portal(), not be read as "no portal here", and await_() must
    still close the coroutine it was given."""
    import greenback._tasks as tasks

    real_lookup = tasks.current_task_context
    armed = [False]

    def interrupted_lookup() -> contextvars.Context | None:
        if armed[0]:
            raise KeyboardInterrupt
        return real_lookup()

    monkeypatch.setattr(tasks, "current_task_context", interrupted_lookup)
    seen: list[str] = []

    async def child() -> None:
        await lib.checkpoint()

    def in_other_context(call: Callable[[], object], tag: str) -> None:
        armed[0] = True
        try:
            contextvars.copy_context().run(call)
        except KeyboardInterrupt:
            seen.append(tag)
        finally:
            armed[0] = False

    async def main() -> None:
        await greenback.ensure_portal()
        coro = child()
        in_other_context(lambda: greenback.await_(coro), "await_")
        assert inspect.getcoroutinestate(coro) == "CORO_CLOSED"  # not left to warn
        in_other_context(greenback.has_portal, "has_portal")
        # Unarmed, the same escape works, and the portal still serves the task.
        assert contextvars.copy_context().run(greenback.await_, child()) is None
        assert greenback.await_(child()) is None

    lib.run(main)
    assert seen == ["await_", "has_portal"]
