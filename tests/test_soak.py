"""Soak: a long stream of await_() calls and one-shot portals must leave
memory, greenlets and reference counts where they were.

The size comes from GREENBACK_SOAK_SCALE (default 0.02, a few seconds; `make
test-soak` sets 1.0). At scale 1.0, each event loop flavour runs 1,000,000
await_() calls and 200,000 one-shot portals (with_portal_run_sync and
with_portal_run) in one process, in batches of concurrent tasks. After a
warm-up, and then after every batch, it measures resident memory, the
number of live greenlets and portals, and the reference counts of the
objects passed through, and requires them to stay put.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import greenlet
import pytest
import trio

import greenback
from greenback._select import impl

from conftest import Lib

SCALE = float(os.environ.get("GREENBACK_SOAK_SCALE", "0.02"))
FULL_AWAITS = 1_000_000
FULL_PORTALS = 200_000
BATCHES = 20  # measured batches, after the warm-up
WARMUP_BATCHES = 3
PORTAL_TASKS = 50  # tasks with ensure_portal(), doing await_() in a loop
ONE_SHOT_TASKS = 50  # tasks without a portal, using one-shot portals
# Together more tasks than greenback keeps parked workers (64), so every
# batch also creates and discards workers.

MIB = 1024 * 1024
RSS_SLACK = 4 * MIB
GREENLET_SLACK = 2


class Carrier(Exception):
    """Carries the payload out of an awaitable, through await_()."""


def rss_bytes() -> int:
    """Resident set size, from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Sample:
    rss: int
    greenlets: int
    portals: int
    refcounts: tuple[int, ...]

    def describe(self) -> str:
        return (
            f"rss={self.rss / MIB:.1f}MiB greenlets={self.greenlets} "
            f"portals={self.portals} refcounts={self.refcounts}"
        )


def sample(*tracked: object) -> Sample:
    gc.collect()
    greenlets = portals = 0
    for obj in gc.get_objects():
        if isinstance(obj, greenlet.greenlet):
            greenlets += 1
        elif type(obj) is impl.Portal:
            portals += 1
    # getrefcount's own argument adds one to each, the same every time.
    return Sample(rss_bytes(), greenlets, portals, tuple(sys.getrefcount(o) for o in tracked))


@dataclass
class Counts:
    awaits: int = 0
    portals: int = 0


class Workload:
    """One batch: PORTAL_TASKS tasks doing await_() of several kinds, and
    ONE_SHOT_TASKS tasks using one-shot portals, all at once."""

    def __init__(self, lib: Lib, payload: object, result: object, counts: Counts) -> None:
        self.lib = lib
        self.payload = payload
        self.result = result
        self.counts = counts

    # --- what await_() awaits ------------------------------------------------

    async def suspends(self, arg: object) -> object:
        assert arg is self.payload
        await self.lib.checkpoint()
        return self.result

    async def at_once(self, arg: object) -> object:
        assert arg is self.payload
        return self.result

    async def raises(self, arg: object) -> object:
        await self.lib.checkpoint()
        raise Carrier(arg)

    async def nested(self, arg: object) -> object:
        await self.lib.checkpoint()
        return self.sync_await(arg)

    def sync_await(self, arg: object) -> object:
        self.counts.awaits += 1
        return greenback.await_(self.suspends(arg))

    # --- portal tasks ---------------------------------------------------------

    def sync_rounds(self, n: int) -> None:
        payload, result, counts = self.payload, self.result, self.counts
        for k in range(n):
            kind = k % 4
            if kind == 0:
                assert greenback.await_(self.suspends(payload)) is result
            elif kind == 1:
                assert greenback.await_(self.at_once(payload)) is result
            elif kind == 2:
                try:
                    greenback.await_(self.raises(payload))
                except Carrier as exc:
                    assert exc.args[0] is payload
                    del exc
                else:  # pragma: no cover
                    raise AssertionError("no exception")
            else:  # await_ of a coroutine that uses await_ itself
                counts.awaits += 1
                assert greenback.await_(self.nested(payload)) is result
                continue
            counts.awaits += 1

    async def portal_task(self, n: int) -> None:
        await greenback.ensure_portal()
        self.sync_rounds(n)

    # --- one-shot portals -------------------------------------------------------

    def sync_fn(self, arg: object, *, kw: object = None) -> object:
        assert arg is self.payload
        return self.sync_await(arg)

    async def async_fn(self, arg: object) -> object:
        await self.lib.checkpoint()
        return self.sync_await(arg)

    def sync_raises(self, arg: object) -> object:
        self.sync_await(arg)
        raise Carrier(arg)

    async def one_shot_task(self, n: int) -> None:
        payload, result, counts = self.payload, self.result, self.counts
        for k in range(n):
            kind = k % 4
            if kind == 0:
                got = await greenback.with_portal_run_sync(self.sync_fn, payload)
            elif kind == 1:
                got = await greenback.with_portal_run(self.async_fn, payload)
            elif kind == 2:
                got = await greenback.with_portal_run_sync(self.sync_fn, payload, kw=payload)
            else:
                try:
                    await greenback.with_portal_run_sync(self.sync_raises, payload)
                except Carrier as exc:
                    assert exc.args[0] is payload
                    del exc
                else:  # pragma: no cover
                    raise AssertionError("no exception")
                got = result
            assert got is result
            del got
            counts.portals += 1

    # --- a batch ----------------------------------------------------------------

    async def batch(self, awaits: int, portals: int) -> None:
        per_portal_task = math.ceil(max(awaits - portals, 0) / PORTAL_TASKS)
        per_one_shot_task = math.ceil(portals / ONE_SHOT_TASKS)
        jobs: list[Callable[[], Awaitable[None]]] = []
        for _ in range(PORTAL_TASKS):
            jobs.append(lambda: self.portal_task(per_portal_task))
        for _ in range(ONE_SHOT_TASKS):
            jobs.append(lambda: self.one_shot_task(per_one_shot_task))
        if self.lib.sniffio_name == "trio":
            async with trio.open_nursery() as nursery:
                for job in jobs:
                    nursery.start_soon(job)
        else:
            await asyncio.gather(*(job() for job in jobs))


def test_soak(lib: Lib) -> None:
    total_awaits = max(int(FULL_AWAITS * SCALE), 1)
    total_portals = max(int(FULL_PORTALS * SCALE), 1)
    awaits_per_batch = math.ceil(total_awaits / BATCHES)
    portals_per_batch = math.ceil(total_portals / BATCHES)
    payload = object()
    result = object()
    counts = Counts()
    workload = Workload(lib, payload, result, counts)

    async def measure() -> Sample:
        # Let the loop drop what it still holds of the finished batch (the
        # callbacks that asyncio.gather() leaves scheduled).
        for _ in range(3):
            await lib.checkpoint()
        return sample(payload, result)

    async def main() -> list[Sample]:
        for _ in range(WARMUP_BATCHES):
            await workload.batch(awaits_per_batch, portals_per_batch)
        counts.awaits = counts.portals = 0
        samples = [await measure()]
        for _ in range(BATCHES):
            await workload.batch(awaits_per_batch, portals_per_batch)
            samples.append(await measure())
        return samples

    samples = lib.run(main)
    history = "\n".join(s.describe() for s in samples)
    print(f"\nsoak on {lib.name} at scale {SCALE}: {counts.awaits} await_() calls, "
          f"{counts.portals} one-shot portals\n{history}")
    assert counts.awaits >= total_awaits
    assert counts.portals >= total_portals
    base = samples[0]
    for s in samples[1:]:
        assert s.refcounts == base.refcounts, history
        assert abs(s.greenlets - base.greenlets) <= GREENLET_SLACK, history
        # Relative to the start: earlier tests in this process may have left a
        # portal alive (a task stuck on a future of a closed loop).
        assert s.portals == base.portals, history
    growth = max(s.rss for s in samples) - base.rss
    # Under AddressSanitizer (make test-asan) freed memory sits in ASan's
    # quarantine, so resident memory says nothing about leaks there.
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):
        assert growth < RSS_SLACK, history


def test_soak_scale_is_sane() -> None:
    """A typo in GREENBACK_SOAK_SCALE must not silently turn the soak into
    nothing."""
    assert SCALE > 0
    if "GREENBACK_SOAK_SCALE" not in os.environ:
        assert SCALE == pytest.approx(0.02)
