"""The plan of a job, made once and executed as made (rechunker's plan vs executor).

:func:`make_plan` decides, per method, from the opened input and the workers: the row
blocks (and whether a sparse input is densified or the input transposed for them), whether
the input is kept in memory between passes, the passes and reads from storage, and the
predicted peak memory per worker. ``factorize validate --plan`` prints the plan of the
workers a local cluster will have (:func:`plan_job`); a run makes it from the workers it
got (:func:`plan_run`), executes exactly that object (:meth:`RunContext.blocks
<pipeline.methods.base.RunContext.blocks>` lays out the blocks it names and keeps what it
keeps) and records it in ``metrics.json`` (``plan``), where :func:`format_plan` renders it
the same way.

Every figure comes from the algorithm's :class:`~pipeline.cost.Cost` and the memory
policy of :mod:`pipeline.memory` (the keep rule, the block check, the peak prediction).
The cluster is known before it starts for the local kinds only; for the others the plan
says what the keep decision depends on, and the run decides from the workers it gets.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pipeline.cost import Cost
from pipeline.memory import (
    WORKER_BASELINE,
    Workers,
    check_block_memory,
    predicted_peak,
    will_keep,
)
from pipeline.model_plan import LayerPlan, ModelMethodPlan

if TYPE_CHECKING:
    import dask.array as da
    from distributed import Client

    from pipeline.config import JobConfig
    from pipeline.io.source import InputManifest
    from pipeline.io.stores import Location
    from pipeline.sections import ClusterSpec

log = logging.getLogger(__name__)

_MiB = 2**20


@dataclass(frozen=True)
class MethodPlan:
    """What one method will do and cost (see the module docstring); sizes in bytes."""

    method: str
    cost: Cost
    rows: tuple[int, ...]  # rows of each row block
    densify: bool  # a sparse input reaches the method as dense row blocks
    sparse: bool  # the blocks the method factorizes are sparse
    block_bytes: int  # the largest block in memory
    kept_bytes: int  # the input in memory as this method keeps it (densified or sparse)
    kept: bool | None  # None: decided by the workers the run gets
    reads: int  # reads of the input from storage (an upper bound unless cost.exact)
    peak: int | None  # per worker; None when the workers are not known before the run

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``metrics.json``)."""
        return {**asdict(self), "rows": list(self.rows)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodPlan:
        """The plan :meth:`to_dict` wrote."""
        return cls(**{**d, "cost": Cost(**d["cost"]), "rows": tuple(d["rows"])})


@dataclass(frozen=True)
class JobPlan:
    """The plan of a job: its input, its cluster as far as known, one entry per method."""

    name: str
    shape: tuple[int, int]
    dtype: str
    memory_bytes: int  # the input in memory (sparse: data, indices and indptr)
    stored_bytes: int | None  # on storage (None: not written yet)
    workers: Workers | None
    backend: str  # where the blocks live: numpy (host) or cupy (device)
    methods: tuple[MethodPlan, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``metrics.json``'s ``plan``)."""
        return {
            **asdict(self),
            "shape": list(self.shape),
            "methods": [m.to_dict() for m in self.methods],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobPlan:
        """The plan :meth:`to_dict` wrote."""
        workers = d["workers"]
        return cls(
            **{
                **d,
                "shape": tuple(d["shape"]),
                "workers": None if workers is None else Workers(**workers),
                "methods": tuple(MethodPlan.from_dict(m) for m in d["methods"]),
            }
        )


@dataclass(frozen=True)
class ModelJobPlan:
    """The plan of a job whose input is a model checkpoint (see :class:`JobPlan`)."""

    name: str
    tensors: int
    params: int
    stored_bytes: int
    workers: Workers | None
    backend: str
    methods: tuple[ModelMethodPlan, ...]
    kind: str = "model"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``metrics.json``'s ``plan``)."""
        return {**asdict(self), "methods": [m.to_dict() for m in self.methods]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelJobPlan:
        """The plan :meth:`to_dict` wrote."""
        workers = d["workers"]
        return cls(
            **{
                **d,
                "workers": None if workers is None else Workers(**workers),
                "methods": tuple(ModelMethodPlan.from_dict(m) for m in d["methods"]),
            }
        )


def make_model_plan(config: JobConfig, ckpt: Any, workers: Workers | None) -> ModelJobPlan:
    """The plan of a model job on the opened checkpoint ``ckpt`` and ``workers``."""
    from pipeline.methods import METHODS

    methods = tuple(
        METHODS[spec.method].plan_model(spec, ckpt, workers, f"methods[{i}]")
        for i, spec in enumerate(config.methods)
    )
    return ModelJobPlan(
        config.name, len(ckpt.tensors), ckpt.params(), ckpt.total_bytes, workers, "numpy", methods
    )


def local_workers(spec: ClusterSpec) -> Workers | None:
    """The workers a ``local`` cluster will have (``None`` for the other kinds)."""
    if spec.kind != "local":
        return None
    from distributed.worker_memory import parse_memory_limit

    from pipeline.cluster import local_defaults

    args = local_defaults(spec)
    count, threads = args["n_workers"], args["threads_per_worker"]
    limit = parse_memory_limit(
        spec.memory_limit, threads, total_cores=count * threads, logger=None
    )  # "auto": the machine's memory shared by the workers, as LocalCluster does
    return Workers(count, threads, int(limit or 0))


def stored_size(at: Location, array: str | None) -> int | None:
    """Bytes of the input ``array`` (or sparse group) of the store ``at`` on storage, from
    one listing."""
    path = at.join(array).path if array else at.path
    try:
        return int(at.fs.du(path, total=True))
    except (OSError, ValueError):
        return None


def _method_plan(
    spec: Any, a: da.Array, sparse_bytes: int | None, workers: Workers | None, on_device: bool
) -> MethodPlan:
    """The plan of one method (``spec``) on the input ``a`` (``sparse_bytes``: a sparse
    input's size in memory, else ``None``)."""
    from pipeline.methods import METHODS
    from pipeline.methods.base import block_bytes, method_blocks

    method = METHODS[spec.method]
    densify = sparse_bytes is not None and not method.sparse
    sparse = sparse_bytes is not None and method.sparse
    cost = method.cost(spec, a.shape)
    blocks = method_blocks(a, spec.block_rows, cost, densify)
    size = block_bytes(blocks, sparse_bytes if sparse else None)
    nbytes = (sparse_bytes if sparse else blocks.nbytes) * cost.layouts
    kept = None
    if not cost.keeps:
        kept = False
    elif workers is not None:
        kept = will_keep(nbytes, workers, on_device)
    peak = None
    if workers is not None and kept is not None:
        peak = predicted_peak(cost, blocks.chunks[0], size, kept, workers)
    reads = 1 if kept else cost.passes
    return MethodPlan(
        spec.method, cost, blocks.chunks[0], densify, sparse, size, nbytes, kept, reads, peak
    )


def make_plan(
    config: JobConfig,
    a: da.Array,
    manifest: InputManifest | None,
    workers: Workers | None,
    backend: str = "numpy",
    stored: int | None = None,
) -> JobPlan:
    """The plan of ``config`` on the opened input ``a`` (``manifest``: what was opened,
    ``None`` for a dense input the run will create; ``stored``: its bytes on storage) and
    ``workers`` (``None``: not known before the run)."""
    sparse_bytes = manifest.stored_bytes if manifest is not None else None
    in_memory = sparse_bytes if sparse_bytes is not None else a.nbytes
    on_device = backend != "numpy"
    methods = tuple(
        _method_plan(spec, a, sparse_bytes, workers, on_device) for spec in config.methods
    )
    return JobPlan(
        config.name, a.shape, str(a.dtype), int(in_memory), stored, workers, backend, methods
    )


def plan_job(config: JobConfig) -> JobPlan | ModelJobPlan | None:
    """The plan ``factorize validate --plan`` prints: for the workers a local cluster will
    have (opens the input's metadata and lists its store; reads no values and starts no
    cluster); ``None`` for a sparse input or a checkpoint the run will create (its
    non-zeros, which set the blocks, or its tensors are not known before)."""
    from pipeline.datasets import input_will_be_created, synthetic_array
    from pipeline.io.source import locate_input, open_matrix
    from pipeline.sections import SPARSE_KINDS

    created = input_will_be_created(config.input)
    if config.input_kind == "model":
        from pipeline.io.model import open_model

        if created:  # its tensors are known once it is written
            return None
        return make_model_plan(config, open_model(config.input)[0], local_workers(config.cluster))
    if created:
        spec = config.input.create_if_missing
        if spec.kind in SPARSE_KINDS:
            return None
        return make_plan(config, synthetic_array(spec), None, local_workers(config.cluster))
    at = locate_input(config.input)
    a, manifest = open_matrix(config.input, at=at)
    stored = stored_size(at, manifest.array)
    return make_plan(config, a, manifest, local_workers(config.cluster), stored=stored)


def plan_run(config: JobConfig, client: Client | None) -> JobPlan | ModelJobPlan:
    """The plan a run executes, for the workers of ``client``: the backend resolved, the
    input opened once; row blocks the workers cannot hold are refused, and a predicted
    peak above ``memory_limit`` is warned about.

    Raises
    ------
    ClusterError, ConfigError
    """
    from pipeline.backend import resolve_backend
    from pipeline.cluster import plan_workers
    from pipeline.io.source import locate_input, open_matrix

    if config.input_kind == "model":
        from pipeline.io.model import open_model

        return make_model_plan(config, open_model(config.input)[0], plan_workers(client, False))
    backend = resolve_backend(config.compute, config.cluster, client)
    at = locate_input(config.input)
    a, manifest = open_matrix(config.input, on_device=backend != "numpy", at=at)
    workers = plan_workers(client, on_device=backend != "numpy")
    plan = make_plan(config, a, manifest, workers, backend, stored_size(at, manifest.array))
    for p in plan.methods:
        if not p.sparse:
            n = plan.shape[0] if p.cost.transpose else plan.shape[1]
            check_block_memory(workers, max(p.rows), n, a.dtype, p.cost.buffers, p.method)
        limit = workers.memory_limit if workers is not None else 0
        if p.peak is not None and limit and p.peak > limit:
            log.warning(
                "%s: predicted peak %.0f MiB per worker exceeds memory_limit %.0f MiB; "
                "raise cluster.memory_limit or lower block_rows of the method",
                p.method,
                p.peak / _MiB,
                limit / _MiB,
            )
    return plan


# --------------------------------------------------------------------------- text


def _count(k: int, word: str) -> str:
    return f"{k} {word}" if k == 1 else f"{k} {word}s"


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", _MiB), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _kept_text(p: MethodPlan, plan: JobPlan) -> str:
    if not p.cost.keeps:
        return "input streamed (one pass)" if p.cost.passes == 1 else "input streamed"
    if p.kept is None:
        from pipeline.memory import PERSIST_FRACTION

        need = p.kept_bytes / PERSIST_FRACTION
        return (
            f"input kept in memory if the workers' memory_limit totals ≥ {_size(need)} "
            f"plus {WORKER_BASELINE // _MiB} MiB per worker"
        )
    return "input kept in memory" if p.kept else "input streamed (too large to keep)"


def _cluster_line(w: Workers | None) -> str:
    if w is None:
        return "  cluster: not known before it starts (decided from its workers at run time)"
    limit = _size(w.memory_limit) if w.memory_limit else "none"
    return (
        f"  cluster: {_count(w.count, 'worker')} × {_count(w.threads, 'thread')}, "
        f"memory_limit {limit} each"
    )


def _layer_text(layer: LayerPlan) -> str:
    rank = f"rank {layer.rank}" if layer.rank is not None else "rank chosen at run time"
    where = "distributed over the workers" if layer.distributed else "one task"
    return (
        f"    {layer.name}: {'×'.join(map(str, layer.shape))} {layer.dtype}"
        + (f" as {layer.matrix[0]}×{layer.matrix[1]}" if len(layer.shape) != 2 else "")
        + f", {rank}, {layer.solver}, {where}, {_size(layer.task_bytes)}"
    )


def format_model_plan(plan: ModelJobPlan) -> list[str]:
    """A model job's plan as lines of text for the terminal."""
    lines = [
        f"plan for {plan.name}: {plan.tensors} tensors, {plan.params:,} parameters, "
        f"{_size(plan.stored_bytes)} stored",
        _cluster_line(plan.workers),
    ]
    for p in plan.methods:
        factored = sum(layer.matrix[0] * layer.matrix[1] for layer in p.layers)
        budget = "" if p.budget is None else f"; budget {p.budget:,} parameters for them"
        peak = (
            f"predicted peak {_size(p.peak)} per worker"
            if p.peak is not None
            else "peak per worker predicted at run time (metrics.json)"
        )
        lines.append(
            f"  {p.method}: {_count(len(p.layers), 'layer')} factored ({factored:,} of "
            f"{p.params_before:,} parameters), {len(p.kept)} kept as they are{budget}; "
            f"reads each layer {p.passes}×; {peak}"
        )
        lines += [_layer_text(layer) for layer in p.layers]
        lines += [f"    kept {k.name}: {k.reason}" for k in p.kept]
    return lines


def format_plan(plan: JobPlan | ModelJobPlan) -> list[str]:
    """The plan as lines of text for the terminal."""
    if isinstance(plan, ModelJobPlan):
        return format_model_plan(plan)
    stored = (
        "not on storage yet" if plan.stored_bytes is None else f"{_size(plan.stored_bytes)} stored"
    )
    lines = [
        f"plan for {plan.name}: {plan.shape[0]} × {plan.shape[1]} {plan.dtype}, "
        f"{_size(plan.memory_bytes)} in memory, {stored}",
        _cluster_line(plan.workers),
    ]
    for p in plan.methods:
        reads = f"{p.reads}×" if p.cost.exact or p.kept else f"up to {p.reads}×"
        if p.kept is None:
            reads = f"once if kept, else {reads}"
        read_bytes = ""
        if plan.stored_bytes is not None:
            each = p.reads * plan.stored_bytes if p.kept is not None else plan.stored_bytes
            read_bytes = f", {_size(each)} from storage{' per read' * (p.kept is None)}"
        n = p.cost.columns
        lines.append(
            f"  {p.method}: {p.cost.describe_passes()} pass{'es' * (p.cost.passes > 1)}, "
            f"{_kept_text(p, plan)}; reads the input {reads}{read_bytes}; "
            f"{_count(len(p.rows), 'row block')} of ≤ {max(p.rows)} × {n} "
            f"({_size(p.block_bytes)}), {_count(len(p.rows), 'task')} per pass; "
            + (
                f"predicted peak {_size(p.peak)} per worker"
                if p.peak is not None
                else "peak per worker predicted at run time (metrics.json)"
            )
        )
        w = plan.workers
        if p.peak is not None and w is not None and w.memory_limit and p.peak > w.memory_limit:
            lines.append(
                f"  warning: {p.method}'s predicted peak exceeds memory_limit "
                f"({_size(w.memory_limit)}): raise cluster.memory_limit or lower block_rows"
            )
    return lines
