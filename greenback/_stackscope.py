"""Glue for stackscope (https://github.com/oremanj/stackscope), so that its
stack extraction sees through greenback's portals.

stackscope finds this through ``greenback._stackscope_install_glue_``, which
it calls on its first stack extraction after greenback is imported. Nothing
here imports stackscope until then.

stackscope also ships "builtin" glue written for upstream greenback's
internals. When greenback is imported before stackscope, that glue runs as
stackscope is imported, and reads ``greenback._impl._greenback_shim``,
``greenback._impl.trampoline`` (optional), ``greenback.await_`` and
``greenback.async_context``. :data:`compat_impl` is what ``greenback._impl``
must be for it to run cleanly; :func:`install_glue` then replaces what it
registered for ``await_`` (it runs after it, as stackscope calls module glue
at the first extraction).

What a portal looks like to stackscope
--------------------------------------
A portal (a task's coroutine, or what ``with_portal_run*()`` awaits) is in
one of three states:

* suspended at a native ``await`` in the wrapped coroutine: the coroutine's
  own frames and awaits, as if there were no portal;
* suspended in ``await_()``: the wrapped coroutine (if any) and the sync code
  below it are frames of a suspended greenlet (``Portal.await_greenlet``),
  and what ``await_()`` awaits is ``Portal.cr_await``;
* running: its frames are on a live stack, from ``Portal.cr_frame`` on.

greenback's own frames (the worker greenlet's bottom frames, ``await_()``,
``with_portal_run*()``, the adapters in _util) are hidden. stackscope 0.2.2
has no asyncio glue, so this also unwraps an asyncio task to its coroutine,
unless something else already knows how.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from types import CodeType, CoroutineType, FrameType, GeneratorType
from typing import TYPE_CHECKING, Any, Callable, Iterable

from . import _select

if TYPE_CHECKING:
    import greenlet
    from stackscope import Frame

__all__ = ["compat_impl", "install_glue"]


class _CompatImpl:
    """What ``greenback._impl`` is: upstream's private module held the shim
    whose code stackscope's builtin glue registers a hook for. Nothing else
    of upstream's internals is here (no ``trampoline`` either, which that
    glue checks for)."""

    __slots__ = ()

    @staticmethod
    def _greenback_shim(*args: object) -> None:  # pragma: no cover - never called
        """Stands in for upstream greenback's portal shim. It never runs, so
        the hook registered for it never fires."""
        raise RuntimeError("greenback._impl._greenback_shim is a stand-in for stackscope")

    def __repr__(self) -> str:
        return "<greenback._impl: a stand-in for stackscope's glue>"


compat_impl = _CompatImpl()


# --- how to find greenback's own code ------------------------------------------

# Bound on greenlets and frames walked, against a cycle that should not exist.
_WALK_LIMIT = 100_000


def _code_of(obj: object, *nested: str) -> CodeType | None:
    from stackscope.lowlevel import get_code

    try:
        return get_code(obj, *nested)
    except (TypeError, ValueError):
        # Compiled (a Cython function has no Python code object) or renamed.
        return None


def _loaded(name: str) -> Any:
    """The module *name* if something has imported it already: importing
    greenback._purepy ourselves would register its gc and atexit hooks."""
    return sys.modules.get(name)


def _await_codes() -> list[CodeType]:
    """The code of every await_() that has a Python frame: the compiled
    core's Python wrapper, or the pure twin's await_()."""
    # The same function may be reached by several names; registering its
    # code twice is harmless.
    return [
        code
        for module_name in ("greenback", "greenback._portal", "greenback._purepy")
        for code in _codes(module_name, ["await_"])
    ]


def _codes(module_name: str, targets: Iterable[str]) -> list[CodeType]:
    """The code objects of *targets* in the module *module_name*, if it is
    loaded. A target is ``"attr.attr"``, optionally followed by ``":"`` and
    the names of functions nested in it. Missing ones are skipped: a hook
    that cannot be registered must not make the whole glue fail."""
    module = _loaded(module_name)
    codes: list[CodeType] = []
    if module is None:
        return codes
    for target in targets:
        path, _, nested = target.partition(":")
        obj: object = module
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        code = _code_of(obj, *nested.split(":")) if nested else _code_of(obj)
        if code is not None:
            codes.append(code)
    return codes


def _plumbing_codes() -> list[CodeType]:
    """Code that runs in a worker greenlet outside of user code: the bottom
    of every worker's stack, below the wrapped coroutine or sync function."""
    return _codes("greenback._worker", ["run_worker"]) + _codes(
        "greenback._purepy", ["_serve_portals", "_run_unit", "_send_or_throw"]
    )


def _facade_codes() -> list[CodeType]:
    """greenback's frames that sit between user frames: with_portal_run*,
    the adapters that call await_() for the user, and the pure twin's
    portal methods (the compiled ones have no Python frames)."""
    return (
        _codes("greenback._portal", ["with_portal_run", "with_portal_run_sync"])
        + _codes("greenback._tree", ["with_portal_run_tree"])
        + _codes("greenback._tasks", ["_asyncio_checkpoint"])
        + _codes(
            "greenback._util",
            [
                "autoawait:call_and_await",
                "decorate_as_sync:decorate:run_sync",
                "decorate_as_sync:decorate:run_decorated",
                "async_context.__enter__",
                "async_context.__exit__",
                "async_iter.__next__",
                "async_generator.send",
                "async_generator.throw",
                "async_generator.close",
            ],
        )
        + _codes(
            "greenback._purepy",
            ["Portal.send", "Portal.throw", "Portal.__next__", "Portal.close", "Portal._step"],
        )
    )


def _portal_types() -> list[type]:
    types_: list[type] = [_select.impl.Portal]
    for name in ("greenback._core", "greenback._purepy"):
        module = _loaded(name)
        if module is not None and module.Portal not in types_:
            types_.append(module.Portal)
    return types_


# --- unwrapping a portal ---------------------------------------------------------


def _wrapped_coroutine(portal: Any, frame: FrameType) -> Any:
    """The native coroutine (or generator) whose frame is *frame*, found
    among what *portal* refers to, or None. It is the frame's origin, through
    which stackscope can read a suspended coroutine's context managers (the
    Portal API does not expose it)."""
    for referent in gc.get_referents(portal):
        # The pure twin's fields may sit in an instance dict.
        candidates: Iterable[object] = (
            referent.values() if isinstance(referent, dict) else (referent,)
        )
        for obj in candidates:
            if isinstance(obj, CoroutineType) and obj.cr_frame is frame:
                return obj
            if isinstance(obj, GeneratorType) and obj.gi_frame is frame:
                return obj
    return None


def _greenlet_frames(
    glet: greenlet.greenlet, target: FrameType | None, plumbing: frozenset[CodeType]
) -> list[FrameType]:
    """The frames of the suspended greenlet *glet*, outermost first, from
    *target* (or, if it is None, from the first frame that is not greenback's
    worker plumbing) to the innermost one.

    An await_() may be suspended in a greenlet that the user's sync code
    started inside the worker; the frames continue in its parent at the
    switch() into it, as an exception would travel."""
    chain: list[FrameType] = []  # innermost first
    current: greenlet.greenlet | None = glet
    steps = 0
    while current is not None and steps < _WALK_LIMIT:
        frame = current.gr_frame
        reached_worker_base = False
        while frame is not None and steps < _WALK_LIMIT:
            steps += 1
            chain.append(frame)
            if frame is target:
                break
            reached_worker_base = frame.f_code in plumbing
            frame = frame.f_back
        if frame is not None:
            break  # found target
        if reached_worker_base:
            break  # the bottom of the worker: nothing of this portal's above it
        current = current.parent
    chain.reverse()
    if target is not None and target in chain:
        return chain[chain.index(target) :]
    start = 0
    while start < len(chain) and chain[start].f_code in plumbing:
        start += 1
    return chain[start:]


class _Unwrapper:
    """The unwrap_stackitem hook for portals."""

    def __init__(self, plumbing: Iterable[CodeType]) -> None:
        self.plumbing = frozenset(plumbing)

    def __call__(self, portal: Any) -> Any:
        from stackscope import Frame, StackSlice

        frame: FrameType | None = portal.cr_frame
        glet: greenlet.greenlet | None = portal.await_greenlet
        if glet is not None:
            # Suspended in await_(): the wrapped coroutine and the sync code
            # below it are on the greenlet's stack (the coroutine object says
            # it is running, and has no cr_await). Then comes what await_()
            # awaits, a suspended coroutine or other awaitable.
            items: list[object] = []
            for pyframe in _greenlet_frames(glet, frame, self.plumbing):
                origin = _wrapped_coroutine(portal, pyframe) if pyframe is frame else None
                items.append(Frame(pyframe=pyframe, origin=origin))
            awaited = portal.cr_await
            if awaited is not None:
                items.append(awaited)
            return items
        if frame is None:
            # Not started, finished, or a with_portal_run_sync() portal that
            # is not in await_(): nothing to show but the portal itself.
            return None
        if portal.cr_running:
            # A step is running: the frames are on a live stack, which
            # stackscope follows across greenlets from the wrapped frame.
            return StackSlice(outer=frame)
        # Suspended at a native await: what the coroutine itself shows.
        coro = _wrapped_coroutine(portal, frame)
        if coro is not None:
            return coro
        return (frame, portal.cr_await)


def _elaborate_await(frame: Frame, next_inner: object) -> object:
    """The elaborate_frame hook for await_(): hide it. If the stack ends at
    it (a greenlet extracted on its own), go on into what it awaits."""
    frame.hide = True
    if next_inner is None:
        local_vars = frame.pyframe.f_locals
        # The pure twin holds the iterator it drives; the compiled core's
        # wrapper holds the awaitable it was given.
        for name in ("it", "aw"):
            if local_vars.get(name) is not None:
                return local_vars[name]
    return None


# --- asyncio tasks -----------------------------------------------------------------


def _asyncio_task_types() -> list[type]:
    types_: list[type] = [asyncio.Task]
    py_task = getattr(asyncio.tasks, "_PyTask", None)
    if isinstance(py_task, type) and py_task not in types_:
        types_.append(py_task)
    return types_


def _task_unwrapper(previous: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def unwrap_asyncio_task(task: Any) -> Any:
        # stackscope 0.2.2 has no asyncio glue: an asyncio task would be a
        # leaf. Keep any handler that someone registered, else show the
        # task's coroutine (a portal, once the task has one).
        found = previous(task)
        if found is not None:
            return found
        return task.get_coro()

    unwrap_asyncio_task.greenback_glue = True  # type: ignore[attr-defined]
    return unwrap_asyncio_task


# --- installation ------------------------------------------------------------------


def install_glue() -> None:
    """Teach stackscope about greenback's portals. stackscope calls this (as
    ``greenback._stackscope_install_glue_``) at most once, on its first stack
    extraction after greenback is imported; calling it again is harmless."""
    import stackscope
    from stackscope import customize, elaborate_frame, unwrap_context, unwrap_stackitem

    from ._util import async_context

    unwrap_portal = _Unwrapper(_plumbing_codes())
    for portal_type in _portal_types():
        unwrap_stackitem.register(portal_type, unwrap_portal)

    for task_type in _asyncio_task_types():
        previous = unwrap_stackitem.dispatch(task_type)
        if not getattr(previous, "greenback_glue", False):  # not installed twice
            unwrap_stackitem.register(task_type, _task_unwrapper(previous))

    # Registered by code object: this replaces the hook that stackscope's
    # builtin glue put on the same await_ when it ran first.
    for code in _await_codes():
        elaborate_frame.register(code, func=_elaborate_await)
    for code in _plumbing_codes() + _facade_codes():
        customize(code, hide=True)

    @unwrap_context.register(async_context)
    def unwrap_async_context(manager: Any, context: stackscope.Context) -> Any:
        # Show the async context manager that it enters through await_().
        return manager._cm
