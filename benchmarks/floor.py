"""The machine's floor under a benchmark's job, printed beside its anchors (issue 24).

No method can finish a job faster than the larger of

- ``read``: reading its input once, every stored chunk fetched and decoded by the
  cluster's workers (measured here, on the benchmark's own store and cluster), and
- ``compute``: its unavoidable arithmetic at this machine's GEMM rate — the flops of the
  products with the input that a method of its kind must make (the counts below), divided
  by the rate of one core on a large square matrix product times the cluster's cores.

Each benchmark prints :func:`floor_line` for the runs it times: both parts and
``ratio <run> / floor``, so how far a run is from the limit is a printed number. It is a
floor, not a target: skinny products (n, k ≪ m) run well below the square GEMM rate and the
parts overlap only partly, so a ratio of 1 is out of reach; the ratio's change between two
commits is what it is for.

Flop counts (one multiply-add = 2 flops; Golub & Van Loan, *Matrix Computations*, 4th ed.,
§5.2.2 and Table 5.4.1 for QR; lower-order terms in the small n × n or k × k work dropped):

- QR of m × n: ``2n²(m − n/3)`` for R, as much again to form the thin Q (§5.1.6).
- SVD through QR: R's cost, plus ``2mn²`` for U = Q·U_R.
- Randomized SVD with ``l`` columns and ``q`` power iterations: ``2q + 2`` products with A
  (the sketch, two per power iteration, the projection), ``2mnl`` each; sparse: ``2·nnz·l``.
- NMF (HALS or MU): ``A Hᵀ`` and ``Wᵀ A`` per iteration, ``4mnk``; sparse ``4·nnz·k``.
- ALS, per iteration (a user half-step and an item half-step): by Cholesky, every rating
  adds its rank-one ``k × k`` term to its user's and its item's normal equations (``2k²``
  each, half by symmetry: ``2·nnz·k²`` in all) and every user and item solves a ``k × k``
  system (``(m + n)·k³/3``); by ``s`` conjugate-gradient steps (Takács et al. 2011), each
  step multiplies by the shared Gram (``2k²`` per user and item) and by each rating's
  correction (``4k`` per rating and half-step): ``s·(2(m + n)k² + 8·nnz·k)``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

GEMM_SIZE = 1024  # square products of this size run at BLAS's peak on one core here


def gemm_rate(dtype: np.dtype | type = np.float64, cores: int = 2) -> float:
    """Flops per second of ``cores`` cores on square GEMMs: the best of 3 products of
    ``GEMM_SIZE`` on one BLAS thread, times ``cores`` (the cluster's workers × threads)."""
    from threadpoolctl import threadpool_limits

    n = GEMM_SIZE
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
    best = np.inf
    with threadpool_limits(limits=1, user_api="blas"):
        a @ b  # BLAS's buffers allocated, pages touched: not timed
        for _ in range(3):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best * cores


def read_once_seconds(arrays: Iterable[str], repeats: int = 2) -> float:
    """Seconds to read the Zarr arrays at ``arrays`` once with the default (distributed)
    scheduler: every chunk fetched and decoded, then reduced to one number per chunk; the
    best of ``repeats``, as warm as the runs it is compared with."""
    sums = [da.from_zarr(path).sum() for path in arrays]
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        dask.compute(*sums)
        best = min(best, time.perf_counter() - t)
    return best


def qr_flops(m: int, n: int, *, with_q: bool) -> float:
    r = 2.0 * n * n * (m - n / 3)
    return 2 * r if with_q else r


def svd_flops(m: int, n: int, *, with_u: bool) -> float:
    return qr_flops(m, n, with_q=with_u) + (2.0 * m * n * n if with_u else 0.0)


def rsvd_flops(m: int, n: int, columns: int, power_iters: int, nnz: int | None = None) -> float:
    per_product = 2.0 * columns * (nnz if nnz is not None else m * n)
    return (2 * power_iters + 2) * per_product


def nmf_flops(m: int, n: int, rank: int, iterations: int, nnz: int | None = None) -> float:
    return 4.0 * rank * (nnz if nnz is not None else m * n) * iterations


def als_flops(users: int, items: int, nnz: int, rank: int, cg_steps: int | None = None) -> float:
    """One iteration's flops: by Cholesky, or by ``cg_steps`` conjugate-gradient steps."""
    if cg_steps is None:
        return 2.0 * nnz * rank**2 + (users + items) * rank**3 / 3
    return cg_steps * (2.0 * (users + items) * rank**2 + 8.0 * nnz * rank)


@dataclass(frozen=True)
class Floor:
    """``read`` and ``compute`` seconds of one job on one machine; the floor is the larger."""

    read: float
    flops: float
    rate: float

    @property
    def compute(self) -> float:
        return self.flops / self.rate

    @property
    def seconds(self) -> float:
        return max(self.read, self.compute)


def floor_line(floor: Floor, runs: dict[str, float]) -> str:
    """The floor and its two parts, then each timed run's ratio to it (seconds by name)."""
    head = (
        f"floor: read once {floor.read:.2f} s, compute {floor.flops / 1e9:.1f} GFLOP at "
        f"{floor.rate / 1e9:.1f} GFLOP/s = {floor.compute:.2f} s → {floor.seconds:.2f} s"
    )
    ratios = "; ".join(
        f"ratio {name} / floor = {s / floor.seconds:.2f}" for name, s in runs.items()
    )
    return f"{head}\n  {ratios}"
