"""The benchmark script runs and reports every operation. Timing is never
asserted here (the machine is shared and noisy); that is what `make bench`
is for."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import Lib

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def test_worker_reports_every_operation(lib: Lib) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "worker", "--library", lib.sniffio_name,
         "--rounds", "1", "--scale", "0.005"],
        capture_output=True, text=True, timeout=120, cwd=BENCH.parent,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    # Rows for this package alone: awaitlet everywhere, SQLAlchemy on asyncio.
    ours_only = {"awaitlet"} | ({"lazy_load", "run_sync_load"} if lib.name == "asyncio" else set())
    assert set(results) == {
        "bare", "in_portal", "await_", "sync_portal", "async_portal",
        "sync_portal_await", "task_plain", "task_portal", "await_ten",
    } | ours_only
    for key, samples in results.items():
        assert len(samples) == 1, key
        assert samples[0] > 0, key


@pytest.mark.parametrize("key", ["bare", "await_", "task_portal"])
def test_instruction_counter_runs_one_operation(lib: Lib, key: str) -> None:
    # What `instructions.py compare` runs under valgrind, here without it.
    proc = subprocess.run(
        [sys.executable, str(BENCH.with_name("instructions.py")), "one",
         lib.sniffio_name, key, "20"],
        capture_output=True, text=True, timeout=120, cwd=BENCH.parent,
    )
    assert (proc.returncode, proc.stderr) == (0, "")


def load_bench() -> Any:
    """bench.py as a module, without running it."""
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench  # dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["bench"]
    return bench


@pytest.mark.parametrize("met", [True, False])
def test_report_marks_targets(met: bool) -> None:
    bench = load_bench()
    slow = 1.0 if met else 3.0
    samples = {op.key: [1.0] for op in bench.OPS}
    samples["in_portal"] = [1.2 * slow]
    ratios = {key: [1.0] for key, (base, _, _) in bench.TARGETS.items() if base != "upstream"}
    ratios["in_portal"] = [1.2 * slow]
    data = {"asyncio": {"ours": samples, "upstream": samples,
                        "ours_ratio": ratios, "upstream_ratio": {}}}
    rows = bench.summarize(data)
    (row,) = [r for r in rows if r["key"] == "in_portal"]
    assert row["met"] is met
    assert row["target"] == "<= 1.5x bare"


def test_report_shows_rows_upstream_cannot_run() -> None:
    bench = load_bench()
    ours = {op.key: [2.0] for op in bench.OPS}
    upstream = {op.key: [2.0] for op in bench.OPS if not op.ours_only}
    ratios = {key: [1.0] for key, (base, _, _) in bench.TARGETS.items() if base != "upstream"}
    data = {"asyncio": {"ours": ours, "upstream": upstream, "ours_ratio": ratios, "upstream_ratio": {}}}
    rows = {row["key"]: row for row in bench.summarize(data)}
    assert rows["awaitlet"]["upstream_us"] is None
    assert rows["awaitlet"]["target"] == "<= 1.15x await_"
    table = bench.format_table(list(rows.values()))
    assert "| asyncio | 9 awaitlet(checkpoint()) inside a portal | 2.000 | n/a |" in table
