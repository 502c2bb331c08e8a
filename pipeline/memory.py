"""Worker memory: what a method is predicted to need per worker, and what it used.

The prediction is a sum of block-sized pieces, each decided by the same code that runs
the method (its :class:`Cost`, :func:`pipeline.linalg.row_blocks`,
:func:`pipeline.cluster.keep_in_memory`)::

    peak per worker = baseline                        (the process with its libraries)
                    + kept blocks × block bytes        (input kept between passes)
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

if TYPE_CHECKING:
    from distributed import Client

# What a worker process holds before any block: Python, numpy/scipy, dask, distributed,
# zarr and the pipeline loaded (measured 130–180 MiB on Linux). With 3 blocks per TSQR
# task it separates what was measured: 31 MiB blocks die in 244 MiB workers, 37 MiB
# blocks run in 300 MiB ones.
WORKER_BASELINE = 160 * 2**20


def machine_memory() -> int:
    """Bytes of memory this machine gives its processes, as Dask counts it: the physical
    memory, or less under a container's (cgroup) or ``RLIMIT_RSS`` limit.

    A local cluster's ``memory_limit`` above it is silently cut down to it by
    ``distributed``; the job validation refuses such a value instead.
    """
    from distributed.system import MEMORY_LIMIT

    return int(MEMORY_LIMIT)


# Fan-in of the reduction trees of small factors (TSQR's R factors): a tree node stacks
# this many children (pipeline.linalg.tsqr's default split_every).
TREE_FAN_IN = 16


@dataclass(frozen=True)
class Cost:
    """What a method costs, declared by the method from its spec and the input's shape.

    Attributes
    ----------
    passes : passes over the input (an upper bound when ``exact`` is false: NMF stops
        when it converges, rsvd may add a direct residual pass)
    exact : whether ``passes`` is exact
    columns : columns of the matrix the method factorizes (the input's, or its transpose's)
    min_rows : rows a row block needs (what its local factorization needs)
    buffers : block-sized arrays a running task holds at once, the block included
    keeps : whether the input is kept in memory between passes when it fits
    state_columns : float64 columns of tall state kept with each row block between
        passes (rsvd's sketches, NMF's ``W``)
    block_squares : ``columns × columns`` arrays kept per row block (TSQR's factors)
    node_squares : ``columns × columns`` arrays a reduction-tree node holds per child
    output_blocks : block-sized results per block of the last pass (TSQR's ``Q``),
        computed faster than they are written: a worker holds those of all its kept
        blocks, or of its running and next tasks when the input is streamed
    transpose : the method factorizes the input's transpose
    """

    passes: int
    exact: bool
    columns: int
    min_rows: int
    buffers: int
    keeps: bool
    state_columns: int = 0
    block_squares: int = 0
    node_squares: int = 0
    output_blocks: int = 0
    transpose: bool = False

    def describe_passes(self) -> str:
        """``"3"``, or ``"up to 208"`` for an upper bound."""
        return str(self.passes) if self.exact else f"up to {self.passes}"


@dataclass(frozen=True)
class Workers:
    """The cluster as the prediction sees it: how many workers, threads each, memory each."""

    count: int
    threads: int
    memory_limit: int  # bytes per worker, 0 when unlimited or unknown


def workers_of(client: Client | None) -> Workers | None:
    """The running cluster's :class:`Workers` (``None`` without a client or workers)."""
    if client is None:
        return None
    info = list(client.scheduler_info(n_workers=-1)["workers"].values())
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
    kept_bytes = per_worker * block_bytes if kept else 0
    state = per_worker * (max(rows) * cost.state_columns * 8 + cost.block_squares * squares)
    # a kept block is one of the buffers of the task that reads it
    tasks = min(workers.threads, len(rows))
    running = tasks * (cost.buffers - int(kept)) * block_bytes
    outputs = cost.output_blocks * block_bytes * (per_worker if kept else tasks + 1)
    node = cost.node_squares * min(len(rows), TREE_FAN_IN) * squares
    return WORKER_BASELINE + kept_bytes + state + max(running + outputs, node)


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
    # a worker gone since is left out: the figures of the others still count
    read = client.run(_read_peak, workers=sorted(reset), on_error="ignore") if reset else {}
    figures = {addr: v for addr, v in read.items() if isinstance(v, int)}
    peaks.per_worker = figures or None
