"""The house's floors, read from the source (an AST walk; no process, no import).

* module path = file path: every import of a project module names a file or package that exists
  from the repository root (``actors.router.pd`` is ``actors/router/pd.py``);
* ``native/`` never imports ``actors/``;
* ``pdbus/`` (the bus and the CLI) imports ``actors/`` or ``native/`` only lazily, inside the
  function that starts them, never at module level;
* no production module imports the test harness (``pdbus.testing``, ``tests``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pdbus", "actors", "native")


def production_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def imports(path: Path):
    """(module name, line, at module level) for every absolute import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    module_level: set[int] = set()

    def mark(body):
        for node in body:
            module_level.add(id(node))
            if isinstance(node, (ast.If, ast.Try)) and not _is_type_checking(node):
                for part in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                    mark(part)
                for h in getattr(node, "handlers", []):
                    mark(h.body)

    mark(tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                yield _resolve_relative(path, node), node.lineno, id(node) in module_level
            elif node.module:
                yield node.module, node.lineno, id(node) in module_level
                for alias in node.names:  # `from actors import rank` names actors/rank.py
                    yield f"{node.module}.{alias.name}?", node.lineno, id(node) in module_level
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in module_level


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _resolve_relative(path: Path, node: ast.ImportFrom) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)[: -node.level]
    return ".".join(parts + ([node.module] if node.module else []))


def exists(module: str) -> bool:
    optional = module.endswith("?")  # a name imported from a module may be an attribute, not a file
    p = ROOT.joinpath(*module.rstrip("?").split("."))
    found = p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()
    return found or optional


def project_imports():
    for path in production_files() + sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "bench").glob("*.py")):
        for module, line, top in imports(path):
            if module.split(".")[0] in PACKAGES:
                yield path.relative_to(ROOT), module, line, top


def test_every_project_import_names_a_path_that_exists():
    missing = [f"{p}:{line} imports {m}" for p, m, line, _ in project_imports() if not exists(m)]
    assert not missing, "imports with no such file from the repository root:\n" + "\n".join(missing)


def test_native_never_imports_actors():
    bad = [f"{p}:{line} imports {m}" for p, m, line, _ in project_imports() if p.parts[0] == "native" and m.startswith("actors")]
    assert not bad, "\n".join(bad)


def test_the_bus_imports_actors_and_native_only_lazily():
    bad = [
        f"{p}:{line} imports {m} at module level"
        for p, m, line, top in project_imports()
        if p.parts[0] == "pdbus" and top and m.split(".")[0] in ("actors", "native")
    ]
    assert not bad, "\n".join(bad)


def test_production_never_imports_the_test_harness():
    bad = [
        f"{p}:{line} imports {m}"
        for p, m, line, _ in project_imports()
        if p.parts[0] in PACKAGES and p != Path("pdbus/testing.py") and (m.startswith("pdbus.testing") or m.startswith("tests"))
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", ["setup.cfg", "pdbus", "actors", "native", "conf", "tests", "run.sh"])
def test_the_top_level_is_the_users_layout(name):
    assert (ROOT / name).exists()


def test_no_package_dir_mapping():
    assert "package_dir" not in (ROOT / "setup.cfg").read_text()
