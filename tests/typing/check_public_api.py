"""What a type checker sees of greenback's public API.

mypy checks this file (`make typecheck`); nothing runs it. `assert_type`
lines pin the inferred types. Lines marked `# type: ignore[code]` are
mistakes the types must catch: mypy runs with --warn-unused-ignores, so if a
signature is loosened and stops catching one, the ignore becomes unused and
the check fails.
"""

from __future__ import annotations

import asyncio
import functools
from contextlib import asynccontextmanager
from typing import Any, AsyncGenerator, AsyncIterator, Callable, ParamSpec, TypeVar

import trio
from typing_extensions import assert_type

import greenback
from greenback._util import async_generator

P = ParamSpec("P")
T = TypeVar("T")


async def fetch(x: int, y: str = "") -> bytes:
    return b""


def compute(x: int) -> float:
    return 0.0


# --- portals ------------------------------------------------------------------


async def portals(aio_task: asyncio.Task[int], trio_task: trio.lowlevel.Task) -> None:
    assert_type(await greenback.ensure_portal(), None)
    assert_type(greenback.bestow_portal(aio_task), None)
    assert_type(greenback.bestow_portal(trio_task), None)
    assert_type(greenback.has_portal(), bool)
    assert_type(greenback.has_portal(aio_task), bool)
    assert_type(greenback.has_portal(trio_task), bool)
    assert_type(greenback.has_portal(None), bool)

    assert_type(await greenback.with_portal_run(fetch, 1), bytes)
    assert_type(await greenback.with_portal_run(fetch, 1, y="z"), bytes)
    assert_type(await greenback.with_portal_run_sync(compute, 1), float)
    assert_type(await greenback.with_portal_run_tree(fetch, 1, "z"), bytes)
    assert_type(greenback.await_(fetch(1)), bytes)
    assert_type(greenback.await_(asyncio.sleep(0, "slept")), str)

    # Mistakes in what is passed through with_portal_run*:
    await greenback.with_portal_run(fetch, "wrong")  # type: ignore[arg-type]
    await greenback.with_portal_run(fetch)  # type: ignore[call-arg]
    await greenback.with_portal_run(fetch, 1, z=2)  # type: ignore[call-arg]
    await greenback.with_portal_run(compute, 1)  # type: ignore[arg-type]
    await greenback.with_portal_run_sync(compute, "wrong")  # type: ignore[arg-type]
    await greenback.with_portal_run_sync(compute)  # type: ignore[call-arg]
    await greenback.with_portal_run_tree(fetch, "wrong")  # type: ignore[arg-type]
    greenback.await_(42)  # type: ignore[arg-type]
    greenback.has_portal(42)  # type: ignore[arg-type]
    greenback.bestow_portal("task")  # type: ignore[arg-type]

    with greenback.portals_for_children() as nothing:
        assert_type(nothing, None)
    async with greenback.portals_for_tree() as nothing_either:
        assert_type(nothing_either, None)


def instruments() -> None:
    instrument: trio.abc.Instrument = greenback.AutoPortalInstrument()
    assert_type(greenback.AutoPortalInstrument().tasks, dict[trio.lowlevel.Task, int])
    trio.run(portals_for_trio, instruments=[instrument])


async def portals_for_trio() -> None:
    await greenback.with_portal_run_tree(fetch, 1)


# --- autoawait ----------------------------------------------------------------


class Account:
    @greenback.autoawait
    async def balance(self, currency: str) -> float:
        return 0.0


def adapters_sync() -> None:
    sync_fetch = greenback.autoawait(fetch)
    assert_type(sync_fetch(1), bytes)
    assert_type(sync_fetch(1, y="z"), bytes)
    assert_type(Account().balance("EUR"), float)
    sync_fetch("wrong")  # type: ignore[arg-type]
    sync_fetch()  # type: ignore[call-arg]
    Account().balance(1)  # type: ignore[arg-type]
    greenback.autoawait(compute)  # type: ignore[arg-type]


# --- decorate_as_sync ---------------------------------------------------------


def keeps_signature(fn: Callable[P, T]) -> Callable[P, T]:
    return fn


async def decorated() -> None:
    cached = greenback.decorate_as_sync(functools.lru_cache(maxsize=16))(fetch)
    assert_type(await cached(1), bytes)

    same = greenback.decorate_as_sync(keeps_signature)(fetch)
    assert_type(await same(1, "z"), bytes)
    await same("wrong")  # type: ignore[arg-type]


# --- async_context and async_iter ---------------------------------------------


@asynccontextmanager
async def resource(name: str) -> AsyncIterator[int]:
    yield len(name)


async def numbers() -> AsyncIterator[int]:
    yield 1


async def conversation() -> AsyncGenerator[int, str]:
    reply = yield 1
    assert_type(reply, str)


def adapters_iter() -> None:
    with greenback.async_context(resource("x")) as value:
        assert_type(value, int)
    greenback.async_context(resource)  # type: ignore[arg-type]

    for number in greenback.async_iter(numbers()):
        assert_type(number, int)
    plain = greenback.async_iter(numbers())
    assert_type(plain, greenback.async_iter[int])
    plain.send(None)  # type: ignore[attr-defined]

    talk = greenback.async_iter(conversation())
    assert_type(talk, async_generator[int, str])
    assert_type(next(talk), int)
    assert_type(talk.send("hi"), int)
    assert_type(talk.throw(ValueError()), int)
    assert_type(talk.close(), None)
    talk.send(1)  # type: ignore[arg-type]

    greenback.async_iter([1, 2])  # type: ignore[call-overload]


def sync_generator() -> Any:
    # `yield from` forwards send/throw/close to the async generator.
    return (yield from greenback.async_iter(conversation()))
