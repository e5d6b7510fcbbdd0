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

from conftest import Lib, uvloop

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


@pytest.mark.parametrize("key", ["bare", "await_", "task_portal", "nested"])
def test_instruction_counter_runs_one_operation(lib: Lib, key: str) -> None:
    # What `instructions.py compare` and `budget` run under valgrind, here
    # without it ("nested" is the budget's extra coroutine frame).
    proc = subprocess.run(
        [sys.executable, str(BENCH.with_name("instructions.py")), "one",
         lib.sniffio_name, key, "20"],
        capture_output=True, text=True, timeout=120, cwd=BENCH.parent,
    )
    assert (proc.returncode, proc.stderr) == (0, "")


CALLGRIND_LISTING = """\
--------------------------------------------------------------------------------
Ir                   file:function
--------------------------------------------------------------------------------
1,000 (40.0%)  Python/ceval.c:_PyEval_EvalFrameDefault [/usr/lib/libpython3.11.so.1.0]
  300 (12.0%)  Include/object.h:_PyEval_EvalFrameDefault
   50 ( 2.0%)  Include/object.h:__pyx_f_9greenback_5_core_6Portal__step
  500 (20.0%)  src/greenlet/greenlet.cpp:g_switch() [/venv/site-packages/greenlet/_greenlet.cpython-311-x86_64-linux-gnu.so]
  400 (16.0%)  string/memmove.S:__memcpy_avx_unaligned_erms [/usr/lib/x86_64-linux-gnu/libc.so.6]
  200 ( 8.0%)  greenback/_core.c:__pyx_f_9greenback_5_core_6Portal__step [/venv/site-packages/greenback/_core.cpython-311-x86_64-linux-gnu.so]
  100 ( 4.0%)  ./elf/dl-lookup.c:do_lookup_x [/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2]

--------------------------------------------------------------------------------
-- Auto-annotated source: Python/ceval.c
--------------------------------------------------------------------------------
9,999 (99.0%)  looks like a listing line [/usr/lib/libc.so.6]
"""


def test_budget_sums_instructions_by_part(monkeypatch: pytest.MonkeyPatch) -> None:
    # A line without an object (code inlined from a header) belongs to the
    # object that the same function's other lines name, before or after it;
    # the annotated source after the listing is not counted.
    instructions = load_bench("instructions")
    monkeypatch.setattr(instructions, "callgrind", lambda *args, **kwargs: 0)
    monkeypatch.setattr(instructions.subprocess, "run", lambda *args, **kwargs: subprocess.CompletedProcess(
        args, 0, stdout=CALLGRIND_LISTING))
    parts = instructions.by_part(sys.executable, "asyncio", "bare", 1)
    assert dict(parts) == {"interpreter": 1300, "greenlet": 500, "C library": 400,
                           "greenback": 250, "other": 100}


def load_bench(name: str = "bench") -> Any:
    """benchmarks/<name>.py as a module, without running it."""
    spec = importlib.util.spec_from_file_location(name, BENCH.with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(BENCH.parent))  # bench.py imports app_bench
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
        sys.path.remove(str(BENCH.parent))
    return module


@pytest.mark.parametrize("met", [True, False])
@pytest.mark.parametrize(("library", "limit"), [("asyncio", "1.25"), ("trio", "1.2"), ("uvloop", "1.45")])
def test_report_marks_targets(met: bool, library: str, limit: str) -> None:
    bench = load_bench()
    step = float(limit) - 0.01 if met else float(limit) + 0.01
    samples = {op.key: [1.0] for op in bench.OPS}
    samples["in_portal"] = [step]
    ratios = {key: [1.0] for key, (base, _) in bench.TARGETS.items() if base != "upstream"}
    ratios["in_portal"] = [step]
    data = {library: {"ours": samples, "upstream": samples,
                      "ours_ratio": ratios, "upstream_ratio": {}}}
    rows = {row["key"]: row for row in bench.summarize(data)}
    assert rows["in_portal"]["met"] is met
    assert rows["in_portal"]["target"] == f"<= {limit}x bare"
    # uvloop has a target for a step only; the other rows are for reference.
    assert ("target" in rows["await_"]) is (library != "uvloop")


def test_report_shows_rows_upstream_cannot_run() -> None:
    bench = load_bench()
    ours = {op.key: [2.0] for op in bench.OPS}
    upstream = {op.key: [2.0] for op in bench.OPS if not op.ours_only}
    ratios = {key: [1.0] for key, (base, _) in bench.TARGETS.items() if base != "upstream"}
    data = {"asyncio": {"ours": ours, "upstream": upstream, "ours_ratio": ratios, "upstream_ratio": {}}}
    rows = {row["key"]: row for row in bench.summarize(data)}
    assert rows["awaitlet"]["upstream_us"] is None
    assert rows["awaitlet"]["target"] == "<= 1.15x await_"
    table = bench.format_table(list(rows.values()))
    assert "| asyncio | 9 awaitlet(checkpoint()) inside a portal | 2.000 | n/a |" in table


# The application benchmark (app_bench.py): a TCP service on loopback, a
# server process and a load-generating client process per run. Here at a
# tiny scale, with this package standing in for upstream greenback.

app_posix_only = pytest.mark.skipif(sys.platform == "win32", reason="the service is POSIX-only")
APP_SCALE = dict(clients=2, messages=20, warmup=5, timeout=60.0)
APP_CONFIG_KEYS = [
    "asyncio-plain", "asyncio-tree", "asyncio-ensure", "asyncio-ensure-upstream",
    "uvloop-plain", "uvloop-tree",
    "trio-plain", "trio-instrument", "trio-instrument-upstream",
]


def test_app_configurations_are_all_listed() -> None:
    app = load_bench("app_bench")
    assert [config.key for config in app.APP_CONFIGS] == APP_CONFIG_KEYS
    for config in app.APP_CONFIGS:
        for other in (config.baseline, config.upstream_twin):
            assert other is None or other in app.APP_CONFIG_BY_KEY
    # Every round runs each configuration once, those of a loop together.
    for round_no in range(4):
        order = app.round_order(app.APP_CONFIGS, round_no)
        assert sorted(config.key for config in order) == sorted(APP_CONFIG_KEYS)
        loops = [config.loop for config in order]
        assert sum(a != b for a, b in zip(loops, loops[1:])) == 2


@app_posix_only
@pytest.mark.parametrize("key", APP_CONFIG_KEYS)
def test_app_configuration_runs(key: str) -> None:
    app = load_bench("app_bench")
    config = app.APP_CONFIG_BY_KEY[key]
    if config.loop == "uvloop" and uvloop is None:
        pytest.skip("uvloop is not installed")
    pythons = {"ours": sys.executable, "upstream": sys.executable}
    result = app.run_once(config, pythons, sys.executable, app.Scale(**APP_SCALE))
    assert set(result) == {"rps", "cpu_us", "system_us", "busy", "client_busy"}
    assert result["rps"] > 0 and result["cpu_us"] > 0


@app_posix_only
def test_app_run_fails_loudly_without_a_portal() -> None:
    # The synchronous layer on Trio with no instrument: await_ has no portal,
    # the server records the error, and the run fails with it.
    app = load_bench("app_bench")
    broken = app.AppConfig("trio-no-portal", "sync layer, no portal", "trio", "tree", "ours")
    pythons = {"ours": sys.executable}
    with pytest.raises(app.AppRunError, match="(?s)trio-no-portal: the client failed.*portal"):
        app.run_once(broken, pythons, sys.executable, app.Scale(**APP_SCALE))


@app_posix_only
def test_app_run_writes_the_report(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\n<!-- results:start -->\n<!-- results:end -->\n\nBy hand.\n")
    configs = "asyncio-plain,asyncio-tree,trio-plain,trio-instrument"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "run", "--ours", sys.executable, "--upstream", sys.executable,
         "--only", "app", "--app-rounds", "2", "--app-clients", "2", "--app-messages", "10",
         "--app-warmup", "2", "--app-configs", configs, "--doc", str(doc)],
        capture_output=True, text=True, timeout=300, cwd=BENCH.parent,
    )
    assert proc.returncode == 0, proc.stderr
    text = doc.read_text()
    assert text.endswith("By hand.\n")
    assert "| asyncio | (b) sync layer, with_portal_run_tree over the server | ours |" in text
    assert "| trio | (e) sync layer, AutoPortalInstrument | ours |" in text
    report = json.loads(doc.with_suffix(".json").read_text())
    assert "rows" not in report  # no operations were run, and none saved before
    assert [row["key"] for row in report["app"]["rows"]] == configs.split(",")
    assert all(len(runs) == 2 for runs in report["app"]["samples"].values())
    assert doc.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("met", [True, False])
def test_app_report_marks_targets(met: bool) -> None:
    app = load_bench("app_bench")

    def runs(*rps: float) -> list[dict[str, float]]:
        return [{"rps": r, "cpu_us": 1e6 / r, "system_us": 1e5 / r, "busy": 1.0, "client_busy": 0.5}
                for r in rps]

    # Ratios are taken within each round: (90/100, 50/50, 99/100) -> median 0.99.
    tree = runs(90, 50, 99) if met else runs(90, 45, 80)
    samples = {"asyncio-plain": runs(100, 50, 100), "asyncio-tree": tree,
               "asyncio-ensure-upstream": runs(50, 25, 50)}
    rows = {row["key"]: row for row in app.summarize_app(samples)}
    row = rows["asyncio-tree"]
    assert row["target"] == ">= 0.93x plain"
    assert row["met"] is met
    assert row["vs_plain"] == pytest.approx(0.99 if met else 0.9)
    assert row["vs_upstream"] == pytest.approx(1.98 if met else 1.8)
    assert row["cpu_vs_plain"] == pytest.approx(1 / row["vs_plain"])
    assert rows["asyncio-plain"]["vs_plain"] is None
    table = app.format_app_table(list(rows.values()))
    assert ("| yes |" if met else "| **no** |") in table
