# The public types of greenback. The definitions live, precisely typed, in the
# modules that implement them (ParamSpec keeps the wrapped function's
# parameters, so `with_portal_run(fetch, "wrong")` is an error like
# `await fetch("wrong")` is). This stub exists because AutoPortalInstrument is
# created on first access at run time, which type checkers cannot follow.

from typing import Literal

from ._portal import (
    await_ as await_,
    bestow_portal as bestow_portal,
    ensure_portal as ensure_portal,
    has_portal as has_portal,
    with_portal_run as with_portal_run,
    with_portal_run_sync as with_portal_run_sync,
)
from ._trio_instrument import AutoPortalInstrument as AutoPortalInstrument
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
from ._version import __version__ as __version__

# Which implementation is active: the compiled core, or its pure-Python twin
# (chosen at import; see greenback._select).
__implementation__: Literal["compiled", "pure-python"]

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
