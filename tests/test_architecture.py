"""The shape of the code, checked: the import contracts of pyproject.toml (layers, forbidden imports, no
cycles; import-linter), small modules and functions, a test file for every module, one vocabulary."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from distlap import names

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [p for folder in ("distlap", "analysis") for p in sorted((ROOT / folder).rglob("*.py"))]
MAX_FUNCTION_LINES = 40  # body lines, docstring not counted
MAX_MODULE_LINES = 400


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of a module, its classes and functions."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _strings(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string constant that is neither a docstring nor an argument of a call into
    ``distlap.names`` (``names.score("map", "test", "ece")`` builds a key from the vocabulary's parts)."""
    tree = _tree(path)
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        func = node.func if isinstance(node, ast.Call) else None
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "names":
            skip |= {id(arg) for arg in node.args}
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip
    ]


def test_import_contracts_hold():
    """Layers analysis > sweep > trial > finetune | bayes > floor; only the sweep wing imports Ray,
    Optuna or MLflow; no cycles (pyproject.toml, [tool.importlinter])."""
    # In a process of its own: import-linter configures logging with dictConfig, which disables every
    # logger that exists by then (Ray Tune's among them), so a later test reading their records saw none.
    lint = "from importlinter.cli import lint_imports; raise SystemExit(lint_imports('pyproject.toml'))"
    result = subprocess.run([sys.executable, "-c", lint], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_every_module_has_its_place_in_the_layers():
    """A new top-level module or wing must be placed in the layers contract, or nothing checks it."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    placed = {m.strip() for layer in layers for m in layer.replace("|", ":").split(":")}
    modules = {f"distlap.{p.stem}" for p in (ROOT / "distlap").glob("*.py") if p.name != "__init__.py"}
    wings = {f"distlap.{p.parent.name}" for p in (ROOT / "distlap").glob("*/__init__.py")}
    assert modules | wings <= placed, sorted((modules | wings) - placed)


def test_functions_and_modules_are_small():
    long = []
    for path in LIBRARY:
        tree = _tree(path)
        docstrings = _docstrings(tree)
        if len(path.read_text().splitlines()) > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(ROOT)}: module over {MAX_MODULE_LINES} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                first = node.body[0]
                if isinstance(first, ast.Expr) and id(first.value) in docstrings:
                    lines -= first.end_lineno - first.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "split these:\n" + "\n".join(long)


def test_every_library_module_has_its_test_file():
    """distlap/x/y.py is tested in tests/x/test_y.py, distlap/y.py in tests/test_y.py."""
    missing = []
    for path in (ROOT / "distlap").rglob("*.py"):
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(ROOT / "distlap")
        expected = ROOT / "tests" / rel.parent / f"test_{rel.name}"
        if not expected.is_file():
            missing.append(f"{path.relative_to(ROOT)} -> {expected.relative_to(ROOT)}")
    assert not missing, "no test file for:\n" + "\n".join(missing)


def test_the_library_reads_nothing_from_sweeps_by_path():
    """The sweep scripts pass their own config paths; distlap never builds a path into sweeps/."""
    found = [
        f"{path.relative_to(ROOT)}:{line} {value!r}"
        for path in (ROOT / "distlap").rglob("*.py")
        for line, value in _strings(path)
        if value.strip("/") in ("sweeps", "configs", "sweeps/configs")
    ]
    assert not found, found


@pytest.mark.parametrize("path", sorted((ROOT / "analysis").glob("*.py")), ids=lambda p: p.name)
def test_analysis_spells_no_key_itself(path):
    """Every metric, parameter, tag and column key in analysis/ comes from distlap.names."""

    def is_key(value: str) -> bool:
        try:
            names.describe(value)
        except KeyError:
            return False
        return True

    spelled = [f"{line}: {value!r}" for line, value in _strings(path) if is_key(value)]
    assert not spelled, f"use distlap.names instead of: {spelled}"


def test_sqlite_urls_are_built_and_parsed_in_one_place():
    """``sqlite:///`` URLs are made by ``settings.sqlite_url`` and read by ``settings.sqlite_path``; a
    second parser drifts (a relative path, a moved folder) without anyone noticing."""
    home = ROOT / "distlap" / "sweep" / "settings.py"
    found = [
        f"{path.relative_to(ROOT)}:{line} {value!r}"
        for path in LIBRARY
        if path != home
        for line, value in _strings(path)
        if value.startswith("sqlite:///")
    ]
    assert not found, f"use distlap.sweep.settings.sqlite_url / sqlite_path instead: {found}"


def test_ray_internals_are_reached_only_through_ray_compat():
    """``ray._private`` and Tune's ``Trial.should_recover`` are no public API: one module holds them,
    and tests/sweep/test_ray_compat.py checks them against the installed Ray."""
    home = ROOT / "distlap" / "sweep" / "ray_compat.py"
    found = []
    for path in LIBRARY:
        if path == home:
            continue
        for node in ast.walk(_tree(path)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            modules += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            private = [m for m in modules if m == "ray._private" or m.startswith("ray._private.")]
            if private or (isinstance(node, ast.Attribute) and node.attr == "should_recover"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {private or 'should_recover'}")
    assert not found, f"go through distlap.sweep.ray_compat: {found}"


def test_the_readme_is_a_guide_and_every_link_in_the_docs_resolves():
    """README.md stays a short guide (reference lives in docs/); a relative link or image in it or in
    docs/*.md that points at no file is a stale page."""
    import re

    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#", 1)[0]
            if path and "://" not in path and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
