"""Magic methods and properties backed by async code.

Python calls __init__, __getitem__, __iter__, __enter__ and property getters
synchronously, so none of them can be `async def`. greenback's adapters fill
the gap, as long as the calling task has a portal:

- @greenback.autoawait turns an async method into a sync one: here
  __init__, __getitem__, __setitem__ and a property getter;
- greenback.async_iter(agen) lets __iter__ hand out an async generator;
- greenback.async_context(acm) lets __enter__/__exit__ delegate to an async
  context manager, exceptions included.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from types import TracebackType
from typing import AsyncIterator, Iterator

import greenback


async def round_trip() -> None:
    await asyncio.sleep(0.001)  # stands in for a network request


class RemoteDict:
    """A client for a (pretend) remote key-value store with a dict-like API."""

    @greenback.autoawait  # type checkers see the undecorated `async def`:
    async def __init__(self, bucket: str) -> None:  # type: ignore[misc]
        await round_trip()  # connect
        self.bucket = bucket
        self._data: dict[str, str] = {}

    @greenback.autoawait
    async def __getitem__(self, key: str) -> str:
        await round_trip()
        return self._data[key]

    @greenback.autoawait
    async def __setitem__(self, key: str, value: str) -> None:
        await round_trip()
        self._data[key] = value

    @property
    @greenback.autoawait
    async def size(self) -> int:
        await round_trip()
        return len(self._data)

    async def _scan(self) -> AsyncIterator[str]:
        for key in sorted(self._data):
            await round_trip()  # one page of keys per request
            yield key

    def __iter__(self) -> Iterator[str]:
        return greenback.async_iter(self._scan())

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[RemoteDict]:
        snapshot = dict(self._data)
        await round_trip()  # BEGIN
        try:
            yield self
        except Exception as exc:
            self._data = snapshot  # ROLLBACK
            print(f"  rolled back after {exc!r}")
        else:
            await round_trip()  # COMMIT
            print("  committed")

    def __enter__(self) -> RemoteDict:
        self._txn = greenback.async_context(self._transaction())
        return self._txn.__enter__()

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        # True when the async context manager swallowed the exception.
        return self._txn.__exit__(typ, exc, tb)


def sync_business_logic() -> None:
    """Ordinary sync code: nothing here looks async."""
    colors = RemoteDict("colors")
    with colors:
        colors["sky"] = "blue"
        colors["grass"] = "green"
    print("size:", colors.size)
    print("sky:", colors["sky"])
    with colors:
        colors["sky"] = "plaid"
        raise ValueError("not a color")  # handled by _transaction()
    print("sky after rollback:", colors["sky"])
    print("keys:", [key for key in colors])
    print("'grass' in colors:", "grass" in colors)  # falls back to __iter__


async def main() -> None:
    await greenback.ensure_portal()
    sync_business_logic()


if __name__ == "__main__":
    asyncio.run(main())
