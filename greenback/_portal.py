"""The public ways to get a portal: for the rest of a task's life
(bestow_portal here; ensure_portal is in _core and _purepy), or for one call
(with_portal_run*); has_portal to ask; await_ to use one; and how a task's
coroutine is swapped for a portal."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Coroutine, ParamSpec, TypeVar, Union

import sniffio

from . import _tasks
from ._select import IMPLEMENTATION, impl

if TYPE_CHECKING:
    import asyncio

    import trio

T = TypeVar("T")
P = ParamSpec("P")


def bestow_portal(task: Union[asyncio.Task[Any], trio.lowlevel.Task]) -> None:
    """Ensure that *task* (an ``asyncio.Task`` or ``trio.lowlevel.Task``) is
    able to use :func:`greenback.await_` for the rest of its life.

    This is :func:`ensure_portal` done from outside the task. Given the
    current task, the portal starts working only after the task next yields
    to the event loop.
    """
    _tasks.check_task(task)
    coro = _tasks.get_coro(task)
    if isinstance(coro, impl.Portal) and coro.provides_portal:
        return
    if portal_in_await_chain(coro):
        return  # inside with_portal_run*(): it already has one
    try:
        if task is _tasks.current_task() and impl.in_active_portal():
            return
    except (RuntimeError, sniffio.AsyncLibraryNotFoundError):
        pass
    portal = impl.make_task_portal(coro, _tasks.coro_has_started(coro))
    set_coro(task, coro, portal)


def has_portal(
    task: Union[asyncio.Task[Any], trio.lowlevel.Task, None] = None,
) -> bool:
    """Return True if *task* (default: the current task) can use
    :func:`greenback.await_`, and False otherwise. Never raises.

    For the current task this means a portal is working right now; a portal
    bestowed during the current step does not count until the task yields.
    Another task counts once a portal has been bestowed on it.
    """
    if task is None:
        return impl.in_active_portal()
    try:
        if task is _tasks.current_task():
            return impl.in_active_portal()
    except (RuntimeError, sniffio.AsyncLibraryNotFoundError):
        pass
    try:
        coro = _tasks.get_coro(task)
    except AttributeError:
        return False
    if isinstance(coro, impl.Portal) and coro.provides_portal:
        return True
    return portal_in_await_chain(coro)


async def with_portal_run(
    async_fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwds: P.kwargs
) -> T:
    """Execute ``await async_fn(*args, **kwds)`` with a portal available for at
    least the duration of that call, so that the code it runs can use
    :func:`await_`.

    If the current task already has a portal, this simply awaits
    ``async_fn(*args, **kwds)``. Otherwise the portal lasts only for this
    call; an :func:`ensure_portal` inside it does not make it outlive the
    call. No checkpoint (schedule or cancellation point) is added beyond those
    inside *async_fn*. *async_fn* may return any awaitable, not only a
    coroutine.
    """
    if impl.in_active_portal():
        return await async_fn(*args, **kwds)
    return await impl.run_portal(async_fn, args, kwds)  # type: ignore[no-any-return]


async def with_portal_run_sync(
    sync_fn: Callable[P, T], /, *args: P.args, **kwds: P.kwargs
) -> T:
    """Execute ``sync_fn(*args, **kwds)`` with a portal available for at least
    the duration of that call, so that it can use :func:`await_`.

    If the current task already has a portal, this simply calls *sync_fn*.
    Otherwise the portal lasts only for this call. No checkpoint is added
    beyond those of the :func:`await_` calls that *sync_fn* makes.
    """
    if impl.in_active_portal():
        return sync_fn(*args, **kwds)
    return await impl.run_sync_portal(sync_fn, args, kwds)  # type: ignore[no-any-return]


async def ensure_portal() -> None:
    """Ensure that the current async task is able to use :func:`await_`.

    The first call in a task puts a portal between the event loop and the
    task's coroutine, so that every later step of the task runs where
    :func:`await_` can reach the event loop. Calling it again is a no-op.
    Either way it is a checkpoint (a schedule point and a cancellation point),
    after which the portal is ready.
    """
    # The portal takes over at the task's next step, so yield once: after
    # this, await_() works even with no further checkpoint.
    await _tasks.checkpoint(impl.portalize_running_task())


if IMPLEMENTATION == "compiled":
    _switch_out = impl.await_

    def await_(aw: Awaitable[T]) -> T:
        """Run an awaitable from synchronous code and return its result.

        ``greenback.await_(foo())`` does what ``await foo()`` does, but from
        a plain ``def`` function, at any depth below a task that has a portal
        (see :func:`ensure_portal` and :func:`with_portal_run_sync`).
        Exceptions, cancellation included, come out of ``await_`` as they
        would out of ``await``.
        """
        # The compiled core adds no traceback entry of its own, so this frame
        # is the one "await_" frame that tracebacks and stack tools show.
        return _switch_out(aw)

else:
    await_ = impl.await_  # type: ignore[assignment]  # positional-only there


def set_coro(
    task: _tasks._AnyTask, old: Coroutine[Any, Any, Any], new: Coroutine[Any, Any, Any]
) -> None:
    """Make *task* run *new* (a portal, or its original coroutine again)
    in place of *old*, from its next step on."""
    if _tasks.is_trio_task(task):
        task.coro = new  # type: ignore[union-attr]
        # A task that is already scheduled has its next send bound to the old
        # coroutine; rebind it so the portal takes over at that very step.
        pending = getattr(task, "_next_send_fn", None)
        if getattr(pending, "__self__", None) is old:
            task._next_send_fn = getattr(new, pending.__name__)  # type: ignore[union-attr]
        return
    if isinstance(task, _tasks.C_TASK_TYPES):
        # The C Task offers no way to assign it: swap the field from C.
        impl.set_c_task_coro(task, old, new)
    else:
        # The pure-Python asyncio.Task lets us assign it.
        setattr(task, "_coro", new)


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
