"""greenback: await from synchronous code, inside a running asyncio or Trio task.

``await greenback.ensure_portal()`` once in a task; after that, any plain
function below it can call ``greenback.await_(some_coroutine())``.
"""

from ._version import __version__ as __version__
from ._core import (
    await_ as await_,
    with_portal_run as with_portal_run,
    with_portal_run_sync as with_portal_run_sync,
)
from ._portal import (
    bestow_portal as bestow_portal,
    ensure_portal as ensure_portal,
    has_portal as has_portal,
)

__all__ = [
    "__version__",
    "await_",
    "bestow_portal",
    "ensure_portal",
    "has_portal",
    "with_portal_run",
    "with_portal_run_sync",
]


def _mark_as_coroutine_functions() -> None:
    # with_portal_run* return awaitable portal objects rather than native
    # coroutines (one object fewer per call); tell asyncio and inspect that
    # calling them gives something to await.
    import inspect
    from asyncio import coroutines

    for fn in (with_portal_run, with_portal_run_sync):
        fn._is_coroutine = coroutines._is_coroutine  # type: ignore[attr-defined]
        if hasattr(inspect, "markcoroutinefunction"):
            inspect.markcoroutinefunction(fn)


_mark_as_coroutine_functions()
del _mark_as_coroutine_functions
