"""Benchmark ``pipeline.linalg.als`` (ALS, rank 64) against the ``implicit`` library's CPU ALS.

Data: a MovieLens-20M-like log generated once into ``--data-dir`` by
``pipeline.datasets.write_synthetic`` — 138,493 users × 26,744 items at density 0.0054
(≈ 20 M entries, Zipf item popularity, Pareto user activity; ~40 s per store):

- explicit: ``kind: ratings`` (1–5 stars in half stars, true rank 10 + biases + noise; the
  generator keeps the RMS of the noise actually stored, ``uns/synthetic/noise_rmse``: the
  floor of any model's RMSE);
- implicit: ``kind: clicks`` (Poisson counts of a non-negative rank-10 affinity times
  popularity, only positive counts stored) — its own store at the same shape and density,
  not the ratings read as counts.

``--small`` is half the users and half the items at the same density (69,246 × 13,372: a
quarter of the entries, half the ratings per user and per item); ``--tiny`` 2,000 × 500
at density 0.05, 3 iterations (a smoke run, seconds).

Runs, all at rank 64, the same number of iterations (10; ``tol=0``), the same training
split (``validation: {fraction: 0.1, seed: 0}``; the 10 % hold-out chosen per entry by
:func:`pipeline.linalg.als.held_out`):

- ours       a LocalCluster of 2 worker processes × 1 thread, as a job runs it: the store
             opened by :func:`pipeline.io.open_matrix`, its CSR row blocks as planned by
             stored bytes (at least 2 × the worker threads: finer ``block_rows`` when the
             plan gives fewer), ``keep=True`` (both layouts in worker memory), solver
             ``auto`` (conjugate gradient at rank 64, 3 steps), ``cg_dtype`` float32 (the
             job's default ``cg_precision``) and float64. Explicit: ``biases``,
             ``reg`` 0.05 (weighted-λ); implicit: ``alpha`` 2, ``reg`` 0.1.
- implicit   ``implicit.cpu.als.AlternatingLeastSquares(factors=64, use_cg=True,
             num_threads=2, random_state=0)``, float32 (its default) and, for the clicks,
             float64, on the in-memory training CSR (loading and splitting it is not timed),
             fed the confidences ``1 + α r`` with its ``alpha=1`` (its confidence is
             ``alpha·r`` itself: the mapping of ``tests/test_als_algorithm.py``), BLAS
             limited to 1 thread as it advises. ``implicit`` has no explicit-ratings ALS:
             the explicit row compares ours with ``implicit``'s implicit-feedback ALS on
             the same training matrix (same entries, same rank; confidences ``1 + 2 r``) —
             the same work per iteration, not the same model.

Time per iteration: the median of the iterations after the first (ours: the ``seconds`` of
each iteration in ``history``, one graph and one round trip each; ``implicit``: its
``fit`` callback's elapsed time per iteration). Quality at equal iterations: implicit —
precision@10 and nDCG@10 on the hold-out of both models, computed by the same function
(:func:`pipeline.linalg.als.ranking_metrics`, which follows
``implicit.evaluation.ranking_metrics_at_k``; training items excluded) over the same users
(at most 20,000 users with a held-out item, a fixed random choice); explicit — our validation
RMSE against the generator's ``noise_rmse``. The floor reference is one read of the store
(a sum over its CSR blocks on the cluster).

Bar (issue 23): ours ≤ 1.5 × ``implicit``'s time per iteration (goal ≤ 1.0 ×) at equal
quality; the job's default is ``cg_precision: float32``.

Usage::

    python benchmarks/bench_als.py --tiny     # 2,000 × 500, 3 iterations (smoke run, seconds)
    python benchmarks/bench_als.py --small    # 69,246 × 13,372 (≈ 5 M entries)
    python benchmarks/bench_als.py            # 138,493 × 26,744 (≈ 20 M entries)
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
from distributed import Client, LocalCluster
from floor import als_flops, gemm_rate

from pipeline.cluster import local_defaults
from pipeline.config import ClusterSpec, InputSpec
from pipeline.io import open_matrix
from pipeline.linalg import row_blocks
from pipeline.linalg.als import als, held_out, ranking_metrics

RANK, FRACTION, SPLIT_SEED = 64, 0.1, 0
EXPLICIT_REG, IMPLICIT_REG, ALPHA = 0.05, 0.1, 2.0
THREADS = 2  # 2 workers × 1 thread; implicit's num_threads
MIN_BLOCKS = 2 * THREADS  # row blocks: at least 2 × the worker threads
EVAL_USERS = 20_000  # users of the ranking metrics (with a held-out item), at most
BAR, GOAL = 1.5, 1.0


@dataclass(frozen=True)
class Size:
    users: int
    items: int
    density: float
    iterations: int


SIZES = {
    "full": Size(138_493, 26_744, 0.0054, 10),
    "small": Size(69_246, 13_372, 0.0054, 10),
    "tiny": Size(2_000, 500, 0.05, 3),
}


def ensure_data(data_dir: Path, kind: str, size: Size) -> Path:
    """The generated store (kind ``ratings`` or ``clicks``), written on first use."""
    from pipeline.datasets import write_synthetic
    from pipeline.sections import SyntheticSpec

    path = data_dir / f"{kind}_{size.users}x{size.items}_d{size.density}.zarr"
    if not path.exists():
        print(f"generating {kind} {size.users} × {size.items} at {path} ...", flush=True)
        t0 = time.perf_counter()
        spec = SyntheticSpec(
            kind=kind, shape=(size.users, size.items), density=size.density, seed=0
        )
        write_synthetic(str(path), spec, {}, "X")
        print(f"  {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def noise_rmse(path: Path) -> float:
    import zarr

    return float(zarr.open_group(str(path), mode="r")["uns/synthetic/noise_rmse"][()])


def job_blocks(path: Path) -> da.Array:
    """The input as a job opens it: CSR row blocks planned by stored bytes, made finer when
    that gives fewer than :data:`MIN_BLOCKS` (what ``block_rows`` does in a job)."""
    x, _ = open_matrix(InputSpec(url=str(path), array="X"))
    x = row_blocks(x)
    if len(x.chunks[0]) < MIN_BLOCKS:
        x = row_blocks(x, block_rows=math.ceil(x.shape[0] / MIN_BLOCKS))
    return x


def _block_sum(block: Any) -> np.ndarray:
    return np.array([[float(block.sum())]])


def read_seconds(path: Path) -> float:
    """One pass over the store: every CSR block read and summed on the cluster."""
    x = job_blocks(path)
    t0 = time.perf_counter()
    x.map_blocks(_block_sum, chunks=(1, 1), dtype=np.float64).sum().compute()
    return time.perf_counter() - t0


def ours(path: Path, implicit: bool, cg_dtype: str, iterations: int) -> dict[str, Any]:
    """A job's run: the blocks kept, ``iterations`` iterations, the factors fetched."""
    x = job_blocks(path)
    opts: dict[str, Any] = (
        {"alpha": ALPHA, "reg": IMPLICIT_REG} if implicit else {"biases": True, "reg": EXPLICIT_REG}
    )
    t0 = time.perf_counter()
    res = als(
        x,
        RANK,
        iterations=iterations,
        tol=0.0,
        solver="auto",
        cg_dtype=cg_dtype,
        keep=True,
        validation_fraction=FRACTION,
        validation_seed=SPLIT_SEED,
        **opts,
    )
    seconds = time.perf_counter() - t0
    per_iter = [h["seconds"] for h in res.history]
    out = {
        "seconds": seconds,
        "setup": seconds - sum(per_iter),
        "per_iter": per_iter,
        "iterations": res.iterations,
        "solver": res.solver,
        "blocks": len(x.chunks[0]),
        "nnz_train": res.nnz_train,
        "last": res.history[-1],
    }
    if implicit:
        u, v = dask.compute(res.u, res.v)
        out.update(u=u, v=v)
    del res  # releases the kept layouts on the workers
    return out


def load_split(path: Path) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """The store in memory, split into training and held-out entries as ``als`` splits it."""
    x, _ = open_matrix(InputSpec(url=str(path), array="X"))
    with dask.config.set(scheduler="threads"):
        a = sp.csr_matrix(x.compute())
    a.sort_indices()
    rows = np.repeat(np.arange(a.shape[0]), np.diff(a.indptr))
    held = held_out(rows, a.indices, a.shape[1], FRACTION, SPLIT_SEED)
    return _entries(a, rows, ~held), _entries(a, rows, held)


def _entries(a: sp.csr_matrix, rows: np.ndarray, keep: np.ndarray) -> sp.csr_matrix:
    indptr = np.zeros(a.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows[keep], minlength=a.shape[0]), out=indptr[1:])
    return sp.csr_matrix((a.data[keep], a.indices[keep], indptr), shape=a.shape)


def implicit_als(train: sp.csr_matrix, iterations: int, dtype: Any) -> dict[str, Any]:
    """``implicit``'s CPU ALS, conjugate gradient, fed ``1 + α r`` with its ``alpha=1``."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    conf = train.astype(np.float32)
    conf.data = 1.0 + ALPHA * conf.data
    per_iter: list[float] = []
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its BLAS-threads advice
        model = AlternatingLeastSquares(
            factors=RANK,
            regularization=IMPLICIT_REG,
            alpha=1.0,
            iterations=iterations,
            use_cg=True,
            num_threads=THREADS,
            random_state=0,
            dtype=dtype,
        )
        t0 = time.perf_counter()
        model.fit(conf, show_progress=False, callback=lambda it, dt, loss: per_iter.append(dt))
        seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "per_iter": per_iter,
        "u": np.asarray(model.user_factors, dtype=np.float64),
        "v": np.asarray(model.item_factors, dtype=np.float64),
    }


def eval_users(held: sp.csr_matrix) -> np.ndarray:
    """At most :data:`EVAL_USERS` users with a held-out item, a fixed random choice."""
    users = np.flatnonzero(np.diff(held.indptr))
    if len(users) <= EVAL_USERS:
        return users
    return np.sort(np.random.default_rng(0).choice(users, EVAL_USERS, replace=False))


def ranking(run: dict[str, Any], train: sp.csr_matrix, held: sp.csr_matrix, users: np.ndarray):
    with dask.config.set(scheduler="threads", num_workers=THREADS):
        return ranking_metrics(run["u"][users], run["v"], train[users], held[users], 10)


def median_after_first(per_iter: list[float]) -> float:
    return float(np.median(per_iter[1:] if len(per_iter) > 1 else per_iter))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--small", action="store_true", help="69,246 × 13,372 (≈ 5 M entries)")
    group.add_argument(
        "--tiny", action="store_true", help="2,000 × 500, 3 iterations: a smoke run (seconds)"
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    size = SIZES["tiny" if args.tiny else "small" if args.small else "full"]
    iters = size.iterations
    print(time.strftime("started %Y-%m-%d %H:%M:%S"), flush=True)
    paths = {kind: ensure_data(args.data_dir, kind, size) for kind in ("ratings", "clicks")}

    runs: dict[str, dict[str, Any]] = {}
    reads: dict[str, float] = {}
    spec = ClusterSpec(n_workers=THREADS, threads_per_worker=1)
    with LocalCluster(**local_defaults(spec)) as lc, Client(lc):
        for kind, path in paths.items():
            read_seconds(path)  # warm the page cache
            reads[kind] = min(read_seconds(path) for _ in range(2))
            for dt in ("float32", "float64"):
                print(f"ours {kind} cg {dt} ...", flush=True)
                runs[f"ours {kind} {dt}"] = ours(path, kind == "clicks", dt, iters)

    data = {kind: load_split(path) for kind, path in paths.items()}
    anchors = [("ratings", np.float32), ("clicks", np.float32), ("clicks", np.float64)]
    for kind, dtype in anchors:
        print(f"implicit {kind} {np.dtype(dtype).name} ...", flush=True)
        runs[f"implicit {kind} {np.dtype(dtype).name}"] = implicit_als(data[kind][0], iters, dtype)
    for kind, (train, _) in data.items():
        for dt in ("float32", "float64"):
            got = runs[f"ours {kind} {dt}"]["nnz_train"]
            assert got == train.nnz, f"{kind}: ours trained on {got} entries, implicit {train.nnz}"

    train, held = data["clicks"]
    users = eval_users(held)
    quality = {name: ranking(runs[name], train, held, users) for name in runs if "clicks" in name}
    report(size, paths, data, runs, reads, quality, len(users))


def report(size, paths, data, runs, reads, quality, n_users) -> None:
    iters = size.iterations
    print(time.strftime("\nfinished %Y-%m-%d %H:%M:%S"))
    for kind, (train, held) in data.items():
        m, n = train.shape
        print(
            f"{kind}: {m} × {n}, {train.nnz + held.nnz} entries "
            f"({(train.nnz + held.nnz) / (m * n):.4f}), {train.nnz} training, "
            f"{held.nnz} held out; one read of the store {reads[kind]:.2f} s"
        )
    blocks = runs["ours ratings float32"]["blocks"]
    print(
        f"rank {RANK}, {iters} iterations, ours: 2 workers × 1 thread, {blocks} row blocks, "
        f"solver {runs['ours ratings float32']['solver']} (3 CG steps); implicit: "
        f"{THREADS} threads, use_cg\n"
    )
    print(
        f"{'row':34s} {'ours s/it':>9s} {'impl s/it':>9s} {'ratio':>6s}  "
        f"bar ≤ {BAR} (goal ≤ {GOAL})"
    )
    rows = [
        ("explicit ratings, cg float32 (job)", "ours ratings float32", "implicit ratings float32"),
        ("explicit ratings, cg float64", "ours ratings float64", "implicit ratings float32"),
        ("implicit clicks, cg float32 (job)", "ours clicks float32", "implicit clicks float32"),
        ("implicit clicks, cg float64", "ours clicks float64", "implicit clicks float32"),
        ("implicit clicks, both float64", "ours clicks float64", "implicit clicks float64"),
    ]
    for label, mine, theirs in rows:
        t_ours = median_after_first(runs[mine]["per_iter"])
        t_impl = median_after_first(runs[theirs]["per_iter"])
        ratio = t_ours / t_impl
        verdict = "goal met" if ratio <= GOAL else "bar met" if ratio <= BAR else "NOT met"
        print(f"{label:34s} {t_ours:9.3f} {t_impl:9.3f} {ratio:6.2f}  {verdict}")
    print("(explicit rows: implicit has no explicit ALS — its implicit-feedback ALS on the")
    print(" same training matrix, confidences 1 + 2r: the same entries and rank)\n")

    print(
        f"{'run':26s} {'total s':>8s} {'setup s':>8s} {'first it':>8s} {'median it':>9s} "
        f"{'min it':>7s}  every iteration (s)"
    )
    for name, r in runs.items():
        setup = r.get("setup")
        setup_s = f"{setup:8.2f}" if setup is not None else f"{'-':>8s}"
        each = " ".join(f"{t:.2f}" for t in r["per_iter"])
        print(
            f"{name:26s} {r['seconds']:8.2f} {setup_s} {r['per_iter'][0]:8.3f} "
            f"{median_after_first(r['per_iter']):9.3f} {min(r['per_iter']):7.3f}  {each}"
        )
    print("(setup: ours' first pass — read, split, item layout — and the result; implicit's")
    print(" total includes its transpose and initialization. Other tenants of a shared machine")
    print(" show as iterations far above the minimum: compare the runs' minima then)\n")

    floor = noise_rmse(paths["ratings"])
    for dt in ("float32", "float64"):
        last = runs[f"ours ratings {dt}"]["last"]
        print(
            f"explicit, ours cg {dt}: validation RMSE {last['validation_rmse']:.4f}, "
            f"ratio {last['validation_rmse'] / floor:.3f} × the noise floor {floor:.4f} "
            f"(train RMSE {last['train_rmse']:.4f})"
        )
    print(f"\nimplicit, hold-out ranking over {n_users} users (same function for all):")
    for name, q in quality.items():
        print(f"  {name:26s} precision@10 {q['precision']:.4f}  nDCG@10 {q['ndcg']:.4f}")
    ref = quality["implicit clicks float32"]
    for dt in ("float32", "float64"):
        q = quality[f"ours clicks {dt}"]
        p_ratio, n_ratio = q["precision"] / ref["precision"], q["ndcg"] / ref["ndcg"]
        print(
            f"  ours {dt} / implicit float32: precision@10 ratio {p_ratio:.3f}, "
            f"nDCG@10 ratio {n_ratio:.3f}"
        )
    for kind in ("ratings", "clicks"):
        t = median_after_first(runs[f"ours {kind} float32"]["per_iter"])
        print(
            f"ours {kind} float32: {t:.3f} s per iteration, ratio {t / reads[kind]:.2f} × one "
            f"read of the store ({reads[kind]:.2f} s)"
        )
    print_floor(data, runs)


def print_floor(data: dict, runs: dict) -> None:
    """An iteration against its compute floor (benchmarks/floor.py): 3 CG steps on the
    training entries at this machine's float32 GEMM rate (the layouts are kept: an iteration
    reads no storage)."""
    rate = gemm_rate(np.float32, cores=THREADS)
    for kind, (train, _) in data.items():
        per_iteration = als_flops(*train.shape, train.nnz, RANK, cg_steps=3) / rate
        mine, theirs = f"ours {kind} float32", f"implicit {kind} float32"
        per_iter = {name: median_after_first(runs[name]["per_iter"]) for name in (mine, theirs)}
        ratios = "; ".join(
            f"ratio {k} / floor = {t / per_iteration:.2f}" for k, t in per_iter.items()
        )
        print(f"{kind}: an iteration's compute floor {per_iteration:.3f} s; {ratios}")


if __name__ == "__main__":
    main()
