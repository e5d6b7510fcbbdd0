"""The adapters built on await_(): autoawait, decorate_as_sync, async_context
and async_iter, on asyncio and Trio. async_context and async_iter are checked
against what native `async with` / `async for` do in the running Python."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import types
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, TypeVar, cast

import pytest
import sniffio
import trio

import greenback

from conftest import Lib

T = TypeVar("T")


async def checkpoint() -> None:
    """A real trip through whichever event loop is running."""
    if sniffio.current_async_library() == "trio":
        await trio.lowlevel.checkpoint()
    else:
        await asyncio.sleep(0)


def run_sync_in_portal(lib: Lib, fn: Callable[[], T]) -> T:
    """Run the sync fn in a task of `lib`, where await_() works."""

    async def main() -> T:
        return await greenback.with_portal_run_sync(fn)

    return lib.run(main)


# --------------------------------------------------------------------------
# autoawait
# --------------------------------------------------------------------------


def test_autoawait_function(lib: Lib) -> None:
    @greenback.autoawait
    async def double(x: int, *, extra: int = 0) -> int:
        """Doubles x."""
        await checkpoint()
        return 2 * x + extra

    def sync_caller() -> int:
        return double(10) + double(1, extra=100)

    assert run_sync_in_portal(lib, sync_caller) == 20 + 102
    assert not inspect.iscoroutinefunction(double)


def test_autoawait_exception_propagates(lib: Lib) -> None:
    @greenback.autoawait
    async def fail() -> None:
        await checkpoint()
        raise LookupError("from the async side")

    def sync_caller() -> str:
        try:
            fail()
        except LookupError as exc:
            return str(exc)
        raise AssertionError("not raised")  # pragma: no cover

    assert run_sync_in_portal(lib, sync_caller) == "from the async side"


def test_autoawait_without_portal_raises(lib: Lib) -> None:
    ran = False

    @greenback.autoawait
    async def body() -> None:  # pragma: no cover - never runs
        nonlocal ran
        ran = True

    async def main() -> None:
        with pytest.raises(RuntimeError, match="portal"):
            body()

    lib.run(main)
    assert not ran


def test_autoawait_metadata() -> None:
    async def original(x: int) -> int:
        """The docstring."""
        return x

    wrapped = greenback.autoawait(original)
    assert wrapped.__name__ == "original"
    assert wrapped.__qualname__ == original.__qualname__
    assert wrapped.__doc__ == "The docstring."
    assert wrapped.__module__ == __name__
    assert wrapped.__wrapped__ is original  # type: ignore[attr-defined]
    assert inspect.unwrap(wrapped) is original
    assert inspect.signature(wrapped) == inspect.signature(original)


class Account:
    """Every method does its work in async code, yet is called like a plain
    method."""

    @greenback.autoawait
    async def __init__(  # type: ignore[misc]  # async, but made sync
        self, owner: str, balance: int = 0
    ) -> None:
        await checkpoint()
        self.owner = owner
        self._balance = balance
        self._items: list[int] = []

    @greenback.autoawait
    async def deposit(self, amount: int) -> int:
        await checkpoint()
        self._balance += amount
        self._items.append(amount)
        return self._balance

    @property
    @greenback.autoawait
    async def balance(self) -> int:
        await checkpoint()
        return self._balance

    @balance.setter
    @greenback.autoawait
    async def balance(self, value: int) -> None:
        await checkpoint()
        self._balance = value

    @greenback.autoawait
    async def __getitem__(self, index: int) -> int:
        await checkpoint()
        return self._items[index]

    @greenback.autoawait
    async def __len__(self) -> int:
        await checkpoint()
        return len(self._items)

    @greenback.autoawait
    async def __eq__(self, other: object) -> bool:
        await checkpoint()
        return isinstance(other, Account) and other._balance == self._balance

    __hash__ = None  # type: ignore[assignment]


def test_autoawait_methods_and_magic_methods(lib: Lib) -> None:
    def sync_code() -> None:
        account = Account("ann", balance=5)  # async __init__, from sync code
        assert isinstance(account, Account)
        assert account.owner == "ann"
        assert account.balance == 5
        assert account.deposit(10) == 15
        assert account.deposit(7) == 22
        account.balance = 100
        assert account.balance == 100
        assert len(account) == 2
        assert account[0] == 10 and account[-1] == 7
        with pytest.raises(IndexError):
            account[5]
        assert account == Account("bob", balance=100)
        assert account != Account("bob", balance=1)
        assert bool(account)  # through __len__

    run_sync_in_portal(lib, sync_code)


def test_autoawait_method_metadata() -> None:
    assert Account.deposit.__name__ == "deposit"
    assert Account.deposit.__qualname__ == "Account.deposit"
    assert inspect.iscoroutinefunction(Account.deposit.__wrapped__)  # type: ignore[attr-defined]
    assert Account.__init__.__name__ == "__init__"
    assert isinstance(Account.__dict__["balance"], property)


# --------------------------------------------------------------------------
# decorate_as_sync
# --------------------------------------------------------------------------


def test_decorate_as_sync_lru_cache(lib: Lib) -> None:
    calls: list[int] = []

    async def fetch(key: int) -> list[int]:
        """Expensive."""
        calls.append(key)
        await checkpoint()
        return [key, key]

    cached = greenback.decorate_as_sync(functools.lru_cache())(fetch)
    assert inspect.iscoroutinefunction(cached)
    assert cached.__name__ == "fetch"
    assert cached.__doc__ == "Expensive."
    assert inspect.unwrap(cached) is fetch

    async def main() -> None:
        # No portal beforehand: the decorated function brings its own.
        assert not greenback.has_portal()
        first = await cached(1)
        second = await cached(1)
        assert first == [1, 1]
        assert second is first
        assert calls == [1]
        assert await cached(2) == [2, 2]
        assert calls == [1, 2]
        assert await cached(1) is first
        assert calls == [1, 2]
        assert not greenback.has_portal()
        # And with a portal already there.
        await greenback.ensure_portal()
        assert await cached(3) == [3, 3]
        assert await cached(3) == [3, 3]
        assert calls == [1, 2, 3]

    lib.run(main)


def test_decorate_as_sync_result_is_awaitable(lib: Lib) -> None:
    async def add(a: int, b: int = 0) -> int:
        await checkpoint()
        return a + b

    def sync_decorator(fn: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> int:
            # A sync decorator that calls the function twice.
            return fn(*args, **kwargs) + fn(*args, **kwargs)

        return wrapper

    decorated = greenback.decorate_as_sync(sync_decorator)(add)

    async def main() -> None:
        pending = decorated(1, b=2)
        assert inspect.isawaitable(pending)
        assert await pending == 6

    lib.run(main)


def test_decorate_as_sync_exception_propagates(lib: Lib) -> None:
    async def fail(x: int) -> int:
        await checkpoint()
        raise ValueError(x)

    decorated = greenback.decorate_as_sync(functools.lru_cache())(fail)

    async def main() -> None:
        with pytest.raises(ValueError):
            await decorated(1)
        with pytest.raises(ValueError):
            await decorated(1)  # exceptions are not cached

    lib.run(main)


# --------------------------------------------------------------------------
# async_context: compared with native `async with`
# --------------------------------------------------------------------------


Outcome = tuple[Any, ...]


def describe(exc: BaseException | None) -> Outcome:
    if exc is None:
        return ("no exception",)
    context = exc.__context__
    return (
        type(exc),
        str(exc),
        type(context) if context is not None else None,
        str(context) if context is not None else None,
        exc.__suppress_context__,
    )


async def native_outcome(cm: Any, body: Callable[[Any], None]) -> Outcome:
    try:
        async with cm as value:
            body(value)
    except Exception as exc:
        return describe(exc)
    return describe(None)


def adapted_outcome(cm: Any, body: Callable[[Any], None]) -> Outcome:
    try:
        with greenback.async_context(cm) as value:
            body(value)
    except Exception as exc:
        return describe(exc)
    return describe(None)


def compare_with_native(
    lib: Lib, make: Callable[[list[str]], Any], body: Callable[[Any], None]
) -> tuple[Outcome, list[str]]:
    """Run the same scenario with `async with` and with async_context, on
    fresh objects, and check that both end the same way and make the same
    calls. Returns the outcome and the calls."""

    async def main() -> tuple[Outcome, list[str], Outcome, list[str]]:
        native_log: list[str] = []
        native = await native_outcome(make(native_log), body)
        adapted_log: list[str] = []
        adapted = await greenback.with_portal_run_sync(
            adapted_outcome, make(adapted_log), body
        )
        return native, native_log, adapted, adapted_log

    native, native_log, adapted, adapted_log = lib.run(main)
    assert adapted == native
    assert adapted_log == native_log
    return native, native_log


class _Base:
    def __init__(self, log: list[str]) -> None:
        self.log = log


class WithoutAenter(_Base):
    async def __aexit__(self, *exc_info: object) -> None:
        self.log.append("aexit")  # pragma: no cover


class WithoutAexit(_Base):
    async def __aenter__(self) -> str:
        self.log.append("aenter")  # pragma: no cover
        return "value"  # pragma: no cover


class WithNeither(_Base):
    pass


class RaisingAexit(_Base):
    async def __aenter__(self) -> str:
        await checkpoint()
        self.log.append("aenter")
        return "value"

    async def __aexit__(self, *exc_info: object) -> None:
        await checkpoint()
        self.log.append("aexit")
        raise RuntimeError("aexit failed")


class RaisingAenter(_Base):
    async def __aenter__(self) -> str:
        await checkpoint()
        self.log.append("aenter")
        raise OSError("aenter failed")

    async def __aexit__(self, *exc_info: object) -> None:
        self.log.append("aexit")  # pragma: no cover


class Suppressing(_Base):
    def __init__(self, log: list[str], answer: object) -> None:
        super().__init__(log)
        self.answer = answer

    async def __aenter__(self) -> Suppressing:
        await checkpoint()
        self.log.append("aenter")
        return self

    async def __aexit__(self, *exc_info: object) -> Any:
        await checkpoint()
        self.log.append("aexit")
        return self.answer


class Recording(_Base):
    def __init__(self, log: list[str]) -> None:
        super().__init__(log)
        self.exc_info: tuple[Any, ...] | None = None

    async def __aenter__(self) -> str:
        await checkpoint()
        self.log.append("aenter")
        return "entered value"

    async def __aexit__(self, *exc_info: Any) -> None:
        await checkpoint()
        self.log.append("aexit")
        self.exc_info = exc_info


class Shadowed(Recording):
    """Instance attributes named like the protocol methods: `async with`
    looks them up on the type and never uses these."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(log)

        async def fake_aenter() -> str:  # pragma: no cover
            log.append("instance aenter")
            return "instance value"

        async def fake_aexit(*exc_info: object) -> None:  # pragma: no cover
            log.append("instance aexit")
            raise AssertionError("an instance attribute was used")

        self.__aenter__ = fake_aenter  # type: ignore[method-assign]
        self.__aexit__ = fake_aexit  # type: ignore[method-assign]


class OnlyInstanceAttributes(_Base):
    def __init__(self, log: list[str]) -> None:
        super().__init__(log)

        async def fake(*args: object) -> None:  # pragma: no cover
            log.append("instance method")

        self.__aenter__ = fake
        self.__aexit__ = fake


def _body_ok(value: object) -> None:
    pass


def _body_raises(value: object) -> None:
    raise ValueError("from the body")


@pytest.mark.parametrize(
    "cls", [WithoutAenter, WithoutAexit, WithNeither, OnlyInstanceAttributes]
)
def test_async_context_missing_methods(lib: Lib, cls: Callable[[list[str]], Any]) -> None:
    body_ran: list[bool] = []
    outcome, log = compare_with_native(lib, cls, lambda value: body_ran.append(True))
    assert outcome[0] in (TypeError, AttributeError)
    assert log == []
    assert body_ran == []


@pytest.mark.parametrize("body", [_body_ok, _body_raises], ids=["ok", "raises"])
def test_async_context_aexit_raises(lib: Lib, body: Callable[[Any], None]) -> None:
    outcome, log = compare_with_native(lib, RaisingAexit, body)
    assert outcome[:2] == (RuntimeError, "aexit failed")
    if body is _body_raises:
        # The body's exception is the new one's context.
        assert outcome[2:4] == (ValueError, "from the body")
    assert log == ["aenter", "aexit"]


def test_async_context_aenter_raises(lib: Lib) -> None:
    body_ran: list[bool] = []
    outcome, log = compare_with_native(
        lib, RaisingAenter, lambda value: body_ran.append(True)
    )
    assert outcome[:2] == (OSError, "aenter failed")
    assert log == ["aenter"]
    assert body_ran == []


@pytest.mark.parametrize("answer", [True, 1, "yes", False, None, 0])
def test_async_context_aexit_suppresses(lib: Lib, answer: object) -> None:
    outcome, log = compare_with_native(
        lib, lambda log: Suppressing(log, answer), _body_raises
    )
    if answer:
        assert outcome == ("no exception",)
    else:
        assert outcome[:2] == (ValueError, "from the body")
    assert log == ["aenter", "aexit"]


def test_async_context_value_and_exc_info(lib: Lib) -> None:
    def scenario() -> None:
        # No exception: __aexit__(None, None, None).
        cm = Recording([])
        with greenback.async_context(cm) as value:
            assert value == "entered value"
            assert cm.log == ["aenter"]
        assert cm.log == ["aenter", "aexit"]
        assert cm.exc_info == (None, None, None)

        # An exception: __aexit__ gets the triple, and it propagates.
        cm = Recording([])
        error = KeyError("k")
        with pytest.raises(KeyError) as info:
            with greenback.async_context(cm):
                raise error
        assert info.value is error
        assert cm.exc_info is not None
        exc_type, exc_value, tb = cm.exc_info
        assert exc_type is KeyError
        assert exc_value is error
        assert isinstance(tb, types.TracebackType)
        assert tb is error.__traceback__ or tb.tb_next is not None

        # __aenter__'s own result is what gets bound, whatever it is.
        sup = Suppressing([], None)
        with greenback.async_context(sup) as bound:
            assert bound is sup

    run_sync_in_portal(lib, scenario)


def test_async_context_exc_info_matches_native(lib: Lib) -> None:
    async def main() -> None:
        native = Recording([])
        with contextlib.suppress(ValueError):
            async with native:
                raise ValueError("x")
        adapted = Recording([])

        def sync_side() -> None:
            with contextlib.suppress(ValueError):
                with greenback.async_context(adapted):
                    raise ValueError("x")

        await greenback.with_portal_run_sync(sync_side)
        assert native.exc_info is not None and adapted.exc_info is not None
        assert [type(x) for x in adapted.exc_info] == [type(x) for x in native.exc_info]
        assert adapted.exc_info[0] is native.exc_info[0] is ValueError
        assert str(adapted.exc_info[1]) == str(native.exc_info[1])

    lib.run(main)


@pytest.mark.parametrize("body", [_body_ok, _body_raises], ids=["ok", "raises"])
def test_async_context_ignores_instance_attributes(
    lib: Lib, body: Callable[[Any], None]
) -> None:
    outcome, log = compare_with_native(lib, Shadowed, body)
    assert log == ["aenter", "aexit"]
    if body is _body_raises:
        assert outcome[:2] == (ValueError, "from the body")
    else:
        assert outcome == ("no exception",)


def test_async_context_binds_aenter_value_like_native(lib: Lib) -> None:
    seen: list[object] = []
    outcome, log = compare_with_native(lib, Recording, seen.append)
    assert outcome == ("no exception",)
    assert seen == ["entered value", "entered value"]


# Special methods set to None (the data model's way of saying "not
# available") and an __aenter__ that is not a coroutine function: `async
# with` finds these methods and fails when calling or awaiting them.


class AenterIsNone(_Base):
    __aenter__ = None

    async def __aexit__(self, *exc_info: object) -> None:
        self.log.append("aexit")  # pragma: no cover


class AexitIsNone(_Base):
    async def __aenter__(self) -> str:
        self.log.append("aenter")
        return "value"

    __aexit__ = None


class AenterNotAwaitable(_Base):
    def __aenter__(self) -> int:
        self.log.append("aenter")
        return 1

    async def __aexit__(self, *exc_info: object) -> None:
        self.log.append("aexit")  # pragma: no cover


@pytest.mark.parametrize("cls", [AenterIsNone, AexitIsNone])
def test_async_context_method_set_to_none(
    lib: Lib, cls: Callable[[list[str]], Any]
) -> None:
    # Native: __aenter__ = None fails calling it ("'NoneType' object is not
    # callable"); __aexit__ = None lets __aenter__ and the body run, and
    # fails on the way out.
    outcome, _ = compare_with_native(lib, cls, _body_ok)
    assert outcome[0] is TypeError


def test_async_context_aenter_not_awaitable(lib: Lib) -> None:
    async def main() -> tuple[Outcome, list[str], Outcome, list[str]]:
        native_log: list[str] = []
        native = await native_outcome(AenterNotAwaitable(native_log), _body_ok)
        adapted_log: list[str] = []
        adapted = await greenback.with_portal_run_sync(
            adapted_outcome, AenterNotAwaitable(adapted_log), _body_ok
        )
        return native, native_log, adapted, adapted_log

    native, native_log, adapted, adapted_log = lib.run(main)
    # The same kind of failure at the same point; the wording differs, as
    # it comes from await_() rather than from the `async with` statement.
    assert native[0] is adapted[0] is TypeError
    assert native_log == adapted_log == ["aenter"]


def test_async_context_with_asynccontextmanager(lib: Lib) -> None:
    log: list[str] = []

    @contextlib.asynccontextmanager
    async def resource(name: str) -> AsyncIterator[str]:
        await checkpoint()
        log.append("open " + name)
        try:
            yield name.upper()
        except KeyError as exc:
            log.append(f"handled {exc.args[0]}")  # suppressed
        finally:
            await checkpoint()
            log.append("close " + name)

    def sync_code() -> None:
        with greenback.async_context(resource("a")) as value:
            assert value == "A"
            assert log == ["open a"]
        assert log == ["open a", "close a"]

        with greenback.async_context(resource("b")):
            raise KeyError("b")
        assert log[2:] == ["open b", "handled b", "close b"]

        with pytest.raises(ValueError, match="c"):
            with greenback.async_context(resource("c")):
                raise ValueError("c")
        assert log[5:] == ["open c", "close c"]

    run_sync_in_portal(lib, sync_code)


def test_async_context_cancellation_trio() -> None:
    """A Cancelled raised in the body reaches __aexit__, and the block exits
    cleanly through it."""
    log: list[str] = []

    @contextlib.asynccontextmanager
    async def resource() -> AsyncIterator[None]:
        try:
            yield
        finally:
            log.append("cleanup")

    def sync_code() -> None:
        with trio.CancelScope() as scope:
            with greenback.async_context(resource()):
                scope.cancel()
                greenback.await_(trio.sleep(1))
        assert scope.cancelled_caught

    async def main() -> None:
        await greenback.with_portal_run_sync(sync_code)

    trio.run(main)
    assert log == ["cleanup"]


# --------------------------------------------------------------------------
# async_iter: compared with native `async for`
# --------------------------------------------------------------------------


class Counter:
    """A plain async iterator (no asend/athrow/aclose)."""

    def __init__(self, stop: int, *stop_args: object) -> None:
        self.i = 0
        self.stop = stop
        self.stop_args = stop_args

    def __aiter__(self) -> Counter:
        return self

    async def __anext__(self) -> int:
        await checkpoint()
        if self.i >= self.stop:
            raise StopAsyncIteration(*self.stop_args)
        self.i += 1
        return self.i


class IterableOnly:
    """__aiter__ returns a separate iterator object."""

    def __aiter__(self) -> Counter:
        return Counter(2)


class NoAiter:
    async def __anext__(self) -> int:  # pragma: no cover
        return 1


class AiterWithoutAnext:
    def __aiter__(self) -> object:
        return object()


class InstanceAnext:
    """__anext__ only as an instance attribute: not an async iterator."""

    def __init__(self) -> None:
        async def anext() -> int:  # pragma: no cover
            return 1

        self.__anext__ = anext

    def __aiter__(self) -> InstanceAnext:
        return self


async def agen_numbers(n: int) -> AsyncGenerator[int, None]:
    for i in range(n):
        await checkpoint()
        yield i


def test_async_iter_values(lib: Lib) -> None:
    def sync_code() -> None:
        assert list(greenback.async_iter(Counter(3))) == [1, 2, 3]
        assert list(greenback.async_iter(IterableOnly())) == [1, 2]
        assert list(greenback.async_iter(agen_numbers(4))) == [0, 1, 2, 3]
        assert list(greenback.async_iter(Counter(0))) == []
        total = 0
        for x in greenback.async_iter(agen_numbers(5)):
            total += x
        assert total == 10
        # Partial consumption, then continue.
        it = greenback.async_iter(Counter(3))
        assert iter(it) is it
        assert next(it) == 1
        assert list(it) == [2, 3]
        with pytest.raises(StopIteration):
            next(it)

    run_sync_in_portal(lib, sync_code)


async def native_iter_error(obj: Any) -> type[BaseException] | None:
    try:
        async for _ in obj:
            pass  # pragma: no cover
    except Exception as exc:
        return type(exc)
    return None  # pragma: no cover


def adapted_iter_error(obj: Any) -> type[BaseException] | None:
    try:
        for _ in greenback.async_iter(obj):
            pass  # pragma: no cover
    except Exception as exc:
        return type(exc)
    return None  # pragma: no cover


@pytest.mark.parametrize(
    "make", [object, NoAiter, AiterWithoutAnext, InstanceAnext, lambda: 42]
)
def test_async_iter_errors_match_native(lib: Lib, make: Callable[[], Any]) -> None:
    async def main() -> tuple[Any, Any]:
        native = await native_iter_error(make())
        adapted = await greenback.with_portal_run_sync(adapted_iter_error, make())
        return native, adapted

    native, adapted = lib.run(main)
    assert native is TypeError
    assert adapted is native


def test_async_iter_errors_raised_when_wrapping() -> None:
    # Like `async for`, the iterator is obtained (and checked) up front,
    # before any element is requested; no portal is needed for that.
    with pytest.raises(TypeError):
        greenback.async_iter(NoAiter())  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        greenback.async_iter(AiterWithoutAnext())  # type: ignore[call-overload]


def test_async_iter_stop_async_iteration_args(lib: Lib) -> None:
    def sync_code() -> None:
        it = greenback.async_iter(Counter(1, "done", 2))
        assert next(it) == 1
        with pytest.raises(StopIteration) as info:
            next(it)
        assert info.value.args == ("done", 2)
        assert not isinstance(info.value, StopAsyncIteration)
        # ... so `yield from` sees the first arg as the return value.

        def delegate() -> Generator[int, None, object]:
            return (yield from cast(Any, greenback.async_iter(Counter(2, "result"))))

        gen = delegate()
        assert next(gen) == 1
        assert next(gen) == 2
        with pytest.raises(StopIteration) as info:
            next(gen)
        assert info.value.value == "result"

    run_sync_in_portal(lib, sync_code)


def test_async_iter_exception_from_anext_propagates(lib: Lib) -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        await checkpoint()
        raise ValueError("in the generator")

    def sync_code() -> None:
        got: list[int] = []
        with pytest.raises(ValueError, match="in the generator"):
            for x in greenback.async_iter(failing()):
                got.append(x)
        assert got == [1]

    run_sync_in_portal(lib, sync_code)


def test_async_iter_plain_iterator_has_no_generator_methods() -> None:
    it = greenback.async_iter(Counter(1))
    for name in ("send", "throw", "close"):
        assert not hasattr(it, name)
    it2 = greenback.async_iter(IterableOnly())
    for name in ("send", "throw", "close"):
        assert not hasattr(it2, name)


def test_async_iter_async_generator_has_generator_methods() -> None:
    agen = agen_numbers(1)
    it = greenback.async_iter(agen)
    for name in ("send", "throw", "close"):
        assert callable(getattr(it, name))
    assert isinstance(it, greenback.async_iter)
    # Close the never-started async generator without needing a loop.
    with pytest.raises(StopIteration):
        agen.aclose().send(None)


def test_async_iter_yield_from_forwards_send_throw_close(lib: Lib) -> None:
    log: list[object] = []

    async def agen() -> Any:
        try:
            await checkpoint()
            received = yield "first"
            log.append(("sent", received))
            try:
                received = yield "second"
            except KeyError as exc:
                log.append(("thrown", exc.args))
                await checkpoint()
                received = yield "after throw"
            log.append(("sent", received))
            yield "last"
            log.append("unreachable")  # pragma: no cover
        except GeneratorExit:
            log.append("GeneratorExit")
            raise
        finally:
            await checkpoint()
            log.append("finally")

    def as_sync_generator() -> Generator[Any, Any, Any]:
        return (yield from greenback.async_iter(agen()))

    def sync_code() -> None:
        gen = as_sync_generator()
        assert next(gen) == "first"
        assert gen.send("a") == "second"
        assert gen.throw(KeyError("k")) == "after throw"
        assert gen.send("b") == "last"
        gen.close()
        assert log == [
            ("sent", "a"),
            ("thrown", ("k",)),
            ("sent", "b"),
            "GeneratorExit",
            "finally",
        ]

    run_sync_in_portal(lib, sync_code)


def test_async_iter_throw_unhandled_and_send_to_end(lib: Lib) -> None:
    log: list[str] = []

    async def agen() -> Any:
        try:
            yield 1
            yield 2
        finally:
            log.append("finally")

    def sync_code() -> None:
        # An exception the generator doesn't handle comes back out.
        it = greenback.async_iter(agen())
        assert next(it) == 1
        with pytest.raises(ZeroDivisionError):
            it.throw(ZeroDivisionError("z"))
        assert log == ["finally"]

        # Sending past the end ends in StopIteration.
        log.clear()
        it = greenback.async_iter(agen())
        assert next(it) == 1
        assert it.send(None) == 2
        with pytest.raises(StopIteration):
            it.send(None)
        assert log == ["finally"]

        # Closing directly runs the finally block.
        log.clear()
        it = greenback.async_iter(agen())
        assert next(it) == 1
        it.close()
        assert log == ["finally"]

    run_sync_in_portal(lib, sync_code)
