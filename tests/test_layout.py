"""The package's folders are its layers, and imports go one way: down.

    core/ (the math), synthetic/ (the shapes world)  <  models/  <  data/, stages/ (the training stages and their
    fast paths)  <  the Lightning glue at the top (module, settings, callbacks, checkpointing, export, cli)

The private helpers (``_validation``, ``_imaging``, ``_distributed``) sit under everything. Every import counts,
function-level ones too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "durian_lightning"
PRIVATE = {"_validation", "_imaging", "_distributed"}
LAYERS = {"core": 1, "synthetic": 1, "models": 2, "data": 3, "stages": 3, "scale": 3}
TOP = 4


def module_name(file: Path) -> str:
    parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def place(module: str) -> tuple[str, int]:
    """``(folder, layer)`` of a ``durian_lightning`` module."""
    first = module.split(".")[1] if module.count(".") else ""
    if first in PRIVATE:
        return first, 0
    if first in LAYERS:
        return first, LAYERS[first]
    return "", TOP


def is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(file: Path) -> set[str]:
    """The package modules ``file`` imports (``from durian_lightning.x import y`` names x, or x.y when y is one)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{file.relative_to(PACKAGE)}: relative import 'from {'.' * node.level}{node.module}'")
        names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else []) + (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            if name.startswith("durian_lightning."):
                found.add(name)
                if isinstance(node, ast.ImportFrom):  # from durian_lightning.models import families: a module too
                    found.update(f"{name}.{a.name}" for a in node.names if is_module(f"{name}.{a.name}"))
    return found


GRAPH = {module_name(f): imports_of(f) for f in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "durian_lightning"))
def test_a_module_imports_only_its_own_folder_or_a_lower_layer(module):
    folder, layer = place(module)
    upward = [name for name in GRAPH[module] if place(name)[0] != folder and place(name)[1] >= layer]
    assert not upward, f"{module} imports {upward}: not below its layer"


def test_there_is_no_import_cycle():
    finished: set[str] = set()

    def visit(module, path):
        if module in path:
            raise AssertionError(" -> ".join([*path[path.index(module):], module]))
        if module in finished:
            return
        for name in GRAPH.get(module, ()):
            if name in GRAPH and name != module:
                visit(name, [*path, module])
        finished.add(module)

    for module in GRAPH:
        if module != "durian_lightning":  # the package root only re-exports, lazily
            visit(module, [])


def test_the_module_is_lightning_glue_under_300_lines():
    assert len((PACKAGE / "module.py").read_text().splitlines()) < 300
