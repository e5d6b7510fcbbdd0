"""The public ways to get a portal: for the rest of a task's life
(bestow_portal here; ensure_portal is in _core and _purepy), or for one call
(with_portal_run*), plus has_portal to ask."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, ParamSpec, TypeVar, Union

import sniffio

from . import _tasks
from ._select import impl

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
    if _tasks.portal_in_await_chain(coro):
        return  # inside with_portal_run*(): it already has one
    try:
        if task is _tasks.current_task() and impl.in_active_portal():
            return
    except (RuntimeError, sniffio.AsyncLibraryNotFoundError):
        pass
    portal = impl.make_task_portal(coro, _tasks.coro_has_started(coro))
    _tasks.set_coro(task, coro, portal)


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
    return _tasks.portal_in_await_chain(coro)


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
