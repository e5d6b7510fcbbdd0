"""The ``greenback-api`` directive: one public name, documented from its
docstring, with the signatures that type checkers see.

autodoc would render the docstrings just as well, but it rebuilds
signatures from evaluated annotations, and that turns ``Callable[P, T]`` (a
ParamSpec) into ``Callable[[P], T]``, which is a different type. The
signatures here are the source text of the definitions instead, overloads
included. greenback/__init__.pyi re-exports those definitions, and stubtest
checks them against the compiled core, so page and type checker agree.

Every name in ``greenback.__all__`` must be documented exactly once, or the
build fails.
"""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

import greenback

# Definitions whose type, as a checker sees it, is not their source
# signature: decorated with @contextmanager or @asynccontextmanager.
_CONTEXT_MANAGER_RETURNS = {
    "contextmanager": "AbstractContextManager[{}]",
    "asynccontextmanager": "AbstractAsyncContextManager[{}]",
}


def _definitions(name: str) -> tuple[str, list[ast.AST]]:
    """The module that defines greenback.<name>, and its definitions of it
    (several for an overloaded function)."""
    obj = getattr(greenback, name)
    module = sys.modules[obj.__module__ if obj.__module__ != "greenback" else
                         type(obj).__module__]
    if isinstance(obj, type) and obj.__module__ == "greenback":
        module = sys.modules["greenback._trio_instrument"]
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    found = [
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.name == name
    ]
    overloads = [
        node for node in found
        if any(ast.unparse(d) in ("overload", "typing.overload")
               for d in getattr(node, "decorator_list", []))
    ]
    return module.__name__, overloads or found[:1]


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        # The constructor's parameters, from __init__ or else from __new__
        # (its implementation, the last definition, not its overloads).
        methods = [n for n in node.body if isinstance(n, ast.FunctionDef)]
        ctor = [n for n in methods if n.name == "__init__"] or [
            n for n in methods if n.name == "__new__"
        ]
        if not ctor:
            return f"{node.name}()"
        args = ctor[-1].args
        args.args = args.args[1:]  # self or cls
        return f"{node.name}({ast.unparse(args)})"
    assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    params = ast.unparse(node.args)
    returns = ast.unparse(node.returns) if node.returns else None
    for decorator in node.decorator_list:
        template = _CONTEXT_MANAGER_RETURNS.get(ast.unparse(decorator))
        if template and returns:
            # Iterator[X] / AsyncIterator[X] -> the context manager of X.
            inner = returns[returns.index("[") + 1 : -1]
            returns = template.format(inner)
    return f"{node.name}({params})" + (f" -> {returns}" if returns else "")


class GreenbackAPI(SphinxDirective):
    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        documented = self.env.domaindata.setdefault("greenback_api", {})
        documented[name] = self.env.docname
        obj: Any = getattr(greenback, name)
        _, defs = _definitions(name)
        if not defs:
            raise self.error(f"no definition of greenback.{name} found")
        first = defs[0]
        kind = "class" if isinstance(first, ast.ClassDef) else "function"
        lines = [f".. py:{kind}:: " + _signature(defs[0])]
        lines += ["   " + " " * len(f".. py:{kind}:: ") + _signature(d) for d in defs[1:]]
        # An @asynccontextmanager function is called without await.
        if isinstance(first, ast.AsyncFunctionDef) and not first.decorator_list:
            lines.append("   :async:")
        lines.append("")
        doc = inspect.getdoc(obj)
        if not doc:
            raise self.error(f"greenback.{name} has no docstring")
        lines += ["   " + line if line else "" for line in doc.splitlines()]
        node = nodes.section()
        nested_parse_with_titles(self.state, StringList(lines, source=f"greenback.{name}"), node)
        return node.children


def _check_complete(app: Sphinx, env: Any) -> None:
    documented = env.domaindata.get("greenback_api", {})
    wanted = {n for n in greenback.__all__ if not n.startswith("__")}
    missing = sorted(wanted - set(documented))
    if missing:
        from sphinx.util import logging

        logging.getLogger(__name__).warning(
            "public names with no greenback-api entry: %s", ", ".join(missing)
        )


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("greenback-api", GreenbackAPI)
    app.connect("env-check-consistency", _check_complete)
    return {"parallel_read_safe": False, "version": "1"}
