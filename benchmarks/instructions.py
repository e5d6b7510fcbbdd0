"""Instructions per operation, counted with valgrind's callgrind.

Timings on a shared virtual machine drift by tens of percent between
processes; instruction counts of the same program do not. This compares
builds of greenback (or greenback against upstream) to a fraction of a
percent, for the operations of bench.py:

    python instructions.py compare --python NAME=PATH --python NAME=PATH \\
        [--libraries asyncio,trio] [--n 5000]

For each interpreter, library and operation it reports instructions per
timed unit, and the ratios that bench.py's targets use (row 2 against row 1,
and so on).

    python instructions.py budget [--python PATH] [--libraries asyncio,trio,uvloop] [--n 5000]

splits what a step through a portal adds (row 2 against row 1) by where its
instructions run: greenlet, the C library (on greenlet's behalf: stack-slice
copies and the buffers that hold them), greenback's compiled code and the
interpreter. It also counts, on its own, the one coroutine frame that
with_portal_run adds to each step: a bare checkpoint awaited through one
more plain coroutine.

Every count is the difference between a run of 2N iterations and a run of N,
so start-up and one-time costs (the first worker greenlet, the stack bounds)
cancel out. Run it from this directory, as bench.py.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench import OPS, make_ops, run_on

HERE = Path(__file__).resolve().parent
# Ratios worth watching: (row, against row).
RATIOS = [("in_portal", "bare"), ("await_", "bare"), ("await_ten", "bare"),
          ("task_portal", "task_plain")]
# Not a bench.py row: a bare checkpoint awaited through one more coroutine
# frame, which is what with_portal_run's own frame adds to every step.
NESTED = "nested"


def run_one(library: str, key: str, n: int) -> None:
    ops = make_ops(library)
    # A collection of the older generations walks every object of the
    # process, millions of instructions, and when one falls due depends on
    # all allocations since start-up: counts would jump by that much between
    # runs that differ in one operation. Collect now, then not at all.
    gc.collect()
    gc.disable()

    async def nested(n: int) -> float:
        return await ops["bare"](n)

    async def main() -> None:
        await (nested if key == NESTED else ops[key])(n)

    run_on(library, main)


def callgrind(python: str, library: str, key: str, n: int, out: str = "/dev/null") -> int:
    """Run one operation n times under callgrind; its total instruction count."""
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
         python, str(HERE / "instructions.py"), "one", library, key, str(n)],
        capture_output=True, text=True, cwd=HERE, check=True,
        # The same dictionary layouts in every run: string hashes are salted
        # per process otherwise, which moves start-up by millions.
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{proc.stderr}")
    return int(found.group(1))


def compare(pythons: dict[str, str], libraries: list[str], n: int) -> None:
    per = {op.key: op.per for op in OPS}
    keys = sorted({key for pair in RATIOS for key in pair}, key=list(per).index)
    for library in libraries:
        counts: dict[tuple[str, str], float] = {}
        for name, python in pythons.items():
            for key in keys:
                extra = callgrind(python, library, key, 2 * n) - callgrind(python, library, key, n)
                counts[name, key] = extra / (n * per[key])
        print(f"{library}: instructions per timed unit")
        for key in keys:
            print(f"  {key:12}" + "".join(f" {name} {counts[name, key]:9.0f}" for name in pythons))
        for key, base in RATIOS:
            ratios = {name: counts[name, key] / counts[name, base] for name in pythons}
            print(f"  {key}/{base}:" + "".join(f" {name} {r:.3f}" for name, r in ratios.items()))


# callgrind_annotate's listing: "12,345 (1.2%)  file:function [object]". The
# object is missing on lines for code inlined from another file (a CPython
# header inlined into greenlet, say); the same function's other lines name it.
LISTED = re.compile(r"^\s*([\d,]+)\s(?:\([^)]*\))?\s*(\S.*?)(?: \[(.+)\])?\s*$")
PARTS = ["greenlet", "C library", "greenback", "interpreter", "uvloop", "other"]


def part_of(obj: str) -> str:
    name = os.path.basename(obj)
    if name.startswith("_greenlet"):
        return "greenlet"
    if name.startswith("_core."):
        return "greenback"
    if name.startswith(("libc.", "libc-")):
        return "C library"
    if name.startswith(("libpython", "python")) or "/lib-dynload/" in obj:
        return "interpreter"  # with the standard library's C modules
    if "/uvloop/" in obj:
        return "uvloop"
    return "other"


def parts_of_listing(annotated: str) -> Counter[str]:
    """callgrind_annotate's exclusive counts, summed by part of the program."""
    # The listing runs from its header to the first blank line; annotated
    # source follows, whose lines look alike.
    listing = annotated.split("file:function", 1)[-1].split("\n\n", 1)[0]
    rows = []
    objects: dict[str, str] = {}
    for line in listing.splitlines():
        found = LISTED.match(line)
        if found:
            function = found.group(2).rsplit(":", 1)[-1]
            rows.append((int(found.group(1).replace(",", "")), function, found.group(3)))
            if found.group(3):
                objects.setdefault(function, found.group(3))
    parts: Counter[str] = Counter()
    for instructions, function, obj in rows:
        parts[part_of(obj or objects.get(function, "?"))] += instructions
    return parts


def by_part(python: str, library: str, key: str, n: int) -> Counter[str]:
    """Instructions of one run, summed by the part of the program they ran in."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        callgrind(python, library, key, n, out)
        annotated = subprocess.run(
            ["callgrind_annotate", "--inclusive=no", "--threshold=100", out],
            capture_output=True, text=True, check=True,
        ).stdout
    return parts_of_listing(annotated)


def budget(python: str, libraries: list[str], n: int) -> None:
    for library in libraries:
        per_unit = {}
        for key in ("bare", "in_portal", NESTED):
            once, twice = by_part(python, library, key, n), by_part(python, library, key, 2 * n)
            per_unit[key] = {part: (twice[part] - once[part]) / n for part in PARTS}
        step = {part: per_unit["in_portal"][part] - per_unit["bare"][part] for part in PARTS}
        frame = sum(per_unit[NESTED].values()) - sum(per_unit["bare"].values())
        total = sum(step.values())
        print(f"{library}: a bare checkpoint {sum(per_unit['bare'].values()):,.0f} instructions;"
              f" a step through a portal adds {total:,.0f}")
        for part in PARTS:
            print(f"  {part:12} {step[part]:8,.0f}  {step[part] / total:6.1%}")
        print(f"  one more coroutine frame, counted alone: {frame:,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("one", help="run one operation (under valgrind)")
    one.add_argument("library")
    one.add_argument("key")
    one.add_argument("n", type=int)
    cmp = sub.add_parser("compare")
    cmp.add_argument("--python", action="append", required=True, help="NAME=PATH")
    cmp.add_argument("--libraries", default="asyncio,trio")
    cmp.add_argument("--n", type=int, default=5000)
    bud = sub.add_parser("budget")
    bud.add_argument("--python", default=sys.executable)
    bud.add_argument("--libraries", default="asyncio,trio,uvloop")
    bud.add_argument("--n", type=int, default=5000)
    args = parser.parse_args()
    if args.command == "one":
        run_one(args.library, args.key, args.n)
    elif args.command == "compare":
        compare(dict(item.split("=", 1) for item in args.python), args.libraries.split(","), args.n)
    else:
        budget(args.python, args.libraries.split(","), args.n)


if __name__ == "__main__":
    main()
