"""Layering: a module imports only modules on its own floor or lower ones (docs/architecture.md).

Every ``import`` in ``sharp_unlearn/**/*.py`` counts, at module top and inside functions alike: a
function-level import does not make an upward dependency go away, it only hides it from start-up.
A ``sharp_unlearn`` import inside a function is allowed only where start-up speed needs it (the CLI,
the API, the package itself, ``commands/``) or where it is marked ``lazy:`` with the reason (it would
import a heavy optional package such as ray where that must not be needed).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "sharp_unlearn"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

#: floors, lowest first; a module may import from its own floor and the floors before it
FLOORS = ("base", "components", "engine", "methods", "metrics", "evaluation", "recipes", "tools", "commands",
          "entry")

#: module or package -> floor; the longest matching name wins (docs/architecture.md has the same table)
MODULE_FLOORS = {
    # stdlib + torch helpers and the typed config every layer reads
    "sharp_unlearn.errors": "base",
    "sharp_unlearn.files": "base",
    "sharp_unlearn.registry": "base",
    "sharp_unlearn.config": "base",
    "sharp_unlearn.stats": "base",
    "sharp_unlearn.markdown": "base",
    "sharp_unlearn.losses": "base",
    "sharp_unlearn.progress": "base",
    "sharp_unlearn.results": "base",
    "sharp_unlearn.tracking": "base",
    "sharp_unlearn.model_store": "base",
    "sharp_unlearn.ray_cluster": "base",
    # building blocks that know nothing of training loops
    "sharp_unlearn.data": "components",
    "sharp_unlearn.models": "components",
    "sharp_unlearn.optim": "components",
    # training: loop, driver, checkpoints, DeepSpeed backend, gradient passes
    "sharp_unlearn.engine": "engine",
    "sharp_unlearn.stage_checkpoints": "engine",
    "sharp_unlearn.methods": "methods",
    # config checks that need the method registry (and data / model names)
    "sharp_unlearn.validation": "methods",
    "sharp_unlearn.metrics": "metrics",
    "sharp_unlearn.evaluation": "evaluation",
    "sharp_unlearn.recipes": "recipes",
    "sharp_unlearn.tuning": "tools",
    "sharp_unlearn.tune": "tools",
    "sharp_unlearn.report": "tools",
    "sharp_unlearn.reproduce": "tools",
    "sharp_unlearn.commands": "commands",
    "sharp_unlearn.cli": "entry",
    "sharp_unlearn.api": "entry",
    "sharp_unlearn.__main__": "entry",
    "sharp_unlearn": "entry",
}

#: (importer, imported) edges that still go upward. Being removed; must end empty. Delete an entry when
#: its import is gone (test_known_upward_imports_still_exist fails on a stale one); never add one.
KNOWN_UPWARD_IMPORTS: set[tuple[str, str]] = set()

#: files whose function-level package imports keep ``sharp-unlearn --help`` and ``import sharp_unlearn``
#: fast (they would pull torch, mlflow, ray at start-up); paths relative to the repository, a trailing
#: "/" is a folder
START_UP_PATHS = ("sharp_unlearn/cli.py", "sharp_unlearn/api.py", "sharp_unlearn/__init__.py",
                  "sharp_unlearn/commands/")

#: the comment marker that explains a function-level package import elsewhere
LAZY_MARKER = "lazy:"


@dataclass(frozen=True)
class UpwardImport:
    path: str
    line: int
    importer: str
    importer_floor: str
    imported: str
    imported_floor: str

    def __str__(self) -> str:
        return (f"{self.path}:{self.line}: {self.importer} (floor {self.importer_floor}) imports "
                f"{self.imported} (floor {self.imported_floor})")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor_of(module: str) -> str | None:
    """The floor of the longest name in MODULE_FLOORS that is ``module`` or a package holding it."""
    name = module
    while name:
        if name in MODULE_FLOORS:
            return MODULE_FLOORS[name]
        name = name.rpartition(".")[0]
    return None


def imported_modules(tree: ast.AST, importer: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a package module, anywhere in the file.

    ``from a.b import c`` names ``a.b.c`` when that is a module, else ``a.b`` (``c`` is an attribute).
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = importer.split(".") if is_package else importer.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else source))
    return [(line, name) for line, name in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def unmarked_function_imports(sources: dict[str, tuple[str, str, bool]]) -> list[str]:
    """``path:line: module`` for each package import inside a function outside START_UP_PATHS whose line
    (or the line above) has no LAZY_MARKER comment. ``sources``: module -> (path, code, is_package)."""
    known = set(sources)
    found = []
    for importer, (path, code, is_package) in sorted(sources.items()):
        if any(path == start or (start.endswith("/") and path.startswith(start)) for start in START_UP_PATHS):
            continue
        lines = code.splitlines()
        for function in ast.walk(ast.parse(code, path)):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for line, module in imported_modules(function, importer, is_package, known):
                above = lines[line - 2].strip() if line >= 2 else ""
                marked = LAZY_MARKER in lines[line - 1] or (above.startswith("#") and LAZY_MARKER in above)
                entry = f"{path}:{line}: {module}"
                if not marked and entry not in found:
                    found.append(entry)
    return found


def upward_imports(sources: dict[str, tuple[str, str, bool]]) -> list[UpwardImport]:
    """Imports from a lower floor to a higher one. ``sources``: module -> (path, code, is_package)."""
    known = set(sources)
    rank = {floor: i for i, floor in enumerate(FLOORS)}
    found = []
    for importer, (path, code, is_package) in sorted(sources.items()):
        importer_floor = floor_of(importer)
        for line, imported in imported_modules(ast.parse(code, path), importer, is_package, known):
            imported_floor = floor_of(imported)
            if importer_floor is None or imported_floor is None:
                continue  # test_every_module_has_a_floor names these
            if rank[imported_floor] > rank[importer_floor]:
                found.append(UpwardImport(path, line, importer, importer_floor, imported, imported_floor))
    return found


def package_sources() -> dict[str, tuple[str, str, bool]]:
    return {module_name(path, PACKAGE_DIR): (str(path.relative_to(PACKAGE_DIR.parent)), path.read_text(),
                                             path.name == "__init__.py")
            for path in sorted(PACKAGE_DIR.rglob("*.py"))}


@pytest.fixture(scope="module")
def violations() -> list[UpwardImport]:
    return upward_imports(package_sources())


def test_every_module_has_a_floor():
    unplaced = [module for module in package_sources() if floor_of(module) is None]
    assert not unplaced, f"give these modules a floor in MODULE_FLOORS and docs/architecture.md: {unplaced}"


def test_no_module_imports_a_higher_floor(violations):
    new = [v for v in violations if (v.importer, v.imported) not in KNOWN_UPWARD_IMPORTS]
    assert not new, "imports from a lower floor to a higher one:\n" + "\n".join(map(str, new))


def test_known_upward_imports_still_exist(violations):
    present = {(v.importer, v.imported) for v in violations}
    stale = sorted(KNOWN_UPWARD_IMPORTS - present)
    assert not stale, f"these imports are gone; delete them from KNOWN_UPWARD_IMPORTS: {stale}"


def test_the_checker_flags_an_upward_import_at_top_or_inside_a_function():
    sources = {
        "sharp_unlearn.data.fake": ("sharp_unlearn/data/fake.py",
                                    "from sharp_unlearn.errors import ConfigError\n"
                                    "import sharp_unlearn.engine.loop\n"
                                    "def f():\n"
                                    "    from sharp_unlearn.recipes import unlearn\n", False),
        "sharp_unlearn.engine.loop": ("sharp_unlearn/engine/loop.py", "from ..optim import sam\n", False),
        "sharp_unlearn.recipes.unlearn": ("sharp_unlearn/recipes/unlearn.py",
                                          "from . import mask\nfrom sharp_unlearn.engine import loop\n", False),
        "sharp_unlearn.recipes.mask": ("sharp_unlearn/recipes/mask.py", "", False),
        "sharp_unlearn.errors": ("sharp_unlearn/errors.py", "", False),
    }
    found = upward_imports(sources)
    assert [str(v) for v in found] == [
        "sharp_unlearn/data/fake.py:2: sharp_unlearn.data.fake (floor components) imports "
        "sharp_unlearn.engine.loop (floor engine)",
        "sharp_unlearn/data/fake.py:4: sharp_unlearn.data.fake (floor components) imports "
        "sharp_unlearn.recipes.unlearn (floor recipes)",
    ]


def test_relative_imports_resolve_to_the_module_they_name():
    tree = ast.parse("from . import mask\nfrom ..engine.loop import predict\nfrom .. import optim\n")
    known = {"sharp_unlearn.recipes.mask", "sharp_unlearn.engine.loop", "sharp_unlearn.optim"}
    assert imported_modules(tree, "sharp_unlearn.recipes.unlearn", False, known) == [
        (1, "sharp_unlearn.recipes.mask"), (2, "sharp_unlearn.engine.loop"), (3, "sharp_unlearn.optim")]


def test_no_unmarked_package_import_inside_a_function():
    found = unmarked_function_imports(package_sources())
    assert not found, ("package imports inside functions: move them to module top (a cycle means a module sits "
                       f"on the wrong floor), or mark them '# {LAZY_MARKER} <why>':\n" + "\n".join(found))


def test_the_checker_flags_an_unmarked_function_import_outside_start_up_paths():
    code = ("from sharp_unlearn.errors import ConfigError\n"           # 1: module top, fine
            "def f():\n"
            "    from sharp_unlearn.tracking import client_for\n"      # 3: flagged
            "    import ray\n"                                         # 4: not a package import
            "    from sharp_unlearn.results import SCHEMA  # lazy: pyarrow\n"
            "    # lazy: subclasses a ray class\n"
            "    from sharp_unlearn.tuning.callback import TrialRuns\n"
            "    # unrelated comment\n"
            "    from .spec import SweepSpec\n")                       # 9: relative, flagged
    sources = {
        "sharp_unlearn.tuning.fake": ("sharp_unlearn/tuning/fake.py", code, False),
        "sharp_unlearn.commands.fake": ("sharp_unlearn/commands/fake.py", code, False),
        "sharp_unlearn.cli": ("sharp_unlearn/cli.py", code, False),
        "sharp_unlearn.tuning.spec": ("sharp_unlearn/tuning/spec.py", "", False),
    }
    assert unmarked_function_imports(sources) == [
        "sharp_unlearn/tuning/fake.py:3: sharp_unlearn.tracking",
        "sharp_unlearn/tuning/fake.py:9: sharp_unlearn.tuning.spec",
    ]
