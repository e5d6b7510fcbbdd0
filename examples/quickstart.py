"""greenback in one page: await from a plain function, on asyncio and on Trio.

Run it with `make demo`. Each step prints what happens, so you can follow the
control flow from async code, into an old synchronous layer, and back out to
the event loop through greenback.await_().
"""

from __future__ import annotations

import asyncio

import trio

import greenback


def say(library: str, message: str) -> None:
    print(f"[{library:7}] {message}")


async def fetch(library: str, x: int) -> int:
    """Stands in for real async I/O: it yields to the event loop first."""
    say(library, f"  fetch({x}): waiting on the event loop...")
    if library == "trio":
        await trio.sleep(0.01)
    else:
        await asyncio.sleep(0.01)
    say(library, f"  fetch({x}): back, returning {x * 2}")
    return x * 2


def legacy_sync_layer(library: str, x: int) -> int:
    """A plain `def`, deep in old code, that now needs an async result."""
    say(library, f" legacy_sync_layer({x}): a sync function calls greenback.await_()")
    return greenback.await_(fetch(library, x))


async def main(library: str) -> None:
    say(library, f"has_portal() before: {greenback.has_portal()}")
    await greenback.ensure_portal()  # once per task
    say(library, f"has_portal() after ensure_portal(): {greenback.has_portal()}")

    result = legacy_sync_layer(library, 21)
    say(library, f"legacy_sync_layer(21) returned {result}")
    assert result == 42

    # A portal for one call only, without touching the rest of the task:
    result = await greenback.with_portal_run_sync(legacy_sync_layer, library, 1)
    say(library, f"with_portal_run_sync(legacy_sync_layer, 1) returned {result}")
    assert result == 2


if __name__ == "__main__":
    print(f"greenback {greenback.__version__}")
    asyncio.run(main("asyncio"))
    trio.run(main, "trio")
    print("done: the same sync code ran on both event loops")
