"""The package's layers: no import cycle between its modules, and no module imports a layer above its own.

The order, bottom to top, is each folder's `__init__` docstring in one line: errors; data (files -> pairs and
prompts, tokenize, batching); objectives (pure torch math: the DPO loss table, policy-gradient math, metrics);
config (the one config tree every layer above reads); runtime (processes, run folder, checkpoints, logging);
models (load, LoRA, save, export); forward (log-probs, the reference's, rollouts, rewards); evaluation (measure,
eval/score, judge, report, plot); tasks (the built-in tasks' prompts, ground truth and pairs); recipes (the
training loops); study (DPO against RLHF); and the faces: commands, api, cli, the package itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "preftune"
LAYERS = ("errors", "data", "objectives", "config", "runtime", "models", "forward", "evaluation", "tasks", "recipes",
          "study", "commands", "api", "cli", "__init__")


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str], package: Path = PACKAGE) -> set[str]:
    """The package's modules that `path` imports anywhere in it (top level, in functions, under TYPE_CHECKING):
    for `from a.b import c`, a.b.c when that is a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    found.discard(module_name(path, package))
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    paths = {module_name(p, package): p for p in package.rglob("*.py")}
    graph = {name: imported_modules(path, set(paths), package) for name, path in paths.items()}
    # a package's __init__ is not a dependency of its own modules' imports ("from preftune.data.read" passes it)
    return {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()}


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1] if len(parts) > 1 else "__init__")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (layer {LAYERS[layer_of(a)]}) imports {b} (layer {LAYERS[layer_of(b)]})"
                  for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                found.append(sorted(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    for name in import_graph():
        layer_of(name)  # raises ValueError for a folder or module the order does not know


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_each_folder_says_its_job():
    for init in PACKAGE.glob("*/__init__.py"):
        assert len(ast.get_docstring(ast.parse(init.read_text())) or "") > 80, f"{init} has no docstring"


def test_only_the_faces_sit_at_the_top():
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == ["__init__", "api", "cli", "commands", "config", "errors"]


def write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("case", ["upward", "cycle"])
def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path, case):
    package = tmp_path / "preftune"
    write(package, "__init__.py", "")
    write(package, "data/__init__.py", "")
    write(package, "data/read.py", "import json\n")
    write(package, "recipes/__init__.py", "")
    write(package, "recipes/dpo.py", "from preftune.data.read import x\n")
    if case == "upward":  # data reaching up into the loops, inside a function
        write(package, "data/read.py", "def f():\n    from preftune.recipes import dpo\n")
        assert upward_imports(import_graph(package)) == [
            "preftune.data.read (layer data) imports preftune.recipes.dpo (layer recipes)"]
    else:
        write(package, "recipes/online.py", "from preftune.recipes.dpo import y\n")
        write(package, "recipes/dpo.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                         "    from preftune.recipes.online import z\n")
        assert cycles(import_graph(package)) == [["preftune.recipes.dpo", "preftune.recipes.online"]]
