"""House rules: phpn_core never imports Prefect or Ray; the algorithm modules import only torch/numpy/stdlib."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "phpn_core"
PURE = {"nmf.py", "decompose.py", "head.py"}
ALLOWED_PURE = {"torch", "numpy", "safetensors", "__future__"} | set(sys.stdlib_module_names)


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside phpn_core
                yield "phpn_core", node.lineno
            elif node.module:
                yield node.module.split(".")[0], node.lineno


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_does_not_import_orchestration(path):
    bad = [(m, ln) for m, ln in _imports(path) if m in {"prefect", "prefect_ray", "ray"}]
    assert not bad, f"{path}: phpn_core must not import prefect/ray: {bad}"


@pytest.mark.parametrize("name", sorted(PURE))
def test_algorithm_modules_import_only_torch_numpy_stdlib(name):
    bad = [(m, ln) for m, ln in _imports(CORE / name) if m not in ALLOWED_PURE and m != "phpn_core"]
    assert not bad, f"{name} imports {bad}; only torch, numpy and the standard library are allowed"


def test_checker_catches_a_violation(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("import ray\nfrom prefect import flow\n")
    assert {m for m, _ in _imports(p)} == {"ray", "prefect"}
