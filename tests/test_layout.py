"""The shape rules that keep a new method to one package (docs/architecture.md, docs/extending.md): no method is
named or imported outside its own package, and no module imports itself in a circle. The layering itself is the
import-linter contract in pyproject.toml (`lint-imports`, run by scripts/test.sh)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from fedtune.algorithms import available, method

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fedtune"
sys.path.insert(0, str(ROOT / "scripts"))
from import_graph import cycles


def _package_of(name: str) -> Path:
    return Path(sys.modules[method(name).__module__].__file__).parent


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string constant that is not a docstring or a comment."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


@pytest.mark.parametrize("name", available())
def test_no_method_is_named_outside_its_package(name):
    """Nothing branches on a method's name: its name appears as a string (a key, a comparison, a default) only in
    its own package. Prose (docstrings) may mention it."""
    own = _package_of(name)
    found = [f"{p.relative_to(ROOT)}:{line}" for p in sorted(PKG.rglob("*.py")) if own not in p.parents
             for line, value in _string_constants(p) if value == name]
    assert not found, f"{name!r} named outside {own.relative_to(ROOT)}: {found}"


def _graph():
    import grimp

    return grimp.build_graph("fedtune", exclude_type_checking_imports=True)


def test_only_method_packages_import_a_method_package():
    """The registry finds the methods (it imports them by discovery, not by name); everything else asks it. A method
    may build on another (FedProx is FedAvg's server and client plus a term), so method packages are exempt."""
    graph = _graph()
    packages = {n: method(n).__module__.rsplit(".", 1)[0] for n in available()}
    pkgs = set(packages.values())
    bad = []
    for name, pkg in packages.items():
        for importer in sorted(graph.find_upstream_modules(pkg, as_package=True)):
            if not any(importer == p or importer.startswith(p + ".") for p in pkgs):
                direct = graph.find_modules_that_directly_import(pkg) | {
                    m for d in graph.find_descendants(pkg) for m in graph.find_modules_that_directly_import(d)}
                if importer in direct:
                    bad.append(f"{importer} imports {pkg} ({name})")
    assert not bad, bad


def test_no_import_cycles():
    assert cycles(_graph()) == []
