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
from ._errors import TREE_LEFT_ELSEWHERE_ERROR
from ._select import impl
from ._portal import P, T, set_coro, with_portal_run


async def with_portal_run_tree(
    async_fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwds: P.kwargs
) -> T:
    """Await ``async_fn(*args, **kwds)`` with portals for it and every task it starts.

    *async_fn* runs as under :func:`with_portal_run`: with the task's own
    portal if it has one, otherwise with one for this call only. In addition,
    while the call runs, new tasks started inside it get portals for their
    whole lives, and so do the tasks that those start, at any depth. Which
    tasks count as "started inside" depends on the library:

    * Trio: the tasks spawned into nurseries that are opened inside the call,
      by the calling task or by any task that got its portal this way. A task
      spawned into a nursery that was already open when the call began gets
      none, even when code inside the call spawns it, since it may outlive
      the call.
    * asyncio (also uvloop, and anyio on asyncio): the tasks created from code
      that runs inside the call, through ``asyncio.create_task``,
      ``loop.create_task``, ``asyncio.TaskGroup``, ``asyncio.gather`` or anyio
      task groups. A task that outlives the call keeps its portal, but the
      tasks it creates after the call has returned get none.

    ``trio.run(greenback.with_portal_run_tree, main)`` or
    ``asyncio.run(greenback.with_portal_run_tree(main))`` gives a whole
    program portals; on Trio that leaves out only Trio's own system tasks (see
    :class:`AutoPortalInstrument`). The mechanism is that of
    :func:`portals_for_children`.

    Checkpoints: none of its own, on either library; the task yields and can
    be cancelled only where *async_fn* does.

    :param async_fn: an async function, or any callable that returns an
        awaitable.
    :param args: positional arguments for *async_fn*.
    :param kwds: keyword arguments for *async_fn*.
    :returns: the result of awaiting ``async_fn(*args, **kwds)``.
    :raises TypeError: if *async_fn* returns something that cannot be awaited.
    :raises RuntimeError: if the running async library is neither asyncio nor
        Trio.

    Whatever *async_fn* raises, cancellation included, propagates unchanged.

    Example: every worker that the subsystem spawns can use :func:`await_`.

    >>> def sync_work(n):
    ...     greenback.await_(trio.sleep(0))
    ...     return n * 10
    >>> async def worker(n, results):
    ...     results.append(sync_work(n))
    >>> async def subsystem():
    ...     results = []
    ...     async with trio.open_nursery() as nursery:
    ...         for n in range(3):
    ...             nursery.start_soon(worker, n, results)
    ...     return sorted(results)
    >>> trio.run(greenback.with_portal_run_tree, subsystem)
    [0, 10, 20]
    """
    with portals_for_children():
        return await with_portal_run(async_fn, *args, **kwds)


@contextmanager
def portals_for_children() -> Iterator[None]:
    """Give portals to tasks started in a ``with`` block, but not to its own task.

    Inside the block, new tasks get portals for their whole lives, and so do
    the tasks they start. On Trio these are the tasks spawned into nurseries
    opened inside the block (a nursery that encloses the block gives its new
    tasks none, even those spawned from inside the block). On asyncio they are
    the tasks created inside the block, and the tasks that those create while
    the block is active, by any of the means listed under
    :func:`with_portal_run_tree`. The task that enters the block gets no
    portal, which is what lets this context manager be synchronous; use
    :func:`portals_for_tree` when that task needs :func:`await_` as well.

    Blocks may nest, and several tasks may have blocks open at once. On Trio
    they share one :class:`AutoPortalInstrument`, added to the run when the
    first block opens and removed when the last one closes, so task spawning
    costs nothing extra the rest of the time. asyncio has no instruments;
    there the blocks share a task factory that is chained in front of the
    loop's own factory and put back when the last block closes. A task factory
    that the program installs while a block is open replaces greenback's, and
    tasks created after that get no portals.

    Checkpoints: none; entering and leaving never yield to the event loop, so
    the block can be opened in synchronous code that runs in a task.

    :returns: a synchronous context manager; ``with`` binds None.
    :raises sniffio.AsyncLibraryNotFoundError: on entering, if no supported
        event loop is running this code (for example, in an asyncio callback
        outside any task).
    :raises RuntimeError: on entering, if the running async library is neither
        asyncio nor Trio.

    Example:

    >>> async def child():
    ...     return greenback.await_(asyncio.sleep(0, "child can await_"))
    >>> async def main():
    ...     with greenback.portals_for_children():
    ...         result = await asyncio.create_task(child())
    ...     return result, greenback.has_portal()
    >>> asyncio.run(main())
    ('child can await_', False)
    """
    with _children_scope(_tasks.current_library()):
        yield


def _children_scope(library: str) -> ContextManager[None]:
    return _trio_children_scope() if library == "trio" else _asyncio_children_scope()


@asynccontextmanager
async def portals_for_tree() -> AsyncIterator[None]:
    """Give portals to the task running an ``async with`` block and its new tasks.

    Within the block the entering task can use :func:`await_`: it is given a
    portal unless it has one already. Tasks started inside the block get
    portals for their whole lives, exactly as with
    :func:`portals_for_children`. On leaving, a portal that the block gave the
    task is taken away again, even if :func:`ensure_portal` was called inside
    the block; a task that had a portal before the block keeps it. The block
    belongs to the task that enters it: if another task leaves it (as when
    pytest-asyncio finalizes an async fixture), that is fine once the
    entering task has finished, and an error while it still runs.

    Checkpoints: entering and leaving are each a schedule point (other tasks
    may run) but not a cancellation point. On Trio a pending cancellation is
    left for the task's next checkpoint. On asyncio, a ``cancel()`` that
    arrives at one of these schedule points is not lost: it is requested again,
    so the task's next ``await`` raises ``asyncio.CancelledError``. When even a
    schedule point is unwanted, use :func:`with_portal_run_tree`.

    :returns: an asynchronous context manager; ``async with`` binds None.
    :raises sniffio.AsyncLibraryNotFoundError: on entering, if no supported
        event loop is running this code.
    :raises RuntimeError: on entering, if the running async library is neither
        asyncio nor Trio; or, on asyncio, if greenback cannot replace the
        task's coroutine, as described under :func:`ensure_portal`. On
        leaving, if a task other than the entering one leaves the block
        while the entering task still runs.

    Example:

    >>> async def child(found):
    ...     found.append(greenback.has_portal())
    >>> async def main():
    ...     found = []
    ...     async with greenback.portals_for_tree():
    ...         found.append(greenback.has_portal())
    ...         async with trio.open_nursery() as nursery:
    ...             nursery.start_soon(child, found)
    ...     return found, greenback.has_portal()
    >>> trio.run(main)
    ([True, True], False)
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
            if _tasks.current_task_of(library) is not task:
                # Left by another task: an async generator (a pytest-asyncio
                # fixture) finalized elsewhere. A finished entering task
                # needs no portal taken back; a running one can't be reached.
                if not (isinstance(task, asyncio.Task) and task.done()):
                    raise RuntimeError(TREE_LEFT_ELSEWHERE_ERROR)
                await _schedule_point(library)
            elif portal is not None and _tasks.get_coro(task) is portal:
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
        try:
            _current_scope.reset(token)
        except ValueError:
            # Left in another context than it was entered in (pytest-asyncio
            # on Python 3.10 finalizes async fixtures that way): the scope is
            # already inactive, so just stop naming it here either.
            _current_scope.set(scope.enclosing)
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
