"""A logging.Handler that ships records to an async sink.

logging calls Handler.emit() synchronously, from wherever the log call is.
This handler hands each formatted record to an async sink (here a bounded
asyncio.Queue drained by a collector task, standing in for a log shipper)
with greenback.await_(queue.put(...)): when the collector lags, the logging
task waits for room instead of blocking the event loop or dropping lines.

await_ needs a portal in the calling task. Where there is none (a task that
never called ensure_portal(), a worker thread), the handler does not fail:
it checks greenback.has_portal() and passes the record to a plain sync
fallback handler instead.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import greenback


class AsyncSinkHandler(logging.Handler):
    def __init__(self, queue: asyncio.Queue[str], fallback: logging.Handler) -> None:
        super().__init__()
        self.queue = queue
        self.fallback = fallback

    def emit(self, record: logging.LogRecord) -> None:
        if not greenback.has_portal():
            self.fallback.handle(record)  # cannot wait here: use the sync path
            return
        # While this waits, logging holds the handler's lock, a per-thread
        # RLock: other tasks of this thread still get in, other threads wait.
        try:
            greenback.await_(self.queue.put(self.format(record)))
        except Exception:
            self.handleError(record)  # as any handler does for a failed emit


async def collector(queue: asyncio.Queue[str]) -> None:
    while True:
        line = await queue.get()
        await asyncio.sleep(0.001)  # shipping takes a while
        print(f"  shipped: {line}")
        queue.task_done()


# --- old sync code that knows nothing about async -------------------------

log = logging.getLogger("billing")


def charge(customer: str, cents: int) -> None:
    log.info("charging %s %.2f", customer, cents / 100)
    validate(cents)


def validate(cents: int) -> None:
    if cents > 10_000:
        log.warning("large charge: %d cents", cents)


# --- the async application --------------------------------------------------


async def main() -> None:
    queue: asyncio.Queue[str] = asyncio.Queue(maxsize=2)
    fallback = logging.StreamHandler(sys.stdout)
    fallback.setFormatter(logging.Formatter("  fallback: %(levelname)s %(message)s"))
    handler = AsyncSinkHandler(queue, fallback)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    shipper = asyncio.create_task(collector(queue))

    print("task with a portal:")
    await greenback.ensure_portal()
    for customer, cents in [("ada", 1250), ("grace", 25000), ("barbara", 800)]:
        charge(customer, cents)  # may wait for room in the queue
    await queue.join()

    print("a new task (portals are per task, it has none):")
    await asyncio.create_task(charge_in_a_task("edsger", 20000))
    print("a worker thread:")
    await asyncio.to_thread(charge, "frances", 300)
    shipper.cancel()


async def charge_in_a_task(customer: str, cents: int) -> None:
    charge(customer, cents)


if __name__ == "__main__":
    asyncio.run(main())
