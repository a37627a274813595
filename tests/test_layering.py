"""The package's modules import one way: base <- reference and backends <- ops <- layers <- users.

Every import between fastnoise's own modules (at the top of a file or inside a function) is read
from the source with ``ast``; a module may import modules of its own layer or of layers above it,
never below, and no two modules may import each other, directly or through others.
"""

from __future__ import annotations

import ast
import os

import fastnoise

ROOT = os.path.dirname(fastnoise.__file__)
KERNELS = os.path.join(os.path.dirname(ROOT), "kernels")

# the layers, top (imported by everything) to bottom; a new module must be given its place here
LAYERS = [
    ("base", {"spec", "rng", "context", "dispatch", "progress", "tile", "hardware"}),
    ("reference and backends", {"reference", "kernels", "_backends", "_backends_base", "_backends_linear",
                                "_backends_conv", "_backends_cpu", "_cpu"}),
    ("ops", {"functional", "tile_ops", "_hardware_ops"}),
    ("layers", {"modules", "intercept", "convert"}),
    ("users of layers", {"pregenerate", "robustness", "testing", "cli", "train", "lm", "integrations",
                         "aihwkit", "__init__", "__main__"}),
]


def _layer(module: str) -> int:
    head = module.split(".")[0]
    for i, (_, names) in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"fastnoise.{module} has no layer in tests/test_layering.py: give it one")


def _modules():
    """{dotted name relative to fastnoise: source path} for the package and kernels/."""
    out = {}
    for base, prefix in ((ROOT, ""), (KERNELS, "kernels.")):
        for dirpath, _, files in os.walk(base):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), base)[:-3].replace(os.sep, ".")
                name = prefix + (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel)
                out[name or "__init__"] = os.path.join(dirpath, f)
    return out


def _imports(name: str, path: str, known: set) -> set:
    """The fastnoise modules ``name`` imports (``from . import x`` and ``from .x import y`` alike)."""
    tree = ast.parse(open(path).read())
    package = name.rsplit(".", 1)[0] if "." in name and not path.endswith("__init__.py") else (
        name if path.endswith("__init__.py") and name != "__init__" else "")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(parts + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("fastnoise"):
                base = node.module[len("fastnoise"):].lstrip(".")
            else:
                continue
            targets = [f"{base}.{a.name}" if base else a.name for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            targets = [a.name[len("fastnoise"):].lstrip(".") for a in node.names
                       if a.name.startswith("fastnoise")]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                found.add(t)
    return found


def test_imports_go_one_way():
    mods = _modules()
    known = set(mods)
    graph = {n: _imports(n, p, known) for n, p in mods.items()}
    wrong = []
    for n, deps in graph.items():
        for d in deps:
            if _layer(d) > _layer(n):
                wrong.append(f"{n} ({LAYERS[_layer(n)][0]}) imports {d} ({LAYERS[_layer(d)][0]})")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))
    # no cycles, inside a layer either
    state: dict = {}

    def visit(n, path):
        if state.get(n) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
        if state.get(n) == 2:
            return
        state[n] = 1
        for d in sorted(graph[n]):
            if d == "__init__" or n == "__init__":
                continue
            visit(d, path + [n])
        state[n] = 2

    for n in sorted(graph):
        visit(n, [])
