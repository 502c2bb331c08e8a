"""The plan of a job before it runs (``factorize validate --plan``): per method, the passes
over the input, the bytes read from storage, whether the input is kept in memory, the
row blocks and tasks per pass, and the predicted peak memory per worker.

Every figure comes from the code the run uses: the method's :class:`~pipeline.memory.Cost`,
:func:`~pipeline.methods.base.method_blocks` for the blocks, the keep-in-memory rule of
:func:`pipeline.cluster.keep_in_memory` and :func:`pipeline.memory.predicted_peak`. The
run records its own prediction next to the measured peak in ``metrics.json``
(``memory.predicted_peak``, ``memory.measured_peak``), so the plan can be checked.

The cluster is known before it starts for the local kinds only (workers, threads and
``memory_limit`` from the job and the machine); for the others the plan says what the
decision depends on, and the run decides from the workers it gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.memory import WORKER_BASELINE, Cost, Workers, predicted_peak

if TYPE_CHECKING:
    import dask.array as da

    from pipeline.config import ClusterSpec, JobConfig
    from pipeline.io.source import InputManifest

_MiB = 2**20


@dataclass(frozen=True)
class MethodPlan:
    """What one method will cost (see the module docstring); sizes in bytes."""

    method: str
    cost: Cost
    rows: tuple[int, ...]  # rows of each row block
    block_bytes: int  # the largest block in memory
    kept_bytes: int  # the input in memory as this method keeps it (densified or sparse)
    kept: bool | None  # None: decided by the workers the run gets
    reads: int  # reads of the input from storage (an upper bound unless cost.exact)
    peak: int | None  # per worker; None when the workers are not known before the run


@dataclass(frozen=True)
class JobPlan:
    """The plan of a job: its input, its cluster as far as known, one entry per method."""

    name: str
    shape: tuple[int, int]
    dtype: str
    memory_bytes: int  # the input in memory (sparse: data, indices and indptr)
    stored_bytes: int | None  # on storage (None: not written yet)
    workers: Workers | None
    methods: list[MethodPlan]


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


def stored_size(config: JobConfig) -> int | None:
    """Bytes of the input array (or sparse group) on storage, from one listing."""
    from pipeline.io.stores import split_url

    spec = config.input
    fs, root = split_url(spec.url, spec.storage_options)
    path = f"{root.rstrip('/')}/{spec.array}" if spec.array else root
    try:
        return int(fs.du(path, total=True))
    except (OSError, ValueError):
        return None


def _input(config: JobConfig) -> tuple[da.Array | None, InputManifest | None]:
    """The input as the methods see it (lazy), and its manifest (``None`` when the run
    will create it); no array for a sparse input the run will create (its non-zeros, which
    set the blocks, are not known before)."""
    from pipeline.config import SPARSE_KINDS
    from pipeline.datasets import synthetic_array
    from pipeline.io.source import open_matrix
    from pipeline.jobs import input_will_be_created

    if input_will_be_created(config):
        spec = config.input.create_if_missing
        return (None if spec.kind in SPARSE_KINDS else synthetic_array(spec)), None
    return open_matrix(config.input)


def plan_job(config: JobConfig) -> JobPlan | None:
    """The plan of ``config`` (opens the input's metadata and lists its store; reads no
    values and starts no cluster); ``None`` for a sparse input the run will create."""
    from pipeline.cluster import data_memory, will_keep
    from pipeline.io.sparse import densified
    from pipeline.methods import METHODS
    from pipeline.methods.base import block_bytes, method_blocks

    a, manifest = _input(config)
    if a is None:
        return None
    sparse_bytes = manifest.stored_bytes if manifest is not None else None
    in_memory = sparse_bytes if sparse_bytes is not None else a.nbytes
    workers = local_workers(config.cluster)
    plans = []
    for spec in config.methods:
        method = METHODS[spec.method]
        x = a if (sparse_bytes is None or method.sparse) else densified(a)
        cost = method.cost(spec, x.shape)
        blocks = method_blocks(x, spec, cost)
        size = block_bytes(blocks, sparse_bytes if method.sparse else None)
        nbytes = sparse_bytes if (sparse_bytes is not None and method.sparse) else blocks.nbytes
        kept = None
        if not cost.keeps:
            kept = False
        elif workers is not None:
            kept = will_keep(nbytes, workers.count * data_memory(workers.memory_limit))
        reads = 1 if kept else cost.passes
        peak = None
        if workers is not None and kept is not None:
            peak = predicted_peak(cost, blocks.chunks[0], size, kept, workers)
        plans.append(
            MethodPlan(spec.method, cost, blocks.chunks[0], size, nbytes, kept, reads, peak)
        )
    stored = stored_size(config) if manifest is not None else None
    return JobPlan(config.name, a.shape, str(a.dtype), int(in_memory), stored, workers, plans)


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
        from pipeline.cluster import PERSIST_FRACTION

        need = p.kept_bytes / PERSIST_FRACTION
        return (
            f"input kept in memory if the workers' memory_limit totals ≥ {_size(need)} "
            f"plus {WORKER_BASELINE // _MiB} MiB per worker"
        )
    return "input kept in memory" if p.kept else "input streamed (too large to keep)"


def format_plan(plan: JobPlan) -> list[str]:
    """The plan as lines of text for the terminal."""
    stored = (
        "not on storage yet" if plan.stored_bytes is None else f"{_size(plan.stored_bytes)} stored"
    )
    w = plan.workers
    lines = [
        f"plan for {plan.name}: {plan.shape[0]} × {plan.shape[1]} {plan.dtype}, "
        f"{_size(plan.memory_bytes)} in memory, {stored}",
        (
            f"  cluster: {_count(w.count, 'worker')} × {_count(w.threads, 'thread')}, memory_limit "
            f"{_size(w.memory_limit) if w.memory_limit else 'none'} each"
            if w
            else "  cluster: not known before it starts (decided from its workers at run time)"
        ),
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
        if p.peak is not None and w is not None and w.memory_limit and p.peak > w.memory_limit:
            lines.append(
                f"  warning: {p.method}'s predicted peak exceeds memory_limit "
                f"({_size(w.memory_limit)}): raise cluster.memory_limit or lower block_rows"
            )
    return lines
