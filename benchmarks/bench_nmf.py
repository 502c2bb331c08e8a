"""Benchmark ``pipeline.linalg.nmf`` (HALS, MU) against scikit-learn's NMF (cd, mu).

Same process, same data: a generated float32 non-negative Zarr array ``W₀H₀ + noise`` of
rank 20 (W₀, H₀ uniform on [0, 1), noise uniform on [0, 1)), rank 20, init ``nndsvda``.

- ours hals / mu   on a LocalCluster of 2 worker processes × 1 thread, as a job runs it:
                   the input is read once and kept in the workers' memory (it fits),
                   NNDSVD from our randomized SVD, ``tol=1e-4``, ``max_iter=200``.
- sklearn cd / mu  ``NMF(20, init='nndsvda', solver=..., random_state=0)`` on the in-memory
                   numpy array (2 BLAS threads; loading the array is not timed).

Printed: time, iterations, final relative error ``‖A − WH‖_F/‖A‖_F``, the time ours needs
to reach scikit-learn cd's final error (from each iteration's time stamp and objective),
and ours' median time per iteration against the time of one pass over ``A`` (one read from
storage, and one pass over the in-memory copy).

Bars (issue 4): time to sklearn cd's final error ≤ 1.0 × sklearn cd's time; per-iteration
time ≤ 1.5 × one pass over A.

Usage::

    python benchmarks/bench_nmf.py --tiny     # 4,000 × 200, 10 iterations (smoke run, seconds)
    python benchmarks/bench_nmf.py --small    # 20,000 × 1,000 (~76 MiB)
    python benchmarks/bench_nmf.py            # 100,000 × 1,000 (~381 MiB)
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from distributed import Client, LocalCluster
from floor import Floor, floor_line, gemm_rate, nmf_flops

from pipeline.cluster import keep_in_memory, local_defaults
from pipeline.config import ClusterSpec, InputSpec
from pipeline.io import open_matrix
from pipeline.linalg import nmf, row_blocks

RANK, N_COLS, CHUNK_ROWS = 20, 1000, 10_000
FULL_ROWS, SMALL_ROWS = 100_000, 20_000
MAX_ITER = 200
TINY_ROWS, TINY_COLS, TINY_CHUNK_ROWS, TINY_MAX_ITER = 4_000, 200, 500, 10  # --tiny
BAR_TIME, BAR_ITER = 1.0, 1.5


def _generate_block(block: np.ndarray, block_info: Any = None) -> np.ndarray:
    i = block_info[0]["chunk-location"][0]
    h0 = np.random.default_rng(99).random((RANK, block_info[0]["shape"][1]))
    rng = np.random.default_rng([5, i])
    w0 = rng.random((block.shape[0], RANK))
    return (w0 @ h0 + rng.random(block.shape)).astype(np.float32)


def ensure_data(
    data_dir: Path, rows: int, n_cols: int = N_COLS, chunk_rows: int = CHUNK_ROWS
) -> Path:
    path = data_dir / f"nonneg_rank{RANK}_{rows}x{n_cols}_f32.zarr"
    if not path.exists():
        print(f"generating {rows} × {n_cols} float32 at {path} ...", flush=True)
        template = da.empty((rows, n_cols), chunks=(chunk_rows, n_cols), dtype=np.float32)
        da.map_blocks(_generate_block, template, dtype=np.float32).to_zarr(str(path))
    return path


def ours(path: Path, client: Client, solver: str, max_iter: int = MAX_ITER) -> dict[str, Any]:
    """A job's path: row blocks, kept in memory, NNDSVDa init, iterations with time stamps."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    x, _ = open_matrix(InputSpec(url=str(path)))  # as a job reads it (direct chunk reads)
    x, _ = keep_in_memory(row_blocks(x, min_rows=RANK + 10), client)
    res = nmf(
        x,
        RANK,
        solver=solver,
        init="nndsvda",
        max_iter=max_iter,
        tol=1e-4,
        on_iteration=lambda st, w: stamps.append(time.perf_counter() - t0),
    )
    res.w.persist()
    return {
        "seconds": time.perf_counter() - t0,
        "iterations": res.iterations,
        "error": res.history[-1],
        "history": res.history,
        "stamps": stamps,
    }


def sklearn_nmf(a: np.ndarray, solver: str, max_iter: int = MAX_ITER) -> dict[str, Any]:
    from sklearn.decomposition import NMF
    from threadpoolctl import threadpool_limits

    with threadpool_limits(2), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        model = NMF(RANK, init="nndsvda", solver=solver, max_iter=max_iter, random_state=0)
        w = model.fit_transform(a)
        seconds = time.perf_counter() - t0
    err = float(np.linalg.norm(a - w @ model.components_) / np.linalg.norm(a))
    return {"seconds": seconds, "iterations": model.n_iter_, "error": err}


def time_to(target: float, run: dict[str, Any]) -> float | None:
    for err, stamp in zip(run["history"], run["stamps"], strict=True):
        if err <= target:
            return stamp
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="20,000 rows instead of 100,000")
    size.add_argument(
        "--tiny", action="store_true", help="4,000 × 200, 10 iterations: a smoke run (seconds)"
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        rows, n_cols, chunk_rows, max_iter = TINY_ROWS, TINY_COLS, TINY_CHUNK_ROWS, TINY_MAX_ITER
    else:
        rows, n_cols, chunk_rows = (SMALL_ROWS if args.small else FULL_ROWS), N_COLS, CHUNK_ROWS
        max_iter = MAX_ITER

    with LocalCluster(**local_defaults(ClusterSpec(n_workers=2, threads_per_worker=1))) as lc:
        with Client(lc) as client:
            path = ensure_data(args.data_dir, rows, n_cols, chunk_rows)
            x = da.from_zarr(str(path))
            ours(path, client, "hals", max_iter)  # warm-up
            t_read = min(timed_sum(x) for _ in range(2))
            kept = x.persist()
            t_pass = min(timed_sum(kept) for _ in range(3))
            del kept
            runs = {f"ours {s}": ours(path, client, s, max_iter) for s in ("hals", "mu")}
    a = da.from_zarr(str(path)).compute(scheduler="threads")
    runs.update({f"sklearn {s}": sklearn_nmf(a, s, max_iter) for s in ("cd", "mu")})

    print(
        f"\n{rows} × {n_cols} float32, rank {RANK}, init nndsvda, max_iter {max_iter}; "
        "one pass over A: "
        f"{t_read:.2f} s from storage, {t_pass:.3f} s in memory\n"
    )
    print(f"{'method':14s} {'seconds':>8s} {'iters':>6s} {'rel error':>10s}")
    for name, r in runs.items():
        print(f"{name:14s} {r['seconds']:8.2f} {r['iterations']:6d} {r['error']:10.5f}")
    target, t_sk = runs["sklearn cd"]["error"], runs["sklearn cd"]["seconds"]
    print(f"\ntime to reach sklearn cd's final error {target:.5f}:")
    for name in ("ours hals", "ours mu"):
        t = time_to(target, runs[name])
        verdict = "never" if t is None else f"{t:.2f} s, ratio {t / t_sk:.2f} × sklearn cd"
        print(f"  {name}: {verdict}")
    t_hals = time_to(target, runs["ours hals"])
    ok = t_hals is not None and t_hals / t_sk <= BAR_TIME
    print(f"bar: ours hals ≤ {BAR_TIME} × sklearn cd's time: {'met' if ok else 'NOT met'}")
    for name in ("ours hals", "ours mu"):
        per_iter = float(np.median(np.diff(runs[name]["stamps"])))
        verdict = "met" if per_iter / t_read <= BAR_ITER else "NOT met"
        print(
            f"{name}: {per_iter:.3f} s per iteration, ratio {per_iter / t_read:.2f} × a read from "
            f"storage, {per_iter / t_pass:.2f} × a pass in memory "
            f"(bar ≤ {BAR_ITER} × one pass: {verdict})"
        )
    print_floor(runs, t_read, (rows, n_cols))


def print_floor(runs: dict[str, dict[str, Any]], t_read: float, shape: tuple[int, int]) -> None:
    """Each run against the machine's floor for its own iteration count (benchmarks/floor.py;
    scikit-learn's read is not in its time), and ours per iteration against one iteration's
    GEMM-bound compute."""
    rate = gemm_rate(np.float32, cores=2)
    print("\nagainst the floor:")
    for name, r in runs.items():
        floor = Floor(t_read, nmf_flops(*shape, RANK, r["iterations"]), rate)
        print(f"{name} ({r['iterations']} iterations): " + floor_line(floor, {name: r["seconds"]}))
    per_iteration = nmf_flops(*shape, RANK, 1) / rate
    for name in ("ours hals", "ours mu"):
        per_iter = float(np.median(np.diff(runs[name]["stamps"])))
        print(
            f"{name}: an iteration's compute floor {per_iteration:.3f} s; "
            f"ratio per iteration / floor = {per_iter / per_iteration:.2f}"
        )


def timed_sum(x: da.Array) -> float:
    t0 = time.perf_counter()
    x.sum().compute()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
