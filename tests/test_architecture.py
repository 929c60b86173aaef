"""The layout docs/architecture.md describes: folders that import one way, no import circles.

Imports are read from the source (``ast``), lazy ones inside functions included: a circle closed
by an import inside a function is still a circle. Imports under ``if TYPE_CHECKING:`` are only
annotations and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "unisrec_x"
TOP_LEVEL_MODULES = {"__init__.py", "cli.py", "errors.py"}
#: Which folders each folder may import (besides itself, ``errors`` and ``runtime``): docs/architecture.md.
ALLOWED = {
    "runtime": set(),
    "model": set(),
    "objectives": set(),
    "items": set(),
    "data": {"items"},
    "evaluation": {"data", "model"},
    "training": {"model", "objectives", "evaluation", "data", "items"},
    "serving": {"model", "training", "items", "data", "evaluation"},
    "experiments": {"data", "evaluation"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports at run time."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and not _type_checking_only(node, parents):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import) and not _type_checking_only(node, parents):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def test_no_loose_modules_at_the_top_level():
    loose = {p.name for p in PACKAGE.glob("*.py")} - TOP_LEVEL_MODULES
    assert not loose, f"modules beside the folders: {sorted(loose)} (each belongs in the folder that answers its question)"


def test_no_import_circles():
    edges = graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for target in sorted(edges[node]):
            if not target.endswith("__init__") and edges.get(target) is not None:
                visit(target, path + [node])
        done.add(node)

    for start in sorted(edges):
        visit(start, [])


def test_folders_import_one_way():
    wrong = []
    for source, targets in graph().items():
        parts = source.split(".")
        if len(parts) < 3:
            continue  # cli, errors, the package itself
        folder = parts[1]
        for target in targets:
            target_folder = target.split(".")[1] if target.count(".") >= 2 else None
            if target_folder in (None, folder, "runtime") or target == "unisrec_x.errors":
                continue
            if target_folder not in ALLOWED[folder]:
                wrong.append(f"{source} imports {target}")
    assert not wrong, "imports against docs/architecture.md: " + "; ".join(sorted(wrong))
