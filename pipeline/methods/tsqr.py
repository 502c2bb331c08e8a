"""``method: tsqr`` — tall-skinny QR, ``A = QR`` (see :mod:`pipeline.linalg.tsqr`).

Writes ``tsqr/R`` and, with ``q: true``, ``tsqr/Q``. ``R`` reads the input once; ``Q`` a
second time, unless the input is kept in memory. Without ``Q`` the check that needs no
extra pass is ``‖R‖_F = ‖A‖_F`` (``norm_consistency``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from pipeline.cost import Cost
from pipeline.methods.base import (
    FactorArray,
    Method,
    MethodMetrics,
    MethodSpec,
    PassStep,
    RunContext,
    check_tall_input,
)

if TYPE_CHECKING:
    import dask.array as da

log = logging.getLogger(__name__)


class TSQRSpec(MethodSpec):
    """Tall-skinny QR: A = QR with orthonormal Q (m × n) and upper-triangular R (n × n)."""

    method: Literal["tsqr"]
    q: bool = Field(True, description="also compute and write Q (false: R only, one read of A)")
    transpose: bool = Field(False, description="factorize the transpose (for wide matrices)")


class TSQRMetrics(MethodMetrics, total=False):
    """``tsqr`` in ``metrics.json``."""

    shape: list[int]  # of the matrix factorized (transposed when asked)
    transposed: bool
    blocks: int
    block_methods: dict[str, int]  # blocks per local path (cholqr2, scholqr3, householder)
    orthogonality: float | None  # ‖QᵀQ − I‖_F (None without Q)
    norm_consistency: float  # without Q: |‖R‖_F − ‖A‖_F| / ‖A‖_F
    r_diag_ratio: float  # min |R_ii| / max |R_ii|


def check(spec: TSQRSpec, shape: tuple[int, int], where: str) -> None:
    """Refuse a wide matrix, naming the ``transpose`` option."""
    check_tall_input(shape, spec.transpose, where)


def cost(spec: TSQRSpec, shape: tuple[int, int]) -> Cost:
    """TSQR's cost (:func:`pipeline.linalg.tsqr_cost`) for this spec."""
    from pipeline.linalg import tsqr_cost

    return tsqr_cost(shape, compute_q=spec.q, transpose=spec.transpose)


def run(spec: TSQRSpec, a: da.Array, ctx: RunContext) -> TSQRMetrics:
    """Factorize, write ``R`` (and ``Q`` with its residual and orthogonality)."""
    from pipeline import metrics as mx
    from pipeline.backend import to_host
    from pipeline.linalg import compute_again, tsqr
    from pipeline.linalg.tsqr import Q_PASS_TASK, R_PASS_TASK

    t0 = time.perf_counter()
    passes = ctx.plan.cost.passes
    a = ctx.blocks(a, spec)
    blocks = a.numblocks[0]
    log.info(
        "tsqr: %d × %d %s in %d row blocks; pass 1/%d computes R",
        *a.shape,
        a.dtype,
        blocks,
        passes,
    )
    with ctx.watch_pass(R_PASS_TASK, blocks, passes, 0):
        res = tsqr(a, compute_q=spec.q)
    log.info(
        "tsqr: R done in %.1f s (block paths: %s)",
        time.perf_counter() - t0,
        ", ".join(f"{k} {v}" for k, v in sorted(res.block_methods.items())),
    )
    ctx.write("R", res.r)
    result: TSQRMetrics = {
        "fro_norm": res.fro_norm,
        "shape": list(a.shape),
        "transposed": spec.transpose,
        "blocks": blocks,
        "block_methods": res.block_methods,
        "passes": passes,
        "reads_from_storage": ctx.plan.reads,
    }
    if spec.q:
        log.info("tsqr: pass 2/2 writes Q and computes residual and orthogonality")
        store = ctx.write("Q", res.q)
        with ctx.watch_pass(Q_PASS_TASK, blocks, passes, 1):
            _, rsq, g = compute_again(store, mx.residual_sq(res.a, res.q, res.r), mx.gram(res.q))
        result["residual_rel"] = mx.relative(float(rsq), res.sumsq)
        result["orthogonality"] = mx.orthogonality_from_gram(g)
    else:
        r_norm = float(np.linalg.norm(to_host(res.r).astype(np.float64)))
        result["residual_rel"] = None
        result["orthogonality"] = None
        result["norm_consistency"] = abs(r_norm - res.fro_norm) / res.fro_norm if res.sumsq else 0.0
    r_diag = np.abs(np.diagonal(to_host(res.r)).astype(np.float64))
    if r_diag.size and r_diag.max() > 0:
        result["r_diag_ratio"] = float(r_diag.min() / r_diag.max())
    return result


def pass_steps(spec: dict[str, Any], res: dict[str, Any]) -> list[PassStep]:
    """What each pass computed, from the spec and the metrics (the report's diagram)."""
    steps = [PassStep(1, 1, "R by TSQR (QR of each row block, combined in a tree), ‖A‖_F")]
    if res.get("passes") == 2:
        steps.append(PassStep(2, 2, "Q written; residual ‖A − QR‖, QᵀQ"))
    return steps


METHOD = Method(
    pass_steps=pass_steps,
    name="tsqr",
    spec=TSQRSpec,
    check=check,
    run=run,
    cost=cost,
    arrays=(
        FactorArray("Q", ("row", "component"), when=lambda spec: spec.q),
        FactorArray("R", ("component", "col")),
    ),
    headline=("residual_rel", "orthogonality", "norm_consistency", "passes", "seconds"),
    metrics=TSQRMetrics,
    example={"method": "tsqr"},
)
