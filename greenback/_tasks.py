"""Access to the tasks of the supported event loops: which task is running,
which coroutine and context a task runs. Most of what differs between asyncio
and Trio lives here (ensure_portal()'s fast path is in _core and its twin
_purepy, and swapping a task's coroutine in _portal).

This module knows nothing of portals: the compiled core and its twin both
import it, so it must not import either of them."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import inspect
import sys
import types
from typing import TYPE_CHECKING, Any, Awaitable, Coroutine, Generator, TypeAlias

import greenlet
import sniffio

from ._errors import no_portal_error


def _c_task_types() -> tuple[type, ...]:
    try:
        from _asyncio import Task
    except ImportError:  # pragma: no cover - only CPython has the C Task
        return ()
    return (Task,)


C_TASK_TYPES = _c_task_types()
_ASYNCIO_TASK_TYPES = C_TASK_TYPES + (asyncio.Task,)

if TYPE_CHECKING:
    import trio

    _AnyTask: TypeAlias = "asyncio.Task[Any] | trio.lowlevel.Task"


def current_library() -> str:
    """The running async library, if greenback supports it."""
    library = sniffio.current_async_library()
    if library == "trio" and _asyncio_step_runs_here():
        # An asyncio loop runs inside a Trio task. sniffio says "trio" for the
        # whole thread while trio.run() is active, but the code running here
        # is a step of an asyncio task.
        library = "asyncio"
    if library not in ("asyncio", "trio"):
        raise RuntimeError(
            f"greenback does not support {library}: it works under asyncio "
            "(including uvloop) and Trio, directly or through anyio"
        )
    return library


def _asyncio_step_runs_here() -> bool:
    if asyncio._get_running_loop() is None:
        return False
    task = asyncio.current_task()
    if task is None:
        return False
    try:
        return task_context(task) is greenlet.getcurrent().gr_context
    except LookupError:
        return False


def current_task() -> _AnyTask:
    return current_task_of(current_library())


def current_task_of(library: str) -> _AnyTask:
    if library == "trio":
        import trio

        return trio.lowlevel.current_task()
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError(
            "greenback needs a running asyncio task, but this code runs in a "
            "callback outside of any task; start the code in a task instead"
        )
    return task


def checkpoint(library: str) -> Awaitable[None]:
    """A schedule point and a cancellation point, on either library: what
    `trio.sleep(0)` and `asyncio.sleep(0)` do, minus their wrapper frames."""
    if library == "trio":
        import trio

        return trio.lowlevel.checkpoint()
    return _asyncio_checkpoint()


@types.coroutine
def _asyncio_checkpoint() -> Generator[None, None, None]:
    # A bare yield makes an asyncio task reschedule itself; a pending
    # cancellation is delivered here, as at asyncio.sleep(0).
    yield


def is_trio_task(task: object) -> bool:
    # Not isinstance(): that would import Trio into asyncio programs.
    return not isinstance(task, _ASYNCIO_TASK_TYPES) and type(task).__module__.startswith("trio")


def get_coro(task: _AnyTask) -> Coroutine[Any, Any, Any]:
    if is_trio_task(task):
        return task.coro  # type: ignore[union-attr]
    return task.get_coro()  # type: ignore[union-attr,return-value]


def check_task(task: object) -> None:
    """Reject what is not a live task of a supported library, or a task of
    another event loop than the running one, naming the fix."""
    if isinstance(task, asyncio.Task):
        if task.done():
            raise RuntimeError(_finished_task_message(task))
        loop = task.get_loop()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop and loop.is_running():
            raise RuntimeError(
                f"cannot give a portal to {task!r} from here: its event loop is "
                "running elsewhere (another thread, or this code runs on another "
                "loop). Call bestow_portal() on the task's own loop, for example "
                "with loop.call_soon_threadsafe(greenback.bestow_portal, task)."
            )
        return
    if is_trio_task(task):
        import trio

        if isinstance(task, trio.lowlevel.Task):
            coro: object = task.coro
            if inspect.iscoroutine(coro) and coro.cr_frame is None:
                raise RuntimeError(_finished_task_message(task))
            try:
                here: trio.lowlevel.Task | None = trio.lowlevel.current_root_task()
            except RuntimeError:
                here = None
            if here is not _trio_root(task):
                raise RuntimeError(
                    f"cannot give a portal to {task!r} from here: it belongs to "
                    "another Trio run. Call bestow_portal() from within that run, "
                    "for example with trio.from_thread.run_sync(greenback.bestow_portal, "
                    "task, trio_token=...)."
                )
            return
    raise TypeError(
        "greenback.bestow_portal() takes an asyncio.Task or a "
        f"trio.lowlevel.Task, not {type(task).__name__}"
    )


def _finished_task_message(task: object) -> str:
    return (
        f"cannot give a portal to {task!r}: it has already finished and will run "
        "no more code, so a portal would never be used. Skip finished tasks "
        "(check task.done() on asyncio) before calling bestow_portal()."
    )


def _trio_root(task: trio.lowlevel.Task) -> trio.lowlevel.Task:
    while task.parent_nursery is not None:
        task = task.parent_nursery.parent_task
    return task


def coro_has_started(coro: object) -> bool:
    if inspect.iscoroutine(coro):
        return inspect.getcoroutinestate(coro) != inspect.CORO_CREATED
    if inspect.isgenerator(coro):
        return inspect.getgeneratorstate(coro) != inspect.GEN_CREATED
    return True


def task_context(task: _AnyTask) -> contextvars.Context:
    """The context that *task*'s steps run in. LookupError where it can't
    be told: an asyncio C Task of Python 3.10/3.11 laid out unexpectedly."""
    if is_trio_task(task):
        return task.context  # type: ignore[union-attr]
    get_context = getattr(task, "get_context", None)  # Python 3.12+
    if get_context is not None:
        return get_context()  # type: ignore[no-any-return]
    context = getattr(task, "_context", None)  # the pure-Python Task
    if isinstance(context, contextvars.Context):
        return context
    # The C Task of 3.10/3.11 has no getter, but its garbage-collector
    # traversal visits the context first and the coroutine second.
    referents = gc.get_referents(task)
    if (
        len(referents) >= 2
        and type(referents[0]) is contextvars.Context
        and referents[1] is task.get_coro()  # type: ignore[union-attr]
    ):
        return referents[0]
    raise LookupError(f"cannot find the context of {task!r} on Python {sys.version}")


def current_task_context() -> contextvars.Context | None:
    """The context of the task that is running, or None outside a task
    (no async library, an unsupported one, or a callback of the loop)."""
    try:
        task = current_task()
    except (RuntimeError, sniffio.AsyncLibraryNotFoundError):
        return None
    return task_context(task)


def no_portal_error_here(portal_type: type[Any]) -> BaseException:
    """The error for an await_() that found no portal for the running task;
    *portal_type* is the active implementation's Portal class."""
    library = current_library()  # raises outside async context
    coro: Any = get_coro(current_task_of(library))
    bestowed_this_step = isinstance(coro, portal_type) and coro.provides_portal
    return no_portal_error(library, bestowed_this_step)
