"""The package's imports point one way along the data flow, and close no circle.

The allowed order is written once, here (`LAYERS`): a module may import its own layer and any layer
listed before it, never one after it — whether at module top or lazily inside a function. The check
parses the source (AST), so a lazy back-import is caught just like a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kard_ray"

# Lower layers first. Base modules (config, console, io, methods, models, runtime) sit below everything.
LAYERS: list[set[str]] = [
    {"config", "console", "io", "methods", "models", "runtime"},
    {"data"},
    {"knowledge"},
    {"teacher"},
    {"inference"},
    {"training"},
    {"evaluation"},
    {"serve"},
    {"tracking"},  # reads a finished run directory (models, evaluation) and copies it into MLflow
    {"pipeline", "cli"},
]
# Serve answers with what test time needs; it never reaches into training or evaluation.
FORBIDDEN = {"serve": {"training", "evaluation"}}


def layer_of(unit: str) -> int:
    for i, names in enumerate(LAYERS):
        if unit in names:
            return i
    raise AssertionError(f"kard_ray.{unit} is in no layer of tests/test_layers.py: add it to LAYERS")


def unit_of(module: str) -> str | None:
    """`kard_ray.training.core` -> `training`; None for modules outside the package."""
    parts = module.split(".")
    if parts[0] != "kard_ray":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path, module: str, modules: frozenset = frozenset()) -> list[tuple[str, int]]:
    """(imported kard_ray module, line) of every import statement in the file, lazy ones included.
    `from package import submodule` counts as importing the submodule (when `modules` lists it)."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the module's package
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            for a in node.names:
                sub = f"{name}.{a.name}"
                out.append((sub if sub in modules else name, node.lineno))
    return [(n, line) for n, line in out if n.startswith("kard_ray")]


def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    mods = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def violations(root: Path = PACKAGE) -> list[str]:
    bad = []
    for module, path in sorted(package_modules(root).items()):
        src = unit_of(module)
        if src in (None, "__init__"):
            continue
        for target, line in imports_of(path, module):
            dst = unit_of(target)
            if dst in (None, "__init__") or dst == src:
                continue
            if layer_of(dst) > layer_of(src) or dst in FORBIDDEN.get(src, set()):
                bad.append(f"{path.relative_to(root.parent)}:{line}: {module} ({src}) imports {target} ({dst})")
    return bad


def module_cycles(root: Path = PACKAGE) -> list[list[str]]:
    """Import cycles between modules (Tarjan's strongly connected components of size > 1)."""
    mods = package_modules(root)
    names = frozenset(mods)
    graph = {m: {t for t, _ in imports_of(p, m, names) if t in mods and t != m} for m, p in mods.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_point_from_higher_layers_to_lower_ones():
    assert violations() == []


def test_no_import_circle_between_modules():
    assert module_cycles() == []


def test_a_back_import_is_caught_lazy_or_not(tmp_path):
    """The check itself can fail: a copy of the package with one lazy back-import is flagged."""
    import shutil

    copy = tmp_path / "kard_ray"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "knowledge" / "text.py"
    target.write_text(target.read_text() + "\n\ndef _late():\n    from kard_ray.evaluation.evaluate import evaluate\n")
    found = violations(copy)
    assert len(found) == 1 and "kard_ray.knowledge.text (knowledge) imports kard_ray.evaluation.evaluate" in found[0]
    serve = copy / "serve" / "app.py"
    serve.write_text(serve.read_text() + "\n\ndef _late2():\n    import kard_ray.training.core\n")
    assert any("serve.app (serve) imports kard_ray.training.core" in v for v in violations(copy))
    # a circle inside one layer is caught too
    a, b = copy / "training" / "optim.py", copy / "training" / "progress.py"
    a.write_text(a.read_text() + "\n\ndef _c():\n    from kard_ray.training.progress import Progress\n")
    b.write_text(b.read_text() + "\n\ndef _d():\n    from kard_ray.training.optim import lr_lambda\n")
    assert ["kard_ray.training.optim", "kard_ray.training.progress"] in module_cycles(copy)


@pytest.mark.parametrize("unit", sorted({n for layer in LAYERS for n in layer}))
def test_every_layer_named_exists(unit):
    assert (PACKAGE / unit).is_dir() or (PACKAGE / f"{unit}.py").exists(), unit
