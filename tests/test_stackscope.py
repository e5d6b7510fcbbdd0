"""stackscope (by greenback's author) sees through portals: the frames of a
task suspended in await_(), sync code and awaited coroutine alike, with
greenback's own frames hidden; and it imports cleanly in either order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable, Coroutine

import greenlet
import pytest
import trio

import greenback

from conftest import Lib

# stackscope 0.2.2's own builtin glue, which runs as it is imported, leaves
# two async generator methods unawaited; Python 3.13 warns about them. This
# has nothing to do with greenback (`python -W error -c "import stackscope"`
# shows it), so those two warnings, and only they, are let through.
STACKSCOPE_OWN_WARNINGS = [
    f"coroutine method '{method}' of 'glue_builtins.<locals>.some_asyncgen' was never awaited"
    for method in ("asend", "athrow")
]
with warnings.catch_warnings():
    for message in STACKSCOPE_OWN_WARNINGS:
        warnings.filterwarnings("ignore", re.escape(message), RuntimeWarning)
    import stackscope

GREENBACK_DIR = str(Path(greenback.__file__).resolve().parent)

# What stackscope shows below `await trio.sleep(...)` / `asyncio.sleep(...)`:
# Trio's sleep calls down to wait_task_rescheduled, which stackscope's Trio
# glue hides.
SLEEP_FRAMES = {
    "trio": ["sleep", "sleep_until", "sleep_forever"],
    "asyncio": ["sleep"],
}


def visible(stack: stackscope.Stack) -> list[str]:
    """The function names that stackscope shows, outermost first."""
    assert stack.error is None, stack.error
    return [frame.funcname for frame in stack.frames if not frame.hide]


def greenback_frames(stack: stackscope.Stack) -> list[tuple[str, bool]]:
    """greenback's own frames in the stack, with whether each is hidden."""
    return [
        (frame.funcname, frame.hide)
        for frame in stack.frames
        if str(Path(frame.filename).resolve()).startswith(GREENBACK_DIR)
    ]


class Scenario:
    """A task whose stack is extracted by another task while it is
    suspended in `inner`, which sleeps; the names of these methods are the
    frame names that the tests expect."""

    def __init__(self, lib: Lib) -> None:
        self.lib = lib
        self.ready: trio.Event | asyncio.Event
        if lib.sniffio_name == "trio":
            self.ready = trio.Event()
        else:
            self.ready = asyncio.Event()
        self.seen_from_inside: list[stackscope.Stack] = []

    async def inner(self) -> None:
        self.ready.set()  # the extractor runs once this task is suspended
        # The library's own sleep (not Lib.sleep, which adds a frame).
        if self.lib.sniffio_name == "trio":
            await trio.sleep(3600)
        else:
            await asyncio.sleep(3600)

    def sync_deep(self) -> None:
        greenback.await_(self.inner())

    def sync_mid(self) -> None:
        self.sync_deep()

    async def async_mid(self) -> None:
        self.sync_deep()

    async def extract_self_then_sleep(self) -> None:
        task = self.lib.current_task()
        self.seen_from_inside.append(stackscope.extract(task))
        self.seen_from_inside.append(stackscope.extract(stackscope.StackSlice()))
        await self.inner()

    def sync_extracting(self) -> None:
        greenback.await_(self.extract_self_then_sleep())


def task_coro(task: Any) -> Any:
    if isinstance(task, asyncio.Task):
        return task.get_coro()
    return task.coro


async def extract_suspended(
    lib: Lib,
    scenario: Scenario,
    body: Callable[[], Coroutine[Any, Any, None]],
    what: Callable[[Any], object] = lambda task: task,
) -> stackscope.Stack:
    """Run *body* as a task; once it is asleep in `inner`, extract the stack
    of `what(task)` (the task itself by default) from this other task, then
    cancel it."""
    if lib.sniffio_name == "trio":
        async with trio.open_nursery() as nursery:
            nursery.start_soon(body)
            (trio_task,) = nursery.child_tasks
            await scenario.ready.wait()
            stack = stackscope.extract(what(trio_task))
            nursery.cancel_scope.cancel()
        return stack

    task = asyncio.create_task(body())
    await scenario.ready.wait()
    stack = stackscope.extract(what(task))
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return stack


def run_scenario(
    lib: Lib,
    body: Callable[[Scenario], Coroutine[Any, Any, None]],
    what: Callable[[Any], object] = lambda task: task,
) -> stackscope.Stack:
    async def main() -> stackscope.Stack:
        scenario = Scenario(lib)
        return await extract_suspended(lib, scenario, lambda: body(scenario), what)

    return lib.run(main)


def test_suspended_in_await(lib: Lib) -> None:
    async def task_body(scenario: Scenario) -> None:
        await greenback.ensure_portal()
        scenario.sync_mid()

    stack = run_scenario(lib, task_body)
    assert visible(stack) == [
        "task_body", "sync_mid", "sync_deep", "inner", *SLEEP_FRAMES[lib.sniffio_name]
    ]
    # Only the await_() frame of greenback's is there at all, and hidden: the
    # worker greenlet's bottom frames are left out.
    assert greenback_frames(stack) == [("await_", True)]


def test_suspended_at_native_await(lib: Lib) -> None:
    async def task_body(scenario: Scenario) -> None:
        await greenback.ensure_portal()
        await scenario.inner()

    stack = run_scenario(lib, task_body)
    assert visible(stack) == ["task_body", "inner", *SLEEP_FRAMES[lib.sniffio_name]]
    assert greenback_frames(stack) == []


def test_same_frames_as_without_a_portal(lib: Lib) -> None:
    async def task_body(scenario: Scenario) -> None:
        await scenario.inner()

    stack = run_scenario(lib, task_body)
    assert visible(stack) == ["task_body", "inner", *SLEEP_FRAMES[lib.sniffio_name]]


def test_with_portal_run_sync_suspended_in_await(lib: Lib) -> None:
    async def task_body(scenario: Scenario) -> None:
        await greenback.with_portal_run_sync(scenario.sync_mid)

    stack = run_scenario(lib, task_body)
    assert visible(stack) == [
        "task_body", "sync_mid", "sync_deep", "inner", *SLEEP_FRAMES[lib.sniffio_name]
    ]
    assert greenback_frames(stack) == [("with_portal_run_sync", True), ("await_", True)]


def test_with_portal_run_suspended_in_await(lib: Lib) -> None:
    async def task_body(scenario: Scenario) -> None:
        await greenback.with_portal_run(scenario.async_mid)

    stack = run_scenario(lib, task_body)
    assert visible(stack) == [
        "task_body", "async_mid", "sync_deep", "inner", *SLEEP_FRAMES[lib.sniffio_name]
    ]
    assert greenback_frames(stack) == [("with_portal_run", True), ("await_", True)]


def test_with_portal_run_suspended_at_native_await(lib: Lib) -> None:
    async def task_body(scenario: Scenario) -> None:
        await greenback.with_portal_run(scenario.inner)

    stack = run_scenario(lib, task_body)
    assert visible(stack) == ["task_body", "inner", *SLEEP_FRAMES[lib.sniffio_name]]
    assert greenback_frames(stack) == [("with_portal_run", True)]


def test_await_in_a_child_greenlet(lib: Lib) -> None:
    # The sync code runs in a greenlet of the user's own, started inside the
    # portal's worker: its frames continue in the worker's.
    async def task_body(scenario: Scenario) -> None:
        await greenback.ensure_portal()

        def in_child() -> None:
            scenario.sync_mid()

        greenlet.greenlet(in_child).switch()

    stack = run_scenario(lib, task_body)
    assert visible(stack) == [
        "task_body", "in_child", "sync_mid", "sync_deep", "inner",
        *SLEEP_FRAMES[lib.sniffio_name],
    ]


def test_worker_greenlet_extracted_on_its_own(lib: Lib) -> None:
    # Where the stack ends at the suspended await_(), it goes on into what
    # await_() awaits.
    async def task_body(scenario: Scenario) -> None:
        await greenback.ensure_portal()
        scenario.sync_mid()

    stack = run_scenario(lib, task_body, lambda task: task_coro(task).await_greenlet)
    assert visible(stack) == [
        "task_body", "sync_mid", "sync_deep", "inner", *SLEEP_FRAMES[lib.sniffio_name]
    ]
    assert [name for name, _ in greenback_frames(stack)][-1] == "await_"
    assert all(hidden for _, hidden in greenback_frames(stack))


def test_async_context_shows_the_manager_it_enters(lib: Lib) -> None:
    @contextlib.asynccontextmanager
    async def resource() -> Any:
        yield "the resource"

    async def task_body(scenario: Scenario) -> None:
        await greenback.ensure_portal()
        with greenback.async_context(resource()):
            scenario.sync_mid()

    stack = run_scenario(lib, task_body)
    assert visible(stack) == [
        "task_body", "sync_mid", "sync_deep", "inner", *SLEEP_FRAMES[lib.sniffio_name]
    ]
    (body_frame,) = [frame for frame in stack.frames if frame.funcname == "task_body"]
    assert [type(context.obj).__name__ for context in body_frame.contexts] == [
        "_AsyncGeneratorContextManager"
    ]


def test_extracted_from_inside_the_task(lib: Lib) -> None:
    async def task_body(scenario: Scenario) -> None:
        await greenback.ensure_portal()
        scenario.sync_extracting()

    async def main() -> list[stackscope.Stack]:
        scenario = Scenario(lib)
        await extract_suspended(lib, scenario, lambda: task_body(scenario))
        return scenario.seen_from_inside

    own_task, whole_stack = lib.run(main)
    assert visible(own_task) == ["task_body", "sync_extracting", "extract_self_then_sleep"]
    # The running stack, across the worker greenlet and the event loop's:
    # greenback's frames there are hidden.
    assert visible(whole_stack)[-3:] == [
        "task_body", "sync_extracting", "extract_self_then_sleep"
    ]
    assert all(hidden for _, hidden in greenback_frames(whole_stack))
    assert greenback_frames(whole_stack)


def test_trio_iter_await_frames_reach_the_awaited_coroutine() -> None:
    # Trio's own task introspection follows cr_await: from the task's
    # coroutine, through the portal, to what await_() awaits.
    lib = Lib("trio", "trio")
    frames: list[str] = []

    async def task_body(scenario: Scenario) -> None:
        await greenback.ensure_portal()
        scenario.sync_mid()

    async def main() -> None:
        scenario = Scenario(lib)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(task_body, scenario)
            (task,) = nursery.child_tasks
            await scenario.ready.wait()
            frames.extend(frame.f_code.co_name for frame, _ in task.iter_await_frames())
            nursery.cancel_scope.cancel()

    trio.run(main)
    # Below trio.sleep are Trio's own lowest-level frames, which vary.
    assert frames[:5] == ["task_body", "inner", "sleep", "sleep_until", "sleep_forever"]


# --- import order ------------------------------------------------------------------

SCRIPT = """
import json
{imports}
import stackscope._glue
# Whether stackscope's builtin greenback glue is still waiting for its first
# extraction (it ran at import if greenback came first).
builtin_pending = "greenback" in stackscope._glue.builtin_glue_pending
import trio

async def inner(ready):
    ready.set()
    await trio.sleep(3600)

def sync_deep(ready):
    greenback.await_(inner(ready))

def sync_mid(ready):
    sync_deep(ready)

async def task_body(ready):
    await greenback.ensure_portal()
    sync_mid(ready)

async def main():
    ready = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(task_body, ready)
        await ready.wait()
        (task,) = nursery.child_tasks
        stack = stackscope.extract(task)
        nursery.cancel_scope.cancel()
    return stack

stack = trio.run(main)
print(json.dumps({{
    "implementation": greenback.__implementation__,
    "builtin_pending": builtin_pending,
    "error": repr(stack.error),
    "frames": [frame.funcname for frame in stack.frames if not frame.hide],
}}))
"""


@pytest.mark.parametrize(
    "greenback_first", [True, False], ids=["greenback-first", "stackscope-first"]
)
def test_import_order(greenback_first: bool) -> None:
    imports = ["import greenback", "import stackscope"]
    if not greenback_first:
        imports.reverse()
    script = textwrap.dedent(SCRIPT).format(imports="\n".join(imports))
    ignore_stackscope_own = [
        f"-Wignore:{message}:RuntimeWarning" for message in STACKSCOPE_OWN_WARNINGS
    ]
    proc = subprocess.run(
        [sys.executable, "-W", "error", *ignore_stackscope_own, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    result = json.loads(proc.stdout)
    assert result == {
        "implementation": greenback.__implementation__,
        # greenback first: stackscope's builtin glue has run, and ours
        # overrides it. stackscope first: only ours runs.
        "builtin_pending": not greenback_first,
        "error": "None",
        "frames": [
            "task_body", "sync_mid", "sync_deep", "inner", "sleep", "sleep_until", "sleep_forever"
        ],
    }
