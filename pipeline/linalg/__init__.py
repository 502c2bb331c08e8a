"""Factorization algorithms over dask arrays (no I/O, no cluster, no config here)."""

from pipeline.linalg.nmf import NMFResult, NMFState, nmf
from pipeline.linalg.rsvd import RSVDResult, rsvd, rsvd_passes
from pipeline.linalg.tsqr import TSQRResult, row_blocks, tsqr

__all__ = [
    "NMFResult",
    "NMFState",
    "RSVDResult",
    "TSQRResult",
    "nmf",
    "row_blocks",
    "rsvd",
    "rsvd_passes",
    "tsqr",
]
