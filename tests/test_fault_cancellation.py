"""Faults delivered into code that runs through greenback: cancellation at
every yield point of random programs (checked against the same program
written with native awaits), errors thrown into a task blocked in await_(),
and GeneratorExit from closing a coroutine suspended inside await_()."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import random
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, AsyncGenerator, Callable, Coroutine, Generator, Iterator, Union

import greenlet
import outcome
import pytest
import trio
import trio.testing

import greenback

from conftest import Lib

ASYNCIO = Lib("asyncio", "asyncio")
TRIO = Lib("trio", "trio")

# --------------------------------------------------------------------------
# Random programs
# --------------------------------------------------------------------------
#
# A program is a tree of the nodes below. The oracle runs every node with
# native awaits. Under greenback, a node runs in one of two contexts: async
# (a coroutine, using `await`, `async with`, `async for`) or sync (a plain
# function, using await_(), async_context() and async_iter()); ToSync and
# ToAsync switch between them through with_portal_run_sync(),
# with_portal_run() and await_(). Every yield point of a program is one call
# of Runner.cp(), which logs it and can deliver a cancellation there.


@dataclass(frozen=True)
class CP:
    """One checkpoint: `await cp()`, or `await_(cp())` in sync code."""


@dataclass(frozen=True)
class Seq:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Fin:
    """try: body finally: log (and a checkpoint if cp_after)."""

    ident: int
    body: Node
    cp_after: bool


@dataclass(frozen=True)
class Catch:
    """try: body except BaseException: log, re-raise."""

    ident: int
    body: Node


@dataclass(frozen=True)
class ToSync:
    """Run body as sync code (with_portal_run_sync)."""

    body: Node


@dataclass(frozen=True)
class ToAsync:
    """Run body as a coroutine (with_portal_run, or await_ from sync code)."""

    body: Node


@dataclass(frozen=True)
class CM:
    """An async context manager whose enter and exit each checkpoint."""

    ident: int
    body: Node


@dataclass(frozen=True)
class Iter:
    """Loop over n items of an async generator (closed with aclosing) or of
    a class-based async iterator, running body for each item."""

    ident: int
    n: int
    body: Node
    gen: bool
    cp_after: bool  # the generator's finally block checkpoints too


@dataclass(frozen=True)
class Absorb:
    """Catch the cancellation here and go on: a Trio cancel scope (the
    innermost one is the one cancelled), or `except CancelledError` plus
    uncancel() for asyncio task.cancel(). Under timeouts: just the body."""

    ident: int
    body: Node


Node = Union[CP, Seq, Fin, Catch, ToSync, ToAsync, CM, Iter, Absorb]


def count_cps(node: Node) -> int:
    """How many checkpoints the program passes when nothing cancels it."""
    if isinstance(node, CP):
        return 1
    if isinstance(node, Seq):
        return sum(count_cps(item) for item in node.items)
    if isinstance(node, Fin):
        return count_cps(node.body) + node.cp_after
    if isinstance(node, (Catch, ToSync, ToAsync, Absorb)):
        return count_cps(node.body)
    if isinstance(node, CM):
        return 2 + count_cps(node.body)
    body = count_cps(node.body)
    if node.gen:
        return node.n * (1 + body) + node.cp_after
    return node.n * (1 + body) + 1


def gen_node(rng: random.Random, depth: int, ids: Iterator[int]) -> Node:
    if depth <= 0 or rng.random() < 0.25:
        return CP()
    kind = rng.choice(
        ["seq", "fin", "fin", "catch", "sync", "sync", "async", "cm", "iter", "absorb"]
    )
    d = depth - 1
    if kind == "seq":
        return Seq(tuple(gen_node(rng, d, ids) for _ in range(rng.randint(1, 3))))
    if kind == "fin":
        return Fin(next(ids), gen_node(rng, d, ids), rng.random() < 0.4)
    if kind == "catch":
        return Catch(next(ids), gen_node(rng, d, ids))
    if kind == "sync":
        return ToSync(gen_node(rng, d, ids))
    if kind == "async":
        return ToAsync(gen_node(rng, d, ids))
    if kind == "cm":
        return CM(next(ids), gen_node(rng, d, ids))
    if kind == "absorb":
        return Absorb(next(ids), gen_node(rng, d, ids))
    return Iter(next(ids), rng.randint(0, 2), gen_node(rng, d, ids), rng.random() < 0.5,
                rng.random() < 0.5)


def gen_program(seed: int) -> tuple[Node, bool]:
    """A program with 4..26 checkpoints, and whether its task gets a portal
    from ensure_portal() (else only with_portal_run*() provide one)."""
    rng = random.Random(seed)
    while True:
        ids = itertools.count()
        items = tuple(gen_node(rng, 4, ids) for _ in range(rng.randint(2, 4)))
        program: Node = Seq(items)
        if rng.random() < 0.4:
            program = ToSync(program)
        if 4 <= count_cps(program) <= 26:
            return program, rng.random() < 0.5


# --------------------------------------------------------------------------
# Running programs
# --------------------------------------------------------------------------

LogEntry = tuple[object, ...]


def _exc_name(typ: type[BaseException] | None) -> str | None:
    return None if typ is None else typ.__name__


def _nothing() -> None:
    pass


class Runner:
    """Runs one program once, natively (gb=False: the oracle) or through
    greenback, cancelling it at its k-th checkpoint (k=None: never)."""

    def __init__(
        self, gb: bool, trio_mode: bool, sentinel: object, k: int | None, absorb: bool = False
    ) -> None:
        self.gb = gb
        self.trio_mode = trio_mode
        self.absorb = absorb
        self.scopes: list[trio.CancelScope] = []  # Absorb scopes, innermost last
        self.sentinel = sentinel
        self.k = k
        self.count = 0
        self.log: list[LogEntry] = []
        self.trigger: Callable[[], None] = _nothing

    async def cp(self, portal: bool) -> object:
        n = self.count
        self.count += 1
        self.log.append(("cp", n))
        if self.gb:
            assert greenback.has_portal() is portal, (n, portal)
        if n == self.k:
            self.trigger()
        try:
            if self.trio_mode:
                await trio.lowlevel.checkpoint()
            else:
                await asyncio.sleep(0)
        except BaseException as exc:
            self.log.append(("raised", n, type(exc).__name__))
            raise
        return self.sentinel

    def absorbed_if(self, caught: bool, node: Absorb) -> None:
        if not caught:
            return
        self.log.append(("absorbed", node.ident))
        if not self.trio_mode and sys.version_info >= (3, 11):
            task = asyncio.current_task()
            assert task is not None
            assert task.uncancel() == 0

    def trio_cancel(self, outer: trio.CancelScope) -> None:
        """Cancel the innermost Absorb scope, or else the outer one."""
        (self.scopes[-1] if self.scopes else outer).cancel()

    async def agen(self, node: Iter, portal: bool) -> AsyncGenerator[int, None]:
        try:
            for i in range(node.n):
                await self.cp(portal)
                yield i
        finally:
            self.log.append(("agen-finally", node.ident))
            if node.cp_after:
                await self.cp(portal)

    async def run_async(self, node: Node, portal: bool) -> object:
        if isinstance(node, CP):
            assert await self.cp(portal) is self.sentinel
        elif isinstance(node, Seq):
            for child in node.items:
                await self.run_async(child, portal)
        elif isinstance(node, Fin):
            try:
                await self.run_async(node.body, portal)
            finally:
                self.log.append(("finally", node.ident))
                if node.cp_after:
                    await self.cp(portal)
        elif isinstance(node, Catch):
            try:
                await self.run_async(node.body, portal)
            except BaseException as exc:
                self.log.append(("saw", node.ident, type(exc).__name__))
                raise
        elif isinstance(node, ToSync):
            if self.gb:
                result = await greenback.with_portal_run_sync(self.run_sync, node.body)
                assert result is self.sentinel
            else:
                await self.run_async(node.body, portal)
        elif isinstance(node, ToAsync):
            if self.gb:
                result = await greenback.with_portal_run(self.run_async, node.body, True)
                assert result is self.sentinel
            else:
                await self.run_async(node.body, portal)
        elif isinstance(node, Absorb):
            if not self.absorb:
                await self.run_async(node.body, portal)
            elif self.trio_mode:
                with trio.CancelScope() as scope:
                    self.scopes.append(scope)
                    try:
                        await self.run_async(node.body, portal)
                    finally:
                        assert self.scopes.pop() is scope
                self.absorbed_if(scope.cancelled_caught, node)
            else:
                try:
                    await self.run_async(node.body, portal)
                except asyncio.CancelledError:
                    self.absorbed_if(True, node)
        elif isinstance(node, CM):
            async with LoggingCM(self, node.ident, portal) as value:
                assert value is self.sentinel
                await self.run_async(node.body, portal)
        elif node.gen:
            async with contextlib.aclosing(self.agen(node, portal)) as agen:
                async for item in agen:
                    self.log.append(("item", node.ident, item))
                    await self.run_async(node.body, portal)
        else:
            async for item in CountingIter(self, node, portal):
                self.log.append(("item", node.ident, item))
                await self.run_async(node.body, portal)
        return self.sentinel

    def run_sync(self, node: Node) -> object:
        assert self.gb
        assert greenback.has_portal()
        if isinstance(node, CP):
            assert greenback.await_(self.cp(True)) is self.sentinel
        elif isinstance(node, Seq):
            for child in node.items:
                self.run_sync(child)
        elif isinstance(node, Fin):
            try:
                self.run_sync(node.body)
            finally:
                self.log.append(("finally", node.ident))
                if node.cp_after:
                    greenback.await_(self.cp(True))
        elif isinstance(node, Catch):
            try:
                self.run_sync(node.body)
            except BaseException as exc:
                self.log.append(("saw", node.ident, type(exc).__name__))
                raise
        elif isinstance(node, ToSync):
            # Already inside a portal: with_portal_run_sync() calls directly.
            result = greenback.await_(greenback.with_portal_run_sync(self.run_sync, node.body))
            assert result is self.sentinel
        elif isinstance(node, ToAsync):
            assert greenback.await_(self.run_async(node.body, True)) is self.sentinel
        elif isinstance(node, Absorb):
            if not self.absorb:
                self.run_sync(node.body)
            elif self.trio_mode:
                with trio.CancelScope() as scope:
                    self.scopes.append(scope)
                    try:
                        self.run_sync(node.body)
                    finally:
                        assert self.scopes.pop() is scope
                self.absorbed_if(scope.cancelled_caught, node)
            else:
                try:
                    self.run_sync(node.body)
                except asyncio.CancelledError:
                    self.absorbed_if(True, node)
        elif isinstance(node, CM):
            with greenback.async_context(LoggingCM(self, node.ident, True)) as value:
                assert value is self.sentinel
                self.run_sync(node.body)
        elif node.gen:
            with greenback.async_context(contextlib.aclosing(self.agen(node, True))) as agen:
                for item in greenback.async_iter(agen):
                    self.log.append(("item", node.ident, item))
                    self.run_sync(node.body)
        else:
            for item in greenback.async_iter(CountingIter(self, node, True)):
                self.log.append(("item", node.ident, item))
                self.run_sync(node.body)
        return self.sentinel


class LoggingCM:
    def __init__(self, runner: Runner, ident: int, portal: bool) -> None:
        self.runner = runner
        self.ident = ident
        self.portal = portal

    async def __aenter__(self) -> object:
        self.runner.log.append(("enter", self.ident))
        return await self.runner.cp(self.portal)

    async def __aexit__(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self.runner.log.append(("exit", self.ident, _exc_name(typ)))
        await self.runner.cp(self.portal)
        return False


class CountingIter:
    def __init__(self, runner: Runner, node: Iter, portal: bool) -> None:
        self.runner = runner
        self.node = node
        self.portal = portal
        self.i = 0

    def __aiter__(self) -> CountingIter:
        return self

    async def __anext__(self) -> int:
        await self.runner.cp(self.portal)
        if self.i >= self.node.n:
            self.runner.log.append(("iter-done", self.node.ident))
            raise StopAsyncIteration
        self.i += 1
        return self.i - 1


# --------------------------------------------------------------------------
# Cancelling a program at each of its checkpoints
# --------------------------------------------------------------------------

# What reaches the code around the program, per way of cancelling it, and
# what its checkpoint raises.
EXPECTED = {
    "asyncio-cancel": ("CancelledError", "CancelledError"),
    "asyncio-cancel-task": ("CancelledError", "CancelledError"),
    "asyncio-timeout": ("TimeoutError", "CancelledError"),
    "trio-cancel": ("Cancelled", "Cancelled"),
    "trio-fail-after": ("TooSlowError", "Cancelled"),
}

Result = tuple[Union[int, None], str, tuple[LogEntry, ...]]


async def run_cancelled(how: str, runner: Runner, program: Node, portal: bool) -> str:
    """Run the program once in the current task, cancelled as `how` says at
    the runner's k-th checkpoint; say what came out."""
    if how == "asyncio-cancel":
        task = asyncio.current_task()
        assert task is not None

        def cancel_task() -> None:
            assert task is not None
            task.cancel()

        runner.trigger = cancel_task
        try:
            assert await runner.run_async(program, portal) is runner.sentinel
            return "ok"
        except asyncio.CancelledError:
            if sys.version_info >= (3, 11):
                assert task.uncancel() == 0
            return "CancelledError"
    if how == "asyncio-cancel-task":
        # Cancel a task of its own; its parent sees the cancellation.
        def cancel_current() -> None:
            current = asyncio.current_task()
            assert current is not None
            current.cancel()

        async def child() -> object:
            if portal:
                await greenback.ensure_portal()
            return await runner.run_async(program, portal)

        runner.trigger = cancel_current
        child_task = asyncio.create_task(child())
        try:
            assert await child_task is runner.sentinel
            return "ok"
        except asyncio.CancelledError:
            assert child_task.cancelled()
            return "CancelledError"
    if how == "asyncio-timeout":
        if sys.version_info >= (3, 11):
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(None) as cm:
                    runner.trigger = lambda: cm.reschedule(loop.time())
                    assert await runner.run_async(program, portal) is runner.sentinel
                assert not cm.expired()
                return "ok"
            except TimeoutError:
                assert cm.expired()
                return "TimeoutError"
        raise AssertionError("asyncio.timeout() needs Python 3.11")  # pragma: no cover
    if how == "trio-cancel":
        with trio.CancelScope() as scope:
            runner.trigger = partial(runner.trio_cancel, scope)
            assert await runner.run_async(program, portal) is runner.sentinel
        return "Cancelled" if scope.cancelled_caught else "ok"
    assert how == "trio-fail-after"
    try:
        with trio.fail_after(1e6) as deadline_scope:

            def expire() -> None:
                deadline_scope.deadline = trio.current_time()

            runner.trigger = expire
            assert await runner.run_async(program, portal) is runner.sentinel
        return "ok"
    except trio.TooSlowError:
        assert deadline_scope.cancelled_caught
        return "TooSlowError"


def count_greenlets() -> int:
    return sum(isinstance(obj, greenlet.greenlet) for obj in gc.get_objects())


def snapshot(sentinel: object) -> tuple[int, int]:
    gc.collect()
    return count_greenlets(), sys.getrefcount(sentinel)


async def echo(lib: Lib, value: object) -> object:
    await lib.checkpoint()
    return value


async def check_portal_works(lib: Lib, task_portal: bool, sentinel: object) -> None:
    """The task carries on after the cancellation: await_ works where a
    portal is, and has_portal() says where that is."""

    def sync_code() -> object:
        assert greenback.has_portal()
        first = greenback.await_(echo(lib, sentinel))
        second = greenback.await_(echo(lib, 7))
        assert second == 7
        return first

    assert greenback.has_portal() is task_portal
    if task_portal:
        assert sync_code() is sentinel
    else:
        assert await greenback.with_portal_run_sync(sync_code) is sentinel
        assert not greenback.has_portal()


async def sweep(how: str, program: Node, gb: bool, task_portal: bool, sentinel: object) -> list[Result]:
    """Run the program uncancelled, then cancelled at each of its
    checkpoints in turn, all in this one task; return what happened."""
    lib = TRIO if how.startswith("trio") else ASYNCIO
    portal = gb and task_portal
    if portal:
        await greenback.ensure_portal()
    results: list[Result] = []
    n_cps = count_cps(program)
    baseline = (0, 0)
    for k in [None, *range(n_cps)]:
        absorb = how in ("asyncio-cancel", "asyncio-cancel-task", "trio-cancel")
        runner = Runner(gb, lib is TRIO, sentinel, k, absorb)
        outcome_name = await run_cancelled(how, runner, program, portal)
        results.append((k, outcome_name, tuple(runner.log)))
        del runner
        if gb:
            await check_portal_works(lib, portal, sentinel)
            if k is None:
                await lib.checkpoint()
                baseline = snapshot(sentinel)
    if gb:
        # The event loop holds the exception it threw in until the step that
        # caught it ends: yield once before counting.
        await lib.checkpoint()
        greenlets, refs = snapshot(sentinel)
        assert greenlets - baseline[0] <= 2, (baseline, greenlets)
        assert refs == baseline[1]
    return results


def check_sweep(how: str, seed: int) -> None:
    lib = TRIO if how.startswith("trio") else ASYNCIO
    program, task_portal = gen_program(seed)
    sentinel = object()
    oracle = lib.run(sweep, how, program, False, task_portal, sentinel)
    got = lib.run(sweep, how, program, True, task_portal, sentinel)

    n_cps = count_cps(program)
    assert len(oracle) == len(got) == n_cps + 1
    k0, outcome0, log0 = oracle[0]
    assert (k0, outcome0) == (None, "ok")
    assert [entry for entry in log0 if entry[0] == "cp"] == [("cp", i) for i in range(n_cps)]
    caller_sees, raised_at_cp = EXPECTED[how]
    for k, outcome_name, log in oracle[1:]:
        absorbed = any(entry[0] == "absorbed" for entry in log)
        assert outcome_name == ("ok" if absorbed else caller_sees), (k, outcome_name)
        first_raise = next(entry for entry in log if entry[0] == "raised")
        assert first_raise == ("raised", k, raised_at_cp)
    for want, have in zip(oracle, got):
        assert have == want, f"program {program!r}, ensure_portal={task_portal}"


SEEDS = range(32)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "how", ["asyncio-cancel", "asyncio-cancel-task", "trio-cancel", "trio-fail-after"]
)
def test_cancel_at_every_yield_point(how: str, seed: int) -> None:
    check_sweep(how, seed)


if sys.version_info >= (3, 11):

    @pytest.mark.parametrize("seed", SEEDS)
    def test_asyncio_timeout_at_every_yield_point(seed: int) -> None:
        check_sweep("asyncio-timeout", seed)


def test_programs_cover_every_construct() -> None:
    """The seeds used above exercise every kind of node, and programs with
    and without a task portal."""
    seen: set[str] = set()
    portals: set[bool] = set()

    def walk(node: Node) -> None:
        seen.add(type(node).__name__ + ("-gen" if isinstance(node, Iter) and node.gen else ""))
        if isinstance(node, Seq):
            for child in node.items:
                walk(child)
        elif not isinstance(node, CP):
            walk(node.body)

    for seed in SEEDS:
        program, task_portal = gen_program(seed)
        portals.add(task_portal)
        walk(program)
    assert seen == {
        "CP", "Seq", "Fin", "Catch", "ToSync", "ToAsync", "CM", "Iter", "Iter-gen", "Absorb"
    }
    assert portals == {True, False}


def test_oracle_agrees_with_a_hand_written_program() -> None:
    """A fixed program, cancelled at a chosen point, logs what Python's own
    rules say: the checker is checking the right thing."""
    program = ToSync(Fin(0, CM(1, Seq((CP(), CP()))), True))
    sentinel = object()

    async def main(gb: bool) -> tuple[str, tuple[LogEntry, ...]]:
        runner = Runner(gb, True, sentinel, 1)
        name = await run_cancelled("trio-cancel", runner, program, False)
        return name, tuple(runner.log)

    expected = (
        "Cancelled",
        (
            ("enter", 1), ("cp", 0),
            ("cp", 1), ("raised", 1, "Cancelled"),
            ("exit", 1, "Cancelled"), ("cp", 2), ("raised", 2, "Cancelled"),
            ("finally", 0), ("cp", 3), ("raised", 3, "Cancelled"),
        ),
    )
    assert trio.run(main, False) == expected
    assert trio.run(main, True) == expected


# --------------------------------------------------------------------------
# Errors thrown into a task suspended in await_()
# --------------------------------------------------------------------------


class Fatal(BaseException):
    """Not an Exception: must pass through everything unchanged."""


def layered(log: list[str], fn: Callable[[], object], depth: int = 3) -> object:
    """Sync frames, `depth` deep, that log what passes through them."""
    try:
        if depth == 0:
            return fn()
        return layered(log, fn, depth - 1)
    except BaseException as exc:
        log.append(f"saw {type(exc).__name__} at {depth}")
        raise
    finally:
        log.append(f"finally {depth}")


def unwound(name: str, depth: int = 3) -> list[str]:
    out: list[str] = []
    for d in range(depth + 1):
        out += [f"saw {name} at {d}", f"finally {d}"]
    return out


@pytest.mark.parametrize("how", ["ensure_portal", "with_portal_run_sync"])
def test_asyncio_cancel_with_message_thrown_into_await_(how: str) -> None:
    log: list[str] = []
    messages: list[object] = []

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        event = asyncio.Event()

        def blocked() -> object:
            try:
                return greenback.await_(event.wait())
            except asyncio.CancelledError as exc:
                messages.append(exc.args)
                raise

        async def canceller() -> None:
            await asyncio.sleep(0)
            assert task.cancel("go away")

        canceller_task = asyncio.create_task(canceller())
        if how == "ensure_portal":
            await greenback.ensure_portal()
        with pytest.raises(asyncio.CancelledError):
            if how == "ensure_portal":
                layered(log, blocked)
            else:
                await greenback.with_portal_run_sync(layered, log, blocked)
        await canceller_task
        if sys.version_info >= (3, 11):
            assert task.uncancel() == 0
        assert log == unwound("CancelledError")
        assert messages == [("go away",)]
        # The same task goes on: the event (whose wait was cancelled) and
        # the portal still work.
        asyncio.get_running_loop().call_soon(event.set)

        def wait_again() -> object:
            assert greenback.has_portal()
            return greenback.await_(event.wait())

        if how == "ensure_portal":
            assert greenback.has_portal()
            assert wait_again() is True
        else:
            assert not greenback.has_portal()
            assert await greenback.with_portal_run_sync(wait_again) is True

    asyncio.run(main())


def test_asyncio_cancel_caught_in_sync_code_then_await_again() -> None:
    """The sync frame that sees the CancelledError handles it and awaits
    again in the same frame, many times over; nothing leaks."""

    async def main() -> None:
        await greenback.ensure_portal()
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        sentinel = object()

        def once() -> object:
            fut = loop.create_future()
            loop.call_soon(task.cancel, "again")
            try:
                greenback.await_(fut)
            except asyncio.CancelledError as exc:
                assert exc.args == ("again",)
                if sys.version_info >= (3, 11):
                    task.uncancel()
            assert fut.cancelled()
            return greenback.await_(echo(ASYNCIO, sentinel))

        assert once() is sentinel
        before = snapshot(sentinel)
        for _ in range(50):
            assert once() is sentinel
        assert snapshot(sentinel) == before
        assert greenback.has_portal()

    asyncio.run(main())


@pytest.mark.parametrize("exc_type", [ValueError, KeyError, Fatal])
def test_asyncio_future_exception_thrown_into_await_(exc_type: type[BaseException]) -> None:
    log: list[str] = []

    async def main() -> None:
        await greenback.ensure_portal()
        loop = asyncio.get_running_loop()
        error = exc_type("boom")
        fut = loop.create_future()
        loop.call_soon(fut.set_exception, error)
        with pytest.raises(exc_type) as info:
            layered(log, lambda: greenback.await_(fut))
        assert info.value is error
        assert log == unwound(exc_type.__name__)
        assert greenback.has_portal()
        assert greenback.await_(echo(ASYNCIO, 5)) == 5

    asyncio.run(main())


def test_asyncio_base_exception_from_future_ends_the_task_unchanged() -> None:
    """A BaseException (not Exception) set on a future that sync code
    awaits leaves the task as it was raised: the same object."""
    log: list[str] = []
    error = Fatal("stop")

    async def victim(fut: asyncio.Future[object]) -> object:
        await greenback.ensure_portal()
        return layered(log, lambda: greenback.await_(fut))

    async def via_run_sync(fut: asyncio.Future[object]) -> object:
        return await greenback.with_portal_run_sync(layered, log, lambda: greenback.await_(fut))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for make in (victim, via_run_sync):
            fut: asyncio.Future[object] = loop.create_future()
            task = asyncio.create_task(make(fut))
            await asyncio.sleep(0.001)
            assert not task.done()
            fut.set_exception(error)
            with pytest.raises(Fatal) as info:
                await task
            assert info.value is error
            assert task.exception() is error
            assert log == unwound("Fatal")
            log.clear()

    asyncio.run(main())


def test_asyncio_future_cancelled_under_await_() -> None:
    """Cancelling the future (not the task) that sync code awaits: the sync
    code sees CancelledError, and the task is not cancelled."""
    log: list[str] = []

    async def main() -> None:
        await greenback.ensure_portal()
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.call_soon(fut.cancel, "just the future")
        with pytest.raises(asyncio.CancelledError) as info:
            layered(log, lambda: greenback.await_(fut))
        assert info.value.args == ("just the future",)
        assert log == unwound("CancelledError")
        if sys.version_info >= (3, 11):
            assert task.cancelling() == 0
        await asyncio.sleep(0.001)  # not cancelled
        assert greenback.await_(echo(ASYNCIO, "fine")) == "fine"

    asyncio.run(main())


async def wait_for_reschedule() -> object:
    return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)


@pytest.mark.parametrize("how", ["ensure_portal", "with_portal_run_sync"])
@pytest.mark.parametrize("exc_type", [ValueError, Fatal])
def test_trio_reschedule_with_error_into_await_(how: str, exc_type: type[BaseException]) -> None:
    log: list[str] = []

    async def main() -> None:
        me = trio.lowlevel.current_task()
        error = exc_type("thrown in")

        async def thrower() -> None:
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.reschedule(me, outcome.Error(error))

        def blocked() -> object:
            return greenback.await_(wait_for_reschedule())

        if how == "ensure_portal":
            await greenback.ensure_portal()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(thrower)
            with pytest.raises(exc_type) as info:
                if how == "ensure_portal":
                    layered(log, blocked)
                else:
                    await greenback.with_portal_run_sync(layered, log, blocked)
            assert info.value is error
        assert log == unwound(exc_type.__name__)

        # A value goes through the same way, and the portal still works.
        async def giver() -> None:
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.reschedule(me, outcome.Value("given"))

        def take() -> object:
            assert greenback.has_portal()
            return greenback.await_(wait_for_reschedule())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(giver)
            if how == "ensure_portal":
                assert greenback.has_portal()
                assert take() == "given"
            else:
                assert not greenback.has_portal()
                assert await greenback.with_portal_run_sync(take) == "given"

    trio.run(main)


@pytest.mark.parametrize("how", ["ensure_portal", "with_portal_run_sync"])
def test_trio_keyboard_interrupt_into_await_propagates_out_of_run(how: str) -> None:
    log: list[str] = []

    async def main() -> None:
        me = trio.lowlevel.current_task()

        async def interrupter() -> None:
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.reschedule(me, outcome.Error(KeyboardInterrupt()))

        trio.lowlevel.spawn_system_task(interrupter)
        blocked = lambda: greenback.await_(wait_for_reschedule())  # noqa: E731
        if how == "ensure_portal":
            await greenback.ensure_portal()
            layered(log, blocked)
        else:
            await greenback.with_portal_run_sync(layered, log, blocked)
        log.append("not reached")

    with pytest.raises(KeyboardInterrupt):
        trio.run(main)
    assert log == unwound("KeyboardInterrupt")


def test_trio_keyboard_interrupt_caught_in_sync_code() -> None:
    """Sync code that catches the KeyboardInterrupt can go on awaiting."""
    log: list[str] = []

    async def main() -> str:
        await greenback.ensure_portal()
        me = trio.lowlevel.current_task()

        async def interrupter() -> None:
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.reschedule(me, outcome.Error(KeyboardInterrupt()))

        trio.lowlevel.spawn_system_task(interrupter)
        try:
            layered(log, lambda: greenback.await_(wait_for_reschedule()))
        except KeyboardInterrupt:
            log.append("caught")
        assert greenback.has_portal()
        result = greenback.await_(echo(TRIO, "after"))
        assert isinstance(result, str)
        return result

    assert trio.run(main) == "after"
    assert log == unwound("KeyboardInterrupt") + ["caught"]


# --------------------------------------------------------------------------
# GeneratorExit: closing a coroutine suspended inside await_()
# --------------------------------------------------------------------------


class Trap:
    """An awaitable that yields once to whoever drives the coroutine."""

    def __init__(self, log: list[str], name: str = "trap") -> None:
        self.log = log
        self.name = name

    def __await__(self) -> Generator[str, object, object]:
        try:
            received = yield self.name
        finally:
            self.log.append(f"{self.name} closed")
        return received


def suspend_in_await_(log: list[str]) -> object:
    return layered(log, lambda: greenback.await_(Trap(log)))


async def native_suspend(log: list[str], depth: int = 3) -> object:
    """The oracle: the same frames, written as coroutines."""
    try:
        if depth == 0:
            return await Trap(log)
        return await native_suspend(log, depth - 1)
    except BaseException as exc:
        log.append(f"saw {type(exc).__name__} at {depth}")
        raise
    finally:
        log.append(f"finally {depth}")


async def via_run(log: list[str]) -> object:
    async def inner() -> object:
        return suspend_in_await_(log)

    return await greenback.with_portal_run(inner)


async def via_nested(log: list[str]) -> object:
    """sync -> await_(coroutine) -> with_portal_run_sync(sync) -> await_."""

    async def middle() -> object:
        return await greenback.with_portal_run_sync(suspend_in_await_, log)

    def outer() -> object:
        try:
            return greenback.await_(middle())
        finally:
            log.append("outer finally")

    return await greenback.with_portal_run_sync(outer)


def make_coro(kind: str, log: list[str]) -> Coroutine[Any, Any, object]:
    if kind == "native":
        return native_suspend(log)
    if kind == "run_sync":
        return greenback.with_portal_run_sync(suspend_in_await_, log)
    if kind == "run":
        return via_run(log)
    assert kind == "nested"
    return via_nested(log)


CLOSE_KINDS = ["native", "run_sync", "run", "nested"]
CLOSED_LOG = ["trap closed"] + unwound("GeneratorExit")


@pytest.mark.parametrize("kind", CLOSE_KINDS)
def test_close_coroutine_suspended_in_await_(kind: str) -> None:
    log: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coro = make_coro(kind, log)
        assert coro.send(None) == "trap"
        assert log == []
        coro.close()
        expected = CLOSED_LOG + (["outer finally"] if kind == "nested" else [])
        assert log == expected
        coro.close()  # a second close does nothing
        with pytest.raises(RuntimeError):
            coro.send(None)
        del coro
        gc.collect()
        assert log == expected


@pytest.mark.parametrize("kind", CLOSE_KINDS)
def test_drop_coroutine_suspended_in_await_(kind: str) -> None:
    """Dropping the last reference closes it: finally blocks run once."""
    log: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coro = make_coro(kind, log)
        assert coro.send(None) == "trap"
        del coro
        gc.collect()
        expected = CLOSED_LOG + (["outer finally"] if kind == "nested" else [])
        assert log == expected


@pytest.mark.parametrize("kind", CLOSE_KINDS)
def test_close_after_resuming_a_few_times(kind: str) -> None:
    """Resumed with values several times (each await_ a fresh Trap), then
    closed: only the frames live at that moment unwind."""
    log: list[str] = []

    async def native_loop() -> object:
        total = 0
        try:
            for i in range(10):
                received = await Trap(log, f"trap{i}")
                assert isinstance(received, int)
                total += received
            return total
        finally:
            log.append("loop finally")

    def sync_loop() -> object:
        total = 0
        try:
            for i in range(10):
                received = greenback.await_(Trap(log, f"trap{i}"))
                assert isinstance(received, int)
                total += received
            return total
        finally:
            log.append("loop finally")

    coro: Coroutine[Any, Any, object]
    if kind == "native":
        coro = native_loop()
    elif kind == "run_sync":
        coro = greenback.with_portal_run_sync(sync_loop)
    elif kind == "run":

        async def run_it() -> object:
            return sync_loop()

        coro = greenback.with_portal_run(run_it)
    else:

        async def nested() -> object:
            return await greenback.with_portal_run_sync(sync_loop)

        coro = greenback.with_portal_run_sync(lambda: greenback.await_(nested()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert coro.send(None) == "trap0"
        for i in range(1, 4):
            assert coro.send(i) == f"trap{i}"
        coro.close()
    assert log == ["trap0 closed", "trap1 closed", "trap2 closed", "trap3 closed", "loop finally"]


@pytest.mark.parametrize("kind", ["native", "run_sync"])
def test_close_when_generator_exit_is_swallowed(kind: str) -> None:
    """Code that catches GeneratorExit and awaits again: close() raises
    RuntimeError, as it does for native coroutines. with_portal_run_sync()
    is a coroutine around the portal, so (like a native coroutine awaiting
    another) the RuntimeError ends the outer one, which drops the inner one,
    which is closed again: the finally block runs, once."""
    log: list[str] = []

    async def native() -> object:
        try:
            try:
                return await Trap(log, "first")
            except GeneratorExit:
                log.append("swallowed")
                return await Trap(log, "second")
        finally:
            log.append("finally")

    async def native_outer() -> object:
        return await native()

    def sync() -> object:
        try:
            try:
                return greenback.await_(Trap(log, "first"))
            except GeneratorExit:
                log.append("swallowed")
                return greenback.await_(Trap(log, "second"))
        finally:
            log.append("finally")

    expected = ["first closed", "swallowed", "second closed", "finally"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coro = native_outer() if kind == "native" else greenback.with_portal_run_sync(sync)
        assert coro.send(None) == "first"
        with pytest.raises(RuntimeError, match="ignored GeneratorExit"):
            coro.close()
        gc.collect()
        assert log == expected
        coro.close()
        del coro
        gc.collect()
    assert log == expected


def test_close_many_suspended_coroutines_leaks_nothing() -> None:
    sentinel = object()

    def hold() -> object:
        try:
            greenback.await_(Trap([]))
        finally:
            assert sentinel is not None
        return sentinel

    def one_round() -> None:
        coros = [greenback.with_portal_run_sync(hold) for _ in range(20)]
        for coro in coros:
            assert coro.send(None) == "trap"
        for coro in coros:
            coro.close()

    one_round()
    before = snapshot(sentinel)
    for _ in range(10):
        one_round()
    after = snapshot(sentinel)
    assert after[1] == before[1]
    assert after[0] - before[0] <= 2
