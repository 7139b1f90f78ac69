"""The package's layers depend on each other one way (docs/ARCHITECTURE.md):

    cli -> train -> run -> (nnunet, analysis, output, monitor, report) -> inputs -> config, errors

plus records (the typed contracts) and synth (test and benchmark data) beside them.
Every import in every module, function-level ones included, is checked against that;
and only the nnunet layer imports nnunetv2 (the one seam to nnU-Net).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pingu_dask"
BASE = {"config", "errors", "records", "__init__"}
#: layer -> the layers it may import (besides itself and BASE)
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "errors": set(),
    "records": set(),
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
