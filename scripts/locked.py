"""Run a command while holding an exclusive lock on a file.

    python scripts/locked.py LOCKFILE COMMAND [ARG...]

The Makefile builds wheels for several venvs from one build/ directory;
this keeps two builds from using it at once. It stands in for util-linux's
flock(1), which macOS does not have: fcntl.flock works on both.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return subprocess.call(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
