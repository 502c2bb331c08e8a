"""The device backend (cupy on a GPU) against the CPU cores of the same machine.

Same process, same generated Zarr matrix (non-negative, low rank plus noise, float64),
input read once and kept in memory on both sides (the bar is about compute, not I/O):

- CPU  a LocalCluster of one worker process per core × 1 thread (BLAS one thread each),
       the matrix persisted in the workers' memory as numpy blocks;
- GPU  a LocalCluster of threads in this process driving the one GPU, the matrix read
       through the device path (``open_matrix(..., on_device=True)``: decoded on the
       host, one copy to the device per block) and persisted in device memory.

Methods, as the library functions the jobs call: ``tsqr`` (R and Q formed), ``rsvd``
(rank 50, U formed), ``nmf`` (rank 20, HALS, 30 iterations — 3 with ``--tiny`` — W
formed). Per method the
seconds on each side, the ratio CPU / GPU, and the agreement of the results (R up to
round-off, singular values, NMF's final relative error). The run asserts that the device
did the work: every persisted block is a device array and device memory holds the input.

Bar (issue 11, on an H200-class GPU): every method ≥ 5× faster than the machine's CPU
cores, results equal within the CPU run's own tolerances.

Without a GPU (cupy missing or no device) the GPU side runs on the emulated device of
``tests/fake_device.py`` — numpy arithmetic under cupy's rules — which checks the code
path, not the speed: the ratio it prints says nothing about a GPU.

Usage::

    python benchmarks/bench_gpu.py --tiny      # 20,000 × 64, seconds (smoke; emulated without GPU)
    python benchmarks/bench_gpu.py             # 2,000,000 × 256 float64 (3.8 GiB)
    python benchmarks/bench_gpu.py --rows 4000000 --cols 512
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
from distributed import Client, LocalCluster, wait
from floor import Floor, floor_line, gemm_rate, nmf_flops, qr_flops, rsvd_flops

from pipeline import backend
from pipeline.cluster import available_cores, local_defaults
from pipeline.config import ClusterSpec, InputSpec, SyntheticSpec
from pipeline.datasets import write_synthetic
from pipeline.io import open_matrix
from pipeline.linalg import nmf, row_blocks, rsvd, tsqr
from pipeline.memory import scheduler_workers

FULL = (2_000_000, 256, 125_000)  # rows, columns, rows per chunk
TINY = (20_000, 64, 2_500)
RSVD_RANK, NMF_RANK, NMF_ITERS, TINY_NMF_ITERS = 50, 20, 30, 3
BAR = 5.0


def use_device(force_emulation: bool) -> str:
    """Install the device library: cupy when a GPU is usable, else the emulation."""
    if not force_emulation and backend.device_problem() is None:
        return "cupy on " + _gpu_name()
    from tests.fake_device import DEVICE

    backend.set_device(DEVICE)
    return "EMULATED device (tests/fake_device.py: no GPU here; times say nothing about GPUs)"


def _gpu_name() -> str:
    xp = backend.device().xp
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    return props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])


def device_bytes_in_use() -> int:
    """Bytes the device library holds (cupy's memory pool; the emulation's copies)."""
    dev = backend.device()
    if dev.name == "cupy" and hasattr(dev.xp, "get_default_memory_pool"):
        return int(dev.xp.get_default_memory_pool().used_bytes())
    from tests.fake_device import STATS

    return STATS.transferred_bytes


def _block_is_device(block: Any) -> np.ndarray:
    return np.array([[backend.is_device(block)]])


def all_blocks_on_device(x: da.Array) -> bool:
    flags = da.map_blocks(
        _block_is_device,
        x,
        chunks=((1,) * x.numblocks[0], (1,) * x.numblocks[1]),
        dtype=bool,
        meta=np.empty((0, 0), dtype=bool),
    )
    return bool(flags.all().compute())


def timed(func: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = func()
    return time.perf_counter() - t0, out


def run_tsqr(x: da.Array) -> dict[str, Any]:
    res = tsqr(x)
    (q,) = dask.persist(res.q, optimize_graph=False)
    wait(q)
    return {"r": backend.to_host(res.r)}


def run_rsvd(x: da.Array) -> dict[str, Any]:
    res = rsvd(x, RSVD_RANK)
    (u,) = dask.persist(res.u, optimize_graph=False)
    wait(u)
    return {"s": np.asarray(res.s64), "passes": res.passes}


def run_nmf(x: da.Array, iterations: int = NMF_ITERS) -> dict[str, Any]:
    res = nmf(x, NMF_RANK, max_iter=iterations, tol=0.0)
    (w,) = dask.persist(res.w, optimize_graph=False)
    wait(w)
    return {"error": res.history[-1]}


def agreement(method: str, cpu: dict[str, Any], gpu: dict[str, Any]) -> tuple[float, float]:
    """``(measured difference, allowed)``: the CPU run's own tolerances (round-off of the
    working precision scaled by the problem, as the test suite checks against numpy)."""
    eps = np.finfo(np.float64).eps
    if method == "tsqr":
        r1, r2 = cpu["r"], gpu["r"]
        diff = float(np.linalg.norm(r1 - r2) / np.linalg.norm(r1))
        return diff, 1e3 * eps * r1.shape[0]
    if method == "rsvd":
        diff = float(np.max(np.abs(cpu["s"] - gpu["s"]) / cpu["s"][0]))
        return diff, 1e-8
    diff = abs(cpu["error"] - gpu["error"]) / cpu["error"]
    return float(diff), 1e-6


def in_memory(spec: InputSpec, on_device: bool, rows: int) -> da.Array:
    x, _ = open_matrix(spec, on_device=on_device)
    x = row_blocks(x, rows)
    x = x.persist()
    wait(x)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke-test size, seconds")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--cols", type=int)
    parser.add_argument("--emulate", action="store_true", help="emulated device even on a GPU")
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench-gpu"))
    args = parser.parse_args()
    rows, cols, chunk = TINY if args.tiny else FULL
    rows, cols = args.rows or rows, args.cols or cols
    iterations = TINY_NMF_ITERS if args.tiny else NMF_ITERS
    methods = {
        "tsqr": run_tsqr,
        "rsvd": run_rsvd,
        "nmf": lambda x: run_nmf(x, iterations),
    }
    where = use_device(args.emulate)
    print(f"device: {where}")

    path = args.data_dir / f"nonneg-{rows}x{cols}.zarr"
    if not path.exists():
        spec = SyntheticSpec(
            kind="nonnegative", shape=(rows, cols), chunks=(chunk, cols), dtype="float64"
        )
        write_synthetic(str(path), spec)
    source = InputSpec(url=str(path))
    gib = rows * cols * 8 / 2**30
    print(f"input: {rows:,} × {cols} float64 ({gib:.2f} GiB), chunks of {chunk:,} rows")

    results: dict[str, dict[str, Any]] = {}
    cpu_cluster = LocalCluster(**local_defaults(ClusterSpec()))
    with Client(cpu_cluster) as client:
        workers = len(scheduler_workers(client))
        print(f"CPU: {workers} worker processes × 1 thread ({available_cores()} cores)")
        x = in_memory(source, False, chunk)
        for name, run in methods.items():
            seconds, out = timed(lambda run=run: run(x))
            results[name] = {"cpu": seconds, "cpu_out": out}
        del x
    cpu_cluster.close()

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=4, processes=False, dashboard_address=":0"
        ) as gpu_cluster,
        Client(gpu_cluster),
    ):
        x = in_memory(source, True, chunk)
        assert all_blocks_on_device(x), "the device backend left numpy blocks"
        held = device_bytes_in_use()
        assert held >= x.nbytes, f"device holds {held} bytes, the input is {x.nbytes}"
        print(f"GPU side: every block a device array; device memory in use {held / 2**30:.2f} GiB")
        for name, run in methods.items():
            seconds, out = timed(lambda run=run: run(x))
            results[name].update(gpu=seconds, gpu_out=out)

    print(f"\n{'method':8} {'CPU s':>9} {'GPU s':>9} {'ratio CPU/GPU':>14} {'difference':>11}")
    slow = []
    for name, r in results.items():
        ratio = r["cpu"] / r["gpu"]
        diff, allowed = agreement(name, r["cpu_out"], r["gpu_out"])
        assert diff <= allowed, f"{name}: GPU and CPU differ by {diff:.2e} > {allowed:.2e}"
        print(f"{name:8} {r['cpu']:9.2f} {r['gpu']:9.2f} {ratio:14.2f} {diff:11.1e}")
        if ratio < BAR:
            slow.append(name)
    print(f"SUMMARY: ratio CPU / GPU per method, bar ≥ {BAR:g}×: ", end="")
    print("met" if not slow else f"not met by {', '.join(slow)}", f"({where})")
    print_floor(results, (rows, cols), iterations, workers, where)


def method_flops(name: str, shape: tuple[int, int], out: dict[str, Any], iterations: int) -> float:
    """The method's products with the input (benchmarks/floor.py's counts)."""
    if name == "tsqr":
        return qr_flops(*shape, with_q=True)
    if name == "rsvd":  # each pass multiplies by A and by Aᵀ: 2 products
        return rsvd_flops(*shape, RSVD_RANK + 10, out["passes"] - 1)
    return nmf_flops(*shape, NMF_RANK, iterations)


def device_gemm_rate() -> float:
    """Flops per second of the device on square float64 products (best of 3 after one
    untimed product)."""
    xp = backend.device().xp
    a = xp.asarray(np.random.default_rng(0).standard_normal((4096, 4096)))
    a @ a
    xp.cuda.Device().synchronize()
    best = np.inf
    for _ in range(3):
        t = time.perf_counter()
        a @ a
        xp.cuda.Device().synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * 4096**3 / best


def print_floor(
    results: dict[str, dict[str, Any]],
    shape: tuple[int, int],
    iterations: int,
    cores: int,
    where: str,
) -> None:
    """Each side against its compute floor (the input is in memory on both: no read)."""
    cpu_rate = gemm_rate(np.float64, cores=cores)
    gpu_rate = None if where.startswith("EMULATED") else device_gemm_rate()
    print("\nagainst the compute floor (float64 GEMM rate; the input is kept in memory):")
    for name, r in results.items():
        flops = method_flops(name, shape, r["cpu_out"], iterations)
        line = f"  {name:5s} CPU: " + floor_line(Floor(0.0, flops, cpu_rate), {"CPU": r["cpu"]})
        print(line.replace("\n", " "))
        if gpu_rate is None:
            print(f"  {name:5s} GPU: floor not measured (emulated device)")
        else:
            gpu = floor_line(Floor(0.0, flops, gpu_rate), {"GPU": r["gpu"]})
            print(f"  {name:5s} GPU: " + gpu.replace("\n", " "))


if __name__ == "__main__":
    main()
