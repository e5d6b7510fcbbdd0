"""Portals for whole task trees: the tasks spawned inside a scope get portals
too, and so do their children.

Trio: nurseries give tasks a clear tree, and an Instrument sees every task as
it is spawned (as in upstream greenback). asyncio has neither, so here a task
factory, chained in front of whatever factory the loop already has, wraps the
coroutine of every task created by a task that is inside a scope; membership
travels to child tasks with the context they copy.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, ContextManager, Iterator

from . import _tasks
from ._select import impl
from ._portal import P, T, set_coro, with_portal_run


async def with_portal_run_tree(
    async_fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwds: P.kwargs
) -> T:
    """Execute ``await async_fn(*args, **kwds)`` so that :func:`await_` works
    both in *async_fn* and in every task spawned inside it, recursively: on
    Trio the children of nurseries opened inside *async_fn*, on asyncio the
    tasks that *async_fn* and its descendants create while the call runs.

    ``trio.run(greenback.with_portal_run_tree, main)`` gives a whole run
    (system tasks aside) portals. Adds no checkpoint of its own.
    """
    with portals_for_children():
        return await with_portal_run(async_fn, *args, **kwds)


@contextmanager
def portals_for_children() -> Iterator[None]:
    """A synchronous context manager that gives portals to the child tasks
    started inside it (and to their children), but not to the task that
    enters it.

    On Trio these are the children of nurseries opened inside the block; a
    nursery that encloses the block gets none, even for the same parent
    task. On asyncio these are the tasks created inside the block, by
    ``create_task``, ``TaskGroup``, ``gather`` or anyio task groups.
    """
    with _children_scope(_tasks.current_library()):
        yield


def _children_scope(library: str) -> ContextManager[None]:
    return _trio_children_scope() if library == "trio" else _asyncio_children_scope()


@asynccontextmanager
async def portals_for_tree() -> AsyncIterator[None]:
    """An async context manager that gives the entering task a portal for the
    duration of the block, and portals to the tasks started inside it (see
    :func:`portals_for_children`).

    Entering and leaving are each a schedule point but not a cancellation
    point. After the block the task's portal is removed again, unless it
    had one before.
    """
    library = _tasks.current_library()
    with _children_scope(library):
        task = _tasks.current_task_of(library)
        coro = _tasks.get_coro(task)
        portal: impl.Portal | None = None
        if not impl.in_active_portal() and not (
            isinstance(coro, impl.Portal) and coro.provides_portal
        ):
            portal = impl.make_task_portal(coro, True)
            set_coro(task, coro, portal)
        await _schedule_point(library)  # from here on, steps run in the portal
        try:
            yield
        finally:
            if portal is not None and _tasks.get_coro(task) is portal:
                # The loop resumes the original coroutine from the next step
                # on; once that has happened, the portal is idle and can go.
                set_coro(task, portal, coro)
                await _schedule_point(library)
                portal.detach()
            else:
                await _schedule_point(library)


async def _schedule_point(library: str) -> None:
    """Let other tasks run, without being a cancellation point."""
    if library == "trio":
        import trio

        await trio.lowlevel.cancel_shielded_checkpoint()
        return
    try:
        await asyncio.sleep(0)
    except asyncio.CancelledError as exc:
        # Hand the cancellation on to the task's next await instead.
        task = asyncio.current_task()
        assert task is not None
        if sys.version_info >= (3, 11):
            task.uncancel()
        task.cancel(*exc.args)


# ---------------------------------------------------------------------------
# asyncio: a task factory and a context variable
# ---------------------------------------------------------------------------


class _Scope:
    """One active portals_for_children() on asyncio. Tasks created in a
    context that holds a live scope get portals."""

    __slots__ = ("active", "enclosing")

    def __init__(self, enclosing: _Scope | None) -> None:
        self.active = True
        self.enclosing = enclosing

    def is_live(self) -> bool:
        scope: _Scope | None = self
        while scope is not None:
            if scope.active:
                return True
            scope = scope.enclosing
        return False


_current_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "greenback_portal_scope", default=None
)


class _PortalTaskFactory:
    """Chained in front of a loop's task factory while scopes are active on
    the loop: gives the new task's coroutine a portal when the context the
    task is created in belongs to a live scope."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous
        self.users = 0

    def __call__(
        self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
    ) -> asyncio.Future[Any]:
        context = kwargs.get("context")
        scope = _current_scope.get() if context is None else context.get(_current_scope)
        if scope is not None and scope.is_live() and not isinstance(coro, impl.Portal):
            coro = impl.make_task_portal(coro, _tasks.coro_has_started(coro))
        if self.previous is not None:
            return self.previous(loop, coro, **kwargs)  # type: ignore[no-any-return]
        return asyncio.Task(coro, loop=loop, **kwargs)


@contextmanager
def _asyncio_children_scope() -> Iterator[None]:
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    if isinstance(previous, _PortalTaskFactory):
        factory = previous
    else:
        factory = _PortalTaskFactory(previous)
        loop.set_task_factory(factory)
    factory.users += 1
    scope = _Scope(_current_scope.get())
    token = _current_scope.set(scope)
    try:
        yield
    finally:
        scope.active = False
        _current_scope.reset(token)
        factory.users -= 1
        # Put the previous factory back when the last scope leaves, unless
        # the program installed another factory meanwhile.
        if factory.users == 0 and loop.get_task_factory() is factory:
            loop.set_task_factory(factory.previous)


# ---------------------------------------------------------------------------
# Trio: an instrument that sees tasks being spawned (greenback._trio_instrument)
# ---------------------------------------------------------------------------


@contextmanager
def _trio_children_scope() -> Iterator[None]:
    import trio

    from ._trio_instrument import AutoPortalInstrument, instrument_holder

    task = trio.lowlevel.current_task()
    holder = instrument_holder()
    instrument = holder.get()
    if instrument is None:
        instrument = AutoPortalInstrument()
        trio.lowlevel.add_instrument(instrument)
        holder.set(instrument)
    elif task in instrument.tasks:
        # An enclosing scope (or the task's own portal-giving parent)
        # already covers the children of this task.
        yield
        return
    instrument.tasks[task] = len(task.child_nurseries)
    instrument.refs += 1
    try:
        yield
    finally:
        del instrument.tasks[task]
        instrument.refs -= 1
        if instrument.refs == 0:
            holder.set(None)
            trio.lowlevel.remove_instrument(instrument)
