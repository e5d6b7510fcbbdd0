"""Exceptions from signal handlers, and fork(), in the middle of portal work.

A signal handler runs wherever CPython's eval loop next checks for one (on
entering a Python function, on a loop's jump back, just after a call
returns), and whatever it raises (KeyboardInterrupt from Ctrl-C, anything
from a SIGALRM handler) is raised right there. greenback must come through
that whatever code is running: user code, greenback's facade, and, for the
pure-Python twin, its whole portal machinery. The compiled core's machinery
is C, where no handler runs; the twin's is Python, so these tests are
mostly about the twin, but everything runs against both (the Makefile runs
the suite twice, and the subprocesses inherit GREENBACK_NO_EXTENSIONS).

- Storms, during many short runs of portal-heavy work on asyncio and on
  Trio: a SIGALRM timer re-armed at seeded random short intervals whose
  handler raises an Exception subclass, or KeyboardInterrupt; and real
  SIGINTs sent by another process at random moments, whose handler raises
  KeyboardInterrupt. A handler raises only when it finds the main thread in
  greenback's code or in the portal tasks' code (else it asks to be run again
  soon): neither asyncio nor Trio promises to survive an exception anywhere
  in its own code (one there can lose a callback and hang asyncio.run(), or
  corrupt Trio's run state). Every run must end cleanly with the right
  results or with the injected exception; afterwards, in the same process,
  new runs with portals work, a finalizer run by the collector is still
  refused await_(), and the garbage collector still collects.
- Injection at chosen points: sys.settrace raises at the n-th point where a
  signal handler could run in greenback's implementation code (for the
  compiled core, only its worker's Python bottom frame), and sys.setprofile
  raises a second exception soon after the first, inside whatever except
  clause or finally block is then running. Same checks after each run, plus
  the twin's own per-thread state.
- The gc.callbacks hook interrupted at its first bytecode, in the "stop"
  phase (a stale "collecting" would refuse every later await_()) and in the
  "start" phase (a finalizer could then suspend in await_() inside the
  collector).
- fork() from sync code under a portal: the child runs portal tasks of its
  own, and none of the parent's greenlets (its tasks, its parked workers)
  ever runs in the child.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import pure_python

LIBS = ["asyncio", "trio"]
STORM_SECONDS = 2.0  # per storm; each storm also runs at least STORM_MIN_RUNS runs
STORM_MIN_RUNS = 15
INJECTION_RUNS = 600  # injection points per event loop (a seeded sample beyond that)

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "setitimer") or not hasattr(os, "fork"), reason="needs POSIX signals and fork"
)


def expected_implementation() -> str:
    return "pure-python" if pure_python() else "compiled"


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _text(data: object) -> str:
    # TimeoutExpired holds bytes even when the run asked for text.
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data if isinstance(data, str) else ""


def run_script(script: str, params: dict[str, Any], *, what: str, timeout: float) -> dict[str, Any]:
    """Run `script` with `params` (sys.argv[1], as JSON) in a new interpreter
    that inherits this one's environment; return the JSON object its last
    line of output holds. Fails clearly on a hang, a crash, or an error."""
    env = dict(os.environ)
    env.pop("PYTHONFAULTHANDLER", None)
    code = _PRELUDE + textwrap.dedent(script)
    try:
        proc = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", code, json.dumps(params)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        out, err = _text(exc.stdout), _text(exc.stderr)
        pytest.fail(f"HANG: {what} ran over {timeout} s\n--- stdout ---\n{_tail(out)}\n--- stderr ---\n{_tail(err)}")
    report = (
        f"{what}: exit code {proc.returncode}\n--- stdout ---\n{_tail(proc.stdout)}"
        f"\n--- stderr ---\n{_tail(proc.stderr)}"
    )
    if proc.returncode < 0:
        pytest.fail(f"CRASH: killed by {signal.Signals(-proc.returncode).name}; {report}")
    assert "Timeout (" not in proc.stderr, f"HANG (faulthandler); {report}"
    assert "Fatal Python error" not in proc.stderr, report
    assert proc.returncode == 0, report
    lines = proc.stdout.splitlines()
    assert lines, report
    summary: dict[str, Any] = json.loads(lines[-1])
    summary["_stdout"] = proc.stdout
    summary["_stderr"] = proc.stderr
    assert summary["implementation"] == expected_implementation(), report
    return summary


# Shared by every script: the portal workload's building blocks, and the
# checks made after the exceptions have stopped. The workload is compiled
# under the file name "<portal-work>", so that signal handlers can tell its
# frames from the scripts' own bookkeeping.
_PRELUDE = textwrap.dedent(
    '''
    import asyncio
    import faulthandler
    import gc
    import json
    import os
    import random
    import signal
    import sys
    import textwrap
    import time
    import traceback
    import tracemalloc  # imported by the first "never awaited" warning otherwise
    import weakref

    import greenlet
    import trio

    import greenback
    from greenback._select import IMPLEMENTATION, impl

    if sys.version_info < (3, 11):
        from exceptiongroup import BaseExceptionGroup

    PARAMS = json.loads(sys.argv[1])
    GREENBACK_DIR = os.path.dirname(greenback.__file__) + os.sep
    HANG_LIMIT = 30.0  # seconds for one run: faulthandler dumps and exits

    WORK = """
    async def checkpoint():
        if LIB == "trio":
            await trio.lowlevel.checkpoint()
        else:
            await asyncio.sleep(0)

    async def plus_one(x):
        await checkpoint()
        return x + 1

    def sync_part(x):
        return greenback.await_(plus_one(greenback.await_(plus_one(x))))

    def in_child_greenlet(x):
        # sync code under a portal may await_() from a greenlet it starts
        return greenlet.greenlet(sync_part).switch(x)

    async def nested(x):
        # a one-shot portal stepped from inside a worker greenlet: the
        # worker that runs it is created there, and later reused elsewhere
        await checkpoint()
        return await impl.run_sync_portal(sync_part, (x,), {})

    class Finalized:
        # cyclic garbage whose finalizer tries await_(): the collector runs
        # it, often in a portal's step, and await_() must refuse it
        def __init__(self):
            self.me = self

        def __del__(self):
            try:
                greenback.await_(plus_one(0))
            except RuntimeError as exc:
                FINALIZERS["refused"] += 1
                if "garbage collector" in str(exc):
                    FINALIZERS["refused as in gc"] += 1
            else:
                FINALIZERS["ran await_ inside the collector"] += 1

    async def portal_task(i, rounds):
        total = 0
        if i % 3 == 0:
            for r in range(rounds):  # one-shot portals only
                total += await greenback.with_portal_run_sync(sync_part, r)
                total += await greenback.with_portal_run(nested, r)
            return total
        await greenback.ensure_portal()
        for r in range(rounds):
            total += greenback.await_(plus_one(r))
            total += greenback.await_(nested(r))
            total += in_child_greenlet(r)
            Finalized()
            if r % 3 == 2:
                gc.collect(0)
        return total

    def expected(i, rounds):
        if i % 3 == 0:
            return sum(2 * r + 4 for r in range(rounds))
        return sum(3 * r + 5 for r in range(rounds))
    """

    SUPERVISE = """
    async def supervise(n, rounds):
        # Kept out of the signal handlers' reach: an exception between
        # an `async with`'s __aexit__() call and its await abandons Trio's
        # nursery (its children outlive it), which is Trio's to solve.
        if LIB == "trio":
            results = [None] * n

            async def store(i):
                results[i] = await portal_task(i, rounds)

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(store, i)
            return results
        return list(await asyncio.gather(*(portal_task(i, rounds) for i in range(n))))
    """

    FINALIZERS = {"refused": 0, "refused as in gc": 0, "ran await_ inside the collector": 0}
    LIB = PARAMS.get("lib", "asyncio")
    exec(compile(textwrap.dedent(WORK), "<portal-work>", "exec"), globals())
    exec(compile(textwrap.dedent(SUPERVISE), "<supervisor>", "exec"), globals())


    def run(lib, async_fn, *args):
        global LIB
        LIB = lib
        if lib == "trio":
            return trio.run(async_fn, *args)
        return asyncio.run(async_fn(*args))


    def only(exc, kind):
        """Whether `exc` is `kind`, or a group of nothing else."""
        if isinstance(exc, kind):
            return True
        if isinstance(exc, BaseExceptionGroup):
            return all(only(e, kind) for e in exc.exceptions)
        return False


    async def _fresh_main():
        await greenback.ensure_portal()
        first = sync_part(1)
        second = await greenback.with_portal_run_sync(sync_part, 1)
        third = greenback.await_(nested(1))
        return first, second, third


    def state_checks():
        """The twin's per-thread state, between runs."""
        checks = {}
        if IMPLEMENTATION == "pure-python":
            state = sys.modules["greenback._purepy"]._state
            checks["no active portal"] = state.active is None
            checks["not collecting"] = state.collecting is False
            checks["parked workers alive"] = all(not w.dead for w, _ in state.parked)
            checks["parked contexts as recorded"] = all(w.gr_context is held for w, held in state.parked)
        return checks


    def fresh_run_checks(libs=("asyncio", "trio")):
        checks = {}
        for lib in libs:
            try:
                checks[f"fresh {lib} run"] = run(lib, _fresh_main) == (3, 3, 3)
            except BaseException as exc:
                checks[f"fresh {lib} run"] = repr(exc)
        return checks


    def after_checks():
        """What must hold once the exceptions have stopped."""
        checks = fresh_run_checks()

        # A finalizer run by the collector during a portal's step is refused.
        async def finalize_in_step():
            await greenback.ensure_portal()
            gc.collect()  # what earlier runs left first
            before = dict(FINALIZERS)
            Finalized()
            gc.collect()
            return FINALIZERS["refused as in gc"] - before["refused as in gc"]

        checks["finalizer in a step refused"] = run("asyncio", finalize_in_step) == 1
        # The garbage collector still collects, and is not left mid-collection.
        class Node:
            pass

        head = Node()
        head.ring = [Node() for _ in range(1000)]
        for node in head.ring:
            node.back = head
        probe = weakref.ref(head)
        del head, node
        collected = gc.collect()
        checks["gc frees a cycle"] = probe() is None and collected >= 1000
        checks["gc count after collect"] = gc.get_count()[0] < 50
        checks.update(state_checks())
        return checks


    def report(**summary):
        summary["implementation"] = IMPLEMENTATION
        print(json.dumps(summary), flush=True)
    '''
)


# ===========================================================================
# Storms of exceptions from signal handlers
# ===========================================================================

_STORM_SCRIPT = """
# "alarm": a SIGALRM handler raises Alarm; "keyboard": it raises
# KeyboardInterrupt; "sigint": SIGINTs sent by another process (Ctrl-C from
# outside), whose handler raises KeyboardInterrupt.
KIND = PARAMS["kind"]
TASKS, ROUNDS = PARAMS["tasks"], PARAMS["rounds"]


class Alarm(Exception):
    pass


INJECTED = Alarm if KIND == "alarm" else KeyboardInterrupt


def in_reach(frame):
    # greenback's code (but not its Trio instrument, which Trio itself
    # calls, nor _tasks, whose lookups greenback's compiled core treats any
    # failure of as "no portal here") and the portal tasks' code.
    if frame is None:
        return False
    name = frame.f_code.co_filename
    if name == "<portal-work>":
        return True
    if name.startswith(GREENBACK_DIR):
        return name[len(GREENBACK_DIR):] not in ("_trio_instrument.py", "_stackscope.py", "_tasks.py")
    return False


class Storm:
    sender = None
    armed = False
    left = 0
    misses = 0
    rng = random.Random(0)
    raised = 0
    sites = {}


def raise_here(frame):
    if not Storm.armed or Storm.left <= 0:
        return
    if not in_reach(frame):
        rearm(soon=True)  # try again in a moment
        return
    Storm.left -= 1
    Storm.raised += 1
    where = os.path.basename(frame.f_code.co_filename)
    Storm.sites[where] = Storm.sites.get(where, 0) + 1
    rearm()
    raise INJECTED()


def on_alarm(signum, frame):
    raise_here(frame)


def on_sigint(signum, frame):
    raise_here(frame)


# For "sigint": another process sends SIGINT at random moments (Ctrl-C from
# outside, arriving wherever this process then is), and at once when told to
# try again by a byte on its stdin.
SENDER = r'''
import os, random, select, signal, sys, time
pid, rng = int(sys.argv[1]), random.Random(int(sys.argv[2]))
while True:
    ready, _, _ = select.select([0], [], [], rng.uniform(0.0002, 0.003))
    if ready:
        if not os.read(0, 4096):
            break  # stdin closed: the storm is over
        time.sleep(rng.uniform(0, 0.0002))
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        break
'''


def rearm(soon=False):
    if KIND == "sigint":
        if soon:
            os.write(Storm.sender.stdin.fileno(), b"x")
        return
    if soon:
        # Back off while signals keep landing out of reach (in the event
        # loop's own teardown, say): a handler slower than the timer, as
        # under ASan on a busy machine, would otherwise starve that code.
        Storm.misses += 1
        delay = min(0.00002 * 2 ** min(Storm.misses, 8), 0.003)
    else:
        Storm.misses = 0
        delay = Storm.rng.uniform(0.0001, 0.003)
    signal.setitimer(signal.ITIMER_REAL, delay)


signal.signal(signal.SIGALRM, on_alarm)
# A handler of our own, so that neither asyncio.run() nor Trio installs
# theirs: they only do while Python's default one is in place.
signal.signal(signal.SIGINT, on_sigint)
if KIND == "sigint":
    import subprocess

    Storm.sender = subprocess.Popen(
        [sys.executable, "-c", SENDER, str(os.getpid()), str(PARAMS["seed"])], stdin=subprocess.PIPE
    )

unraisable = []


def unraisable_hook(u):
    # An OSError about no object: the signal module failed to write to the
    # wakeup fd, a socket of Trio's that a run interrupted in Trio's own
    # code left registered after closing it. That is Trio's business.
    if u.object is None and isinstance(u.exc_value, OSError):
        return
    unraisable.append(f"{type(u.exc_value).__name__}: {u.exc_value}"[:100])
    if not isinstance(u.exc_value, INJECTED):
        print("UNRAISABLE", u.err_msg, repr(u.exc_value), repr(u.object), file=sys.stderr)
        traceback.print_exception(u.exc_value, file=sys.stderr)


sys.unraisablehook = unraisable_hook

outcomes = {}
unexpected = []
expected_results = [expected(i, ROUNDS) for i in range(TASKS)]
lib = PARAMS["lib"]
deadline = time.monotonic() + PARAMS["seconds"]
index = 0
while index < PARAMS["min_runs"] or (time.monotonic() < deadline and index < PARAMS["max_runs"]):
    Storm.rng = random.Random(PARAMS["seed"] * 1_000_003 + index)
    Storm.left = Storm.rng.choice([0, 1, 1, 2, 3, 5, 8])  # some runs stay clean
    faulthandler.dump_traceback_later(HANG_LIMIT, exit=True)
    try:
        try:
            Storm.armed = True
            if KIND != "sigint":
                signal.setitimer(signal.ITIMER_REAL, Storm.rng.uniform(0.0001, 0.01))
            results = run(lib, supervise, TASKS, ROUNDS)
        finally:
            Storm.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        outcome = "clean" if results == expected_results else "wrong results"
        if outcome != "clean":
            unexpected.append(f"run {index}: {results} != {expected_results}")
    except BaseException as exc:
        if only(exc, INJECTED):
            outcome = "injected"
        else:
            outcome = "unexpected"
            unexpected.append(f"run {index}: " + "".join(traceback.format_exception(exc))[-4000:])
    faulthandler.cancel_dump_traceback_later()
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
    index += 1

if Storm.sender is not None:
    Storm.sender.stdin.close()
    Storm.sender.wait()
faulthandler.dump_traceback_later(HANG_LIMIT, exit=True)
checks = after_checks()
faulthandler.cancel_dump_traceback_later()
report(
    runs=index,
    outcomes=outcomes,
    unexpected=unexpected[:5],
    raised=Storm.raised,
    sites=Storm.sites,
    finalizers=FINALIZERS,
    unraisable=sorted(set(unraisable)),
    checks=checks,
)
"""


@pytest.mark.parametrize("kind", ["alarm", "keyboard", "sigint"])
@pytest.mark.parametrize("lib", LIBS)
def test_storm_of_signal_handler_exceptions(lib: str, kind: str) -> None:
    """Exceptions from a signal handler, at seeded random moments in
    greenback's code and the portal tasks' code, during portal-heavy runs:
    every run ends cleanly or with the injected exception, never hangs or
    crashes, and afterwards portals, finalizers and gc work as before."""
    params = {
        "lib": lib,
        "kind": kind,
        "seed": 7919 * (1 + LIBS.index(lib)) + ["alarm", "keyboard", "sigint"].index(kind),
        "seconds": STORM_SECONDS,
        "min_runs": STORM_MIN_RUNS,
        "max_runs": 400,
        "tasks": 12,
        "rounds": 6,
    }
    s = run_script(_STORM_SCRIPT, params, what=f"{kind} storm on {lib}", timeout=STORM_SECONDS * 4 + 60)
    shown = {k: v for k, v in s.items() if not k.startswith("_")}
    print(f"\n{kind} storm on {lib}: {json.dumps(shown)}")
    assert s["unexpected"] == [], "\n\n".join(s["unexpected"])
    assert s["runs"] >= STORM_MIN_RUNS
    assert s["outcomes"].get("injected", 0) > 0, s
    assert all(value is True for value in s["checks"].values()), s["checks"]
    # No finalizer run by the collector ever got to suspend in await_().
    assert s["finalizers"]["ran await_ inside the collector"] == 0, s["finalizers"]
    assert s["finalizers"]["refused as in gc"] > 0, s["finalizers"]
    # An exception may land in a finalizer (which reports it as
    # unraisable); nothing else may go wrong in one.
    injected = "Alarm" if kind == "alarm" else "KeyboardInterrupt"
    tolerated = []
    if pure_python() and lib == "trio":
        # An exception at the very first bytecode of the twin's
        # Portal.send() or throw() (a Python function called by Trio, where
        # nothing of greenback's can catch it yet) fails the task with the
        # wrapped code left suspended; it is unwound when collected, after
        # the run, where Trio's cancel scopes complain. The compiled core's
        # send() is C, and has no first bytecode.
        tolerated.append("RuntimeError: must be called from async context")
    details = [line for line in s["_stderr"].splitlines() if line.startswith("UNRAISABLE")]
    unexpected_noise = [
        u for u in s["unraisable"] if not u.startswith(f"{injected}:") and u not in tolerated
    ]
    assert unexpected_noise == [], "\n".join(details[:10])
    if pure_python():
        # The storm reached the twin's own machinery, not only user code.
        assert s["sites"].get("_purepy.py", 0) >= 10, s["sites"]


# ===========================================================================
# An exception at each point where a signal handler could run
# ===========================================================================

_INJECTION_SCRIPT = """
import dis
import types

from greenback import _worker


class Injected(KeyboardInterrupt):
    pass


# greenback's implementation code: the twin, and the worker's bottom frame
# (the compiled core's only Python frame in a worker).
MODULES = [_worker]
if IMPLEMENTATION == "pure-python":
    MODULES.append(sys.modules["greenback._purepy"])
FILES = {module.__file__ for module in MODULES}


def codes_of(code):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from codes_of(const)


# Where CPython runs a pending signal handler: on entering a function (the
# "call" event), at a loop's jump back, and once a call has returned (the
# instruction after CALL). Keyed by where each code object starts.
CALLS = {"CALL", "CALL_KW", "CALL_FUNCTION_EX", "CALL_FUNCTION", "CALL_METHOD", "CALL_FUNCTION_KW"}
POINTS = {}
for module in MODULES:
    with open(module.__file__) as f:
        module_code = compile(f.read(), module.__file__, "exec")
    for code in codes_of(module_code):
        points = set()
        previous = None
        for ins in dis.get_instructions(code):
            if previous is not None and previous.opname in CALLS:
                points.add(ins.offset)
            if ins.opname in ("JUMP_BACKWARD", "JUMP_ABSOLUTE") and ins.argval <= ins.offset:
                points.add(ins.offset)
            previous = ins
        POINTS[(code.co_filename, code.co_firstlineno, code.co_name)] = points


class Tracer:
    '''sys.settrace: count the points, or raise at the n-th.

    CPython unsets the trace function when it raises. On 3.12.1, a frame
    still marked for opcode tracing then crashes the interpreter at its next
    instruction, so every frame marked is unmarked first (and after a run).'''

    def __init__(self, target):
        self.target = target
        self.count = 0
        self.where = None
        self.frames = []

    def hit(self, frame, label):
        self.count += 1
        if self.count - 1 == self.target:
            self.where = f"{frame.f_code.co_name}:{label}"
            self.release()
            raise Injected()

    def release(self):
        for frame in self.frames:
            frame.f_trace_opcodes = False
        self.frames.clear()

    def __call__(self, frame, event, arg):
        if event != "call" or frame.f_code.co_filename not in FILES:
            return None
        self.hit(frame, "call")
        frame.f_trace_lines = False
        frame.f_trace_opcodes = True
        self.frames.append(frame)
        return self.local

    def local(self, frame, event, arg):
        if event == "opcode":
            code = frame.f_code
            if frame.f_lasti in POINTS.get((code.co_filename, code.co_firstlineno, code.co_name), ()):
                self.hit(frame, f"line {frame.f_lineno}")
        return self.local


class Profiler:
    '''sys.setprofile: once the tracer has raised, raise again at the n-th
    entry into greenback's code or return from a C call made by it: inside
    the except clause or finally block that the first exception ran.'''

    def __init__(self, tracer, n):
        self.tracer = tracer
        self.n = n
        self.where = None

    def __call__(self, frame, event, arg):
        if self.tracer.where is None or self.where is not None:
            return
        if event not in ("call", "c_return") or frame.f_code.co_filename not in FILES:
            return
        if self.n > 0:
            self.n -= 1
            return
        self.where = f"{frame.f_code.co_name}:{event} line {frame.f_lineno}"
        raise Injected()


class Garbage:
    def __init__(self):
        self.me = self


async def abandon_a_portal():
    # A one-shot portal suspended in await_(), dropped in a cycle: the
    # collector finalizes it, and its finalizer runs a step to unwind it.
    portal = impl.run_sync_portal(sync_part, (0,), {})
    holder = Garbage()
    holder.portal = portal
    portal.send(None)
    del portal, holder
    gc.collect()


async def task_a():
    await greenback.ensure_portal()
    a = sync_part(1)
    b = greenback.await_(nested(1))
    c = in_child_greenlet(1)
    await abandon_a_portal()
    return a + b + c


async def task_b():
    return await greenback.with_portal_run_sync(sync_part, 10)


async def scenario():
    if LIB == "trio":
        results = {}

        async def store(key, async_fn):
            results[key] = await async_fn()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store, "a", task_a)
            nursery.start_soon(store, "b", task_b)
        return results["a"], results["b"]
    return tuple(await asyncio.gather(task_a(), task_b()))


EXPECTED = (9, 12)
lib = PARAMS["lib"]
unraisable = []
sys.unraisablehook = lambda u: unraisable.append(f"{type(u.exc_value).__name__}: {u.exc_value}"[:200])

# CPython 3.12.1 turns opcode events on at sys.settrace() only if some frame
# has asked for them before: ask once, here.
sys._getframe().f_trace_opcodes = True
sys._getframe().f_trace_opcodes = False

# Every run starts with no parked worker, so that each worker it uses starts
# (and is traced) within the run.
impl._release_parked_workers()
counter = Tracer(None)
sys.settrace(counter)
try:
    assert run(lib, scenario) == EXPECTED
finally:
    sys.settrace(None)
    counter.release()
total = counter.count
targets = list(range(total))
if len(targets) > PARAMS["runs"]:
    targets = sorted(random.Random(PARAMS["seed"]).sample(targets, PARAMS["runs"]))

outcomes = {}
bad = []
for n in targets:
    impl._release_parked_workers()
    tracer = Tracer(n)
    profiler = Profiler(tracer, n % 4) if n % 2 else None
    faulthandler.dump_traceback_later(HANG_LIMIT, exit=True)
    sys.setprofile(profiler)
    sys.settrace(tracer)
    try:
        result = run(lib, scenario)
        outcome = "clean" if result == EXPECTED else f"wrong results {result}"
    except BaseException as exc:
        if only(exc, Injected):
            outcome = "injected"
        else:
            outcome = "unexpected " + "".join(traceback.format_exception(exc))[-2500:]
    finally:
        sys.settrace(None)
        sys.setprofile(None)
        tracer.release()
    gc.collect()
    checks = state_checks()
    checks.update(fresh_run_checks([lib]))
    faulthandler.cancel_dump_traceback_later()
    failed = [name for name, ok in checks.items() if ok is not True]
    if outcome not in ("clean", "injected") or failed:
        where = f"{tracer.where}, then {profiler.where}" if profiler else tracer.where
        bad.append(f"point {n} (at {where}): {outcome}; failed checks: {failed}")
    key = outcome if outcome in ("clean", "injected") else "bad"
    outcomes[key] = outcomes.get(key, 0) + 1

faulthandler.dump_traceback_later(HANG_LIMIT, exit=True)
checks = after_checks()
faulthandler.cancel_dump_traceback_later()
report(
    points=total,
    runs=len(targets),
    outcomes=outcomes,
    bad=bad[:5],
    checks=checks,
    unraisable=sorted(set(u for u in unraisable if not u.startswith("Injected"))),
)
"""


@pytest.mark.parametrize("lib", LIBS)
def test_exception_at_each_point_where_a_signal_handler_runs(lib: str) -> None:
    """Raise at (a seeded sample of) the points where CPython can run a
    signal handler in greenback's implementation code, and at half of them
    a second time inside whatever handles the first; each run must end
    cleanly or with the exception, and leave nothing broken."""
    params = {"lib": lib, "runs": INJECTION_RUNS, "seed": 1 + LIBS.index(lib)}
    s = run_script(_INJECTION_SCRIPT, params, what=f"injection on {lib}", timeout=240)
    print(f"\ninjection on {lib}: points {s['points']}, runs {s['runs']}, {s['outcomes']}")
    assert s["bad"] == [], "\n\n".join(s["bad"])
    assert s["outcomes"].get("injected", 0) > 0, s
    assert all(value is True for value in s["checks"].values()), s["checks"]
    assert s["unraisable"] == [], s["unraisable"]
    if pure_python():
        assert s["points"] > 200  # the whole twin is traced, not only its first frames


# ===========================================================================
# The gc.callbacks hook, interrupted at its first bytecode
# ===========================================================================

_GC_HOOK_SCRIPT = """
PHASE = PARAMS["phase"]
raised = []


# Markers around greenback's hook in gc.callbacks tell the trace function
# when greenback's hook runs for the phase under test.
window = {"open": False}


def before(phase, info):
    window["open"] = phase == PHASE


def after(phase, info):
    window["open"] = False


gc.callbacks.insert(0, before)
gc.callbacks.append(after)
MARKERS = {before.__code__, after.__code__}


def tracer(frame, event, arg):
    # An exception at the first bytecode of any Python code that runs in the
    # window: for a hook written in Python, its first line.
    if event == "call" and window["open"] and frame.f_code not in MARKERS:
        raised.append(frame.f_code.co_name)
        raise KeyboardInterrupt(f"in {frame.f_code.co_name}")
    return None


unraisable = []
sys.unraisablehook = lambda u: unraisable.append(f"{type(u.exc_value).__name__}: {u.exc_value}")


async def collect_in_a_step():
    await greenback.ensure_portal()
    before_count = dict(FINALIZERS)
    Finalized()
    sys.settrace(tracer)
    try:
        gc.collect()
    finally:
        sys.settrace(None)
    refused = FINALIZERS["refused as in gc"] - before_count["refused as in gc"]
    ran = FINALIZERS["ran await_ inside the collector"] - before_count["ran await_ inside the collector"]
    return refused, ran


refused, ran = run("asyncio", collect_in_a_step)
gc.callbacks.remove(before)
gc.callbacks.remove(after)
checks = after_checks()
report(raised=raised, unraisable=unraisable, refused=refused, ran=ran, checks=checks)
"""


@pytest.mark.parametrize("phase", ["start", "stop"])
def test_gc_hook_is_not_interrupted_at_its_first_bytecode(phase: str) -> None:
    """An exception at the first bytecode of greenback's gc.callbacks hook
    must not leave "collecting" wrong: stale after "stop" it would refuse
    every later await_(); missing after "start", a finalizer run by that
    collection could suspend in await_() inside the collector. The hook
    runs no Python bytecode, so there is no first bytecode to raise at."""
    s = run_script(_GC_HOOK_SCRIPT, {"phase": phase}, what=f"gc hook, {phase} phase", timeout=120)
    assert s["raised"] == [], s
    assert s["unraisable"] == [], s
    assert (s["refused"], s["ran"]) == (1, 0), s
    assert all(value is True for value in s["checks"].values()), s["checks"]


# ===========================================================================
# fork() from sync code under a portal
# ===========================================================================

_FORK_SCRIPT = """
LOG = PARAMS["log"]


def log(line):
    with open(LOG, "a") as f:
        f.write(line + "\\n")


async def ticker():
    # A task of the parent's that keeps stepping through its portal.
    await greenback.ensure_portal()
    while True:
        greenback.await_(sleep(0.002))
        log(f"tick {os.getpid()}")


async def sleep(seconds):
    if LIB == "trio":
        await trio.sleep(seconds)
    else:
        await asyncio.sleep(seconds)


async def short_task(i):
    # Its worker is parked when it ends: the child inherits a pool.
    await greenback.ensure_portal()
    return greenback.await_(plus_one(i))


async def child_task(i):
    await greenback.ensure_portal()
    total = greenback.await_(plus_one(i))
    total += await greenback.with_portal_run_sync(sync_part, i)
    total += greenback.await_(nested(i))
    if PARAMS["lib"] == "trio":
        # An asyncio loop inside a Trio task (as the child's is) can't tell
        # its own tasks apart from a greenlet they start: not about fork().
        total += i + 2
    else:
        total += in_child_greenlet(i)
    return total


async def child_main():
    return list(await asyncio.gather(*(child_task(i) for i in range(6))))


def child(parent_greenlets):
    # In the child: the forking greenlet (a worker of the parent's) goes on
    # running; every other greenlet that existed at fork() is the parent's
    # and must never run here.
    me = greenlet.getcurrent()
    others = {id(g) for g in parent_greenlets if g is not me}
    ran = []

    def watch(event, args):
        if event in ("switch", "throw") and id(args[1]) in others:
            ran.append(repr(args[1]))

    state = None
    if IMPLEMENTATION == "pure-python":
        s = sys.modules["greenback._purepy"]._state
        state = {"active": repr(s.active), "collecting": s.collecting, "parked": len(s.parked)}
    greenlet.settrace(watch)
    if sys.version_info < (3, 12):
        # asyncio resets this in a child of fork() from 3.12 on.
        asyncio.events._set_running_loop(None)
    # The parent's running-loop and portal state are still set in this
    # thread; nothing but greenback's reset makes the child's portals work.
    results = run("asyncio", child_main)
    greenlet.settrace(None)
    gc.collect()
    print(json.dumps({"pid": os.getpid(), "results": results, "parent greenlets run": ran, "state": state}))
    print("child ok", flush=True)


def fork_now():
    # Sync code under a portal: a step of main()'s task is running.
    assert greenback.has_portal()
    parent_greenlets = [g for g in gc.get_objects() if isinstance(g, greenlet.greenlet)]
    if IMPLEMENTATION == "pure-python":
        assert sys.modules["greenback._purepy"]._state.parked, "nothing parked to inherit"
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child(parent_greenlets)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return pid, status


async def parent_main():
    await greenback.ensure_portal()
    if LIB == "trio":
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            async with trio.open_nursery() as shorts:
                for i in range(3):
                    shorts.start_soon(short_task, i)
            await sleep(0.03)
            child_pid, status = fork_now()
            await sleep(0.03)
            nursery.cancel_scope.cancel()
    else:
        task = asyncio.create_task(ticker())
        await asyncio.gather(*(short_task(i) for i in range(3)))
        await sleep(0.03)
        child_pid, status = fork_now()
        await sleep(0.03)
        task.cancel()
    return child_pid, status


child_pid, status = run(PARAMS["lib"], parent_main)
with open(LOG) as f:
    ticks = f.read().split()
report(parent=os.getpid(), child=child_pid, status=status, tick_pids=sorted(set(ticks[1::2])), ticks=len(ticks) // 2)
"""


@pytest.mark.parametrize("lib", LIBS)
def test_fork_from_sync_code_under_a_portal(lib: str, tmp_path: Path) -> None:
    """os.fork() from sync code under a portal, while another portal task
    of the parent's keeps ticking: the child runs asyncio.run() with portal
    tasks of its own (ensure_portal, await_, one-shot portals, nested ones);
    no greenlet of the parent's runs in the child, and the parent's ticker
    never ticks there."""
    log = tmp_path / "ticks.log"
    s = run_script(_FORK_SCRIPT, {"lib": lib, "log": str(log)}, what=f"fork on {lib}", timeout=120)
    out = s["_stdout"]
    assert "child ok" in out, out + s["_stderr"]
    assert s["status"] == 0, out + s["_stderr"]
    child = json.loads(next(line for line in out.splitlines() if line.startswith('{"pid"')))
    assert child["pid"] == s["child"] != s["parent"]
    assert child["results"] == [(i + 1) + (i + 2) + (i + 2) + (i + 2) for i in range(6)]
    assert child["parent greenlets run"] == [], child
    if pure_python():
        assert child["state"] == {"active": "None", "collecting": False, "parked": 0}, child
    assert s["ticks"] > 0
    assert s["tick_pids"] == [str(s["parent"])], s
