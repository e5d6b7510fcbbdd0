"""greenback's workers speak the "greenlet provider" protocol of SQLAlchemy
and awaitlet.

SQLAlchemy's ``await_only()`` (behind every lazy load and every query of the
sync facade of an ``AsyncSession``) and awaitlet's ``awaitlet()`` await from
sync code by switching to the current greenlet's parent with the awaitable,
provided the greenlet's class says it is a provider. greenback's worker
greenlets are providers, and the portal's step (their parent) drives what
they hand over as ``await_()`` would. These tests use the real packages:
SQLAlchemy with aiosqlite (asyncio only, like SQLAlchemy's drivers), and
awaitlet on every event loop.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import traceback
import types
import warnings
from typing import Any, Awaitable, Callable, Coroutine, Generator, TypeVar

import greenlet
import pytest
import trio
from awaitlet import NoAwaitletContext, async_def, awaitlet
from sqlalchemy import ForeignKey, func, inspect, select, text
from sqlalchemy.exc import MissingGreenlet, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import greenback

from conftest import Lib

T = TypeVar("T")


# --- awaitlet, on every event loop --------------------------------------------

PORTAL_WAYS = ["ensure_portal", "bestow_portal", "with_portal_run_sync", "with_portal_run", "tree"]


def under_portal(lib: Lib, how: str, sync_fn: Callable[[], T]) -> T:
    """Run sync_fn() as sync code under a portal of the kind `how`."""

    async def call_sync() -> T:
        return sync_fn()

    async def in_task_with_ensure_portal() -> T:
        await greenback.ensure_portal()
        return sync_fn()

    async def main() -> T:
        if how == "ensure_portal":
            return await in_task_with_ensure_portal()
        if how == "with_portal_run_sync":
            return await greenback.with_portal_run_sync(sync_fn)
        if how == "with_portal_run":
            return await greenback.with_portal_run(call_sync)
        results: list[T] = []

        async def child() -> None:
            results.append(sync_fn())

        if how == "bestow_portal":
            if lib.sniffio_name == "trio":
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(child)
                    greenback.bestow_portal(next(iter(nursery.child_tasks)))
            else:
                task = asyncio.ensure_future(child())
                greenback.bestow_portal(task)
                await task
            return results[0]
        assert how == "tree"

        async def spawn_child() -> None:
            if lib.sniffio_name == "trio":
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(child)
            else:
                await asyncio.ensure_future(child())

        await greenback.with_portal_run_tree(spawn_child)
        return results[0]

    return lib.run(main)


async def value_after_checkpoint(lib: Lib, value: T) -> T:
    await lib.checkpoint()
    return value


class Boom(Exception):
    pass


@pytest.mark.parametrize("how", PORTAL_WAYS)
def test_awaitlet_under_every_kind_of_portal(lib: Lib, how: str) -> None:
    def sync_code() -> list[int]:
        return [awaitlet(value_after_checkpoint(lib, k)) for k in range(3)]

    assert under_portal(lib, how, sync_code) == [0, 1, 2]


def test_awaitlet_on_every_event_loop(any_lib: Lib) -> None:
    def sync_code() -> int:
        first = awaitlet(value_after_checkpoint(any_lib, 20))
        return first + greenback.await_(value_after_checkpoint(any_lib, 22))

    assert under_portal(any_lib, "ensure_portal", sync_code) == 42
    assert under_portal(any_lib, "with_portal_run_sync", sync_code) == 42


def test_awaitlet_exception_comes_out_at_the_call_site(lib: Lib) -> None:
    """With a traceback that runs from the user's sync frames, through
    awaitlet(), into the coroutine that raised."""

    async def fails() -> None:
        await lib.checkpoint()
        raise Boom("from the awaited coroutine")

    def user_layer() -> None:
        awaitlet(fails())

    def sync_code() -> list[str]:
        try:
            user_layer()
        except Boom as exc:
            return [frame.name for frame in traceback.extract_tb(exc.__traceback__)]
        raise AssertionError("no exception")

    names = under_portal(lib, "ensure_portal", sync_code)
    assert names[:3] == ["sync_code", "user_layer", "awaitlet"]
    assert names[-1] == "fails"


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_cancellation_inside_awaitlet(lib: Lib, how: str) -> None:
    """The cancellation is raised at awaitlet(), finally blocks run, and
    the portal keeps working afterwards."""
    log: list[str] = []

    async def forever() -> None:
        try:
            await lib.sleep(1000)
        finally:
            log.append("coroutine finally")

    def blocked() -> None:
        try:
            awaitlet(forever())
        finally:
            log.append("sync finally")

    async def asyncio_main() -> str:
        await greenback.ensure_portal()
        if how == "timeout":
            try:
                await asyncio.wait_for(greenback.with_portal_run_sync(blocked), 0.01)
            except asyncio.TimeoutError:
                log.append("timed out")
            if sys.version_info >= (3, 11):
                try:
                    async with asyncio.timeout(0.01):
                        blocked()
                except TimeoutError:
                    log.append("timed out")
        else:
            task = asyncio.ensure_future(greenback.with_portal_run_sync(blocked))
            await asyncio.sleep(0.01)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                log.append("cancelled")
        return awaitlet(value_after_checkpoint(lib, "usable"))

    async def trio_main() -> str:
        await greenback.ensure_portal()
        if how == "timeout":
            with trio.move_on_after(0.01):
                blocked()
            log.append("timed out")
            try:
                with trio.fail_after(0.01):
                    blocked()
            except trio.TooSlowError:
                log.append("timed out")
        else:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(greenback.with_portal_run_sync, blocked)
                    await trio.sleep(0.01)
                    scope.cancel()
            log.append("cancelled")
        return awaitlet(value_after_checkpoint(lib, "usable"))

    assert lib.run(trio_main if lib.sniffio_name == "trio" else asyncio_main) == "usable"
    rounds = 2 if how == "timeout" and (lib.name == "trio" or sys.version_info >= (3, 11)) else 1
    outcome = "timed out" if how == "timeout" else "cancelled"
    assert log == ["coroutine finally", "sync finally", outcome] * rounds


def test_the_protocol_itself_and_what_parent_still_is(lib: Lib) -> None:
    """The raw protocol, as SQLAlchemy and awaitlet use it, with awaitables
    of every kind `await` accepts; and a worker's `parent` still answers as
    the greenlet running the step for anything but such a switch()."""

    @types.coroutine
    def generator_based() -> Generator[Any, Any, str]:
        yield from value_after_checkpoint(lib, None).__await__()
        return "generator-based"

    class WithAwait:
        def __await__(self) -> Generator[Any, Any, str]:
            return (yield from value_after_checkpoint(lib, "__await__").__await__())

    def sync_code() -> list[Any]:
        me = greenlet.getcurrent()
        assert getattr(type(me), "__sqlalchemy_greenlet_provider__", False)
        parent = me.parent
        assert parent is not None
        results = [parent.switch(awaitable) for awaitable in (
            value_after_checkpoint(lib, "coroutine"), generator_based(), WithAwait())]
        assert parent  # truthy, as awaitlet asserts
        results.append(parent.dead)
        return results

    assert under_portal(lib, "ensure_portal", sync_code) == [
        "coroutine", "generator-based", "__await__", False]


def test_nested_portals_each_drive_their_own_awaitlet(lib: Lib) -> None:
    """awaitlet() inside a portal nested in another portal's worker (sync
    code that awaits a with_portal_run_sync() call that awaits again)."""

    def inner(depth: int) -> int:
        here = awaitlet(value_after_checkpoint(lib, 1))
        if depth == 0:
            return here
        return here + greenback.await_(greenback.with_portal_run_sync(inner, depth - 1))

    assert under_portal(lib, "ensure_portal", lambda: inner(5)) == 6


def test_outside_greenback_workers_awaitlet_keeps_its_own_errors(lib: Lib) -> None:
    """A greenlet greenback did not start is no provider: awaitlet() refuses
    there (and outside any event loop), as without greenback, while
    awaitlet's own async_def() still works under a portal."""

    def in_plain_greenlet() -> str:
        child = greenlet.greenlet(lambda: awaitlet(value_after_checkpoint(lib, 0)))
        with pytest.raises(NoAwaitletContext):
            child.switch()
        return awaitlet(value_after_checkpoint(lib, "ok"))

    assert under_portal(lib, "ensure_portal", in_plain_greenlet) == "ok"
    with pytest.raises(NoAwaitletContext):
        awaitlet(value_after_checkpoint(lib, 0))

    async def with_async_def() -> int:
        await greenback.ensure_portal()

        def sync_part() -> int:
            return awaitlet(value_after_checkpoint(lib, 1)) + greenback.await_(
                value_after_checkpoint(lib, 2))

        return await async_def(sync_part)

    assert lib.run(with_async_def) == 3


def test_many_awaitlets_leak_nothing(lib: Lib) -> None:
    sentinel = object()

    def sync_code() -> None:
        for _ in range(10_000):
            assert awaitlet(value_after_checkpoint(lib, sentinel)) is sentinel

    def counts() -> tuple[int, int]:
        gc.collect()
        greenlets = sum(isinstance(obj, greenlet.greenlet) for obj in gc.get_objects())
        return greenlets, sys.getrefcount(sentinel)

    under_portal(lib, "ensure_portal", sync_code)  # warm up the worker pool
    before = counts()
    under_portal(lib, "ensure_portal", sync_code)
    under_portal(lib, "with_portal_run_sync", sync_code)
    assert counts() == before


# --- SQLAlchemy's async ORM ---------------------------------------------------


class Base(DeclarativeBase):
    pass


class Parent(Base):
    __tablename__ = "parent"
    id: Mapped[int] = mapped_column(primary_key=True)
    children: Mapped[list[Child]] = relationship(back_populates="parent")


class Child(Base):
    __tablename__ = "child"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("parent.id"))
    parent: Mapped[Parent] = relationship(back_populates="children")


def run_with_db(
    body: Callable[[AsyncEngine, async_sessionmaker[AsyncSession]], Coroutine[Any, Any, T]],
) -> T:
    """Run body(engine, sessionmaker) on asyncio, with an in-memory database
    holding parent 1 with children 1 and 2, and parent 2 with child 3."""

    async def main() -> T:
        engine = create_async_engine("sqlite+aiosqlite:///:memory:")
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
            sessions = async_sessionmaker(engine, expire_on_commit=False)
            async with sessions() as session:
                session.add_all([
                    Parent(id=1, children=[Child(id=1), Child(id=2)]),
                    Parent(id=2, children=[Child(id=3)]),
                ])
                await session.commit()
            return await body(engine, sessions)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def render(parent: Parent) -> str:
    # Sync code, as in a template or a plugin hook: a lazy load.
    return f"parent {parent.id}: {sorted(child.id for child in parent.children)}"


async def load_parent(session: AsyncSession, parent_id: int = 1) -> Parent:
    parent = (await session.execute(select(Parent).where(Parent.id == parent_id))).scalar_one()
    assert "children" in inspect(parent).unloaded  # so render() must load them
    return parent


@pytest.mark.parametrize("how", ["ensure_portal", "with_portal_run_sync", "tree"])
def test_lazy_load_from_sync_code_under_a_portal(how: str) -> None:
    async def body(engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]) -> str:
        async with sessions() as session:
            parent = await load_parent(session)
            if how == "ensure_portal":
                await greenback.ensure_portal()
                return render(parent)
            if how == "with_portal_run_sync":
                return await greenback.with_portal_run_sync(render, parent)

            async def spawn() -> str:
                return await asyncio.ensure_future(async_render())

            async def async_render() -> str:
                return render(parent)

            return await greenback.with_portal_run_tree(spawn)

    assert run_with_db(body) == "parent 1: [1, 2]"


def test_sync_facade_under_a_portal() -> None:
    """The session's and the engine's sync facades, from sync code."""

    def sync_queries(session: Session, engine: AsyncEngine) -> tuple[int, int, str]:
        children = session.execute(select(Child).order_by(Child.id)).scalars().all()
        with engine.sync_engine.connect() as conn:
            count = conn.execute(text("SELECT count(*) FROM parent")).scalar_one()
        return len(children), count, render(children[-1].parent)

    async def body(engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]) -> Any:
        async with sessions() as session:
            await greenback.ensure_portal()
            return sync_queries(session.sync_session, engine)

    assert run_with_db(body) == (3, 2, "parent 2: [3]")


def test_run_sync_inside_a_portal_keeps_working() -> None:
    """SQLAlchemy's own greenlet_spawn (AsyncSession.run_sync) under a
    portal, with greenback.await_ and awaitlet inside its greenlet."""

    def with_sync_session(session: Session) -> tuple[str, str, int]:
        parent = session.get(Parent, 2)
        assert parent is not None
        return (
            render(parent),
            greenback.await_(asyncio.sleep(0, "await_ inside run_sync")),
            session.execute(select(func.count()).select_from(Child)).scalar_one(),
        )

    async def body(engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]) -> Any:
        async with sessions() as session:
            await greenback.ensure_portal()
            return await session.run_sync(with_sync_session)

    assert run_with_db(body) == ("parent 2: [3]", "await_ inside run_sync", 3)


def test_mixing_await_awaitlet_and_lazy_loads() -> None:
    """One after the other, and nested: a lazy load inside an autoawait-ed
    coroutine function, and inside awaitlet() of a coroutine that awaits
    through greenback again."""

    @greenback.autoawait
    async def described(parent: Parent) -> str:
        await asyncio.sleep(0)
        return render(parent)  # a lazy load inside the autoawait-ed call

    async def via_await_(parent: Parent) -> str:
        await asyncio.sleep(0)
        return greenback.await_(asyncio.sleep(0, described(parent)))

    def sync_code(parents: list[Parent], session: AsyncSession) -> list[str]:
        out = [render(parents[0])]
        out.append(greenback.await_(asyncio.sleep(0, "await_")))
        out.append(awaitlet(asyncio.sleep(0, "awaitlet")))
        session.expire(parents[0], ["children"])
        out.append(described(parents[0]))
        out.append(awaitlet(via_await_(parents[1])))
        return out

    async def body(engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]) -> Any:
        async with sessions() as session:
            parents = [await load_parent(session, 1), await load_parent(session, 2)]
            await greenback.ensure_portal()
            return sync_code(parents, session)

    assert run_with_db(body) == [
        "parent 1: [1, 2]", "await_", "awaitlet", "parent 1: [1, 2]", "parent 2: [3]",
    ]


def test_outside_a_portal_sqlalchemy_error_is_unchanged() -> None:
    """No portal, or a greenlet greenback did not start: MissingGreenlet.
    (SQLAlchemy then leaves the driver's coroutine unawaited, which Python
    warns about once it is collected; that is SQLAlchemy's own behaviour.)"""

    async def body(engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]) -> list[bool]:
        async with sessions() as session:
            parent = await load_parent(session)
            # SQLAlchemy 2.0 raises MissingGreenlet, 2.1 wraps it.
            with pytest.raises((MissingGreenlet, StatementError)) as no_portal:
                render(parent)
            await greenback.ensure_portal()
            with pytest.raises((MissingGreenlet, StatementError)) as foreign_greenlet:
                greenlet.greenlet(render).switch(parent)
            assert render(parent) == "parent 1: [1, 2]"
            return [isinstance(info.value, MissingGreenlet)
                    or isinstance(getattr(info.value, "orig", None), MissingGreenlet)
                    for info in (no_portal, foreign_greenlet)]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        assert run_with_db(body) == [True, True]
        gc.collect()


def test_many_lazy_loads_leak_nothing() -> None:
    async def body(engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]) -> Any:
        async with sessions() as session:
            parent = await load_parent(session)
            await greenback.ensure_portal()

            def loads(n: int) -> None:
                for _ in range(n):
                    session.expire(parent, ["children"])
                    assert render(parent) == "parent 1: [1, 2]"

            def counts() -> tuple[int, int, int]:
                gc.collect()
                greenlets = sum(isinstance(obj, greenlet.greenlet) for obj in gc.get_objects())
                return greenlets, len(asyncio.all_tasks()), sys.getrefcount(parent)

            loads(100)
            before = counts()
            loads(2_000)
            return before, counts()

    before, after = run_with_db(body)
    assert after == before
