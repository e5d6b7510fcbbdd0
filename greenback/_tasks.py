"""Access to the tasks of the supported event loops: which task is running,
which coroutine a task runs, and how to swap it. Everything that differs
between asyncio and Trio lives here, except ensure_portal()'s own fast path
(in _core, and in its twin _purepy)."""

from __future__ import annotations

import asyncio
import inspect
import types
from typing import TYPE_CHECKING, Any, Awaitable, Coroutine, Generator, TypeAlias

import sniffio

from ._select import impl


def _c_task_types() -> tuple[type, ...]:
    try:
        from _asyncio import Task
    except ImportError:  # pragma: no cover - only CPython has the C Task
        return ()
    return (Task,)


_C_TASK_TYPES = _c_task_types()
_ASYNCIO_TASK_TYPES = _C_TASK_TYPES + (asyncio.Task,)

if TYPE_CHECKING:
    import trio

    _AnyTask: TypeAlias = "asyncio.Task[Any] | trio.lowlevel.Task"


def current_library() -> str:
    """The running async library, if greenback supports it."""
    library = sniffio.current_async_library()
    if library not in ("asyncio", "trio"):
        raise RuntimeError(
            f"greenback does not support {library}: it works under asyncio "
            "(including uvloop) and Trio, directly or through anyio"
        )
    return library


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


def _is_trio_task(task: object) -> bool:
    # Not isinstance(): that would import Trio into asyncio programs.
    return not isinstance(task, _ASYNCIO_TASK_TYPES) and type(task).__module__.startswith("trio")


def get_coro(task: _AnyTask) -> Coroutine[Any, Any, Any]:
    if _is_trio_task(task):
        return task.coro  # type: ignore[union-attr]
    return task.get_coro()  # type: ignore[union-attr,return-value]


def set_coro(
    task: _AnyTask, old: Coroutine[Any, Any, Any], new: Coroutine[Any, Any, Any]
) -> None:
    if _is_trio_task(task):
        task.coro = new  # type: ignore[union-attr]
        # A task that is already scheduled has its next send bound to the old
        # coroutine; rebind it so the portal takes over at that very step.
        pending = getattr(task, "_next_send_fn", None)
        if getattr(pending, "__self__", None) is old:
            task._next_send_fn = getattr(new, pending.__name__)  # type: ignore[union-attr]
        return
    if isinstance(task, _C_TASK_TYPES):
        # The C Task offers no way to assign it: swap the field from C.
        impl.set_c_task_coro(task, old, new)
    else:
        # The pure-Python asyncio.Task lets us assign it.
        setattr(task, "_coro", new)


def check_task(task: object) -> None:
    """Reject what is not a live task of a supported library, or a task of
    another event loop than the running one, naming the fix."""
    if isinstance(task, asyncio.Task):
        if task.done():
            raise RuntimeError(f"cannot give a portal to {task!r}: it has already finished")
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
    if _is_trio_task(task):
        import trio

        if isinstance(task, trio.lowlevel.Task):
            coro: object = task.coro
            if inspect.iscoroutine(coro) and coro.cr_frame is None:
                raise RuntimeError(f"cannot give a portal to {task!r}: it has already finished")
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


def portal_in_await_chain(coro: object) -> bool:
    """Whether a suspended task's chain of awaits passes through a portal
    that gives the task await_() (a with_portal_run* call in progress)."""
    seen = 0
    while coro is not None and seen < 10_000:
        seen += 1
        if isinstance(coro, impl.Portal):
            if coro.provides_portal:
                return True
        if hasattr(coro, "cr_await"):
            coro = coro.cr_await
        elif hasattr(coro, "gi_yieldfrom"):
            coro = coro.gi_yieldfrom
        else:
            return False
    return False


def explain_missing_portal() -> BaseException:
    """The error for an await_() that found no active portal."""
    library = current_library()  # raises outside async context
    task = current_task()
    coro = get_coro(task)
    if isinstance(coro, impl.Portal) and coro.provides_portal:
        return RuntimeError(
            "This task was given a greenback portal during its current step, "
            "and the portal only starts working once the task "
            f"must yield to the event loop: run 'await {library}.sleep(0)' "
            "before calling greenback.await_(), or use 'await "
            "greenback.ensure_portal()', which does that for you."
        )
    return RuntimeError(
        "greenback.await_() needs a portal in the current task, and there is "
        "none. To create a greenback portal, call 'await "
        "greenback.ensure_portal()' once in this task, or run the sync code "
        "through 'await greenback.with_portal_run_sync(fn, *args)' "
        "(or 'await greenback.with_portal_run(async_fn, *args)')."
    )
