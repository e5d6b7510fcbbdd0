"""greenback beside its neighbours: one scenario, measured alike for each.

The scenario: inside a running event loop, async code calls a plain function
which, three frames down, needs the result of `add_one`, an async function
that yields to the loop once. Every approach supplies the same two halves
(see `Approach`): how async code runs the sync function, and how the sync
function gets a coroutine's result. Each approach is one small function in
the "Approaches" section, so they read side by side.

For each approach, the script times the scenario: median of 5 rounds of N
calls, each round also timing a plain `await` of the same coroutine through
three async frames, in the same process, so that the ratio stands up to
drift in machine load. Then it probes the approach's behaviour:

* loop thread: does the sync code run in the loop's own thread?
* without its entry: what happens when sync code awaits without the
  approach's setup or entry (the exact error message);
* Trio and uvloop: does the same scenario run there?
* contextvars: does a ContextVar set by the async caller show up in the sync
  code, and in the awaited coroutine? Does one set inside the awaited
  coroutine show up afterwards in the sync code?
* cancellation: `asyncio.wait_for(..., 0.05)` around the entry while the
  sync code awaits `asyncio.sleep(10)`: when does `wait_for` give up, is the
  sleep cancelled, when do the sync frames unwind?
* nesting: can the awaited coroutine run sync code that awaits again?
* process-wide patches: asyncio's module-level functions and classes, the
  loop and policy classes, and a few interpreter hooks are compared before
  and after the approach ran; anything replaced is listed.

Every approach runs in a fresh interpreter of its own, since some of them
patch asyncio for the whole process. Run this file as a script (not with
`-m` from the repository root, where the source tree would shadow the
installed greenback):

    python benchmarks/neighbours.py            # full run, a few minutes
    python benchmarks/neighbours.py --quick    # small N, a smoke run
    python benchmarks/neighbours.py --only awaitlet anyio

requirements/neighbours.txt lists what to install beside greenback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import functools
import importlib
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

AddOne = Callable[[int], Coroutine[Any, Any, int]]


class Wait(Protocol):
    """Sync code's way to get a coroutine's result."""

    def __call__(self, coro: Coroutine[Any, Any, T], /) -> T: ...


class Call(Protocol):
    """Async code's way to run a sync function that may use `Wait`."""

    def __call__(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Awaitable[T]: ...


@dataclass(frozen=True)
class Approach:
    title: str
    needs: str  # what the async side must do before sync code can await
    wait: Wait
    call: Call | None = None  # None: async code calls the sync function directly
    setup: Callable[[], Awaitable[None]] | None = None  # once in each task
    claims_trio: bool = False  # does the library say it supports Trio?
    scale: float = 1.0  # fraction of N to time (thread hops are slow)


def _module(name: str) -> ModuleType:
    """Import a neighbour. They are untyped or not installed everywhere, so
    their functions are used as `Any` here, each behind a typed `Approach`."""
    return importlib.import_module(name)


async def _await(aw: Awaitable[T]) -> T:
    return await aw


# --------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------


async def add_one(x: int) -> int:
    await asyncio.sleep(0)
    return x + 1


def level1(wait: Wait, afn: AddOne, x: int) -> int:
    return level2(wait, afn, x)


def level2(wait: Wait, afn: AddOne, x: int) -> int:
    return level3(wait, afn, x)


def level3(wait: Wait, afn: AddOne, x: int) -> int:
    return wait(afn(x))


async def run_sync(a: Approach, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run sync code from async code the way approach `a` does."""
    if a.call is None:
        return fn(*args, **kwargs)
    return await a.call(fn, *args, **kwargs)


async def time_calls(a: Approach, n: int, afn: AddOne = add_one) -> float:
    """Seconds per call: n calls of the sync code, each through the entry."""
    if a.setup is not None:
        await a.setup()
    wait, call, total = a.wait, a.call, 0
    start = time.perf_counter()
    if call is None:
        for i in range(n):
            total += level1(wait, afn, i)
    else:
        for i in range(n):
            total += await call(level1, wait, afn, i)
    elapsed = time.perf_counter() - start
    assert total == n * (n + 1) // 2, total
    return elapsed / n


def many_calls(wait: Wait, afn: AddOne, n: int) -> int:
    return sum(level1(wait, afn, i) for i in range(n))


async def time_awaits(a: Approach, n: int, afn: AddOne = add_one) -> float:
    """Seconds per await: one entry, then n awaits from the sync code."""
    if a.setup is not None:
        await a.setup()
    start = time.perf_counter()
    total = await run_sync(a, many_calls, a.wait, afn, n)
    elapsed = time.perf_counter() - start
    assert total == n * (n + 1) // 2, total
    return elapsed / n


async def alevel1(afn: AddOne, x: int) -> int:
    return await alevel2(afn, x)


async def alevel2(afn: AddOne, x: int) -> int:
    return await alevel3(afn, x)


async def alevel3(afn: AddOne, x: int) -> int:
    return await afn(x)


async def time_baseline(n: int, afn: AddOne = add_one) -> float:
    """The same chain written as async functions: a plain `await`."""
    total = 0
    start = time.perf_counter()
    for i in range(n):
        total += await alevel1(afn, i)
    elapsed = time.perf_counter() - start
    assert total == n * (n + 1) // 2, total
    return elapsed / n


async def time_rounds(a: Approach | None, n: int, runs: int, afn: AddOne = add_one) -> dict[str, float]:
    """Median seconds per call over `runs` rounds. Every round also times a
    plain `await` in the same process, so that drift in machine load hits
    both alike and the ratio holds."""
    rounds: dict[str, list[float]] = {"baseline": [], "per_call": [], "per_await": []}
    for warm_up in [True] + [False] * runs:
        m = n // 10 + 1 if warm_up else n
        base = await time_baseline(m, afn)
        per_call = base if a is None else await time_calls(a, m, afn)
        per_await = base if a is None else await time_awaits(a, m, afn)
        if not warm_up:
            rounds["baseline"].append(base)
            rounds["per_call"].append(per_call)
            rounds["per_await"].append(per_await)
    return {key: statistics.median(values) for key, values in rounds.items()}


def fmt_us(t: dict[str, float]) -> str:
    return f"yes, {t['per_call'] * 1e6:.2f} µs ({t['per_call'] / t['baseline']:.1f}×)"


# --------------------------------------------------------------------------
# Approaches
# --------------------------------------------------------------------------


def greenback_portal() -> Approach:
    import greenback

    return Approach(
        "greenback `ensure_portal()`",
        "`await ensure_portal()` once per task",
        wait=greenback.await_,
        setup=greenback.ensure_portal,
        claims_trio=True,
    )


def greenback_one_shot() -> Approach:
    import greenback

    return Approach(
        "greenback `with_portal_run_sync()`",
        "entry `with_portal_run_sync(fn)`",
        wait=greenback.await_,
        call=greenback.with_portal_run_sync,
        claims_trio=True,
    )


def awaitlet_() -> Approach:
    awaitlet = _module("awaitlet")
    return Approach(
        "awaitlet",
        "entry `async_def(fn)`",
        wait=awaitlet.awaitlet,
        call=awaitlet.async_def,
    )


def sqlalchemy_() -> Approach:
    util = _module("sqlalchemy.util")
    return Approach(
        "SQLAlchemy `greenlet_spawn`",
        "entry `greenlet_spawn(fn)`",
        wait=util.await_only,
        call=util.greenlet_spawn,
    )


def greenletio_(with_context: bool = False) -> Approach:
    greenletio = _module("greenletio")

    def call(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Awaitable[T]:
        result: Awaitable[T] = greenletio.async_(fn, with_context=with_context)(*args, **kwargs)
        return result

    return Approach(
        "greenletio" + (" `with_context=True`" if with_context else ""),
        f"entry `async_(fn{', with_context=True' if with_context else ''})`",
        wait=greenletio.await_,
        call=call,
    )


def nest_asyncio_(package: str) -> Approach:
    nest = _module(package)

    async def setup() -> None:
        nest.apply()

    def wait(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.get_event_loop().run_until_complete(coro)

    return Approach(
        package,
        "`apply()` (patches asyncio), then `loop.run_until_complete`",
        wait=wait,
        setup=setup,
    )


def asgiref_() -> Approach:
    # async_to_sync refuses to run in the loop's thread (see "without its
    # entry"); the documented way out is a sync_to_async thread first.
    sync = _module("asgiref.sync")

    async def call(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        result: T = await sync.sync_to_async(fn)(*args, **kwargs)
        return result

    def wait(coro: Coroutine[Any, Any, T]) -> T:
        result: T = sync.async_to_sync(_await)(coro)
        return result

    return Approach(
        "asgiref `sync_to_async` + `async_to_sync`",
        "entry `sync_to_async(fn)` (a worker thread)",
        wait=wait,
        call=call,
        scale=0.1,
    )


def anyio_() -> Approach:
    import anyio.from_thread
    import anyio.to_thread

    async def call(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    def wait(coro: Coroutine[Any, Any, T]) -> T:
        return anyio.from_thread.run(_await, coro)

    return Approach(
        "anyio `to_thread` + `from_thread.run`",
        "entry `to_thread.run_sync(fn)` (a worker thread)",
        wait=wait,
        call=call,
        claims_trio=True,
        scale=0.1,
    )


APPROACHES: dict[str, Callable[[], Approach]] = {
    "greenback-portal": greenback_portal,
    "greenback-one-shot": greenback_one_shot,
    "awaitlet": awaitlet_,
    "sqlalchemy": sqlalchemy_,
    "greenletio": greenletio_,
    "greenletio-context": functools.partial(greenletio_, with_context=True),
    "nest_asyncio": functools.partial(nest_asyncio_, "nest_asyncio"),
    "nest_asyncio2": functools.partial(nest_asyncio_, "nest_asyncio2"),
    "asgiref": asgiref_,
    "anyio": anyio_,
}

DISTRIBUTIONS = [
    "greenback", "greenlet", "awaitlet", "SQLAlchemy", "greenletio", "nest_asyncio",
    "nest-asyncio2", "asgiref", "anyio", "trio", "uvloop",
]


# --------------------------------------------------------------------------
# Probes: each returns a short finding for the table
# --------------------------------------------------------------------------


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


async def probe_without_entry(a: Approach) -> str:
    coro = add_one(1)
    try:
        result = a.wait(coro)
    except Exception as exc:
        coro.close()
        return describe(exc)
    return "works" if result == 2 else f"wrong result {result!r}"


async def probe_loop_thread(a: Approach) -> str:
    def where(wait: Wait) -> int:
        wait(add_one(0))
        return threading.get_ident()

    if a.setup is not None:
        await a.setup()
    return "yes" if await run_sync(a, where, a.wait) == threading.get_ident() else "no"


VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


async def probe_contextvars(a: Approach) -> str:
    async def read() -> str:
        await asyncio.sleep(0)
        return VAR.get()

    async def write() -> None:
        await asyncio.sleep(0)
        VAR.set("coro")

    def sync_side(wait: Wait) -> tuple[str, str, str]:
        in_sync = VAR.get()
        in_coro = wait(read())
        wait(write())
        return in_sync, in_coro, VAR.get()

    if a.setup is not None:
        await a.setup()
    VAR.set("caller")
    seen = await run_sync(a, sync_side, a.wait)
    expected = ("caller", "caller", "coro")
    return " / ".join("yes" if s == e else "no" for s, e in zip(seen, expected))


TIMEOUT = 0.05


@dataclass
class Unwinding:
    coro: str = "still sleeping"
    sync: str = "still running"
    sync_at: float | None = None


async def probe_cancellation(a: Approach) -> str:
    seen = Unwinding()
    start = time.perf_counter()

    def since_deadline() -> float:
        return time.perf_counter() - start - TIMEOUT

    async def long_sleep() -> None:
        try:
            await asyncio.sleep(10)
            seen.coro = f"ran to its end at +{since_deadline():.1f} s"
        except asyncio.CancelledError:
            seen.coro = "cancelled"
            raise

    def sync_side(wait: Wait) -> None:
        try:
            wait(long_sleep())
            seen.sync = "returned"
        except BaseException as exc:
            seen.sync = f"got {type(exc).__name__}"
            raise
        finally:
            seen.sync_at = since_deadline()

    async def task() -> None:
        if a.setup is not None:
            await a.setup()
        await run_sync(a, sync_side, a.wait)

    try:
        await asyncio.wait_for(task(), TIMEOUT)
        outcome = "no timeout"
    except TimeoutError:
        outcome = "TimeoutError"
    except Exception as exc:
        outcome = describe(exc)
    returned = since_deadline()
    unwound = seen.sync_at is not None
    # Leave no thread behind for the next probe.
    while seen.sync_at is None and since_deadline() < 15:
        await asyncio.sleep(0.05)
    if seen.sync_at is None:
        return f"{outcome} after {fmt_s(returned)}; sync frames still running at +15 s"
    leak = "" if unwound else " (still running in a thread when wait_for returned)"
    return (
        f"{outcome} after {fmt_s(returned)}; sleep {seen.coro}; "
        f"sync frames {seen.sync} at +{fmt_s(seen.sync_at)}{leak}"
    )


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.1f} s"


async def probe_nesting(a: Approach) -> str:
    async def add_two(x: int) -> int:
        # Awaited from sync code; runs sync code that awaits again.
        return await run_sync(a, level1, a.wait, add_one, x) + 1

    async def task() -> int:
        if a.setup is not None:
            await a.setup()
        return await run_sync(a, level1, a.wait, add_two, 1)

    # wait_for runs task() as a task of its own (hence the setup inside it).
    result = await asyncio.wait_for(task(), 10)
    return "yes" if result == 3 else f"wrong result {result!r}"


def probe_trio(a: Approach | None, n: int) -> str:
    import trio

    async def trio_add_one(x: int) -> int:
        await trio.sleep(0)
        return x + 1

    return fmt_us(trio.run(time_rounds, a, n, 3, trio_add_one))


def probe_uvloop(a: Approach | None, n: int) -> str:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return fmt_us(runner.run(time_rounds(a, n, 3)))


def process_state() -> dict[str, int]:
    """Identities of what a library might replace for the whole process."""
    import asyncio.base_events
    import asyncio.events
    import asyncio.futures
    import asyncio.tasks

    spaces: dict[str, dict[str, Any]] = {
        "asyncio": vars(asyncio),
        "asyncio.events": vars(asyncio.events),
        "asyncio.tasks": vars(asyncio.tasks),
        "asyncio.futures": vars(asyncio.futures),
        "asyncio.base_events": vars(asyncio.base_events),
    }
    for cls in [*asyncio.SelectorEventLoop.__mro__, type(asyncio.get_event_loop_policy())]:
        spaces[cls.__name__] = dict(vars(cls))
    state = {
        f"{space}.{name}": id(value)
        for space, names in spaces.items()
        for name, value in names.items()
        if callable(value) and not name.startswith("__")
    }
    for hook in ["excepthook", "unraisablehook", "breakpointhook"]:
        state[f"sys.{hook}"] = id(getattr(sys, hook))
    state["sys.gettrace()"] = id(sys.gettrace())
    state["sys.getprofile()"] = id(sys.getprofile())
    return state


# --------------------------------------------------------------------------
# Worker: one approach in this interpreter, one JSON line per finding
# --------------------------------------------------------------------------


def report(key: str, value: object) -> None:
    print(json.dumps({key: value}), flush=True)


def attempt(key: str, probe: Callable[[], str]) -> None:
    try:
        report(key, probe())
    except Exception as exc:
        report(key, f"no: {describe(exc)}")


def run_worker(name: str, n: int, runs: int) -> None:
    before = process_state()
    if name == "baseline":
        a = None
    else:
        a = APPROACHES[name]()
        report("title", a.title)
        report("needs", a.needs)
        report("claims_trio", a.claims_trio)
        attempt("without_entry", lambda: asyncio.run(probe_without_entry(a)))
    n = max(int(n * (a.scale if a else 1.0)), 10)
    report("n", n)
    for key, value in asyncio.run(time_rounds(a, n, runs)).items():
        report(key, value)
    if a is not None:
        attempt("loop_thread", lambda: asyncio.run(probe_loop_thread(a)))
        attempt("contextvars", lambda: asyncio.run(probe_contextvars(a)))
        attempt("cancellation", lambda: asyncio.run(probe_cancellation(a)))
        attempt("nesting", lambda: asyncio.run(probe_nesting(a)))
    attempt("trio", lambda: probe_trio(a, max(n // 4, 10)))
    attempt("uvloop", lambda: probe_uvloop(a, max(n // 4, 10)))
    after = process_state()
    report("patches", sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)))


# --------------------------------------------------------------------------
# Orchestrator: a fresh interpreter per approach, then the tables
# --------------------------------------------------------------------------


def run_one(name: str, n: int, runs: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", name, "-n", str(n), "--runs", str(runs)]
    found: dict[str, Any] = {}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stdout = proc.stdout
        if proc.returncode != 0:
            found["problem"] = f"worker exited with {proc.returncode}: {proc.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired as exc:
        # Captured output comes back as bytes here, whatever `text` says.
        stdout = exc.stdout.decode() if exc.stdout else ""
        found["problem"] = f"killed after {timeout:.0f} s"
    for line in stdout.splitlines():
        if line.startswith("{"):
            found.update(json.loads(line))
    return found


def cell(value: object) -> str:
    text = "—" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N: a smoke run")
    parser.add_argument("-n", type=int, default=20_000, help="calls per timed run")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (the median is kept)")
    parser.add_argument("--only", nargs="+", choices=list(APPROACHES), help="approaches to run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.n, args.runs = 200, 3
    if args.worker:
        run_worker(args.worker, args.n, args.runs)
        return

    print(f"Python {platform.python_version()}, {platform.machine()}; N = {args.n}, "
          f"median of {args.runs} runs")
    print("; ".join(f"{d} {version(d)}" for d in DISTRIBUTIONS))
    print(f"greenback implementation: {_module('greenback').__implementation__}\n")
    names = ["baseline", *(args.only or APPROACHES)]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_one(name, args.n, args.runs, timeout=120 + args.n * args.runs / 200)

    def us(found: dict[str, Any], key: str) -> str:
        value, base = found.get(key), found.get("baseline")
        if value is None or base is None:
            return str(found.get("problem", "—"))
        return f"{value * 1e6:.2f} ({value / base:.1f}×)"

    base = results["baseline"]
    rows = [["plain `await` (baseline)", "—", base.get("n"), us(base, "per_call"), "—", "—"]]
    for name in names[1:]:
        found = results[name]
        plain = found.get("baseline")
        rows.append([found.get("title", name), found.get("needs"), found.get("n"),
                     us(found, "per_call"), us(found, "per_await"),
                     "—" if plain is None else f"{plain * 1e6:.2f}"])
    print("Time per call, µs (× a plain `await` timed in the same process, round by round):\n")
    print(table(["approach", "async side needs", "N", "per call, entry each time",
                 "per await, one entry", "plain `await` in that process"], rows))

    rows = [["plain `await` (baseline)", "—", "—", base.get("trio"), base.get("uvloop"),
             "—", "—", "—", ", ".join(base.get("patches", [])) or "none"]]
    for name in names[1:]:
        found = results[name]
        trio = found.get("trio")
        if trio is not None and not found.get("claims_trio"):
            trio += " (not claimed)"
        rows.append([found.get("title", name), found.get("loop_thread"), found.get("without_entry"),
                     trio, found.get("uvloop"), found.get("contextvars"),
                     found.get("cancellation"), found.get("nesting"),
                     ", ".join(found.get("patches", [])) or "none"])
    print("\nBehaviour:\n")
    print(table(["approach", "sync code in the loop thread", "without its entry", "Trio: µs/call (× await)",
                 "uvloop: µs/call (× await)", "contextvars: caller→sync / caller→coro / coro→sync",
                 f"wait_for({TIMEOUT}) around sleep(10) awaited from sync code", "nested twice",
                 "replaced process-wide"], rows))


if __name__ == "__main__":
    main()
