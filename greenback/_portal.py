"""Giving tasks portals for the rest of their lives: ensure_portal,
bestow_portal, has_portal."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

import sniffio

from . import _core, _tasks

if TYPE_CHECKING:
    import asyncio

    import trio


async def ensure_portal() -> None:
    """Ensure that the current async task is able to use :func:`greenback.await_`.

    The first call in a task puts a portal between the event loop and the
    task's coroutine, so that every later step of the task runs where
    :func:`await_` can reach the event loop. Calling it again is a no-op.
    Either way it is a checkpoint (a schedule point and a cancellation point),
    after which the portal is ready.
    """
    library = _tasks.current_library()
    if not _core.in_active_portal():
        bestow_portal(_tasks.current_task())
    # The portal takes over at the task's next step, so yield once: after
    # this, await_() works even with no further checkpoint.
    await _tasks.checkpoint(library)


def bestow_portal(task: Union[asyncio.Task[Any], trio.lowlevel.Task]) -> None:
    """Ensure that *task* (an ``asyncio.Task`` or ``trio.lowlevel.Task``) is
    able to use :func:`greenback.await_` for the rest of its life.

    This is :func:`ensure_portal` done from outside the task. Given the
    current task, the portal starts working only after the task next yields
    to the event loop.
    """
    _tasks.check_task(task)
    coro = _tasks.get_coro(task)
    if isinstance(coro, _core.Portal) and coro.provides_portal:
        return
    if _tasks.portal_in_await_chain(coro):
        return  # inside with_portal_run*(): it already has one
    try:
        if task is _tasks.current_task() and _core.in_active_portal():
            return
    except (RuntimeError, sniffio.AsyncLibraryNotFoundError):
        pass
    portal = _core.make_task_portal(coro, _tasks.coro_has_started(coro))
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
        return _core.in_active_portal()
    try:
        if task is _tasks.current_task():
            return _core.in_active_portal()
    except (RuntimeError, sniffio.AsyncLibraryNotFoundError):
        pass
    try:
        coro = _tasks.get_coro(task)
    except AttributeError:
        return False
    if isinstance(coro, _core.Portal) and coro.provides_portal:
        return True
    return _tasks.portal_in_await_chain(coro)
