"""Instructions per operation, counted with valgrind's callgrind.

Timings on a shared virtual machine drift by tens of percent between
processes; instruction counts of the same program do not. This compares
builds of greenback (or greenback against upstream) to a fraction of a
percent, for the operations of bench.py:

    python instructions.py compare --python NAME=PATH --python NAME=PATH \\
        [--libraries asyncio,trio] [--n 5000]

For each interpreter, library and operation it counts a run with N
iterations and a run with none, and reports the difference per timed unit,
and the ratios that bench.py's targets use (row 2 against row 1, and so on).
Run it from this directory, as bench.py.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

from bench import OPS, make_ops, run_on

HERE = Path(__file__).resolve().parent
# Ratios worth watching: (row, against row).
RATIOS = [("in_portal", "bare"), ("await_", "bare"), ("await_ten", "bare"),
          ("task_portal", "task_plain")]


def run_one(library: str, key: str, n: int) -> None:
    async def main() -> None:
        await make_ops(library)[key](n)

    run_on(library, main)


def count(python: str, library: str, key: str, n: int) -> int:
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         python, str(HERE / "instructions.py"), "one", library, key, str(n)],
        capture_output=True, text=True, cwd=HERE, check=True,
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
            empty = count(python, library, "bare", 0)
            for key in keys:
                counts[name, key] = (count(python, library, key, n) - empty) / (n * per[key])
        print(f"{library}: instructions per timed unit")
        for key in keys:
            print(f"  {key:12}" + "".join(f" {name} {counts[name, key]:9.0f}" for name in pythons))
        for key, base in RATIOS:
            ratios = {name: counts[name, key] / counts[name, base] for name in pythons}
            print(f"  {key}/{base}:" + "".join(f" {name} {r:.3f}" for name, r in ratios.items()))


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
    args = parser.parse_args()
    if args.command == "one":
        run_one(args.library, args.key, args.n)
        return
    pythons = dict(item.split("=", 1) for item in args.python)
    compare(pythons, args.libraries.split(","), args.n)


if __name__ == "__main__":
    main()
