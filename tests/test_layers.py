"""The import structure of the package, read with ``ast``: the layers of the data flow and no import cycles.

Data flows one way: ``systems`` -> ``envs`` / ``mpc`` (and ``nets``, their sibling) -> ``policies`` -> ``experts``,
``training``, ``evaluation``, ``wrappers`` -> ``experiments`` -> ``cli``. A package may import only from layers
below its own (every import counts: module level, inside functions, under ``TYPE_CHECKING``), and no two modules
may import each other at module level. Cycles that close only through imports for type checking or inside functions
are listed in :data:`CYCLES_ALLOWED` with the reason; any other one fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import deqmpc_gym

#: the packages (and top-level modules) of ``deqmpc_gym`` by layer, lowest first; ``__init__`` is the package
#: root, which registers the envs (a package that needs the ids calls ``envs.registration.register_envs``).
LAYERS: list[list[str]] = [
    ["errors"],
    ["systems", "nets", "io", "_config", "_device"],
    ["envs", "mpc", "checkpoint"],
    ["policies", "data", "evaluation", "wrappers", "__init__"],
    ["training", "experts"],
    ["experiments"],
    ["cli"],
    ["__main__"],
]

#: import cycles that close only through ``TYPE_CHECKING`` imports or imports at call time, with the reason.
CYCLES_ALLOWED: dict[frozenset[str], str] = {
    frozenset({"deqmpc_gym.systems.base", "deqmpc_gym.systems.kernels"}):
        "System.step calls the compiled kernels, whose functions annotate their argument as a System (type only)",
}

ROOT = Path(deqmpc_gym.__file__).parent


def module_sources(root: Path = ROOT) -> dict[str, tuple[str, bool]]:
    """``{"deqmpc_gym.x.y": (source, is_package)}`` of every module under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path.read_text(encoding="utf-8"), is_pkg)
    return out


def module_imports(sources: dict[str, tuple[str, bool]]) -> dict[str, dict[str, str]]:
    """``{module: {imported module: "top" | "type" | "lazy"}}`` for the imports of the package itself (relative
    imports resolved; ``from pkg import sub`` is the module ``pkg.sub`` when that is a module). ``"top"``: at module
    level; ``"type"``: under ``if TYPE_CHECKING``; ``"lazy"``: only inside functions."""
    top_name = next(iter(sources)).split(".")[0]
    graph: dict[str, dict[str, str]] = {}
    for name, (source, is_pkg) in sources.items():
        package = name.split(".") if is_pkg else name.split(".")[:-1]
        edges: dict[str, str] = {}

        def add(target: str, kind: str, name: str = name, edges: dict[str, str] = edges) -> None:
            if target.split(".")[0] != top_name:
                return
            while target not in sources:  # an attribute of a module: the module
                target = target.rsplit(".", 1)[0]
            rank = {"top": 0, "type": 1, "lazy": 2}  # an edge keeps its strongest kind
            if target != name and (target not in edges or rank[kind] < rank[edges[target]]):
                edges[target] = kind

        def visit(node: ast.AST, kind: str, package: list[str] = package) -> None:
            for child in ast.iter_child_nodes(node):
                inner = kind
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    inner = "lazy"
                elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test) and kind == "top":
                    inner = "type"
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        add(alias.name, kind)
                elif isinstance(child, ast.ImportFrom):
                    base = package[:len(package) - child.level + 1] if child.level else []
                    module = ".".join(base + ([child.module] if child.module else []))
                    for alias in child.names:
                        sub = f"{module}.{alias.name}"
                        add(sub if sub in sources else module, kind)
                visit(child, inner)

        visit(ast.parse(source), "top")
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, str]], kinds: tuple[str, ...]) -> list[frozenset[str]]:
    """The strongly connected components (more than one module) of the import graph restricted to ``kinds``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w, kind in graph[v].items():
            if kind not in kinds:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in graph:
        if v not in index:
            strong(v)
    return found


def layer_violations(graph: dict[str, dict[str, str]], layers: list[list[str]]) -> list[str]:
    """``"importer (layer i) imports imported (layer j)"`` for every import of a unit at or above its own layer
    (units: the first name below the package root; a unit's own modules may import each other)."""
    layer = {unit: i for i, units in enumerate(layers) for unit in units}

    def unit(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "__init__"

    out = []
    for importer, edges in sorted(graph.items()):
        a = unit(importer)
        if a not in layer:
            out.append(f"{importer}: unit {a!r} is missing from the layer table")
            continue
        for imported in sorted(edges):
            b = unit(imported)
            if b != a and layer.get(b, len(layers)) >= layer[a]:
                out.append(f"{importer} ({a}, layer {layer[a]}) imports {imported} ({b}, layer {layer.get(b)})")
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, str]]:
    return module_imports(module_sources())


def test_packages_import_only_from_lower_layers(graph: dict[str, dict[str, str]]) -> None:
    assert layer_violations(graph, LAYERS) == []


def test_no_import_cycles(graph: dict[str, dict[str, str]]) -> None:
    assert cycles(graph, ("top",)) == []
    found = set(cycles(graph, ("top", "type", "lazy")))
    assert found <= set(CYCLES_ALLOWED), sorted(map(sorted, found - set(CYCLES_ALLOWED)))
    assert set(CYCLES_ALLOWED) <= found, "an allowed cycle no longer exists: remove it from the list"


def test_the_checks_find_cycles_and_upward_imports() -> None:
    """The functions above flag a runtime cycle, a cycle for type checking, a cycle through a call-time import and
    imports against the data flow."""
    sources = {
        "pkg": ("", True),
        "pkg.errors": ("import pkg.wrappers\n", False),
        "pkg.systems": ("", True),
        "pkg.systems.a": ("from pkg.systems.b import B\nclass A: ...\n", False),
        "pkg.systems.b": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.systems.a import A\n"
                          "class B: ...\n", False),
        "pkg.envs": ("def f():\n    from . import core\n", True),
        "pkg.envs.core": ("from ..systems import a\n\ndef g():\n    import pkg.policies\n", False),
        "pkg.policies": ("from pkg.envs import core\n", True),
        "pkg.wrappers": ("import pkg.errors\n", False),
    }
    graph = module_imports(sources)
    assert graph["pkg.systems.b"] == {"pkg.systems.a": "type"} and graph["pkg.envs"] == {"pkg.envs.core": "lazy"}
    assert cycles(graph, ("top",)) == [frozenset({"pkg.errors", "pkg.wrappers"})]
    assert frozenset({"pkg.systems.a", "pkg.systems.b"}) in cycles(graph, ("top", "type"))
    assert frozenset({"pkg.envs.core", "pkg.policies"}) in cycles(graph, ("top", "lazy"))
    assert layer_violations(graph, [["errors"], ["systems"], ["envs"], ["policies", "wrappers", "__init__"]]) == [
        "pkg.envs.core (envs, layer 2) imports pkg.policies (policies, layer 3)",
        "pkg.errors (errors, layer 0) imports pkg.wrappers (wrappers, layer 3)"]
