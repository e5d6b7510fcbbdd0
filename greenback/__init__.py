"""greenback: await from synchronous code, inside a running asyncio or Trio task.

``await greenback.ensure_portal()`` once in a task; after that, any plain
function below it can call ``greenback.await_(some_coroutine())``.
"""

from ._version import __version__ as __version__
from ._core import await_ as await_
from ._portal import (
    bestow_portal as bestow_portal,
    ensure_portal as ensure_portal,
    has_portal as has_portal,
    with_portal_run as with_portal_run,
    with_portal_run_sync as with_portal_run_sync,
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

