"""The layering of DESIGN.md, as contracts over every import statement (function-level imports included).

- phpn_core never imports Prefect or Ray;
- phpn_core.method imports only torch, numpy, safetensors, the standard library and itself;
- storage, models and data import neither evaluation nor report; evaluation never imports report or storage;
- storage never imports models or data;
- tasks never import flows; the explorer imports neither flows nor Prefect nor Ray;
- no import circles between the project's modules (function-level imports count: a lazy import still ties two
  modules together);
- no module over MAX_LINES lines unless its docstring says why (a line starting ``Size:``);
- a name with a leading underscore stays in its module: another module may import it only from a private helper
  module (one whose own name starts with an underscore, e.g. ``evaluation/_checks.py``).
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "phpn_core"
ALLOWED_METHOD = {"torch", "numpy", "safetensors", "__future__"} | set(sys.stdlib_module_names)
ORCHESTRATION = {"prefect", "prefect_ray", "ray"}
PACKAGES = ("phpn_core", "tasks", "flows", "explorer")
MAX_LINES = 600

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


# -- import graph: cycles, private names, size --------------------------------------------------------------------


def _project_files(root: Path) -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES if (root / pkg).is_dir() for p in sorted((root / pkg).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that an imported dotted name lives in (``pkg.mod.attr`` -> ``pkg.mod``), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (module- or function-level). ``from pkg import mod``
    points at ``pkg.mod`` when that is a module, else at ``pkg``; a package's own ``__init__`` is not implied."""
    modules = _project_files(root)
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        names: list[str] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    source = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                names += [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        graph[mod] = {hit for n in names if (hit := _resolve(n, modules)) is not None and hit != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def private_imports(root: Path) -> list[tuple[str, str, int]]:
    """``(file, module.name, line)`` for each ``from X import _name`` where X is another project module that is not
    itself a private helper module (``_checks.py``)."""
    modules = _project_files(root)
    bad = []
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")
                source = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if _resolve(source, modules) in (None, mod) or source.rpartition(".")[2].startswith("_"):
                continue
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    bad.append((str(path.relative_to(root)), f"{source}.{a.name}", node.lineno))
    return bad


def oversized(root: Path, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """Modules over ``limit`` lines whose docstring has no line starting ``Size:`` (the reason it must be long)."""
    out = []
    for path in _project_files(root).values():
        text = path.read_text()
        n = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if n > limit and not any(line.strip().startswith("Size:") for line in doc.splitlines()):
            out.append((str(path.relative_to(root)), n))
    return sorted(out)


def test_no_import_cycles():
    found = cycles(import_graph(ROOT))
    assert not found, (
        f"import circles: {found}. Fix: move what both sides need into a module below them (see "
        "phpn_core/models/arch_names.py, tasks/inputs.py)."
    )


def test_private_names_stay_in_their_module():
    bad = private_imports(ROOT)
    assert not bad, (
        f"{bad}: a name with a leading underscore imported from another module. Fix: make it public in the module "
        "below both users, or move it to a private helper module (_name.py)."
    )


def test_no_module_over_the_size_limit():
    big = oversized(ROOT)
    assert not big, (
        f"{big}: over {MAX_LINES} lines. Fix: split the module at its seams (one job per module), or say why it "
        "must not be split in a 'Size:' line of its docstring."
    )


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, source in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(source)
    return tmp_path


def test_cycle_checker_finds_a_lazy_circle_and_passes_a_chain(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    root = _tree(tmp_path, {
        "phpn_core/__init__.py": "",
        "phpn_core/a.py": "from phpn_core.b import x\n",
        "phpn_core/b.py": "def f():\n    from phpn_core import a\n",  # a lazy import still closes the circle
        "phpn_core/c.py": "from phpn_core.a import y\n",
        "tasks/__init__.py": "",
        "tasks/p.py": "from .q import z\n",
        "tasks/q.py": "import os\n",
        "explorer/__init__.py": "def f():\n    from explorer.app import g\n",  # a package and its submodule
        "explorer/app.py": "from explorer import pages\n",  # a sibling through the package: no circle
        "explorer/pages.py": "import os\n",
    })
    assert cycles(import_graph(root)) == [["phpn_core.a", "phpn_core.b"]]
    (root / "phpn_core/b.py").write_text("import os\n")
    assert cycles(import_graph(root)) == []


def test_private_and_size_checkers_can_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    root = _tree(tmp_path, {
        "phpn_core/__init__.py": "",
        "phpn_core/m.py": "_helper = 1\n",
        "phpn_core/_shared.py": "_ok = 1\n",
        "phpn_core/user.py": "from phpn_core.m import _helper\nfrom phpn_core._shared import _ok\nfrom os import _exit\n",
        "phpn_core/big.py": "x = 1\n" * 30,
        "phpn_core/big_ok.py": '"""Long on purpose.\n\nSize: one table that must stay together."""\n' + "x = 1\n" * 30,
    })
    assert [(f, n) for f, n, _ in private_imports(root)] == [("phpn_core/user.py", "phpn_core.m._helper")]
    assert oversized(root, limit=20) == [("phpn_core/big.py", 30)]
