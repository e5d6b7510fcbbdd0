"""What the compiled core and its pure-Python twin share: the words of their
errors, and how a coroutine's throw() turns its arguments into one exception."""

from __future__ import annotations

import sys
from typing import Any

IN_GC_ERROR = (
    "greenback.await_() was called while the garbage collector is running "
    "finalizers (a __del__ method or a weakref callback). Suspending there "
    "would stall garbage collection until the task resumes, so it is not "
    "allowed: do the async work outside the finalizer, for example by "
    "scheduling it with loop.call_soon() or a nursery."
)

FOREIGN_GREENLET_ERROR = (
    "greenback.await_() was called from a greenlet that the running task's "
    "portal did not start, so the task could not resume it. Call await_() "
    "from the task's own code, or from a greenlet that code starts."
)

ORPHANED_AWAIT_ERROR = (
    "greenback cannot resume this task: its await_() was suspended in a Python "
    "thread state that has since been deleted (a native thread's callback "
    "returned, and the thread's next call into Python got a new thread state). "
    "greenlet cannot switch back into code suspended there, so the task fails "
    "instead. Let the event loop finish what a callback starts before the "
    "callback returns, or run the loop on a thread of its own."
)

# The compiled core's twin of this is in _stack_guard.h.
STACK_EXHAUSTED_ERROR = (
    "greenback: the C stack is nearly exhausted by nested portals (await_() "
    "of code that awaits through another portal, many levels deep); reduce "
    "the nesting depth"
)

TREE_LEFT_ELSEWHERE_ERROR = (
    "greenback.portals_for_tree() was left by a different task from the one "
    "that entered it, and the entering task is still running, so the portal "
    "the block gave that task can't be taken back here. Enter and leave the "
    "block in one task; for a scope that a framework enters and leaves in "
    "different tasks (pytest-asyncio does so with async fixtures), use "
    "'with greenback.portals_for_children():', which gives portals to the "
    "tasks started inside it."
)

TASK_LAYOUT_ERROR = (
    "greenback could not find where this asyncio.Task stores its coroutine, "
    "so it cannot give the task a portal. Use a task created by "
    "asyncio.create_task() or loop.create_task(), or run the code with "
    "'await greenback.with_portal_run(...)' instead."
)


def task_layout_unknown_error(reason: str) -> str:
    """The message for an asyncio C Task whose coroutine field greenback
    could not positively identify; *reason* says which check failed."""
    version = ".".join(map(str, sys.version_info[:3]))
    return (
        f"greenback cannot give this asyncio task a portal on Python {version}: "
        f"{reason}. greenback replaces the coroutine inside asyncio's C Task "
        "only where it recognises the task's memory layout, so it changed "
        "nothing. Upgrade greenback to a release that supports this Python "
        "version. Until then, 'await greenback.with_portal_run_sync(fn, ...)' "
        "and 'await greenback.with_portal_run(async_fn, ...)' still work, as "
        "they need no such change, and so do Trio tasks and pure-Python "
        "asyncio tasks. (GREENBACK_NO_EXTENSIONS=1 does not help: the "
        "pure-Python implementation has to change the same field.)"
    )


def no_portal_error(library: str, bestowed_this_step: bool) -> RuntimeError:
    """The error for an await_() in a task that has no working portal.

    Each message starts with greenback 1.3.0's key phrase, unchanged, since
    programs and tests match on it; the rest says what to do."""
    if bestowed_this_step:
        return RuntimeError(
            "You must yield to the event loop before this task can use the "
            "portal that greenback.bestow_portal() gave it during its current "
            f"step: run 'await {library}.sleep(0)' first, or use 'await "
            "greenback.ensure_portal()', which gives a portal and yields in one go."
        )
    return RuntimeError(
        "You must create a greenback portal for this task before it calls "
        "greenback.await_(): run 'await greenback.ensure_portal()' once in the "
        "task, or call the sync code through 'await "
        "greenback.with_portal_run_sync(fn, *args)' (or 'await "
        "greenback.with_portal_run(async_fn, *args)')."
    )


def exception_from_throw_args(typ: Any, val: Any = None, tb: Any = None) -> BaseException:
    """Turn throw()'s (type[, value[, traceback]]) or (instance) into one
    exception instance, as generators do."""
    if isinstance(typ, BaseException):
        if val is not None:
            raise TypeError("instance exception may not have a separate value")
        exc = typ
    elif isinstance(typ, type) and issubclass(typ, BaseException):
        if isinstance(val, typ):
            exc = val
        elif val is None:
            exc = typ()
        elif isinstance(val, tuple):
            exc = typ(*val)
        else:
            exc = typ(val)
    else:
        raise TypeError(
            "exceptions must be classes or instances deriving from "
            f"BaseException, not {type(typ).__name__}"
        )
    return exc.with_traceback(tb) if tb is not None else exc
