"""The code's shape: packages import only downwards along the data flow, and one module connects to Ray."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# lowest first; a package may import its own layer and any layer below it (docs/architecture.md)
LAYERS = [
    {"__init__", "storage", "errors", "auth", "session", "splits", "calibration", "artefacts", "config"},
    {"audio"},
    {"report"},  # plots and HTML from artefacts: imports no other ser-ray package
    {"corpora"},
    {"features"},
    {"models"},
    {"train"},
    {"tune"},
    {"ensemble"},
    {"annotate"},
    {"serve"},
    {"pipeline", "demo", "cli"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ser_ray":
            parts = node.module.split(".")
            if len(parts) > 1:
                yield parts[1], node.lineno
            else:  # from ser_ray import storage
                yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "ser_ray" and len(parts) > 1:
                    yield parts[1], node.lineno


def test_packages_import_only_downwards():
    wrong = []
    for path in sorted((REPO / "ser_ray").rglob("*.py")):
        package = path.relative_to(REPO / "ser_ray").parts[0].removesuffix(".py")
        assert package in LAYER, f"{package} has no layer in LAYERS"
        for target, line in _imports(path):
            target = target if target in LAYER else "__init__"  # ser_ray.__version__
            if LAYER[target] > LAYER[package]:
                wrong.append(f"{path.relative_to(REPO)}:{line} ({package}) imports {target}")
    assert not wrong, "imports running back up the layers:\n" + "\n".join(wrong)


def test_only_the_session_helper_calls_ray_init():
    calls = []
    for path in sorted([*(REPO / "ser_ray").rglob("*.py"), *(REPO / "jobs").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"):
                calls.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert calls and all(c.startswith("ser_ray/session.py:") for c in calls), calls
