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
from functools import partial
from types import CodeType, FrameType
from typing import Any, Awaitable, Callable, Coroutine, Generator, TypeVar, cast

import greenlet
import sniffio

from . import _tasks
from ._errors import (
    FOREIGN_GREENLET_ERROR,
    IN_GC_ERROR,
    ORPHANED_AWAIT_ERROR,
    STACK_EXHAUSTED_ERROR,
    TASK_LAYOUT_ERROR,
    exception_from_throw_args,
)
from ._worker import run_worker

T = TypeVar("T")

MODE_TASK, MODE_RUN, MODE_SYNC = 0, 1, 2
OUT_NONE, OUT_YIELD, OUT_RETURN, OUT_RAISE = 0, 1, 2, 3
MAX_PARKED_WORKERS = 64


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.active: Portal | None = None  # the portal whose step is running
        self.collecting = False  # inside a garbage collection (see _gc_phase)
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


def _reset_after_fork() -> None:
    """In a child forked from sync code under a portal: the parent's running
    step and idle workers are copies that must never run here (see _core)."""
    _state.active = None
    _state.collecting = False
    _state.depth = 0
    _state.parked = []  # forgotten, not ended: ending one would run it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _release_parked_workers() -> None:
    """At exit, end this thread's parked workers while greenlet still can."""
    _state.parked.clear()


atexit.register(_release_parked_workers)


def _gc_phase(phase: str, info: dict[str, int]) -> None:
    """gc.callbacks hook: track whether this thread is collecting."""
    _state.collecting = phase == "start"


gc.callbacks.append(_gc_phase)

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
    while _my_portal() is not None:
        _run_unit()
        portal = _my_portal()
        if portal is None:
            return
        outer = portal._outer
        del portal
        assert outer is not None
        outer.switch()


def _run_unit() -> None:
    """Start the function, or send/throw into the coroutine, then record
    what came out in the portal. Never raises."""
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
        if portal is not None:  # else killed while in user code
            portal._out_kind = OUT_RAISE
            portal._out_value = _without_own_frames(error)
        return
    portal = _my_portal()
    if portal is None:
        return
    portal._out_kind = OUT_RETURN if done else OUT_YIELD
    if not done:
        portal._resume = None  # back in the serve loop: idle
    portal._out_value = out


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
        self._send_exc = self._step_ctx = None
        self._out_kind = OUT_NONE
        return self

    # --- the step, on the event loop's side --------------------------------

    def _step(self, value: Any, exc: BaseException | None) -> tuple[bool, Any]:
        """Run one step: (False, trap) if the wrapped code yielded, (True,
        value) if it returned; its exceptions propagate."""
        if self._running:
            raise ValueError("coroutine already executing")
        if self._finished:
            raise RuntimeError("cannot reuse already awaited coroutine")
        if self._resume is not None and self._worker_token is not _state.token:
            # Suspended mid-step in a thread state that is gone (see _core):
            # switching back into it would crash, in greenlet.
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
        self._send_value, self._send_exc, self._out_kind = value, exc, OUT_NONE
        self._step_ctx = ctx
        previous, _state.active = _state.active, self
        self._running = True
        resume = self._resume
        assert resume is not None
        _state.depth = depth + 1
        try:
            resume.switch()
        finally:
            _state.depth = depth
            self._step_ctx = None
            self._running = False
            _state.active = previous
        if self._out_kind == OUT_YIELD:
            if self._resume is None:  # a native await: the worker is idle
                self._park(self._worker, self._last_ctx)
                self._worker = None
            out, self._out_value = self._out_value, None
            return False, out
        kind, out = self._out_kind, self._out_value
        self._out_value = None
        self._finish()
        if kind == OUT_RETURN:
            return True, out
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
            worker, held = greenlet.greenlet(_worker_entry), None
        self._worker = self._resume = worker
        self._worker_token = _state.token
        if held is not ctx:
            worker.gr_context = ctx
        self._last_ctx = ctx

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
        self._worker = self._resume = self._outer = self._last_ctx = None
        self._coro = self._awaiting = self._fn = self._args = self._kwargs = None
        self._send_value = self._send_exc = None

    def _finish(self) -> None:
        self._finished = True
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

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        done, out = self._step(value, None)
        if done:
            raise StopIteration(out)
        return out

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        done, out = self._step(None, exception_from_throw_args(typ, val, tb))
        if done:
            raise StopIteration(out)
        return out

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
            done, _ = self._step(None, GeneratorExit())
        except (GeneratorExit, StopIteration):
            return
        if not done:
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
        self._coro = self._last_ctx = None


def _greenlet_usable() -> bool:
    try:
        greenlet.getcurrent()
    except Exception:  # "greenlet is being finalized", at interpreter exit
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
    except Exception:
        return None
    return portal if task_ctx is portal._step_ctx else None


def in_active_portal() -> bool:
    return _usable_portal(greenlet.getcurrent()) is not None


def await_(aw: Awaitable[T]) -> T:
    """Run an awaitable from synchronous code and return its result."""
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
    # This frame must hold neither the portal nor a greenlet whenever user
    # code runs or an exception may leave it: a traceback keeps the frame
    # alive, and a dropped task's portal must still be freed and finalized.
    del portal
    it = _awaitable_iter(aw)
    # One level deeper until the `finally` below restores it.
    depth = _state.depth = _state.depth + 1
    detached = False
    value: Any = None
    exc: BaseException | None = None
    try:
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
            finally:
                value = exc = None
            if detached:
                it.close()
                raise RuntimeError("greenback.await_() lost its portal")
            # Hand the trap to the step that resumed us, and wait to be resumed.
            portal = _state.active
            assert portal is not None
            portal._out_value, portal._out_kind = out, OUT_YIELD
            portal._resume, portal._awaiting = greenlet.getcurrent(), it
            outer = portal._outer
            del portal, out
            assert outer is not None
            try:
                outer.switch()
            except BaseException as thrown:  # GreenletExit when this greenlet dies
                detached, exc = True, thrown
                continue
            finally:
                del outer
            portal = _state.active
            assert portal is not None
            value, exc = portal._send_value, portal._send_exc
            portal._send_value = portal._send_exc = portal._awaiting = None
            del portal
    finally:
        _state.depth = depth - 1


# --- ensure_portal -------------------------------------------------------------


def portalize_running_task() -> str:
    """ensure_portal()'s work before its checkpoint (see _core)."""
    if _usable_portal(greenlet.getcurrent()) is not None:
        return _tasks.current_library()
    return _install_portal_in_running_task()


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

_c_task_coro_offset: int | None = None

def set_c_task_coro(task: object, old_coro: object, new_coro: object) -> None:
    """Replace the coroutine of an asyncio C Task. Pure Python can only do
    this with ctypes: find the field once, check it before every write."""
    global _c_task_coro_offset
    import ctypes

    word = ctypes.sizeof(ctypes.c_void_p)
    if _c_task_coro_offset is None:
        try:
            from _asyncio import Task as CTask
        except ImportError:
            raise RuntimeError(TASK_LAYOUT_ERROR) from None
        if not isinstance(task, CTask):
            raise TypeError(f"expected an _asyncio.Task, got {type(task).__name__}")
        words = (ctypes.c_void_p * (CTask.__basicsize__ // word)).from_address(id(task))
        found = [i * word for i in range(2, len(words)) if words[i] == id(old_coro)]
        if len(found) != 1:
            raise RuntimeError(TASK_LAYOUT_ERROR)
        _c_task_coro_offset = found[0]
    slot = ctypes.c_void_p.from_address(id(task) + _c_task_coro_offset)
    if slot.value != id(old_coro):
        raise RuntimeError(TASK_LAYOUT_ERROR)
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(new_coro))
    slot.value = id(new_coro)
    ctypes.pythonapi.Py_DecRef(ctypes.py_object(old_coro))

