"""Layering rules from ARCHITECTURE.md, checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys


def test_import_pipeline_loads_neither_prefect_nor_cupy():
    code = (
        "import sys, pipeline, pipeline.jobs, pipeline.cli;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'cupy', 'dask_cuda')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_linalg_has_no_io_or_cluster_imports():
    code = (
        "import sys, pipeline.linalg;"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('zarr', 'distributed', 'pydantic', 'yaml', 'prefect')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
