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
    """Give *task* a portal for the rest of its life, from outside the task.

    The effect is the one :func:`ensure_portal` has when a task calls it
    itself: from its next step on, code running in *task* can use
    :func:`await_`. The task is neither woken nor interrupted; its coroutine is
    wrapped where it stands, whether the task is waiting, scheduled or not
    started yet. As a plain function, it can be called from synchronous code,
    such as a Trio instrument hook or a callback on the task's own event loop.
    A task that has a portal already is left as it is.

    Two cases need care:

    * When *task* is the task running this code, the portal takes effect only
      once the task has yielded to the event loop. Until then
      :func:`has_portal` says False and :func:`await_` raises
      :exc:`RuntimeError`. :func:`ensure_portal` does both steps in one call.
    * When *task* is inside a :func:`with_portal_run` or
      :func:`with_portal_run_sync` call, it counts as having a portal already,
      so nothing is installed, and the task has no portal once that call
      returns.

    Checkpoints: none, as it is not async. It behaves the same on asyncio and
    Trio; only the type of *task* differs.

    :param task: an ``asyncio.Task`` of the event loop running this code, or a
        ``trio.lowlevel.Task`` of the current Trio run.
    :returns: None.
    :raises TypeError: if *task* is neither an ``asyncio.Task`` nor a
        ``trio.lowlevel.Task``.
    :raises RuntimeError: if *task* has already finished; if its asyncio event
        loop is running somewhere other than here (in another thread, or this
        code runs on a different loop); or if it belongs to another Trio run.
        The message names the call to make on the task's own loop instead.
        On asyncio it is also raised if greenback cannot replace the
        task's coroutine, as described under :func:`ensure_portal`.

    Example: a task created without a portal gets one before it first runs.

    >>> async def worker():
    ...     await asyncio.sleep(0)
    ...     return greenback.await_(asyncio.sleep(0, "worker done"))
    >>> async def main():
    ...     task = asyncio.create_task(worker())
    ...     greenback.bestow_portal(task)
    ...     return greenback.has_portal(task), await task
    >>> asyncio.run(main())
    (True, 'worker done')
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
    """Tell whether *task* can call :func:`await_` at this moment.

    For the current task (no argument) the answer is True while a portal is at
    work for it: one from :func:`ensure_portal`, from a tree function, or from a
    :func:`with_portal_run` or :func:`with_portal_run_sync` call in progress. A
    portal that :func:`bestow_portal` gave the current task during its current
    step is not counted until the task has yielded to the event loop, since
    :func:`await_` would still fail before then. Another task counts once it has
    been given a portal, and while it is suspended inside a ``with_portal_run*``
    call.

    This function never raises: outside async code, for a task that has
    finished, or for an object that is not a task, it returns False. It is not
    a checkpoint, and it behaves the same on asyncio and Trio.

    :param task: the ``asyncio.Task`` or ``trio.lowlevel.Task`` to ask about,
        or None (the default) for the task running this code.
    :returns: True if *task* has a usable portal, False otherwise.

    Example:

    >>> async def main():
    ...     before = greenback.has_portal()
    ...     during = await greenback.with_portal_run_sync(greenback.has_portal)
    ...     await greenback.ensure_portal()
    ...     return before, during, greenback.has_portal()
    >>> trio.run(main)
    (False, True, True)
    >>> greenback.has_portal()  # no event loop running here
    False
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
    """Await ``async_fn(*args, **kwds)`` with a portal in place for that call.

    While the call runs, :func:`await_` works in everything it reaches in this
    task: the body of *async_fn*, the synchronous functions it calls, and the
    awaitables those hand to :func:`await_`. When the task already has a
    working portal, the call is simply awaited under it. Otherwise a portal is
    set up for this call alone and taken down when the call returns or raises;
    a call to :func:`ensure_portal` inside *async_fn* finds that portal and
    does not make it outlive the call. Compared with :func:`ensure_portal`,
    this keeps the small cost a portal adds to each step of a task to the part
    of the task that needs it.

    Checkpoints: none of its own. The task yields to the event loop, and can be
    cancelled, only where *async_fn* itself does. The same holds on asyncio and
    Trio.

    :param async_fn: an async function, or any callable that returns an
        awaitable.
    :param args: positional arguments for *async_fn*.
    :param kwds: keyword arguments for *async_fn*.
    :returns: the result of awaiting ``async_fn(*args, **kwds)``.
    :raises TypeError: if *async_fn* returns something that cannot be awaited.

    Whatever *async_fn* raises, cancellation included, propagates unchanged.

    Example: old synchronous code called from a coroutine, with a portal for
    just this call.

    >>> def legacy_total(values):
    ...     return sum(greenback.await_(asyncio.sleep(0, v)) for v in values)
    >>> async def report(values):
    ...     return f"total={legacy_total(values)}"
    >>> async def main():
    ...     text = await greenback.with_portal_run(report, [1, 2, 3])
    ...     return text, greenback.has_portal()
    >>> asyncio.run(main())
    ('total=6', False)
    """
    if impl.in_active_portal():
        return await async_fn(*args, **kwds)
    return await impl.run_portal(async_fn, args, kwds)  # type: ignore[no-any-return]


async def with_portal_run_sync(
    sync_fn: Callable[P, T], /, *args: P.args, **kwds: P.kwargs
) -> T:
    """Call ``sync_fn(*args, **kwds)`` with a portal in place for that call.

    This is the direct way to run synchronous code that uses :func:`await_`
    from an async function. When the task already has a working portal,
    *sync_fn* is just called. Otherwise a portal is set up for this one call
    and taken down when it returns or raises. For a synchronous function
    this is lighter than :func:`with_portal_run`.

    Checkpoints: none of its own. The task yields to the event loop, and can be
    cancelled, only inside the :func:`await_` calls that *sync_fn* makes; a
    *sync_fn* that makes none runs start to finish within the current step.
    The same holds on asyncio and Trio.

    :param sync_fn: a synchronous callable.
    :param args: positional arguments for *sync_fn*.
    :param kwds: keyword arguments for *sync_fn*.
    :returns: what *sync_fn* returns.
    :raises RuntimeError: if *sync_fn* raises :exc:`StopIteration`, which is
        replaced, as in any coroutine, by a :exc:`RuntimeError` whose
        ``__cause__`` is the :exc:`StopIteration`.

    Any other exception from *sync_fn*, including one that came out of its
    :func:`await_` calls (cancellation too), propagates unchanged.

    Example:

    >>> def load_settings(name):
    ...     greenback.await_(trio.sleep(0))  # stands for real async I/O
    ...     return {"name": name, "debug": False}
    >>> async def main():
    ...     settings = await greenback.with_portal_run_sync(load_settings, "app")
    ...     return settings, greenback.has_portal()
    >>> trio.run(main)
    ({'name': 'app', 'debug': False}, False)
    """
    if impl.in_active_portal():
        return sync_fn(*args, **kwds)
    return await impl.run_sync_portal(sync_fn, args, kwds)  # type: ignore[no-any-return]


async def ensure_portal() -> None:
    """Give the current task a portal that lasts for the rest of its life.

    After this call, :func:`await_` works anywhere in the task: in its
    coroutines, in the synchronous functions they call at any depth, and in the
    awaitables those pass to :func:`await_`. The first call puts a greenback
    wrapper in place of the task's coroutine (``task.get_coro()`` on asyncio,
    ``task.coro`` on Trio); the event loop then resumes the task through the
    wrapper, which runs each step where :func:`await_` can suspend it. Later
    calls find the portal and change nothing. So does a call made inside a
    :func:`with_portal_run` or :func:`with_portal_run_sync` call, whose portal
    stays limited to that call. The portal goes away with the task.

    Checkpoints: always both a schedule point and a cancellation point, even
    when the task has a portal already; afterwards the portal is ready, with no
    further yield needed. This holds on asyncio (like ``await
    asyncio.sleep(0)``) and on Trio (like ``await trio.lowlevel.checkpoint()``).

    :returns: None.
    :raises sniffio.AsyncLibraryNotFoundError: if no supported event loop is
        running this code. It is a subclass of :exc:`RuntimeError`.
    :raises RuntimeError: if the running async library is neither asyncio nor
        Trio; or, on asyncio, if greenback cannot replace the coroutine of
        this task (an asyncio C ``Task`` whose memory layout it does not
        recognise on this Python version). The message names the
        alternatives, such as :func:`with_portal_run`, which needs no such
        change.
    :raises asyncio.CancelledError: on asyncio, if the task is cancelled at
        this checkpoint.
    :raises trio.Cancelled: on Trio, if a cancel scope around the call is
        cancelled.

    Example:

    >>> async def fetch(n):
    ...     await asyncio.sleep(0)
    ...     return n * 2
    >>> def sync_layer(n):
    ...     return greenback.await_(fetch(n)) + 1
    >>> async def main():
    ...     await greenback.ensure_portal()
    ...     return sync_layer(20)
    >>> asyncio.run(main())
    41
    """
    # The portal takes over at the task's next step, so yield once: after
    # this, await_() works even with no further checkpoint.
    await _portalize()


_portalize = impl.portalize_running_task
_switch_out = impl.await_


def await_(aw: Awaitable[T]) -> T:
    """Await *aw* from synchronous code, and return its result.

    ``greenback.await_(x)`` does what ``await x`` does, but as an ordinary call,
    so it is allowed in a plain ``def`` function, a property or a magic
    method, at any depth of synchronous calls below a task that has a portal
    (from :func:`ensure_portal`, :func:`bestow_portal`,
    :func:`with_portal_run`, :func:`with_portal_run_sync` or the tree
    functions). *aw* runs in the current task, on its event loop: while it
    waits, the synchronous callers stay suspended and other tasks run.
    Anything ``await`` accepts will do: a coroutine, an asyncio future or task,
    a generator-based coroutine, an object with ``__await__``. An exception
    raised by the awaited code, cancellation included, comes out of
    ``await_`` unchanged and can be handled in the synchronous code. When
    ``await_`` refuses a coroutine (the errors below), it closes it, so no
    "never awaited" warning follows.

    Checkpoints: exactly those of *aw*. ``await_(asyncio.sleep(0))`` is a
    schedule point and a cancellation point; awaiting a coroutine that returns
    without suspending is neither. The same holds on asyncio and Trio; a
    cancellation arrives as ``asyncio.CancelledError`` or ``trio.Cancelled``.

    :param aw: the awaitable to run.
    :returns: the value that ``await aw`` would produce.
    :raises RuntimeError: if the current task has no portal (the message starts
        "You must create a greenback portal for this task"), or if its portal
        came from :func:`bestow_portal` during the current step and the task
        has not yet yielded to the event loop ("You must yield to the event
        loop").
    :raises sniffio.AsyncLibraryNotFoundError: when called outside async code:
        in a thread that runs no event loop, or in an asyncio callback outside
        any task. It is a subclass of :exc:`RuntimeError`.
    :raises RuntimeError: under an async library other than asyncio and Trio;
        inside a ``__del__`` method or a weakref callback that the garbage
        collector is running, where suspending would stall the collection; or
        in a greenlet that the task's portal did not start.
    :raises TypeError: if *aw* is not awaitable.
    :raises RecursionError: if portals are nested so deeply (``await_`` of
        code that awaits through another portal, and so on) that the thread's
        stack would soon run out.

    Example:

    >>> async def lookup(key):
    ...     await trio.sleep(0)
    ...     return key.upper()
    >>> def on_event(key):  # a synchronous callback
    ...     return greenback.await_(lookup(key))
    >>> async def main():
    ...     await greenback.ensure_portal()
    ...     return [on_event(k) for k in ("a", "b")]
    >>> trio.run(main)
    ['A', 'B']
    """
    # The compiled core adds no traceback entry of its own, so this frame
    # is the one "await_" frame that tracebacks and stack tools show.
    return _switch_out(aw)


if IMPLEMENTATION != "compiled":
    # The pure-Python await_ is public as it is: its own frame is the one
    # tracebacks show. It shares the documentation above.
    impl.await_.__doc__ = await_.__doc__
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
