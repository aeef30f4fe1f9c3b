"""Draws beam_job's module import graph from the source (ast) and prints its import circles and upward imports.

Every `import` / `from ... import` counts, at module level and inside functions alike (a function-level
import still ties the two modules together; it only delays the cost). An imported name that is a module
(`from beam_job import storage`) is an edge to that module; any other name is an edge to the module that
defines it. `beam_job.schemas` is read from the top-level `schemas/` folder when the package maps it there.

Layers, bottom to top (a module may import its own layer and the layers below it, never one above):

    0  base       beam_job (the package), storage, layout, config, features, imaging, schemas
    1  delg       beam_job.delg.*
    2  pipeline   beam_job.pipeline.*
    3  retrieval  beam_job.retrieval.*
    4  report     beam_job.report.*
    5  launcher   cli, launch, __main__

Usage: python scripts/import_graph.py [--edges] [repository root]. Exit status 1 when there is a circle, an
upward import or a module in no layer; 0 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Iterator

PACKAGE = "beam_job"
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("beam_job", "beam_job.storage", "beam_job.layout", "beam_job.config", "beam_job.features",
              "beam_job.imaging", "beam_job.schemas", "beam_job.errors", "beam_job.processes")),
    ("delg", ("beam_job.delg",)),
    ("pipeline", ("beam_job.pipeline",)),
    ("retrieval", ("beam_job.retrieval",)),
    ("report", ("beam_job.report",)),
    ("launcher", ("beam_job.cli", "beam_job.launch", "beam_job.__main__")),
)

Graph = dict[str, set[tuple[str, int]]]  # module -> {(imported module, line)}


def module_files(root: str) -> dict[str, str]:
    """{module name: file} of every module of the package under `root` (the repository root)."""
    trees = [(os.path.join(root, PACKAGE), PACKAGE)]
    if not os.path.isdir(os.path.join(root, PACKAGE, "schemas")) and os.path.isdir(os.path.join(root, "schemas")):
        trees.append((os.path.join(root, "schemas"), PACKAGE + ".schemas"))  # setup.py's package_dir mapping
    files: dict[str, str] = {}
    for top, name in trees:
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):  # beam_job/schemas: a link
            dirnames[:] = sorted(d for d in dirnames if os.path.isfile(os.path.join(dirpath, d, "__init__.py")))
            parts = [name] + [p for p in os.path.relpath(dirpath, top).split(os.sep) if p != "."]
            for filename in sorted(filenames):
                if filename.endswith(".py"):
                    stem = filename[:-3]
                    files[".".join(parts if stem == "__init__" else [*parts, stem])] = os.path.join(dirpath, filename)
    return files


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    if not level:
        return target or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int, tuple[str, ...]]]:
    """(imported module, line, names taken from it) for each import statement anywhere in the tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, ()
        elif isinstance(node, ast.ImportFrom):
            yield _resolve(module, is_package, node.level, node.module), node.lineno, tuple(a.name for a in node.names)


def build_graph(root: str) -> Graph:
    """The package's import edges between its own modules (imports of other packages are left out)."""
    files = module_files(root)
    graph: Graph = {name: set() for name in files}
    for name, path in files.items():
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), filename=path)
        for target, line, names in _imported(tree, name, path.endswith("__init__.py")):
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in files]
            for dest in submodules or [_owner(target, files)]:
                if dest and dest != name:
                    graph[name].add((dest, line))
    return graph


def _owner(target: str, files: dict[str, str]) -> str | None:
    """The module `target` names, or the closest enclosing package that exists."""
    while target and target not in files:
        target = target.rpartition(".")[0]
    return target or None


def layer_of(module: str) -> int | None:
    """The layer index of a module (the longest matching prefix wins), None when it is in no layer."""
    best: tuple[int, int] = (-1, -1)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or (prefix != PACKAGE and module.startswith(prefix + "."))) and len(prefix) > best[0]:
                best = (len(prefix), index)
    return best[1] if best[0] >= 0 else None


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dest, _ in sorted(graph.get(node, ())):
            if dest not in index:
                visit(dest)
                low[node] = min(low[node], low[dest])
            elif dest in on_stack:
                low[node] = min(low[node], index[dest])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def upward_imports(graph: Graph) -> list[tuple[str, int, str]]:
    """(module, line, imported module) for each import of a module in a higher layer."""
    found = []
    for module, edges in sorted(graph.items()):
        here = layer_of(module)
        for dest, line in sorted(edges, key=lambda e: (e[1], e[0])):
            there = layer_of(dest)
            if here is not None and there is not None and there > here:
                found.append((module, line, dest))
    return found


def unlayered(graph: Graph) -> list[str]:
    return sorted(m for m in graph if layer_of(m) is None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--edges", action="store_true", help="also print every edge (module -> module)")
    args = parser.parse_args(argv)
    graph = build_graph(args.root)
    if args.edges:
        for module, edges in sorted(graph.items()):
            for dest in sorted({d for d, _ in edges}):
                print(f"{module} -> {dest}")
    circles, upward, loose = cycles(graph), upward_imports(graph), unlayered(graph)
    print(f"{len(graph)} modules, {sum(len({d for d, _ in e}) for e in graph.values())} edges")
    for component in circles:
        print("circle: " + " <-> ".join(component))
    for module, line, dest in upward:
        print(f"upward: {module}:{line} imports {dest} "
              f"({LAYERS[layer_of(module)][0]} -> {LAYERS[layer_of(dest)][0]})")
    for module in loose:
        print(f"no layer: {module} (add it to LAYERS in scripts/import_graph.py)")
    return 1 if circles or upward or loose else 0


if __name__ == "__main__":
    sys.exit(main())
