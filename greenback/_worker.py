"""The bottom frame of greenback's worker greenlets.

It is Python on purpose: greenlet refuses to change ``gr_context`` on a
suspended greenlet whose stack has no Python frame, and greenback gives each
worker the context of the task it serves.
"""

from __future__ import annotations

from typing import Callable


def run_worker(serve: Callable[[], None]) -> None:
    serve()
