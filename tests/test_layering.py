"""The layering the folders show, checked: the sans-I/O core imports no event loop and
no network library, the hot path nothing of the sessions or the HTTP port, and no
module imports another in a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys

from support import ROOT

PACKAGE = ROOT / "src" / "websocketserver"


def imported_modules(*modules: str) -> set[str]:
    """Every module loaded by importing ``modules`` in a fresh interpreter."""
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print('\\n'.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT / "src").stdout
    return set(out.split())


def test_the_core_imports_no_event_loop_and_no_network_library() -> None:
    core = [f"websocketserver.core.{path.stem}" for path in (PACKAGE / "core").glob("*.py")
            if path.stem != "__init__"]
    assert len(core) >= 5
    loaded = imported_modules(*core)
    assert {"asyncio", "aiohttp", "picows", "redis", "uvloop"} & {
        name.partition(".")[0] for name in loaded} == set()


def test_the_hot_path_imports_nothing_of_the_sessions_or_the_http_port() -> None:
    loaded = imported_modules("websocketserver.websocket_port.tunnel",
                              "websocketserver.websocket_port.live",
                              "websocketserver.websocket_port.relay")
    assert [m for m in loaded if m.startswith(("websocketserver.sessions",
                                               "websocketserver.http_port",
                                               "websocketserver.cluster", "aiohttp"))] == []


def _edges() -> dict[str, set[str]]:
    """Module -> the package modules it imports at run time (not for type checking)."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rpartition(".")[0]
        found: set[str] = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(inner) for node in ast.walk(tree)
                       if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                       for inner in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        edges[name] = found
    return {name: {t for t in targets if t in edges and t != name}
            for name, targets in edges.items()}


def test_no_module_imports_another_in_a_cycle() -> None:
    edges = _edges()
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        assert name not in visiting, " -> ".join([*visiting[visiting.index(name):], name])
        if name in done:
            return
        visiting.append(name)
        for target in edges[name]:
            if not target.endswith("__init__") and target != "websocketserver":
                visit(target)
        visiting.pop()
        done.add(name)

    for name in edges:
        visit(name)


def test_no_module_is_over_450_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}
