"""Print the import graph of ctmodels' own modules and check it for cycles.

Usage: `python tools/import_graph.py [PACKAGE_DIR]` (default: the `ctmodels` folder
next to this script). Reads the source (nothing is imported), so it also works on a
tree that does not import. Every `import` / `from ... import` naming a ctmodels
module counts, wherever it stands (module level or inside a function: a deferred
import still ties the two modules together). `from . import x` where `x` is a
submodule counts as importing `x`; `from .pkg import name` counts as importing `pkg`
(its `__init__`), the usual meaning of a package's public API.

Prints one line per module (`module -> imported, ...`), then the strongly connected
components with more than one module (the cycles), and the imports of another
package's private names (`from ..data._xarray import _unit`, where the importing
module is not inside `data`). Exit status 1 when there is a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports(root: Path) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """The graph (module -> the ctmodels modules it imports) and the private-name
    imports across packages, as (importer, 'module.name') pairs."""
    mods = modules(root)
    top = root.name
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private: list[tuple[str, str]] = []
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        typing_only = _typing_only(tree)
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == top or a.name.startswith(top + "."):
                        graph[mod].add(_nearest(a.name, mods))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    src = _resolve(mod, is_pkg, node.level, node.module)
                elif node.module and (
                    node.module == top or node.module.startswith(top + ".")
                ):
                    src = node.module
                else:
                    continue
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in mods:  # `from . import _x`: a submodule
                        graph[mod].add(sub)
                        _check_private(mod, is_pkg, sub, None, private)
                    else:
                        graph[mod].add(_nearest(src, mods))
                        _check_private(mod, is_pkg, src, a.name, private)
        graph[mod].discard(mod)
    return graph, private


def _typing_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (never run, so not edges of
    the runtime import graph)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = getattr(test, "id", None) or getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    out.update(id(n) for n in ast.walk(stmt))
    return out


def _nearest(name: str, mods) -> str:
    while name not in mods and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _package(mod: str, is_pkg: bool) -> str:
    return mod if is_pkg else mod.rsplit(".", 1)[0]


def _check_private(mod, is_pkg, src, name, out) -> None:
    """Record `mod` reaching a private module or name of another package."""
    home = _package(mod, is_pkg)
    parts = src.split(".")
    priv = [i for i, p in enumerate(parts) if p.startswith("_") and p != "__init__"]
    if priv:
        owner = ".".join(parts[: priv[0]])  # the package the private module is in
        if not (home == owner or home.startswith(owner + ".")):
            out.append((mod, src + (f".{name}" if name else "")))
            return
        owner_mod = src
    else:
        owner_mod = src
    if name and name.startswith("_") and not name.startswith("__"):
        owner = (
            owner_mod
            if owner_mod.split(".")[-1][0] != "_"
            else owner_mod.rsplit(".", 1)[0]
        )
        if not (home == owner or home.startswith(owner + ".")):
            out.append((mod, f"{src}.{name}"))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main(argv: list[str]) -> int:
    root = (
        Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "ctmodels"
    )
    graph, private = imports(root)
    for mod in sorted(graph):
        deps = ", ".join(sorted(graph[mod]))
        print(f"{mod} -> {deps}" if deps else mod)
    found = cycles(graph)
    print()
    print(f"cycles: {len(found)}")
    for comp in found:
        print("  " + " <-> ".join(comp))
    print(f"private names imported across packages: {len(private)}")
    for mod, name in private:
        print(f"  {mod} imports {name}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
