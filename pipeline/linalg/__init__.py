"""Factorization algorithms over dask arrays (no I/O, no cluster, no config here).

The public functions :func:`tsqr`, :func:`svd`, :func:`rsvd`, :func:`nmf` and :func:`als`
check their arguments once at their top (:mod:`pipeline.linalg._validation`), cast the
input to its working dtype (integers and bool → float64, float16 → float32, float32 /
float64 unchanged) and cut it into row blocks themselves; any chunking, including unknown
chunk sizes, is accepted, and so are blocks of scipy.sparse matrices (``rsvd`` and ``nmf``
multiply them as they are; ``tsqr`` and ``svd`` densify one row block per task, with
:func:`pipeline.linalg._graph.dense_row_blocks`; ``als`` reads their stored entries as the
observed ratings, in float64).
"""

from pipeline.linalg._validation import (
    as_matrix,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_rank,
    check_tall,
    working_dtype,
)
from pipeline.linalg.als import (
    ALSResult,
    ALSState,
    als,
    als_cost,
    ranking_metrics,
    state_arrays,
    state_from_arrays,
    top_n,
)
from pipeline.linalg.nmf import INIT_POWER_ITERS, NMFResult, NMFState, nmf, nmf_cost, svd_for_init
from pipeline.linalg.rsvd import (
    AUTO_MAX_POWER_ITERS,
    AUTO_TOL,
    Convergence,
    RSVDResult,
    rsvd,
    rsvd_cost,
    rsvd_passes,
)
from pipeline.linalg.svd import SVDResult, svd, svd_cost
from pipeline.linalg.tsqr import TSQRResult, compute_again, row_blocks, tsqr, tsqr_cost

__all__ = [
    "AUTO_MAX_POWER_ITERS",
    "AUTO_TOL",
    "INIT_POWER_ITERS",
    "ALSResult",
    "ALSState",
    "Convergence",
    "NMFResult",
    "NMFState",
    "RSVDResult",
    "SVDResult",
    "TSQRResult",
    "als",
    "als_cost",
    "as_matrix",
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_rank",
    "check_tall",
    "compute_again",
    "nmf",
    "nmf_cost",
    "ranking_metrics",
    "row_blocks",
    "rsvd",
    "rsvd_cost",
    "rsvd_passes",
    "state_arrays",
    "state_from_arrays",
    "svd",
    "svd_cost",
    "svd_for_init",
    "top_n",
    "tsqr",
    "tsqr_cost",
    "working_dtype",
]
