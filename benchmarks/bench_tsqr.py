"""Benchmark ``pipeline.linalg.tsqr`` against a plain read and ``dask.array.linalg.tsqr``.

What is measured (all on one LocalCluster of 2 worker processes × 1 thread, BLAS limited to
one thread per worker, reading the same Zarr array from storage every time; the input is
never persisted in memory):

1. read-once   ``da.from_zarr(path).sum().compute()``: the cost of one pass over the input.
2. ours R      ``tsqr(x, compute_q=False)`` until ``R`` is on the client (one pass).
3. ours Q+R    ``tsqr(x)`` and ``Q`` stored to a fresh Zarr array (``R`` pass + ``Q`` pass),
               uncompressed as a job stores it (``output.codec: none``, its default).
4. dask R      ``dask.array.linalg.tsqr(x)``, computing only ``r``.
5. dask Q+R    ``dask.array.linalg.tsqr(x)``, storing ``q`` to Zarr as ``da.to_zarr`` does
               (zarr's default zstd) and computing ``r`` in the same graph.
6. dask Q+R none  the same with ``q`` stored uncompressed, as ours: the algorithms alone.

After a warm-up, the methods run in rounds (each method once per round, ``--repeats``
rounds, default 2); best and median are reported. Before every timed run the file system
is synced (untimed), so dirty pages of the generated input or of an earlier ``Q`` are not
written back during the next run; ``Q`` writes are timed until they reach the page cache.
Per run, worker time is broken down by task prefix from the task stream.

The bars checked are ours Q+R / dask Q+R ≤ 0.7 and ours R / read-once ≤ 2.0.
Correctness is checked cheaply: our ``R`` against dask's up to row signs, and
``‖QᵀQ − I‖_F`` of the stored ``Q``.

An out-of-core run follows on a second cluster whose total ``memory_limit`` is a quarter of
the input (floored at what a worker process needs to start; the ratio used is printed):
ours Q+R once, with peak cluster memory, worker restarts and memory warnings. When that
attempt does not finish cleanly, larger limits are tried until one does.

``--tiny`` (20,000 × 16, one round) is a smoke run of all of the above in seconds: the
out-of-core part is one attempt on one worker of 512 MiB (the input is far below a worker's
own footprint), and it exits non-zero when that attempt fails.

Finally one block is profiled in this process (BLAS limited to one thread): read, write,
our per-block kernels, and ``numpy.linalg.qr`` of the same block.

Usage::

    python benchmarks/bench_tsqr.py --tiny       # 20,000 × 16 (smoke run, seconds)
    python benchmarks/bench_tsqr.py --small      # 400,000 × 64 (~195 MiB)
    python benchmarks/bench_tsqr.py              # 4,000,000 × 64 (~1.9 GiB)

Inputs are generated once under ``--data-dir`` (default ``data/bench``, git-ignored) and
reused; the ``Q`` outputs are deleted afterwards.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from dask.utils import key_split
from distributed import Client, LocalCluster, get_task_stream
from distributed.diagnostics import MemorySampler
from floor import Floor, floor_line, gemm_rate, qr_flops

from pipeline.cluster import local_defaults
from pipeline.config import ClusterSpec, SyntheticSpec
from pipeline.datasets import write_synthetic
from pipeline.io.artifacts import factor_compressors
from pipeline.linalg import _kernels as kernels
from pipeline.linalg import row_blocks, tsqr
from pipeline.memory import scheduler_workers
from pipeline.metrics import gram, orthogonality_from_gram

FULL_SHAPE = (4_000_000, 64)
SMALL_SHAPE = (400_000, 64)
CHUNK_ROWS = 65_536  # 32 MiB float64 storage chunks spanning all 64 columns
TINY_SHAPE, TINY_CHUNK_ROWS = (20_000, 16), 2_048  # --tiny: a smoke run of every code path
BAR_QR_VS_DASK = 0.7
BAR_R_VS_READ = 2.0
OOC_FRACTION = 0.25  # out-of-core cluster: total memory_limit / input size
# A worker process with numpy/dask/zarr imported takes ~160 MiB, and distributed pauses a
# worker at 80 % of its limit: below ~200 MiB an idle worker pauses and the attempt only
# waits out its timeout (seen with --small, whose quarter of the input is below the floor).
OOC_FLOOR = 256 * 2**20
OOC_LARGER = (320, 384, 512, 768)  # MiB per worker, tried when an attempt fails
OOC_MAX_RESTARTS = 8  # give an out-of-core attempt up after this many worker restarts
TINY_OOC_MEMORY = 512 * 2**20  # --tiny: one 1-worker attempt; 192 MiB pauses an idle worker
MiB = 2**20

Phases = dict[str, float]  # phase name → seconds, as returned by the methods


# --------------------------------------------------------------------------- data


def ensure_input(data_dir: Path, shape: tuple[int, int], chunk_rows: int = CHUNK_ROWS) -> Path:
    """Path of the Gaussian input; written (on the current cluster) when missing."""
    m, n = shape
    path = data_dir / f"gaussian_{m}x{n}_c{chunk_rows}.zarr"
    if path.exists():
        z = zarr.open_array(str(path), mode="r")
        if z.shape == shape and z.chunks == (chunk_rows, n):
            print(f"reusing {path}")
            return path
        shutil.rmtree(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    spec = SyntheticSpec(
        kind="gaussian", shape=shape, chunks=(chunk_rows, n), dtype="float64", seed=0
    )
    t0 = time.perf_counter()
    write_synthetic(str(tmp), spec)
    tmp.rename(path)  # only a complete array gets the final name
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    return path


def fresh_output(path: Path, like: da.Array, codec: str = "none") -> zarr.Array:
    """An empty Zarr array for a tall factor, chunked by its first row chunk, compressed as
    a job's ``output.codec`` (``none``, its default; ``zstd`` is zarr's default, what
    ``da.to_zarr`` writes)."""
    shutil.rmtree(path, ignore_errors=True)
    return zarr.create_array(
        store=str(path),
        shape=like.shape,
        dtype=like.dtype,
        chunks=(like.chunks[0][0], like.shape[1]),
        compressors=factor_compressors(codec),
        overwrite=True,
    )


# --------------------------------------------------------------------------- methods
# Each takes the input path and a scratch output path and returns (R or None, phases).


def read_once(src: Path, out: Path) -> tuple[None, Phases]:
    da.from_zarr(str(src)).sum().compute()
    return None, {}


def ours_r(src: Path, out: Path) -> tuple[np.ndarray, Phases]:
    return tsqr(da.from_zarr(str(src)), compute_q=False).r, {}


def ours_qr(src: Path, out: Path) -> tuple[np.ndarray, Phases]:
    t0 = time.perf_counter()
    res = tsqr(da.from_zarr(str(src)), compute_q=True)
    t1 = time.perf_counter()
    da.store(res.q, fresh_output(out, res.q), lock=False)
    t2 = time.perf_counter()
    return res.r, {"tsqr()": t1 - t0, "store Q": t2 - t1}


def dask_r(src: Path, out: Path) -> tuple[np.ndarray, Phases]:
    _, r = da.linalg.tsqr(da.from_zarr(str(src)))
    return r.compute(), {}


def dask_qr(src: Path, out: Path, codec: str = "zstd") -> tuple[np.ndarray, Phases]:
    """dask's tsqr with Q stored as ``da.to_zarr`` stores it (zarr's default zstd)."""
    q, r = da.linalg.tsqr(da.from_zarr(str(src)))
    stored = da.store(q, fresh_output(out, q, codec), lock=False, compute=False)
    _, r = dask.compute(stored, r)
    return r, {}


def dask_qr_uncompressed(src: Path, out: Path) -> tuple[np.ndarray, Phases]:
    """The same, Q stored uncompressed as ours: the algorithms alone compared."""
    return dask_qr(src, out, "none")


METHODS: dict[str, Callable[[Path, Path], tuple[Any, Phases]]] = {
    "read-once": read_once,
    "ours R": ours_r,
    "ours Q+R": ours_qr,
    "dask R": dask_r,
    "dask Q+R": dask_qr,
    "dask Q+R none": dask_qr_uncompressed,
}


def format_phases(phases: Phases) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())


# --------------------------------------------------------------------------- timing


@dataclass
class Run:
    seconds: float
    peak_mem: float  # cluster-wide process memory, bytes
    phases: Phases
    tasks: dict[str, tuple[int, float]]  # task prefix → (count, worker seconds)
    result: Any = None


@dataclass
class Timing:
    runs: list[Run] = field(default_factory=list)
    result: Any = None

    @property
    def best(self) -> Run:
        return min(self.runs, key=lambda r: r.seconds)

    @property
    def median(self) -> float:
        return float(np.median([r.seconds for r in self.runs]))


def task_breakdown(stream: list[dict]) -> dict[str, tuple[int, float]]:
    """Worker compute time per task prefix (fused tasks are named after all their parts).

    The task stream can list one execution twice (seen for the input reads of ``tsqr``'s
    persisted pass), so executions are counted once per (key, worker, start).
    """
    out: dict[str, list] = defaultdict(lambda: [0, 0.0])
    seen = set()
    for task in stream:
        for span in task["startstops"]:
            ident = (str(task["key"]), task.get("worker"), span["start"])
            if span["action"] == "compute" and ident not in seen:
                seen.add(ident)
                entry = out[key_split(task["key"])]
                entry[0] += 1
                entry[1] += span["stop"] - span["start"]
    return {k: (n, s) for k, (n, s) in out.items()}


def peak(sampler: MemorySampler, label: str) -> float:
    samples = sampler.samples.get(label) or [(0, 0)]
    return float(max(v for _, v in samples))


def timed_run(fn: Callable[[Path, Path], tuple[Any, Phases]], src: Path, out: Path) -> Run:
    """One run of ``fn`` from a synced file system; its Q output is deleted afterwards."""
    os.sync()
    sampler = MemorySampler()
    with sampler.sample("run", measure="process", interval=0.25), get_task_stream() as ts:
        t0 = time.perf_counter()
        result, phases = fn(src, out)
        seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return Run(seconds, peak(sampler, "run"), phases, task_breakdown(ts.data), result)


def warm_up(src: Path, out: Path) -> None:
    """Import and run every code path once on tiny data, and touch the input."""
    x = da.random.default_rng(1).standard_normal((20_000, 64), chunks=(5_000, 64))
    tiny = out.with_name("warmup.zarr")
    x.to_zarr(str(tiny), overwrite=True)
    for fn in METHODS.values():
        fn(tiny, out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(tiny, ignore_errors=True)
    da.from_zarr(str(src))[:CHUNK_ROWS].sum().compute()


# --------------------------------------------------------------------------- checks


def r_difference(r_ours: np.ndarray, r_dask: np.ndarray) -> tuple[float, float]:
    """Max relative difference of |diag R| and ‖R_ours − S R_dask‖_F / ‖R‖_F with signs S."""
    d_ours, d_dask = np.abs(np.diag(r_ours)), np.abs(np.diag(r_dask))
    diag = float(np.max(np.abs(d_ours - d_dask) / d_dask))
    signs = np.where(np.diag(r_dask) < 0, -1.0, 1.0)
    full = float(np.linalg.norm(r_ours - signs[:, None] * r_dask) / np.linalg.norm(r_ours))
    return diag, full


def stored_orthogonality(path: Path) -> float:
    return orthogonality_from_gram(gram(da.from_zarr(str(path))).compute())


def blas_threads(client: Client) -> set[int]:
    def probe() -> int:
        from threadpoolctl import threadpool_info

        return max((p["num_threads"] for p in threadpool_info()), default=0)

    return set(client.run(probe).values())


# --------------------------------------------------------------------------- clusters


@contextmanager
def cluster(memory_limit: str | int = "auto", n_workers: int = 2) -> Iterator[Client]:
    spec = ClusterSpec(n_workers=n_workers, threads_per_worker=1, memory_limit=memory_limit)
    with LocalCluster(**local_defaults(spec)) as lc, Client(lc) as client:
        yield client


class WarningLog(logging.Handler):
    """Collect WARNING+ records of ``distributed`` emitted in this process (nanny, scheduler)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"[{record.name}] {record.getMessage()}")

    def count(self, text: str) -> int:
        return sum(text in m for m in self.messages)


def worker_warnings(client: Client) -> list[str]:
    """WARNING+ lines in the logs of the workers alive now (restarted ones are gone)."""
    try:
        logs = client.get_worker_logs()
    except Exception as exc:
        return [f"(could not fetch worker logs: {exc!r})"]
    return [
        f"[worker] {msg[msg.find(' - ') + 3 :]}"
        for recs in logs.values()
        for _, msg in recs
        if " - WARNING - " in msg or " - ERROR - " in msg
    ]


def summarize_messages(messages: list[str], limit: int = 10) -> None:
    counts: dict[str, int] = defaultdict(int)
    for msg in messages:
        counts[msg.split("\n")[0][:150]] += 1
    for key, c in list(counts.items())[:limit]:
        print(f"    {c:4d} × {key}")
    if len(counts) > limit:
        print(f"    … {len(counts) - limit} more distinct messages")


# --------------------------------------------------------------------------- runs


def main_benchmark(src: Path, work: Path, input_bytes: int, repeats: int) -> None:
    out = work / "q_out.zarr"
    with cluster() as client:
        mem = sum(w["memory_limit"] for w in scheduler_workers(client).values())
        print(
            f"cluster: 2 workers × 1 thread, {mem / 2**30:.1f} GiB memory_limit in total, "
            f"BLAS threads per worker: {blas_threads(client)}"
        )
        t0 = time.perf_counter()
        warm_up(src, out)
        print(f"warm-up: {time.perf_counter() - t0:.1f} s")
        timings = {name: Timing() for name in METHODS}
        for i in range(repeats):
            for name, fn in METHODS.items():
                run = timed_run(fn, src, out)
                timings[name].runs.append(run)
                timings[name].result = run.result
                print(
                    f"  round {i + 1}  {name:10s} {run.seconds:7.2f} s  "
                    f"{format_phases(run.phases)}",
                    flush=True,
                )
        ours_qr(src, out)
        orth = stored_orthogonality(out)
        shutil.rmtree(out, ignore_errors=True)
        x = da.from_zarr(str(src))
        blocks = row_blocks(x).chunks[0]
    report(timings, input_bytes, orth, blocks, repeats)
    print_floor(timings, x.shape)


def print_floor(timings: dict[str, Timing], shape: tuple[int, int]) -> None:
    """Ours and dask against the machine's floor (benchmarks/floor.py): the read-once run's
    best time and the QR's flops (R only; R and Q) at this machine's GEMM rate. Writing Q
    is not in the floor."""
    rate = gemm_rate(np.float64, cores=2)
    read = timings["read-once"].best.seconds
    best = {k: v.best.seconds for k, v in timings.items()}
    print("\nAgainst the floor (best runs)")
    q_runs = ("ours Q+R", "dask Q+R", "dask Q+R none")
    for with_q, runs in ((False, ("ours R", "dask R")), (True, q_runs)):
        floor = Floor(read, qr_flops(*shape, with_q=with_q), rate)
        print(floor_line(floor, {name: best[name] for name in runs}))


def report(
    timings: dict[str, Timing], input_bytes: int, orth: float, blocks: tuple, repeats: int
) -> None:
    gib = input_bytes / 2**30
    print(
        f"\nResults (best of {repeats}; input {gib:.2f} GiB, {len(blocks)} row blocks "
        f"of {blocks[0]} rows for ours)"
    )
    print(
        f"  {'method':10s} {'best s':>8s} {'median s':>9s} {'all runs s':>20s} {'GiB/s':>6s} "
        f"{'peak mem':>10s}"
    )
    for name, t in timings.items():
        runs = ", ".join(f"{r.seconds:.2f}" for r in t.runs)
        print(
            f"  {name:10s} {t.best.seconds:8.2f} {t.median:9.2f} {runs:>20s} "
            f"{gib / t.best.seconds:6.2f} {max(r.peak_mem for r in t.runs) / 2**30:6.2f} GiB"
        )
    best = {k: v.best.seconds for k, v in timings.items()}
    median = {k: v.median for k, v in timings.items()}
    ratios = [
        ("ours Q+R / dask Q+R", "ours Q+R", "dask Q+R", BAR_QR_VS_DASK),
        ("ours Q+R / dask Q+R none", "ours Q+R", "dask Q+R none", None),
        ("ours R / read-once", "ours R", "read-once", BAR_R_VS_READ),
        ("ours R / dask R", "ours R", "dask R", None),
        ("ours Q+R / read-once", "ours Q+R", "read-once", None),
        ("dask Q+R / read-once", "dask Q+R", "read-once", None),
    ]
    print(f"\nRatios {'best':>22s} {'median':>7s}")
    headline = []
    for label, num, den, bar in ratios:
        value, value_med = best[num] / best[den], median[num] / median[den]
        verdict = "" if bar is None else f"  bar ≤ {bar}: {'MET' if value <= bar else 'NOT MET'}"
        print(f"  {label:22s} {value:6.3f} {value_med:7.3f}{verdict}")
        if bar is not None:
            headline.append(f"ratio {label} = {value:.3f} (best;{verdict})")
    print("SUMMARY: " + "; ".join(headline))

    print("\nWorker time by task prefix (best run; 2 workers, so ideal wall ≈ sum / 2)")
    for name, t in timings.items():
        tasks = sorted(t.best.tasks.items(), key=lambda kv: -kv[1][1])
        total = sum(s for _, s in t.best.tasks.values())
        parts = ", ".join(f"{k} {n}× {1e3 * s / n:.0f} ms" for k, (n, s) in tasks[:3] if s > 0.05)
        print(f"  {name:10s} busy {total / (2 * t.best.seconds):4.0%}  {parts}")

    diag, full = r_difference(timings["ours Q+R"].result, timings["dask Q+R"].result)
    r_only = float(np.max(np.abs(timings["ours R"].result - timings["ours Q+R"].result)))
    print("\nCorrectness")
    print(f"  max rel diff |diag R| ours vs dask      {diag:.2e}")
    print(f"  ‖R_ours − S·R_dask‖_F / ‖R‖_F           {full:.2e}")
    print(f"  max |R(R-only) − R(Q+R)| ours           {r_only:.2e}")
    print(f"  ‖QᵀQ − I‖_F of stored ours Q            {orth:.2e}")


def out_of_core(src: Path, work: Path, input_bytes: int, timeout: float) -> None:
    """Ours Q+R on a cluster with a quarter of the input as total memory_limit — first as one
    worker (each worker process costs ~170 MiB before any data), then as two; when neither
    finishes cleanly, on larger two-worker clusters until one does."""
    quarter = int(input_bytes * OOC_FRACTION)
    attempts = [(1, max(quarter, OOC_FLOOR)), (2, max(quarter // 2, OOC_FLOOR))]
    attempts += [(2, m * MiB) for m in OOC_LARGER if m * MiB > attempts[-1][1]]
    for n_workers, per_worker in attempts:
        if ooc_attempt(src, work, input_bytes, per_worker, timeout, n_workers):
            return
    print("  no out-of-core attempt finished cleanly")


def wait_watching(
    future: concurrent.futures.Future, client: Client, log: WarningLog, timeout: float
) -> str:
    """Wait for ``future``; give up on timeout, too many restarts, or no workers for 30 s."""
    start = last_seen = time.perf_counter()
    while True:
        try:
            future.result(timeout=1.0)
            return "finished"
        except concurrent.futures.TimeoutError:
            pass
        except Exception as exc:
            return f"FAILED: {type(exc).__name__}: {str(exc)[:200]}"
        now = time.perf_counter()
        if scheduler_workers(client):
            last_seen = now
        if now - start > timeout:
            return f"GAVE UP: not finished after {timeout:.0f} s"
        if log.count("Restarting worker") >= OOC_MAX_RESTARTS:
            return f"GAVE UP: {OOC_MAX_RESTARTS} worker restarts"
        if now - last_seen > 30:
            return "GAVE UP: no workers left for 30 s (computation hung)"


def ooc_attempt(
    src: Path, work: Path, input_bytes: int, per_worker: int, timeout: float, n_workers: int = 2
) -> bool:
    """One ours Q+R run on ``n_workers`` × ``per_worker`` bytes; True when it ran clean."""
    ratio = n_workers * per_worker / input_bytes
    print(
        f"\nOut-of-core run: {n_workers} worker(s) × {per_worker / MiB:.0f} MiB memory_limit "
        f"(total = {ratio:.3f} × input of {input_bytes / MiB:.0f} MiB)"
    )
    out = work / "q_ooc.zarr"
    log = WarningLog()
    logging.getLogger("distributed").addHandler(log)
    status, replaced = "cluster did not start", 0
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        with cluster(per_worker, n_workers) as client:
            os.sync()
            before = set(scheduler_workers(client))
            sampler = MemorySampler()
            t0 = time.perf_counter()
            with sampler.sample("ooc", measure="process", interval=0.25):
                future = pool.submit(ours_qr, src, out)
                status = wait_watching(future, client, log, timeout)
            elapsed = time.perf_counter() - t0
            if status == "finished":
                status += f" ({format_phases(future.result()[1])})"
            after = set(scheduler_workers(client))
            replaced = len(before - after)
            print(
                f"  status: {status}\n  time {elapsed:.2f} s; peak cluster process memory "
                f"{peak(sampler, 'ooc') / MiB:.0f} MiB "
                f"(limit {n_workers * per_worker / MiB:.0f} MiB)"
            )
            print(
                f"  worker restarts: {log.count('Restarting worker')}; workers replaced: "
                f"{replaced} (before {len(before)}, after {len(after)})"
            )
            if status.startswith("finished"):
                print(f"  ‖QᵀQ − I‖_F of stored Q: {stored_orthogonality(out):.2e}")
            messages = log.messages + worker_warnings(client)
            print(f"  warnings (nanny/scheduler, plus workers alive at the end): {len(messages)}")
            summarize_messages(messages)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        logging.getLogger("distributed").removeHandler(log)
        shutil.rmtree(out, ignore_errors=True)
    clean = log.count("Restarting worker") == 0 and replaced == 0
    return status.startswith("finished") and clean


# --------------------------------------------------------------------------- per block


def _best_of(fn: Callable[[], Any], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def profile_block(src: Path, work: Path, chunk_rows: int = CHUNK_ROWS) -> None:
    """Per-block kernel times in this process with one BLAS thread, as on the workers.

    Single process on an otherwise idle machine with the block hot in cache: a lower bound
    for the per-task times on the cluster, where two workers share cores and memory bandwidth.
    """
    from threadpoolctl import threadpool_limits

    z = zarr.open_array(str(src), mode="r")
    print("\nPer-block profile (this process, 1 BLAS thread, best of 5)")
    with threadpool_limits(1):
        for rows in (chunk_rows, 2 * chunk_rows):
            profile_rows(z, rows, work / "profile.zarr")


def profile_rows(z: zarr.Array, rows: int, scratch: Path) -> None:
    a = np.ascontiguousarray(z[:rows])
    n = a.shape[1]
    f = kernels.factor_block(a)
    m_small = np.triu(np.random.default_rng(0).standard_normal((n, n))) + n * np.eye(n)
    target = zarr.create_array(
        store=str(scratch), shape=a.shape, dtype=a.dtype, chunks=a.shape, overwrite=True
    )
    cases = {
        "zarr read": lambda: z[:rows],
        "zarr write": lambda: target.__setitem__(..., a),
        "a.copy()": lambda: a.copy(),
        "isfinite(a).all()": lambda: np.isfinite(a).all(),
        "a.T @ a": lambda: a.T @ a,
        "a @ (n×n)": lambda: a @ m_small,
        "factor_block": lambda: kernels.factor_block(a),
        "block_q": lambda: kernels.block_q(a, f),
        "block_q (+transform)": lambda: kernels.block_q(a, f, m_small),
        "np.linalg.qr(a, 'r')": lambda: np.linalg.qr(a, mode="r"),
        "np.linalg.qr(a)": lambda: np.linalg.qr(a),
    }
    print(f"  block {rows} × {n} ({a.nbytes / MiB:.0f} MiB), method {f.method}")
    for name, fn in cases.items():
        print(f"    {name:22s} {_best_of(fn) * 1e3:8.1f} ms")
    shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="400,000 × 64 instead of 4M × 64")
    size.add_argument(
        "--tiny", action="store_true", help="20,000 × 16, 1 round: a smoke run (seconds)"
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    parser.add_argument(
        "--repeats", type=int, default=None, help="rounds of timed runs (default 2; tiny 1)"
    )
    parser.add_argument("--ooc-timeout", type=float, default=600.0, help="seconds per attempt")
    parser.add_argument("--skip-ooc", action="store_true", help="no out-of-core run")
    args = parser.parse_args()

    if args.tiny:
        shape, chunk_rows = TINY_SHAPE, TINY_CHUNK_ROWS
    else:
        shape, chunk_rows = (SMALL_SHAPE if args.small else FULL_SHAPE), CHUNK_ROWS
    repeats = args.repeats or (1 if args.tiny else 2)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    work = args.data_dir / "outputs"
    work.mkdir(exist_ok=True)
    input_bytes = shape[0] * shape[1] * 8
    print(
        f"input: {shape[0]:,} × {shape[1]} float64 ({input_bytes / 2**30:.2f} GiB), "
        f"storage chunks {chunk_rows} × {shape[1]}"
    )
    try:
        with cluster():  # writes the input in parallel when it is missing
            src = ensure_input(args.data_dir, shape, chunk_rows)
        main_benchmark(src, work, input_bytes, repeats)
        if args.skip_ooc:
            pass
        elif args.tiny:  # the input is far below a worker's own footprint: one roomy attempt
            if not ooc_attempt(src, work, input_bytes, TINY_OOC_MEMORY, 120.0, n_workers=1):
                raise SystemExit("out-of-core attempt did not finish cleanly")
        else:
            out_of_core(src, work, input_bytes, args.ooc_timeout)
        profile_block(src, work, chunk_rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
