"""Layering rules from ARCHITECTURE.md, checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

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
                allowed = ("pipeline.backend", "pipeline.errors", "pipeline.linalg")
                if not node.module.startswith(allowed):
                    found.append(f"{path.name}: {node.module}")
    assert found == []
