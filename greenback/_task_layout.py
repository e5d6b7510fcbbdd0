"""Where asyncio's C Task keeps its coroutine, and whether greenback may
replace it there. The compiled core and its pure-Python twin both use this:
they differ only in how they read and write the task's memory.

The C Task (``_asyncio.Task``) gives Python no way to assign its coroutine,
so giving a running task a portal means writing one pointer inside the task
object. A wrong guess would corrupt memory, so greenback writes only where it
has positively identified the field, on CPython versions whose asyncio it
knows, and writes nothing otherwise.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from . import _tasks
from ._errors import task_layout_unknown_error

# CPython minor versions whose C Task greenback knows. In each, the object
# starts (after the object header) with the loop, and keeps the coroutine, the
# name and the context in three consecutive pointer fields; and every step
# reads the coroutine afresh and drives it through the generic send/throw
# protocol only, so that another coroutine-like object may stand in for it.
# A new CPython version joins only after its asyncio C module was read.
REVIEWED_VERSIONS: tuple[tuple[int, int], ...] = ((3, 10), (3, 11), (3, 12), (3, 13), (3, 14))

# Which field after the coroutine's holds the task's context.
_CONTEXT_AFTER_CORO = 2


def find_coro_offset(task: Any, coro: object, words: Sequence[int], word_size: int) -> int:
    """The byte offset, in *task*, of the pointer to its coroutine *coro*.

    *words* are the pointer-sized words of the task's C structure
    (``_asyncio.Task.__basicsize__`` bytes from the object's address) and
    *word_size* their size. Raises RuntimeError, naming what was not
    recognised, unless every check passes; the caller then writes nothing.
    """
    version = sys.version_info[:2]
    if version not in REVIEWED_VERSIONS:
        raise RuntimeError(
            task_layout_unknown_error(
                f"its asyncio C Task was not reviewed for Python {version[0]}.{version[1]}"
            )
        )
    try:
        context = _tasks.task_context(task)
    except LookupError:
        raise RuntimeError(task_layout_unknown_error("the task's context was not found")) from None
    header = object.__basicsize__ // word_size
    if len(words) <= header or words[header] != id(task.get_loop()):
        raise RuntimeError(
            task_layout_unknown_error("the task's event loop is not its first field")
        )
    found = [i for i in range(header + 1, len(words)) if words[i] == id(coro)]
    if len(found) != 1:
        raise RuntimeError(
            task_layout_unknown_error(
                f"the task holds its coroutine in {len(found)} places, not exactly one"
            )
        )
    index = found[0]
    after = index + _CONTEXT_AFTER_CORO
    if after >= len(words) or words[after] != id(context):
        raise RuntimeError(
            task_layout_unknown_error("the task's context does not follow its coroutine")
        )
    return index * word_size
