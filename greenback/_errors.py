"""What the compiled core and its pure-Python twin share: the words of their
errors, and how a coroutine's throw() turns its arguments into one exception."""

from __future__ import annotations

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

TASK_LAYOUT_ERROR = (
    "greenback could not find where this asyncio.Task stores its coroutine, "
    "so it cannot give the task a portal. Use a task created by "
    "asyncio.create_task() or loop.create_task(), or run the code with "
    "'await greenback.with_portal_run(...)' instead."
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
