"""Every Trio task gets a portal: greenback.AutoPortalInstrument.

Passing the instrument to trio.run() gives each task of the run a portal as
it is spawned, the main task and every nursery child and grandchild alike.
Sync code can then call greenback.await_() anywhere in the program, and
there is not a single ensure_portal() call.
"""

from __future__ import annotations

import trio

import greenback

# --- sync code: a crawler's page parser that needs to fetch more pages -----

SITE = {"/": ["/docs", "/blog"], "/docs": ["/docs/api"], "/blog": [], "/docs/api": []}


async def fetch_links(path: str) -> list[str]:
    await trio.sleep(0.01)  # stands in for an HTTP request
    return SITE[path]


def links_of(path: str) -> list[str]:
    return greenback.await_(fetch_links(path))


def report(send: trio.MemorySendChannel[str], path: str, links: list[str]) -> None:
    # A sync call that waits whenever the channel is full.
    greenback.await_(send.send(f"{path} -> {', '.join(links) or '(no links)'}"))


# --- async code: a nursery per level, no portal set-up anywhere -------------


async def crawl(path: str, send: trio.MemorySendChannel[str]) -> None:
    async with send:  # each crawler closes its own clone of the channel
        links = links_of(path)  # a sync call, in a nursery child
        report(send, path, links)
        async with trio.open_nursery() as nursery:
            for link in links:
                nursery.start_soon(crawl, link, send.clone())


async def main() -> None:
    print("main task has a portal:", greenback.has_portal())
    send, receive = trio.open_memory_channel[str](1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(crawl, "/", send)
        lines = [line async for line in receive]
    # Children finish in an order Trio picks at random: sort for the printout.
    print("\n".join(sorted(lines)))


if __name__ == "__main__":
    trio.run(main, instruments=[greenback.AutoPortalInstrument()])
