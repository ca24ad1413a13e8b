"""Importing any module of the project changes nothing outside it.

One fresh interpreter imports every module, in dependency order, and after each import compares with what
it saw before: the environment, the temp dir's listing (a private, empty one) and prometheus-client (its
modules' attributes and what its default registry collects). Metrics, the one module that used to do
all three, are set up by an explicit call (:func:`handlers.metrics.configure`) when a worker starts.

The third-party modules that project modules import at module level are imported before the first
snapshot: what they do is theirs (importing torchvision, for one, makes torch set
``TORCHINDUCTOR_CACHE_DIR`` and create a folder in the temp dir). A module whose import needs an optional
extra that is not installed is skipped, naming the missing module. ``__main__`` modules are not imported:
running is what they are for.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_metrics import fresh_environment

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("handlers", "scenes", "export", "engines", "serving", "evaluation", "demo", "cli", "benchmarks")
"""The project's packages, each after those it imports, so that a side effect shows at its own module."""


def _sources() -> list[Path]:
    files = []
    for package in PACKAGES:
        folder = ROOT / package
        if not (folder / "__init__.py").is_file():
            continue  # not (or no longer) in this checkout
        for path in sorted(folder.rglob("*.py")):
            inside = path.relative_to(folder).parents  # "." and every folder between
            if all((folder / part / "__init__.py").is_file() for part in inside) and path.stem != "__main__":
                files.append(path)
    return files


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = _sources()
MODULES = [_module_name(path) for path in SOURCES]


def third_party_imports() -> list[str]:
    """Modules outside the project imported at module level (not those deferred into functions)."""
    found: set[str] = set()
    for path in SOURCES:
        statements = list(ast.parse(path.read_text(encoding="utf-8")).body)
        for statement in statements:
            if isinstance(statement, ast.Try):
                statements.extend(statement.body)
            elif isinstance(statement, ast.Import):
                found.update(alias.name for alias in statement.names)
            elif isinstance(statement, ast.ImportFrom) and statement.level == 0 and statement.module:
                found.add(statement.module)
    return sorted(name for name in found if name.split(".")[0] not in (*PACKAGES, "__future__"))


PROBE = """
import importlib, json, os, sys, tempfile
import prometheus_client
from prometheus_client import exposition, metrics, mmap_dict, multiprocess, registry, values

PROMETHEUS = (prometheus_client, exposition, metrics, mmap_dict, multiprocess, registry, values)
third_party, modules, project = json.loads(sys.argv[1])
for name in third_party:
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # an optional extra: the project module that needs it is reported as skipped


def state():
    patched = {f"{module.__name__}.{key}": id(value) for module in PROMETHEUS for key, value in vars(module).items()}
    patched["REGISTRY.collect()"] = sorted(family.name for family in prometheus_client.REGISTRY.collect())
    return dict(os.environ), set(os.listdir(tempfile.gettempdir())), patched


def changed(before, after):
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


results = {}
before = state()
for name in modules:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] not in project:
            results[name] = {"missing": exc.name}
            continue
        results[name] = {"error": repr(exc)}
        continue
    except BaseException as exc:
        results[name] = {"error": repr(exc)}
        continue
    after = state()
    results[name] = {
        "environ": changed(before[0], after[0]),
        "temp": sorted(after[1] - before[1]),
        "prometheus_client": changed(before[2], after[2]),
    }
    before = after
print(json.dumps(results))
"""


def probe(third_party: list[str], modules: list[str], project: tuple[str, ...], cwd: Path, temp: Path) -> Any:
    """Run :data:`PROBE` in a fresh interpreter with an empty temp dir and no metrics variables."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([third_party, modules, project])],
        cwd=cwd,
        env=fresh_environment(temp, PYTHONDONTWRITEBYTECODE="1"),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What importing each module changed."""
    return probe(third_party_imports(), MODULES, PACKAGES, ROOT, tmp_path_factory.mktemp("import-temp"))


def test_every_package_is_probed() -> None:
    for package in ("handlers", "export", "evaluation", "demo", "benchmarks"):
        assert package in MODULES
    assert "handlers.metrics" in MODULES
    assert "handlers.handler" in MODULES
    assert not [name for name in MODULES if name.endswith("__main__")]


@pytest.mark.parametrize("module", MODULES)
def test_importing_changes_nothing_outside_the_module(imported: dict[str, Any], module: str) -> None:
    found = imported[module]
    if "missing" in found:
        pytest.skip(f"{module} needs {found['missing']}, an optional extra that is not installed")
    assert "error" not in found, found["error"]
    assert found == {"environ": [], "temp": [], "prometheus_client": []}


def test_the_probe_sees_each_kind_of_side_effect(tmp_path: Path) -> None:
    """The probe itself, on a module that does all three (what ``handlers.metrics`` did at import)."""
    (tmp_path / "noisy.py").write_text(
        "import os, tempfile\n"
        "from prometheus_client import Counter, values\n"
        "os.environ['PROMETHEUS_MULTIPROC_DIR'] = tempfile.mkdtemp(prefix='noisy-')\n"
        "values.ValueClass = values.MultiProcessValue()\n"
        "Counter('noisy', 'registered in the default registry')\n"
    )
    (tmp_path / "temp").mkdir()
    found = probe([], ["noisy", "not_installed_extra"], (), tmp_path, tmp_path / "temp")
    noisy = found["noisy"]
    assert noisy["environ"] == ["PROMETHEUS_MULTIPROC_DIR"]
    assert [name.startswith("noisy-") for name in noisy["temp"]] == [True]
    assert noisy["prometheus_client"] == ["REGISTRY.collect()", "prometheus_client.values.ValueClass"]
    assert found["not_installed_extra"] == {"missing": "not_installed_extra"}
