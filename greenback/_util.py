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
    """Decorator for an async function which allows (and requires) it to be
    called from synchronous contexts without ``await``.

    The result is a plain function that runs *fn* through :func:`await_`, so
    it works wherever a sync callable is expected: methods, ``__init__``,
    property getters and setters, and other magic methods.
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
    """Apply the synchronous function decorator *decorator* to an async
    function.

    For example, ``@greenback.decorate_as_sync(functools.lru_cache())``
    caches the *results* of an async function, where plain ``lru_cache``
    would cache the coroutine objects. The async function is wrapped in a
    sync function that runs it through :func:`await_`; *decorator* is
    applied to that; and the result is wrapped in an async function that
    calls it inside :func:`with_portal_run_sync`. ``__wrapped__`` leads back
    through the decorated function to the original.
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
    """Wraps an async context manager so that it can be used in a synchronous
    ``with`` statement: ``with async_context(cm) as v:`` behaves like
    ``async with cm as v:``, as long as a portal exists up the call stack.
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
    """Wraps an async iterable so that it can be used in a synchronous ``for``
    loop, ``yield from``, or anything else that takes an iterator:
    ``for x in async_iter(ait):`` behaves like ``async for x in ait:``, as long
    as a portal exists up the call stack.

    If the async iterator is an async generator (it has ``asend``,
    ``athrow`` and ``aclose``), the wrapper also has ``send``, ``throw`` and
    ``close``, so ``yield from async_iter(agen)`` forwards all three.
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
