"""``method: svd`` — the exact thin SVD of a tall matrix, exact PCA with ``center: true``
(see :mod:`pipeline.linalg.svd`).

TSQR gives ``R`` in one pass, the SVD of the small ``R`` gives ``S`` and ``Vt``, and
``U = Q U_R`` is formed in the pass that forms ``Q`` (``u: false``: ``S`` and ``Vt`` from
one pass). Unlike the covariance route (``AᵀA`` then ``eigh``), which squares the
condition number, every singular value is accurate to working precision relative to
``σ₁``. Writes ``svd/U``, ``svd/S``, ``svd/Vt`` (and ``svd/mean`` when centred) and a
spectrum plot of all ``n`` singular values.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from pipeline.cost import Cost
from pipeline.methods.base import (
    SPECTRAL_HEADLINE,
    Method,
    MethodSpec,
    PassStep,
    RunContext,
    SpectralMetrics,
    check_tall_input,
    spectral_arrays,
    spectral_slots,
)
from pipeline.methods.rank import Rank, RankRule, apply_rule, max_rank

if TYPE_CHECKING:
    import dask.array as da

log = logging.getLogger(__name__)

PLOT = "svd_spectrum.png"


class SVDSpec(MethodSpec):
    """Exact thin SVD of a tall matrix (TSQR, then the SVD of R); exact PCA when centred."""

    method: Literal["svd"]
    rank: Rank | None = Field(
        None,
        description="keep the top rank triplets (default: all n, the columns), or a rule "
        "{max, energy | rel_error | sv_ratio} choosing the fewest that meet it "
        "(see pipeline.methods.rank)",
    )
    u: bool = Field(True, description="also compute and write U (false: S and Vt, one read)")
    center: bool = Field(False, description="PCA: subtract column means (never materialised)")
    transpose: bool = Field(
        False, description="factorize the transpose (for wide matrices); factors are still A's"
    )

    @model_validator(mode="after")
    def _center_needs_tall(self) -> SVDSpec:
        if self.center and self.transpose:
            raise ValueError(
                "center: true needs transpose: false (centring the columns of a wide matrix "
                "is not supported; use rsvd with center: true)"
            )
        return self


class SVDMetrics(SpectralMetrics, total=False):
    """``svd`` in ``metrics.json``."""

    transposed: bool
    blocks: int
    block_methods: dict[str, int]  # blocks per local path of its TSQR


def check(spec: SVDSpec, shape: tuple[int, int], where: str) -> None:
    """Refuse a wide matrix (naming ``transpose``) and a rank above the columns."""
    from pipeline.linalg import check_rank

    check_tall_input(shape, spec.transpose, where)
    if spec.rank is not None:
        is_rule = isinstance(spec.rank, RankRule)
        check_rank(max_rank(spec.rank), shape, name=f"{where}.rank{'.max' * is_rule}:")


def cost(spec: SVDSpec, shape: tuple[int, int]) -> Cost:
    """The exact SVD's cost (:func:`pipeline.linalg.svd_cost`) for this spec."""
    from pipeline.linalg import svd_cost

    return svd_cost(shape, compute_u=spec.u, transpose=spec.transpose, center=spec.center)


def _apply_rank_rule(spec: SVDSpec, res: Any) -> tuple[Any, dict[str, Any]]:
    """The result cut to the rank the rule chooses from the exact spectrum, and the rule's
    metrics (nothing to cut for a numeric rank)."""
    if not isinstance(spec.rank, RankRule):
        return res, {}
    every = res.singular_values_all
    k, metrics = apply_rule("svd", spec.rank, every, res.centred_sumsq, res.sumsq)
    u = None if res.u is None else res.u[:, :k]
    return replace(res, u=u, s=res.s[:k], vt=res.vt[:k]), metrics


def run(spec: SVDSpec, a: da.Array, ctx: RunContext) -> SVDMetrics:
    """Factorize, write the factors of A and the spectrum plot, measure."""
    from pipeline import metrics as mx
    from pipeline.linalg import compute_again, svd
    from pipeline.linalg.tsqr import Q_TIMES_PASS_TASK, R_PASS_TASK
    from pipeline.plots import spectrum_png

    passes = ctx.plan.cost.passes
    tall = ctx.blocks(a, spec)
    (m, n), blocks = tall.shape, tall.numblocks[0]
    log.info(
        "svd: %d × %d %s%s in %d row blocks; %d pass(es)",
        m,
        n,
        tall.dtype,
        " (transposed)" if spec.transpose else "",
        blocks,
        passes,
    )
    with ctx.watch_pass(R_PASS_TASK, blocks, passes, 0):
        res = svd(tall, rank=max_rank(spec.rank), compute_u=spec.u, center=spec.center)
    res, rank_metrics = _apply_rank_rule(spec, res)
    every = res.singular_values_all  # float64, all n
    k = len(res.s)
    s64, vt64 = every[:k], np.asarray(res.vt, dtype=np.float64)
    # The factors of A: with transpose, Aᵀ = U S Vt gives A = Vtᵀ S Uᵀ (the tall U of Aᵀ
    # is written transposed, as A's Vt).
    small_name, tall_name = ("U", "Vt") if spec.transpose else ("Vt", "U")
    ctx.write("S", res.s)
    ctx.write(small_name, res.vt.T if spec.transpose else res.vt)
    if res.mean is not None:
        ctx.write("mean", res.mean)
    orthogonality = {small_name: mx.orthogonality_from_gram(vt64 @ vt64.T), tall_name: None}
    if spec.u:
        store = ctx.write(tall_name, res.u.T if spec.transpose else res.u)
        residual = mx.residual_sq(res.a, res.u, s64[:, None] * vt64, res.mean)
        with ctx.watch_pass(Q_TIMES_PASS_TASK, blocks, passes, 1):
            _, rsq, g = compute_again(store, residual, mx.gram(res.u))
        rsq, method = float(rsq), "direct"
        orthogonality[tall_name] = mx.orthogonality_from_gram(g)
    else:  # exact up to rounding: the squared singular values beyond the kept ones
        rsq, method = float(np.sum(every[k:] ** 2)), "spectrum_tail"
    result: SVDMetrics = {
        "rank": k,
        **rank_metrics,
        "singular_values": s64.tolist(),
        "residual_rel": mx.relative(rsq, res.sumsq),
        "residual_method": method,
        "orthogonality_u": orthogonality["U"],
        "orthogonality_v": orthogonality["Vt"],
        "transposed": spec.transpose,
        "blocks": tall.numblocks[0],
        "block_methods": res.block_methods,
        "fro_norm": float(np.sqrt(res.sumsq)),
        "passes": res.passes,
        "reads_from_storage": ctx.plan.reads,
    }
    total = res.centred_sumsq  # Σ all σ²: ‖A − 1μᵀ‖² when centred, else ‖A‖²
    if spec.center:
        result["residual_rel_centered"] = mx.relative(rsq, total)
    result.update(mx.spectrum_shares(s64, total, m, spec.center))
    ctx.write_plot(PLOT, spectrum_png(every, total, spec.center))
    return result


def _writes_u(spec: SVDSpec) -> bool:
    return spec.u or spec.transpose  # with transpose, A's U is the small Vtᵀ


def _writes_vt(spec: SVDSpec) -> bool:
    return spec.u or not spec.transpose


def pass_steps(spec: dict[str, Any], res: dict[str, Any]) -> list[PassStep]:
    """What each pass computed, from the spec and the metrics (the report's diagram)."""
    means = ", column means" if spec.get("center") else ""
    steps = [PassStep(1, 1, f"R by TSQR{means}; SVD of R: S, Vt")]
    if res.get("passes") == 2:
        steps.append(PassStep(2, 2, "U written; residual ‖A − USVt‖, UᵀU"))
    return steps


METHOD = Method(
    pass_steps=pass_steps,
    anndata=spectral_slots,
    name="svd",
    spec=SVDSpec,
    check=check,
    run=run,
    cost=cost,
    arrays=spectral_arrays(_writes_u, _writes_vt),
    headline=SPECTRAL_HEADLINE,
    plots=(PLOT,),
    metrics=SVDMetrics,
    example={"method": "svd", "center": True},
)
