"""Differential test: the compiled core and its pure-Python twin, driven
through the same randomly generated programs, must do exactly the same
things: same values, same exceptions, in the same order.

The programs mix native awaits, await_() from sync code, and one-shot
portals of both kinds (run_portal, run_sync_portal), nested at random, with
coroutines that return or raise after a random number of checkpoints.
"""

from __future__ import annotations

import random
from types import ModuleType
from typing import Any, Callable, Coroutine, Union

import pytest

import greenback._core
import greenback._purepy
from conftest import Lib

# A program is a tree of these.
Leaf = tuple[str, int, str]  # ("return" | "raise", checkpoints, text)
Node = Union[Leaf, tuple[str, list[Any]]]  # ("native" | "sync" | "run" | "run_sync", children)


def random_program(rng: random.Random, depth: int = 0) -> Node:
    if depth >= 3 or rng.random() < 0.3:
        return (rng.choice(["return", "raise"]), rng.randint(0, 3), f"v{rng.randint(0, 99)}")
    kind = rng.choice(["native", "sync", "run", "run_sync"])
    return (kind, [random_program(rng, depth + 1) for _ in range(rng.randint(1, 3))])


def interpret(
    impl: ModuleType, lib: Lib, program: Node
) -> Callable[[], Coroutine[Any, Any, list[str]]]:
    """An async function running `program` with `impl`, returning its trace."""
    trace: list[str] = []

    async def run_async(node: Node) -> str:
        kind = node[0]
        if kind in ("return", "raise"):
            _, checkpoints, text = node  # type: ignore[misc]
            for _ in range(checkpoints):
                await lib.checkpoint()
            if kind == "raise":
                raise ValueError(text)
            return str(text)
        children: list[Node] = node[1]  # type: ignore[assignment]
        if kind == "native":
            results = []
            for child in children:
                try:
                    results.append(await run_async(child))
                except ValueError as exc:
                    trace.append(f"native caught {exc}")
            return "+".join(results)
        if kind == "run":
            return str(await impl.run_portal(run_async, (("native", children),), {}))
        if kind == "run_sync":
            return str(await impl.run_sync_portal(run_sync, (children,), {}))
        # "sync" inside async code: call sync code directly (a portal is active)
        return run_sync(children)

    def run_sync(children: list[Node]) -> str:
        results = []
        for child in children:
            try:
                results.append(str(impl.await_(run_async(child))))
            except ValueError as exc:
                trace.append(f"sync caught {exc}")
        trace.append(f"sync returns {'+'.join(results)}")
        return "+".join(results)

    async def main() -> list[str]:
        try:
            result = await impl.run_portal(run_async, (program,), {})
            trace.append(f"result {result}")
        except ValueError as exc:
            trace.append(f"raised {exc}")
        trace.append(f"portal after: {impl.in_active_portal()}")
        return trace

    return main


@pytest.mark.parametrize("seed", range(40))
def test_compiled_and_pure_agree(lib: Lib, seed: int) -> None:
    program = random_program(random.Random(seed))
    traces: list[list[str]] = [
        lib.run(interpret(impl, lib, program))
        for impl in (greenback._core, greenback._purepy)
    ]
    assert traces[0] == traces[1]
    assert traces[0][-1] == "portal after: False"


def test_programs_are_not_trivial() -> None:
    # The generator must produce the interesting shapes it is meant to.
    kinds: set[str] = set()

    def collect(node: Node) -> None:
        kinds.add(node[0])
        if node[0] not in ("return", "raise"):
            for child in node[1]:  # type: ignore[union-attr]
                collect(child)

    for seed in range(40):
        collect(random_program(random.Random(seed)))
    assert kinds == {"return", "raise", "native", "sync", "run", "run_sync"}
