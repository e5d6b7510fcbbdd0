"""Giving an asyncio C Task a portal writes one pointer inside the task. These
tests pin that greenback writes only where it has positively identified the
coroutine field, and that on any layout it does not recognise it raises a
clear error and leaves the task's memory exactly as it was."""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import sys
from typing import Any, Callable, Sequence

import pytest

import greenback
from greenback import _task_layout, _tasks
from greenback._errors import TASK_LAYOUT_ERROR
from greenback._select import impl

pytestmark = pytest.mark.skipif(not _tasks.C_TASK_TYPES, reason="no asyncio C Task here")

WORD = ctypes.sizeof(ctypes.c_void_p)
HEADER = object.__basicsize__ // WORD
VERSION = f"Python {sys.version_info[0]}.{sys.version_info[1]}"


# --- the detection, against fake tasks ----------------------------------------------


class FakeTask:
    """Just what the detection asks of a task: its loop and its context."""

    def __init__(self) -> None:
        self.loop = object()
        self.context = contextvars.copy_context()

    def get_loop(self) -> object:
        return self.loop

    def get_context(self) -> contextvars.Context:
        return self.context


def fake_words(task: FakeTask, coro: object, coro_index: int = HEADER + 10) -> list[int]:
    """A task laid out as CPython 3.10-3.14 do: loop first, then the
    coroutine, its name, and its context next to each other."""
    words = [0] * (coro_index + 6)
    words[HEADER] = id(task.loop)
    words[coro_index] = id(coro)
    words[coro_index + 1] = id("Task-1")
    words[coro_index + 2] = id(task.context)
    return words


def test_a_recognised_layout_gives_the_coroutine_field() -> None:
    task, coro = FakeTask(), object()
    words = fake_words(task, coro, HEADER + 7)
    assert _task_layout.find_coro_offset(task, coro, words, WORD) == (HEADER + 7) * WORD


def _shuffled_context(task: FakeTask, coro: object) -> list[int]:
    words = fake_words(task, coro)
    i = words.index(id(coro))
    words[i + 1], words[i + 2] = words[i + 2], words[i + 1]  # name and context swapped
    return words


def _coro_twice(task: FakeTask, coro: object) -> list[int]:
    words = fake_words(task, coro)
    words[HEADER + 3] = id(coro)  # a second field holding the coroutine
    return words


def _no_coro(task: FakeTask, coro: object) -> list[int]:
    words = fake_words(task, coro)
    return [0 if w == id(coro) else w for w in words]  # kept somewhere else


def _loop_moved(task: FakeTask, coro: object) -> list[int]:
    return [0] + fake_words(task, coro)  # a new field before the loop


def _coro_at_the_end(task: FakeTask, coro: object) -> list[int]:
    return fake_words(task, coro)[: fake_words(task, coro).index(id(coro)) + 1]


@pytest.mark.parametrize(
    "layout, reason",
    [
        (_shuffled_context, "context does not follow its coroutine"),
        (_coro_twice, "holds its coroutine in 2 places"),
        (_no_coro, "holds its coroutine in 0 places"),
        (_loop_moved, "event loop is not its first field"),
        (_coro_at_the_end, "context does not follow its coroutine"),
    ],
)
def test_an_unrecognised_layout_is_refused(
    layout: Callable[[FakeTask, object], list[int]], reason: str
) -> None:
    task, coro = FakeTask(), object()
    with pytest.raises(RuntimeError) as info:
        _task_layout.find_coro_offset(task, coro, layout(task, coro), WORD)
    message = str(info.value)
    assert reason in message
    assert VERSION in message
    assert "changed nothing" in message and "Upgrade greenback" in message


def test_an_unreviewed_python_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_task_layout, "REVIEWED_VERSIONS", ())
    task, coro = FakeTask(), object()
    with pytest.raises(RuntimeError, match=f"was not reviewed for {VERSION}"):
        _task_layout.find_coro_offset(task, coro, fake_words(task, coro), WORD)


def test_a_task_whose_context_cannot_be_told_is_refused() -> None:
    class NoContextTask:
        loop = object()

        def get_loop(self) -> object:
            return self.loop

    task, coro = NoContextTask(), object()
    words = [0] * (HEADER + 16)
    words[HEADER] = id(task.loop)
    words[HEADER + 5] = id(coro)
    with pytest.raises(RuntimeError, match="context was not found"):
        _task_layout.find_coro_offset(task, coro, words, WORD)


# --- on real tasks: a refusal writes nothing ----------------------------------------


def _task_bytes(task: object) -> bytes:
    """The task's own fields: all of its C struct but the object header
    (whose reference count the error's traceback changes)."""
    size = _tasks.C_TASK_TYPES[0].__basicsize__
    return ctypes.string_at(id(task) + object.__basicsize__, size - object.__basicsize__)


@pytest.fixture
def fresh_detection() -> Any:
    """Make the next swap look for the coroutine field again, and forget
    whatever a test made it find."""
    impl._forget_c_task_coro_offset()
    yield
    impl._forget_c_task_coro_offset()


def run_refused_ensure_portal() -> str:
    """Run a C Task whose ensure_portal() is refused; check that the task's
    memory and coroutine are untouched and that it runs on; return the error."""

    async def victim() -> str:
        task = asyncio.current_task()
        assert task is not None and isinstance(task, _tasks.C_TASK_TYPES)
        coro = task.get_coro()
        before = _task_bytes(task)
        with pytest.raises(RuntimeError) as info:
            await greenback.ensure_portal()
        assert _task_bytes(task) == before
        assert task.get_coro() is coro
        assert not greenback.has_portal()
        await asyncio.sleep(0)  # the task still steps its own coroutine
        return str(info.value)

    async def main() -> str:
        return await asyncio.create_task(victim())

    return asyncio.run(main())


@pytest.mark.usefixtures("fresh_detection")
def test_unreviewed_version_leaves_the_task_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_task_layout, "REVIEWED_VERSIONS", ())
    message = run_refused_ensure_portal()
    assert f"was not reviewed for {VERSION}" in message
    assert "GREENBACK_NO_EXTENSIONS=1 does not help" in message


@pytest.mark.usefixtures("fresh_detection")
def test_moved_context_field_leaves_the_task_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real words of the real task, read as if CPython had moved the
    # context field away from the coroutine.
    real = _task_layout.find_coro_offset

    def moved(task: Any, coro: object, words: Sequence[int], word_size: int) -> int:
        words = list(words)
        words[words.index(id(coro)) + 2] = 0
        return real(task, coro, words, word_size)

    monkeypatch.setattr(_task_layout, "find_coro_offset", moved)
    assert "context does not follow its coroutine" in run_refused_ensure_portal()


@pytest.mark.usefixtures("fresh_detection")
def test_a_wrong_field_is_caught_before_the_write(monkeypatch: pytest.MonkeyPatch) -> None:
    # Even if detection settled on the wrong field (here: the name, next to
    # the coroutine), the check before each write finds no coroutine there.
    real = _task_layout.find_coro_offset
    monkeypatch.setattr(
        _task_layout, "find_coro_offset", lambda *args: real(*args) + WORD
    )
    assert run_refused_ensure_portal() == TASK_LAYOUT_ERROR


@pytest.mark.usefixtures("fresh_detection")
def test_an_offset_outside_the_task_is_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    size = _tasks.C_TASK_TYPES[0].__basicsize__
    monkeypatch.setattr(_task_layout, "find_coro_offset", lambda *args: size)
    assert f"placed at byte {size} of {size}" in run_refused_ensure_portal()


def test_set_c_task_coro_takes_only_c_tasks() -> None:
    with pytest.raises(TypeError, match="expected an _asyncio.Task"):
        impl.set_c_task_coro(object(), None, None)


@pytest.mark.usefixtures("fresh_detection")
def test_detection_on_this_python_finds_the_field() -> None:
    async def uses_portal() -> str:
        await greenback.ensure_portal()
        return greenback.await_(asyncio.sleep(0, "through the portal"))

    async def main() -> list[str]:
        return await asyncio.gather(*(uses_portal() for _ in range(3)))

    assert asyncio.run(main()) == ["through the portal"] * 3


# Where the field is on 64-bit builds with the GIL, from the TaskObj of each
# version's Modules/_asynciomodule.c (3.14's read from its source, not run).
EXPECTED_OFFSETS = {(3, 10): 160, (3, 11): 136, (3, 12): 136, (3, 13): 120, (3, 14): 128}


@pytest.mark.skipif(
    WORD != 8 or object.__basicsize__ != 16 or sys.version_info[:2] not in EXPECTED_OFFSETS,
    reason="offsets pinned for 64-bit builds with the usual object header",
)
def test_the_field_is_where_the_reviewed_source_puts_it() -> None:
    async def main() -> int:
        task = asyncio.current_task()
        size = _tasks.C_TASK_TYPES[0].__basicsize__
        words = list((ctypes.c_void_p * (size // WORD)).from_address(id(task)))
        return _task_layout.find_coro_offset(
            task, task.get_coro(), [w or 0 for w in words], WORD  # type: ignore[union-attr]
        )

    assert asyncio.run(main()) == EXPECTED_OFFSETS[sys.version_info[:2]]
