"""greenback's worker greenlets: their class, and their bottom frame.

The bottom frame is Python on purpose: greenlet refuses to change
``gr_context`` on a suspended greenlet whose stack has no Python frame, and
greenback gives each worker the context of the task it serves.

Workers are "greenlet providers", in the protocol that SQLAlchemy's async ORM
(``await_only()``, behind lazy loads and the ``sync_session`` facade) and
awaitlet (``awaitlet()``) use to await from sync code: the greenlet's class
has ``__sqlalchemy_greenlet_provider__ = True``, and code running in it
awaits with ``getcurrent().parent.switch(awaitable)``, expecting that call to
return the result or raise the exception. For a worker, ``parent`` (as
Python code sees it) is a view of the greenlet running the portal's step
whose ``switch(awaitable)`` awaits right there, with greenback's ``await_``:
the same two greenlet switches per suspension as ``await_``, and code inside
the awaitable can await through greenback again. greenlet itself, and
greenback's C code, still see the real parent.
"""

from __future__ import annotations

from typing import Any, Callable

import greenlet

# The real parent of a greenlet, whatever its class says.
_greenlet_parent = greenlet.greenlet.__dict__["parent"]


def real_parent(g: greenlet.greenlet) -> greenlet.greenlet | None:
    parent: greenlet.greenlet | None = _greenlet_parent.__get__(g, type(g))
    return parent


class WorkerGreenlet(greenlet.greenlet):
    """The greenlet that runs a portal's steps (see this module). Each
    implementation uses a subclass made by make_worker_class()."""

    __sqlalchemy_greenlet_provider__ = True


def make_worker_class(view: Callable[[greenlet.greenlet], Any]) -> type[WorkerGreenlet]:
    """The worker greenlet class of an implementation: `view(worker)` makes
    what `worker.parent` returns. `view` itself is the getter, so that no
    Python frame runs when it is a C type."""
    namespace = {"parent": property(view, _greenlet_parent.__set__), "__slots__": ()}
    return type("WorkerGreenlet", (WorkerGreenlet,), namespace)


def run_worker(serve: Callable[[], None]) -> None:
    serve()
