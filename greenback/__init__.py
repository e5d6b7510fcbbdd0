"""greenback: await from synchronous code, inside a running asyncio or Trio task.

``await greenback.ensure_portal()`` once in a task; after that, any plain
function below it can call ``greenback.await_(some_coroutine())``.

The other ways to get a portal: ``bestow_portal(task)`` gives one to
another task, ``with_portal_run(async_fn, ...)`` and
``with_portal_run_sync(sync_fn, ...)`` give one for a single call, and
``with_portal_run_tree``, ``portals_for_tree``, ``portals_for_children`` and
``AutoPortalInstrument`` give portals to the tasks that a piece of code
spawns (the first two to that code's own task as well).
``has_portal()`` tells whether ``await_`` would work. The adapters
``autoawait``, ``decorate_as_sync``, ``async_context`` and ``async_iter``
fit async functions, decorators, context managers and iterators into
synchronous code. ``__implementation__`` says whether the compiled core or
its pure-Python twin is running.
"""

from typing import Any

from ._version import __version__ as __version__
from ._select import IMPLEMENTATION as __implementation__
# stackscope's built-in glue for upstream greenback reads greenback._impl, and
# stackscope calls _stackscope_install_glue_ at its first extraction.
from ._stackscope import compat_impl as _impl
from ._stackscope import install_glue as _stackscope_install_glue_
from ._portal import (
    await_ as await_,
    bestow_portal as bestow_portal,
    ensure_portal as ensure_portal,
    has_portal as has_portal,
    with_portal_run as with_portal_run,
    with_portal_run_sync as with_portal_run_sync,
)
from ._tree import (
    portals_for_children as portals_for_children,
    portals_for_tree as portals_for_tree,
    with_portal_run_tree as with_portal_run_tree,
)
from ._util import (
    async_context as async_context,
    async_iter as async_iter,
    autoawait as autoawait,
    decorate_as_sync as decorate_as_sync,
)


__all__ = [
    "AutoPortalInstrument",
    "__implementation__",
    "__version__",
    "async_context",
    "async_iter",
    "autoawait",
    "await_",
    "bestow_portal",
    "decorate_as_sync",
    "ensure_portal",
    "has_portal",
    "portals_for_children",
    "portals_for_tree",
    "with_portal_run",
    "with_portal_run_sync",
    "with_portal_run_tree",
]


def __getattr__(name: str) -> Any:
    # AutoPortalInstrument subclasses trio.abc.Instrument; build it on first
    # use so that asyncio programs never import Trio.
    if name == "AutoPortalInstrument":
        from ._trio_instrument import AutoPortalInstrument

        return AutoPortalInstrument
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
