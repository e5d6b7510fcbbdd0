"""Side-by-side benchmark: this greenback against upstream greenback 1.3.0.

`make bench` runs it. The orchestrator (`bench.py run`) starts worker
processes (`bench.py worker`) alternately with this package's venv and with a
venv holding upstream greenback, so that drift in machine load hits both
alike. Each worker runs every operation round-robin, after a warm-up round,
and reports microseconds per operation for each round. The orchestrator
takes medians over all rounds of all processes, prints a table and rewrites
the results part of docs/performance.md and its chart.

The application benchmark (app_bench.py: a TCP service whose requests go
through a synchronous layer that calls `greenback.await_`) runs after the
operations, in rounds of its own, and adds a second table. `--only ops` or
`--only app` runs one part; the other part of the report is kept from the
last run's JSON.

Run it from this directory (as `make bench` does): the repository's own
greenback/ must not shadow the installed package.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable

import app_bench
from tables import ratio, target_cells

# --------------------------------------------------------------------------
# The operations. Each takes an iteration count and returns elapsed seconds;
# `per` says how many timed units one iteration holds.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    key: str
    title: str
    per: int  # timed units per iteration (e.g. 10 inner yields)
    iterations: int
    # Rows that only this package can run (upstream has no such feature), on
    # these loops only (None: all).
    ours_only: bool = False
    libraries: tuple[str, ...] | None = None


OPS = [
    Op("bare", "1 bare checkpoint", 1, 20_000),
    Op("in_portal", "2 checkpoint inside with_portal_run", 1, 20_000),
    Op("await_", "3 await_(checkpoint()) inside a portal", 1, 20_000),
    Op("sync_portal", "4 with_portal_run_sync(noop)", 1, 20_000),
    Op("async_portal", "5 with_portal_run(async_noop)", 1, 20_000),
    Op("sync_portal_await", "6 with_portal_run_sync(f), f does one await_", 1, 10_000),
    Op("task_plain", "7a task doing one checkpoint", 1, 4_000),
    Op("task_portal", "7b task doing ensure_portal()", 1, 4_000),
    Op("await_ten", "8 await_ of a coroutine yielding 10 times, per yield", 10, 2_000),
    Op("awaitlet", "9 awaitlet(checkpoint()) inside a portal", 1, 20_000, ours_only=True),
    Op("lazy_load", "10a SQLAlchemy lazy load, sync code under a portal", 1, 1_000,
       ours_only=True, libraries=("asyncio", "uvloop")),
    Op("run_sync_load", "10b the same load in AsyncSession.run_sync()", 1, 1_000,
       ours_only=True, libraries=("asyncio", "uvloop")),
]


def make_ops(library: str) -> dict[str, Callable[[int], Awaitable[float]]]:
    import greenback

    if library == "trio":
        import trio

        checkpoint: Callable[[], Awaitable[None]] = trio.lowlevel.checkpoint

        async def spawn(fn: Callable[[], Awaitable[None]], n: int) -> None:
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(fn)

    else:

        async def checkpoint() -> None:
            await asyncio.sleep(0)

        async def spawn(fn: Callable[[], Awaitable[None]], n: int) -> None:
            await asyncio.gather(*[asyncio.create_task(fn()) for _ in range(n)])  # type: ignore[arg-type]

    async def bare(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await checkpoint()
        return time.perf_counter() - start

    async def in_portal(n: int) -> float:
        return await greenback.with_portal_run(bare, n)

    async def await_loop(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            greenback.await_(checkpoint())
        return time.perf_counter() - start

    async def await_in_portal(n: int) -> float:
        return await greenback.with_portal_run(await_loop, n)

    def noop() -> None:
        pass

    async def async_noop() -> None:
        pass

    def one_await() -> None:
        greenback.await_(checkpoint())

    async def sync_portal(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await greenback.with_portal_run_sync(noop)
        return time.perf_counter() - start

    async def async_portal(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await greenback.with_portal_run(async_noop)
        return time.perf_counter() - start

    async def sync_portal_await(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await greenback.with_portal_run_sync(one_await)
        return time.perf_counter() - start

    async def plain_task() -> None:
        await checkpoint()

    async def portal_task() -> None:
        await greenback.ensure_portal()

    async def task_plain(n: int) -> float:
        start = time.perf_counter()
        await spawn(plain_task, n)
        return time.perf_counter() - start

    async def task_portal(n: int) -> float:
        start = time.perf_counter()
        await spawn(portal_task, n)
        return time.perf_counter() - start

    async def ten_checkpoints() -> None:
        for _ in range(10):
            await checkpoint()

    async def await_ten_loop(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            greenback.await_(ten_checkpoints())
        return time.perf_counter() - start

    async def await_ten(n: int) -> float:
        return await greenback.with_portal_run(await_ten_loop, n)

    ops: dict[str, Callable[[int], Awaitable[float]]] = {
        "bare": bare,
        "in_portal": in_portal,
        "await_": await_in_portal,
        "sync_portal": sync_portal,
        "async_portal": async_portal,
        "sync_portal_await": sync_portal_await,
        "task_plain": task_plain,
        "task_portal": task_portal,
        "await_ten": await_ten,
    }
    if hasattr(greenback, "__implementation__"):  # this package, not upstream
        ops.update(ours_only_ops(library, checkpoint))
    return ops


def ours_only_ops(
    library: str, checkpoint: Callable[[], Awaitable[None]]
) -> dict[str, Callable[[int], Awaitable[float]]]:
    """Rows for what only this package does: the greenlet provider protocol
    of awaitlet and of SQLAlchemy's async ORM."""
    import greenback
    from awaitlet import awaitlet

    def awaitlet_loop(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            awaitlet(checkpoint())
        return time.perf_counter() - start

    async def awaitlet_in_portal(n: int) -> float:
        return await greenback.with_portal_run_sync(awaitlet_loop, n)

    ops: dict[str, Callable[[int], Awaitable[float]]] = {"awaitlet": awaitlet_in_portal}
    if library == "trio":
        return ops  # SQLAlchemy's drivers are asyncio-only
    from sqlalchemy import ForeignKey, Integer
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
    from sqlalchemy.orm import DeclarativeBase, Session, mapped_column, relationship

    # Unannotated columns: this module's annotations are strings, which
    # SQLAlchemy can't resolve for classes defined inside a function.
    class Base(DeclarativeBase):
        pass

    class Parent(Base):
        __tablename__ = "parent"
        id = mapped_column(Integer, primary_key=True)
        children = relationship("Child")

    class Child(Base):
        __tablename__ = "child"
        id = mapped_column(Integer, primary_key=True)
        parent_id = mapped_column(ForeignKey("parent.id"))

    def load(session: Session | AsyncSession, parent: Parent) -> int:
        session.expire(parent, ["children"])
        return len(parent.children)  # the lazy load

    async def with_parent(n: int, body: Callable[[AsyncSession, Parent, int], Awaitable[float]]) -> float:
        engine = create_async_engine("sqlite+aiosqlite:///:memory:")
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
            async with async_sessionmaker(engine, expire_on_commit=False)() as session:
                parent = Parent(id=1, children=[Child(id=1), Child(id=2)])
                session.add(parent)
                await session.commit()
                return await body(session, parent, n)
        finally:
            await engine.dispose()

    def lazy_loads(session: AsyncSession, parent: Parent, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            load(session, parent)
        return time.perf_counter() - start

    async def lazy_load(n: int) -> float:
        async def body(session: AsyncSession, parent: Parent, n: int) -> float:
            return await greenback.with_portal_run_sync(lazy_loads, session, parent, n)

        return await with_parent(n, body)

    async def run_sync_load(n: int) -> float:
        async def body(session: AsyncSession, parent: Parent, n: int) -> float:
            start = time.perf_counter()
            for _ in range(n):
                await session.run_sync(load, parent)
            return time.perf_counter() - start

        return await with_parent(n, body)

    ops.update(lazy_load=lazy_load, run_sync_load=run_sync_load)
    return ops


def run_worker(library: str, rounds: int, scale: float = 1.0) -> dict[str, list[float]]:
    """Every operation, round-robin, `rounds` times after one warm-up round,
    each `iterations * scale` times. Returns microseconds per timed unit, per
    round."""
    results: dict[str, list[float]] = {}

    async def main() -> None:
        ops = make_ops(library)
        for op in OPS:
            if op.key in ops and (op.libraries is None or library in op.libraries):
                results[op.key] = []
        for round_no in range(rounds + 1):
            for op in OPS:
                if op.key not in results:
                    continue
                iterations = max(1, int(op.iterations * scale))
                # Start every operation from the same collector state, so
                # that a collection the previous one provoked isn't billed here.
                gc.collect()
                elapsed = await ops[op.key](iterations)
                if round_no:  # round 0 warms up
                    results[op.key].append(elapsed / (iterations * op.per) * 1e6)

    run_on(library, main)
    return results


def run_on(library: str, main: Callable[[], Awaitable[None]]) -> None:
    """Run `main()` on asyncio, uvloop or Trio."""
    if library == "trio":
        import trio

        trio.run(main)
    elif library == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
    else:
        asyncio.run(main())  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Orchestration and reporting
# --------------------------------------------------------------------------

# Target for each row: what it is compared with, and the limit on each loop
# that has one. uvloop's bare checkpoint is about half of asyncio's, so the
# same per-step cost is a larger ratio there; it has one target, for a step.
TARGETS: dict[str, tuple[str, dict[str, float]]] = {
    "in_portal": ("bare", {"asyncio": 1.25, "trio": 1.2, "uvloop": 1.45}),
    "await_": ("bare", {"asyncio": 1.3, "trio": 1.22}),
    "sync_portal": ("upstream", {"asyncio": 0.15, "trio": 0.15}),
    "async_portal": ("upstream", {"asyncio": 0.15, "trio": 0.15}),
    "sync_portal_await": ("upstream", {"asyncio": 0.35, "trio": 0.35}),
    "task_portal": ("task_plain", {"asyncio": 1.3, "trio": 1.3}),
    "await_ten": ("in_portal", {"asyncio": 1.1, "trio": 1.1}),
    "awaitlet": ("await_", {"asyncio": 1.15, "trio": 1.15}),
}


def spawn_worker(python: str, library: str, rounds: int) -> dict[str, list[float]]:
    proc = subprocess.run(
        [python, __file__, "worker", "--library", library, "--rounds", str(rounds)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent,
    )
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def ratio_samples(samples: dict[str, list[float]], op: str, base: str) -> list[float]:
    """op/base within each round of each process: same-process ratios."""
    return [a / b for a, b in zip(samples[op], samples[base])]


def collect(
    ours: str, upstream: str, libraries: list[str], processes: int, rounds: int
) -> dict[str, dict[str, dict[str, list[float]]]]:
    data: dict[str, dict[str, dict[str, list[float]]]] = {}
    for library in libraries:
        per_impl: dict[str, dict[str, list[float]]] = {
            "ours": {op.key: [] for op in OPS},
            "upstream": {op.key: [] for op in OPS},
            "ours_ratio": {},
            "upstream_ratio": {},
        }
        for i in range(processes):
            for impl, python in (("ours", ours), ("upstream", upstream)):
                print(f"  {library}: {impl} process {i + 1}/{processes}", file=sys.stderr)
                samples = spawn_worker(python, library, rounds)
                for key, values in samples.items():
                    per_impl[impl][key].extend(values)
                for op, (base, _) in TARGETS.items():
                    if base != "upstream" and op in samples and base in samples:
                        per_impl[f"{impl}_ratio"].setdefault(op, []).extend(
                            ratio_samples(samples, op, base)
                        )
        data[library] = per_impl
    return data


def summarize(data: dict[str, dict[str, dict[str, list[float]]]]) -> list[dict[str, Any]]:
    rows = []
    for library, per_impl in data.items():
        for op in OPS:
            if not per_impl["ours"].get(op.key):
                continue  # not run on this loop
            ours = statistics.median(per_impl["ours"][op.key])
            upstream_samples = per_impl["upstream"].get(op.key)
            upstream = statistics.median(upstream_samples) if upstream_samples else None
            row: dict[str, Any] = {
                "library": library,
                "op": op.title,
                "key": op.key,
                "ours_us": ours,
                "upstream_us": upstream,
                "ours_vs_upstream": None if upstream is None else ours / upstream,
                "ours_vs_bare": ours / statistics.median(per_impl["ours"]["bare"]),
                "upstream_vs_bare": None if upstream is None else (
                    upstream / statistics.median(per_impl["upstream"]["bare"])),
            }
            if op.key in TARGETS and library in TARGETS[op.key][1]:
                base, limits = TARGETS[op.key]
                limit = limits[library]
                if base == "upstream":
                    assert upstream is not None
                    measured = ours / upstream
                    against = "upstream"
                else:
                    measured = statistics.median(per_impl["ours_ratio"][op.key])
                    against = base
                row.update(target=f"<= {limit}x {against}", measured=measured, met=measured <= limit)
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| loop | operation | ours µs | upstream µs | ours/upstream | ours/bare | upstream/bare | target | measured | met |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|:---:|",
    ]
    for row in rows:
        upstream = "n/a" if row["upstream_us"] is None else f"{row['upstream_us']:.3f}"
        lines.append(
            f"| {row['library']} | {row['op']} | {row['ours_us']:.3f} | {upstream} "
            f"| {ratio(row['ours_vs_upstream'])} | {ratio(row['ours_vs_bare'])} "
            f"| {ratio(row['upstream_vs_bare'])} {target_cells(row)}"
        )
    return "\n".join(lines)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()} ({platform.python_implementation()})"


def draw_chart(rows: list[dict[str, Any]], app_rows: list[dict[str, Any]], path: Path) -> None:
    """The operations (ours against upstream) above, the application below
    (throughput against the same service without greenback); either part
    may be missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = int(bool(rows)) + int(bool(app_rows))
    if not panels:
        return
    fig, axes = plt.subplots(panels, 1, figsize=(11, 5.5 * panels), squeeze=False)
    if rows:
        draw_ops_panel(axes[0][0], rows)
    if app_rows:
        draw_app_panel(axes[-1][0], app_rows)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def draw_ops_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    libraries = sorted({row["library"] for row in rows}, key=["asyncio", "trio", "uvloop"].index)
    compared = [op for op in OPS if op.key != "bare" and not op.ours_only]
    titles = [op.title for op in compared]
    width = 0.8 / len(libraries)
    for i, library in enumerate(libraries):
        by_key = {row["key"]: row for row in rows if row["library"] == library}
        values = [by_key[op.key]["ours_vs_upstream"] for op in compared]
        positions = [x + i * width for x in range(len(titles))]
        ax.bar(positions, values, width, label=library)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("ours / upstream time (log; lower is faster)")
    ax.set_xticks([x + width * (len(libraries) - 1) / 2 for x in range(len(titles))])
    ax.set_xticklabels([t.split(" ", 1)[1] for t in titles], rotation=30, ha="right", fontsize=8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("greenback vs. upstream greenback 1.3.0, per operation (median)")


APP_MODE_LABELS = {
    "tree": "with_portal_run_tree",
    "ensure": "ensure_portal()\nper connection",
    "instrument": "AutoPortalInstrument",
}


def draw_app_panel(ax: Any, app_rows: list[dict[str, Any]]) -> None:
    shown = [row for row in app_rows if row["vs_plain"] is not None]
    colours = {"ours": "tab:blue", "upstream": "tab:orange"}
    positions = range(len(shown))
    bars = ax.bar(positions, [row["vs_plain"] for row in shown],
                  color=[colours[row["impl"]] for row in shown])
    for bar, row in zip(bars, shown):
        ax.annotate(f"{row['vs_plain']:.2f}x\n{row['rps']:,.0f} req/s",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height() - 0.03),
                    ha="center", va="top", fontsize=8, color="white")
    for target in sorted({row["target"] for row in shown if "target" in row}):
        limit = float(target.split()[1].rstrip("x"))
        ax.axhline(limit, color="tab:red", linestyle="--", linewidth=0.8, label=f"target {target}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    for impl, colour in colours.items():
        ax.bar([0], [0], color=colour, label=f"{impl} greenback")
    ax.set_ylim(0, max([1.2] + [row["vs_plain"] * 1.15 for row in shown]))
    ax.set_ylabel("req/s against the same loop without greenback")
    ax.set_xticks(list(positions))
    ax.set_xticklabels([f"{row['loop']}\n{APP_MODE_LABELS.get(row['mode'], row['mode'])}"
                        for row in shown], fontsize=8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Application: TCP service, one await_ per request "
                 "(median throughput ratio; higher is better)")


START, END = "<!-- results:start -->", "<!-- results:end -->"
DOC = Path(__file__).parent.parent / "docs" / "performance.md"


def measured_line() -> str:
    return f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {machine_description()}."


def load_report(doc: Path) -> dict[str, Any]:
    """The last run's JSON (empty when there is none). Its date line for the
    operations, if the JSON predates storing it, is taken from the doc."""
    path = doc.with_suffix(".json")
    if not path.exists():
        return {}
    report: dict[str, Any] = json.loads(path.read_text())
    if "rows" in report and "measured" not in report and doc.exists() and START in doc.read_text():
        block = doc.read_text().split(START, 1)[1]
        report["measured"] = block.strip().splitlines()[0]
    return report


def write_report(report: dict[str, Any], doc: Path) -> None:
    """The JSON, the chart, and the results block of `doc`, from `report`:
    the operations ("rows", "processes", "rounds", "measured") and the
    application ("app"), each optional."""
    doc.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    chart = doc.with_suffix(".png")
    rows: list[dict[str, Any]] = report.get("rows", [])
    app: dict[str, Any] = report.get("app", {})
    draw_chart(rows, app.get("rows", []), chart)
    lines = [START]
    if rows:
        lines += [
            report.get("measured", ""),
            f"{report['processes']} processes per implementation and loop, alternating, "
            f"{report['rounds']} rounds each after a warm-up; medians.",
            "",
            format_table(rows),
            "",
        ]
    if app:
        lines += [
            f"**The application** (see [A whole application](#a-whole-application)). "
            f"{app['measured']} {app['rounds']} rounds; in each, one run per configuration, "
            f"the runs of one loop one after another, in an order rotated each round. A run "
            f"is {app['clients']} connections with {app['messages']:,} requests each, timed, "
            f"after {app['warmup']} each to warm up. req/s and server CPU time per request "
            f"are medians of the runs; the ratios (against the same loop without greenback, "
            f"and against upstream) are taken within each round, then the median is used.",
            "",
            app_bench.format_app_table(app["rows"]),
            "",
        ]
    lines += [f"![our/upstream time per operation; application throughput]({chart.name})", END]
    text = doc.read_text() if doc.exists() else f"# Performance\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    doc.write_text(head + "\n".join(lines) + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker")
    worker.add_argument("--library", required=True)
    worker.add_argument("--rounds", type=int, default=5)
    worker.add_argument("--scale", type=float, default=1.0, help="fraction of the iterations")
    run = sub.add_parser("run")
    run.add_argument("--ours", required=True, help="python of the venv with this package")
    run.add_argument("--upstream", required=True, help="python of the venv with greenback 1.3.0")
    run.add_argument("--only", choices=["all", "ops", "app"], default="all",
                     help="run only the operations or only the application benchmark")
    run.add_argument("--libraries", default="asyncio,trio,uvloop")
    run.add_argument("--processes", type=int, default=5)
    run.add_argument("--rounds", type=int, default=5)
    run.add_argument("--app-rounds", type=int, default=4)
    run.add_argument("--app-clients", type=int, default=app_bench.Scale.clients)
    run.add_argument("--app-messages", type=int, default=app_bench.Scale.messages,
                     help="timed requests per connection")
    run.add_argument("--app-warmup", type=int, default=app_bench.Scale.warmup,
                     help="untimed requests per connection before them")
    run.add_argument("--app-timeout", type=float, default=app_bench.Scale.timeout,
                     help="seconds one run may take before it fails")
    run.add_argument("--app-configs", default=None,
                     help="comma-separated configurations (default: all of "
                     + ", ".join(config.key for config in app_bench.APP_CONFIGS) + ")")
    run.add_argument("--doc", type=Path, default=DOC)
    report = sub.add_parser("report", help="re-render the report from the last run's JSON")
    report.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args()

    if args.command == "report":
        write_report(load_report(args.doc), args.doc)
        return

    if args.command == "worker":
        json.dump(run_worker(args.library, args.rounds, args.scale), sys.stdout)
        return
    saved = load_report(args.doc)
    missed = []
    if args.only in ("all", "ops"):
        data = collect(args.ours, args.upstream, args.libraries.split(","), args.processes, args.rounds)
        rows = summarize(data)
        print(format_table(rows))
        saved.update(rows=rows, processes=args.processes, rounds=args.rounds, measured=measured_line())
        missed += [f"{row['library']} {row['op']}: {row['measured']:.2f}x, {row['target']}"
                   for row in rows if row.get("met") is False]
    if args.only in ("all", "app"):
        scale = app_bench.Scale(args.app_clients, args.app_messages, args.app_warmup, args.app_timeout)
        configs = app_bench.available_configs(
            None if args.app_configs is None else args.app_configs.split(","))
        samples = app_bench.collect_app(
            {"ours": args.ours, "upstream": args.upstream}, args.ours, args.app_rounds, scale, configs)
        app_rows = app_bench.summarize_app(samples)
        print(app_bench.format_app_table(app_rows))
        saved["app"] = {
            "measured": measured_line(), "rounds": args.app_rounds, "clients": scale.clients,
            "messages": scale.messages, "warmup": scale.warmup, "rows": app_rows,
            "samples": samples,
        }
        missed += [f"{row['loop']} {row['title']}: {row['measured']:.2f}x, {row['target']}"
                   for row in app_rows if row.get("met") is False]
    write_report(saved, args.doc)
    for line in missed:
        print(f"target missed: {line}")


if __name__ == "__main__":
    main()
