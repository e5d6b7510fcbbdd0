"""One sync-calls-async program, run by anyio on asyncio and on Trio.

The sync layer below awaits anyio primitives through greenback.await_() and
greenback.async_context(): anyio.sleep(), a CapacityLimiter and a memory
object stream. A task group starts the workers, each with a portal of its
own (one ensure_portal() in the worker), and the main task then runs the
same sync code in a one-shot portal (with_portal_run_sync). Only the
__main__ block names a backend: greenback follows whichever anyio runs.
"""

from __future__ import annotations

import anyio
import sniffio
from anyio.abc import ObjectSendStream

import greenback

PRICES = {"tea": 4, "cake": 7, "soup": 9}


async def lookup_price(item: str) -> int:
    await anyio.sleep(0.01)  # stands in for a request to a pricing service
    return PRICES[item]


# --- the sync layer -----------------------------------------------------------


def price_order(items: list[str], limiter: anyio.CapacityLimiter) -> int:
    with greenback.async_context(limiter):  # at most two orders at a time
        total = sum(greenback.await_(lookup_price(item)) for item in items)
    return total


def publish(send: ObjectSendStream[str], order_id: int, total: int) -> None:
    # The stream has no buffer: this waits until main() takes the line.
    greenback.await_(send.send(f"order {order_id}: {total}"))


# --- the async application ----------------------------------------------------


async def worker(
    order_id: int,
    items: list[str],
    limiter: anyio.CapacityLimiter,
    send: ObjectSendStream[str],
) -> None:
    await greenback.ensure_portal()
    async with send:
        publish(send, order_id, price_order(items, limiter))


async def main() -> None:
    orders = [["tea", "cake"], ["soup"], ["tea", "tea", "soup"]]
    limiter = anyio.CapacityLimiter(2)
    send, receive = anyio.create_memory_object_stream[str]()
    async with anyio.create_task_group() as tg:
        async with send:  # each worker closes its own clone
            for order_id, items in enumerate(orders):
                tg.start_soon(worker, order_id, items, limiter, send.clone())
        async with receive:
            lines = [line async for line in receive]
    # Tasks finish in an order the backend picks: sort for the printout.
    print(f"[{sniffio.current_async_library()}]", "; ".join(sorted(lines)))

    total = await greenback.with_portal_run_sync(price_order, ["cake"] * 3, limiter)
    print(f"[{sniffio.current_async_library()}] three cakes: {total}")


if __name__ == "__main__":
    for backend in ("asyncio", "trio"):
        anyio.run(main, backend=backend)
