"""Application benchmark: a small TCP service whose requests pass through a
synchronous layer that calls `greenback.await_` once each.

The service listens on 127.0.0.1 (an ephemeral port). A request is one line,
`GET <key> <seq>`; the reply is one line, `OK <key> <value> <seq>`. The
server's per-connection loop reads a line and hands it to the request
layer: parse, validate, look the key up in an asynchronous cache, render
the reply. In the configurations with greenback that layer is plain `def`
functions, and the lookup is `greenback.await_(cache.get(key))`, the way a
half-migrated code base calls async code from old synchronous code. Without
greenback it is the same functions with `await cache.get(key)` instead. An
entry serves `CACHE_USES` lookups and is then fetched again, and a fetch
yields to the event loop once, so one request in `CACHE_USES` really
suspends inside `await_`.

Three kinds of process:

* `app_bench.py server --loop L --mode M` is the service, run by the Python
  of the venv under test (this package's, or upstream greenback's). It
  prints `{"port": N}` once it listens, serves until a client sends `!QUIT`
  (or its deadline passes), then prints a JSON summary and exits. `!MARK`
  records the process's CPU times, so that the summary gives the server's
  CPU time for the timed part alone.
* `app_bench.py client --port N ...` is the load generator, the same program
  for every configuration (on uvloop when it is installed, so that it is not
  the bottleneck): it opens the connections, runs a warm-up, then the timed
  part, in which every connection sends its requests one at a time, each
  after the reply to the one before.
* bench.py (`bench.py run`) calls `collect_app` here, which starts a server
  and a client per configuration and round, the configurations in a
  different order each round, and reports medians.

Every wait is bounded: a server, a client or a run that takes longer than
its limit fails with what the process printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, Awaitable, Callable

import greenback
from tables import ratio, target_cells

HERE = Path(__file__).resolve().parent

CACHE_USES = 8  # lookups an entry serves before it is fetched again
KEYS = 1000  # distinct keys the clients ask for
CONTROL = ord("!")  # first byte of the control lines !MARK and !QUIT


# --------------------------------------------------------------------------
# The configurations
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class AppConfig:
    key: str
    title: str
    loop: str  # asyncio, uvloop or trio
    mode: str  # plain, tree, ensure or instrument
    impl: str  # whose venv runs the server: "ours" or "upstream"
    baseline: str | None = None  # the configuration without greenback
    upstream_twin: str | None = None  # upstream's run to compare with
    target: float | None = None  # at least this fraction of the baseline's req/s


APP_CONFIGS = [
    AppConfig("asyncio-plain", "(a) plain awaits, no greenback", "asyncio", "plain", "ours"),
    AppConfig("asyncio-tree", "(b) sync layer, with_portal_run_tree over the server",
              "asyncio", "tree", "ours", "asyncio-plain", "asyncio-ensure-upstream", 0.93),
    AppConfig("asyncio-ensure", "(b') sync layer, ensure_portal() per connection",
              "asyncio", "ensure", "ours", "asyncio-plain", "asyncio-ensure-upstream"),
    AppConfig("asyncio-ensure-upstream", "(c) sync layer, ensure_portal() per connection",
              "asyncio", "ensure", "upstream", "asyncio-plain"),
    AppConfig("uvloop-plain", "(a) plain awaits, no greenback", "uvloop", "plain", "ours"),
    AppConfig("uvloop-tree", "(d) sync layer, with_portal_run_tree over the server",
              "uvloop", "tree", "ours", "uvloop-plain"),
    AppConfig("trio-plain", "(e) plain awaits, no greenback", "trio", "plain", "ours"),
    AppConfig("trio-instrument", "(e) sync layer, AutoPortalInstrument",
              "trio", "instrument", "ours", "trio-plain", "trio-instrument-upstream", 0.93),
    AppConfig("trio-instrument-upstream", "(e) sync layer, AutoPortalInstrument",
              "trio", "instrument", "upstream", "trio-plain"),
]
APP_CONFIG_BY_KEY = {config.key: config for config in APP_CONFIGS}


@dataclass(frozen=True)
class Scale:
    clients: int = 50
    messages: int = 2_000  # timed requests per connection
    warmup: int = 100  # untimed requests per connection first
    timeout: float = 120.0  # seconds for one client's whole run

    @property
    def requests(self) -> int:
        return self.clients * self.messages


# --------------------------------------------------------------------------
# The request layer
# --------------------------------------------------------------------------


class BadRequest(Exception):
    pass


@dataclass(slots=True)
class Request:
    key: str
    seq: int


def parse(line: bytes) -> Request:
    parts = line.split()
    if len(parts) != 3 or parts[0] != b"GET":
        raise BadRequest(line)
    return Request(parts[1].decode("ascii"), int(parts[2]))


def validate(request: Request) -> Request:
    if not request.key.startswith("user:") or request.seq < 0:
        raise BadRequest(request)
    return request


def render(request: Request, value: int) -> bytes:
    return b"OK %s %d %d\n" % (request.key.encode("ascii"), value, request.seq)


class AsyncCache:
    """A cache in front of a slow "backend": an entry serves CACHE_USES
    lookups, then the next lookup fetches it again, which yields once."""

    def __init__(self, checkpoint: Callable[[], Awaitable[None]]) -> None:
        self.checkpoint = checkpoint
        self.entries: dict[str, list[int]] = {}  # key -> [value, uses left]
        self.misses = 0

    async def get(self, key: str) -> int:
        entry = self.entries.get(key)
        if entry is not None and entry[1] > 0:
            entry[1] -= 1
            return entry[0]
        value = await self.fetch(key)
        self.entries[key] = [value, CACHE_USES - 1]
        return value

    async def fetch(self, key: str) -> int:
        self.misses += 1
        await self.checkpoint()  # the round trip to the backend
        return zlib.crc32(key.encode("ascii"))


# The synchronous layer, as old code has it: plain functions, and one
# greenback.await_ where it needs the async cache.


def lookup(cache: AsyncCache, key: str) -> int:
    return greenback.await_(cache.get(key))


def handle_sync(line: bytes, cache: AsyncCache) -> bytes:
    request = validate(parse(line))
    return render(request, lookup(cache, request.key))


# The same layer written async: what configuration (a) runs.


async def lookup_async(cache: AsyncCache, key: str) -> int:
    return await cache.get(key)


async def handle_async(line: bytes, cache: AsyncCache) -> bytes:
    request = validate(parse(line))
    return render(request, await lookup_async(cache, request.key))


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


@dataclass
class Stats:
    requests: int = 0
    marks: list[tuple[float, float, int]] = field(default_factory=list)  # user s, system s, requests
    errors: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def control(self, line: bytes, stop: Callable[[], None]) -> bytes:
        if line == b"!MARK\n":
            import resource  # POSIX, as is the whole service (the server runs there only)

            usage = resource.getrusage(resource.RUSAGE_SELF)
            self.marks.append((usage.ru_utime, usage.ru_stime, self.requests))
        elif line == b"!QUIT\n":
            stop()
        else:
            raise BadRequest(line)
        return b"!OK\n"

    def summary(self, cache: AsyncCache) -> dict[str, Any]:
        result: dict[str, Any] = {
            "requests": self.requests, "misses": cache.misses, "errors": self.errors,
        }
        if len(self.marks) == 2:
            (user0, sys0, n0), (user1, sys1, n1) = self.marks
            result.update(timed_requests=n1 - n0, timed_user_seconds=user1 - user0,
                          timed_system_seconds=sys1 - sys0)
        return result


def announce(port: int) -> None:
    print(json.dumps({"port": port}), flush=True)


async def serve_asyncio(mode: str, stats: Stats, cache: AsyncCache, deadline: float) -> None:
    stop = asyncio.Event()
    sync = mode != "plain"
    ensure = mode == "ensure"
    tasks: set[asyncio.Task[Any]] = set()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            if ensure:
                await greenback.ensure_portal()
            while True:
                line = await reader.readline()
                if not line:
                    break
                if line[0] == CONTROL:
                    writer.write(stats.control(line, stop.set))
                    await writer.drain()
                    continue
                if sync:
                    response = handle_sync(line, cache)
                else:
                    response = await handle_async(line, cache)
                stats.requests += 1
                writer.write(response)
                await writer.drain()
        except Exception as exc:  # reported in the summary; fails the run
            stats.errors.append(repr(exc))
            stop.set()
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    try:
        announce(server.sockets[0].getsockname()[1])
        await asyncio.wait_for(stop.wait(), deadline)
    except asyncio.TimeoutError:
        stats.errors.append(f"no !QUIT within {deadline} s")
    finally:
        server.close()
        # The client closes its connections once !QUIT is answered.
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=10)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


def run_asyncio_server(loop: str, mode: str, stats: Stats, deadline: float) -> AsyncCache:
    async def checkpoint() -> None:
        await asyncio.sleep(0)

    cache = AsyncCache(checkpoint)

    async def main() -> None:
        if mode == "tree":
            await greenback.with_portal_run_tree(serve_asyncio, mode, stats, cache, deadline)
        else:
            await serve_asyncio(mode, stats, cache, deadline)

    event_loop: asyncio.AbstractEventLoop
    if loop == "uvloop":
        import uvloop

        event_loop = uvloop.new_event_loop()
    else:
        event_loop = asyncio.new_event_loop()
    try:
        event_loop.run_until_complete(main())
    finally:
        event_loop.close()
    return cache


def run_trio_server(mode: str, stats: Stats, deadline: float) -> AsyncCache:
    import trio

    cache = AsyncCache(trio.lowlevel.checkpoint)
    sync = mode != "plain"

    async def main() -> None:
        stop = trio.Event()

        async def connection(stream: trio.SocketStream) -> None:
            buffer = bytearray()
            try:
                while True:
                    end = buffer.find(b"\n")
                    if end < 0:
                        data = await stream.receive_some(4096)
                        if not data:
                            break
                        buffer += data
                        continue
                    line = bytes(buffer[: end + 1])
                    del buffer[: end + 1]
                    if line[0] == CONTROL:
                        await stream.send_all(stats.control(line, stop.set))
                        continue
                    if sync:
                        response = handle_sync(line, cache)
                    else:
                        response = await handle_async(line, cache)
                    stats.requests += 1
                    await stream.send_all(response)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away without !QUIT; it reports that
            except Exception as exc:  # reported in the summary; fails the run
                stats.errors.append(repr(exc))
                stop.set()
            finally:
                await stream.aclose()

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, connection, 0, host="127.0.0.1"))
            announce(listeners[0].socket.getsockname()[1])
            with trio.move_on_after(deadline) as scope:
                await stop.wait()
            if scope.cancelled_caught:
                stats.errors.append(f"no !QUIT within {deadline} s")
            nursery.cancel_scope.cancel()

    instruments = [greenback.AutoPortalInstrument()] if mode == "instrument" else []
    trio.run(main, instruments=instruments)
    return cache


def server_main(loop: str, mode: str, deadline: float) -> int:
    stats = Stats()
    if loop == "trio":
        cache = run_trio_server(mode, stats, deadline)
    else:
        cache = run_asyncio_server(loop, mode, stats, deadline)
    print(json.dumps(stats.summary(cache)), flush=True)
    return 1 if stats.errors else 0


# --------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------


class ClientError(Exception):
    pass


async def converse(
    conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: int, count: int
) -> None:
    """`count` requests, each sent once the previous reply has arrived."""
    for seq in range(first, first + count):
        key = b"user:%d" % ((conn * 7919 + seq) % KEYS)
        writer.write(b"GET %s %d\n" % (key, seq))
        reply = await reader.readline()
        if not (reply.startswith(b"OK " + key + b" ") and reply.endswith(b" %d\n" % seq)):
            raise ClientError(f"connection {conn}, request {seq}: reply {reply!r}")


async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, command: bytes) -> None:
    writer.write(b"!" + command + b"\n")
    reply = await reader.readline()
    if reply != b"!OK\n":
        raise ClientError(f"!{command.decode()}: reply {reply!r}")


async def client(port: int, scale: Scale) -> dict[str, Any]:
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(scale.clients)]
    control_reader, control_writer = await asyncio.open_connection("127.0.0.1", port)

    async def phase(first: int, count: int) -> None:
        await asyncio.gather(*(
            converse(conn, reader, writer, first, count)
            for conn, (reader, writer) in enumerate(connections)
        ))

    await phase(0, scale.warmup)
    await control(control_reader, control_writer, b"MARK")
    start, cpu_start = time.perf_counter(), time.process_time()
    await phase(scale.warmup, scale.messages)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    await control(control_reader, control_writer, b"MARK")
    await control(control_reader, control_writer, b"QUIT")
    for _, writer in connections + [(control_reader, control_writer)]:
        writer.close()
    return {"seconds": elapsed, "cpu_seconds": cpu, "requests": scale.requests}


def client_main(port: int, scale: Scale) -> int:
    event_loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        event_loop = uvloop.new_event_loop()
    except ImportError:
        event_loop = asyncio.new_event_loop()
    try:
        result = event_loop.run_until_complete(asyncio.wait_for(client(port, scale), scale.timeout))
    except asyncio.TimeoutError:
        print(f"client: not finished within {scale.timeout} s", file=sys.stderr)
        return 1
    except (ClientError, OSError, asyncio.IncompleteReadError) as exc:
        print(f"client: {exc!r}", file=sys.stderr)
        return 1
    finally:
        event_loop.close()
    print(json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------
# Orchestration: one run, then rounds of every configuration
# --------------------------------------------------------------------------


class AppRunError(RuntimeError):
    pass


def _read_line(stream: IO[str], timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


def run_once(config: AppConfig, pythons: dict[str, str], client_python: str, scale: Scale) -> dict[str, float]:
    """One server of `config` and one client against it. Returns the
    client's requests per second; the server's CPU time per request (user
    and system, then system alone) and its busy fraction over the timed
    part; and the client's busy fraction."""
    deadline = scale.timeout + 30
    # The server's stderr goes to a file: a pipe that nobody reads while the
    # client runs could fill up and stall it.
    with tempfile.TemporaryFile("w+") as server_err:
        server = subprocess.Popen(
            [pythons[config.impl], str(HERE / "app_bench.py"), "server",
             "--loop", config.loop, "--mode", config.mode, "--deadline", str(deadline)],
            stdout=subprocess.PIPE, stderr=server_err, text=True, cwd=HERE,
        )
        client: subprocess.CompletedProcess[str] | None = None
        out = ""
        try:
            assert server.stdout is not None
            first = _read_line(server.stdout, 60)
            if not first:
                raise AppRunError(f"{config.key}: the server did not start listening")
            port = json.loads(first)["port"]
            try:
                client = subprocess.run(
                    [client_python, str(HERE / "app_bench.py"), "client", "--port", str(port),
                     "--clients", str(scale.clients), "--messages", str(scale.messages),
                     "--warmup", str(scale.warmup), "--timeout", str(scale.timeout)],
                    capture_output=True, text=True, cwd=HERE, timeout=scale.timeout + 30,
                )
            except subprocess.TimeoutExpired as exc:
                raise AppRunError(f"{config.key}: the client did not exit in time") from exc
            if client.returncode != 0:
                raise AppRunError(f"{config.key}: the client failed:\n{client.stderr}")
            try:
                out, _ = server.communicate(timeout=30)
            except subprocess.TimeoutExpired as exc:
                raise AppRunError(f"{config.key}: the server did not exit after !QUIT") from exc
            if server.returncode != 0:
                raise AppRunError(f"{config.key}: the server failed ({server.returncode})")
        except AppRunError as exc:
            if server.poll() is None:
                try:  # a server that saw the error itself exits promptly
                    server.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    server.kill()
            rest, _ = server.communicate()
            server_err.seek(0)
            raise AppRunError(f"{exc}\nserver output:\n{out}{rest}\n{server_err.read()}") from exc
        finally:
            if server.poll() is None:
                server.kill()
                server.communicate()
    summary = json.loads(out)
    measured = json.loads(client.stdout)
    expected = scale.clients * (scale.warmup + scale.messages)
    if summary["requests"] != expected or summary.get("timed_requests") != scale.requests:
        raise AppRunError(f"{config.key}: the server answered {summary}, expected {expected}")
    if summary["misses"] == 0:
        raise AppRunError(f"{config.key}: the cache never missed, so nothing yielded")
    seconds = measured["seconds"]
    cpu = summary["timed_user_seconds"] + summary["timed_system_seconds"]
    return {
        "rps": scale.requests / seconds,
        "cpu_us": cpu / scale.requests * 1e6,
        "system_us": summary["timed_system_seconds"] / scale.requests * 1e6,
        "busy": cpu / seconds,
        "client_busy": measured["cpu_seconds"] / seconds,
    }


def available_configs(keys: list[str] | None = None) -> list[AppConfig]:
    """The configurations asked for (all by default), less the uvloop ones
    where uvloop is not installed."""
    configs = APP_CONFIGS if keys is None else [APP_CONFIG_BY_KEY[key] for key in keys]
    try:
        import uvloop  # noqa: F401
    except ImportError:
        configs = [config for config in configs if config.loop != "uvloop"]
    return configs


def round_order(configs: list[AppConfig], round_no: int) -> list[AppConfig]:
    """The order of one round: the configurations of each loop together, so
    that a run and the run it is compared with are never far apart in time,
    with both the loops and the configurations within a loop rotated by one
    place each round."""
    loops = list(dict.fromkeys(config.loop for config in configs))
    shift = round_no % len(loops)
    order: list[AppConfig] = []
    for loop in loops[shift:] + loops[:shift]:
        group = [config for config in configs if config.loop == loop]
        start = round_no % len(group)
        order += group[start:] + group[:start]
    return order


def collect_app(
    pythons: dict[str, str], client_python: str, rounds: int, scale: Scale,
    configs: list[AppConfig] | None = None,
) -> dict[str, list[dict[str, float]]]:
    """`rounds` runs of every configuration, in the order of round_order().
    Returns the runs per configuration, in round order (so that ratios can
    be taken within a round)."""
    chosen = available_configs() if configs is None else configs
    samples: dict[str, list[dict[str, float]]] = {config.key: [] for config in chosen}
    for round_no in range(rounds):
        for config in round_order(chosen, round_no):
            print(f"  app: round {round_no + 1}/{rounds}, {config.key}", file=sys.stderr)
            samples[config.key].append(run_once(config, pythons, client_python, scale))
    return samples


def _per_round(
    samples: dict[str, list[dict[str, float]]], key: str, base: str, measure: str = "rps"
) -> float:
    return statistics.median(a[measure] / b[measure] for a, b in zip(samples[key], samples[base]))


def summarize_app(samples: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    rows = []
    for config in APP_CONFIGS:
        runs = samples.get(config.key)
        if not runs:
            continue
        row: dict[str, Any] = {
            "key": config.key,
            "loop": config.loop,
            "mode": config.mode,
            "title": config.title,
            "impl": config.impl,
            "rps": statistics.median(run["rps"] for run in runs),
            "cpu_us": statistics.median(run["cpu_us"] for run in runs),
            "system_us": statistics.median(run["system_us"] for run in runs),
            "busy": statistics.median(run["busy"] for run in runs),
            "vs_plain": None,
            "cpu_vs_plain": None,
            "vs_upstream": None,
        }
        if config.baseline in samples:
            assert config.baseline is not None
            row["vs_plain"] = _per_round(samples, config.key, config.baseline)
            row["cpu_vs_plain"] = _per_round(samples, config.key, config.baseline, "cpu_us")
        if config.upstream_twin in samples:
            assert config.upstream_twin is not None
            row["vs_upstream"] = _per_round(samples, config.key, config.upstream_twin)
        if config.target is not None and row["vs_plain"] is not None:
            row.update(target=f">= {config.target}x plain", measured=row["vs_plain"],
                       met=row["vs_plain"] >= config.target)
        rows.append(row)
    return rows


def format_app_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| loop | configuration | server | req/s | req/s vs. plain | req/s vs. upstream "
        "| server CPU µs/req | CPU vs. plain | target | measured | met |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|:---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['loop']} | {row['title']} | {row['impl']} | {row['rps']:,.0f} "
            f"| {ratio(row['vs_plain'])} | {ratio(row['vs_upstream'])} | {row['cpu_us']:.1f} "
            f"| {ratio(row['cpu_vs_plain'])} {target_cells(row)}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("server")
    server.add_argument("--loop", choices=["asyncio", "uvloop", "trio"], required=True)
    server.add_argument("--mode", choices=["plain", "tree", "ensure", "instrument"], required=True)
    server.add_argument("--deadline", type=float, default=300.0)
    client = sub.add_parser("client")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--clients", type=int, default=Scale.clients)
    client.add_argument("--messages", type=int, default=Scale.messages)
    client.add_argument("--warmup", type=int, default=Scale.warmup)
    client.add_argument("--timeout", type=float, default=Scale.timeout)
    args = parser.parse_args()
    if args.command == "server":
        sys.exit(server_main(args.loop, args.mode, args.deadline))
    sys.exit(client_main(args.port, Scale(args.clients, args.messages, args.warmup, args.timeout)))


if __name__ == "__main__":
    main()
