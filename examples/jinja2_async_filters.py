"""Jinja2 filters and globals that call async code, in an ordinary sync Environment.

A template's filters run synchronously while the template renders. Turning
them async normally means switching the whole Environment to
enable_async=True and every render() call to `await render_async()`. With
greenback the filters stay plain callables: @greenback.autoawait turns an
async function into a sync one that awaits it through the task's portal,
and greenback.async_iter lets a template loop over an async generator.
The only requirement is that render() runs inside a portal.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Iterator

import jinja2

import greenback

USERS = {1: "Ada Lovelace", 2: "Grace Hopper"}
ORDERS = {1: [("lamp", 3900), ("ink", 450)], 2: [("compiler", 99900)]}
EUR_PER_USD = 0.92


async def round_trip() -> None:
    await asyncio.sleep(0.001)  # stands in for a database or HTTP request


@greenback.autoawait
async def exchange_rate() -> float:
    """Global: `{{ exchange_rate() }}`, the current USD to EUR rate."""
    await round_trip()
    return EUR_PER_USD


@greenback.autoawait
async def display_name(user_id: int) -> str:
    """Filter: `{{ user_id | display_name }}`."""
    await round_trip()
    return USERS[user_id]


def to_eur(cents: int) -> str:
    """Filter: `{{ cents | to_eur }}`. A plain function that calls an
    autoawait one is as sync as any other."""
    return f"EUR {cents * exchange_rate() / 100:.2f}"


async def fetch_orders(user_id: int) -> AsyncIterator[tuple[str, int]]:
    for order in ORDERS[user_id]:
        await round_trip()  # one row at a time, as a server cursor would
        yield order


def orders(user_id: int) -> Iterator[tuple[str, int]]:
    """Global: `{% for item, cents in orders(user_id) %}`."""
    return greenback.async_iter(fetch_orders(user_id))


TEMPLATE = """\
Rate: 1 USD = {{ exchange_rate() }} EUR
{% for uid in user_ids -%}
{{ uid | display_name }}:
{%- for item, cents in orders(uid) %}
  - {{ item }}: {{ cents | to_eur }}
{%- endfor %}
{% endfor %}"""


async def main() -> None:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)  # a sync environment
    env.filters["display_name"] = display_name
    env.filters["to_eur"] = to_eur
    env.globals["orders"] = orders
    env.globals["exchange_rate"] = exchange_rate
    template = env.from_string(TEMPLATE)

    # A one-shot portal around the plain, synchronous render() call.
    page = await greenback.with_portal_run_sync(template.render, user_ids=[1, 2])
    print(page, end="")

    # Without a portal the first async filter fails with a clear error.
    try:
        template.render(user_ids=[1])
    except RuntimeError as exc:
        print("without a portal:", str(exc).split(":")[0])


if __name__ == "__main__":
    asyncio.run(main())
