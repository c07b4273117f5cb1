"""The layering of DESIGN.md, as contracts over every import statement (function-level imports included).

- phpn_core never imports Prefect or Ray;
- phpn_core.method imports only torch, numpy, safetensors, the standard library and itself;
- storage, models and data import neither evaluation nor report; evaluation never imports report or storage;
- storage never imports models or data;
- tasks never import flows; the explorer imports neither flows nor Prefect nor Ray.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "phpn_core"
ALLOWED_METHOD = {"torch", "numpy", "safetensors", "__future__"} | set(sys.stdlib_module_names)
ORCHESTRATION = {"prefect", "prefect_ray", "ray"}

# package -> phpn_core subpackages it must never import
FORBIDDEN = {
    "phpn_core.storage": {"phpn_core.evaluation", "phpn_core.report", "phpn_core.models", "phpn_core.data"},
    "phpn_core.models": {"phpn_core.evaluation", "phpn_core.report"},
    "phpn_core.data": {"phpn_core.evaluation", "phpn_core.report"},
    "phpn_core.evaluation": {"phpn_core.report", "phpn_core.storage"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """Absolute dotted names imported by ``path`` (relative imports resolved), with their line numbers."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from phpn_core import report" imports the subpackage phpn_core.report
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names] if mod == "phpn_core" else [(mod, node.lineno)]
    return out


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize("path", _files(CORE), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_does_not_import_orchestration(path):
    bad = [(m, ln) for m, ln in imports(path) if m.split(".")[0] in ORCHESTRATION]
    assert not bad, f"{path}: phpn_core must not import prefect/ray: {bad}"


@pytest.mark.parametrize("path", _files(CORE / "method"), ids=lambda p: p.name)
def test_method_imports_only_torch_numpy_safetensors_stdlib(path):
    bad = [
        (m, ln) for m, ln in imports(path)
        if not _within(m, "phpn_core.method") and m.split(".")[0] not in ALLOWED_METHOD
    ]
    assert not bad, f"{path.name} imports {bad}; method/ may import only torch, numpy, safetensors, stdlib, method"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_do_not_import_upwards(package):
    folder = ROOT.joinpath(*package.split("."))
    bad = [
        (str(p.relative_to(ROOT)), m, ln)
        for p in _files(folder) for m, ln in imports(p)
        if any(_within(m, f) for f in FORBIDDEN[package])
    ]
    assert not bad, f"{package} must not import {sorted(FORBIDDEN[package])}: {bad}"


@pytest.mark.parametrize("path", _files(ROOT / "explorer"), ids=lambda p: str(p.relative_to(ROOT)))
def test_explorer_does_not_import_orchestration(path):
    bad = [(m, ln) for m, ln in imports(path) if m.split(".")[0] in ORCHESTRATION or _within(m, "flows")]
    assert not bad, f"{path}: the explorer is a Prefect-free, read-only process: {bad}"


def test_tasks_do_not_import_flows():
    bad = [(p.name, m, ln) for p in _files(ROOT / "tasks") for m, ln in imports(p) if _within(m, "flows")]
    assert not bad, f"tasks must not import flows (flows compose tasks, not the reverse): {bad}"


@pytest.mark.parametrize(
    "rel, source, expected",
    [
        ("phpn_core/method/x.py", "import ray\nfrom prefect import flow\n", {"ray", "prefect"}),
        ("phpn_core/method/x.py", "from ..storage import uri\n", {"phpn_core.storage"}),
        ("phpn_core/storage/x.py", "from phpn_core import report\n", {"phpn_core.report"}),
        ("phpn_core/models/__init__.py", "from .split import a\n", {"phpn_core.models.split"}),
        ("tasks/x.py", "def f():\n    from flows.cli import app\n", {"flows.cli"}),
    ],
)
def test_checker_sees_every_kind_of_import(tmp_path, monkeypatch, rel, source, expected):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    p = tmp_path / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(source)
    assert {m for m, _ in imports(p)} == expected
