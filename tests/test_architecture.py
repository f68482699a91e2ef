"""The package's dependencies point one way: library (text, zeroshot, models, data, losses, metrics,
evaluation) below the Lightning system, the system below the command-line apps; test fixtures apart from both.

Every ``import dbtr.x`` / ``from dbtr.x import`` in the source (top level or inside functions) is checked
against the layer table, so a new upward edge or cycle fails here instead of growing silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "dbtr"

# What each part of the package may import (besides itself). Lower layers never name higher ones.
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "text": {"utils"},
    "zeroshot": {"text", "utils"},
    "losses": {"utils"},
    "metrics": {"utils"},
    "evaluation": {"metrics", "utils"},
    "models": {"zeroshot", "text", "utils"},
    "data": {"text", "utils"},
    "testing": {"models", "text", "utils"},
    "system": {"models", "zeroshot", "text", "data", "losses", "metrics", "evaluation", "utils"},
    "cli": {"system", "models", "zeroshot", "text", "data", "losses", "metrics", "evaluation", "utils"},
    "toyworld": {"cli", "system", "models", "zeroshot", "text", "data", "metrics", "testing", "utils"},
}
LIBRARY = ("utils", "text", "zeroshot", "losses", "metrics", "evaluation", "models", "data")


def part(module: str) -> str | None:
    """``dbtr.data.labels`` -> ``data``; ``dbtr.metrics`` -> ``metrics``; the package itself -> None."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 and pieces[0] == "dbtr" else None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dbtr.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dbtr."):
            found.add(node.module)
    return found


def edges() -> list[tuple[str, str]]:
    return sorted((module_name(p), dep) for p in ROOT.rglob("*.py") for dep in imports(p))


def violations(pairs) -> list[str]:
    bad = []
    for src, dep in pairs:
        a, b = part(src), part(dep)
        if a is None or b is None or a == b:
            continue
        if b not in ALLOWED.get(a, set()):
            bad.append(f"{src} imports {dep} ({a} -> {b} is not allowed)")
    return bad


def test_every_part_is_in_the_layer_table():
    parts = {part(module_name(p)) for p in ROOT.rglob("*.py")} - {None}
    assert parts <= set(ALLOWED), f"add {sorted(parts - set(ALLOWED))} to ALLOWED"


def test_dependencies_point_one_way():
    assert violations(edges()) == []


def test_base_datamodule_does_not_import_its_subclass_package():
    assert not [d for s, d in edges() if s == "dbtr.data.datamodule" and d.startswith("dbtr.data.benchmarks")]


@pytest.mark.parametrize("library", LIBRARY)
def test_library_does_not_import_lightning_apps(library):
    assert not [
        d for s, d in edges() if part(s) == library and part(d) in ("system", "cli", "toyworld", "testing")
    ]


def test_checker_reports_an_upward_edge():
    assert violations([("dbtr.data.labels", "dbtr.zeroshot.classifier")]) == [
        "dbtr.data.labels imports dbtr.zeroshot.classifier (data -> zeroshot is not allowed)"
    ]
    assert violations([("dbtr.text.synonyms", "dbtr.data.labels")])  # the old data <-> text cycle
