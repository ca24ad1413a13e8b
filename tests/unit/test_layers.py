"""The import layers of the project, checked on the source with ``ast`` (nothing is imported).

From the bottom; a package may import the packages named on its line, and itself:

- ``handlers`` (what runs in a TorchServe worker) and ``scenes`` (synthetic scenes, overlays): nothing.
- ``export`` (export, verification, archiving): ``handlers``.
- ``engines`` (the KServe and Ray engines and their shared HTTP contract): ``handlers``.
- ``serving`` (TorchServe processes): nothing.
- ``evaluation`` and ``demo``: the layers below (``handlers``, ``scenes``, ``export``, ``engines``, ``serving``);
  not each other.
- ``cli`` (the ``lafam-serve`` command): all of the above.
- ``benchmarks``: all of the above and ``cli``.
- ``tests``: anything; nothing imports ``tests``.

Imports deferred inside functions count too. Every top-level package must have a place here.

The demo's eager factories (``demo.model:shapes_cnn``, ``demo.vit:shapes_vit``) are archived with their
top-level package alone as code (``eager_code/demo/``), so what they import when loaded stays inside ``demo``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOWER = ("handlers", "scenes", "export", "engines", "serving")
ALLOWED: dict[str, frozenset[str]] = {
    "handlers": frozenset(),
    "scenes": frozenset(),
    "export": frozenset({"handlers"}),
    "engines": frozenset({"handlers"}),
    "serving": frozenset(),
    "evaluation": frozenset(LOWER),
    "demo": frozenset(LOWER),
    "cli": frozenset({*LOWER, "evaluation", "demo"}),
    "benchmarks": frozenset({*LOWER, "evaluation", "demo", "cli"}),
}
"""What each package may import besides itself."""
PROJECT = frozenset({*ALLOWED, "tests"})
SOURCES = sorted(path for package in ALLOWED for path in (ROOT / package).rglob("*.py"))
EAGER_FACTORIES = (ROOT / "demo" / "model.py", ROOT / "demo" / "vit.py")
"""The demo modules archives import in a TorchServe worker (with only ``eager_code/demo/`` on the path)."""


@dataclass(frozen=True)
class Arrow:
    source: str  # the importing package
    target: str  # the imported module's absolute name
    line: int

    def __str__(self) -> str:
        return f"line {self.line}: {self.source} -> {self.target}"


def relative_name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_parts(path: Path, root: Path = ROOT) -> list[str]:
    """``["demo", "model"]`` for demo/model.py, ``["demo"]`` for demo/__init__.py."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def absolute(node: ast.ImportFrom, path: Path, root: Path = ROOT) -> list[str]:
    """The absolute names a ``from`` import reads; a relative one is resolved against ``path``'s package."""
    if node.level == 0:
        return [node.module or ""]
    parts = module_parts(path, root)
    package = parts if path.name == "__init__.py" else parts[:-1]
    names = [node.module] if node.module else [alias.name for alias in node.names]
    if node.level - 1 >= len(package):
        return [f"{'.' * node.level}{name} (outside the project's packages)" for name in names]
    base = package[: len(package) - (node.level - 1)]
    return [".".join([*base, name]) for name in names]


def import_nodes(tree: ast.AST, *, load_time_only: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, deferred ones (in function bodies) too unless ``load_time_only``."""
    found = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if load_time_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return sorted(found, key=lambda node: (node.lineno, node.col_offset))


def names_of(node: ast.Import | ast.ImportFrom, path: Path, root: Path = ROOT) -> list[str]:
    """The absolute module names one import statement reads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return absolute(node, path, root)


def imported(tree: ast.AST, path: Path, *, load_time_only: bool = False, root: Path = ROOT) -> list[tuple[str, int]]:
    """``(absolute module name, line)`` of every import, deferred ones too unless ``load_time_only``."""
    return [
        (name, node.lineno)
        for node in import_nodes(tree, load_time_only=load_time_only)
        for name in names_of(node, path, root)
    ]


def top(module: str) -> str:
    return module.split(".", maxsplit=1)[0]


def forbidden_arrows(tree: ast.AST, path: Path) -> list[Arrow]:
    source = module_parts(path)[0]
    arrows = []
    for module, line in imported(tree, path):
        target = top(module)
        if module.startswith(".") or (target in PROJECT and target != source and target not in ALLOWED[source]):
            arrows.append(Arrow(source, module, line))
    return arrows


def parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The source file of a project module, if there is one."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def load_time_closure(start: Path, package: str, root: Path = ROOT) -> tuple[list[Path], list[tuple[Path, str, int]]]:
    """The files of ``package`` that loading ``start`` imports, and their imports of other project packages."""
    seen: list[Path] = []
    outside: list[tuple[Path, str, int]] = []
    pending = [start, root / package / "__init__.py"]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.append(path)
        for node in import_nodes(parse(path), load_time_only=True):
            for module in names_of(node, path, root):
                if top(module) != package:
                    if top(module) in PROJECT or module.startswith("."):
                        outside.append((path, module, node.lineno))
                    continue
                # importing a.b runs a/__init__.py first; "from a import b" may import the submodule a.b
                candidates = _parents_and_self(module)
                if isinstance(node, ast.ImportFrom):
                    candidates += [f"{module}.{alias.name}" for alias in node.names]
                pending.extend(file for name in candidates if (file := module_file(name, root)) is not None)
    return seen, outside


def _parents_and_self(module: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def test_every_package_has_a_layer() -> None:
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert packages == set(PROJECT), f"give these packages a layer in ALLOWED: {sorted(packages - PROJECT)}"
    assert {"cli/main.py", "serving/torchserve.py", "scenes/synthetic.py", "export/archive.py"} <= {
        relative_name(path) for path in SOURCES
    }


@pytest.mark.parametrize("path", SOURCES, ids=relative_name)
def test_no_import_runs_up_or_across_the_layers(path: Path) -> None:
    arrows = forbidden_arrows(parse(path), path)
    allowed = sorted(ALLOWED[module_parts(path)[0]])
    assert not arrows, f"{relative_name(path)} imports above its layer (allowed: {allowed}): " + "; ".join(
        map(str, arrows)
    )


@pytest.mark.parametrize("path", EAGER_FACTORIES, ids=relative_name)
def test_archived_demo_code_imports_only_demo(path: Path) -> None:
    seen, outside = load_time_closure(path, "demo")
    assert path in seen
    found = "; ".join(f"{relative_name(where)}:{line} imports {module}" for where, module, line in outside)
    assert not outside, f"archives ship only demo/ as the eager code of {relative_name(path)}, but {found}"


# the checks themselves catch what they are meant to


def test_checks_detect_violations() -> None:
    source = (
        "import numpy\n"
        "from handlers.manifest import Manifest\n"
        "from . import archive\n"
        "def build():\n"
        "    from demo.run import WEIGHTS\n"
        "    import evaluation.data, scenes\n"
        "from .models import resolve_model\n"
        "from ... import far\n"
    )
    path = ROOT / "export" / "example.py"  # never written: only its place in the tree matters
    tree = ast.parse(source)
    assert imported(tree, path) == [
        ("numpy", 1),
        ("handlers.manifest", 2),
        ("export.archive", 3),
        ("demo.run", 5),
        ("evaluation.data", 6),
        ("scenes", 6),
        ("export.models", 7),
        ("...far (outside the project's packages)", 8),
    ]
    assert [str(arrow) for arrow in forbidden_arrows(tree, path)] == [
        "line 5: export -> demo.run",
        "line 6: export -> evaluation.data",
        "line 6: export -> scenes",
        "line 8: export -> ...far (outside the project's packages)",
    ]
    assert imported(tree, path, load_time_only=True)[-2:] == [
        ("export.models", 7),
        ("...far (outside the project's packages)", 8),
    ]
    assert len(imported(tree, path, load_time_only=True)) == 5
    nested = ROOT / "handlers" / "explain" / "lafam.py"
    assert imported(ast.parse("from ..manifest import M\nfrom . import tokens\n"), nested) == [
        ("handlers.manifest", 1),
        ("handlers.explain.tokens", 2),
    ]
    assert forbidden_arrows(ast.parse("from scenes.synthetic import CLASSES\n"), ROOT / "demo" / "model.py") == []
    assert module_file("demo.model") == ROOT / "demo" / "model.py"
    assert module_file("demo") == ROOT / "demo" / "__init__.py"
    assert _parents_and_self("demo.vit") == ["demo", "demo.vit"]


def test_load_time_closure_follows_the_package_and_skips_deferred_imports(tmp_path: Path) -> None:
    files = {
        "demo/__init__.py": '"""Package."""\n',
        "demo/model.py": "import torch\nfrom demo import helpers\nfrom demo.parts import block\n",
        "demo/helpers.py": "X = 1\n",
        "demo/parts/__init__.py": "from .blocks import block\n",
        "demo/parts/blocks.py": "from scenes.synthetic import CLASSES\ndef block():\n    import export\n",
        "demo/run.py": "from serving.torchserve import TorchServe\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    seen, outside = load_time_closure(tmp_path / "demo" / "model.py", "demo", root=tmp_path)
    assert {path.relative_to(tmp_path).as_posix() for path in seen} == {
        "demo/__init__.py",
        "demo/model.py",
        "demo/helpers.py",
        "demo/parts/__init__.py",
        "demo/parts/blocks.py",
    }
    assert [(path.relative_to(tmp_path).as_posix(), module, line) for path, module, line in outside] == [
        ("demo/parts/blocks.py", "scenes.synthetic", 1)
    ]
