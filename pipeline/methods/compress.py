"""``method: compress`` — a model checkpoint's weights as low-rank factors, layer by layer.

Each selected weight ``W`` (``out × in``; a conv kernel ``(out, in, kh, kw)`` as
``out × in·kh·kw`` with ``conv: reshape``) becomes ``B`` (``out × r``) · ``A`` (``r × in``),
the best rank-``r`` approximation in the Frobenius norm (Eckart–Young), computed by
:mod:`pipeline.linalg.lowrank`. Three modes:

- plain: factor ``W``;
- activation-aware (``whiten: {grams}``, SVD-LLM, arXiv:2403.07378): factor ``W·S`` with
  ``S`` the Cholesky factor of the calibration Gram ``XᵀX`` of the layer's inputs, and
  return ``A = V_rᵀ S⁻¹``: that minimises the error of the layer's *outputs* on the
  calibration data, ``‖(W − BA)S‖_F``, instead of the weights';
- delta (``base``): factor ``W − W_base`` and write a PEFT LoRA adapter
  (``W_base + (alpha / r)·B·A ≈ W``, with ``alpha = r`` for every module).

Rank per layer: a fixed ``rank``; a rule per layer (``energy``, ``rel_error``, on the
spectrum of the matrix factored); or a global budget ``params_ratio`` (the whole
checkpoint keeps at most that share of its parameters) spread over the layers by
:func:`pipeline.linalg.lowrank.allocate_budget` (the sum over layers of the retained share
of each layer's energy is maximised). A layer whose rank would save nothing
(``r·(out + in) ≥ out·in``) is kept dense.

Work: one Dask task per layer (it reads its tensor by one byte-range request, factors it,
and writes its factors to a part file of the staging folder), and, for a layer too large
for one task, the distributed :func:`~pipeline.linalg.rsvd` over row blocks of it. The
parts are then assembled, in the checkpoint's tensor order, into
``compressed.safetensors`` (sharded above ``max_shard_bytes``) or, in delta mode, the
adapter folder. Memory: a worker holds the tasks it runs, one layer each.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import Discriminator, Field, Tag, model_validator
from typing_extensions import TypedDict

from pipeline.cost import Cost
from pipeline.errors import InputError
from pipeline.methods.base import Method, MethodMetrics, MethodSpec, PassStep, RunContext
from pipeline.sections import StrictModel

if TYPE_CHECKING:
    from pipeline.io.safetensors import Checkpoint, TensorInfo
    from pipeline.memory import Workers
    from pipeline.model_plan import KeptTensor, LayerPlan, ModelMethodPlan

log = logging.getLogger(__name__)

PLOT = "compress_layers.png"
COMPRESSED = "compressed"  # compressed.safetensors (+ .index.json and shards)
ADAPTER = "adapter"  # adapter/adapter_model.safetensors + adapter/adapter_config.json
PARTS = "compress.parts"  # scratch: one file of factors per layer, removed when assembled
_MiB = 2**20


# --------------------------------------------------------------------------- config


class CompressRank(StrictModel):
    """``rank:`` as a target: one of ``energy``, ``rel_error`` (per layer) or
    ``params_ratio`` (the whole checkpoint), with an optional per-layer ``max``."""

    energy: float | None = Field(
        None, gt=0, le=1, description="per layer: share of ‖M‖²_F to keep (M: the matrix factored)"
    )
    rel_error: float | None = Field(
        None, ge=0, lt=1, description="per layer: largest ‖M − BA‖_F / ‖M‖_F allowed"
    )
    params_ratio: float | None = Field(
        None,
        gt=0,
        le=1,
        description="whole checkpoint: parameters after / before at most this; ranks spread "
        "over the layers to keep the most of each layer's energy",
    )
    max: int | None = Field(None, ge=1, description="largest rank of any layer")

    @model_validator(mode="after")
    def _one_target(self) -> CompressRank:
        given = [n for n in ("energy", "rel_error", "params_ratio") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of energy, rel_error, params_ratio; got {given}")
        return self

    @property
    def target(self) -> dict[str, float]:
        """The rule as recorded in ``metrics.json``."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def _rank_kind(value: Any) -> str:
    return "rank-rule" if isinstance(value, dict | CompressRank) else "rank-number"


# Tagged like the SVD family's ``rank:`` (pipeline.methods.rank), so a bad mapping reports
# the rule's errors, not the integer branch's, and the tags stay out of error paths.
CompressRankField = Annotated[
    Annotated[int, Field(ge=1), Tag("rank-number")] | Annotated[CompressRank, Tag("rank-rule")],
    Discriminator(_rank_kind),
]


class WhitenSpec(StrictModel):
    """Activation-aware compression: per-layer Grams ``XᵀX`` of the layer's inputs."""

    grams: str = Field(
        description="safetensors file (or folder) of in × in Grams keyed like the weights"
    )
    ridge: float = Field(
        1e-6, ge=0, lt=1, description="added to the Gram's diagonal, × its mean diagonal"
    )


class CompressSpec(MethodSpec):
    """Low-rank factors of a model checkpoint's weights (see :mod:`pipeline.methods.compress`)."""

    method: Literal["compress"]
    rank: CompressRankField = Field(
        description="a rank for every layer, or {energy | rel_error | params_ratio, max}"
    )
    include: list[str] | None = Field(
        None,
        description="globs on tensor names; default: every float matrix (and conv kernel with "
        "conv: reshape) whose factors save parameters",
    )
    exclude: list[str] = Field(default_factory=list, description="globs on tensor names")
    solver: Literal["auto", "svd", "rsvd"] = Field(
        "auto",
        description="auto: randomized where the rank is ≤ 1/4 of min(out, in), exact otherwise",
    )
    power_iters: int = Field(4, ge=0, le=20, description="randomized solver's power iterations")
    seed: int = Field(0, ge=0)
    conv: Literal["keep", "reshape"] = Field(
        "keep", description="conv kernels (out, in, kh, kw): kept, or factored as out × in·kh·kw"
    )
    base: str | None = Field(
        None, description="delta mode: the base checkpoint; factor W − W_base, write a LoRA adapter"
    )
    whiten: WhitenSpec | None = None
    max_shard_bytes: int = Field(
        5 * 2**30, ge=2**20, description="compressed.safetensors is sharded above this size"
    )
    task_bytes: int | None = Field(
        None,
        ge=1,
        description="layers whose task would hold more are factored distributed over the "
        "workers; default: a worker thread's share of memory_limit",
    )

    @model_validator(mode="after")
    def _budget_is_not_for_adapters(self) -> CompressSpec:
        if self.base is not None and self.budget_ratio is not None:
            raise ValueError(
                "params_ratio is a budget for the compressed checkpoint; with base (a LoRA "
                "adapter) give a rank or an energy / rel_error rule"
            )
        return self

    @property
    def budget_ratio(self) -> float | None:
        """``params_ratio`` when the rank is a global budget."""
        return self.rank.params_ratio if isinstance(self.rank, CompressRank) else None

    @property
    def mode(self) -> str:
        """``plain``, ``whitened`` or ``delta``."""
        return "delta" if self.base else "whitened" if self.whiten else "plain"


class LayerMetrics(TypedDict, total=False):
    """One factored (or, by its rule, kept dense) layer in ``metrics.json``."""

    name: str
    shape: list[int]
    rank: int  # 0: kept dense (its rank saves nothing)
    params_before: int
    params_after: int
    fro_norm: float  # ‖M‖_F
    rel_error: float  # ‖M − BA‖_F / ‖M‖_F, of the factors as stored
    energy_retained: float  # Σ kept σ² / ‖M‖² of the matrix factored (W·S when whitened)
    weighted_rel_error: float | None  # ‖(W − BA)S‖ / ‖WS‖ (whitened)
    solver: str  # svd, rsvd, rsvd-distributed, dense
    rule_met: bool
    seconds: float


class CompressMetrics(MethodMetrics, total=False):
    """``compress`` in ``metrics.json``. ``residual_rel`` is over the factored layers
    together: ``√(Σ ‖M − BA‖² / Σ ‖M‖²)``. In delta mode ``params_after`` counts the
    adapter's parameters (and ``params_ratio`` is the adapter's share of the checkpoint)."""

    mode: Literal["plain", "whitened", "delta"]
    rank_policy: Any  # the rank or the rule
    params_before: int  # whole checkpoint
    params_after: int
    params_ratio: float
    bytes_before: int
    bytes_after: int
    layers: list[LayerMetrics]
    kept: list[dict[str, Any]]  # tensors copied unchanged, with the reason
    rank_histogram: dict[str, int]
    files: list[str]  # written, relative to the result folder


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Candidate:
    """A tensor the spec selects for factoring, as the matrix it factors."""

    info: TensorInfo
    matrix: tuple[int, int]


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _selected(spec: CompressSpec, name: str) -> bool:
    included = spec.include is None or any(fnmatch.fnmatchcase(name, p) for p in spec.include)
    return included and not any(fnmatch.fnmatchcase(name, p) for p in spec.exclude)


def _fixed_rank_saves(spec: CompressSpec, matrix: tuple[int, int]) -> bool:
    from pipeline.linalg.lowrank import max_saving_rank

    if isinstance(spec.rank, int):
        return spec.rank <= max_saving_rank(*matrix)
    return max_saving_rank(*matrix) >= 1


def select(spec: CompressSpec, ckpt: Checkpoint) -> tuple[list[Candidate], list[KeptTensor]]:
    """The tensors ``spec`` factors and those it keeps as they are (with the reason)."""
    from pipeline.io.safetensors import FLOAT_CODES
    from pipeline.model_plan import KeptTensor

    layers, kept = [], []
    for name, info in ckpt.tensors.items():

        def keep(reason: str, info: TensorInfo = info) -> None:
            kept.append(KeptTensor(info.name, tuple(info.shape), info.dtype, reason))

        ndim = len(info.shape)
        if not _selected(spec, name):
            keep("not selected by include / exclude")
        elif info.dtype not in FLOAT_CODES:
            keep(f"dtype {info.dtype} (float tensors only)")
        elif ndim == 4 and spec.conv == "keep":
            keep("conv kernel (conv: reshape factors it)")
        elif ndim not in (2, 4):
            keep(f"{ndim}-D")
        elif not _fixed_rank_saves(spec, _matrix_shape(info.shape)):
            r = spec.rank if isinstance(spec.rank, int) else 1
            keep(f"rank {r} saves nothing here (r·(out + in) ≥ out·in): kept dense")
        else:
            layers.append(Candidate(info, _matrix_shape(info.shape)))
    return layers, kept


# --------------------------------------------------------------------------- checks


def _open_side(url: str, ckpt: Checkpoint, what: str) -> Checkpoint:
    """A second checkpoint (``base`` or the Grams): on the input's filesystem (and its
    storage options) when the URL names the same protocol, else a local path."""
    from pipeline.io.safetensors import open_checkpoint
    from pipeline.io.stores import Location, locate

    fs = ckpt.fs
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    try:
        if scheme in protocols:
            at = Location(url, fs._strip_protocol(url), fs, {})
        else:
            at = locate(url)
    except (ValueError, ImportError) as exc:
        raise InputError(f"{what}: cannot open {url!r}: {exc}") from None
    return open_checkpoint(at, what)


def check(spec: CompressSpec, ckpt: Checkpoint, where: str) -> None:
    """Refuse, before any compute: include patterns matching no tensor, nothing to factor,
    a base or Grams that do not match the layers, a budget below rank 1 everywhere.

    Raises
    ------
    InputError
    """
    for pattern in spec.include or ():
        if not any(fnmatch.fnmatchcase(n, pattern) for n in ckpt.tensors):
            raise InputError(
                f"{where}.include: {pattern!r} matches no tensor of {ckpt.display} "
                f"(it holds {len(ckpt.tensors)}, e.g. {next(iter(ckpt.tensors), 'none')!r})"
            )
    layers, _ = select(spec, ckpt)
    if not layers:
        raise InputError(
            f"{where}: no tensor of {ckpt.display} to factor (float matrices whose factors "
            "save parameters, selected by include / exclude)"
        )
    if spec.base is not None:
        base = _open_side(spec.base, ckpt, f"{where}.base")
        for c in layers:
            other = base.tensors.get(c.info.name)
            if other is None or tuple(other.shape) != tuple(c.info.shape):
                got = "is missing" if other is None else f"has shape {list(other.shape)}"
                raise InputError(
                    f"{where}.base: tensor {c.info.name!r} {got} in {base.display}, "
                    f"{list(c.info.shape)} in input.url"
                )
    if spec.whiten is not None:
        grams = _open_side(spec.whiten.grams, ckpt, f"{where}.whiten.grams")
        for c in layers:
            g = grams.tensors.get(c.info.name)
            n = c.matrix[1]
            if g is None or tuple(g.shape) != (n, n):
                got = "is missing" if g is None else f"has shape {list(g.shape)}"
                raise InputError(
                    f"{where}.whiten.grams: the Gram of {c.info.name!r} {got} in "
                    f"{grams.display}; expected {n} × {n} (its input features)"
                )
    if spec.budget_ratio is not None:
        _budget(spec, ckpt, layers, where)


def _budget(spec: CompressSpec, ckpt: Checkpoint, layers: list[Candidate], where: str) -> int:
    """Parameters the factored layers may take under ``params_ratio`` (the others are
    counted as they are); refused when rank 1 everywhere does not fit."""
    factored = sum(c.matrix[0] * c.matrix[1] for c in layers)
    budget = int(spec.budget_ratio * ckpt.params()) - (ckpt.params() - factored)
    least = sum(c.matrix[0] + c.matrix[1] for c in layers)
    if budget < least:
        reachable = (ckpt.params() - factored + least) / ckpt.params()
        raise InputError(
            f"{where}.rank.params_ratio: {spec.budget_ratio} cannot be met: rank 1 for every "
            f"selected layer already gives {reachable:.4f} of the parameters"
        )
    return budget


# --------------------------------------------------------------------------- plan


def cost(spec: CompressSpec, shape: tuple[int, int]) -> Cost:
    """One layer's task: its passes over the tensor (2 with a budget: the spectrum, then
    the factors) and the float64 matrices it holds at once (the matrix, the base in delta
    mode, and the solver's workspace: an exact SVD's ``U`` and ``Vt`` are each as large)."""
    exact = spec.solver == "svd"
    buffers = 1 + int(spec.base is not None) + (2 if exact else 1)
    passes = 2 if spec.budget_ratio is not None else 1
    return Cost(passes, True, shape[1], shape[0], buffers, keeps=False)


def _task_bytes(spec: CompressSpec, c: Candidate) -> int:
    m, n = c.matrix
    grams = 3 * n * n * 8 if spec.whiten else 0  # the Gram, S and S⁻¹-related work
    small = 2 * min(m, n) ** 2 * 8  # the spectrum's Gram and its eigen work
    return cost(spec, c.matrix).buffers * m * n * 8 + c.info.nbytes + grams + small


def plan_model(
    spec: CompressSpec, ckpt: Checkpoint, workers: Workers | None, where: str
) -> ModelMethodPlan:
    """The layers, kept tensors, passes and predicted peak of ``spec`` on ``ckpt``."""
    from pipeline.memory import task_fits, tasks_peak
    from pipeline.model_plan import LayerPlan, ModelMethodPlan

    candidates, kept = select(spec, ckpt)
    limit = spec.task_bytes
    layers = []
    for c in candidates:
        size = _task_bytes(spec, c)
        distributed = size > limit if limit is not None else not task_fits(size, workers)
        rank = spec.rank if isinstance(spec.rank, int) else None
        solver = spec.solver if spec.solver != "auto" or rank is None else _auto(rank, c.matrix)
        layers.append(
            LayerPlan(c.info.name, tuple(c.info.shape), c.matrix, c.info.dtype, rank, solver,
                      distributed, size)
        )  # fmt: skip
    budget = _budget(spec, ckpt, candidates, where) if spec.budget_ratio is not None else None
    sizes = [layer.task_bytes for layer in layers if not layer.distributed]
    peak = tasks_peak(sizes, workers) if workers is not None and sizes else None
    passes = 2 if budget is not None else 1
    return ModelMethodPlan(
        spec.method, tuple(layers), tuple(kept), passes, ckpt.params(), budget, peak
    )


def _auto(rank: int, matrix: tuple[int, int]) -> str:
    from pipeline.linalg.lowrank import AUTO_RSVD_FRACTION

    return "rsvd" if rank <= AUTO_RSVD_FRACTION * min(matrix) else "svd"


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class LayerJob:
    """What one layer's task needs (small and picklable: checkpoints hold headers only)."""

    name: str
    matrix: tuple[int, int]
    ckpt: Checkpoint
    base: Checkpoint | None
    grams: Checkpoint | None
    ridge: float
    solver: str
    power_iters: int
    seed: int
    rank: int | None  # None: by the rule below
    energy: float | None
    rel_error: float | None
    max_rank: int | None


def _matrix(job: LayerJob) -> np.ndarray:
    """The matrix the layer factors, float64: ``W`` or ``W − W_base``, as ``out × in``."""
    from pipeline.io.safetensors import read_tensor

    w = read_tensor(job.ckpt, job.name).astype(np.float64).reshape(job.matrix)
    if job.base is not None:
        w -= read_tensor(job.base, job.name).astype(np.float64).reshape(job.matrix)
    return w


def _whitening(job: LayerJob) -> Any:
    from pipeline.io.safetensors import read_tensor
    from pipeline.linalg.lowrank import Whitening

    if job.grams is None:
        return None
    gram = read_tensor(job.grams, job.name).astype(np.float64)
    return Whitening.from_gram(gram, ridge=job.ridge)


def layer_spectrum(job: LayerJob) -> np.ndarray:
    """Pass 1 with a budget: the singular values of the matrix factored (``W·S`` when
    whitened)."""
    from pipeline.linalg.lowrank import spectrum

    w = _matrix(job)
    white = _whitening(job)
    return spectrum(w if white is None else white.apply(w))


def layer_spectrum_distributed(job: LayerJob) -> np.ndarray:
    """:func:`layer_spectrum` of a layer too large for one task: the Gram of its smaller
    side summed over its row blocks, then its eigenvalues (as :func:`spectrum` does)."""
    x = _rows(job)
    white = _whitening(job)
    m = x if white is None else x @ white.s
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    lam = np.linalg.eigvalsh(np.asarray(gram.compute(), dtype=np.float64))[::-1]
    return np.sqrt(np.clip(lam, 0.0, None))


def _rank_of(job: LayerJob, w: np.ndarray, white: Any) -> tuple[int, bool]:
    """The layer's rank (0: kept dense) and whether its rule is met."""
    from pipeline.linalg.lowrank import max_saving_rank, rank_for_target, spectrum

    cap = max_saving_rank(*job.matrix)
    if job.rank is not None:
        return (job.rank if job.rank <= cap else 0), True
    m = w if white is None else white.apply(w)
    s = spectrum(m)
    most = min(job.max_rank or cap, cap)
    k, met = rank_for_target(
        s, float(np.sum(s**2)), energy=job.energy, rel_error=job.rel_error, max_rank=most
    )
    if not met and (job.max_rank is None or job.max_rank >= cap):
        return 0, True  # the rule needs more than a saving rank: dense meets it exactly
    return k, met


def factor_layer(job: LayerJob, part: tuple[Any, str]) -> dict[str, Any]:
    """One layer's task: read, factor, write ``B`` then ``A`` (in the layer's dtype) to the
    part file ``part`` = ``(fs, path)``; return its metrics (rank 0: kept dense)."""
    import time

    from pipeline.io.safetensors import encode
    from pipeline.linalg.lowrank import factor

    t0 = time.perf_counter()
    out_dtype = job.ckpt.tensors[job.name].dtype
    w = _matrix(job)
    white = _whitening(job)
    rank, met = _rank_of(job, w, white)
    norm = float(np.linalg.norm(w))
    base = {"name": job.name, "shape": list(job.matrix), "rule_met": met, "fro_norm": norm}
    params = job.matrix[0] * job.matrix[1]
    if rank == 0:
        return {**base, "rank": 0, "params_before": params, "params_after": params,
                "rel_error": 0.0, "energy_retained": 1.0, "weighted_rel_error": None,
                "solver": "dense", "seconds": time.perf_counter() - t0}  # fmt: skip
    solver = job.solver if job.solver != "auto" else _auto(rank, job.matrix)
    res = factor(w, rank, solver=solver, seed=job.seed, power_iters=job.power_iters, whiten=white)
    b, a = encode(res.b, out_dtype), encode(res.a, out_dtype)
    fs, path = part
    fs.pipe_file(path, b + a)
    stored = _stored_error(w, res.b, res.a, out_dtype, norm)
    return {**base, "rank": rank, "params_before": params,
            "params_after": rank * sum(job.matrix), "rel_error": stored,
            "energy_retained": float(res.energy_retained),
            "weighted_rel_error": res.weighted_rel_error, "solver": res.solver,
            "b_bytes": len(b), "a_bytes": len(a), "seconds": time.perf_counter() - t0}  # fmt: skip


def _as_stored(x: np.ndarray, code: str) -> np.ndarray:
    """``x`` rounded to the safetensors dtype ``code`` it is written in, back in float64."""
    from pipeline.io.safetensors import bf16_to_float32, float32_to_bf16

    if code == "BF16":
        return bf16_to_float32(float32_to_bf16(x)).astype(np.float64)  # as encode rounds
    dtype = {"F16": np.float16, "F32": np.float32}.get(code)
    return x if dtype is None else x.astype(dtype).astype(np.float64)


def _stored_error(w: np.ndarray, b: np.ndarray, a: np.ndarray, code: str, norm: float) -> float:
    """``‖W − BA‖_F / ‖W‖_F`` (``norm``) of the factors as stored (rounded to ``code``,
    which adds up to its unit round-off to the error: 4e-3 relative for BF16), without a
    ``W``-sized temporary (:func:`~pipeline.linalg.lowrank.residual_sumsq`)."""
    from pipeline.linalg.lowrank import residual_sumsq

    if not norm:
        return 0.0
    sq = residual_sumsq(w, _as_stored(b, code), _as_stored(a, code), norm * norm)
    return math.sqrt(max(sq, 0.0)) / norm


# --------------------------------------------------------------------------- run


def _layer_job(spec: CompressSpec, c: LayerPlan, sides: dict[str, Any], rank: int | None):
    rule = spec.rank if isinstance(spec.rank, CompressRank) else None
    return LayerJob(
        c.name,
        tuple(c.matrix),
        sides["input"],
        sides["base"],
        sides["grams"],
        spec.whiten.ridge if spec.whiten else 0.0,
        spec.solver,
        spec.power_iters,
        spec.seed,
        rank,
        rule.energy if rule else None,
        rule.rel_error if rule else None,
        rule.max if rule else None,
    )


def _map(ctx: RunContext, fn: Any, items: list[tuple[Any, ...]]) -> list[Any]:
    """``fn(*item)`` for every item: one Dask task each on the client's cluster (in this
    process without one), results in order; progress reported per layer."""
    from pipeline.progress import Progress, report

    total, results = len(items), [None] * len(items)
    if ctx.client is None:
        for i, item in enumerate(items):
            results[i] = fn(*item)
            report(Progress(ctx.job_name, ctx.method.name, i + 1, total, "layer"))
        return results
    from distributed import as_completed

    futures = {ctx.client.submit(fn, *item, pure=False): i for i, item in enumerate(items)}
    for done, future in enumerate(as_completed(futures), 1):
        results[futures[future]] = future.result()
        report(Progress(ctx.job_name, ctx.method.name, done, total, "layer"))
        future.release()
    return results


def _ranks_by_budget(
    spec: CompressSpec, layers: list[LayerPlan], jobs: list[LayerJob], budget: int, ctx: RunContext
) -> list[int]:
    """Pass 1 with ``params_ratio``: every layer's spectrum, then the budget's ranks."""
    from pipeline.linalg.lowrank import allocate_budget

    local = [i for i, layer in enumerate(layers) if not layer.distributed]
    spectra = dict(
        zip(
            [layers[i].name for i in local],
            _map(ctx, layer_spectrum, [(jobs[i],) for i in local]),
            strict=True,
        )
    )
    for i, layer in enumerate(layers):  # too large for one task: the Gram over row blocks
        if layer.distributed:
            spectra[layer.name] = layer_spectrum_distributed(jobs[i])
    shapes = {layer.name: tuple(layer.matrix) for layer in layers}
    ranks = allocate_budget(spectra, shapes, budget)  # each layer's σ² as shares of its Σσ²
    return [ranks[layer.name] for layer in layers]


def run(spec: CompressSpec, ckpt: Checkpoint, ctx: RunContext) -> CompressMetrics:
    """Factor the layers as planned, assemble the output, measure."""
    from pipeline.io.compressed_out import write_adapter, write_compressed

    plan = ctx.plan
    layers = list(plan.layers)
    sides = {
        "input": ckpt,
        "base": _open_side(spec.base, ckpt, "base") if spec.base else None,
        "grams": _open_side(spec.whiten.grams, ckpt, "whiten.grams") if spec.whiten else None,
    }
    ranks: list[int | None] = [layer.rank for layer in layers]
    jobs = [_layer_job(spec, layer, sides, r) for layer, r in zip(layers, ranks, strict=True)]
    if plan.budget is not None:
        ranks = _ranks_by_budget(spec, layers, jobs, plan.budget, ctx)
        jobs = [_layer_job(spec, lay, sides, r) for lay, r in zip(layers, ranks, strict=True)]
    fs, stem = ctx.file_path(ADAPTER if spec.base else COMPRESSED)
    parts = f"{stem.rsplit('/', 1)[0]}/{PARTS}"
    fs.makedirs(parts, exist_ok=True)
    results: list[dict[str, Any]] = [{}] * len(layers)
    local = [i for i, layer in enumerate(layers) if not layer.distributed]
    part_of = {i: (fs, f"{parts}/{i}.bin") for i in range(len(layers))}
    done = _map(ctx, factor_layer, [(jobs[i], part_of[i]) for i in local])
    for i, res in zip(local, done, strict=True):
        results[i] = res
    for i, layer in enumerate(layers):
        if layer.distributed:
            results[i] = factor_distributed(jobs[i], part_of[i])
    files = (
        write_adapter(fs, stem, layers, results, part_of)
        if spec.base
        else write_compressed(
            ckpt, fs, stem, layers, results, part_of, spec.mode, spec.max_shard_bytes
        )
    )
    fs.rm(parts, recursive=True)
    metrics = _metrics(spec, ckpt, plan, results, files)
    ctx.write_plot(PLOT, _layers_png(metrics["layers"]))
    return metrics


# --------------------------------------------------------------------------- distributed


def _rows(job: LayerJob) -> Any:
    """The layer's matrix as a dask array of float64 row blocks of about 64 MiB, each read
    by one range request (and its base's rows subtracted in delta mode)."""
    import dask
    import dask.array as da

    from pipeline.io.safetensors import read_tensor

    m, n = job.matrix
    step = max(1, min(m, (64 * _MiB) // (n * 8)))

    def read(r0: int, r1: int) -> np.ndarray:
        x = read_tensor(job.ckpt, job.name, rows=(r0, r1)).astype(np.float64).reshape(-1, n)
        if job.base is not None:
            x -= read_tensor(job.base, job.name, rows=(r0, r1)).astype(np.float64).reshape(-1, n)
        return x

    blocks = [
        da.from_delayed(dask.delayed(read)(r0, min(r0 + step, m)), (min(r0 + step, m) - r0, n),
                        dtype=np.float64)
        for r0 in range(0, m, step)
    ]  # fmt: skip
    return da.concatenate(blocks, axis=0)


def _errors(x: Any, b: np.ndarray, a: np.ndarray, white: Any) -> tuple[float, float | None, float]:
    """``‖X − BA‖/‖X‖``, whitened ``‖(X − BA)S‖/‖XS‖``, and ``‖X‖``, in one pass over ``X``."""
    import dask
    import dask.array as da

    e = x - da.from_array(b, chunks=(x.chunks[0], b.shape[1])) @ a
    sums = [(e * e).sum(), (x * x).sum()]
    if white is not None:
        es, xs = e @ white.s, x @ white.s
        sums += [(es * es).sum(), (xs * xs).sum()]
    v = [float(t) for t in dask.compute(*sums)]
    rel = math.sqrt(v[0] / v[1]) if v[1] else 0.0
    weighted = (math.sqrt(v[2] / v[3]) if v[3] else 0.0) if white is not None else None
    return rel, weighted, math.sqrt(v[1])


def factor_distributed(job: LayerJob, part: tuple[Any, str]) -> dict[str, Any]:
    """A layer too large for one task: :func:`~pipeline.linalg.rsvd` over its row blocks
    (``W·S`` when whitened; the rank from the sketch's spectrum for a rule), then one pass
    for the errors of the factors as stored."""
    import time

    from pipeline.io.safetensors import encode
    from pipeline.linalg import rsvd
    from pipeline.linalg.lowrank import max_saving_rank, rank_for_target

    t0 = time.perf_counter()
    code = job.ckpt.tensors[job.name].dtype
    x = _rows(job)
    white = _whitening(job)
    cap = max_saving_rank(*job.matrix)
    want = job.rank if job.rank is not None else min(job.max_rank or cap, cap)
    res = rsvd(x if white is None else x @ white.s, want, power_iters=job.power_iters,
               seed=job.seed)  # fmt: skip
    k, met = want, True
    if job.rank is None:
        k, met = rank_for_target(
            res.s64, res.input_sumsq, energy=job.energy, rel_error=job.rel_error, max_rank=want
        )
    s, vt = res.s64[:k], np.asarray(res.vt[:k], dtype=np.float64)
    b = np.asarray(res.u[:, :k].compute(), dtype=np.float64) * s[None, :]
    a = vt if white is None else white.solve(vt)  # A = V_rᵀ S⁻¹
    b_bytes, a_bytes = encode(b, code), encode(a, code)
    part[0].pipe_file(part[1], b_bytes + a_bytes)
    stored_b, stored_a = _as_stored(b, code), _as_stored(a, code)
    rel, weighted, norm = _errors(x, stored_b, stored_a, white)
    return {
        "name": job.name,
        "shape": list(job.matrix),
        "fro_norm": norm,
        "rule_met": met,
        "rank": k,
        "params_before": job.matrix[0] * job.matrix[1],
        "params_after": k * sum(job.matrix),
        "rel_error": rel,
        "energy_retained": float(np.sum(s**2) / res.input_sumsq) if res.input_sumsq else 1.0,
        "weighted_rel_error": weighted,
        "solver": "rsvd-distributed",
        "b_bytes": len(b_bytes),
        "a_bytes": len(a_bytes),
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- metrics


def _metrics(
    spec: CompressSpec,
    ckpt: Checkpoint,
    plan: ModelMethodPlan,
    results: list[dict[str, Any]],
    files: list[str],
) -> CompressMetrics:
    layers = [{k: v for k, v in r.items() if not k.endswith("_bytes")} for r in results]
    saved = sum(r["params_before"] - r["params_after"] for r in results)
    before = ckpt.params()
    after = before - saved if not spec.base else sum(r["params_after"] for r in results)
    warnings = [
        f"layer {r['name']}: the rank rule {spec.rank.target} is not met at its max "
        f"(rank {r['rank']})"
        for r in results
        if not r["rule_met"]
    ]
    for w in warnings:
        log.warning("compress: %s", w)
    sq_norms = sum(r["fro_norm"] ** 2 for r in results)
    sq_errors = sum((r["rel_error"] * r["fro_norm"]) ** 2 for r in results)
    factored = [r for r in results if r["rank"]]
    bytes_after = sum(r.get("b_bytes", 0) + r.get("a_bytes", 0) for r in results)
    kept_bytes = sum(ckpt.tensors[r["name"]].nbytes for r in results if not r["rank"])
    other_bytes = ckpt.total_bytes - sum(ckpt.tensors[r["name"]].nbytes for r in results)
    return {
        "mode": spec.mode,
        "rank_policy": spec.rank if isinstance(spec.rank, int) else spec.rank.target,
        "params_before": before,
        "params_after": after,
        "params_ratio": after / before if before else 1.0,
        "bytes_before": ckpt.total_bytes,
        "bytes_after": bytes_after + (0 if spec.base else kept_bytes + other_bytes),
        "layers": layers,
        "kept": [k.to_dict() for k in plan.kept],
        "rank_histogram": dict(sorted(Counter(str(r["rank"]) for r in factored).items())),
        "residual_rel": math.sqrt(sq_errors / sq_norms) if sq_norms else None,
        "passes": plan.passes,
        "reads_from_storage": plan.passes,
        "files": files,
        "warnings": warnings,
    }


def _layers_png(layers: list[LayerMetrics]) -> bytes:
    from pipeline.plots import compress_png

    return compress_png(layers)


def report_lines(res: dict[str, Any]) -> list[str]:
    """The report's table per layer, the totals and the kept tensors."""
    mib = 2**20
    lines = [
        f"Parameters {res['params_before']:,} → {res['params_after']:,} "
        f"(ratio {res['params_ratio']:.4f}); bytes {res['bytes_before'] / mib:.1f} MiB → "
        f"{res['bytes_after'] / mib:.1f} MiB; ranks: "
        + ", ".join(f"{r}: {n}" for r, n in res.get("rank_histogram", {}).items()),
        "",
        "| layer | shape | rank | params before | params after | energy retained | "
        "rel. error | weighted rel. error | solver |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["layers"]:
        weighted = "—" if r.get("weighted_rel_error") is None else f"{r['weighted_rel_error']:.3g}"
        lines.append(
            f"| `{r['name']}` | {'×'.join(map(str, r['shape']))} | {r['rank'] or 'dense'} | "
            f"{r['params_before']:,} | {r['params_after']:,} | {r['energy_retained']:.4f} | "
            f"{r['rel_error']:.3g} | {weighted} | {r['solver']} |"
        )
    if res.get("kept"):
        lines += ["", f"Kept as they are: {len(res['kept'])} tensors ("]
        reasons = Counter(k["reason"] for k in res["kept"])
        lines[-1] += "; ".join(f"{n} {reason}" for reason, n in reasons.items()) + ")."
    return [*lines, ""]


def pass_steps(spec: dict[str, Any], res: dict[str, Any]) -> list[PassStep]:
    """What each pass over the checkpoint computed (the report's diagram)."""
    if res.get("passes") == 2:
        return [
            PassStep(1, 1, "every layer's spectrum; ranks spread over the budget"),
            PassStep(2, 2, "each layer factored at its rank; factors written"),
        ]
    return [PassStep(1, 1, "each layer read, its rank chosen, factored and written")]


METHOD = Method(
    name="compress",
    spec=CompressSpec,
    check=check,
    run=run,
    cost=cost,
    arrays=(),
    headline=("params_ratio", "params_after", "residual_rel", "passes", "seconds"),
    example={"method": "compress", "rank": {"energy": 0.9}},
    metrics=CompressMetrics,
    plots=(PLOT,),
    pass_steps=pass_steps,
    input="model",
    files=(COMPRESSED, ADAPTER),
    plan_model=plan_model,
    report=report_lines,
    side_inputs=lambda spec: [u for u in (spec.base, spec.whiten and spec.whiten.grams) if u],
)
