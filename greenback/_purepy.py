"""The pure-Python twin of greenback._core, with the same names and behaviour.

It is what runs where the compiled core can't (PyPy, a machine without a C
compiler) or when GREENBACK_NO_EXTENSIONS=1 asks for it; greenback._select
chooses. It follows _core's design, step for step and in plain Python (read
_core.pyx for the reasoning): a Portal runs each step of what it wraps in a
pooled worker greenlet, the portal whose step is running is recorded per
thread, and values cross the greenlet switches through the portal's fields.

Differences from the compiled core: it is slower, and an exception that
leaves a portal carries the portal's own frames in its traceback (the
compiled core's tracebacks show none).

Exceptions from signal handlers
-------------------------------
The compiled core's plumbing is C, where no signal handler runs: a
KeyboardInterrupt (or whatever a handler raises) lands in user code or in the
event loop's. Here the plumbing is Python, and CPython runs a pending handler
wherever its eval loop checks for one: on entering a Python function, on a
loop's jump back, and just after a call into C returns. The plumbing stays
consistent whichever of those points raises:

* `collecting` is set by a gc callback built from C callables alone (see
  _ThreadState), which no handler can interrupt.
* Fields that belong together change in runs of plain stores with no call
  among them (no handler runs there), ordered so that stopping before or
  after a run leaves a consistent state: the step's start and end, parking
  and taking a worker, await_()'s hand-over.
* An exception raised in greenback's own code during a step, where no user
  code could see it, is thrown into what the portal runs, where that is
  suspended, as if it had been raised there (where the compiled core would
  deliver it): by the step itself (Portal._step), by the worker
  (_serve_portals, _run_unit) and by await_(). If the worker's except clause
  is interrupted in turn, the worker dies; each step makes itself the
  worker's parent greenlet, so that the death reaches that step (and not
  whichever greenlet created the worker), which drops the dead worker and
  throws the exception in with a fresh one.
* A Python function's first bytecode is such a point too, and nothing can
  catch what it raises. So after a step suspends, the portal's send(),
  __next__() and throw() are those of a generator (_step_driver), which
  resumes inside its own try and takes the next step from there. (The
  first step still enters through a method; nothing is suspended yet.)

In a child process of fork(), the forking thread's state is reset (no
active portal, not collecting, no parked worker): the parent's greenlets
must never run in the child (_reset_after_fork).
"""

from __future__ import annotations

import asyncio
import atexit
import collections.abc
import contextvars
import gc
import inspect
import os
import sys
import threading
import warnings
import weakref
from functools import partial
from operator import attrgetter, methodcaller
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Coroutine, Generator, TypeVar, cast

import greenlet
import sniffio

from . import _task_layout, _tasks
from ._errors import (
    FOREIGN_GREENLET_ERROR,
    IN_GC_ERROR,
    ORPHANED_AWAIT_ERROR,
    STACK_EXHAUSTED_ERROR,
    TASK_LAYOUT_ERROR,
    exception_from_throw_args,
    task_layout_unknown_error,
)
from ._worker import make_worker_class, real_parent, run_worker

T = TypeVar("T")

MODE_TASK, MODE_RUN, MODE_SYNC = 0, 1, 2
OUT_NONE, OUT_YIELD, OUT_RETURN, OUT_RAISE = 0, 1, 2, 3
MAX_PARKED_WORKERS = 64


class _ThreadState(threading.local):
    # Class-level defaults: what a thread has before it has run any step.
    active: Portal | None = None  # the portal whose step is running
    collecting = False  # inside a garbage collection (see _gc_phase)

    # gc.callbacks calls _gc_phase(phase, info), which is getattr(_state,
    # phase, info): reading one of these properties sets this thread's
    # `collecting` through C code alone (property, methodcaller and the
    # thread-local's own __setattr__). A Python callback could be stopped by
    # a signal handler's exception before it stored anything, and a stale
    # True would refuse every later await_().
    if TYPE_CHECKING:

        @property
        def start(self) -> None: ...
        @property
        def stop(self) -> None: ...

    else:
        start = property(methodcaller("__setattr__", "collecting", True))
        stop = property(methodcaller("__setattr__", "collecting", False))

    def __init__(self) -> None:
        # Idle workers, each with the context it holds.
        self.parked: list[tuple[greenlet.greenlet, contextvars.Context | None]] = []
        # Identifies this Python thread state: a native thread that calls
        # into Python again gets a new one, with new thread-local data.
        self.token = object()
        # Levels of await_() and portal steps on this thread's C stack now,
        # and how many fit (see _nesting_limit).
        self.depth = 0
        self.max_depth = 0


_state = _ThreadState()


def _release_parked_workers() -> None:
    """At exit, end this thread's parked workers while greenlet still can."""
    _state.parked.clear()


atexit.register(_release_parked_workers)


# gc.callbacks hook: track whether this thread is collecting. It runs no
# Python bytecode, so no signal handler can interrupt it (see _ThreadState).
_gc_phase = partial(getattr, _state)

gc.callbacks.append(_gc_phase)


# Greenlets of steps that were suspended in a deleted thread state (see
# Portal._abandon): kept alive for good, never switched into.
_abandoned: list[greenlet.greenlet] = []

# Pure Python can't see the C stack, so deep nesting is bounded by a count of
# levels, from the thread's stack size and a cautious cost per level
# (measured: 0.8 KiB on CPython 3.11, 1.3 KiB on 3.10).
_BYTES_PER_LEVEL = 3072
_STACK_RESERVE = 1 << 20


def _thread_stack_size() -> int:
    """This thread's C stack size, or a cautious guess."""
    if sys.platform.startswith("linux") and sys.implementation.name == "cpython":
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            attr = ctypes.create_string_buffer(256)  # a pthread_attr_t is 56 bytes
            addr, size = ctypes.c_void_p(), ctypes.c_size_t()
            if libc.pthread_getattr_np(ctypes.c_ulong(threading.get_ident()), attr) == 0:
                try:
                    if libc.pthread_attr_getstack(attr, ctypes.byref(addr), ctypes.byref(size)) == 0:
                        return size.value
                finally:
                    libc.pthread_attr_destroy(attr)
        except (OSError, AttributeError):
            pass
    if threading.current_thread() is threading.main_thread():
        return 8 << 20
    return threading.stack_size() or 512 << 10


def _nesting_limit() -> int:
    limit = _state.max_depth
    if not limit:
        size = _thread_stack_size()
        limit = _state.max_depth = max(64, (size - min(_STACK_RESERVE, size // 4)) // _BYTES_PER_LEVEL)
    return limit


# Parked workers inherited by a child process of fork(): copies of the
# parent's greenlets, kept here for good. Releasing them would make greenlet
# kill them, which runs them, and none of the parent's code may run again in
# the child.
_inherited_workers: list[list[tuple[greenlet.greenlet, contextvars.Context | None]]] = []


def _reset_after_fork() -> None:
    """os.register_at_fork(after_in_child=...): in a child forked from sync
    code under a portal, the forking thread's state described the parent's
    running step and idle workers, copies that must never run here (see
    _core): forgotten, not ended (ending one would run it)."""
    parked = _state.parked
    _state.parked = []
    _state.active = None
    _state.collecting = False
    _state.depth = 0
    if parked:
        _inherited_workers.append(parked)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _descends_from(g: greenlet.greenlet | None, ancestor: greenlet.greenlet | None) -> bool:
    while g is not None:
        if g is ancestor:
            return True
        g = g.parent
    return False


def _my_portal() -> Portal | None:
    """The portal whose step this worker is running, or None if the worker
    runs for another reason (greenlet killing it, a switch by hand)."""
    portal = _state.active
    if portal is None or portal._worker is not greenlet.getcurrent():
        return None
    return portal


def _serve_portals() -> None:
    """Body of every worker greenlet; see _core._serve_portals. No frame of
    the worker holds the portal while user code runs or while it is parked:
    a task that is dropped must be able to free its portal, whose finalizer
    then unwinds the worker."""
    while True:
        try:
            while True:
                if _my_portal() is None:
                    return
                _run_unit()
                portal = _my_portal()
                if portal is None:
                    return
                outer = portal._outer
                del portal
                assert outer is not None
                outer.switch()
        except BaseException as exc:
            # Raised in this loop's own code, or passed on by _run_unit: not
            # raised by user code, but by a signal handler (or GreenletExit,
            # when greenlet kills a parked worker). If a step of our portal is
            # running, the exception belongs to it: throw it into what the
            # portal runs, in place of what the step was to send, as if it had
            # been raised where that is suspended.
            portal = _my_portal()
            if portal is None:
                return  # killed, or resumed by something other than a step
            if not isinstance(portal._send_exc, GeneratorExit):  # close() wins
                portal._send_exc = exc
            portal._send_value = _INTERRUPTION
            del portal


# What _serve_portals sends along with an exception from a signal handler.
_INTERRUPTION = object()


def _run_unit() -> None:
    """Start the function, or send/throw into the coroutine, then record
    what came out in the portal. Raises only what user code did not raise:
    an exception from a signal handler while the coroutine is suspended."""
    portal = _my_portal()
    assert portal is not None
    exc, portal._send_exc = portal._send_exc, None
    value, portal._send_value = portal._send_value, None
    mode = portal._mode
    fn = args = kwargs = coro = None
    if mode == MODE_SYNC and portal._fn is not None:
        fn, args, kwargs = portal._fn, portal._args, portal._kwargs
        portal._fn = portal._args = portal._kwargs = None
    elif portal._coro is not None or exc is not None:
        coro = portal._coro
    else:
        fn, args, kwargs = portal._fn, portal._args, portal._kwargs
        portal._fn = portal._args = portal._kwargs = None
    del portal
    try:
        if exc is not None and coro is None:
            raise exc  # thrown into before it started: the function never runs
        if coro is not None:
            if value is _INTERRUPTION and _finished(coro):
                # A signal handler's exception (see _serve_portals) after the
                # coroutine finished: throw() would turn it into "cannot reuse".
                raise exc  # type: ignore[misc]
            done, out = _send_or_throw(coro, value, exc)
        elif fn is None:
            raise RuntimeError("this greenback portal has nothing to run")
        else:
            result = fn(*args, **(kwargs or {}))  # type: ignore[misc]
            if mode == MODE_SYNC:
                done, out = True, result
            else:  # MODE_RUN: what fn returned is what we await
                coro = _awaitable_iter(result)
                del result
                portal = _my_portal()
                if portal is None:
                    return
                portal._coro = coro
                del portal
                done, out = _send_or_throw(coro, None, None)
    except BaseException as error:
        portal = _my_portal()
        if portal is None:
            return  # killed while in user code
        if coro is not None and _interrupted(error, coro):
            raise  # not the coroutine's: _serve_portals throws it in
        error = _without_own_frames(error)
        portal._out_kind = OUT_RAISE
        portal._resume = portal._awaiting = None  # back in the serve loop: idle
        portal._out_value = error
        return
    portal = _my_portal()
    if portal is None:
        return
    portal._out_kind = OUT_RETURN if done else OUT_YIELD
    portal._resume = portal._awaiting = None  # back in the serve loop: idle
    portal._out_value = out


def _finished(it: Any) -> bool:
    """Whether `it` is a native coroutine or a generator that has finished."""
    if inspect.iscoroutine(it):
        return it.cr_frame is None
    if inspect.isgenerator(it):
        return it.gi_frame is None
    return False


def _from_signal_handler(error: BaseException) -> bool:
    """Whether `error` was raised by a signal handler rather than by
    greenback or by the C functions it calls: a handler is Python code, whose
    frame ends the traceback, or Python's default SIGINT handler, which is C
    and raises KeyboardInterrupt (which those functions never do)."""
    if isinstance(error, KeyboardInterrupt):
        return True
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return not tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR)


_PACKAGE_DIR = os.path.dirname(__file__) + os.sep


def _interrupted(error: BaseException, it: Any) -> bool:
    """Whether `error`, caught around a call that resumed `it`, was raised by
    a signal handler (just before `it` ran, or just after it yielded) rather
    than by `it`. Only said of a native coroutine or generator that is still
    suspended, started or not: whatever it raises finishes it. Its send(),
    throw() and close() can raise without finishing it (TypeError, RuntimeError)
    but only from C, while a signal handler is Python code, whose frame ends
    the traceback; Python's default SIGINT handler is C, and raises
    KeyboardInterrupt, which those methods never do."""
    if inspect.iscoroutine(it):
        if it.cr_frame is None or it.cr_running:
            return False
    elif not inspect.isgenerator(it) or it.gi_frame is None or it.gi_running:
        return False
    return _from_signal_handler(error)


_worker_entry = partial(run_worker, _serve_portals)


def _send_or_throw(it: Any, value: Any, exc: BaseException | None) -> tuple[bool, Any]:
    """One resumption of an awaited iterator, as `await` does it:
    (True, return value) or (False, yielded value); errors propagate."""
    try:
        if exc is None:
            # Like PyIter_Send: next() for None where there is no send().
            send = getattr(it, "send", None)
            return False, (next(it) if value is None and send is None else it.send(value))
        if isinstance(exc, GeneratorExit):
            # Close what is awaited, then raise GeneratorExit at the await.
            close = getattr(it, "close", None)
            if close is not None:
                close()
            raise exc
        throw = getattr(it, "throw", None)
        if throw is None:
            raise exc
        return False, throw(exc)
    except StopIteration as stop:
        return True, stop.value


def _without_own_frames(error: BaseException) -> BaseException:
    """Drop this module's frames from the front of a traceback."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return error.with_traceback(tb)


def _awaitable_iter(aw: object) -> Any:
    """The iterator that `await aw` would drive (TypeError as _core gives)."""
    if inspect.iscoroutine(aw):
        return aw
    if inspect.isgenerator(aw) and aw.gi_code.co_flags & inspect.CO_ITERABLE_COROUTINE:
        return aw
    await_method = getattr(type(aw), "__await__", None)
    if await_method is None:
        raise TypeError(
            f"object {type(aw).__name__} can't be used in 'await' expression; "
            "greenback.await_() takes a coroutine or another awaitable"
        )
    it = await_method(aw)
    if inspect.iscoroutine(it):
        raise TypeError("__await__() returned a coroutine")
    if not isinstance(it, collections.abc.Iterator):
        raise TypeError(f"__await__() returned non-iterator of type '{type(it).__name__}'")
    return it


class Portal(collections.abc.Coroutine):  # type: ignore[type-arg]
    """A coroutine shim that runs each step of what it wraps in a worker
    greenlet, so that await_() can suspend from synchronous code."""

    _mode: int
    _started: bool
    _finished: bool
    _running: bool
    _coro: Any
    _fn: Any
    _args: Any
    _kwargs: Any
    _worker: greenlet.greenlet | None
    _resume: greenlet.greenlet | None
    _worker_token: object  # _state.token of the thread state the worker is from
    _outer: greenlet.greenlet | None
    _last_ctx: contextvars.Context | None
    _step_ctx: contextvars.Context | None  # during a step: its task's context
    _awaiting: Any
    _send_value: Any
    _send_exc: BaseException | None
    _out_value: Any
    _out_kind: int
    _serial: int  # steps begun, counted by _step's first statement
    _driver_token: object | None  # identifies the live _step_driver, if any

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError(
            "greenback.Portal objects come from ensure_portal(), bestow_portal(), "
            "with_portal_run() and with_portal_run_sync(); don't create them directly"
        )

    @classmethod
    def _new(cls, mode: int, coro: Any, fn: Any, args: Any, kwargs: Any, started: bool) -> Portal:
        self = object.__new__(cls)
        self._mode, self._coro, self._fn, self._args, self._kwargs = mode, coro, fn, args, kwargs
        self._started, self._finished, self._running = started, False, False
        self._worker = self._resume = self._outer = None
        self._last_ctx = self._awaiting = self._send_value = self._out_value = None
        self._send_exc = self._step_ctx = self._driver_token = None
        self._out_kind = OUT_NONE
        self._serial = 0
        return self

    # --- the step, on the event loop's side --------------------------------

    def _step(
        self, value: Any = None, exc: BaseException | None = None, throw_args: Any = None
    ) -> Any:
        """Run one step, with `value` sent or `exc` (or the exception that
        `throw_args` describe) thrown in: return what the wrapped code
        yielded, raise StopIteration(value) if it returned, or raise its
        exception. Until a step suspends, it is send() and __next__() itself
        (see below), so that no frame of greenback's runs after it."""
        self._serial += 1  # first, before any call (see _step_driver)
        while True:
            # An exception from a signal handler at any point of this loop
            # is thrown into the wrapped code by the next round, as if it had
            # been raised where that code is suspended: where the compiled
            # core would deliver it. (At this method's first bytecode, it is
            # _step_driver that catches it.)
            try:
                if throw_args is not None:
                    exc = exception_from_throw_args(*throw_args)
                    throw_args = None
                if self._running:
                    raise ValueError("coroutine already executing")
                if self._finished:
                    raise RuntimeError("cannot reuse already awaited coroutine")
                if self._resume is not None and self._worker_token is not _state.token:
                    # Suspended mid-step in a thread state that is gone (see
                    # _core): switching back into it would crash, in greenlet.
                    self._abandon()
                    raise RuntimeError(ORPHANED_AWAIT_ERROR)
                depth = _state.depth
                if depth >= _nesting_limit():
                    raise RecursionError(STACK_EXHAUSTED_ERROR)
                self._started = True
                current = greenlet.getcurrent()
                self._outer = current
                ctx = current.gr_context  # the running greenlet's: the current context
                if self._resume is None:
                    self._take_worker(ctx)
                elif ctx is not self._last_ctx:
                    self._follow_context(ctx)
                worker = self._worker
                assert worker is not None
                if real_parent(worker) is not current:
                    # A worker that dies returns to its parent: make that this
                    # step, and not whichever greenlet created the worker.
                    try:
                        worker.parent = current
                    except ValueError:  # another thread's worker: switch() says so
                        pass
                self._send_value, self._send_exc, self._out_kind = value, exc, OUT_NONE
                self._step_ctx = ctx
                previous = _state.active
                resume = self._resume
                assert resume is not None
                # The stores that start and end the step sit in runs with no
                # call among them, where no signal handler runs.
                try:
                    _state.active = self
                    _state.depth = depth + 1
                    self._running = True
                    resume.switch()
                except BaseException:
                    self._running = False
                    _state.active = previous
                    _state.depth = depth
                    self._step_ctx = None
                    self._send_value = self._send_exc = None
                    if worker.dead:
                        # Killed by an exception that nothing in it could
                        # catch (a signal handler's, in its except clause or
                        # bottom frame): the wrapped code is as before the step.
                        self._worker = self._resume = None
                    # Otherwise the switch failed (another thread's worker), or
                    # a signal handler raised as the step came back, with its
                    # outcome recorded: the portal is consistent as it stands.
                    raise
                self._running = False
                _state.active = previous
                _state.depth = depth
                self._step_ctx = None
                kind = self._out_kind
                if kind == OUT_YIELD:
                    if self._resume is None:  # a native await: the worker is idle
                        self._worker = None
                        self._park(worker, self._last_ctx)
                    # Code is suspended: the next step comes in through a
                    # generator (see _step_driver). The token goes first:
                    # replacing the entries frees the previous driver, which
                    # must know it's no longer the portal's.
                    token = object()
                    driver = _step_driver(weakref.ref(self), token)
                    next(driver)
                    self._driver_token = token
                    self._send_entry = driver.send
                    self._next_entry = driver.__next__
                    self._throw_entry = driver.throw
                    out, self._out_value = self._out_value, None
                    return out
                out = self._out_value
                self._out_value = None
                self._finish()
                break
            except BaseException as error:
                if self._finished or self._running or not _from_signal_handler(error):
                    raise
                if throw_args is not None or not isinstance(exc, GeneratorExit):
                    exc = error  # (close() wins)
                value, throw_args = _INTERRUPTION, None
        if kind == OUT_RETURN:
            raise StopIteration(out)
        if kind == OUT_RAISE:
            if self._mode == MODE_SYNC and isinstance(out, StopIteration):
                raise RuntimeError("with_portal_run_sync() function raised StopIteration") from out
            raise out
        raise RuntimeError(
            "greenback's worker greenlet ended without finishing the step; "
            "was it killed, or switched away from by hand?"
        )

    def _take_worker(self, ctx: contextvars.Context | None) -> None:
        parked = _state.parked
        if parked:
            worker, held = parked.pop()
        else:
            worker, held = _Worker(_worker_entry), None
        if held is not ctx:
            worker.gr_context = ctx
        # Attached last, in stores with no call between them: a signal
        # handler that raises before here only loses an idle worker.
        self._last_ctx = ctx
        self._worker_token = _state.token
        self._worker = self._resume = worker

    def _follow_context(self, ctx: contextvars.Context | None) -> None:
        # Follow a changed task context unless the worker entered one itself.
        assert self._worker is not None
        if self._worker.gr_context is self._last_ctx:
            self._worker.gr_context = ctx
            self._last_ctx = ctx

    @staticmethod
    def _park(worker: greenlet.greenlet | None, ctx: contextvars.Context | None) -> None:
        if worker is not None and len(_state.parked) < MAX_PARKED_WORKERS:
            _state.parked.append((worker, ctx))

    def _abandon(self) -> None:
        for glet in (self._worker, self._resume):
            if glet is not None and glet not in _abandoned:
                _abandoned.append(glet)
        self._finished = True
        self._retire_driver()
        self._worker = self._resume = self._outer = self._last_ctx = None
        self._coro = self._awaiting = self._fn = self._args = self._kwargs = None
        self._send_value = self._send_exc = None

    def _finish(self) -> None:
        self._finished = True
        self._retire_driver()
        worker, ctx = self._worker, self._last_ctx
        self._worker = self._resume = self._outer = self._last_ctx = None
        self._coro = self._awaiting = None
        self._send_value = self._send_exc = None
        if worker is None or self._out_kind == OUT_NONE:
            return
        if self._mode == MODE_TASK and ctx is not None:
            # The task is over: idle workers must not keep its context alive.
            worker.gr_context = None
            for i, (parked, held) in enumerate(_state.parked):
                if held is ctx:
                    parked.gr_context = None
                    _state.parked[i] = (parked, None)
            ctx = None
        self._park(worker, ctx)

    # --- coroutine protocol --------------------------------------------------

    def __await__(self) -> Generator[Any, Any, Any]:
        return self

    def __iter__(self) -> Portal:
        return self

    def _throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        return self._step(None, None, (typ, val, tb))

    def _retire_driver(self) -> None:
        # Plain stores only: the driver, no longer the portal's, ignores its
        # own close() when it is freed (see _step_driver).
        self._driver_token = None
        self._send_entry = self._next_entry = self._throw_entry = _cannot_reuse

    # send(), __next__() and throw() are found through C callables alone
    # (property and attrgetter): first the methods below, which are the step
    # itself with no frame around it (a signal handler's exception in a
    # wrapper, after the step came back, would lose what it yielded); once
    # a step has suspended, the driver's methods. The class-level defaults
    # give a fresh bound method each time, so the portal holds no cycle.
    _send_entry: Callable[..., Any] = _step
    _next_entry: Callable[..., Any] = _step
    _throw_entry: Callable[..., Any] = _throw
    if TYPE_CHECKING:

        @property
        def send(self) -> Callable[[Any], Any]: ...
        @property
        def __next__(self) -> Callable[[], Any]: ...
        @property
        def throw(self) -> Callable[..., Any]: ...

    else:
        send = property(attrgetter("_send_entry"))
        __next__ = property(attrgetter("_next_entry"))
        throw = property(attrgetter("_throw_entry"))

    def close(self) -> None:
        if self._running:
            raise ValueError("coroutine already executing")
        if self._finished:
            return
        if not self._started or (self._resume is None and not _greenlet_usable()):
            # Nothing runs in a worker, so the wrapped coroutine (if any) can
            # be closed right here; at interpreter exit this is the only way.
            self._finished = True
            self._fn = self._args = self._kwargs = None
            coro, self._coro = self._coro, None
            if coro is not None:
                coro.close()
            return
        if self._resume is not None and (
            self._worker_token is not _state.token or not _greenlet_usable()
        ):
            # Can't be resumed here (see _core's close()): leave it, quietly.
            self._abandon()
            return
        try:
            self._step(None, GeneratorExit())
        except (GeneratorExit, StopIteration):
            return
        raise RuntimeError("coroutine ignored GeneratorExit")

    def __del__(self) -> None:
        if getattr(self, "_finished", True):
            return
        if not self._started and self._mode != MODE_TASK:
            warnings.warn(
                f"coroutine '{self.__qualname__}' was never awaited",
                RuntimeWarning,
                stacklevel=1,
                source=self,
            )
            self._finished = True
            return
        if self._resume is not None and not self._running:
            try:
                self.close()
            except greenlet.error:
                # The worker belongs to another (perhaps ended) thread.
                self._finished = True

    # --- introspection: look like the coroutine we wrap ---------------------

    @property
    def cr_frame(self) -> FrameType | None:
        coro = self._coro
        if coro is None:
            return None
        return getattr(coro, "cr_frame", getattr(coro, "gi_frame", None))

    @property
    def cr_await(self) -> Any:
        if self._awaiting is not None:
            return self._awaiting
        coro = self._coro
        if coro is None:
            return None
        return getattr(coro, "cr_await", getattr(coro, "gi_yieldfrom", None))

    @property
    def cr_code(self) -> CodeType | None:
        coro = self._coro
        if coro is None:
            return None
        return getattr(coro, "cr_code", getattr(coro, "gi_code", None))

    @property
    def cr_running(self) -> bool:
        return self._running

    @property
    def cr_suspended(self) -> bool:
        return self._started and not self._finished and not self._running

    @property
    def cr_origin(self) -> None:
        return None

    def __getattr__(self, name: str) -> str:
        # The wrapped coroutine's names, for asyncio's and Trio's reprs. (A
        # class body can't define __qualname__ as a property.)
        if name == "__qualname__":
            return self._name(True)
        if name == "__name__":
            return self._name(False)
        raise AttributeError(f"'Portal' object has no attribute '{name}'")

    def _name(self, qualified: bool) -> str:
        if self._coro is not None:
            name = getattr(self._coro, "__qualname__" if qualified else "__name__", None)
            if isinstance(name, str):
                return name
        return ("greenback task portal", "with_portal_run", "with_portal_run_sync")[self._mode]

    def __repr__(self) -> str:
        target = self._coro if self._coro is not None else self._fn
        return f"<greenback portal {self._name(True)} around {target!r}>"

    @property
    def await_greenlet(self) -> greenlet.greenlet | None:
        return self._resume if self._awaiting is not None else None

    @property
    def provides_portal(self) -> bool:
        return not self._finished and (self._started or self._mode == MODE_TASK)

    def detach(self) -> None:
        if self._mode != MODE_TASK or self._running or self._finished:
            raise RuntimeError("only a live, idle task portal can be detached")
        if self._resume is not None:
            raise RuntimeError("cannot detach a portal while await_() is suspended in it")
        self._finished = True
        self._retire_driver()
        self._coro = self._last_ctx = None


def _cannot_reuse(*args: object) -> Any:
    raise RuntimeError("cannot reuse already awaited coroutine")


def _step_driver(portal_ref: weakref.ref[Portal], token: object) -> Generator[Any, Any, Any]:
    """The portal's send(), __next__() and throw() for the step after a
    suspension (each suspension makes a new one; a generator can't loop back
    to its yield without a jump where a signal handler may raise outside
    any try). A method would start with a bytecode where a handler's
    exception leaves before any try can catch it: the task would fail and
    the portal's code stay suspended. This generator is resumed instead, at
    a `yield` inside its try, and takes the step from there. A handler's
    exception before the step begins (told by the portal's step serial), or
    after it came back from a suspension, is thrown into the portal's code,
    as _step does with one raised during the step. The portal is held
    weakly: a dropped portal must still be freed, and unwind its code,
    promptly."""
    exc: BaseException | None = None
    first = True
    try:
        value = yield
    except BaseException as thrown:
        value, exc = None, thrown
    while True:
        portal = None
        serial = -1
        try:
            portal = portal_ref()
            if portal is None or (first and portal._driver_token is not token):
                # This driver is not the portal's (any more): it is being
                # closed as it is freed. (While a step is being taken, its
                # caller holds the portal.)
                return None
            first = False
            serial = portal._serial
            out = portal._step(value, exc)
            break
        except StopIteration as stop:
            return stop.value
        except BaseException as error:
            if (
                portal is not None
                and serial >= 0
                and portal._serial != serial
                and (portal._finished or portal._running or not _from_signal_handler(error))
            ):
                raise  # the step's own outcome
            if not isinstance(exc, GeneratorExit):  # (close() wins)
                exc = error
            value = _INTERRUPTION
        finally:
            del portal
    yield out  # the step's; the driver made for the next step takes over


def _greenlet_usable() -> bool:
    try:
        greenlet.getcurrent()
    except Exception as error:  # "greenlet is being finalized", at interpreter exit
        tb = error.__traceback__
        if tb is not None and tb.tb_next is not None:
            raise  # raised by Python code: a signal handler's, not greenlet's
        return False
    return True


# --- the public entry points ---------------------------------------------------


def run_portal(async_fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Portal:
    return Portal._new(MODE_RUN, None, async_fn, args, kwargs, False)


def run_sync_portal(sync_fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Portal:
    return Portal._new(MODE_SYNC, None, sync_fn, args, kwargs, False)


def make_task_portal(coro: Coroutine[Any, Any, Any], started: bool) -> Portal:
    return Portal._new(MODE_TASK, coro, None, None, None, started)


def _usable_portal(current: greenlet.greenlet) -> Portal | None:
    """The portal that await_() would use in greenlet *current*: the active
    one, if its step runs for the current task (see _core._usable_portal)."""
    portal = _state.active
    if portal is None or current.gr_context is portal._step_ctx:
        return portal
    try:
        task_ctx = _tasks.current_task_context()
    except LookupError:  # an unknown asyncio C Task layout
        return portal
    except Exception as error:
        if not _raised_in(error, _tasks.current_task_context):
            raise  # by a signal handler, in this frame: not an answer
        return None
    return portal if task_ctx is portal._step_ctx else None


def _raised_in(error: BaseException, fn: Callable[..., Any]) -> bool:
    """Whether `error` came out of a call of the Python function `fn` made by
    the frame catching it, rather than from a signal handler that ran in that
    frame just after the call returned."""
    tb = error.__traceback__
    caller = tb.tb_next if tb is not None else None
    return caller is not None and caller.tb_frame.f_code is getattr(fn, "__code__", None)


def in_active_portal() -> bool:
    return _usable_portal(greenlet.getcurrent()) is not None


def await_(aw: Awaitable[T]) -> T:
    """Await *aw* from synchronous code, and return its result.

    greenback._portal gives this function greenback.await_'s full
    documentation.
    """
    try:
        current = greenlet.getcurrent()
        portal = _usable_portal(current)
        if portal is None:
            try:
                raise _tasks.no_portal_error_here(Portal)
            finally:
                del current
                if isinstance(aw, collections.abc.Coroutine):
                    aw.close()
        refusal = None
        if _state.collecting:
            refusal = IN_GC_ERROR
        elif not _descends_from(current, portal._worker):
            refusal = FOREIGN_GREENLET_ERROR
        del current
        if refusal is None and _state.depth >= _nesting_limit():
            refusal = STACK_EXHAUSTED_ERROR
        if refusal is not None:
            if isinstance(aw, collections.abc.Coroutine):
                aw.close()
            if refusal is STACK_EXHAUSTED_ERROR:
                raise RecursionError(refusal)
            raise RuntimeError(refusal)
    except BaseException as error:
        current = portal = None  # type: ignore[assignment]  # (see below)
        if _from_signal_handler(error) and isinstance(aw, collections.abc.Coroutine):
            aw.close()  # as a refusal does: no "never awaited" warning
        raise
    # This frame must hold neither the portal nor a greenlet whenever user
    # code runs or an exception may leave it: a traceback keeps the frame
    # alive, and a dropped task's portal must still be freed and finalized.
    del portal
    it: Any = None
    detached = False
    value: Any = None
    exc: BaseException | None = None
    depth = _state.depth = _state.depth + 1  # this await_'s level (restored below)
    try:
        it = _awaitable_iter(aw)
        while True:
            _state.depth = depth  # also after being resumed by a later step
            # Inlined (not _send_or_throw) so that an error from the awaited
            # code shows exactly one greenback frame: this one.
            try:
                if exc is None:
                    if value is None and not hasattr(it, "send"):
                        out = next(it)
                    else:
                        out = it.send(value)
                elif isinstance(exc, GeneratorExit):
                    if hasattr(it, "close"):
                        it.close()
                    raise exc
                elif hasattr(it, "throw"):
                    out = it.throw(exc)
                else:
                    raise exc
            except StopIteration as stop:
                result: T = stop.value
                return result
            except BaseException as error:
                value = exc = None
                if detached or not _interrupted(error, it):
                    raise
                # A signal handler's, just after `it` yielded: throw it in, as
                # if it had been raised where `it` is suspended.
                exc = error
                continue
            value = exc = None
            if detached:
                it.close()
                raise RuntimeError("greenback.await_() lost its portal")
            # Hand the trap to the step that resumed us, and wait to be resumed.
            # (No call among the stores: a signal handler may raise after one.)
            me = greenlet.getcurrent()
            portal = _state.active
            assert portal is not None
            portal._out_value, portal._out_kind = out, OUT_YIELD
            portal._resume, portal._awaiting = me, it
            outer = portal._outer
            del portal, out, me
            assert outer is not None
            try:
                outer.switch()
            except BaseException as thrown:
                # GreenletExit when this greenlet dies; or an exception from a
                # signal handler, raised just as a step of our portal resumed us,
                # which takes the place of what that step brought.
                exc = thrown
                portal = _state.active
                if portal is not None and portal._resume is greenlet.getcurrent():
                    if isinstance(portal._send_exc, GeneratorExit):  # close() wins
                        exc = portal._send_exc
                    portal._send_value = portal._send_exc = portal._awaiting = None
                else:
                    detached = True
                del portal
                continue
            finally:
                del outer
            portal = _state.active
            assert portal is not None
            value, exc = portal._send_value, portal._send_exc
            portal._send_value = portal._send_exc = portal._awaiting = None
            del portal
    except BaseException as escaping:
        target: Any = aw if it is None else it
        if _interrupted(escaping, target):
            # A signal handler's exception is leaving while `it` is
            # suspended, where it could not be thrown in: unwind `it` now, in
            # its task's step, not whenever it happens to be collected.
            try:
                target.close()
            except Exception:
                pass
        raise
    finally:
        _state.depth = depth - 1


# --- ensure_portal -------------------------------------------------------------


def portalize_running_task() -> Awaitable[None]:
    """ensure_portal()'s work: give the running task a portal unless it has
    one, and return the checkpoint to await next (see _core)."""
    if _usable_portal(greenlet.getcurrent()) is not None:
        return _tasks.checkpoint(_tasks.current_library())
    return _tasks.checkpoint(_install_portal_in_running_task())


def _install_portal_in_running_task() -> str:
    name = sniffio.thread_local.name
    if name is None:
        name = sniffio.current_async_library_cvar.get()
    if name is None:
        try:
            task = asyncio.current_task()
        except RuntimeError:
            task = None
        if task is not None:
            _install_in_asyncio_task(task)
            return "asyncio"
    library = _tasks.current_library()
    any_task = _tasks.current_task_of(library)
    if not _tasks.is_trio_task(any_task):
        _install_in_asyncio_task(cast("asyncio.Task[Any]", any_task))
        return library
    trio_task: Any = any_task
    coro = trio_task.coro
    if not (isinstance(coro, Portal) and coro.provides_portal):
        # The task is running, so no send is pending for the old coroutine.
        trio_task.coro = make_task_portal(coro, True)
    return library


def _install_in_asyncio_task(task: asyncio.Task[Any]) -> None:
    coro = task.get_coro()
    if isinstance(coro, Portal) and coro.provides_portal:
        return
    portal = make_task_portal(coro, True)  # type: ignore[arg-type]
    if isinstance(task, _tasks.C_TASK_TYPES):
        set_c_task_coro(task, coro, portal)
    else:
        task._coro = portal  # type: ignore[attr-defined]  # the pure-Python Task


# --- asyncio's C Task --------------------------------------------------------------
# Pure Python can only reach the field with ctypes. Which field it is, and
# whether it is safe to write, is decided once by greenback._task_layout
# (shared with the compiled core); nothing is written unless that positively
# identified the field.

_c_task_coro_offset: int | None = None


def _forget_c_task_coro_offset() -> None:
    """Look for the C Task's coroutine field again at the next swap (tests)."""
    global _c_task_coro_offset
    _c_task_coro_offset = None


def set_c_task_coro(task: object, old_coro: object, new_coro: object) -> None:
    """Replace the coroutine of an asyncio C Task: the field is identified
    once, and checked again before every write."""
    global _c_task_coro_offset
    import ctypes

    # Every call: the offset is only meaningful inside a C Task.
    if not _tasks.C_TASK_TYPES or not isinstance(task, _tasks.C_TASK_TYPES):
        raise TypeError(f"expected an _asyncio.Task, got {type(task).__name__}")
    offset = _c_task_coro_offset
    if offset is None:
        word = ctypes.sizeof(ctypes.c_void_p)
        size = _tasks.C_TASK_TYPES[0].__basicsize__
        raw = (ctypes.c_void_p * (size // word)).from_address(id(task))
        words = [value or 0 for value in raw]  # ctypes reads NULL as None
        offset = _task_layout.find_coro_offset(task, old_coro, words, word)
        # Whatever decided it, never touch memory outside the base struct.
        if offset < object.__basicsize__ or offset > size - word or offset % word:
            raise RuntimeError(
                task_layout_unknown_error(
                    f"the coroutine field was placed at byte {offset} of {size}"
                )
            )
        _c_task_coro_offset = offset
    slot = ctypes.c_void_p.from_address(id(task) + offset)
    if slot.value != id(old_coro):
        raise RuntimeError(TASK_LAYOUT_ERROR)
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(new_coro))
    slot.value = id(new_coro)
    ctypes.pythonapi.Py_DecRef(ctypes.py_object(old_coro))


def _is_awaitable(obj: object) -> bool:
    # What `await` accepts: an object with __await__, or a generator-based
    # coroutine (types.coroutine).
    if hasattr(type(obj), "__await__"):
        return True
    code = getattr(obj, "gi_code", None)
    return code is not None and bool(code.co_flags & inspect.CO_ITERABLE_COROUTINE)


class _ParentView:
    """What a worker greenlet's `parent` attribute returns: its real parent,
    except that switch(awaitable) called from inside the worker awaits it
    with await_() (the greenlet provider protocol; see greenback._worker).
    Every other use is passed on to the real parent."""

    __slots__ = ("_worker",)

    def __init__(self, worker: greenlet.greenlet) -> None:
        self._worker = worker

    def switch(self, *args: Any, **kwargs: Any) -> Any:
        if (
            len(args) == 1
            and not kwargs
            and greenlet.getcurrent() is self._worker
            and _is_awaitable(args[0])
        ):
            return await_(args[0])
        return self.real().switch(*args, **kwargs)

    def real(self) -> greenlet.greenlet:
        parent = real_parent(self._worker)
        if parent is None:
            raise ValueError("this greenlet has no parent")
        return parent

    def __bool__(self) -> bool:
        return True  # a worker is never a thread's main greenlet, the one without a parent

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)

    def __repr__(self) -> str:
        return f"<greenback worker's view of its parent {real_parent(self._worker)!r}>"


# Worker greenlets: greenlet providers whose awaits go through await_ (see
# greenback._worker).
_Worker = make_worker_class(_ParentView)
