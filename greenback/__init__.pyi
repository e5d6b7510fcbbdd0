# Public, precise types for greenback. The function-taking APIs carry the
# wrapped function's parameters (ParamSpec), so a type checker catches
# `with_portal_run(fetch, "wrong")` just as it would catch `await fetch("wrong")`.

import asyncio
from typing import Any, Awaitable, Callable, ParamSpec, TypeVar

import trio

__version__: str

_T = TypeVar("_T")
_P = ParamSpec("_P")

_AnyTask = asyncio.Task[Any] | trio.lowlevel.Task

async def ensure_portal() -> None: ...
def bestow_portal(task: _AnyTask) -> None: ...
def has_portal(task: _AnyTask | None = None) -> bool: ...
async def with_portal_run(
    async_fn: Callable[_P, Awaitable[_T]], /, *args: _P.args, **kwds: _P.kwargs
) -> _T: ...
async def with_portal_run_sync(
    sync_fn: Callable[_P, _T], /, *args: _P.args, **kwds: _P.kwargs
) -> _T: ...
def await_(aw: Awaitable[_T]) -> _T: ...
