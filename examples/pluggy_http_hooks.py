"""pluggy hooks written as plain functions that call an async HTTP client.

pluggy calls every hook implementation synchronously, so a plugin cannot
`await`. Under a greenback portal it doesn't need to: the sync hookimpl
calls greenback.await_(client.get(...)) and the request runs on the host's
event loop, through the host's shared httpx.AsyncClient.

The HTTP service is a tiny hand-written ASGI app that httpx serves in-process
(httpx.ASGITransport), so the example needs no network.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable, MutableMapping

import httpx
import pluggy

import greenback

hookspec = pluggy.HookspecMarker("shop")
hookimpl = pluggy.HookimplMarker("shop")

PRICES = {"apple": 120, "pear": 95}  # cents
STOCK = {"apple": 40, "pear": 7}


async def shop_api(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> None:
    """GET /price/<item> and GET /stock/<item>, answered in JSON."""
    _, table, item = scope["path"].split("/")
    await asyncio.sleep(0.01)  # pretend to be a slow backend
    value = {"price": PRICES, "stock": STOCK}[table][item]
    body = json.dumps({"item": item, table: value}).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ShopSpec:
    @hookspec
    def quote_line(self, item: str, quantity: int) -> str:  # type: ignore[empty-body]
        """Each plugin contributes one remark about an order line."""


def get_json(client: httpx.AsyncClient, path: str) -> Any:
    """Sync helper shared by the plugins: one async GET, awaited from sync code."""
    response = greenback.await_(client.get(path))
    response.raise_for_status()
    return response.json()


class Plugin:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client  # the host's client, shared by all plugins


class Pricing(Plugin):
    @hookimpl
    def quote_line(self, item: str, quantity: int) -> str:
        cents = get_json(self.client, f"/price/{item}")["price"]
        return f"{quantity} x {item} = {cents * quantity / 100:.2f}"


class Stock(Plugin):
    @hookimpl
    def quote_line(self, item: str, quantity: int) -> str:
        left = get_json(self.client, f"/stock/{item}")["stock"]
        return "in stock" if left >= quantity else f"only {left} left"


async def main() -> None:
    transport = httpx.ASGITransport(app=shop_api)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.example") as client:
        pm = pluggy.PluginManager("shop")
        pm.add_hookspecs(ShopSpec)
        pm.register(Pricing(client))
        pm.register(Stock(client))  # registered last, so pluggy calls it first

        await greenback.ensure_portal()  # this task may now run the hooks
        for item, quantity in [("apple", 3), ("pear", 12)]:
            print(f"{item}:", "; ".join(pm.hook.quote_line(item=item, quantity=quantity)))

        # Hooks for several lines at once, each in its own task with a
        # one-shot portal: their requests overlap on the event loop.
        quotes = await asyncio.gather(*(
            greenback.with_portal_run_sync(pm.hook.quote_line, item=item, quantity=1)
            for item in ["pear", "apple"]
        ))
        print("concurrent:", quotes)


if __name__ == "__main__":
    asyncio.run(main())
