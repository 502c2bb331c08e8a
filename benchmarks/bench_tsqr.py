"""Benchmark ``pipeline.linalg.tsqr`` against a plain read and ``dask.array.linalg.tsqr``.

What is measured (all on one LocalCluster of 2 worker processes × 1 thread, BLAS limited to
one thread per worker, reading the same Zarr array from storage every time; the input is
never persisted in memory):

1. read-once   ``da.from_zarr(path).sum().compute()``: the cost of one pass over the input.
2. ours R      ``tsqr(x, compute_q=False)`` until ``R`` is on the client (one pass).
3. ours Q+R    ``tsqr(x)`` and ``Q`` stored to a fresh Zarr array (``R`` pass + ``Q`` pass).
4. dask R      ``dask.array.linalg.tsqr(x)``, computing only ``r``.
5. dask Q+R    ``dask.array.linalg.tsqr(x)``, storing ``q`` to Zarr and computing ``r`` in
               the same graph.

Each timing runs twice after a warm-up and the best is reported. The bars checked are
ours Q+R / dask Q+R ≤ 0.7 and ours R / read-once ≤ 2.0. Correctness is checked cheaply:
our ``R`` against dask's up to row signs, and ``‖QᵀQ − I‖_F`` of the stored ``Q``.

An out-of-core run follows on a second cluster whose total ``memory_limit`` is a quarter of
the input (with a floor so that worker processes can start at all; the ratio used is
printed): ours Q+R once, with peak cluster memory, worker restarts and memory warnings.

Finally one block is profiled in this process (BLAS limited to one thread): read, our
per-block kernels, and ``numpy.linalg.qr`` of the same block.

Usage::

    python benchmarks/bench_tsqr.py --small      # 400,000 × 64 (~195 MiB)
    python benchmarks/bench_tsqr.py              # 4,000,000 × 64 (~1.9 GiB)

Inputs are generated once under ``--data-dir`` (default ``data/bench``, git-ignored) and
reused; the ``Q`` outputs are deleted afterwards.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from distributed import Client, LocalCluster
from distributed.diagnostics import MemorySampler

from pipeline.cluster import local_defaults
from pipeline.config import ClusterSpec, SyntheticSpec
from pipeline.datasets import write_synthetic
from pipeline.linalg import _kernels as kernels
from pipeline.linalg import row_blocks, tsqr
from pipeline.metrics import gram, orthogonality_from_gram

FULL_SHAPE = (4_000_000, 64)
SMALL_SHAPE = (400_000, 64)
CHUNK_ROWS = 65_536  # 32 MiB float64 storage chunks spanning all 64 columns
REPEATS = 2
BAR_QR_VS_DASK = 0.7
BAR_R_VS_READ = 2.0
OOC_FRACTION = 0.25  # out-of-core cluster: total memory_limit / input size
OOC_FLOOR = 192 * 2**20  # a worker process with numpy/dask/zarr imported needs ~150 MiB
MiB = 2**20


# --------------------------------------------------------------------------- data


def ensure_input(data_dir: Path, shape: tuple[int, int]) -> Path:
    """Path of the Gaussian input; written (on the current cluster) when missing."""
    m, n = shape
    path = data_dir / f"gaussian_{m}x{n}_c{CHUNK_ROWS}.zarr"
    if path.exists():
        z = zarr.open_array(str(path), mode="r")
        if z.shape == shape and z.chunks == (CHUNK_ROWS, n):
            print(f"reusing {path}")
            return path
        shutil.rmtree(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    spec = SyntheticSpec(
        kind="gaussian", shape=shape, chunks=(CHUNK_ROWS, n), dtype="float64", seed=0
    )
    t0 = time.perf_counter()
    write_synthetic(str(tmp), spec)
    tmp.rename(path)  # only a complete array gets the final name
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    return path


def fresh_output(path: Path, like: da.Array) -> zarr.Array:
    """An empty Zarr array for a tall factor, chunked by its first row chunk."""
    shutil.rmtree(path, ignore_errors=True)
    return zarr.create_array(
        store=str(path),
        shape=like.shape,
        dtype=like.dtype,
        chunks=(like.chunks[0][0], like.shape[1]),
        overwrite=True,
    )


# --------------------------------------------------------------------------- methods


# Each returns ``(R or None, {phase: seconds})``.
Phases = dict[str, float]


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
    return res.r, {"tsqr() incl. R pass": t1 - t0, "store Q": t2 - t1}


def dask_r(src: Path, out: Path) -> tuple[np.ndarray, Phases]:
    _, r = da.linalg.tsqr(da.from_zarr(str(src)))
    return r.compute(), {}


def dask_qr(src: Path, out: Path) -> tuple[np.ndarray, Phases]:
    q, r = da.linalg.tsqr(da.from_zarr(str(src)))
    stored = da.store(q, fresh_output(out, q), lock=False, compute=False)
    _, r = dask.compute(stored, r)
    return r, {}


def format_phases(phases: Phases) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())


METHODS: dict[str, Callable[[Path, Path], tuple[Any, Phases]]] = {
    "read-once": read_once,
    "ours R": ours_r,
    "ours Q+R": ours_qr,
    "dask R": dask_r,
    "dask Q+R": dask_qr,
}


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    times: list[float] = field(default_factory=list)
    peak_mem: list[float] = field(default_factory=list)  # cluster process memory, bytes
    phases: list[Phases] = field(default_factory=list)
    result: Any = None

    @property
    def best(self) -> float:
        return min(self.times)


def peak(sampler: MemorySampler, label: str) -> float:
    samples = sampler.samples.get(label) or [(0, 0)]
    return float(max(v for _, v in samples))


def time_method(
    fn: Callable[[Path, Path], tuple[Any, Phases]], src: Path, out: Path, repeats: int
) -> Timing:
    """Run ``fn`` ``repeats`` times; record wall time and peak cluster memory."""
    timing = Timing()
    sampler = MemorySampler()
    for i in range(repeats):
        label = f"run{i}"
        with sampler.sample(label, measure="process", interval=0.25):
            t0 = time.perf_counter()
            timing.result, phases = fn(src, out)
            timing.times.append(time.perf_counter() - t0)
        timing.phases.append(phases)
        timing.peak_mem.append(peak(sampler, label))
        shutil.rmtree(out, ignore_errors=True)
    return timing


def warm_up(src: Path, out: Path) -> None:
    """Import and run every code path once on tiny data, and touch the input."""
    x = da.random.default_rng(1).standard_normal((20_000, 64), chunks=(5_000, 64))
    tiny = out.with_name("warmup.zarr")
    x.to_zarr(str(tiny), overwrite=True)
    for fn in (read_once, ours_r, ours_qr, dask_r, dask_qr):
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
def cluster(memory_limit: str | int = "auto") -> Iterator[Client]:
    kwargs = local_defaults(
        ClusterSpec(n_workers=2, threads_per_worker=1, memory_limit=memory_limit)
    )
    with LocalCluster(**kwargs) as lc, Client(lc) as client:
        yield client


class WarningLog(logging.Handler):
    """Collect WARNING+ records of ``distributed`` emitted in this process (nanny, scheduler)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"[{record.name}] {record.getMessage()}")


def worker_warnings(client: Client) -> list[str]:
    try:
        logs = client.get_worker_logs()
    except Exception as exc:  # workers may be gone
        return [f"(could not fetch worker logs: {exc!r})"]
    return [f"[{addr}] {msg}" for addr, recs in logs.items() for lvl, msg in recs if lvl != "INFO"]


def summarize_messages(messages: list[str], limit: int = 12) -> None:
    counts: dict[str, int] = {}
    for msg in messages:
        key = msg.split("\n")[0][:160]
        counts[key] = counts.get(key, 0) + 1
    for key, c in list(counts.items())[:limit]:
        print(f"    {c:4d} × {key}")
    if len(counts) > limit:
        print(f"    … {len(counts) - limit} more distinct messages")


# --------------------------------------------------------------------------- runs


def main_benchmark(src: Path, work: Path, input_bytes: int) -> dict[str, Timing]:
    out = work / "q_out.zarr"
    with cluster() as client:
        mem = sum(w["memory_limit"] for w in client.scheduler_info()["workers"].values())
        print(
            f"cluster: 2 workers × 1 thread, {mem / 2**30:.1f} GiB memory_limit in total, "
            f"BLAS threads per worker: {blas_threads(client)}"
        )
        t0 = time.perf_counter()
        warm_up(src, out)
        print(f"warm-up: {time.perf_counter() - t0:.1f} s")
        timings = {}
        for name, fn in METHODS.items():
            timings[name] = time_method(fn, src, out, REPEATS)
            t = timings[name]
            runs = "  ".join(f"{s:7.2f} s" for s in t.times)
            detail = " | ".join(format_phases(p) for p in t.phases if p)
            print(f"  {name:10s} {runs}  {detail}", flush=True)
        ours_qr(src, out)
        orth = stored_orthogonality(out)
        shutil.rmtree(out, ignore_errors=True)
        blocks = row_blocks(da.from_zarr(str(src))).chunks[0]
    report(timings, input_bytes, orth, blocks)
    return timings


def report(timings: dict[str, Timing], input_bytes: int, orth: float, blocks: tuple) -> None:
    gib = input_bytes / 2**30
    print(
        f"\nResults (best of {REPEATS}; input {gib:.2f} GiB, {len(blocks)} row blocks "
        f"of {blocks[0]} rows for ours)"
    )
    print(f"  {'method':10s} {'best s':>8s} {'all runs s':>18s} {'GiB/s':>7s} {'peak mem':>10s}")
    for name, t in timings.items():
        runs = ", ".join(f"{s:.2f}" for s in t.times)
        print(
            f"  {name:10s} {t.best:8.2f} {runs:>18s} {gib / t.best:7.2f} "
            f"{max(t.peak_mem) / 2**30:8.2f} GiB"
        )
    best = {k: v.best for k, v in timings.items()}
    ratios = [
        ("ours Q+R / dask Q+R", best["ours Q+R"] / best["dask Q+R"], BAR_QR_VS_DASK),
        ("ours R / read-once", best["ours R"] / best["read-once"], BAR_R_VS_READ),
        ("ours R / dask R", best["ours R"] / best["dask R"], None),
        ("dask Q+R / read-once", best["dask Q+R"] / best["read-once"], None),
        ("ours Q+R / read-once", best["ours Q+R"] / best["read-once"], None),
    ]
    print("\nRatios")
    for label, value, bar in ratios:
        verdict = "" if bar is None else f"  bar ≤ {bar}: {'MET' if value <= bar else 'NOT MET'}"
        print(f"  {label:22s} {value:6.3f}{verdict}")
    diag, full = r_difference(timings["ours Q+R"].result, timings["dask Q+R"].result)
    r_only = float(np.max(np.abs(timings["ours R"].result - timings["ours Q+R"].result)))
    print("\nCorrectness")
    print(f"  max rel diff |diag R| ours vs dask      {diag:.2e}")
    print(f"  ‖R_ours − S·R_dask‖_F / ‖R‖_F           {full:.2e}")
    print(f"  max |R(R-only) − R(Q+R)| ours           {r_only:.2e}")
    print(f"  ‖QᵀQ − I‖_F of stored ours Q            {orth:.2e}")


def ooc_ladder(input_bytes: int) -> list[int]:
    """Per-worker limits to try: a quarter of the input in total (floored), then larger."""
    first = max(int(input_bytes * OOC_FRACTION / 2), OOC_FLOOR)
    return [first] + [m * MiB for m in (384, 512, 768, 1024) if m * MiB > first]


def out_of_core(src: Path, work: Path, input_bytes: int, timeout: float) -> None:
    """Ours Q+R on small-memory clusters: the quarter-of-input one first, then larger ones
    until a run finishes without worker restarts."""
    for per_worker in ooc_ladder(input_bytes):
        if ooc_attempt(src, work, input_bytes, per_worker, timeout):
            return
    print("  no out-of-core attempt finished cleanly")


def ooc_attempt(src: Path, work: Path, input_bytes: int, per_worker: int, timeout: float) -> bool:
    """One ours Q+R run on 2 workers × ``per_worker`` bytes; True when clean."""
    ratio = 2 * per_worker / input_bytes
    print(
        f"\nOut-of-core run: 2 workers × {per_worker / MiB:.0f} MiB memory_limit "
        f"(total = {ratio:.3f} × input of {input_bytes / MiB:.0f} MiB)"
    )
    out = work / "q_ooc.zarr"
    handler = WarningLog()
    logging.getLogger("distributed").addHandler(handler)
    status, replaced = "cluster did not start", 0
    try:
        with cluster(per_worker) as client:
            before = set(client.scheduler_info()["workers"])
            sampler = MemorySampler()
            pool = concurrent.futures.ThreadPoolExecutor(1)
            t0 = time.perf_counter()
            with sampler.sample("ooc", measure="process", interval=0.25):
                future = pool.submit(ours_qr, src, out)
                try:
                    _, phases = future.result(timeout=timeout)
                    status = "finished (" + format_phases(phases) + ")"
                except concurrent.futures.TimeoutError:
                    status = f"DID NOT FINISH within {timeout:.0f} s"
                except Exception as exc:
                    status = f"FAILED: {type(exc).__name__}: {str(exc)[:200]}"
            elapsed = time.perf_counter() - t0
            after = set(client.scheduler_info()["workers"])
            print(
                f"  status: {status}\n  time {elapsed:.2f} s; "
                f"peak cluster process memory {peak(sampler, 'ooc') / MiB:.0f} MiB "
                f"(limit {2 * per_worker / MiB:.0f} MiB)"
            )
            replaced = len(before - after)
            print(f"  workers replaced: {replaced} (before {len(before)}, after {len(after)})")
            if status.startswith("finished"):
                print(f"  ‖QᵀQ − I‖_F of stored Q: {stored_orthogonality(out):.2e}")
            messages = handler.messages + worker_warnings(client)
            print(f"  warnings logged (nanny/scheduler, plus surviving workers): {len(messages)}")
            summarize_messages(messages)
            pool.shutdown(wait=False, cancel_futures=True)
    finally:
        logging.getLogger("distributed").removeHandler(handler)
        shutil.rmtree(out, ignore_errors=True)
    restarts = sum("Restarting worker" in m for m in handler.messages)
    return status.startswith("finished") and replaced == 0 and restarts == 0


def _best_of(fn: Callable[[], Any], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def profile_block(src: Path, work: Path) -> None:
    """Per-block kernel times in this process with one BLAS thread, as on the workers."""
    from threadpoolctl import threadpool_limits

    z = zarr.open_array(str(src), mode="r")
    n = z.shape[1]
    print("\nPer-block profile (this process, 1 BLAS thread, best of 5)")
    with threadpool_limits(1):
        for rows in (CHUNK_ROWS, 2 * CHUNK_ROWS):
            t_read = _best_of(lambda rows=rows: z[:rows])
            a = np.ascontiguousarray(z[:rows])
            f = kernels.factor_block(a)
            target = zarr.create_array(
                store=str(work / "profile.zarr"),
                shape=a.shape,
                dtype=a.dtype,
                chunks=a.shape,
                overwrite=True,
            )
            t = {
                "zarr read": t_read,
                "zarr write": _best_of(lambda a=a, target=target: target.__setitem__(..., a)),
                "a.sum()": _best_of(lambda a=a: a.sum()),
                "isfinite(a).all()": _best_of(lambda a=a: np.isfinite(a).all()),
                "a.T @ a": _best_of(lambda a=a: a.T @ a),
                "factor_block": _best_of(lambda a=a: kernels.factor_block(a)),
                "apply_q (block_q)": _best_of(lambda a=a, f=f: kernels.apply_q(a, f, None)),
                "apply_q (+transform)": _best_of(lambda a=a, f=f: kernels.apply_q(a, f, np.eye(n))),
                "np.linalg.qr(a, 'r')": _best_of(lambda a=a: np.linalg.qr(a, mode="r")),
                "np.linalg.qr(a)": _best_of(lambda a=a: np.linalg.qr(a)),
            }
            print(f"  block {rows} × {n} ({a.nbytes / MiB:.0f} MiB), method {f.method}")
            for name, s in t.items():
                print(f"    {name:22s} {s * 1e3:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="400,000 × 64 instead of 4M × 64")
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    parser.add_argument("--ooc-timeout", type=float, default=900.0, help="seconds")
    parser.add_argument("--skip-ooc", action="store_true")
    args = parser.parse_args()

    shape = SMALL_SHAPE if args.small else FULL_SHAPE
    args.data_dir.mkdir(parents=True, exist_ok=True)
    work = args.data_dir / "outputs"
    work.mkdir(exist_ok=True)
    input_bytes = shape[0] * shape[1] * 8
    print(
        f"input: {shape[0]:,} × {shape[1]} float64 ({input_bytes / 2**30:.2f} GiB), "
        f"storage chunks {CHUNK_ROWS} × {shape[1]}"
    )
    try:
        with cluster():  # writes the input in parallel when it is missing
            src = ensure_input(args.data_dir, shape)
        main_benchmark(src, work, input_bytes)
        if not args.skip_ooc:
            out_of_core(src, work, input_bytes, args.ooc_timeout)
        profile_block(src, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
