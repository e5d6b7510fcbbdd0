"""greenback's per-thread state follows Python thread states, not OS threads,
and does not survive into a forked child.

A native thread that calls into Python (a ctypes callback, a C library's
callback, an embedder's PyGILState_Ensure) gets a new Python thread state for
every call on the same OS thread, and the old one is deleted when the call
returns. A process forked from sync code under a portal inherits the parent's
running step. Each program runs in a subprocess: the failures these guard
against were crashes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

LIBRUN_C = r"""
#include <pthread.h>
typedef void (*cb_t)(int);
static cb_t g_cb; static int g_n;
static void *body(void *arg) { for (int i = 0; i < g_n; i++) g_cb(i); return 0; }
/* Call cb(0) .. cb(n - 1) on one new native thread. */
int run_on_native_thread(cb_t cb, int n) {
    pthread_t t; g_cb = cb; g_n = n;
    if (pthread_create(&t, 0, body, 0)) return -1;
    return pthread_join(t, 0);
}
"""


@pytest.fixture(scope="module")
def librun(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("librun")
    (folder / "librun.c").write_text(LIBRUN_C)
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-o", "librun.so", "librun.c", "-lpthread"],
        cwd=folder, check=True, capture_output=True,
    )
    return folder / "librun.so"


def run_script(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("library", ["asyncio", "trio"])
def test_portal_tasks_in_ctypes_callbacks_on_one_native_thread(librun: Path, library: str) -> None:
    """5 callbacks on one native thread, each a new thread state running 20
    portal tasks (used to crash on the second call: the worker pool of the
    first thread state was gone)."""
    proc = run_script(
        """
        import asyncio, ctypes, sys, threading
        import greenback, trio

        library = sys.argv[2]
        lib = ctypes.CDLL(sys.argv[1])

        async def portal_task(i, results):
            await greenback.ensure_portal()
            if library == "trio":
                results.append(greenback.await_(trio.sleep(0)) or i)
            else:
                results.append(greenback.await_(asyncio.sleep(0, i)))
            results.append(greenback.await_(greenback.with_portal_run_sync(lambda: i)))

        async def main():
            results = []
            if library == "trio":
                async with trio.open_nursery() as nursery:
                    for i in range(20):
                        nursery.start_soon(portal_task, i, results)
            else:
                await asyncio.gather(*(portal_task(i, results) for i in range(20)))
            return sorted(results) == sorted(list(range(20)) * 2)

        @ctypes.CFUNCTYPE(None, ctypes.c_int)
        def callback(k):
            ok = trio.run(main) if library == "trio" else asyncio.run(main())
            print(k, threading.get_ident() != main_thread, ok, flush=True)

        main_thread = threading.get_ident()
        assert lib.run_on_native_thread(callback, 5) == 0
        print("done")
        """,
        str(librun),
        library,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines() == [f"{k} True True" for k in range(5)] + ["done"]


def test_await_suspended_in_a_deleted_thread_state_fails_cleanly(librun: Path) -> None:
    """An await_ left suspended when a callback returns (its thread state is
    then deleted) can't be resumed by the next callback: greenlet would crash
    switching back into it (upstream greenback crashes here). The task fails
    with an error that says why, and nothing crashes, then or at exit."""
    proc = run_script(
        """
        import asyncio, ctypes, sys
        import greenback

        lib = ctypes.CDLL(sys.argv[1])
        state = {}

        async def portal_task(fut):
            await greenback.ensure_portal()
            return "resumed with " + greenback.await_(fut)

        @ctypes.CFUNCTYPE(None, ctypes.c_int)
        def callback(k):
            if k == 0:
                loop = state["loop"] = asyncio.new_event_loop()
                fut = state["fut"] = loop.create_future()
                task = state["task"] = loop.create_task(portal_task(fut))
                for _ in range(3):  # until the task waits on fut, in await_
                    loop.run_until_complete(asyncio.sleep(0))
                print("suspended", not task.done(), flush=True)
            else:
                loop = state["loop"]
                state["fut"].set_result("a value")
                try:
                    loop.run_until_complete(state["task"])
                except RuntimeError as exc:
                    print("refused:", "thread state that has since been deleted" in str(exc))
                loop.run_until_complete(ok_in_this_thread_state())
                loop.close()

        async def ok_in_this_thread_state():
            await greenback.ensure_portal()
            print(greenback.await_(asyncio.sleep(0, "a new portal works")), flush=True)

        assert lib.run_on_native_thread(callback, 2) == 0
        """,
        str(librun),
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines() == ["suspended True", "refused: True", "a new portal works"]


FORK_PROGRAM = """
import asyncio, multiprocessing, os, sys
import greenback

how = sys.argv[1]

async def ticker():
    while True:
        print("tick", os.getpid(), flush=True)
        await asyncio.sleep(0.002)

async def child_main():
    async def sub(i):
        await greenback.ensure_portal()
        return greenback.await_(asyncio.sleep(0.005, i))
    await greenback.ensure_portal()
    results = await asyncio.gather(*(asyncio.create_task(sub(i)) for i in range(5)))
    assert results == list(range(5))
    return greenback.await_(asyncio.sleep(0.01, "child ok"))

def in_child():
    # Still inside the parent's portal step: it must not count as a portal.
    print("child has_portal", greenback.has_portal(), flush=True)
    print("child", os.getpid(), asyncio.run(child_main()), flush=True)

def fork_from_sync_code():
    if how == "os.fork":
        pid = os.fork()
        if pid == 0:
            try:
                in_child()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    else:
        process = multiprocessing.get_context("fork").Process(target=in_child)
        process.start()
        process.join()
        assert process.exitcode == 0, process.exitcode

async def main():
    ticking = asyncio.create_task(ticker())
    await greenback.ensure_portal()
    await asyncio.sleep(0.01)
    fork_from_sync_code()
    greenback.await_(asyncio.sleep(0.01))  # the parent's portal still works
    ticking.cancel()
    print("parent", os.getpid(), flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_fork_from_sync_code_under_a_portal(how: str) -> None:
    """The child runs portal tasks of its own; none of the parent's tasks
    (its ticker) ever runs in the child."""
    proc = run_script(FORK_PROGRAM, how)
    assert (proc.returncode, proc.stderr) == (0, "")
    lines = proc.stdout.splitlines()
    (parent,) = [line.split()[1] for line in lines if line.startswith("parent ")]
    (child_line,) = [line for line in lines if line.startswith("child ") and "ok" in line]
    child = child_line.split()[1]
    assert child_line == f"child {child} child ok"
    assert "child has_portal False" in lines
    ticks = {line.split()[1] for line in lines if line.startswith("tick ")}
    assert ticks == {parent}
