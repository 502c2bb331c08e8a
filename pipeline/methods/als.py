"""``method: als`` — matrix completion of a ratings matrix by alternating least squares (see
:mod:`pipeline.linalg.als`), explicit ratings or implicit feedback, with a hold-out, top-N
recommendations, checkpoints and resume.

The input is a sparse store (CSR/CSC group or AnnData) whose **stored entries are the
observed ratings**: a stored 0 is an observed 0, a missing entry is unknown — unlike SVD and
NMF, which read missing entries as zeros. Rows are users, columns items. Writes
``als/U`` (users × rank), ``als/V`` (items × rank), with ``biases`` ``als/user_bias`` and
``als/item_bias`` (a prediction is ``global_mean + user_bias[u] + item_bias[i] + U[u]·V[i]``),
with ``recommend`` ``als/top_items`` and ``als/top_scores`` (users × top_n, best first), and
a convergence plot. While it runs it checkpoints ``U``, ``V`` and the iteration state beside
the output; ``resume: true`` continues from there.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

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
from pipeline.sections import StrictModel

if TYPE_CHECKING:
    import dask.array as da

    from pipeline.linalg.als import ALSResult, ALSState

log = logging.getLogger(__name__)

PLOT = "als_convergence.png"
CHECKPOINT_SECONDS = 60  # default spacing of checkpoints without checkpoint_every
LOG_SECONDS = 5
EXAMPLE_USERS = 5  # users whose recommendations the report shows
RANKING_K = 10  # precision@10 and nDCG@10


class ImplicitFeedback(StrictModel):
    """Implicit feedback (clicks, plays): Hu–Koren–Volinsky confidence ``1 + alpha·r``."""

    alpha: float = Field(40.0, gt=0, description="confidence slope: c = 1 + alpha · r")


class Validation(StrictModel):
    """A hold-out of the observed entries, chosen deterministically per (user, item)."""

    fraction: float = Field(0.1, gt=0, lt=1, description="share of the entries held out")
    seed: int = Field(0, ge=0, description="which entries: a hash of (user, item, seed)")


class Recommend(StrictModel):
    """Top-N items per user, computed block by block (never the users × items scores)."""

    top_n: int = Field(10, ge=1, description="items per user, best first")
    exclude_seen: bool = Field(True, description="leave out the items the user has rated")


class ALSSpec(MethodSpec):
    """Alternating least squares on the observed entries: ``r_ui ≈ U[u] · V[i]``."""

    method: Literal["als"]
    rank: int = Field(ge=1, description="factors per user and item; rank < min(users, items)")
    reg: float = Field(
        0.1,
        ge=0,
        description="λ: explicit ratings scale it by each row's count (weighted-λ, as Spark "
        "and Zhou et al. 2008); implicit feedback does not (as Hu–Koren–Volinsky and implicit)",
    )
    iterations: int = Field(15, ge=1, description="most iterations (a user and an item step)")
    tol: float = Field(
        1e-4,
        ge=0,
        description="stop when the objective's relative decrease over one iteration is below tol",
    )
    implicit: Literal[False] | ImplicitFeedback = Field(
        False, description="false: explicit ratings; {alpha}: implicit feedback"
    )
    biases: bool = Field(False, description="explicit only: a global mean and user and item biases")
    solver: Literal["auto", "cholesky", "cg"] = Field(
        "auto", description="per-row systems: exact (cholesky) or conjugate gradient (cg)"
    )
    cg_steps: int = Field(3, ge=1, description="conjugate-gradient steps per row (solver cg)")
    cg_precision: Literal["float32", "float64"] = Field(
        "float32",
        description="arithmetic of the conjugate-gradient steps (the factors stay float64): "
        "float32 tracks float64 to about 1e-4 relative at 1.6× the speed, as implicit computes",
    )
    seed: int = Field(0, ge=0, description="random start of the factors")
    init: Literal["random"] = "random"
    validation: Validation | None = Field(
        None, description="hold out entries and measure on them after every iteration"
    )
    recommend: Recommend | None = Field(None, description="write top-N items per user")
    checkpoint_every: int | None = Field(
        None, ge=1, description="iterations between checkpoints; default: about every 60 s"
    )
    resume: bool = Field(False, description="continue from the last checkpoint of this job")

    @model_validator(mode="after")
    def _biases_are_explicit(self) -> ALSSpec:
        if self.biases and self.implicit:
            raise ValueError("biases: true is for explicit ratings; remove it or implicit")
        return self


class ALSMetrics(MethodMetrics, total=False):
    """``als`` in ``metrics.json``."""

    rank: int
    reg: float
    implicit: dict[str, float] | None  # {"alpha": …} for implicit feedback
    biases: bool
    solver: Literal["cholesky", "cg"]
    iterations: int
    converged: bool
    objective: float
    train_rmse: float | None
    train_mae: float | None
    validation_rmse: float | None  # explicit, with validation
    validation_mae: float | None
    precision_at_10: float | None  # implicit, with validation
    ndcg_at_10: float | None
    global_mean: float | None  # with biases
    users: int
    items: int
    ratings: int
    ratings_train: int
    ratings_validation: int
    empty_users: int  # no training entry: factors 0 (and bias 0)
    empty_items: int
    seconds_per_iteration: float
    history: list[dict[str, float]]  # per iteration: objective, RMSE/MAE, seconds
    resumed_from: int | None
    recommend: dict[str, Any] | None  # top_n, exclude_seen
    examples: list[dict[str, Any]]  # a few users' top items (ids when the input names them)


def check(spec: ALSSpec, shape: tuple[int, int], where: str) -> None:
    """Refuse a rank of at least the smaller dimension and a top-N above the items."""
    from pipeline.errors import InputError

    m, n = shape
    if spec.rank >= min(m, n):
        raise InputError(
            f"{where}.rank: {spec.rank} must be below min(users, items) = {min(m, n)} "
            f"for a {m} × {n} ratings matrix"
        )
    if spec.recommend is not None and spec.recommend.top_n > n:
        raise InputError(f"{where}.recommend.top_n: {spec.recommend.top_n} exceeds the {n} items")


def cost(spec: ALSSpec, shape: tuple[int, int]) -> Cost:
    """ALS's cost (:func:`pipeline.linalg.als.als_cost`) for this spec."""
    from pipeline.linalg.als import als_cost

    final = spec.recommend is not None or bool(spec.implicit and spec.validation)
    return als_cost(shape, rank=spec.rank, iterations=spec.iterations, final_pass=final)


# --------------------------------------------------------------------------- checkpoints


def _options(spec: ALSSpec) -> dict[str, Any]:
    return {
        "alpha": spec.implicit.alpha if spec.implicit else None,
        "biases": spec.biases,
        "reg": spec.reg,
        "seed": spec.seed,
        "solver": spec.solver,
        "cg_steps": spec.cg_steps,
        "cg_dtype": spec.cg_precision,
        "validation_fraction": spec.validation.fraction if spec.validation else 0.0,
        "validation_seed": spec.validation.seed if spec.validation else 0,
    }


def _identity(spec: ALSSpec, a: da.Array) -> dict[str, Any]:
    return {
        "shape": list(a.shape),
        "row_chunks": list(a.chunks[0]),
        "dtype": str(a.dtype),
        "rank": spec.rank,
        **_options(spec),
    }


def _save(store: CheckpointStore, st: ALSState, spec: ALSSpec, a: da.Array) -> None:
    from pipeline.linalg.als import state_arrays

    tall, small, extra = state_arrays(st)
    state = {"iteration": st.iteration, "history": st.history, "converged": st.converged, **extra}
    store.save(_identity(spec, a), state, tall=tall, small=small)
    log.info("als: checkpoint at iteration %d", st.iteration)


def _load(store: CheckpointStore, spec: ALSSpec, a: da.Array) -> ALSState:
    from pipeline.linalg.als import state_from_arrays

    state, tall, small = store.load(_identity(spec, a), a.chunks[0])
    return state_from_arrays(state, tall, small)


# --------------------------------------------------------------------------- runner


def _on_iteration(spec: ALSSpec, ctx: RunContext, a: da.Array) -> Any:
    """The per-iteration hook: progress, a log line every few seconds, checkpoints."""
    clock = {"checkpoint": time.perf_counter(), "log": time.perf_counter()}
    store = ctx.checkpoints

    def hook(st: ALSState) -> None:
        last = st.history[-1]
        shown = "validation_rmse" if "validation_rmse" in last else "objective"
        detail = f"{shown} {last[shown]:.6g}"
        report(Progress(ctx.job_name, "als", st.iteration, spec.iterations, "iteration", detail))
        now = time.perf_counter()
        if now - clock["log"] >= LOG_SECONDS or st.iteration == 1:
            log.info("als: iteration %d, %s", st.iteration, detail)
            clock["log"] = now
        every = spec.checkpoint_every
        due = (
            st.iteration % every == 0 if every else now - clock["checkpoint"] >= CHECKPOINT_SECONDS
        )
        if due and store is not None and not st.converged and st.iteration < spec.iterations:
            _save(store, st, spec, a)
            clock["checkpoint"] = time.perf_counter()

    return hook


def _check_kept(ctx: RunContext) -> None:
    """Refuse, before any compute, workers too small to keep the ratings in both layouts:
    streamed, every item half-step would gather them across the workers at once (its
    shuffle), unbounded by blocks.

    Raises
    ------
    ClusterError
    """
    from pipeline.errors import ClusterError
    from pipeline.memory import PERSIST_FRACTION

    if ctx.plan.kept is False:
        raise ClusterError(
            f"als keeps the ratings in worker memory by users and by items "
            f"({ctx.plan.kept_bytes / 2**20:.0f} MiB) and they need at most "
            f"{PERSIST_FRACTION:.0%} of the workers' memory for data: raise "
            "cluster.memory_limit or n_workers"
        )


def _factorize(spec: ALSSpec, a: da.Array, ctx: RunContext) -> tuple[ALSResult, int]:
    """Run ALS from the start or the job's checkpoint; ``(result, resumed iteration)``."""
    from pipeline.linalg.als import als

    store = ctx.checkpoints
    state = None
    if spec.resume and store is not None and store.exists():
        state = _load(store, spec, a)
        log.info("als: resuming from the checkpoint at iteration %d", state.iteration)
    elif spec.resume:
        log.warning("als: resume: true but no checkpoint was found; starting from the beginning")
    m, n = a.shape
    kind = f"implicit (alpha {spec.implicit.alpha:g})" if spec.implicit else "explicit"
    log.info(
        "als: rank %d of %d users × %d items, %s, reg %g, up to %d iterations",
        spec.rank,
        m,
        n,
        kind,
        spec.reg,
        spec.iterations,
    )
    resumed = state.iteration if state else 0  # before als() advances the state
    opts = _options(spec)
    res = als(
        a,
        spec.rank,
        iterations=spec.iterations,
        tol=spec.tol,
        keep=bool(ctx.plan.kept),
        state=state,
        on_iteration=_on_iteration(spec, ctx, a),
        **opts,
    )
    return res, resumed


def _seen(res: ALSResult) -> da.Array:
    """Every observed entry (training and held out): what a user has rated."""
    import dask.array as da

    if res.validation is None:
        return res.train
    return da.map_blocks(lambda t, v: t + v, res.train, res.validation, dtype=res.train.dtype)


def _examples(
    top_items: np.ndarray, top_scores: np.ndarray, names: Any | None
) -> list[dict[str, Any]]:
    """The first users' top items, by id when the input names its rows and columns."""
    rows = list(range(top_items.shape[0]))
    users = names("obs", rows) if names else None
    out = []
    for r in rows:
        items = [int(i) for i in top_items[r]]
        labels = names("var", items) if names else None
        out.append(
            {
                "user": users[r] if users else r,
                "items": labels if labels else items,
                "scores": [round(float(s), 4) for s in top_scores[r]],
            }
        )
    return out


def _recommend(spec: ALSSpec, res: ALSResult, ctx: RunContext) -> tuple[list[Any], Any]:
    """Lazy stores of ``top_items``/``top_scores``, and the lazy first rows for the report."""
    from pipeline.linalg.als import top_n

    rec = spec.recommend
    items, scores = top_n(
        res.u,
        res.v,
        rec.top_n,
        seen=_seen(res) if rec.exclude_seen else None,
        user_bias=res.user_bias,
        item_bias=res.item_bias,
        global_mean=res.global_mean,
    )
    stores = [ctx.write("top_items", items), ctx.write("top_scores", scores)]
    return stores, (items[:EXAMPLE_USERS], scores[:EXAMPLE_USERS])


def _last(history: list[dict[str, float]], key: str) -> float | None:
    value = history[-1].get(key) if history else None
    return None if value is None else float(value)


def run(spec: ALSSpec, a: da.Array, ctx: RunContext) -> ALSMetrics:
    """Factorize with checkpoints; write the factors, biases, top-N lists and the plot."""
    import dask

    from pipeline.linalg.als import ranking_metrics
    from pipeline.plots import als_png

    _check_kept(ctx)
    a = ctx.blocks(a, spec, persist=False)  # ALS keeps its own two layouts (ctx.plan.kept)
    res, resumed = _factorize(spec, a, ctx)
    if not res.converged and spec.tol > 0:
        log.warning(
            "als: not converged after %d iterations (tol %g); raise iterations or tol",
            res.iterations,
            spec.tol,
        )
    stores = [ctx.write("U", res.u), ctx.write("V", res.v)]
    if spec.biases:
        stores += [ctx.write("user_bias", res.user_bias), ctx.write("item_bias", res.item_bias)]
    examples_lazy = None
    if spec.recommend is not None:
        more, examples_lazy = _recommend(spec, res, ctx)
        stores += more
    ranking: Any = {}
    if spec.implicit and res.validation is not None:
        ranking = ranking_metrics(res.u, res.v, res.train, res.validation, k=RANKING_K)
    _, ranking, examples = dask.compute(stores, ranking, examples_lazy)
    ctx.write_plot(PLOT, als_png(res.history, implicit=bool(spec.implicit)))
    return _metrics(spec, a, res, resumed, ranking, examples, ctx)


def _metrics(
    spec: ALSSpec,
    a: da.Array,
    res: ALSResult,
    resumed: int,
    ranking: dict[str, float],
    examples: Any,
    ctx: RunContext,
) -> ALSMetrics:
    history = res.history
    done = res.iterations - resumed
    passes = 1 + 2 * done + (1 if examples is not None or ranking else 0)
    train_rmse = _last(history, "train_rmse")
    seconds = [h["seconds"] for h in history[resumed:] if "seconds" in h]
    return {
        "rank": spec.rank,
        "reg": spec.reg,
        "implicit": {"alpha": spec.implicit.alpha} if spec.implicit else None,
        "biases": spec.biases,
        "solver": res.solver,
        "iterations": res.iterations,
        "converged": res.converged,
        "objective": _last(history, "objective"),
        "train_rmse": train_rmse,
        "train_mae": _last(history, "train_mae"),
        "validation_rmse": _last(history, "validation_rmse"),
        "validation_mae": _last(history, "validation_mae"),
        "precision_at_10": ranking.get("precision") if ranking else None,
        "ndcg_at_10": ranking.get("ndcg") if ranking else None,
        "global_mean": res.global_mean,
        "users": a.shape[0],
        "items": a.shape[1],
        "ratings": res.nnz_train + res.nnz_validation,
        "ratings_train": res.nnz_train,
        "ratings_validation": res.nnz_validation,
        "empty_users": res.empty_users,
        "empty_items": res.empty_items,
        "seconds_per_iteration": float(np.median(seconds)) if seconds else 0.0,
        "history": history,
        "resumed_from": resumed or None,
        "recommend": spec.recommend.model_dump() if spec.recommend else None,
        "examples": _examples(*examples, ctx.names) if examples is not None else [],
        # ‖A − approx‖ over the training entries relative to their norm (explicit only)
        "residual_rel": res.residual_rel,
        "fro_norm": res.fro_norm,
        "passes": passes,
        "reads_from_storage": 1 if ctx.plan.kept else passes,
    }


def pass_steps(spec: dict[str, Any], res: dict[str, Any]) -> list[PassStep]:
    """What each pass computed, from the spec and the metrics (the report's diagram)."""
    passes = res.get("passes") or 0
    resumed = res.get("resumed_from") or 0
    done = (res.get("iterations") or 0) - resumed
    steps = [PassStep(1, 1, "split the hold-out, build the item layout, ‖A‖²")]
    if done > 0:
        what = (
            f"iterations {resumed + 1}–{resumed + done}" if done > 1 else f"iteration {resumed + 1}"
        )
        steps.append(PassStep(2, 1 + 2 * done, f"{what}: users from V, items from U"))
    if passes > 1 + 2 * done:
        steps.append(PassStep(passes, passes, "scores block by block: top-N, ranking metrics"))
    return steps


def report_lines(metrics: dict[str, Any]) -> list[str]:
    """The recommendations of the first users, by id, as a table."""
    examples = metrics.get("examples") or []
    if not examples:
        return []
    lines = ["", "Top items of the first users:", "", "| user | top items (score) |", "|---|---|"]
    for ex in examples:
        shown = ", ".join(
            f"{item} ({score:.3g})" for item, score in zip(ex["items"], ex["scores"], strict=False)
        )
        lines.append(f"| {ex['user']} | {shown} |")
    return lines


METHOD = Method(
    name="als",
    spec=ALSSpec,
    check=check,
    run=run,
    cost=cost,
    arrays=(
        FactorArray("U", ("user", "component")),
        FactorArray("V", ("item", "component")),
        FactorArray("user_bias", ("user",), when=lambda spec: spec.biases),
        FactorArray("item_bias", ("item",), when=lambda spec: spec.biases),
        FactorArray("top_items", ("user", "position"), when=lambda s: s.recommend is not None),
        FactorArray("top_scores", ("user", "position"), when=lambda s: s.recommend is not None),
    ),
    headline=(
        "validation_rmse",
        "precision_at_10",
        "train_rmse",
        "iterations",
        "converged",
        "seconds_per_iteration",
        "passes",
        "seconds",
    ),
    plots=(PLOT,),
    metrics=ALSMetrics,
    example={
        "method": "als",
        "rank": 3,
        "iterations": 4,
        "tol": 0,
        "validation": {"fraction": 0.2},
        "recommend": {"top_n": 3},
        "checkpoint_every": 2,
    },
    checkpoints=True,
    pass_steps=pass_steps,
    anndata=lambda spec: AnnDataSlots("X_als", "ALS_V"),
    sparse=True,
    needs_sparse=True,
    report=report_lines,
)
