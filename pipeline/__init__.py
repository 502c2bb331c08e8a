"""zarr-factorize: QR, exact and randomized SVD/PCA and NMF of chunked Zarr matrices on Dask.

The library never imports Prefect; the ``flows`` package wraps it for orchestration.
Names are loaded on first use, so ``import pipeline`` (and the ``factorize`` command's
``--help`` and ``schema``) pay for neither dask nor zarr.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.errors import (
    ArtifactExistsError,
    ClusterError,
    ConfigError,
    FactorizeError,
    InputError,
    NonFiniteInputError,
    UserError,
)

_LAZY = {
    "JobConfig": "pipeline.config",
    "load_config": "pipeline.config",
    "open_matrix": "pipeline.io.source",
    "run_job": "pipeline.jobs",
    "nmf": "pipeline.linalg",
    "rsvd": "pipeline.linalg",
    "svd": "pipeline.linalg",
    "tsqr": "pipeline.linalg",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = [
    "ArtifactExistsError",
    "ClusterError",
    "ConfigError",
    "FactorizeError",
    "InputError",
    "JobConfig",
    "NonFiniteInputError",
    "UserError",
    "load_config",
    "nmf",
    "open_matrix",
    "rsvd",
    "run_job",
    "svd",
    "tsqr",
]
