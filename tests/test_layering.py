"""Dependencies point one way: the benchmarks sit on top of the core, adapters and kernels
know nothing of transport, the server never names a policy module, and no two modules
import each other (function-local imports count: they are dependencies too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ttaserve"
INFRASTRUCTURE = {"base", "compose", "model", "registry", "guard", "safety"}  # adapters/ modules that are not policies
TRANSPORT = ("grpc", "google.protobuf", "prometheus_client", "ttaserve.server", "ttaserve.engine")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")
            if "_pb2" not in p.name and "peer_scripts" not in p.parts}


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module name an ``import`` anywhere in the file mentions (and, for ``from X
    import Y``, also ``X.Y``, which may be a submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found - {name}


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_only_the_benchmarks_and_the_cli_import_the_benchmarks() -> None:
    offenders = {name: sorted(i for i in imports if _within(i, ("ttaserve.bench",)))
                 for name, imports in IMPORTS.items()
                 if not _within(name, ("ttaserve.bench", "ttaserve.cli"))}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("layer", ["ttaserve.adapters", "ttaserve.kernels"])
def test_adapters_and_kernels_know_no_transport(layer: str) -> None:
    offenders = {name: sorted(i for i in imports if _within(i, TRANSPORT))
                 for name, imports in IMPORTS.items() if _within(name, (layer,))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_server_never_names_a_policy_module() -> None:
    policies = tuple(n for n in MODULES if n.startswith("ttaserve.adapters.")
                     and n.rpartition(".")[2] not in INFRASTRUCTURE)
    assert policies, "no policy modules found"
    offenders = {name: sorted(i for i in imports if _within(i, policies))
                 for name, imports in IMPORTS.items() if _within(name, ("ttaserve.server",))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycles() -> None:
    # A package importing its own submodules (adapters/__init__ registering the policies) is
    # not a cycle; any other loop is.
    def related(a: str, b: str) -> bool:
        return a.startswith(b + ".") or b.startswith(a + ".")

    graph = {name: {i for i in imports if i in MODULES and not related(name, i)}
             for name, imports in IMPORTS.items()}
    cycles = [cycle for cycle in _strongly_connected(graph) if len(cycle) > 1]
    assert cycles == []


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively (no recursion limit on deep import chains)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            nxt = next(successors, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components
