"""Benchmark ``pipeline.linalg.svd`` against ``dask.array.linalg.svd`` and the covariance route.

Same run, same data: the TSQR benchmark's shape (4,000,000 × 64 float64, storage chunks of
65,536 rows spanning all columns), but with a known, wide spectrum: σ log-spaced from 1 down
to 1e-12 (κ = 1e12), so the smallest singular values tell the routes apart. Each storage
chunk ``i`` of ``B`` holds ``H_i / √B · diag(σ) · Vᵀ`` with ``H_i`` the orthonormal factor
of a Gaussian block and ``V`` a fixed random orthogonal matrix; ``[H_i / √B]`` is
orthonormal, so the designed σ are the exact singular values up to the rounding of the
stored entries (a perturbation of ~u·σ₁).

All on one LocalCluster of 2 worker processes × 1 thread, BLAS limited to one thread per
worker; every route starts from the Zarr array in storage:

(a) ours streamed ``svd(x)``; U stored to a fresh Zarr array, S and Vt on the client. Reads
                  storage twice (R pass, U pass); memory bounded by a few blocks.
(b) ours kept     what a job does when the input fits in 40 % of the workers' memory
                  (:func:`pipeline.cluster.keep_in_memory`): the row-blocked input is
                  persisted (one read of storage, inside the timing), then as (a) from
                  memory. Holds the input on the cluster, as dask's svd holds every block's
                  Q.
(c) ours S+Vt     ``svd(x, compute_u=False)`` (one read).
(d) dask svd      ``dask.array.linalg.svd(x)`` (TSQR-based); U stored likewise, S and V
                  computed in the same graph (one read; every block's Q held in memory
                  until the tree's transforms are known).
(e) covariance    ``(x.T @ x).compute()`` then ``numpy.linalg.eigh`` (scanpy's
                  ``covariance_eigh``; one read, squares κ).

After a warm-up the routes run in interleaved rounds (``--repeats``, default 3); medians
are reported with each run's peak cluster process memory (sum over workers, sampled every
0.25 s by ``distributed``'s MemorySampler), and the ratios streamed / dask, kept / dask and
S+Vt / dask (bar ≤ 0.5 with equal accuracy).

Accuracy reference: a float64 Householder QR of the stored matrix computed in this
process, streaming over its storage chunks (``R ← qr([R; A_i])``, LAPACK ``geqrf``), then
``numpy.linalg.svd(R)``; cached next to the data. Why: ``numpy.linalg.svd`` of the whole
matrix does not fit comfortably (≥ 2 × 1.9 GiB plus workspace); the streaming Householder
QR is the same backward-stable float64 computation with a bounded memory, and it is
independent of every timed route (not our Cholesky-QR blocks, not dask's tree). Any
backward-stable method, the reference included, is accurate to ~u·σ₁ in every σ, so at
κ = 1e12 relative errors of σ_min down to ~1e-4 are the floor; the covariance route's
error is u·σ₁²/σ_min and shows as O(1) or worse. The error against the designed σ is
printed as well; it is often the sharper of the two (the streaming reference chains one
QR per storage chunk and its own σ_min error, printed last, can exceed the routes').

Usage::

    python benchmarks/bench_svd.py --tiny      # 20,000 × 16 (smoke run, seconds)
    python benchmarks/bench_svd.py --small     # 400,000 × 64 (~195 MiB)
    python benchmarks/bench_svd.py             # 4,000,000 × 64 (~1.9 GiB)

Inputs are generated once under ``--data-dir`` (default ``data/bench``, git-ignored) and
reused; U outputs are deleted afterwards.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from distributed import Client, LocalCluster
from distributed.diagnostics import MemorySampler

from pipeline.cluster import PERSIST_FRACTION, cluster_memory, keep_in_memory, local_defaults
from pipeline.config import ClusterSpec
from pipeline.linalg.svd import svd
from pipeline.linalg.tsqr import UNOPTIMIZED, row_blocks
from pipeline.metrics import gram, orthogonality_from_gram

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tsqr import fresh_output
from floor import Floor, floor_line, gemm_rate, svd_flops

SIZES = {  # name → (shape, storage chunk rows)
    "full": ((4_000_000, 64), 65_536),
    "small": ((400_000, 64), 65_536),
    "tiny": ((20_000, 16), 2_048),
}
KAPPA = 1e12
SEED = 0
BAR_VS_DASK = 0.5
STREAMED, KEPT, S_ONLY, DASK, COV = (
    "ours streamed",
    "ours kept",
    "ours S+Vt",
    "dask svd",
    "covariance",
)
WITH_U = (STREAMED, KEPT, DASK)  # routes that store U

Result = tuple[np.ndarray, np.ndarray | None]  # (singular values, vt or None)


# --------------------------------------------------------------------------- data


def spectrum(n: int) -> np.ndarray:
    return np.logspace(0, -np.log10(KAPPA), n)


def _generate(block: np.ndarray, nblocks: int, block_info: Any = None) -> np.ndarray:
    """One storage chunk: ``H_i / √B · diag(σ) · Vᵀ`` (see the module docstring)."""
    i = block_info[0]["chunk-location"][0]
    rows, n = block.shape
    v, _ = np.linalg.qr(np.random.default_rng([SEED, 1]).standard_normal((n, n)))
    h, _ = np.linalg.qr(np.random.default_rng([SEED, 2, i]).standard_normal((rows, n)))
    return (h * (spectrum(n) / np.sqrt(nblocks))) @ v.T


def ensure_input(data_dir: Path, shape: tuple[int, int], chunk_rows: int) -> Path:
    """Path of the input with the designed spectrum; written (on the cluster) when missing."""
    m, n = shape
    path = data_dir / f"spectrum_k1e12_{m}x{n}_c{chunk_rows}.zarr"
    if path.exists():
        z = zarr.open_array(str(path), mode="r")
        if z.shape == shape and z.chunks == (chunk_rows, n):
            print(f"reusing {path}")
            return path
        shutil.rmtree(path)
    if m % chunk_rows and m % chunk_rows < n:
        raise ValueError("the last storage chunk needs at least n rows")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    template = da.empty(shape, chunks=(chunk_rows, n), dtype=np.float64)
    x = template.map_blocks(_generate, template.numblocks[0], dtype=np.float64)
    t0 = time.perf_counter()
    x.to_zarr(str(tmp), overwrite=True)
    tmp.rename(path)  # only a complete array gets the final name
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    return path


def reference_spectrum(path: Path) -> np.ndarray:
    """σ of the stored matrix from a streaming float64 Householder QR (cached)."""
    cache = path.with_name(path.name.removesuffix(".zarr") + ".reference.npy")
    if cache.exists():
        return np.load(cache)
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    z = zarr.open_array(str(path), mode="r")
    step = z.chunks[0]
    r = np.zeros((0, z.shape[1]))
    with threadpool_limits(2):
        for start in range(0, z.shape[0], step):
            r = np.linalg.qr(np.vstack([r, z[start : start + step]]), mode="r")
        s = np.linalg.svd(r, compute_uv=False)
    np.save(cache, s)
    print(f"reference spectrum (streaming Householder QR) in {time.perf_counter() - t0:.1f} s")
    return s


# --------------------------------------------------------------------------- routes
# Each takes the input path and a scratch output path and returns (σ, vt).


def _svd_store_u(x: da.Array, out: Path) -> Result:
    res = svd(x)
    # Unoptimized: U re-reads the blocks whose keys the R pass left on the cluster.
    da.store(res.u, fresh_output(out, res.u), lock=False, **UNOPTIMIZED)
    return res.singular_values_all, res.vt


def ours_streamed(src: Path, out: Path) -> Result:
    return _svd_store_u(da.from_zarr(str(src)), out)


def ours_kept(src: Path, out: Path) -> Result:
    """As a job does (pipeline.methods.svd): row blocks, kept in memory when they fit."""
    x = row_blocks(da.from_zarr(str(src)))
    x, persisted = keep_in_memory(x, Client.current())
    if not persisted:
        raise RuntimeError(f"the input does not fit in {PERSIST_FRACTION:.0%} of the workers")
    return _svd_store_u(x, out)


def ours_s(src: Path, out: Path) -> Result:
    res = svd(da.from_zarr(str(src)), compute_u=False)
    return res.singular_values_all, res.vt


def dask_svd(src: Path, out: Path) -> Result:
    u, s, v = da.linalg.svd(da.from_zarr(str(src)))
    stored = da.store(u, fresh_output(out, u), lock=False, compute=False)
    _, s, v = dask.compute(stored, s, v)
    return s, v


def covariance(src: Path, out: Path) -> Result:
    x = da.from_zarr(str(src))
    g = (x.T @ x).compute()
    eig, vecs = np.linalg.eigh(g)
    return np.sqrt(np.clip(eig[::-1], 0, None)), vecs[:, ::-1].T


ROUTES: dict[str, Callable[[Path, Path], Result]] = {
    STREAMED: ours_streamed,
    KEPT: ours_kept,
    S_ONLY: ours_s,
    DASK: dask_svd,
    COV: covariance,
}


# --------------------------------------------------------------------------- harness


@contextmanager
def cluster() -> Iterator[Client]:
    spec = ClusterSpec(n_workers=2, threads_per_worker=1)
    with LocalCluster(**local_defaults(spec)) as lc, Client(lc) as client:
        yield client


def blas_threads(client: Client) -> set[int]:
    def probe() -> int:
        from threadpoolctl import threadpool_info

        return max((p["num_threads"] for p in threadpool_info()), default=0)

    return set(client.run(probe).values())


def _trim() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def release_memory() -> None:
    """Free what a run left on the cluster (the kept route's input), so the next run's peak
    does not count it: drop it here, wait for the scheduler to forget it, trim the heaps."""
    gc.collect()
    client = Client.current()
    deadline = time.monotonic() + 30
    while client.who_has() and time.monotonic() < deadline:
        time.sleep(0.1)
    if sys.platform == "linux":
        client.run(_trim)


def timed(
    fn: Callable[[Path, Path], Result], src: Path, out: Path, keep: bool = False
) -> tuple[float, float, Result]:
    """One run from a synced file system (dirty pages are not written back during it).

    Returns ``(seconds, peak cluster process memory in bytes, result)``.
    """
    os.sync()
    sampler = MemorySampler()
    with sampler.sample("run", measure="process", interval=0.25):
        t0 = time.perf_counter()
        result = fn(src, out)
        seconds = time.perf_counter() - t0
    release_memory()
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    samples = sampler.samples.get("run") or [(0, 0)]
    return seconds, float(max(v for _, v in samples)), result


def stored_orthogonality(out: Path) -> float:
    """``‖UᵀU − I‖_F`` of a stored U (float64 Gram, block by block on the cluster)."""
    orth = orthogonality_from_gram(gram(da.from_zarr(str(out))).compute())
    shutil.rmtree(out, ignore_errors=True)
    return orth


def warm_up(work: Path, n: int) -> None:
    """Imports, worker start-up and every route once, on a small array of the same width."""
    tiny = work / "warmup.zarr"
    x = da.random.default_rng(1).standard_normal((20_000, n), chunks=(5_000, n))
    x.to_zarr(str(tiny), overwrite=True)
    for fn in ROUTES.values():
        fn(tiny, work / "warmup_u.zarr")
    shutil.rmtree(work / "warmup_u.zarr", ignore_errors=True)
    shutil.rmtree(tiny, ignore_errors=True)


def block_paths(src: Path) -> str:
    """How our row blocks are factorized (Cholesky QR paths or the Householder fallback)."""
    x = da.from_zarr(str(src))
    return f"{row_blocks(x).numblocks[0]} blocks: {svd(x, compute_u=False).block_methods}"


def sigma_errors(s: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(relative error of σ_min, max relative error over all σ)."""
    rel = np.abs(np.asarray(s, dtype=np.float64) - ref) / ref
    return float(rel[-1]), float(rel.max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="400,000 × 64 instead of 4M × 64")
    size.add_argument("--tiny", action="store_true", help="20,000 × 16: a smoke run")
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3; tiny 1)")
    args = parser.parse_args()
    name = "tiny" if args.tiny else "small" if args.small else "full"
    (m, n), chunk_rows = SIZES[name]
    repeats = args.repeats or (1 if args.tiny else 3)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    work = args.data_dir / "outputs_svd"
    work.mkdir(exist_ok=True)
    gib = m * n * 8 / 2**30
    print(
        f"input: {m:,} × {n} float64 ({gib:.2f} GiB), storage chunks {chunk_rows} × {n}, "
        f"σ log-spaced 1 … {1 / KAPPA:g}"
    )
    try:
        with cluster() as client:
            mem = cluster_memory(client)
            print(
                f"cluster: 2 workers × 1 thread, BLAS threads per worker {blas_threads(client)}, "
                f"memory_limit {mem / 2**30:.1f} GiB in total (inputs up to "
                f"{PERSIST_FRACTION * mem / 2**30:.1f} GiB are kept in memory by a job)"
            )
            src = ensure_input(args.data_dir, (m, n), chunk_rows)
            ref = reference_spectrum(src)
            warm_up(work, n)
            t0 = time.perf_counter()
            da.from_zarr(str(src)).sum().compute()
            read = time.perf_counter() - t0
            print(f"read once: {read:.2f} s")
            print(f"our block paths: {block_paths(src)}")
            times: dict[str, list[float]] = {k: [] for k in ROUTES}
            peaks: dict[str, list[float]] = {k: [] for k in ROUTES}
            results: dict[str, Result] = {}
            outs = {label: work / f"u_{i}.zarr" for i, label in enumerate(ROUTES)}
            for i in range(repeats):  # interleaved, so drifts hit every route alike
                for label, fn in ROUTES.items():
                    last = i == repeats - 1 and label in WITH_U  # keep U for the check
                    seconds, peak, results[label] = timed(fn, src, outs[label], keep=last)
                    times[label].append(seconds)
                    peaks[label].append(peak)
                    print(
                        f"  round {i + 1}  {label:13s} {seconds:7.2f} s  "
                        f"peak {peak / 2**30:5.2f} GiB",
                        flush=True,
                    )
            orth = {label: stored_orthogonality(outs[label]) for label in WITH_U}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nResults (median of {repeats} interleaved rounds; {m:,} × {n}, κ = {KAPPA:g})")
    print(
        f"  {'route':13s} {'median s':>9s} {'runs s':>22s} {'peak GiB':>9s} "
        f"{'σ_min rel err':>14s} {'max σ rel err':>14s} {'vs designed σ_min':>18s} "
        f"{'‖UᵀU−I‖':>9s}"
    )
    design = spectrum(n)
    medians, errs = {}, {}
    for label, ts in times.items():
        medians[label] = float(np.median(ts))
        s, _ = results[label]
        errs[label] = sigma_errors(s, ref)
        d_min, _ = sigma_errors(s, design)
        runs = ", ".join(f"{t:.2f}" for t in ts)
        o = f"{orth[label]:9.1e}" if label in orth else f"{'—':>9s}"
        print(
            f"  {label:13s} {medians[label]:9.2f} {runs:>22s} {max(peaks[label]) / 2**30:9.2f} "
            f"{errs[label][0]:14.2e} {errs[label][1]:14.2e} {d_min:18.2e} {o}"
        )
    ref_min, _ = sigma_errors(ref, design)
    print(f"  (reference vs designed σ_min: {ref_min:.2e}; peak = cluster process memory)")

    def verdict(label: str) -> str:
        ratio = medians[label] / medians[DASK]
        equal = errs[label][1] <= max(10 * errs[DASK][1], 1e-3)
        met = "MET" if ratio <= BAR_VS_DASK and equal else "NOT MET"
        return f"ratio {label} / {DASK} = {ratio:.2f} ({met})"

    print(
        f"\nSUMMARY: {verdict(STREAMED)}; {verdict(KEPT)}; {verdict(S_ONLY)} "
        f"(medians; bar ≤ {BAR_VS_DASK} with equal accuracy); σ_min rel err: "
        + ", ".join(f"{label} {errs[label][0]:.1e}" for label in ROUTES)
    )
    rate = gemm_rate(np.float64, cores=2)  # the machine's floor (benchmarks/floor.py)
    print("\nAgainst the floor (medians; writing U is not in the floor)")
    with_u = {label: medians[label] for label in (STREAMED, KEPT, DASK)}
    print(floor_line(Floor(read, svd_flops(m, n, with_u=True), rate), with_u))
    without_u = {label: medians[label] for label in (S_ONLY, COV)}
    print(floor_line(Floor(read, svd_flops(m, n, with_u=False), rate), without_u))
    ok = all(np.isfinite(e[1]) for k, e in errs.items() if k != COV)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
