"""zarr-factorize: QR, randomized SVD/PCA and NMF of chunked Zarr matrices on Dask.

The library never imports Prefect; the ``flows`` package wraps it for orchestration.
"""

from pipeline.config import JobConfig, load_config
from pipeline.errors import (
    ArtifactExistsError,
    ClusterError,
    ConfigError,
    FactorizeError,
    InputError,
    NonFiniteInputError,
    UserError,
)
from pipeline.io.source import open_matrix
from pipeline.jobs import run_job
from pipeline.linalg import tsqr

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
    "open_matrix",
    "run_job",
    "tsqr",
]
