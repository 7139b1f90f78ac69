"""The package's layers depend on each other one way (docs/ARCHITECTURE.md):

    cli -> train -> run -> (nnunet, analysis, output, monitor, report) -> inputs -> config, errors

plus records (the typed contracts) and synth (test and benchmark data) beside them.
Every import in every module, function-level ones included, is checked against that;
and only the nnunet layer imports nnunetv2 (the one seam to nnU-Net). Within the
package, modules import each other without circles, none imports the package root
(its version is in the leaf pingu_dask/version.py), and no module reaches into Dask's
or dask-jobqueue's private names.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pingu_dask"
BASE = {"config", "errors", "records", "version", "__init__"}
#: layer -> the layers it may import (besides itself and BASE)
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "errors": set(),
    "records": set(),
    "version": set(),
    "inputs": set(),
    "nnunet": set(),
    "analysis": {"inputs"},
    "output": {"inputs"},
    "monitor": set(),
    "report": {"output", "analysis", "inputs"},
    "synth": {"inputs", "output"},
    "run": {"nnunet", "analysis", "output", "monitor", "report", "inputs"},
    "train": {"run", "nnunet", "analysis", "output", "monitor", "report", "inputs"},
    "cli": {"run", "train", "nnunet", "analysis", "output", "monitor", "report", "inputs", "synth"},
    "__init__": {"output"},  # open_results, imported lazily
}


def layer_of(module: Path) -> str:
    relative = module.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def imports_of(module: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "pingu_dask":  # from pingu_dask import x: x may be a layer
                found += [(node.lineno, f"pingu_dask.{alias.name}") for alias in node.names]
    return found


def test_layers_import_one_way() -> None:
    wrong = []
    for module in sorted(PACKAGE.rglob("*.py")):
        layer = layer_of(module)
        for line, name in imports_of(module):
            if not name.startswith("pingu_dask.") and name != "pingu_dask":
                continue
            target = name.split(".")[1] if "." in name else "__init__"
            if target in ("__version__",):
                target = "__init__"
            if target == layer or target in BASE or target in ALLOWED[layer]:
                continue
            wrong.append(f"{module.relative_to(PACKAGE.parent)}:{line} ({layer}) imports {name}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_only_the_nnunet_layer_imports_nnunetv2() -> None:
    users = {
        str(module.relative_to(PACKAGE.parent))
        for module in PACKAGE.rglob("*.py")
        for _, name in imports_of(module)
        if name.split(".")[0] == "nnunetv2"
    }
    assert users and all(path.startswith("pingu_dask/nnunet/") for path in users), users


def test_every_layer_is_named_here() -> None:
    layers = {layer_of(module) for module in PACKAGE.rglob("*.py")}
    assert layers == set(ALLOWED), layers ^ set(ALLOWED)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (function-level imports included)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for _, target in imports_of(path):
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_circle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_in_a_circle() -> None:
    assert circles(import_graph()) == []


def test_no_module_imports_the_package_root() -> None:
    graph = import_graph()
    upward = sorted(name for name, targets in graph.items() if "pingu_dask" in targets)
    assert upward == [], f"import pingu_dask.version instead of the package root: {upward}"


def test_no_private_dask_or_dask_jobqueue_api() -> None:
    """No `from distributed... import _x`, and no `obj._x` on anything but self/cls in a
    module that uses Dask (os._exit aside: the documented way out of a forked child)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        uses_dask = False
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.split(".")[0] in ("dask", "distributed", "dask_jobqueue"):
                    uses_dask = True
                    if any(part.startswith("_") for part in name.split(".")):
                        found.append(f"{path}:{node.lineno} imports {name}")
        if not uses_dask:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                owner = node.value
                if node.attr.startswith("__") or (
                    isinstance(owner, ast.Name) and owner.id in ("self", "cls", "os")
                ):
                    continue
                found.append(f"{path}:{node.lineno} {ast.unparse(node)}")
    assert found == [], found
