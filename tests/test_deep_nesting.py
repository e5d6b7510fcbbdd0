"""Deep sync -> async nesting never crashes: it works, or raises
RecursionError, whatever the recursion limit.

Each level of `await_(with_portal_run_sync(f))` where `f` awaits again runs
one more portal step in a new worker greenlet, which starts below the
caller's C stack. Python 3.10 and 3.11 do not guard C recursion, so with the
recursion limit raised (as recursive programs do) deep nesting would run off
the end of the thread's stack; the compiled core checks the room left at
every await_() and every portal step. Python 3.12 and 3.13 count C calls
instead; the compiled core stops before that count runs out, since 3.13
corrupts memory when it runs out as await_() starts a coroutine. Each
program runs in a subprocess, since the failure this guards against is a
crash.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import pure_python

NEST_PROGRAM = """
import asyncio, sys, threading
import greenback, trio

sys.setrecursionlimit(1_000_000)
depth, library, where = int(sys.argv[1]), sys.argv[2], sys.argv[3]

async def leaf():
    if library == "trio":
        await trio.sleep(0)
    else:
        await asyncio.sleep(0)
    return "leaf"

def nest(n):
    if n == 0:
        return greenback.await_(leaf())
    return greenback.await_(greenback.with_portal_run_sync(nest, n - 1))

async def main():
    return await greenback.with_portal_run_sync(nest, depth)

def run():
    try:
        print("ok", trio.run(main) if library == "trio" else asyncio.run(main()))
    except RecursionError:
        print("RecursionError")
    # Whatever happened, the thread can still use portals.
    async def again():
        await greenback.ensure_portal()
        return greenback.await_(leaf())
    print("after", trio.run(again) if library == "trio" else asyncio.run(again()))

if where == "thread":
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
else:
    run()
"""


def run_program(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=600,
    )


@pytest.mark.parametrize("library", ["asyncio", "trio"])
@pytest.mark.parametrize("depth", [300, 2_000, 10_000, 30_000])
def test_deep_nesting_works_or_raises_recursion_error(depth: int, library: str) -> None:
    proc = run_program(NEST_PROGRAM, str(depth), library, "main")
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcome, after = proc.stdout.splitlines()
    assert after == "after leaf"
    # CPython 3.12 allows only 1,500 nested C calls, about 500 levels here
    # (upstream greenback stops there too); 2,000 levels fit every other
    # version's stack and limits.
    if depth == 300 or (depth == 2_000 and sys.version_info[:2] != (3, 12)):
        assert outcome == "ok leaf"
    else:
        assert outcome in ("ok leaf", "RecursionError")


@pytest.mark.parametrize("library", ["asyncio", "trio"])
def test_deep_nesting_in_a_thread_with_a_small_stack(library: str) -> None:
    """A thread's stack is found per thread: 1 MiB holds far fewer levels."""
    proc = run_program(
        "import threading; threading.stack_size(1 << 20)\n" + textwrap.dedent(NEST_PROGRAM),
        "30000", library, "thread",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["RecursionError", "after leaf"]


@pytest.mark.parametrize("library", ["asyncio", "trio"])
def test_deep_plain_recursion_inside_a_portal_step(library: str) -> None:
    """Sync recursion under a portal, up to the recursion limit, behaves as
    it does outside one: RecursionError at the limit, and the portal works
    afterwards."""
    proc = run_program(
        """
        import asyncio, sys
        import greenback, trio

        library = sys.argv[1]
        sys.setrecursionlimit(20_000)

        def recurse(n):
            return n if n == 0 else 1 + recurse(n - 1)

        def sync_code():
            below = recurse(15_000)
            try:
                recurse(10 ** 6)
            except RecursionError:
                hit_limit = True
            nap = trio.sleep(0) if library == "trio" else asyncio.sleep(0)
            greenback.await_(nap)
            return below, hit_limit

        async def main():
            return await greenback.with_portal_run_sync(sync_code)

        print(trio.run(main) if library == "trio" else asyncio.run(main()))
        """,
        library,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == "(15000, True)\n"


def test_stack_room_is_measured_per_thread() -> None:
    """The compiled guard's own measure: less room deeper in the stack."""
    if pure_python():
        import greenback._purepy

        assert not hasattr(greenback._purepy, "_stack_room")
        return
    import greenback._core

    def room_at(depth: int) -> int:
        return greenback._core._stack_room() if depth == 0 else room_at(depth - 1)

    assert 0 < room_at(50) <= room_at(0)


def test_refused_awaits_do_not_use_up_the_nesting_budget() -> None:
    """A non-awaitable handed to await_() fails before it nests: thousands
    of such calls leave the thread's nesting depth as it was."""
    proc = run_program(
        """
        import asyncio
        import greenback

        async def main():
            await greenback.ensure_portal()
            for _ in range(20_000):
                try:
                    greenback.await_(42)
                except TypeError:
                    pass
            return greenback.await_(asyncio.sleep(0, "still works"))

        print(asyncio.run(main()))
        """
    )
    assert (proc.returncode, proc.stderr, proc.stdout) == (0, "", "still works\n")

