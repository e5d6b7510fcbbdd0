"""Every runnable example under examples/ is exercised here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=EXAMPLES,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout


def test_quickstart_runs_on_both_loops() -> None:
    out = run_example("quickstart.py")
    for library in ("asyncio", "trio   "):
        assert f"[{library}] has_portal() before: False" in out
        assert f"[{library}] has_portal() after ensure_portal(): True" in out
        assert f"[{library}] legacy_sync_layer(21) returned 42" in out
        assert f"[{library}] with_portal_run_sync(legacy_sync_layer, 1) returned 2" in out
    assert out.rstrip().endswith("done: the same sync code ran on both event loops")


def test_replace_nest_asyncio_example() -> None:
    out = run_example("replace_nest_asyncio.py")
    assert out.splitlines() == [
        "page 0: Ada, Grace",
        "page 1: Barbara",
        "page 2: Grace, Barbara, Ada",
        "portal outside the subsystem: False",
    ]


def test_sqlalchemy_sync_code_example() -> None:
    out = run_example("sqlalchemy_sync_code.py")
    assert out.splitlines() == [
        "Ursula: Lathe, Tehanu",
        "books: 2",
        "one-shot portal: Ursula: Lathe, Tehanu",
    ]
