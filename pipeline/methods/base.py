"""What a method is: its config model, its checks, its runner and the outputs it declares.

A method module defines a :class:`MethodSpec` subclass (its entry under ``methods:``) and a
:class:`Method` that bundles everything the rest of the pipeline needs to know about it.
The registry (:mod:`pipeline.methods`) builds the config union, the JSON Schema, the
report's table keys and plot links from these declarations, and :class:`RunContext` only
lets a runner write the arrays and plots its :class:`Method` declares — so a method cannot
forget a piece without a test noticing.

This module is imported by the config loader: it names no dask, zarr or distributed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import ConfigDict, Field
from typing_extensions import TypedDict

from pipeline.cost import Cost
from pipeline.sections import StrictModel

if TYPE_CHECKING:
    import dask.array as da
    from distributed import Client

    from pipeline.io.artifacts import RunOutput
    from pipeline.plan import MethodPlan

log = logging.getLogger(__name__)


class MethodMetrics(TypedDict, total=False):
    """What every method records in ``metrics.json`` (the lifecycle adds ``backend``,
    ``memory``, ``seconds`` and ``dask``). Each method declares its own keys in a
    subclass (:attr:`Method.metrics`); undeclared keys are refused by the contract test
    and ``factorize schema --metrics`` prints them all."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    residual_rel: float | None  # ‖A − approx‖_F / ‖A‖_F
    fro_norm: float  # ‖A‖_F
    passes: int  # over the input
    reads_from_storage: int
    backend: Literal["numpy", "cupy"]
    memory: dict[str, Any]  # predicted_peak, measured_peak, measured_peak_per_worker
    seconds: float
    warnings: list[str]  # results that may be off (a rule not met): log, report, metrics
    dask: dict[str, Any]  # the cluster that computed it (scheduler, workers, threads)


class SpectralMetrics(MethodMetrics, total=False):
    """The SVD family's metrics (``svd``, ``rsvd``): the spectrum and its shares."""

    rank: int
    rank_rule: dict[str, Any]  # the rule's target, with a rank rule
    rank_rule_met: bool
    singular_values: list[float]
    residual_method: Literal["direct", "formula", "spectrum_tail"] | None
    residual_rel_centered: float | None  # with center: true
    orthogonality_u: float | None
    orthogonality_v: float | None
    energy_retained: float
    explained_variance: list[float]  # with center: true
    explained_variance_ratio: list[float]
    total_variance: float


class MethodSpec(StrictModel):
    """Options every method accepts; each method's spec adds its own and a ``method`` tag."""

    method: str
    block_rows: int | None = Field(
        None, ge=1, description="rows per block; default: blocks of about 64 MiB"
    )


def check_tall_input(shape: tuple[int, int], transpose: bool, where: str) -> None:
    """Refuse a matrix that is wide for a method factorizing tall ones, naming the
    ``transpose`` option (``where`` is the field path, e.g. ``"methods[0]"``)."""
    from pipeline.linalg import check_tall

    if transpose:
        check_tall(shape[::-1], name=f"{where}: its transpose", hint="set transpose: false")
    else:
        hint = "set transpose: true to factorize the transpose"
        check_tall(shape, name=f"{where}: the input", hint=hint)


@dataclass(frozen=True)
class FactorArray:
    """An array a method writes to ``factors.zarr/<method>/<name>``.

    ``when`` says whether a given spec writes it (e.g. ``Q`` only with ``q: true``).
    """

    name: str
    dims: tuple[str, ...]
    when: Callable[[Any], bool] = field(default=lambda spec: True)


@dataclass(frozen=True)
class AnnDataSlots:
    """Where a method's factors go in ``adata.zarr`` for an AnnData input (scanpy's names).

    ``obsm/<obsm>`` gets the row scores (``U·diag(S)``, or ``W``), ``varm/<varm>`` the
    column loadings (``Vtᵀ``, or ``Hᵀ``), and ``uns/<uns>/`` the spectrum summary
    (``variance`` and ``variance_ratio`` for PCA, ``singular_values`` otherwise).
    """

    obsm: str
    varm: str
    uns: str | None = None


def spectral_arrays(
    writes_u: Callable[[Any], bool] = lambda spec: True,
    writes_vt: Callable[[Any], bool] = lambda spec: True,
) -> tuple[FactorArray, ...]:
    """The SVD family's outputs, declared once: ``U``, ``S``, ``Vt`` and, with ``center``,
    the column ``mean`` (``writes_u``/``writes_vt`` say when a spec writes the tall ones)."""
    return (
        FactorArray("U", ("row", "component"), when=writes_u),
        FactorArray("S", ("component",)),
        FactorArray("Vt", ("component", "col"), when=writes_vt),
        FactorArray("mean", ("col",), when=lambda spec: spec.center),
    )


# The SVD family's headline metrics (CLI summary, Prefect table).
SPECTRAL_HEADLINE = (
    "residual_rel",
    "orthogonality_u",
    "orthogonality_v",
    "energy_retained",
    "passes",
    "seconds",
)


def spectral_slots(spec: Any) -> AnnDataSlots:
    """SVD-type methods: PCA where scanpy keeps it (``center``), else an SVD beside it."""
    return (
        AnnDataSlots("X_pca", "PCs", "pca")
        if spec.center
        else AnnDataSlots("X_svd", "SVD_V", "svd")
    )


@dataclass(frozen=True)
class PassStep:
    """Passes ``first`` to ``last`` (1-based) of a method over its input, and what they
    compute."""

    first: int
    last: int
    what: str

    @property
    def label(self) -> str:
        """``pass 2: …`` or ``passes 2–5: …``."""
        if self.first == self.last:
            return f"pass {self.first}: {self.what}"
        return f"passes {self.first}–{self.last}: {self.what}"


@dataclass(frozen=True)
class Method:
    """Everything that makes a method, registered once in :mod:`pipeline.methods`.

    Attributes
    ----------
    name : the ``method:`` tag in job files and the group name in ``factors.zarr``
    spec : its config model (a :class:`MethodSpec` subclass with ``method: Literal[name]``)
    check : ``check(spec, shape, where)`` refuses, before any compute, a spec that cannot
        run on a matrix of ``shape`` (``where`` is the field path, e.g. ``"methods[0]"``)
    run : ``run(spec, a, ctx) -> metrics`` factorizes ``a`` and writes through ``ctx``
    cost : ``cost(spec, shape) -> Cost``: passes, block layout and memory per block (the
        runner lays out its blocks by it, ``factorize plan`` predicts from it)
    arrays : the arrays it may write, with their dimension names
    headline : metric keys shown in the CLI summary and the Prefect table artifact
    plots : file names of the plots it writes next to ``metrics.json``
    example : a small valid entry of ``methods:`` (docs and the contract test)
    metrics : the :class:`MethodMetrics` subclass naming what ``run`` returns
    pass_steps : ``pass_steps(spec, metrics)``: what each of the passes it made computed
        (the report's diagram; they must number the recorded passes, else the report
        draws one generic step)
    checkpoints : the runner saves checkpoints through ``ctx.checkpoints`` (the job's
        :class:`CheckpointStore`); the lifecycle removes them once the result is published
    anndata : ``anndata(spec)`` names the :class:`AnnDataSlots` of its factors in the
        ``adata.zarr`` written for AnnData inputs (``None``: not written there)
    sparse : ``run`` takes sparse row blocks as they are (``scipy.sparse``); otherwise a
        sparse input reaches it densified one row block at a time
    needs_sparse : the input must be a sparse store whose stored entries are observations
        (ALS's ratings: a missing entry is unknown, not zero); a dense one is refused
    input : what the method factorizes: ``"matrix"`` (a Zarr matrix: ``run`` gets a dask
        array, ``check`` its shape, ``cost`` prices it) or ``"model"`` (a safetensors
        checkpoint of many matrices: ``run`` and ``check`` get the opened
        :class:`~pipeline.io.safetensors.Checkpoint`, ``cost`` prices one layer's task)
    files : stems of the files it writes next to ``metrics.json`` besides plots
        (:meth:`RunContext.file_path`), e.g. ``compressed`` for ``compressed.safetensors``
    plan_model : a model method's plan, ``plan_model(spec, checkpoint, workers, where)``
        → :class:`~pipeline.plan.ModelMethodPlan` (its layers, kept tensors, passes, peak)
    report : ``report(metrics)``: Markdown lines of its own for the report (e.g. a table
        per layer), after the headline metrics
    side_inputs : ``side_inputs(spec)``: URLs it reads besides ``input.url`` (a base
        checkpoint, Grams), part of the job's fingerprint for ``skip_if_complete``
    """

    name: str
    spec: type[MethodSpec]
    check: Callable[[Any, tuple[int, int], str], None]
    run: Callable[[Any, da.Array, RunContext], dict[str, Any]]
    cost: Callable[[Any, tuple[int, int]], Cost]
    arrays: tuple[FactorArray, ...]
    headline: tuple[str, ...]
    example: dict[str, Any]
    metrics: type[MethodMetrics]
    plots: tuple[str, ...] = ()
    checkpoints: bool = False
    pass_steps: Callable[[dict[str, Any], dict[str, Any]], list[PassStep]] | None = None
    anndata: Callable[[Any], AnnDataSlots] | None = None
    sparse: bool = False
    needs_sparse: bool = False
    input: Literal["matrix", "model"] = "matrix"
    files: tuple[str, ...] = ()
    plan_model: Callable[[Any, Any, Any, str], Any] | None = None
    report: Callable[[dict[str, Any]], list[str]] | None = None
    side_inputs: Callable[[Any], list[str]] | None = None

    def arrays_for(self, spec: MethodSpec) -> dict[str, tuple[str, ...]]:
        """``{array name: dimension names}`` that ``spec`` writes."""
        return {a.name: a.dims for a in self.arrays if a.when(spec)}


@dataclass
class RunContext:
    """What a runner may touch: the staging output (only its declared arrays and plots),
    the Dask client, its part of the job's plan, and the runtime services the lifecycle
    hands it (checkpoints) — so a method imports no cluster or storage code."""

    method: Method
    out: RunOutput
    client: Client | None
    job_name: str
    plan: MethodPlan
    backend: str = "numpy"  # where the blocks live: numpy (host) or cupy (device)
    checkpoints: CheckpointStore | None = None  # this job's, for methods that checkpoint
    names: NameLookup | None = None  # the input's row/column ids, when it names them

    def write(self, name: str, x: Any) -> Any:
        """Write a declared factor array; a dask array returns a lazy store to compute."""
        dims = {a.name: a.dims for a in self.method.arrays}
        if name not in dims:
            raise KeyError(f"{self.method.name} does not declare an array {name!r}")
        return self.out.factor_array(self.method.name, name, x, dims[name])

    def write_plot(self, filename: str, png: bytes) -> None:
        """Write a declared plot next to ``metrics.json``."""
        if filename not in self.method.plots:
            raise KeyError(f"{self.method.name} does not declare a plot {filename!r}")
        self.out.write_bytes(filename, png)

    def file_path(self, stem: str) -> tuple[Any, str]:
        """``(filesystem, path)`` of the declared output ``stem`` in the staging folder (the
        method writes ``<path>.<suffix>`` files or a ``<path>/`` folder there)."""
        if stem not in self.method.files:
            raise KeyError(f"{self.method.name} does not declare a file {stem!r}")
        return self.out.fs, f"{self.out.staging.rstrip('/')}/{stem}"

    def blocks(self, a: da.Array, spec: MethodSpec, persist: bool = True) -> da.Array:
        """``a`` laid out as the plan says — densified, transposed and in its row blocks —
        and kept in memory when the plan keeps it (``persist=False``: the method keeps what
        it derives from ``a`` itself, as ALS keeps its two layouts).

        Raises
        ------
        RuntimeError
            When the input no longer gives the planned blocks (a plan made for another
            input: a bug, never a user error).
        """
        plan = self.plan
        x = method_blocks(a, spec.block_rows, plan.cost, plan.densify)
        if tuple(x.chunks[0]) != plan.rows:
            raise RuntimeError(f"{self.method.name}: the input's row blocks differ from the plan")
        if plan.kept and persist:
            log.info(
                "input (%.2f GiB) kept in memory: reading it once for %d passes",
                plan.kept_bytes / 2**30,
                plan.cost.passes,
            )
            return x.persist()
        log.info("input streamed from storage on every pass")
        return x

    def watch_pass(self, prefix: str, blocks: int, passes: int, done: int) -> Any:
        """A context in which the blocks of pass ``done + 1`` of ``passes`` are reported as
        their tasks (named ``prefix``) finish (see :func:`pipeline.progress.watch_blocks`)."""
        from pipeline.progress import Progress, report, watch_blocks

        def on_count(n: int) -> None:
            finished = done * blocks + min(n, blocks)
            detail = f"pass {done + 1}/{passes}"
            report(
                Progress(
                    self.job_name, self.method.name, finished, passes * blocks, "block", detail
                )
            )

        return watch_blocks(self.client, prefix, on_count)


class NameLookup(Protocol):
    """The ids of an input's rows (``"obs"``) or columns (``"var"``) at some positions
    (see :func:`pipeline.io.anndata_out.index_names`)."""

    def __call__(self, part: str, positions: list[int]) -> list[str] | None: ...


class CheckpointStore(Protocol):
    """A job's checkpoint (see :class:`pipeline.checkpoints.Checkpoints`)."""

    def exists(self) -> bool: ...

    def save(
        self,
        identity: dict[str, Any],
        state: dict[str, Any],
        tall: dict[str, Any],
        small: dict[str, Any],
    ) -> None: ...

    def load(
        self, identity: dict[str, Any], row_chunks: tuple[int, ...]
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]: ...


def method_blocks(a: da.Array, block_rows: int | None, cost: Cost, densify: bool) -> da.Array:
    """The row blocks a method with ``cost`` factorizes: ``a`` densified one row block at a
    time (a sparse input of a dense method), transposed if ``cost`` says so, in row blocks
    of ``block_rows`` or the default size."""
    from pipeline.io.sparse import densified
    from pipeline.linalg import row_blocks

    x = densified(a) if densify else a
    return row_blocks(x.T if cost.transpose else x, block_rows, min_rows=cost.min_rows)


def block_bytes(a: da.Array, sparse_bytes: int | None = None) -> int:
    """Bytes in memory of ``a``'s largest row block (a sparse input's share of its size)."""
    from pipeline.backend import is_sparse

    rows = max(a.chunks[0])
    if is_sparse(a._meta) and sparse_bytes is not None:
        return -(-sparse_bytes * rows // a.shape[0])
    return rows * a.shape[1] * a.dtype.itemsize
