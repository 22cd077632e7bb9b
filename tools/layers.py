#!/usr/bin/env python3
"""The package's import graph by layer, and what breaks the one-way rule.

Layers, bottom-up: core < ops < compiler < exporters < runtime < app. A module's layer is its subpackage
(``procrustes_onnx.core``, ``.ops``, ``.compiler``, ``.exporters``, ``.runtime``); every other module of
``procrustes_onnx`` (cli*, pipeline*, report, ...) is the app. An import is a violation when it runs up
the layers, at module level or inside a function alike. A cycle is a set of modules that import each
other at module level (the import order would then decide whether they load).

Files are found through ``[tool.setuptools.package-dir]`` in pyproject.toml and read with ``ast``, nothing
is imported, so the script also reads another checkout: ``python tools/layers.py /work/main``.
It lives in tools/ (not benchmarks/, which measure the models) and tests/test_layers.py runs it.

Usage: ``python tools/layers.py [ROOT] [--edges]``; exit code 1 if there is a violation or a cycle.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

TOP = "procrustes_onnx"
LAYERS = ("core", "ops", "compiler", "exporters", "runtime", "app")
RANK = {name: i for i, name in enumerate(LAYERS)}


@dataclass(frozen=True)
class Edge:
    """One import statement's target, as seen from the importing module."""

    source: str
    target: str
    line: int
    in_function: bool


def layer_of(module: str) -> str:
    """The root package itself (its version only) runs before any module of any layer: core."""
    parts = module.split(".")
    if parts == [TOP]:
        return "core"
    return parts[1] if len(parts) > 1 and parts[1] in RANK and parts[1] != "app" else "app"


def package_files(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file of the package-dir mapping."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"].get("package-dir", {}) or {TOP: TOP}
    modules: dict[str, Path] = {}
    for package, folder in mapping.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("").parts
            if any(p.startswith(".") or p == "__pycache__" for p in rel):
                continue
            name = ".".join((package, *rel))
            modules[name.removesuffix(".__init__")] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> list[Edge]:
    """The package modules ``module`` imports, with where and whether inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    in_function: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    edges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target == TOP or target.startswith(TOP + "."):
                edges.append(Edge(module, target, node.lineno, id(node) in in_function))
    return edges


def cycles(modules: set[str], edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components (size > 1, or a self-import) of the module-level import graph.

    Importing ``a.b.c`` first runs ``a`` and ``a.b``: those count as edges too, except for the importer's
    own packages, which are already running when it is imported."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        if e.in_function:
            continue
        parts = e.target.split(".")
        own = {".".join(e.source.split(".")[:i]) for i in range(1, e.source.count(".") + 1)}
        for i in range(2, len(parts) + 1):
            target = ".".join(parts[:i])
            if target in graph and (target == e.target or target not in own) and target != e.source:
                graph[e.source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def analyse(root: str | Path = ".") -> dict:
    """Everything the report prints: modules by layer, edges, violations, cycles."""
    root = Path(root).resolve()
    files = package_files(root)
    known = set(files)
    edges = [e for m, p in files.items() for e in imports_of(m, p, known)]
    violations = [e for e in edges if RANK[layer_of(e.target)] > RANK[layer_of(e.source)]]
    return {"root": root, "files": files, "edges": edges, "violations": violations,
            "cycles": cycles(known, edges)}


def layer_order(root: str | Path = ".") -> list[str]:
    """Every module, bottom layer first (the order tests/test_layers.py imports them in)."""
    files = package_files(Path(root).resolve())
    return sorted(files, key=lambda m: (RANK[layer_of(m)], m))


def report(result: dict, show_edges: bool = False) -> str:
    files, edges, root = result["files"], result["edges"], result["root"]
    lines = [f"import graph of {TOP} in {root}, layers bottom-up: {' < '.join(LAYERS)}", ""]
    by_layer = Counter(layer_of(m) for m in files)
    pairs = Counter((layer_of(e.source), layer_of(e.target)) for e in edges if layer_of(e.source) != layer_of(e.target))
    inside = Counter(layer_of(e.source) for e in edges if e.in_function)
    lines.append(f"{'layer':<10} {'modules':>7}  imports from (statements)")
    for layer in LAYERS:
        below = ", ".join(f"{t} {n}" for (s, t), n in sorted(pairs.items(), key=lambda kv: RANK[kv[0][1]])
                          if s == layer)
        lines.append(f"{layer:<10} {by_layer[layer]:>7}  {below or '-'}")
    total_in = sum(inside.values())
    lines += ["", f"package imports: {len(edges)}, of them inside functions: {total_in} "
              f"({', '.join(f'{k} {v}' for k, v in sorted(inside.items(), key=lambda kv: RANK[kv[0]]))})"]
    if show_edges:
        lines += ["", "edges across layers:"]
        lines += [f"  {e.source} -> {e.target}" for e in edges if layer_of(e.source) != layer_of(e.target)]
    lines += ["", f"violations (imports up the layers): {len(result['violations'])}"]
    for e in result["violations"]:
        rel = files[e.source].relative_to(root)
        where = "in a function" if e.in_function else "module level"
        lines.append(f"  {rel}:{e.line} ({layer_of(e.source)}) imports {e.target} ({layer_of(e.target)}), {where}")
    lines += ["", f"module-level import cycles: {len(result['cycles'])}"]
    lines += [f"  {' <-> '.join(c)}" for c in result["cycles"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    result = analyse(args[0] if args else Path(__file__).resolve().parents[1])
    print(report(result, show_edges="--edges" in argv))
    return 1 if result["violations"] or result["cycles"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
