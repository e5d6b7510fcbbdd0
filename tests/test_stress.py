"""Stress: greenback under the things that interrupt or watch Python code at
arbitrary moments, each in a subprocess of its own so that a crash, a hang or
a corrupted interpreter fails one test clearly instead of taking the suite
down.

- A storm of SIGINTs, at seeded random moments, while 200 portal tasks step;
  many short runs per process. Every run ends, with KeyboardInterrupt or
  cleanly (and then with the right results); afterwards, in the same process,
  fresh runs with portals work.
- The same moments made exhaustive and deterministic: a KeyboardInterrupt at
  each point of greenback's own Python code where a SIGINT handler could
  raise one, one run per point; nothing may be left half-done.
- gc.set_threshold(1, 1, 1) (a collection at almost every allocation) while
  portal-heavy work runs and makes cyclic garbage with __del__ methods.
- Tracing and profiling hooks (sys.settrace, sys.setprofile, sys.monitoring
  on Python 3.12 and later) active while await_() runs, and installed and
  removed by sync code under a portal, mid-run.
- coverage.py with --concurrency=greenlet measuring code run through await_().

Everything runs on asyncio and on Trio, and (because the Makefile runs the
suite twice, and subprocesses inherit GREENBACK_NO_EXTENSIONS) against both
the compiled core and the pure-Python twin.

The size comes from GREENBACK_SOAK_SCALE, as for test_soak.py: the default
(0.02) keeps the whole file to well under a minute; 1.0 runs each SIGINT
storm for 400 seconds and the other workloads 50 times bigger.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import pure_python

SCALE = float(os.environ.get("GREENBACK_SOAK_SCALE", "0.02"))
LIBS = ["asyncio", "trio"]

STORM_SECONDS = 400 * SCALE  # per event loop flavour: 8 s by default
STORM_MIN_RUNS = 20
STORM_TASKS = 200
GC_ROUNDS = max(2, round(1500 * SCALE))  # rounds per task: 30 by default
TRACE_ROUNDS = max(2, round(500 * SCALE))
SWEEP_BUDGET = max(250, round(12500 * SCALE))  # interrupted runs per sweep, at most

# What a crash, or faulthandler noticing a hang, leaves on stderr.
CRASH_MARKERS = (
    "Fatal Python error",
    "Segmentation fault",
    "Aborted",
    "Current thread",
    "Thread 0x",
    "Timeout (",
    "greenlet.error",
    "SystemError",
)


def expected_implementation() -> str:
    return "pure-python" if pure_python() else "compiled"


@dataclass
class Finished:
    """A subprocess that ran to its end: its summary (the JSON object on the
    last line of its stdout) and its stderr."""

    summary: dict[str, Any]
    stdout: str
    stderr: str


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run_program(
    argv: list[str],
    *,
    what: str,
    timeout: float,
    cwd: Path | None = None,
    json_summary: bool = True,
) -> Finished:
    """Run a Python program to its end and fail clearly on a hang (the timeout
    passes) or a crash (killed by a signal, or faulthandler output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    env.pop("PYTHONFAULTHANDLER", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-X", "faulthandler", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:

        def text(data: str | bytes | None) -> str:
            if isinstance(data, bytes):
                return data.decode(errors="replace")
            return data or ""

        pytest.fail(
            f"HANG: {what} did not finish within {timeout:.0f} s\n"
            f"--- stdout (tail) ---\n{_tail(text(exc.stdout))}\n"
            f"--- stderr (tail) ---\n{_tail(text(exc.stderr))}"
        )
    # Where a crash or a hang left its traceback, show stderr from there on.
    found = [proc.stderr.find(m) for m in CRASH_MARKERS if m in proc.stderr]
    if found:
        stderr = "\n".join(proc.stderr[min(found):].splitlines()[:200])
    else:
        stderr = _tail(proc.stderr, 80)
    report = (
        f"{what}: exit code {proc.returncode}\n"
        f"--- stdout (tail) ---\n{_tail(proc.stdout)}\n--- stderr ---\n{stderr}"
    )
    if proc.returncode < 0:
        pytest.fail(f"CRASH: killed by {signal.Signals(-proc.returncode).name}; {report}")
    if "Timeout (" in proc.stderr:
        pytest.fail(f"HANG (caught by faulthandler.dump_traceback_later); {report}")
    if found:
        pytest.fail(f"CRASH? {proc.stderr[min(found):].splitlines()[0]!r} on stderr; {report}")
    assert proc.returncode == 0, report
    summary: dict[str, Any] = {}
    if json_summary:
        lines = proc.stdout.splitlines()
        assert lines, report
        summary = json.loads(lines[-1])
        assert summary["implementation"] == expected_implementation(), report
    return Finished(summary, proc.stdout, proc.stderr)


def run_script(script: str, params: dict[str, Any], *, what: str, timeout: float) -> Finished:
    code = _PRELUDE + textwrap.dedent(script)
    return run_program(["-c", code, json.dumps(params)], what=what, timeout=timeout)


# What every script starts with: the event loop adapter, and a way to report.
_PRELUDE = textwrap.dedent(
    """
    import asyncio
    import faulthandler
    import gc
    import json
    import os
    import sys
    import time

    import greenback
    import trio

    if sys.version_info < (3, 11):
        from exceptiongroup import BaseExceptionGroup

    PARAMS = json.loads(sys.argv[1])
    LIB = PARAMS["lib"]

    async def checkpoint():
        if LIB == "trio":
            await trio.lowlevel.checkpoint()
        else:
            await asyncio.sleep(0)

    async def sleep(seconds):
        if LIB == "trio":
            await trio.sleep(seconds)
        else:
            await asyncio.sleep(seconds)

    def run(async_fn, *args):
        if LIB == "trio":
            return trio.run(async_fn, *args)
        return asyncio.run(async_fn(*args))

    async def spawn_all(async_fns, spawned=lambda: None):
        # Run the async functions as concurrent tasks and return their
        # results; call spawned() once all the tasks exist.
        if LIB != "trio":
            gathering = asyncio.gather(*(async_fn() for async_fn in async_fns))
            spawned()
            return list(await gathering)
        results = [None] * len(async_fns)

        async def store(i, async_fn):
            results[i] = await async_fn()

        async with trio.open_nursery() as nursery:
            for i, async_fn in enumerate(async_fns):
                nursery.start_soon(store, i, async_fn)
            spawned()
        return results

    def report(**summary):
        summary["implementation"] = greenback.__implementation__
        print(json.dumps(summary), flush=True)

    def portal_tasks(sync_fn):
        # Both ways into a portal, each calling sync_fn(arg) after a
        # checkpoint: a task that calls ensure_portal(), and a one-shot portal.
        async def portal_task(arg):
            await greenback.ensure_portal()
            await checkpoint()
            return sync_fn(arg)

        async def one_shot_task(arg):
            await checkpoint()
            return await greenback.with_portal_run_sync(sync_fn, arg)

        return portal_task, one_shot_task

    # A portal that works: a new run, a new task, ensure_portal, await_ (also
    # nested) and a one-shot portal.
    async def _plus_one(x):
        await checkpoint()
        return x + 1

    def _sync_part():
        return greenback.await_(_plus_one(greenback.await_(_plus_one(1))))

    async def _fresh_main():
        await greenback.ensure_portal()
        first = _sync_part()
        second = await greenback.with_portal_run_sync(_sync_part)
        return first, second

    def fresh_portal_works(lib):
        global LIB
        LIB, saved = lib, LIB
        try:
            return run(_fresh_main) == (3, 3)
        finally:
            LIB = saved
    """
)


def test_scale_is_sane() -> None:
    """A typo in GREENBACK_SOAK_SCALE must not silently shrink the stress."""
    assert SCALE > 0
    if "GREENBACK_SOAK_SCALE" not in os.environ:
        assert SCALE == pytest.approx(0.02)


# ===========================================================================
# SIGINT at random moments
# ===========================================================================

_STORM_SCRIPT = """
import random
import signal
import warnings

TASKS = PARAMS["tasks"]
STEPS = 8
SEED = PARAMS["seed"]
HANG_LIMIT = 30.0  # one run, in seconds: faulthandler dumps and exits after it


async def value_after_checkpoint(x):
    await checkpoint()
    return x


async def value_after_sleep(x, seconds):
    await sleep(seconds)
    return x


def sync_twice(x):
    return greenback.await_(value_after_checkpoint(x)) + greenback.await_(value_after_checkpoint(x))


async def nested(x):
    await checkpoint()
    return sync_twice(x)


def sync_steps(sleeps):
    total = 0
    for k in range(STEPS):
        kind = k % 4
        if kind == 0:
            total += greenback.await_(value_after_checkpoint(k))
        elif kind == 1:
            total += greenback.await_(value_after_sleep(k, sleeps[k]))
        elif kind == 2:
            total += greenback.await_(nested(k))
        else:
            total += greenback.await_(greenback.with_portal_run_sync(sync_twice, k))
    return total


EXPECTED_PER_TASK = sum(k * (1, 1, 2, 2)[k % 4] for k in range(STEPS))


portal_task, one_shot_task = portal_tasks(sync_steps)


async def workload(rng, intervals=None):
    jobs = []
    for i in range(TASKS):
        sleeps = [rng.choice((0, 0, 0.0005, 0.002)) for _ in range(STEPS)]
        job = portal_task if i % 4 else one_shot_task
        jobs.append(lambda job=job, sleeps=sleeps: job(sleeps))
    try:
        return await spawn_all(jobs, lambda: intervals and arm(intervals))
    finally:
        disarm()


def check(results):
    assert results == [EXPECTED_PER_TASK] * TASKS, results


# --- the signals ------------------------------------------------------------------
# SIGALRM (signal.setitimer) at each planned moment; its handler sends SIGINT
# to this process, so SIGINT arrives wherever the main thread happens to be,
# and goes to the handler that asyncio.run or Trio installed.
#
# The signals come only while all the tasks exist, between the end of their
# spawning and the end of the run: a KeyboardInterrupt in the middle of
# Trio's start_soon() or of its run() teardown, or inside asyncio's event loop
# callbacks, breaks those libraries themselves (a task that is never
# scheduled, a hang, a run() that believes it is still running), with or
# without greenback. For the same reason, on asyncio only the first SIGINT
# comes at any moment (asyncio.run then cancels the main task); the later
# ones, which asyncio.run turns into a KeyboardInterrupt right where the main
# thread is, come only while a portal task's step runs (so they land in the
# task's code, the sync code, greenback's own code or the awaited
# coroutines). On Python 3.10, whose asyncio.run has no SIGINT handler, every
# SIGINT on asyncio waits for a portal task's step. Trio decides itself where
# a KeyboardInterrupt may land; every SIGINT comes at any moment.

class Plan:
    armed = False
    intervals = []
    sent = 0  # in this run
    total_sent = 0
    deferred = 0  # alarms that waited for a portal task's step


def gated():
    return LIB == "asyncio" and (Plan.sent > 0 or sys.version_info < (3, 11))


def on_alarm(signum, frame):
    if not Plan.armed:
        return
    if gated() and not greenback.has_portal():
        Plan.deferred += 1
        signal.setitimer(signal.ITIMER_REAL, 0.0002)
        return
    Plan.sent += 1
    Plan.total_sent += 1
    os.kill(os.getpid(), signal.SIGINT)
    if Plan.intervals:
        signal.setitimer(signal.ITIMER_REAL, Plan.intervals.pop(0))


def arm(intervals):
    Plan.intervals = list(intervals[1:])
    Plan.sent = 0
    Plan.armed = True
    signal.setitimer(signal.ITIMER_REAL, intervals[0])


def disarm():
    Plan.armed = False
    signal.setitimer(signal.ITIMER_REAL, 0)


late_sigints = 0


def count_late_sigint(signum, frame):
    global late_sigints
    late_sigints += 1


def quiesce():
    # From here on a SIGINT already sent is counted, not raised.
    signal.signal(signal.SIGINT, count_late_sigint)
    disarm()


def only_keyboard_interrupts(exc):
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(only_keyboard_interrupts(e) for e in exc.exceptions)
    return False


signal.signal(signal.SIGALRM, on_alarm)

unraisable = []
sys.unraisablehook = lambda args: unraisable.append(
    f"{args.exc_type.__name__}: {args.exc_value!r} in {args.object!r}"
)
warnings.simplefilter("always")
caught_warnings = []
warnings.showwarning = lambda message, category, *rest: caught_warnings.append(
    f"{category.__name__}: {message}"
)

# A calibration run, without signals: it must give the right results, and
# tells how long a run takes, to spread the signals over it.
started = time.perf_counter()
check(run(workload, random.Random(SEED)))
run_time = time.perf_counter() - started


def one_run(index):
    rng = random.Random(SEED * 1_000_003 + index)
    # One to three SIGINTs per run, at least 1 ms apart, the first within
    # twice the length of a run (so some runs end before it).
    count = rng.choice((1, 1, 2, 3))
    intervals = [rng.uniform(0.0001, run_time * 2)]
    intervals += [rng.uniform(0.001, run_time * 0.5) for _ in range(count - 1)]
    print(f"run {index}", flush=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        try:
            results = run(workload, rng, intervals)
        finally:
            quiesce()
    except BaseException as exc:
        if only_keyboard_interrupts(exc):
            return "keyboard-interrupt"
        import traceback

        return "unexpected: " + "".join(traceback.format_exception(exc))
    if results != [EXPECTED_PER_TASK] * TASKS:
        return f"unexpected: wrong results {results}"
    return "clean"


outcomes = {}
unexpected = []
deadline = time.monotonic() + PARAMS["seconds"]
index = 0
while index < PARAMS["min_runs"] or time.monotonic() < deadline:
    faulthandler.dump_traceback_later(HANG_LIMIT, exit=True)
    try:
        outcome = one_run(index)
    except KeyboardInterrupt:  # in this loop's own bookkeeping
        outcome = "keyboard-interrupt"
    finally:
        quiesce()
    faulthandler.cancel_dump_traceback_later()
    if outcome.startswith("unexpected"):
        unexpected.append(f"run {index}: {outcome}")
        outcome = "unexpected"
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
    index += 1

# After the storm, in the same process: a whole run without signals gives
# the right results, and new portals work on both event loops.
signal.signal(signal.SIGINT, signal.default_int_handler)
faulthandler.dump_traceback_later(HANG_LIMIT, exit=True)
has_portal_outside = greenback.has_portal()


def after_the_storm():
    try:
        if run(workload, random.Random(SEED)) != [EXPECTED_PER_TASK] * TASKS:
            return "wrong results"
        for lib in ("asyncio", "trio"):
            if not fresh_portal_works(lib):
                return f"a fresh portal on {lib} does not work"
    except BaseException:
        import traceback

        return traceback.format_exc()
    return "works"


after = after_the_storm()
gc.collect()
faulthandler.cancel_dump_traceback_later()
report(
    runs=index,
    outcomes=outcomes,
    unexpected=unexpected,
    sigints_sent=Plan.total_sent,
    deferred_alarms=Plan.deferred,
    has_portal_outside=has_portal_outside,
    late_sigints=late_sigints,
    run_time=run_time,
    after_the_storm=after,
    unraisable=unraisable,
    warnings=sorted(set(caught_warnings)),
)
"""


_SWEEP_SCRIPT = """
import dis
import inspect
import linecache
import traceback
import warnings

GREENBACK_DIR = os.path.dirname(greenback.__file__) + os.sep
HANG_LIMIT = 30.0

unraisable = []
sys.unraisablehook = lambda args: unraisable.append(
    f"{args.exc_type.__name__}: {args.exc_value!r} in {args.object!r}"
)
warnings.simplefilter("always")
caught_warnings = []
warnings.showwarning = lambda message, category, *rest: caught_warnings.append(
    f"{category.__name__}: {message}"
)

# --- the scenario: task portals, one-shot portals, nested await_ ---------------------

awaited = []  # every coroutine handed to await_()


def track(coro):
    awaited.append(coro)
    return coro


async def step_value(x):
    await checkpoint()
    return x


async def nested(x):
    await checkpoint()
    return greenback.await_(track(step_value(x)))


def sync_work(x):
    a = greenback.await_(track(step_value(x)))
    b = greenback.await_(track(nested(x)))
    return a + b


async def async_work(x):
    await checkpoint()
    return sync_work(x)


async def portal_task():
    await greenback.ensure_portal()
    return sync_work(1) + sync_work(2)


async def one_shot_task():
    first = await greenback.with_portal_run_sync(sync_work, 3)
    return first + await greenback.with_portal_run(async_work, 4)


async def scenario():
    return await spawn_all([portal_task, one_shot_task])


EXPECTED = [6, 14]

# --- KeyboardInterrupt at the n-th point where a SIGINT's handler could run in
# greenback's own Python code (in any of its frames except finalizers). The
# interpreter runs signal handlers only at some instruction boundaries: when
# a function starts (not when a coroutine resumes after an await), right
# after a call returns, and at a loop's backward jump. Those are the points;
# opcode tracing finds them. The exception is raised where the event loop's
# SIGINT handler would raise it: Trio raises only where its KI protection is
# off; asyncio.run raises at any point from the second SIGINT on.

CALL_OPS = {"CALL", "CALL_KW", "CALL_FUNCTION", "CALL_FUNCTION_KW", "CALL_FUNCTION_EX",
            "CALL_METHOD"}
JUMP_BACK_OPS = {"JUMP_BACKWARD", "JUMP_ABSOLUTE"}
GENERATOR_FLAGS = (inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE
                   | inspect.CO_ASYNC_GENERATOR)
_opnames = {}


def opname_at(code, offset):
    ops = _opnames.get(code)
    if ops is None:
        ops = _opnames[code] = {i.offset: i.opname for i in dis.get_instructions(code)}
    return ops.get(offset, "?")


class Injection:
    target = 0
    count = 0
    fired = None
    last_op = {}  # id(frame) -> the opcode it ran last
    # Frames marked for opcode tracing. CPython unsets the trace function
    # when it raises, and on 3.12.1 a frame still marked then crashes the
    # interpreter at its next instruction: unmark them all first.
    marked = []


def unmark_frames():
    for frame in Injection.marked:
        frame.f_trace_opcodes = False
    Injection.marked.clear()


def wants_interrupt(frame, event):
    Injection.count += 1
    if Injection.count != Injection.target:
        return False
    if LIB == "trio" and trio.lowlevel.currently_ki_protected():
        Injection.fired = "protected"
        return False
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno or 0).strip()
    Injection.fired = f"{event} {frame.f_code.co_name}: {line}"
    unmark_frames()
    return True


def local_tracer(frame, event, arg):
    if event == "opcode":
        op = opname_at(frame.f_code, frame.f_lasti)
        previous = Injection.last_op.get(id(frame))
        Injection.last_op[id(frame)] = op
        if previous in CALL_OPS or previous in JUMP_BACK_OPS:
            if wants_interrupt(frame, f"after {previous} in"):
                raise KeyboardInterrupt
    return local_tracer


def global_tracer(frame, event, arg):
    code = frame.f_code
    if not code.co_filename.startswith(GREENBACK_DIR) or code.co_name == "__del__":
        return None
    frame.f_trace_lines = False
    frame.f_trace_opcodes = True
    Injection.marked.append(frame)
    if event == "call":
        if code.co_flags & GENERATOR_FLAGS and id(frame) in Injection.last_op:
            Injection.last_op[id(frame)] = "resumed"  # no signal check there
        else:
            Injection.last_op[id(frame)] = "started"
            if wants_interrupt(frame, "start of"):
                raise KeyboardInterrupt
    return local_tracer


def only_keyboard_interrupts(exc):
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(only_keyboard_interrupts(e) for e in exc.exceptions)
    return False


def one_run(target):
    Injection.target, Injection.count, Injection.fired = target, 0, None
    Injection.last_op = {}
    awaited.clear()
    sys.settrace(global_tracer)
    try:
        results = run(scenario)
        outcome = "clean" if results == EXPECTED else f"wrong results {results}"
    except BaseException as exc:
        if only_keyboard_interrupts(exc):
            outcome = "keyboard-interrupt"
        else:
            outcome = "unexpected: " + "".join(traceback.format_exception(exc))
    finally:
        sys.settrace(None)
        unmark_frames()
    states = [inspect.getcoroutinestate(c) for c in awaited]
    awaited.clear()
    problems = []
    if outcome not in ("clean", "keyboard-interrupt"):
        problems.append(outcome)
    if "CORO_SUSPENDED" in states:
        problems.append("an awaited coroutine was left suspended, not unwound")
    if greenback.has_portal():
        problems.append("has_portal() is True outside any task")
    gc.collect()
    if unraisable:
        problems.append(f"unraisable: {unraisable}")
        unraisable.clear()
    noise = [w for w in caught_warnings if "was never awaited" not in w]
    caught_warnings.clear()
    if noise:
        problems.append(f"warnings: {noise}")
    try:
        if run(scenario) != EXPECTED:
            problems.append("the next run gives wrong results")
    except BaseException:
        problems.append("the next run fails: " + traceback.format_exc())
    return problems


faulthandler.dump_traceback_later(HANG_LIMIT, exit=True)
# CPython 3.12.1 turns opcode events on at sys.settrace() only if some frame
# has asked for them before: ask once, here.
sys._getframe().f_trace_opcodes = True
sys._getframe().f_trace_opcodes = False

# A dry run counts the points; then one run per point (or, past the budget,
# per evenly spaced point).
assert one_run(0) == []
points = Injection.count
stride = -(-points // PARAMS["budget"])
failures = []
interrupted = protected = 0
for target in range(1, points + 1, stride):
    faulthandler.dump_traceback_later(HANG_LIMIT, exit=True)
    problems = one_run(target)
    if Injection.fired == "protected":
        protected += 1
    elif Injection.fired is not None:
        interrupted += 1
    if problems:
        failures.append(f"KeyboardInterrupt at point {target} ({Injection.fired}): {problems}")
faulthandler.cancel_dump_traceback_later()
report(points=points, stride=stride, interrupted=interrupted, protected=protected,
       failures=failures)
"""


@pytest.mark.parametrize("lib", LIBS)
def test_keyboard_interrupt_at_every_point_in_greenback_code(lib: str) -> None:
    """The SIGINT storm's moments, made exhaustive and deterministic: a
    KeyboardInterrupt raised, one run at a time, at every point in
    greenback's own Python code (function starts and lines, in task portals,
    one-shot portals and nested await_ calls) where the event loop's SIGINT
    handler would raise one (for Trio, where its KI protection is off). Each
    run must end with KeyboardInterrupt or cleanly; no coroutine passed to
    await_() may be left suspended (a native `await` would have unwound it,
    closing its cancel scopes); no noise; and the next run must work."""
    params = {"lib": lib, "budget": SWEEP_BUDGET}
    done = run_script(_SWEEP_SCRIPT, params, what=f"KeyboardInterrupt sweep on {lib}",
                      timeout=120 + SWEEP_BUDGET)
    s = done.summary
    print(f"\nKeyboardInterrupt sweep on {lib}: {s['points']} points, every {s['stride']}: "
          f"{s['interrupted']} interrupted, {s['protected']} KI-protected")
    assert s["interrupted"] > 0
    if pure_python():
        assert s["points"] > 300  # opcode tracing reached the whole twin
    failures: list[str] = s["failures"]
    # Grouped by what went wrong and where, with a count and a first example.
    groups: dict[str, list[str]] = {}
    for failure in failures:
        where = re.sub(r"^KeyboardInterrupt at point \d+ \((start of|after \w+ in) (\w+):.*",
                       r"\1 \2", failure)
        what = failure.split("): ", 1)[-1][:200]
        groups.setdefault(f"in {where}: {what}", []).append(failure)
    summary = "\n".join(f"{len(v)} x {k}\n    e.g. {v[0][:300]}" for k, v in groups.items())
    assert failures == [], f"{len(failures)} of the interrupted runs went wrong:\n{summary}"


@pytest.mark.parametrize("lib", LIBS)
def test_sigint_storm(lib: str) -> None:
    """SIGINT at seeded random moments while 200 portal tasks step, in many
    short runs: each run ends with KeyboardInterrupt or cleanly with the
    right results, never hangs or crashes; afterwards, portals still work."""
    params = {
        "lib": lib,
        "seed": 20240 + LIBS.index(lib),
        "seconds": STORM_SECONDS,
        "min_runs": STORM_MIN_RUNS,
        "tasks": STORM_TASKS,
    }
    done = run_script(
        _STORM_SCRIPT, params, what=f"SIGINT storm on {lib}", timeout=STORM_SECONDS * 3 + 120
    )
    s = done.summary
    print(f"\nSIGINT storm on {lib}: {json.dumps(s, indent=1)}")
    assert s["unexpected"] == [], "\n".join(s["unexpected"])
    assert s["runs"] >= STORM_MIN_RUNS
    # The storm must really interrupt runs, and must let some finish.
    assert s["outcomes"].get("keyboard-interrupt", 0) > 0, s
    assert s["sigints_sent"] >= s["outcomes"]["keyboard-interrupt"]
    assert s["has_portal_outside"] is False
    assert s["after_the_storm"] == "works", s["after_the_storm"]
    # A KeyboardInterrupt may land in any finalizer; nothing else may go wrong
    # in one.
    assert [u for u in s["unraisable"] if not u.startswith("KeyboardInterrupt")] == []


# ===========================================================================
# The garbage collector at (almost) every allocation
# ===========================================================================

_GC_SCRIPT = """
import types
import warnings

import greenlet
from greenback._select import impl

TASKS = PARAMS["tasks"]
ROUNDS = PARAMS["rounds"]

unraisable = []
sys.unraisablehook = lambda args: unraisable.append(
    f"{args.exc_type.__name__}: {args.exc_value!r} in {args.object!r}"
)
warnings.simplefilter("always")
caught_warnings = []
warnings.showwarning = lambda message, category, *rest: caught_warnings.append(
    f"{category.__name__}: {message}"
)


class Node:
    # Cyclic garbage whose finalizer works (allocates, makes more garbage,
    # asks greenback questions) but does not await.
    created = 0
    finalized = 0
    portal_seen = 0

    def __init__(self, tag, keep=None):
        Node.created += 1
        self.tag = tag
        self.keep = keep
        self.partner = None
        self.payload = [tag] * 8

    def __del__(self):
        Node.finalized += 1
        greenlet.getcurrent()
        if greenback.has_portal():
            Node.portal_seen += 1
        junk = {"tag": self.tag, "copy": list(self.payload)}
        junk["self"] = junk


def make_cycle(tag, keep=None):
    a = Node(tag, keep)
    b = Node(tag)
    a.partner, b.partner = b, a


@types.coroutine
def trap(request):
    return (yield request)


abandoned_log = []


def abandoned_sync(tag):
    try:
        greenback.await_(trap(tag))
    finally:
        abandoned_log.append(type(sys.exc_info()[1]).__name__)


async def abandoning_task(tag):
    # One-shot portals driven by hand (from a task without a portal), each
    # left suspended in await_() inside a garbage cycle: the collector
    # finalizes them, which unwinds their sync code.
    for k in range(ROUNDS):
        coro = greenback.with_portal_run_sync(abandoned_sync, (tag, k))
        assert coro.send(None) == (tag, k)
        make_cycle(k, coro)
        del coro
        await checkpoint()
    return EXPECTED


async def value_after_checkpoint(x):
    await checkpoint()
    make_cycle(x)
    return x


def sync_twice(x):
    make_cycle(x)
    return greenback.await_(value_after_checkpoint(x)) + greenback.await_(value_after_checkpoint(x))


async def nested(x):
    await checkpoint()
    return sync_twice(x)


async def async_twice(x):
    await checkpoint()
    return sync_twice(x)


class Carrier(Exception):
    pass


async def raises(x):
    await checkpoint()
    raise Carrier(x)


def sync_rounds(tag):
    total = 0
    for k in range(ROUNDS):
        make_cycle(k)
        total += greenback.await_(value_after_checkpoint(k))
        total += greenback.await_(nested(k))
        # A finished one-shot portal kept alive only by a garbage cycle.
        portal = greenback.with_portal_run_sync(sync_twice, k)
        total += greenback.await_(portal)
        make_cycle(k, portal)
        del portal
        total += greenback.await_(greenback.with_portal_run(async_twice, k))
        try:
            greenback.await_(raises(k))
        except Carrier as exc:
            total += exc.args[0]
            make_cycle(k, exc)  # with its traceback and frames
            del exc
    return total


EXPECTED = sum(k * 8 for k in range(ROUNDS))


portal_task, one_shot_task = portal_tasks(sync_rounds)


async def workload():
    jobs = []
    for tag in range(TASKS):
        job = (portal_task, portal_task, one_shot_task, abandoning_task)[tag % 4]
        jobs.append(lambda job=job, tag=tag: job(tag))
    return await spawn_all(jobs)


def count_objects():
    greenlets = portals = 0
    for obj in gc.get_objects():
        if isinstance(obj, greenlet.greenlet):
            greenlets += 1
        elif type(obj) is impl.Portal:
            portals += 1
    return greenlets, portals


faulthandler.dump_traceback_later(PARAMS["hang_limit"], exit=True)
assert fresh_portal_works(LIB)  # a warm-up: the main greenlet, a parked worker
gc.collect()
greenlets_before, portals_before = count_objects()
collections_before = sum(s["collections"] for s in gc.get_stats())
started = time.perf_counter()
gc.set_threshold(1, 1, 1)
results = run(workload)
fresh = fresh_portal_works(LIB)
threshold = gc.get_threshold()
gc.set_threshold(700, 10, 10)
elapsed = time.perf_counter() - started
collections = sum(s["collections"] for s in gc.get_stats()) - collections_before
gc.collect()
gc.collect()
greenlets_after, portals_after = count_objects()
faulthandler.cancel_dump_traceback_later()
abandoned = sum(ROUNDS for tag in range(TASKS) if tag % 4 == 3)
report(
    results_right=results == [EXPECTED] * TASKS,
    results=results[:5],
    expected=EXPECTED,
    fresh=fresh,
    threshold=threshold,
    collections=collections,
    elapsed=elapsed,
    created=Node.created,
    finalized=Node.finalized,
    portal_seen_in_del=Node.portal_seen,
    abandoned=abandoned,
    abandoned_log=sorted(set(abandoned_log)),
    abandoned_unwound=len(abandoned_log),
    greenlets=[greenlets_before, greenlets_after],
    portals=[portals_before, portals_after],
    unraisable=unraisable,
    warnings=sorted(set(caught_warnings)),
)
"""


@pytest.mark.parametrize("lib", LIBS)
def test_gc_at_every_allocation(lib: str) -> None:
    """gc.set_threshold(1, 1, 1) while portal tasks and one-shot portals do
    await_() (plain, nested, raising), make cyclic garbage with __del__
    methods (which do not await), and leave finished portals, and one-shot
    portals driven by hand and suspended in await_(), to the collector:
    right results, every finalizer run, every abandoned portal unwound,
    nothing left behind, no noise."""
    hang_limit = 60 + 2 * GC_ROUNDS
    params = {"lib": lib, "tasks": 60, "rounds": GC_ROUNDS, "hang_limit": hang_limit}
    done = run_script(_GC_SCRIPT, params, what=f"gc threshold 1 on {lib}", timeout=hang_limit + 60)
    s = done.summary
    print(f"\ngc at every allocation on {lib}: {json.dumps(s)}")
    assert s["results_right"], s
    assert s["fresh"] is True
    assert s["threshold"] == [1, 1, 1]
    assert s["collections"] > 1000, s  # the collector really ran all the time
    assert s["created"] == s["finalized"] > 0, s
    assert s["abandoned_unwound"] == s["abandoned"] > 0, s
    assert s["abandoned_log"] == ["GeneratorExit"], s
    # Parked workers (at most 64) may stay, and (pure-Python twin) a few idle
    # workers that are still the parent greenlet of parked ones; portals may
    # not. (At 1,000 rounds the twin keeps 2 to 5 such workers: no growth.)
    assert s["greenlets"][1] <= s["greenlets"][0] + 64 + 8, s
    assert s["portals"][1] == s["portals"][0], s
    assert s["unraisable"] == [], s
    assert s["warnings"] == [], s
    assert done.stderr == ""


# ===========================================================================
# Tracing and profiling hooks
# ===========================================================================

_TRACE_SCRIPT = """
HOOK = PARAMS["hook"]  # "settrace", "setprofile" or "monitoring"
TASKS = PARAMS["tasks"]
ROUNDS = PARAMS["rounds"]
NAMES = {"traced_sync", "traced_coro", "traced_raiser", "nested_coro"}

unraisable = []
sys.unraisablehook = lambda args: unraisable.append(
    f"{args.exc_type.__name__}: {args.exc_value!r} in {args.object!r}"
)

phase = "none"
counts = {}


def bump(event, code):
    name = code.co_name if code.co_name in NAMES else "*"
    key = f"{phase} {event} {name}"
    counts[key] = counts.get(key, 0) + 1


# --- the hooks ----------------------------------------------------------------

def local_tracer(frame, event, arg):
    bump("local-" + event, frame.f_code)
    return local_tracer


def global_tracer(frame, event, arg):
    bump(event, frame.f_code)
    return local_tracer


def profiler(frame, event, arg):
    bump(event, frame.f_code)


TOOL = 3
if sys.version_info >= (3, 12):
    mon = sys.monitoring
    EVENTS = {
        name: getattr(mon.events, name)
        for name in (
            "PY_START", "PY_RESUME", "PY_RETURN", "PY_YIELD", "PY_UNWIND", "PY_THROW",
            "RAISE", "RERAISE", "EXCEPTION_HANDLED", "STOP_ITERATION", "LINE", "CALL",
        )
    }

    def monitor(name):
        def callback(code, *args):
            bump(name, code)
        return callback


def install():
    if HOOK == "settrace":
        sys.settrace(global_tracer)
    elif HOOK == "setprofile":
        sys.setprofile(profiler)
    else:
        mon.use_tool_id(TOOL, "greenback stress")
        mask = 0
        for name, event in EVENTS.items():
            mon.register_callback(TOOL, event, monitor(name))
            mask |= event
        mon.set_events(TOOL, mask)


def uninstall():
    if HOOK == "settrace":
        sys.settrace(None)
    elif HOOK == "setprofile":
        sys.setprofile(None)
    else:
        mon.set_events(TOOL, 0)
        for event in EVENTS.values():
            mon.register_callback(TOOL, event, None)
        mon.free_tool_id(TOOL)


def installed():
    if HOOK == "settrace":
        return sys.gettrace() is not None
    if HOOK == "setprofile":
        return sys.getprofile() is not None
    return mon.get_tool(TOOL) is not None


# --- the work -----------------------------------------------------------------

class Carrier(Exception):
    pass


async def traced_coro(x):
    await checkpoint()
    y = x + 1
    return y


async def traced_raiser(x):
    await checkpoint()
    raise Carrier(x)


def traced_sync(x):
    total = greenback.await_(traced_coro(x))
    try:
        greenback.await_(traced_raiser(x))
    except Carrier as exc:
        total += exc.args[0]
    return total


async def nested_coro(x):
    await checkpoint()
    return traced_sync(x)


def rounds(progress):
    total = 0
    for k in range(ROUNDS):
        total += traced_sync(k)
        total += greenback.await_(nested_coro(k))
        total += greenback.await_(greenback.with_portal_run_sync(traced_sync, k))
        progress[0] += 1
    return total


EXPECTED = sum(3 * (2 * k + 1) for k in range(ROUNDS))
CALLS = 3 * ROUNDS * TASKS  # of traced_sync, and of traced_coro


async def portal_task(progress):
    await greenback.ensure_portal()
    return rounds(progress)


async def one_shot_task(progress):
    return await greenback.with_portal_run_sync(rounds, progress)


cycles = []


def control(progress, finished):
    # Sync code under a portal installs the hook, lets the other tasks do
    # a good part of their rounds with it, and removes it again.
    start = progress[0]
    install()
    while progress[0] < start + TASKS * max(ROUNDS // 4, 1) and not finished[0]:
        greenback.await_(checkpoint())
    uninstall()
    cycles.append(progress[0] - start)


async def controller(progress, finished):
    await checkpoint()
    await greenback.with_portal_run_sync(control, progress, finished)  # one-shot portal
    await greenback.ensure_portal()
    control(progress, finished)  # task portal
    return "controller"


async def workload(with_controller):
    progress = [0]
    finished = [False]

    async def workers():
        try:
            return await spawn_all(
                [lambda i=i: (portal_task, one_shot_task)[i % 2](progress) for i in range(TASKS)]
            )
        finally:
            finished[0] = True

    jobs = [workers]
    if with_controller:
        jobs.append(lambda: controller(progress, finished))
    return await spawn_all(jobs)


faulthandler.dump_traceback_later(PARAMS["hang_limit"], exit=True)

# Installed around the whole run.
phase = "around"
install()
around = run(workload, False)
still_installed = installed()
uninstall()
phase = "none"

# Installed and removed by sync code under portals, mid-run, twice.
phase = "inside"
inside = run(workload, True)
phase = "none"

faulthandler.cancel_dump_traceback_later()
report(
    around_right=around == [[EXPECTED] * TASKS],
    inside_right=inside == [[EXPECTED] * TASKS, "controller"],
    results=[around, inside] if around != [[EXPECTED] * TASKS] else None,
    still_installed_after_run=still_installed,
    installed_at_end=installed(),
    cycles=cycles,
    calls=CALLS,
    fresh=fresh_portal_works(LIB),
    counts={k: v for k, v in counts.items() if not k.endswith(" *")},
    other_events=sum(v for k, v in counts.items() if k.endswith(" *")),
    unraisable=unraisable,
)
"""

# The events that each hook must have reported for the code run through
# await_(): the sync function below the portal and the awaited coroutines.
_EXACT_EVENTS = {
    "settrace": ["call traced_sync", "local-return traced_sync"],
    "setprofile": ["call traced_sync", "return traced_sync"],
    "monitoring": ["PY_START traced_sync", "PY_RETURN traced_sync", "PY_START traced_coro",
                   "PY_RETURN traced_coro"],
}
_SEEN_EVENTS = {
    "settrace": ["call traced_coro", "local-line traced_sync", "local-line traced_coro",
                 "local-return traced_coro", "local-exception traced_raiser",
                 "local-line nested_coro", "call nested_coro"],
    "setprofile": ["call traced_coro", "return traced_coro", "call traced_raiser",
                   "return traced_raiser", "call nested_coro"],
    "monitoring": ["LINE traced_sync", "LINE traced_coro", "PY_YIELD traced_coro",
                   "PY_RESUME traced_coro", "RAISE traced_raiser", "PY_UNWIND traced_raiser",
                   "CALL traced_sync", "PY_START nested_coro", "EXCEPTION_HANDLED traced_sync"],
}


def _check_hook(lib: str, hook: str) -> None:
    hang_limit = 60 + 10 * TRACE_ROUNDS
    params = {
        "lib": lib, "hook": hook, "tasks": 20, "rounds": TRACE_ROUNDS, "hang_limit": hang_limit
    }
    done = run_script(_TRACE_SCRIPT, params, what=f"{hook} on {lib}", timeout=hang_limit + 60)
    s = done.summary
    print(f"\n{hook} on {lib}: {json.dumps(s)}")
    assert s["around_right"] and s["inside_right"], s
    assert s["fresh"] is True
    assert s["still_installed_after_run"] is True, "the run removed the hook"
    assert s["installed_at_end"] is False
    assert len(s["cycles"]) == 2 and min(s["cycles"]) > 0, s
    counts: dict[str, int] = s["counts"]
    assert s["other_events"] > 0
    for event in _EXACT_EVENTS[hook]:
        # Every call of the sync function below the portal, and (for
        # sys.monitoring) of the coroutine it awaits, was seen.
        assert counts.get(f"around {event}") == s["calls"], (event, counts)
    for event in _EXACT_EVENTS[hook] + _SEEN_EVENTS[hook]:
        assert counts.get(f"around {event}", 0) > 0, (event, counts)
        # ... and while sync code under a portal had installed the hook.
        assert counts.get(f"inside {event}", 0) > 0, (event, counts)
    assert not [k for k in counts if k.startswith("none ")], counts
    assert s["unraisable"] == []
    assert done.stderr == ""


@pytest.mark.parametrize("lib", LIBS)
def test_settrace_while_await_runs(lib: str) -> None:
    """sys.settrace, with a local tracer for every frame: installed around
    runs, and installed and removed from sync code under a portal mid-run."""
    _check_hook(lib, "settrace")


@pytest.mark.parametrize("lib", LIBS)
def test_setprofile_while_await_runs(lib: str) -> None:
    """sys.setprofile: installed around runs, and installed and removed from
    sync code under a portal mid-run."""
    _check_hook(lib, "setprofile")


@pytest.mark.parametrize("lib", LIBS)
def test_sys_monitoring_while_await_runs(lib: str) -> None:
    """sys.monitoring (Python 3.12 and later), a tool with PY_START, LINE,
    PY_RETURN, PY_YIELD, PY_RESUME, RAISE, PY_UNWIND, CALL and more:
    registered around runs, and registered and freed from sync code under a
    portal mid-run. Before 3.12 there is no sys.monitoring."""
    if sys.version_info >= (3, 12):
        _check_hook(lib, "monitoring")
    else:
        assert not hasattr(sys, "monitoring")


# ===========================================================================
# coverage.py with --concurrency=greenlet
# ===========================================================================

_COVERAGE_PROGRAM = """\
import asyncio
import sys

import greenback
import trio

LIB = sys.argv[1]
# (Each library's lines on one line, so that neither run leaves any missing.)
checkpoint = {"trio": trio.lowlevel.checkpoint, "asyncio": lambda: asyncio.sleep(0)}[LIB]
run = {"trio": lambda: trio.run(main), "asyncio": lambda: asyncio.run(main())}[LIB]


async def awaited_coroutine(x):
    await checkpoint()
    doubled = x * 2  # MARK awaited-after-suspension
    return doubled


def sync_below_portal(x):
    got = greenback.await_(awaited_coroutine(x))
    result = got + 1  # MARK sync-after-await
    return result


def never_called():
    return "never"  # MARK never-run


async def main():
    await greenback.ensure_portal()
    first = sync_below_portal(1)
    second = await greenback.with_portal_run_sync(sync_below_portal, 2)
    return first, second


print(run(), greenback.__implementation__)
"""


@pytest.mark.parametrize("lib", LIBS)
def test_coverage_with_greenlet_concurrency(lib: str, tmp_path: Path) -> None:
    """Under `coverage run --concurrency=greenlet`, lines run through
    await_() (in the sync function below the portal, after the await_, and
    in the awaited coroutine, after it suspended) are reported as covered,
    a line never run is reported as missing, and nothing complains."""
    program = tmp_path / "covprog.py"
    program.write_text(_COVERAGE_PROGRAM)
    marks = {}
    for number, line in enumerate(_COVERAGE_PROGRAM.splitlines(), start=1):
        if "# MARK " in line:
            marks[line.split("# MARK ")[1]] = number
    data = ["--data-file", str(tmp_path / ".coverage")]
    timeout = 120

    ran = run_program(
        ["-m", "coverage", "run", "--concurrency=greenlet", *data, "covprog.py", lib],
        what=f"coverage run on {lib}", timeout=timeout, cwd=tmp_path, json_summary=False,
    )
    assert ran.stdout == f"(3, 5) {expected_implementation()}\n"
    assert ran.stderr == ""

    reported = run_program(
        ["-m", "coverage", "report", *data, "--show-missing"],
        what="coverage report", timeout=timeout, cwd=tmp_path, json_summary=False,
    )
    assert reported.stderr == ""
    row = [line for line in reported.stdout.splitlines() if line.startswith("covprog.py")]
    assert len(row) == 1, reported.stdout
    # Only the never-run line is missing.
    assert re.split(r"\s+", row[0].strip())[-1] == str(marks["never-run"]), reported.stdout

    as_json = run_program(
        ["-m", "coverage", "json", "-q", *data, "-o", "coverage.json"],
        what="coverage json", timeout=timeout, cwd=tmp_path, json_summary=False,
    )
    assert as_json.stderr == ""
    files = json.loads((tmp_path / "coverage.json").read_text())["files"]
    measured = files["covprog.py"]
    assert marks["sync-after-await"] in measured["executed_lines"]
    assert marks["awaited-after-suspension"] in measured["executed_lines"]
    assert measured["missing_lines"] == [marks["never-run"]]
