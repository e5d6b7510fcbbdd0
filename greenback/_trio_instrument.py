"""The Trio instrument behind the tree portals. Importing this module imports
Trio, so greenback only does so when a Trio program asks for tree portals."""

from __future__ import annotations

import trio

from ._portal import set_coro
from ._select import impl

_holder: trio.lowlevel.RunVar[AutoPortalInstrument | None] = trio.lowlevel.RunVar(
    "greenback_instrument", default=None
)


def instrument_holder() -> trio.lowlevel.RunVar[AutoPortalInstrument | None]:
    """The run's shared instrument, while any tree scope is active in it."""
    return _holder


class AutoPortalInstrument(trio.abc.Instrument):
    """A Trio instrument that gives portals to tasks as they are spawned.

    Passed to ``trio.run()``, as in
    ``trio.run(main, instruments=[greenback.AutoPortalInstrument()])``, it
    gives every task of the run a portal for its whole life: the main task,
    Trio's system tasks, and everything they spawn. So it also covers the
    system tasks, which :func:`with_portal_run_tree` leaves out. It works
    from the start of the run; added later with
    ``trio.lowlevel.add_instrument()``, it does nothing on its own.

    The tree functions (:func:`with_portal_run_tree`,
    :func:`portals_for_tree`, :func:`portals_for_children`) rely on an
    instance of this class, which they manage themselves: one instance per
    run, shared by all their scopes, added when the first scope begins and
    removed when the last one ends (or, if one was passed to ``trio.run()``,
    that one is used). Only code that wants portals for the whole run needs
    to create one.

    This class is for Trio only: it subclasses ``trio.abc.Instrument``, so the
    first use of ``greenback.AutoPortalInstrument`` imports Trio, which
    greenback otherwise leaves unimported in asyncio programs. asyncio has no
    instruments; there the tree functions use a task factory instead.

    The constructor takes no arguments. Checkpoints do not apply: Trio calls
    the instrument's hooks itself.

    Example:

    >>> async def record(found):
    ...     found.append(greenback.has_portal())
    >>> async def main():
    ...     found = [greenback.has_portal()]
    ...     trio.lowlevel.spawn_system_task(record, found)
    ...     async with trio.open_nursery() as nursery:
    ...         nursery.start_soon(record, found)
    ...     return found
    >>> trio.run(main, instruments=[greenback.AutoPortalInstrument()])
    [True, True, True]
    """

    def __init__(self) -> None:
        # Tasks whose new children get portals, each with the number of its
        # nurseries that were open when its scope began: children of those
        # enclosing nurseries get none.
        self.tasks: dict[trio.lowlevel.Task, int] = {}
        self.refs = 0

    def before_run(self) -> None:
        # Only called when passed to trio.run(): then it stays all run.
        self.refs = 1
        _holder.set(self)

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        nursery = task.parent_nursery
        if nursery is None:
            # The init task: seen only when passed to trio.run(), which asks
            # for portals everywhere.
            self._portalize(task)
            return
        parent = nursery.parent_task
        first_nursery = self.tasks.get(parent)
        if first_nursery is None:
            return
        if parent.child_nurseries.index(nursery) >= first_nursery:
            self._portalize(task)

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self.tasks.pop(task, None)

    def _portalize(self, task: trio.lowlevel.Task) -> None:
        coro: object = task.coro
        if not isinstance(coro, impl.Portal):
            # A task is spawned before its coroutine first runs.
            set_coro(task, task.coro, impl.make_task_portal(task.coro, False))
        self.tasks[task] = 0


AutoPortalInstrument.__module__ = "greenback"
