"""Architecture rules of DESIGN.md, checked on the source of ``handlers/`` with ``ast``.

- Only ``handlers/handler.py`` may import TorchServe (``ts``).
- ``handlers`` never imports ``export``, ``demo``, ``evaluation`` or ``benchmarks``.
- Imports inside the package are relative: archives ship it under another name (``lafam_runtime``).
- No ``print``; logging only.
- Pillow's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) is never changed.
- Explanation methods are named only in their own files (``handlers/methods/``): nothing else compares a
  method or base name (no ``method == "gradcam"``, no ``startswith("distribution")``), in ``handlers`` or
  in ``evaluation``; everything else reads the registry's declarations.
- The method modules sit below options, service, encoder and handler: they import none of them at run time.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "handlers"
SOURCES = sorted(PACKAGE.rglob("*.py"))
FORBIDDEN_PACKAGES = ("export", "demo", "evaluation", "benchmarks")
METHODS_PACKAGE = PACKAGE / "methods"
ABOVE_METHODS = ("options", "service", "encode", "handler")
"""Modules of ``handlers`` that read the registry; a method module importing one would invert the layers."""
NAMING_SOURCES = sorted(
    [p for p in SOURCES if METHODS_PACKAGE not in p.parents] + list((ROOT / "evaluation").rglob("*.py"))
)


@dataclass(frozen=True)
class Import:
    module: str  # absolute name, or the dotted tail of a relative import
    level: int  # 0 for absolute imports
    line: int


def relative_name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def imports(tree: ast.AST) -> list[Import]:
    found = []
    for node in ast.walk(tree):  # also imports deferred inside functions
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, 0, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append(Import(node.module or "", node.level, node.lineno))
    return found


def top(module: str) -> str:
    return module.split(".", maxsplit=1)[0]


def prints(tree: ast.AST) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]


def pixel_guard_changes(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "setattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value == "MAX_IMAGE_PIXELS"
        ):
            lines.append(node.lineno)
        lines.extend(
            target.lineno
            for target in targets
            for sub in ast.walk(target)
            if isinstance(sub, ast.Attribute) and sub.attr == "MAX_IMAGE_PIXELS"
        )
    return lines


def method_name_tests(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines that compare something with a method or base name, or test ``.startswith(<such a name>)``."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for operand in operands:
                elements = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                if any(isinstance(e, ast.Constant) and e.value in names for e in elements):
                    lines.append(node.lineno)
                    break
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("startswith", "endswith")
            and any(
                isinstance(a, ast.Constant) and isinstance(a.value, str) and any(n.startswith(a.value) for n in names)
                for a in node.args
            )
        ):
            lines.append(node.lineno)
    return lines


def runtime_imports(tree: ast.Module) -> list[Import]:
    """The imports of a module, leaving out those under ``if TYPE_CHECKING:``; ``from .. import x`` is ``x``."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.ImportFrom) and not sub.module:
                found.extend(Import(alias.name, sub.level, sub.lineno) for alias in sub.names)
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                found.extend(imports(sub))
    return found


def parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@pytest.fixture(params=SOURCES, ids=relative_name)
def source(request: pytest.FixtureRequest) -> tuple[Path, ast.AST]:
    return request.param, parse(request.param)


def test_the_package_is_found() -> None:
    names = {relative_name(path) for path in SOURCES}
    assert {"handlers/handler.py", "handlers/images.py", "handlers/explain/lafam.py"} <= names


@pytest.mark.parametrize("path", [p for p in SOURCES if p != PACKAGE / "handler.py"], ids=relative_name)
def test_only_the_handler_imports_torchserve(path: Path) -> None:
    offending = [i.line for i in imports(parse(path)) if i.level == 0 and top(i.module) == "ts"]
    assert not offending, f"{relative_name(path)} imports ts at line(s) {offending}"


def test_no_build_time_or_tooling_imports(source: tuple[Path, ast.AST]) -> None:
    path, tree = source
    offending = [(i.module, i.line) for i in imports(tree) if i.level == 0 and top(i.module) in FORBIDDEN_PACKAGES]
    assert not offending, f"{relative_name(path)} imports {offending}"


def test_intra_package_imports_are_relative(source: tuple[Path, ast.AST]) -> None:
    path, tree = source
    offending = [(i.module, i.line) for i in imports(tree) if i.level == 0 and top(i.module) == "handlers"]
    assert not offending, f"{relative_name(path)} imports the package by name: {offending}"


def test_relative_imports_stay_inside_the_package(source: tuple[Path, ast.AST]) -> None:
    path, tree = source
    # handlers/x.py and handlers/__init__.py: "." is handlers; handlers/explain/x.py: ".." is handlers
    depth = len(path.relative_to(PACKAGE).parts)
    offending = [(i.module, i.level, i.line) for i in imports(tree) if i.level > depth]
    assert not offending, f"{relative_name(path)} reaches outside handlers/: {offending}"


def test_no_print(source: tuple[Path, ast.AST]) -> None:
    path, tree = source
    assert not prints(tree), f"{relative_name(path)} calls print at line(s) {prints(tree)}"


def test_pillow_bomb_guard_is_never_changed(source: tuple[Path, ast.AST]) -> None:
    path, tree = source
    lines = pixel_guard_changes(tree)
    assert not lines, f"{relative_name(path)} changes Image.MAX_IMAGE_PIXELS at line(s) {lines}"


@pytest.mark.parametrize("path", NAMING_SOURCES, ids=relative_name)
def test_methods_are_named_only_in_their_own_files(path: Path) -> None:
    from handlers.methods import registry

    names = {*registry.names(), *registry.bases()}
    lines = method_name_tests(parse(path), names)
    assert not lines, f"{relative_name(path)} compares method names at line(s) {lines}: read the registry instead"


@pytest.mark.parametrize("path", sorted(METHODS_PACKAGE.glob("*.py")), ids=relative_name)
def test_method_modules_import_nothing_above_them(path: Path) -> None:
    tree = parse(path)
    assert isinstance(tree, ast.Module)
    offending = [(i.module, i.line) for i in runtime_imports(tree) if i.level == 2 and top(i.module) in ABOVE_METHODS]
    assert not offending, f"{relative_name(path)} imports {offending} at run time (use TYPE_CHECKING)"


# the checks themselves catch what they are meant to


def test_checks_detect_violations() -> None:
    tree = ast.parse(
        "import ts.context\n"
        "from handlers.images import decode\n"
        "from export import cli\n"
        "def f():\n"
        "    import scenes.synthetic\n"
        "    print('x')\n"
        "    Image.MAX_IMAGE_PIXELS = None\n"
        "    PIL.Image.MAX_IMAGE_PIXELS += 1\n"
        "    setattr(Image, 'MAX_IMAGE_PIXELS', None)\n"
        "from . import metrics\n"
    )
    found = imports(tree)
    assert [(i.module, i.level) for i in found] == [
        ("ts.context", 0),
        ("handlers.images", 0),
        ("export", 0),
        ("", 1),
        ("scenes.synthetic", 0),
    ]
    assert prints(tree) == [6]
    assert sorted(pixel_guard_changes(tree)) == [7, 8, 9]
    assert pixel_guard_changes(ast.parse("limit = Image.MAX_IMAGE_PIXELS")) == []
    assert prints(ast.parse("logger.info('x'); self.print('y')")) == []
    names = {"lrp", "distribution", "lafam"}
    assert method_name_tests(
        ast.parse(
            "if options.method == 'lrp': pass\n"
            "ok = method.startswith('distribution')\n"
            "x = name in ('lafam', 'other')\n"
            "y = {'lrp': 1}\n"
            "z = a == 'lrpx'\n"
        ),
        names,
    ) == [1, 2, 3]
    guarded = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from ..options import X\n"
        "from .. import options\n"
        "from ..service import Y\n"
    )
    assert [(i.module, i.level) for i in runtime_imports(guarded)] == [("typing", 0), ("options", 2), ("service", 2)]
