"""The tree shows the layers, and imports only go down them: kernels ← nearstore.storage ←
nearstore.selection ← nearstore.serving ← loaders ← nearstore.app; no module imports another that
imports it back. Read from the source, so a new module is checked the day it lands."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each package's layer; a module may import its own layer and those below.
LAYERS = {
    "kernels": 0,
    "nearstore.errors": 1,
    "nearstore.checks": 1,
    "nearstore.storage": 2,
    "nearstore.selection": 3,
    "nearstore": 3,  # the package's public API: storage and selection
    "nearstore.serving": 4,
    "loaders": 5,
    "nearstore.app": 6,
}


def modules() -> dict[str, Path]:
    found = {}
    for package in ("kernels", "nearstore", "loaders"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def layer(module: str) -> int:
    owner = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[owner]


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, anywhere in it (for types only, too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_every_module_has_a_layer():
    assert all(layer(name) >= 0 for name in modules())


def test_imports_only_go_down_the_layers():
    known = modules()
    upward = [
        f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
        for name, path in known.items()
        for target in imports(path, known)
        if layer(target) > layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_module_imports_one_that_imports_it_back():
    known = modules()
    # a package's __init__ importing its own submodules is how a package exports them
    graph = {
        name: {t for t in imports(path, known) if t != name and not t.startswith(name + ".")}
        for name, path in known.items()
    }
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for target in graph[node]:
                if target == start:
                    cycles.append(" -> ".join([*trail, start]))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, [*trail, target]))
    assert not cycles, "\n".join(sorted(set(cycles))[:10])
