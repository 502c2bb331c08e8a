"""``method: nmf`` — non-negative matrix factorization ``A ≈ WH`` (see
:mod:`pipeline.linalg.nmf`), with checkpoints and resume.

Writes ``nmf/W`` and ``nmf/H`` and a convergence plot. While it runs it checkpoints
``W``, ``H`` and the iteration state beside the output (:mod:`pipeline.checkpoints`);
``resume: true`` continues from there bit for bit, and the checkpoint is removed once the
result is published.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from pipeline.cost import Cost
from pipeline.methods.base import (
    AnnDataSlots,
    CheckpointStore,
    FactorArray,
    Method,
    MethodMetrics,
    MethodSpec,
    PassStep,
    RunContext,
)
from pipeline.progress import Progress, report

if TYPE_CHECKING:
    import dask.array as da

    from pipeline.linalg import NMFState

log = logging.getLogger(__name__)

PLOT = "nmf_convergence.png"
CHECKPOINT_SECONDS = 60  # default spacing of checkpoints without checkpoint_every
LOG_SECONDS = 5


class NMFSpec(MethodSpec):
    """Non-negative matrix factorization A ≈ WH (W: m × rank, H: rank × n, both ≥ 0)."""

    method: Literal["nmf"]
    rank: int = Field(ge=1, description="number of components; 1 ≤ rank ≤ min(m, n)")
    solver: Literal["hals", "mu"] = Field(
        "hals", description="hals: fast coordinate descent; mu: Lee–Seung multiplicative updates"
    )
    init: Literal["nndsvd", "nndsvda", "random"] = "nndsvda"
    inner_sweeps: int = Field(
        5,
        ge=1,
        description="most updates of W (and H) per pass over A (Gillis–Glineur acceleration; "
        "1 = plain HALS/MU)",
    )
    max_iter: int = Field(200, ge=1)
    tol: float = Field(
        1e-4,
        ge=0,
        description="stop when the relative decrease of "
        "‖A − WH‖² over one iteration falls below tol",
    )
    seed: int = Field(0, ge=0)
    checkpoint_every: int | None = Field(
        None, ge=1, description="iterations between checkpoints; default: about every 60 s"
    )
    resume: bool = Field(False, description="continue from the last checkpoint of this job")


class NMFMetrics(MethodMetrics, total=False):
    """``nmf`` in ``metrics.json``."""

    rank: int
    solver: Literal["hals", "mu"]
    init: Literal["nndsvd", "nndsvda", "random"]
    residual_method: Literal["direct", "objective"]
    iterations: int
    converged: bool
    history: list[float]  # residual_rel after each iteration (from the objective)
    resumed_from: int | None  # the checkpoint's iteration, with resume


def check(spec: NMFSpec, shape: tuple[int, int], where: str) -> None:
    """Refuse a rank above the smaller dimension (the sign is checked in the first pass)."""
    from pipeline.linalg import check_rank

    check_rank(spec.rank, shape, name=f"{where}.rank:")


def cost(spec: NMFSpec, shape: tuple[int, int]) -> Cost:
    """NMF's cost (:func:`pipeline.linalg.nmf_cost`) for this spec."""
    from pipeline.linalg import nmf_cost

    return nmf_cost(shape, rank=spec.rank, init=spec.init, max_iter=spec.max_iter)


# --------------------------------------------------------------------------- checkpoints


def _identity(spec: NMFSpec, a: da.Array) -> dict[str, Any]:
    return {
        "shape": list(a.shape),
        "row_chunks": list(a.chunks[0]),
        "dtype": str(a.dtype),
        "rank": spec.rank,
        "solver": spec.solver,
        "init": spec.init,
        "seed": spec.seed,
    }


def _save(store: CheckpointStore, st: NMFState, w: da.Array, spec: NMFSpec, a: da.Array) -> None:
    state = {"iteration": st.iteration, "history": st.history, "converged": st.converged}
    store.save(_identity(spec, a), state, tall={"W": w}, small={"H": st.h})
    log.info("nmf: checkpoint at iteration %d", st.iteration)


def _load(store: CheckpointStore, spec: NMFSpec, a: da.Array) -> NMFState:
    from pipeline.backend import blocks_like
    from pipeline.linalg import NMFState

    state, tall, small = store.load(_identity(spec, a), a.chunks[0])
    w = blocks_like(tall["W"], a)  # back on the device when the job computes there
    return NMFState(
        w_blocks=w.to_delayed(optimize_graph=False)[:, 0].tolist(),
        h=small["H"],
        iteration=int(state["iteration"]),
        history=list(state["history"]),
        converged=bool(state["converged"]),
    )


# --------------------------------------------------------------------------- runner


def run(spec: NMFSpec, a: da.Array, ctx: RunContext) -> NMFMetrics:
    """Factorize with checkpoints, write ``W``, ``H`` and the convergence plot, measure."""
    import dask

    from pipeline import metrics as mx
    from pipeline.linalg import nmf, rsvd_passes
    from pipeline.linalg.nmf import INIT_POWER_ITERS
    from pipeline.plots import convergence_png

    m, n = a.shape
    a = ctx.blocks(a, spec)
    store = ctx.checkpoints
    state = None
    if spec.resume and store.exists():
        state = _load(store, spec, a)
        log.info("nmf: resuming from the checkpoint at iteration %d", state.iteration)
    elif spec.resume:
        log.warning("nmf: resume: true but no checkpoint was found; starting from the beginning")
    log.info(
        "nmf: rank %d of %d × %d %s, solver %s, init %s, up to %d iterations",
        spec.rank,
        m,
        n,
        a.dtype,
        spec.solver,
        spec.init,
        spec.max_iter,
    )
    clock = {"checkpoint": time.perf_counter(), "log": time.perf_counter()}

    def on_iteration(st: NMFState, w: da.Array) -> None:
        detail = f"error {st.history[-1]:.6f}"
        report(Progress(ctx.job_name, "nmf", st.iteration, spec.max_iter, "iteration", detail))
        now = time.perf_counter()
        if now - clock["log"] >= LOG_SECONDS or st.iteration == 1:
            log.info("nmf: iteration %d, relative error %.6f", st.iteration, st.history[-1])
            clock["log"] = now
        every = spec.checkpoint_every
        due = (
            st.iteration % every == 0 if every else now - clock["checkpoint"] >= CHECKPOINT_SECONDS
        )
        if due and not st.converged and st.iteration < spec.max_iter:
            _save(store, st, w, spec, a)
            clock["checkpoint"] = time.perf_counter()

    start_iteration = state.iteration if state else 0
    res = nmf(
        a,
        spec.rank,
        solver=spec.solver,
        init=spec.init,
        max_iter=spec.max_iter,
        tol=spec.tol,
        seed=spec.seed,
        state=state,
        on_iteration=on_iteration,
        inner_sweeps=spec.inner_sweeps,
    )
    if not res.converged:
        log.warning(
            "nmf: not converged after %d iterations (tol %g); raise max_iter or tol",
            res.iterations,
            spec.tol,
        )
    ctx.write("H", res.h)
    w_store = ctx.write("W", res.w)
    if ctx.plan.kept:  # the input is in memory: measure the residual directly, for free
        _, rsq = dask.compute(w_store, mx.residual_sq(res.a, res.w, res.h))
        residual, method = mx.relative(float(rsq), res.sumsq), "direct"
    else:
        dask.compute(w_store)
        residual, method = res.history[-1] if res.history else None, "objective"
    ctx.write_plot(PLOT, convergence_png(res.history, spec.solver))
    init_passes = 0 if state is not None or spec.init == "random" else rsvd_passes(INIT_POWER_ITERS)
    passes = 1 + init_passes + (res.iterations - start_iteration)
    return {
        "rank": spec.rank,
        "solver": spec.solver,
        "init": spec.init,
        "residual_rel": residual,
        "residual_method": method,
        "iterations": res.iterations,
        "converged": res.converged,
        "history": res.history,
        "resumed_from": start_iteration or None,
        "fro_norm": float(np.sqrt(res.sumsq)),
        "passes": passes,
        "reads_from_storage": 1 if ctx.plan.kept else passes,
    }


def pass_steps(spec: dict[str, Any], res: dict[str, Any]) -> list[PassStep]:
    """What each pass computed, from the spec and the metrics (the report's diagram)."""
    passes = res.get("passes") or 0
    resumed = res.get("resumed_from") or 0
    iterations = (res.get("iterations") or 0) - resumed
    init = passes - 1 - iterations  # the NNDSVD start's passes (none when resumed or random)
    steps = [PassStep(1, 1, "‖A‖², smallest and mean entry")]
    if init > 0:
        steps.append(PassStep(2, 1 + init, "NNDSVD start: randomized SVD"))
    if iterations > 0:
        done = f"{resumed + 1}" if iterations == 1 else f"s {resumed + 1}–{resumed + iterations}"
        steps.append(PassStep(2 + init, passes, f"iteration{done}: W from AHᵀ, H from WᵀA"))
    return steps


METHOD = Method(
    pass_steps=pass_steps,
    anndata=lambda spec: AnnDataSlots("X_nmf", "NMF_H"),
    sparse=True,
    name="nmf",
    spec=NMFSpec,
    check=check,
    run=run,
    cost=cost,
    arrays=(FactorArray("W", ("row", "component")), FactorArray("H", ("component", "col"))),
    headline=("residual_rel", "iterations", "converged", "passes", "seconds"),
    plots=(PLOT,),
    metrics=NMFMetrics,
    example={"method": "nmf", "rank": 3, "max_iter": 12, "tol": 0, "checkpoint_every": 4},
    checkpoints=True,
)
