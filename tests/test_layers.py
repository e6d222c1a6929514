"""The packages import strictly downward, in the order `visiondrop.LAYERS` documents, and no module imports itself
back through others: every import counts, those inside functions and `TYPE_CHECKING` blocks included."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from visiondrop import LAYERS

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The project modules `path` imports, anywhere in it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod where one exists
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {m for m in found if m.split(".")[0] in ("visiondrop", "baselines")}


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest layer prefix naming `module`."""
    matches = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
               if module == prefix or (module.startswith(prefix + ".") and prefix != "visiondrop")]
    assert matches, f"{module} is in no layer of visiondrop.LAYERS: add it there"
    return max(matches)[1]


FILES = sorted(p for top in ("visiondrop", "baselines") for p in (ROOT / top).rglob("*.py"))
MODULES = {module_name(p) for p in FILES}
GRAPH = {module_name(p): imports(p) for p in FILES}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    upward = [f"{target} ({' / '.join(LAYERS[layer_of(target)])})" for target in sorted(GRAPH[module])
              if layer_of(target) > layer_of(module)]
    assert not upward, f"{module} ({' / '.join(LAYERS[layer_of(module)])}) imports upward: {', '.join(upward)}"


def test_no_import_cycles():
    """Between modules (a package's `__init__` included): a depth-first search finds no back edge."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if target == module or target not in GRAPH:
                continue
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
