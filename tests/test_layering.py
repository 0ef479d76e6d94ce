"""The house reads top to bottom: every import of the project's own code goes to a lower layer
(or stays in its package), so there are no cycles and the library never imports the
orchestration. Read from the source, lazy imports inside functions included."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Higher imports lower. The recipes' schema at the bottom, then the library's services; flows/
# orchestrates the library; the command line sits on top of everything.
LAYERS = {
    "config": 0,
    "storage": 1,
    "tracking": 2, "launch": 2,
    "data": 3, "model": 3, "synthetic": 3,
    "eval": 4,
    "train": 5,
    "plan": 6,
    "flows": 7,
    "cli": 8,
}


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "flows":
        return "flows"
    return parts[1] if parts[0] == "avsiam" and len(parts) > 1 else None


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def test_every_package_has_a_layer():
    packages = {p.name for p in (ROOT / "avsiam").iterdir() if (p / "__init__.py").exists()} | {"flows"}
    assert packages == set(LAYERS)


def test_imports_only_go_down_the_layers():
    upward = []
    for path in sorted([*(ROOT / "avsiam").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]):
        rel = path.relative_to(ROOT)
        source = _package(".".join(rel.with_suffix("").parts))
        if source is None:  # avsiam/__init__.py
            continue
        for line, module in _imports(path):
            target = _package(module)
            if target and target != source and LAYERS[target] >= LAYERS[source]:
                upward.append(f"{rel}:{line}: {source} (layer {LAYERS[source]}) imports {module} (layer {LAYERS[target]})")
    assert not upward, "\n".join(upward)
