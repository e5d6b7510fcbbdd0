from __future__ import annotations

import greenback

from conftest import Lib


def test_await_from_sync_code(any_lib: Lib) -> None:
    async def double(x: int) -> int:
        await any_lib.checkpoint()
        return x * 2

    def legacy_sync_layer(x: int) -> int:
        return greenback.await_(double(x))

    async def main() -> None:
        await greenback.ensure_portal()
        assert legacy_sync_layer(21) == 42
        assert await greenback.with_portal_run_sync(legacy_sync_layer, 1) == 2

    any_lib.run(main)
