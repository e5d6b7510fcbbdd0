"""Adapters built on impl.await_(): async functions, context managers and iterators
used from synchronous code, and sync-only decorators applied to async code."""

from __future__ import annotations

import sys
from contextlib import AbstractAsyncContextManager
from functools import wraps
from types import TracebackType
from typing import (
    Any,
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generic,
    Iterator,
    ParamSpec,
    Protocol,
    TypeVar,
    cast,
    overload,
)

from ._select import impl
from ._portal import with_portal_run_sync

T = TypeVar("T")
R = TypeVar("R")
S = TypeVar("S")
P = ParamSpec("P")
Q = ParamSpec("Q")


def autoawait(fn: Callable[P, Awaitable[T]]) -> Callable[P, T]:
    """Turn an async function into a synchronous one that runs it with :func:`await_`.

    Calling the result with some arguments calls *fn* with them, drives the
    awaitable it returns to completion with :func:`await_`, and returns its
    result or raises its exception. This puts async code where Python expects
    a synchronous callable: methods called without ``await``, ``__init__``,
    property getters and setters, ``__getitem__``, ``__eq__`` and other magic
    methods, callbacks of synchronous libraries. The result keeps the name,
    docstring and signature of *fn* (``functools.wraps``), and ``__wrapped__``
    refers to *fn*.

    The result must be called where :func:`await_` works, that is below a task
    that has a portal. It cannot be awaited: it returns the final value, not
    an awaitable, so async code that has no portal should await *fn* itself.

    Checkpoints: those of the awaited call, as for :func:`await_`; the same on
    asyncio and Trio.

    :param fn: an async function, or any callable that returns an awaitable.
    :returns: a synchronous function with the parameters of *fn* that returns
        what awaiting *fn* produces.
    :raises RuntimeError: not from ``autoawait`` itself, but from the function
        it returns, when that is called in a task without a portal. That
        function also raises whatever :func:`await_` raises, and whatever
        *fn* raises.

    Example: an async property.

    >>> class Account:
    ...     def __init__(self, balance):
    ...         self._balance = balance
    ...     @property
    ...     @greenback.autoawait
    ...     async def balance(self):
    ...         await asyncio.sleep(0)  # stands for a database query
    ...         return self._balance
    >>> async def main():
    ...     await greenback.ensure_portal()
    ...     return Account(10).balance
    >>> asyncio.run(main())
    10
    """

    @wraps(fn)
    def call_and_await(*args: P.args, **kwargs: P.kwargs) -> T:
        return impl.await_(fn(*args, **kwargs))

    return call_and_await


class _SignaturePreserving(Protocol):
    def __call__(self, fn: Callable[Q, R], /) -> Callable[Q, R]: ...


class _AsyncSignaturePreserving(Protocol):
    def __call__(
        self, fn: Callable[Q, Awaitable[R]], /
    ) -> Callable[Q, Coroutine[Any, Any, R]]: ...


# A decorator that keeps the signature (typed with ParamSpec) gives back an
# async function with the original signature. Any other decorator is typed by
# what it returns: functools.lru_cache() gives (*Hashable, **Hashable) -> T.
# (Decorators typed `(f: F) -> F` with F bound to Callable[..., Any] come out
# as Any: mypy cannot pick between these overloads for them.)
@overload
def decorate_as_sync(decorator: _SignaturePreserving) -> _AsyncSignaturePreserving: ...
@overload
def decorate_as_sync(
    decorator: Callable[[Callable[..., T]], Callable[P, R]],
) -> Callable[[Callable[..., Awaitable[T]]], Callable[P, Coroutine[Any, Any, R]]]: ...
def decorate_as_sync(decorator: Callable[..., Any]) -> Callable[..., Any]:
    """Make a decorator for synchronous functions usable on async functions.

    A decorator like ``functools.lru_cache()`` acts around each call of the
    function it wraps. Put directly on an async function, it sees calls that
    return coroutine objects, and would cache those rather than results.
    ``decorate_as_sync(decorator)`` returns a decorator for async functions
    that works in three layers: a synchronous function that runs the async
    one through :func:`await_`; *decorator* applied to that synchronous
    function; and, outermost, a new async function that calls the decorated
    one through :func:`with_portal_run_sync`. Awaiting
    ``decorate_as_sync(decorator)(async_fn)(*args)`` therefore does what
    awaiting ``with_portal_run_sync(decorator(autoawait(async_fn)), *args)``
    does.

    The decorated function is an async function
    (``inspect.iscoroutinefunction`` is true for it) that needs no portal
    from its caller, since :func:`with_portal_run_sync` provides one when
    the task has none. ``functools.wraps`` keeps the original's name and
    docstring, and ``inspect.unwrap`` leads back to the original when
    *decorator* sets ``__wrapped__`` too (as ``functools.wraps`` and
    ``lru_cache`` do). It suits decorators that call the wrapped function
    during the call, in the same thread (caches, retries, logging, timing);
    a decorator that calls it from another thread, such as one that uses a
    thread pool, reaches :func:`await_` where no task runs, and that fails.

    Checkpoints: none of its own, on asyncio or Trio. When *decorator* does not
    call the function at all (a cache hit), awaiting the decorated function
    neither yields to the event loop nor delivers a pending cancellation.

    :param decorator: a decorator for synchronous functions: a callable that
        takes a function and returns a callable.
    :returns: a decorator that takes an async function and returns an async
        function.

    Errors from *decorator* itself propagate when the decorator is applied;
    errors from the original function propagate from the ``await``.

    Example: a cache that stores results, not coroutine objects.

    >>> calls = []
    >>> @greenback.decorate_as_sync(functools.lru_cache())
    ... async def square(n):
    ...     calls.append(n)
    ...     await asyncio.sleep(0)
    ...     return n * n
    >>> async def main():
    ...     return [await square(3), await square(3)]
    >>> asyncio.run(main())
    [9, 9]
    >>> calls  # the second call came from the cache
    [3]
    """

    def decorate(async_fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        @wraps(async_fn)
        def run_sync(*args: Any, **kwargs: Any) -> Any:
            return impl.await_(async_fn(*args, **kwargs))

        decorated = decorator(run_sync)

        @wraps(decorated)
        async def run_decorated(*args: Any, **kwargs: Any) -> Any:
            return await with_portal_run_sync(decorated, *args, **kwargs)

        return run_decorated

    return decorate


_MISSING: Any = object()


def _lookup_special(obj: object, name: str) -> Any:
    """Find a special method the way the interpreter does: on the type (not
    the instance), bound through the descriptor protocol. A method set to
    None is found (and fails when called), not missing."""
    cls = type(obj)
    for klass in cls.__mro__:
        if name in vars(klass):
            attr = vars(klass)[name]
            bind = getattr(type(attr), "__get__", None)
            return attr if bind is None else bind(attr, obj, cls)
    return _MISSING


def _aenter_error(cm: object, missing: str) -> Exception:
    """The error that ``async with cm`` raises when *missing* is not defined,
    in this Python version's words."""
    name = type(cm).__name__
    if sys.version_info < (3, 11):
        return AttributeError(missing)
    else:
        protocol = "object does not support the asynchronous context manager protocol"
        if missing == "__aexit__":
            return TypeError(f"'{name}' {protocol} (missed __aexit__ method)")
        return TypeError(f"'{name}' {protocol}")


class async_context(Generic[T]):
    """Use an async context manager as the target of a plain ``with`` statement.

    ``with greenback.async_context(cm) as value:`` does what
    ``async with cm as value:`` does: ``__aenter__`` and ``__aexit__`` are
    looked up on the type of *cm*, not on the instance, just as
    ``async with`` looks them up, both before either is called; each is
    awaited through :func:`await_`; ``value`` is what ``__aenter__``
    produced; an exception from the body is passed to ``__aexit__``, which
    suppresses it by returning a true value. So the ``with`` statement must
    run where :func:`await_` works, below a task with a portal. Creating
    the wrapper needs no portal.

    Checkpoints: those of ``__aenter__`` and ``__aexit__``, as with
    ``async with``; the same on asyncio and Trio.

    :param cm: the async context manager to enter.
    :returns: a context manager whose ``__enter__`` returns what
        ``cm.__aenter__()`` produces.
    :raises TypeError: when the ``with`` statement starts, if the type of *cm*
        lacks ``__aenter__`` or ``__aexit__`` (:exc:`AttributeError` on
        Python 3.10, as ``async with`` raises there).
    :raises RuntimeError: when the ``with`` statement starts, in a task
        without a portal; more generally, whatever :func:`await_` raises.

    Exceptions from ``__aenter__`` and ``__aexit__`` propagate as they would
    from ``async with``.

    Example:

    >>> log = []
    >>> class Connection:
    ...     async def __aenter__(self):
    ...         await trio.sleep(0)
    ...         return "connection"
    ...     async def __aexit__(self, *exc_info):
    ...         log.append("closed")
    >>> def sync_query():
    ...     with greenback.async_context(Connection()) as conn:
    ...         return f"query over {conn}"
    >>> trio.run(greenback.with_portal_run_sync, sync_query), log
    ('query over connection', ['closed'])
    """

    __slots__ = ("_cm", "_aexit")

    def __init__(self, cm: AbstractAsyncContextManager[T]) -> None:
        self._cm = cm

    def __enter__(self) -> T:
        # Like `async with`: both methods are looked up, on the type only,
        # before either is called.
        aenter = _lookup_special(self._cm, "__aenter__")
        self._aexit = _lookup_special(self._cm, "__aexit__")
        if aenter is _MISSING:
            raise _aenter_error(self._cm, "__aenter__")
        if self._aexit is _MISSING:
            raise _aenter_error(self._cm, "__aexit__")
        return cast(T, impl.await_(aenter()))

    def __exit__(self, *exc_info: Any) -> bool:
        # True when the async context manager suppressed the exception.
        return bool(impl.await_(self._aexit(*exc_info)))


class async_iter(Generic[T]):
    """Use an async iterable where a synchronous iterator is expected.

    ``for item in greenback.async_iter(aiterable):`` does what
    ``async for item in aiterable:`` does, and the wrapper serves just as well
    for ``list()``, comprehensions, ``sum()`` or ``yield from``. Each item is
    fetched by awaiting the iterator's ``__anext__`` through :func:`await_`;
    the end (``StopAsyncIteration``) becomes :exc:`StopIteration` with the
    same arguments. As with ``async for``, the async iterator is obtained from
    ``__aiter__``, and checked, when the wrapper is created, which needs no
    portal; fetching items needs a portal up the call stack.

    If the async iterator is an async generator, or anything else with
    ``asend``, ``athrow`` and ``aclose``, the wrapper also has ``send``,
    ``throw`` and ``close``, which forward to them. A synchronous generator
    that delegates with ``yield from async_iter(agen)`` then passes on the
    values sent to it, the exceptions thrown into it and its closing.

    Checkpoints: those of the awaited ``__anext__`` (or ``asend``, ``athrow``,
    ``aclose``) calls, as with ``async for``; the same on asyncio and Trio.

    :param iterable: the async iterable to wrap.
    :returns: a synchronous iterator over the same items; an instance of
        :class:`async_iter` in either case, with ``send``, ``throw`` and
        ``close`` over an async generator.
    :raises TypeError: on creation, if *iterable* has no ``__aiter__``, or if
        what its ``__aiter__`` returns has no ``__anext__``.
    :raises RuntimeError: when an item is fetched in a task without a portal;
        more generally, whatever :func:`await_` raises.

    Exceptions from the async iterator propagate from the call that fetches
    the item.

    Example:

    >>> async def countdown(n):
    ...     while n:
    ...         await trio.sleep(0)
    ...         yield n
    ...         n -= 1
    >>> def sync_consumer():
    ...     return [n * 10 for n in greenback.async_iter(countdown(3))]
    >>> trio.run(greenback.with_portal_run_sync, sync_consumer)
    [30, 20, 10]
    """

    __slots__ = ("_it",)
    _it: AsyncIterator[Any]

    @overload
    def __new__(cls, iterable: AsyncGenerator[T, S]) -> async_generator[T, S]: ...
    @overload
    def __new__(cls, iterable: AsyncIterable[T]) -> async_iter[T]: ...
    def __new__(cls, iterable: AsyncIterable[T]) -> async_iter[T]:
        aiter = _lookup_special(iterable, "__aiter__")
        if aiter is _MISSING:
            raise TypeError(
                "'async_iter' requires an object with __aiter__ method, got "
                f"{type(iterable).__name__}"
            )
        iterator = aiter()
        if _lookup_special(iterator, "__anext__") is _MISSING:
            raise TypeError(
                "'async_iter' received an object from __aiter__ that does not "
                f"implement __anext__: {type(iterator).__name__}"
            )
        is_generator = all(
            hasattr(iterator, name) for name in ("asend", "athrow", "aclose")
        )
        self = object.__new__(async_generator if is_generator else async_iter)
        self._it = iterator
        return self

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        try:
            return cast(T, impl.await_(_lookup_special(self._it, "__anext__")()))
        except StopAsyncIteration as exc:
            raise StopIteration(*exc.args) from None


class async_generator(async_iter[T], Generic[T, S]):
    """:class:`async_iter` over an async generator: also forwards ``send``,
    ``throw`` and ``close``."""

    __slots__ = ()

    def _agen(self) -> AsyncGenerator[T, S]:
        return cast("AsyncGenerator[T, S]", self._it)

    def send(self, value: S, /) -> T:
        try:
            return impl.await_(self._agen().asend(value))
        except StopAsyncIteration as exc:
            raise StopIteration(*exc.args) from None

    @overload
    def throw(
        self, typ: BaseException, val: None = None, tb: TracebackType | None = None, /
    ) -> T: ...
    @overload
    def throw(
        self,
        typ: type[BaseException],
        val: BaseException | object = None,
        tb: TracebackType | None = None,
        /,
    ) -> T: ...
    def throw(self, *exc_info: Any) -> T:
        try:
            return impl.await_(self._agen().athrow(*exc_info))
        except StopAsyncIteration as exc:
            raise StopIteration(*exc.args) from None

    def close(self) -> None:
        impl.await_(self._agen().aclose())
