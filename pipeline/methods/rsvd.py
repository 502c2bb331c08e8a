"""``method: rsvd`` — randomized truncated SVD, PCA with ``center: true``
(see :mod:`pipeline.linalg.rsvd`).

Writes ``rsvd/U``, ``rsvd/S``, ``rsvd/Vt`` (and ``rsvd/mean`` when centred) and a spectrum
plot. The residual comes from the exact formula ``‖A‖² − Σσ²`` for the projection the
method computes, or from a direct pass when that difference has lost its digits.
``power_iters: auto`` (the default) iterates until the top singular values stop changing
(block Krylov; see :mod:`pipeline.linalg.rsvd`) and records ``power_iters_used``,
``converged`` and ``error_estimate``; a warning in the log and the report when it stopped
at its cap unconverged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import BeforeValidator, Field

from pipeline.cost import Cost
from pipeline.methods.base import (
    SPECTRAL_HEADLINE,
    Method,
    MethodSpec,
    PassStep,
    RunContext,
    SpectralMetrics,
    spectral_arrays,
    spectral_slots,
)
from pipeline.methods.rank import Rank, RankRule, apply_rule, max_rank
from pipeline.progress import Progress, report

if TYPE_CHECKING:
    import dask.array as da

log = logging.getLogger(__name__)

PLOT = "rsvd_spectrum.png"
POWER_ITERS_MAX = 100  # a fixed count above it is a typo, not a plan


def _power_iters(value: Any) -> Any:
    """``auto`` or an int in ``[0, POWER_ITERS_MAX]``, refused in one line otherwise (a
    plain ``int | Literal`` union would report one error per branch)."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be 'auto' or an integer between 0 and {POWER_ITERS_MAX}")
    if value < 0:
        raise ValueError("must be ≥ 0")
    if value > POWER_ITERS_MAX:
        raise ValueError(f"must be ≤ {POWER_ITERS_MAX}")
    return value


PowerIters = Annotated[
    Annotated[int, Field(ge=0, le=POWER_ITERS_MAX)] | Literal["auto"],
    BeforeValidator(_power_iters),
]


class RSVDSpec(MethodSpec):
    """Randomized truncated SVD (Halko, Martinsson & Tropp 2011); PCA with ``center: true``."""

    method: Literal["rsvd"]
    rank: Rank = Field(
        description="singular triplets to keep (1 ≤ rank ≤ min(m, n)), or a rule "
        "{max, energy | rel_error | sv_ratio} choosing the fewest that meet it "
        "(see pipeline.methods.rank)"
    )
    oversample: int = Field(
        10, ge=0, description="extra sketch columns (rank + oversample is capped at min(m, n))"
    )
    power_iters: PowerIters = Field(
        "auto",
        description="iteration passes, one pass over A each: auto (until the estimated "
        "relative error of every top-k σ² is ≤ 1e-3; at most 20) or a number",
    )
    iteration: Literal["krylov", "power"] | None = Field(
        None,
        description="krylov: randomized block Krylov (Musco & Musco 2015); power: subspace "
        "iteration; null: krylov with power_iters auto, power with a number (as before)",
    )
    center: bool = Field(False, description="PCA: subtract column means (never materialised)")
    seed: int = Field(0, ge=0, description="seed of the Gaussian test matrices")
    single_pass: bool = Field(
        False, description="read A once (Tropp et al. 2017 sketch); less accurate"
    )
    measure_residual: bool | None = Field(
        None,
        description="null: exact formula, plus a direct pass only when the formula "
        "loses precision (multi-pass) or never (single-pass); true: always a direct pass",
    )


class RSVDMetrics(SpectralMetrics, total=False):
    """``rsvd`` in ``metrics.json``."""

    sketch_width: int  # rank + oversample, at most the smaller dimension
    single_pass: bool
    iteration: Literal["krylov", "power"]
    power_iters_used: int
    converged: bool | None  # power_iters auto: the estimate met its tolerance
    error_estimate: float | None
    change_history: list[float]


def check(spec: RSVDSpec, shape: tuple[int, int], where: str) -> None:
    """Refuse a rank above the smaller dimension."""
    from pipeline.linalg import check_rank

    check_rank(max_rank(spec.rank), shape, name=f"{where}.rank{'.max' * rule(spec)}:")


def rule(spec: RSVDSpec) -> bool:
    """Whether ``rank:`` is a rule rather than a number."""
    return isinstance(spec.rank, RankRule)


def _computed_rank(spec: RSVDSpec, shape: tuple[int, int]) -> int:
    """Triplets to compute: ``rank``, or the rule's ``max`` (plus one for ``sv_ratio``, to
    tell whether ``max`` sufficed)."""
    k = max_rank(spec.rank)
    extra = int(rule(spec) and spec.rank.sv_ratio is not None)
    return min(k + extra, *shape)


def cost(spec: RSVDSpec, shape: tuple[int, int]) -> Cost:
    """The randomized SVD's cost (:func:`pipeline.linalg.rsvd_cost`) for this spec."""
    from pipeline.linalg import rsvd_cost

    return rsvd_cost(
        shape,
        rank=_computed_rank(spec, shape),
        oversample=spec.oversample,
        power_iters=spec.power_iters,
        single_pass=spec.single_pass,
        measure_residual=spec.measure_residual,
    )


def _scheme(spec: RSVDSpec) -> str:
    """How the sketch is iterated, for the log."""
    if spec.single_pass:
        return "single-pass sketch"
    if spec.power_iters == 0:
        return "no power iterations"
    scheme = spec.iteration or ("krylov" if spec.power_iters == "auto" else "power")
    return f"{'block Krylov' if scheme == 'krylov' else 'power'} iterations: {spec.power_iters}"


def _convergence_metrics(conv: Any) -> dict[str, Any]:
    """``iteration``, ``power_iters_used``, ``converged`` (``None`` for a fixed count),
    ``error_estimate`` and ``change_history`` (none of them for the single-pass and
    ``power_iters: 0`` paths); a warning when ``auto`` stopped at its cap unconverged."""
    from pipeline.linalg.rsvd import AUTO_TOL

    if conv is None:
        return {}
    if conv.converged is False:
        est = "unknown" if conv.error_estimate is None else f"{conv.error_estimate:.1e}"
        remedy = f"raise oversample, set power_iters to a number above {conv.power_iters_used}"
        remedy += ", or use iteration: krylov" * (conv.iteration == "power")
        log.warning(
            "rsvd: power_iters auto did not converge in %d iteration passes (estimated "
            "relative error of the top-k σ² %s, tolerance %.0e); the factors may be "
            "inaccurate: %s",
            conv.power_iters_used,
            est,
            AUTO_TOL,
            remedy,
        )
    return {
        "iteration": conv.iteration,
        "power_iters_used": conv.power_iters_used,
        "converged": conv.converged,
        "error_estimate": conv.error_estimate,
        "change_history": conv.changes,
    }


def _apply_rank_rule(spec: RSVDSpec, res: Any) -> tuple[Any, dict[str, Any]]:
    """The result cut to the rank the rule chooses, and the rule's metrics."""
    if not rule(spec):
        return res, {"rank": spec.rank}
    k, metrics = apply_rule("rsvd", spec.rank, res.s64, res.total_sumsq, res.input_sumsq)
    cut = replace(res, u=res.u[:, :k], s=res.s[:k], vt=res.vt[:k], s64=res.s64[:k])
    return cut, metrics


def run(spec: RSVDSpec, a: da.Array, ctx: RunContext) -> RSVDMetrics:
    """Factorize, write the factors and the spectrum plot, measure."""
    import dask

    from pipeline import metrics as mx
    from pipeline.linalg import compute_again, rsvd, rsvd_passes
    from pipeline.plots import spectrum_png

    t0 = time.perf_counter()
    m, n = a.shape
    computed = _computed_rank(spec, (m, n))
    width = min(computed + spec.oversample, m, n)
    a = ctx.blocks(a, spec)
    most = rsvd_passes(spec.power_iters, spec.single_pass)
    log.info(
        "rsvd: rank %s (sketch %d) of %d × %d %s, %s; %s%d passes over the input",
        spec.rank.target if rule(spec) else spec.rank,
        width,
        m,
        n,
        a.dtype,
        _scheme(spec),
        "up to " * (spec.power_iters == "auto" and not spec.single_pass),
        most,
    )
    res = rsvd(
        a,
        computed,
        oversample=spec.oversample,
        power_iters=spec.power_iters,
        iteration=spec.iteration,
        center=spec.center,
        seed=spec.seed,
        single_pass=spec.single_pass,
        on_pass=lambda done: report(Progress(ctx.job_name, "rsvd", done, most, "pass")),
    )
    passes = res.passes
    convergence = _convergence_metrics(res.convergence)
    res, rank_metrics = _apply_rank_rule(spec, res)
    log.info("rsvd: factors found in %.1f s; writing U and measuring", time.perf_counter() - t0)
    s64 = res.s64  # float64: keeps the digits of ‖A‖² − Σσ²
    vt64 = np.asarray(res.vt, dtype=np.float64)
    ctx.write("S", res.s)
    ctx.write("Vt", res.vt)
    if res.mean is not None:
        ctx.write("mean", res.mean)
    store = ctx.write("U", res.u)
    _, g = dask.compute(store, mx.gram(res.u))

    residual_method = res.residual_rule(spec.measure_residual)
    if residual_method == "direct":
        approx = s64[:, None] * vt64
        (rsq,) = compute_again(mx.residual_sq(res.a, res.u, approx, res.mean64))
        rsq = float(rsq)
        passes += 1
    else:
        rsq = res.residual_sumsq
    total = res.total_sumsq  # ‖A − 1μᵀ‖² when centred, else ‖A‖²
    # ‖A − (1μᵀ + U S Vt)‖ is one numerator; the contract's residual_rel divides it by ‖A‖
    result: RSVDMetrics = {
        **rank_metrics,
        "sketch_width": width,
        "singular_values": s64.tolist(),
        "residual_rel": None if rsq is None else mx.relative(rsq, res.input_sumsq),
        "residual_method": residual_method,
        "orthogonality_u": mx.orthogonality_from_gram(g),
        "orthogonality_v": mx.orthogonality_from_gram(vt64 @ vt64.T),
        "fro_norm": float(np.sqrt(res.input_sumsq)),
        "passes": passes,
        "reads_from_storage": 1 if ctx.plan.kept else passes,
        "single_pass": spec.single_pass,
        **convergence,
    }
    if spec.center:
        result["residual_rel_centered"] = None if rsq is None else mx.relative(rsq, total)
    result.update(mx.spectrum_shares(s64, total, m, spec.center))
    ctx.write_plot(PLOT, spectrum_png(s64, total, spec.center))
    return result


def pass_steps(spec: dict[str, Any], res: dict[str, Any]) -> list[PassStep]:
    """What each pass computed, from the spec and the metrics (the report's diagram)."""
    # the iteration passes made (power_iters: auto records them in power_iters_used)
    power_iters = res.get("power_iters_used", spec.get("power_iters", 0))
    if spec.get("single_pass"):
        steps = [PassStep(1, 1, "sketches AΩ and ΨA, column sums, ‖A‖²: U, S, Vt")]
    elif not isinstance(power_iters, int):  # "auto" without a record: the generic step
        return []
    elif power_iters == 0:
        steps = [PassStep(1, 1, "sketch Y = AΩ, column sums, ‖A‖²"), PassStep(2, 2, "B = QᵀA")]
    else:
        steps = [PassStep(1, 1, "column sums, ‖A‖², W = AᵀAΩ")]
        if power_iters > 1:
            kind = "block Krylov" if res.get("iteration") == "krylov" else "power"
            what = f"{kind} iteration" + "s" * (power_iters > 2)
            steps.append(PassStep(2, power_iters, f"{what}: W = AᵀAZ"))
        last = power_iters + 1
        steps.append(PassStep(last, last, "sketch Y = AZ kept; AᵀY, YᵀY: U, S, Vt"))
    direct = res.get("residual_method") == "direct"
    if not spec.get("single_pass") and power_iters > 0:
        # A sketch not graded enough for its Gram is orthonormalized by TSQR instead, and
        # B = QᵀA then takes one more pass (pipeline.linalg.rsvd).
        if (res.get("passes") or 0) == steps[-1].last + 1 + direct:
            extra = steps[-1].last + 1
            steps.append(PassStep(extra, extra, "B = QᵀA (Q of the sketch by TSQR)"))
    if direct:
        extra = steps[-1].last + 1
        steps.append(PassStep(extra, extra, "residual ‖A − USVt‖"))
    return steps


METHOD = Method(
    pass_steps=pass_steps,
    anndata=spectral_slots,
    sparse=True,
    name="rsvd",
    spec=RSVDSpec,
    check=check,
    run=run,
    cost=cost,
    arrays=spectral_arrays(),
    headline=SPECTRAL_HEADLINE,
    plots=(PLOT,),
    metrics=RSVDMetrics,
    example={"method": "rsvd", "rank": 3},
)
