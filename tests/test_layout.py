"""The library's layering (docs/architecture.md): each stage imports only the stages below it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Bottom-up, as in redseg/__init__.py; the top-level modules (config, fileio, cli) may be used by all.
STAGES = ["toolchain", "data", "model", "evaluation", "deploy", "training", "experiments"]
TOP = {"config", "fileio", "cli"}
# What each stage may import (docs/architecture.md): only stages above it, and data and evaluation
# not even Caffe's toolchain, so that data can be prepared and any method's maps scored without Caffe.
MAY_IMPORT = {
    "toolchain": set(),
    "data": set(),
    "model": {"toolchain"},
    "evaluation": {"data"},
    "deploy": {"toolchain", "data", "evaluation"},
    "training": {"toolchain", "data", "model", "evaluation", "deploy"},
    "experiments": set(STAGES) - {"experiments"},
}


def _redseg_imports(path: Path) -> set[str]:
    """Every ``redseg.<x>`` a module imports, at any depth of the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "redseg":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("redseg.")}
    return found


def test_the_rules_only_point_upward():
    for stage, allowed in MAY_IMPORT.items():
        assert all(STAGES.index(a) < STAGES.index(stage) for a in allowed), stage


def test_the_package_is_laid_out_by_stage():
    subpackages = sorted(p.name for p in (REPO / "redseg").iterdir() if (p / "__init__.py").is_file())
    assert subpackages == sorted(STAGES)
    top = sorted(p.stem for p in (REPO / "redseg").glob("*.py") if p.stem != "__init__")
    assert top == sorted(TOP), "a new module belongs in the stage that uses it (docs/architecture.md)"
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((REPO / "redseg" / stage / "__init__.py").read_text()))
        assert doc and "import" in doc, f"redseg/{stage}/__init__.py must say what the stage may import"


def test_no_stage_imports_a_stage_above_it():
    upward = []
    for path in sorted((REPO / "redseg").rglob("*.py")):
        rel = path.relative_to(REPO / "redseg").parts
        if len(rel) == 1:  # a top-level module: may import only other top-level modules
            allowed = TOP
        else:
            allowed = TOP | MAY_IMPORT[rel[0]] | {rel[0]}
        upward += [f"{path.relative_to(REPO)} imports redseg.{m}" for m in _redseg_imports(path) - allowed]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The check above would catch a lazy upward import inside a function."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from redseg.experiments.reproduce import plan\n    from redseg import config\n")
    assert _redseg_imports(bad) == {"experiments", "config"}
