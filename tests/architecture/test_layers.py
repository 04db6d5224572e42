"""The stage layers of ARCHITECTURE.md hold (lint-imports), and the check fails on an upward import."""
from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
LINT = shutil.which("lint-imports") or str(pathlib.Path(sys.executable).with_name("lint-imports"))
needs_linter = pytest.mark.skipif(not pathlib.Path(LINT).exists(), reason="import-linter not installed (dev extra)")


def _lint(cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


@needs_linter
def test_contracts_are_kept():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "3 kept, 0 broken" in result.stdout


@needs_linter
def test_an_upward_import_breaks_the_layers(tmp_path):
    for name in ("surgery", "triton_kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    towers = tmp_path / "surgery" / "model" / "towers.py"
    towers.write_text(towers.read_text() + "\nfrom surgery.edit.plan import SurgeryPlan  # upward: L2 -> L4\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "surgery.model is not allowed to import surgery.edit" in result.stdout


def _imports_in_functions(path: pathlib.Path) -> list[str]:
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.ImportFrom) and (child.module or "").startswith("surgery"):
                found.append(f"{path.relative_to(ROOT)}:{child.lineno} {child.module}")
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), False)
    return found


def test_no_library_import_inside_a_function():
    """Imports inside functions are for optional heavy dependencies (onnx, onnxruntime, triton) only."""
    found = [hit for path in sorted((ROOT / "surgery").rglob("*.py")) for hit in _imports_in_functions(path)]
    assert found == []


def test_no_private_name_imported_from_another_package():
    bad = []
    for path in sorted((ROOT / "surgery").rglob("*.py")):
        package = path.relative_to(ROOT / "surgery").parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("surgery."):
                other = node.module.split(".")[1]
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and other != package]
    assert bad == []
