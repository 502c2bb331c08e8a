"""Worker memory: what a method is predicted to need per worker, and what it used.

The prediction is a sum of block-sized pieces, each decided by the same code that runs
the method (its :class:`Cost`, :func:`pipeline.linalg.row_blocks`,
:func:`pipeline.cluster.keep_in_memory`)::

    peak per worker = baseline                        (the process with its libraries)
                    + kept blocks × block bytes × layouts  (input kept between passes)
                    + tall and small state             (factor blocks kept on the cluster)
                    + tasks × buffers × block bytes    (blocks a running task holds)
                    + outputs not yet written          (Q blocks of TSQR's second pass)

where ``tasks`` is the worker's threads. The measurement is the workers' own figure: the
peak resident set size of each worker process (Linux ``VmHWM``), reset when a method
starts, so it is that method's peak, whatever the worker held before.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.cost import TREE_FAN_IN, Cost
from pipeline.errors import ClusterError

if TYPE_CHECKING:
    from distributed import Client

# What a worker process holds before any block: Python, numpy/scipy, dask, distributed,
# zarr and the pipeline loaded (measured 130–180 MiB on Linux). With 3 blocks per TSQR
# task it separates what was measured: 31 MiB blocks die in 244 MiB workers, 37 MiB
# blocks run in 300 MiB ones.
WORKER_BASELINE = 160 * 2**20
_MiB = 2**20


def machine_memory() -> int:
    """Bytes of memory this machine gives its processes, as Dask counts it: the physical
    memory, or less under a container's (cgroup) or ``RLIMIT_RSS`` limit.

    A local cluster's ``memory_limit`` above it is silently cut down to it by
    ``distributed``; the job validation refuses such a value instead.
    """
    from distributed.system import MEMORY_LIMIT

    return int(MEMORY_LIMIT)


# Fraction of the workers' total memory_limit an input may take to be kept in memory
# between passes; the rest is head-room for blocks in flight and factor outputs.
PERSIST_FRACTION = 0.4


@dataclass(frozen=True)
class Workers:
    """The cluster as the prediction sees it: how many workers, threads each, memory each."""

    count: int
    threads: int
    memory_limit: int  # bytes per worker, 0 when unlimited or unknown
    device_memory: int = 0  # bytes of the workers' GPUs in all (0: none or not asked)
    adaptive: bool = False  # the cluster grows and shrinks: its size now says nothing

    def data_memory(self, on_device: bool = False) -> int:
        """Bytes the workers have for data: their devices' memory, or the sum of their
        ``memory_limit`` less each process's own (0 when unknown or unlimited)."""
        if on_device:
            return self.device_memory
        return self.count * data_memory(self.memory_limit)


def scheduler_workers(client: Client) -> dict[str, dict[str, Any]]:
    """The scheduler's record of each worker (address → info), fetched now.

    Not ``client.scheduler_info()``: the client's own refresh every 2 s stores an identity
    without workers, and it can land between that call's fetch and its return — a job
    then saw a cluster of 0 workers.
    """
    return client.sync(client.scheduler.identity, n_workers=-1)["workers"]


def workers_of(client: Client | None) -> Workers | None:
    """The running cluster's :class:`Workers` (``None`` without a client or workers)."""
    if client is None:
        return None
    info = list(scheduler_workers(client).values())
    if not info:
        return None
    limits = [int(w.get("memory_limit") or 0) for w in info]
    return Workers(
        count=len(info),
        threads=max(int(w.get("nthreads") or 1) for w in info),
        memory_limit=min((x for x in limits if x > 0), default=0),
    )


def predicted_peak(
    cost: Cost, rows: tuple[int, ...], block_bytes: int, kept: bool, workers: Workers
) -> int:
    """Peak memory of the busiest worker (bytes) for a method with ``cost`` on row blocks
    of ``rows`` rows, the largest ``block_bytes`` in memory.

    Blocks spread evenly, so the busiest worker keeps ``ceil(blocks / workers)`` of them
    and their state. Its tasks hold their buffers while the blocks' factors are kept; a
    reduction node runs after the blocks' tasks, so the larger of the two counts.
    """
    squares = cost.columns**2 * 8
    per_worker = math.ceil(len(rows) / max(workers.count, 1))
    kept_bytes = per_worker * block_bytes * cost.layouts if kept else 0
    state = per_worker * (max(rows) * cost.state_columns * 8 + cost.block_squares * squares)
    # a kept block is one of the buffers of the task that reads it
    tasks = min(workers.threads, len(rows))
    running = tasks * (cost.buffers - int(kept)) * block_bytes
    outputs = cost.output_blocks * block_bytes * (per_worker if kept else tasks + 1)
    node = cost.node_squares * min(len(rows), TREE_FAN_IN) * squares
    return WORKER_BASELINE + kept_bytes + state + max(running + outputs, node)


def data_memory(memory_limit: int) -> int:
    """What a worker with ``memory_limit`` has for data: the limit less its process
    (:data:`WORKER_BASELINE`); 0 when unlimited or unknown."""
    return max(memory_limit - WORKER_BASELINE, 0) if memory_limit else 0


def will_keep(size: int, workers: Workers | None, on_device: bool = False) -> bool:
    """The keep rule: an input of ``size`` bytes is kept in memory between passes when it
    fills at most :data:`PERSIST_FRACTION` of the workers' memory for data (their devices'
    with ``on_device``); never on an adaptive cluster or unknown workers."""
    if workers is None or workers.adaptive:
        return False
    memory = workers.data_memory(on_device)
    return bool(memory) and size <= memory * PERSIST_FRACTION


def task_fits(task_bytes: int, workers: Workers | None) -> bool:
    """Whether one task holding ``task_bytes`` at once fits its share of a worker: the
    worker's memory below the terminate threshold, less :data:`WORKER_BASELINE`, shared by
    its threads (each may run such a task). Unknown or unlimited workers: it fits."""
    if workers is None or not workers.memory_limit:
        return True
    usable = _usable_fraction() * workers.memory_limit - WORKER_BASELINE
    return task_bytes <= usable / max(workers.threads, 1)


def tasks_peak(task_bytes: list[int], workers: Workers) -> int:
    """Peak memory of a worker running independent tasks that hold ``task_bytes`` each:
    the process, plus its threads' worth of the largest tasks at once."""
    largest = sorted(task_bytes, reverse=True)[: max(workers.threads, 1)]
    return WORKER_BASELINE + sum(largest)


def _usable_fraction() -> float:
    """Share of ``memory_limit`` a worker may use before its nanny restarts it (a paused
    worker still finishes the task it runs)."""
    import dask

    terminate = dask.config.get("distributed.worker.memory.terminate", 0.95)
    return float(terminate) if terminate else 1.0


def check_block_memory(
    workers: Workers | None, rows: int, n: int, dtype: Any, buffers: int, method: str
) -> None:
    """Refuse, before computing, row blocks the workers cannot hold.

    A task of ``method`` holds ``buffers`` block-sized arrays at once (the block and the
    kernel's temporaries); a worker also needs :data:`WORKER_BASELINE` for its libraries,
    all below distributed's terminate threshold (95 % of ``memory_limit``), where the
    nanny restarts the worker. Without this check such workers are restarted again and
    again.

    Raises
    ------
    ClusterError
        One line naming the memory needed per worker and the two fixes.
    """
    limit = workers.memory_limit if workers is not None else 0
    if not limit:
        return
    row_bytes = n * np.dtype(dtype).itemsize
    need = WORKER_BASELINE + buffers * rows * row_bytes
    usable = _usable_fraction() * limit
    if need <= usable:
        return
    required = -(-need // int(_usable_fraction() * _MiB))  # MiB of memory_limit, rounded up
    fit = int((usable - WORKER_BASELINE) // (buffers * row_bytes))
    lower = (
        f"lower block_rows of {method} (at most {fit} rows fit)"
        if fit >= n
        else f"lowering block_rows of {method} cannot help ({n} columns)"
    )
    raise ClusterError(
        f"{method}: row blocks of {rows} × {n} {dtype} ({rows * row_bytes / _MiB:.0f} MiB, "
        f"{buffers} held at once per task, plus ~{WORKER_BASELINE // _MiB} MiB per worker "
        f"process) need a memory_limit of at least {required} MiB per worker, but the "
        f"workers have {limit / _MiB:.0f} MiB; raise cluster.memory_limit to {required}MiB "
        f"or more, or {lower}"
    )


# --------------------------------------------------------------------------- measurement

_HWM = re.compile(r"VmHWM:\s+(\d+) kB")


def _reset_peak() -> bool:
    """Reset this process's peak resident set size to its current size (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _read_peak() -> int | None:
    """This process's peak resident set size in bytes since the last reset."""
    try:
        with open("/proc/self/status") as f:
            found = _HWM.search(f.read())
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


@dataclass
class PeakMemory:
    """Each worker's peak resident memory over a ``with`` block (see :func:`measure_peaks`)."""

    per_worker: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """``measured_peak`` (the largest, bytes) and ``measured_peak_per_worker``
        (``{address: bytes}``); ``None`` when unmeasured."""
        figures = self.per_worker
        return {
            "measured_peak": max(figures.values()) if figures else None,
            "measured_peak_per_worker": figures,
        }


@contextmanager
def measure_peaks(client: Client | None) -> Iterator[PeakMemory]:
    """Measure each worker's peak resident memory while the block runs.

    Workers that cannot reset their peak (not Linux) or that were replaced during the block
    are left out; without a client or any measurable worker the figures are ``None``.
    """
    peaks = PeakMemory()
    if client is None:
        yield peaks
        return
    reset = {addr for addr, ok in client.run(_reset_peak).items() if ok}
    yield peaks
    # Ask the workers the scheduler has now, not the list above: a worker killed meanwhile
    # cost a 30 s connect timeout (distributed.comm.timeouts.connect) per dead address.
    # A replacement has a new address and an unreset peak: left out with the dead one.
    read = client.run(_read_peak, on_error="ignore") if reset else {}
    figures = {addr: v for addr, v in read.items() if addr in reset and isinstance(v, int)}
    peaks.per_worker = figures or None
