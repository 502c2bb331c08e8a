"""Layering rules from ARCHITECTURE.md, checked in a fresh interpreter."""

from __future__ import annotations

import ast
import fnmatch
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.mark.e2e
def test_import_pipeline_cli_loads_no_compute_stack():
    """``factorize --help`` and ``schema`` must not pay for dask, distributed or zarr."""
    code = (
        "import sys, pipeline, pipeline.cli, pipeline.config;"
        "heavy = ('prefect', 'cupy', 'dask', 'distributed', 'zarr', 'scipy', 'fsspec');"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & set(heavy));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.e2e
def test_import_pipeline_loads_neither_prefect_nor_cupy():
    code = (
        "import sys, pipeline, pipeline.jobs, pipeline.cli;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'cupy', 'dask_cuda')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_linalg_has_no_io_or_cluster_imports():
    """The algorithms import no I/O, cluster, config or orchestration library (AST check of
    every module in pipeline/linalg, nested imports included)."""
    import ast
    from pathlib import Path

    banned = {"zarr", "distributed", "pydantic", "yaml", "prefect", "fsspec"}
    linalg = Path(__file__).resolve().parents[1] / "pipeline" / "linalg"
    found = []
    for path in linalg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in banned]
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                allowed = (
                    "pipeline.backend",
                    "pipeline.cost",
                    "pipeline.errors",
                    "pipeline.linalg",
                )
                if not node.module.startswith(allowed):
                    found.append(f"{path.name}: {node.module}")
    assert found == []


# --------------------------------------------------------------------------- layers

# The import graph's layers, top first (README "Layers"): a module imports modules of its
# own layer (without a cycle) and of the layers below it, never above. Every module of
# pipeline/ and flows/ must be placed here, so a new module is placed on purpose.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry", ("pipeline.launcher", "flows.runner")),
    ("cli", ("pipeline.cli",)),
    ("flows", ("flows", "flows.*")),
    ("lifecycle", ("pipeline", "pipeline.jobs", "pipeline.plan", "pipeline.reports",
                   "pipeline.fingerprint")),
    ("config", ("pipeline.config",)),
    ("runtime", ("pipeline.cluster", "pipeline.checkpoints", "pipeline.datasets",
                 "pipeline.sparse_datasets", "pipeline.rating_datasets",
                 "pipeline.ratings_import")),
    ("methods", ("pipeline.methods", "pipeline.methods.*")),
    ("io", ("pipeline.io", "pipeline.io.*", "pipeline.memory", "pipeline.progress",
            "pipeline.plots", "pipeline.lifetime", "pipeline.worker_setup")),
    ("algorithms", ("pipeline.linalg", "pipeline.linalg.*", "pipeline.metrics")),
    ("base", ("pipeline.sections", "pipeline.cost", "pipeline.model_plan", "pipeline.secrets",
              "pipeline.backend", "pipeline.errors")),
]  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]


def _modules(root: Path) -> dict[str, Path]:
    """``{dotted name: file}`` of every module of pipeline/ and flows/ under ``root``."""
    found = {}
    for package in ("pipeline", "flows"):
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, bool]]:
    """``(imported module of ours, inside a function)`` for every import statement of the
    module, at any depth; imports under ``if TYPE_CHECKING:`` never run and are skipped."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def ours(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def visit(node: ast.AST, in_function: bool) -> Iterator[tuple[str, bool]]:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from visit(child, in_function)
            return
        nested = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            # `from pipeline import metrics` imports pipeline.metrics, not pipeline
            targets = [ours(f"{base}.{a.name}") or base for a in node.names]
        for target in {t for t in map(ours, targets) if t and t != name}:
            yield target, in_function
        for child in ast.iter_child_nodes(node):
            yield from visit(child, nested)

    yield from visit(ast.parse(path.read_text()), False)


def _layer_of(name: str) -> int | None:
    """The layer's rank from the bottom (0: base); a module named exactly wins over a
    pattern (``flows.runner`` over ``flows.*``)."""
    layers = list(reversed(LAYERS))
    for exact in (True, False):
        for rank, (_, patterns) in enumerate(layers):
            if any(p == name if exact else fnmatch.fnmatchcase(name, p) for p in patterns):
                return rank
    return None


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], int]:
    """Our import graph (``{module: modules it imports}``) and its in-function imports."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    in_function = 0
    for name, path in modules.items():
        for target, nested in _imports(name, path, modules):
            graph[name].add(target)
            in_function += nested
    return graph, in_function


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Modules no layer names, and every import of a module from a higher layer."""
    problems = [f"{m}: in no layer of LAYERS" for m in sorted(graph) if _layer_of(m) is None]
    names = [name for name, _ in reversed(LAYERS)]
    for m in sorted(graph):
        for target in sorted(graph[m]):
            low, high = _layer_of(m), _layer_of(target)
            if low is not None and high is not None and high > low:
                problems.append(f"{m} ({names[low]}) imports {target} ({names[high]}): upward")
    return problems


def test_the_import_graph_is_layered_without_cycles():
    """No import cycle and no upward import among our modules, in-function imports
    included (what ../shared/tools/import_cycles.py counts, plus the layers)."""
    graph, _ = import_graph()
    assert cycles(graph) == []
    assert layer_violations(graph) == []


def test_the_layer_check_catches_an_upward_import_and_a_cycle(tmp_path: Path):
    """A copy of the code with one deliberate upward import (an algorithm importing the
    config, inside a function) fails both checks; an unplaced module is named."""
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline")
    shutil.copytree(ROOT / "flows", tmp_path / "flows")
    kernels = tmp_path / "pipeline" / "linalg" / "_kernels.py"
    kernels.write_text(kernels.read_text() + "\n\ndef _up():\n    from pipeline import config\n")
    (tmp_path / "pipeline" / "stray.py").write_text("import pipeline.errors\n")
    graph, _ = import_graph(tmp_path)
    assert "pipeline.config" in graph["pipeline.linalg._kernels"]
    problems = layer_violations(graph)
    assert (
        "pipeline.linalg._kernels (algorithms) imports pipeline.config (config): upward" in problems
    )
    assert "pipeline.stray: in no layer of LAYERS" in problems
    assert any("pipeline.config" in c and "pipeline.linalg._kernels" in c for c in cycles(graph))
