"""Replacing a nest_asyncio-style nested run_until_complete() with greenback.

The situation: an old synchronous layer (here, a report renderer) needs data
that now only an async client can fetch. The classic hack is to re-enter the
running loop from sync code:

    import nest_asyncio
    nest_asyncio.apply()               # patches asyncio for the whole process

    def user_name(user_id):
        loop = asyncio.get_event_loop()
        return loop.run_until_complete(fetch_user(user_id))   # nested run

That patches asyncio process-wide and runs other tasks re-entrantly inside
the sync call. With greenback the sync layer calls ``greenback.await_()``
instead, and the subsystem that needs it runs under a *tree portal*, so every
task it starts (TaskGroup, gather, create_task) can use await_() too. Nothing
outside the subsystem changes, and no other task runs re-entrantly.

Run: `.venv/bin/python examples/replace_nest_asyncio.py`
"""

from __future__ import annotations

import asyncio

import greenback

USERS = {1: "ada", 2: "grace", 3: "barbara"}


async def fetch_user(user_id: int) -> str:
    """The new async client (stands in for a database or HTTP call)."""
    await asyncio.sleep(0.01)
    return USERS[user_id]


# --- the old synchronous layer: only this line changed -----------------------


def user_name(user_id: int) -> str:
    return greenback.await_(fetch_user(user_id))


def render_report(user_ids: list[int]) -> str:
    return ", ".join(user_name(i).title() for i in user_ids)


# --- the async application ----------------------------------------------------


async def render_one_page(page: int, user_ids: list[int]) -> str:
    # A task created inside the tree portal: it got its own portal, so the
    # sync renderer can await from here without any ensure_portal().
    return f"page {page}: {render_report(user_ids)}"


async def reporting_subsystem() -> list[str]:
    pages = [[1, 2], [3], [2, 3, 1]]
    tasks = [asyncio.create_task(render_one_page(n, ids)) for n, ids in enumerate(pages)]
    return list(await asyncio.gather(*tasks))


async def main() -> None:
    # The whole subsystem, and every task it spawns, gets await_():
    for line in await greenback.with_portal_run_tree(reporting_subsystem):
        print(line)

    # Tasks outside the tree are untouched: no portal, no patching.
    async def elsewhere() -> bool:
        return greenback.has_portal()

    print("portal outside the subsystem:", await asyncio.create_task(elsewhere()))


if __name__ == "__main__":
    asyncio.run(main())
