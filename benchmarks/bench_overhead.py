"""The fixed cost of a run: wall time − compute time of the demo job through the real CLI.

Every run is a fresh ``factorize run`` process, as a user types it, on the same input
(the demo's 200,000 × 32 float64 matrix, written once beforehand) and machine:

- ``cold``         no Prefect server runs: the run starts a temporary one that dies with it
- ``warm``         ``factorize server start`` ran before: the run uses the lasting server
- ``config error`` a misspelt key: seconds until the one-line error (exit 2)
- ``baseline``     with ``--baseline REV``: the cold run through the CLI of an earlier
                   commit (a git worktree of REV on ``PYTHONPATH``), in the same process
                   as ours, on the same data — the anchor of the cold ratio

Compute is the sum of the methods' ``seconds`` in ``metrics.json`` (what the cluster
spent on the job); overhead = wall − compute. Printed per mode: the median of
``--repeats`` runs. Then the parts of the cold start measured on their own (Python and the
CLI's imports, Prefect's import, a temporary API server until it answers, a LocalCluster's
start and close), which show where the fixed cost goes.

Bars (issue 20): cold overhead ≤ ½ of the baseline's; ≤ 3 s with a running server;
config errors in ≤ 2 s.

Usage::

    python benchmarks/bench_overhead.py --tiny                  # smoke run: 1 repeat, tiny job
    python benchmarks/bench_overhead.py --baseline 0434854      # the issue's comparison
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from floor import Floor, floor_line, gemm_rate, qr_flops, read_once_seconds

REPO = Path(__file__).resolve().parents[1]
FULL_SHAPE, TINY_SHAPE = (200_000, 32), (4_000, 8)
BAR_COLD, BAR_WARM, BAR_ERROR = 0.5, 3.0, 2.0


def _env(home: Path, pythonpath: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1"}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_PROFILE", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def _cli(code: Path | None) -> list[str]:
    """The CLI of our tree, or ``python -m pipeline.cli`` of a baseline tree."""
    if code is None:
        exe = Path(sys.executable).with_name("factorize")
        return [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]
    return [sys.executable, "-m", "pipeline.cli"]


def write_job(data: Path, shape: tuple[int, int]) -> Path:
    """The demo job on an input under ``data``, writing under ``data/out``."""
    job = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    job["input"]["url"] = str(data / "demo.zarr")
    job["input"]["create_if_missing"]["shape"] = list(shape)
    job["input"]["create_if_missing"]["chunks"] = [max(shape[0] // 8, shape[1]), shape[1]]
    job["output"] = {"url": str(data / "out"), "overwrite": True}
    path = data / "demo.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def timed_run(job: Path, home: Path, code: Path | None = None) -> tuple[float, float]:
    """``(wall, compute)`` seconds of one ``factorize run``."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*_cli(code), "run", str(job)],
        cwd=code or REPO,
        env=_env(home, code),
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = yaml.safe_load(job.read_text())["output"]["url"]
    metrics = json.loads((Path(out) / "demo" / "metrics.json").read_text())
    return wall, sum(m["seconds"] for m in metrics["methods"].values())


def config_error_seconds(data: Path, home: Path) -> float:
    """Seconds until ``factorize run`` refuses a job file with a misspelt key."""
    bad = data / "typo.yaml"
    bad.write_text((data / "demo.yaml").read_text().replace("methods:", "methds:"))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*_cli(None), "run", str(bad)], env=_env(home), capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2 and "did you mean 'methods'" in proc.stderr, proc.stderr
    return seconds


def _seconds(code: str, home: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=_env(home), check=True, cwd=REPO)
    return time.perf_counter() - t0


def parts(home: Path) -> dict[str, float]:
    """The pieces of a cold start, each timed on its own in a fresh process."""
    start_server = (
        "from pipeline.lifetime import ApiServer\ns = ApiServer()\ns.start()\ns.wait()\ns.stop()"
    )
    cluster = (
        "from pipeline.cluster import cluster_from_spec\nfrom pipeline.config import ClusterSpec\n"
        "if __name__ == '__main__':\n    with cluster_from_spec(ClusterSpec()):\n        pass"
    )
    python = _seconds("pass", home)
    return {
        "python": python,
        "cli imports (validate's)": _seconds("import pipeline.cli, pipeline.jobs", home) - python,
        "prefect imports (import flows)": _seconds("import flows", home) - python,
        "temporary API server until /health": _seconds(start_server, home) - python,
        "LocalCluster start + close": _seconds(cluster, home) - python,
    }


def measure(job: Path, home: Path, repeats: int, code: Path | None = None) -> dict[str, float]:
    runs = [timed_run(job, home, code) for _ in range(repeats)]
    walls, computes = zip(*runs, strict=True)
    overheads = [w - c for w, c in runs]
    return {
        "wall": statistics.median(walls),
        "compute": statistics.median(computes),
        "overhead": statistics.median(overheads),
    }


def baseline_tree(rev: str, data: Path) -> Path:
    """A git worktree of ``rev`` under ``data`` (removed at the end)."""
    tree = data / f"baseline-{rev}"
    if not tree.exists():
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev],
            check=True,
            capture_output=True,
        )
    return tree


def _print(name: str, m: dict[str, float]) -> None:
    print(
        f"{name:<22} wall {m['wall']:6.2f} s   compute {m['compute']:6.2f} s   "
        f"overhead {m['overhead']:6.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="4,000 × 8 input, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", metavar="REV", help="also time this commit's CLI (cold)")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data" / "bench_overhead")
    args = parser.parse_args()
    repeats = 1 if args.tiny else args.repeats
    data = args.data_dir.resolve()
    data.mkdir(parents=True, exist_ok=True)
    job = write_job(data, TINY_SHAPE if args.tiny else FULL_SHAPE)
    # One PREFECT_HOME for both (as a user's ~/.prefect): its database is created once.
    cold_home = warm_home = data / "home"
    if not args.tiny:  # the smoke run skips the untimed first runs: the same code paths
        timed_run(job, cold_home)  # writes the input and Prefect's database: not timed

    cold = measure(job, cold_home, repeats)
    subprocess.run(
        [*_cli(None), "server", "start", "--port", str(_free_port()), "--idle-minutes", "10"],
        env=_env(warm_home),
        check=True,
        capture_output=True,
    )
    try:
        if not args.tiny:
            timed_run(job, warm_home)  # the lasting server's first run: not timed
        warm = measure(job, warm_home, repeats)
    finally:
        subprocess.run([*_cli(None), "server", "stop"], env=_env(warm_home), capture_output=True)
    error = statistics.median(config_error_seconds(data, cold_home) for _ in range(repeats))
    base = None
    if args.baseline:
        tree = baseline_tree(args.baseline, data)
        try:
            timed_run(job, data / "home-base", tree)  # its database: not timed
            base = measure(job, data / "home-base", repeats, tree)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)])

    shape = yaml.safe_load(job.read_text())["input"]["create_if_missing"]["shape"]
    print(f"demo job (tsqr with Q) of a {shape[0]:,} × {shape[1]} float64 input:")
    print(f"  median of {repeats} run(s), each a fresh `factorize run` process")
    _print("cold (temporary API)", cold)
    _print("warm (lasting server)", warm)
    if base is not None:
        _print(f"baseline {args.baseline} (cold)", base)
    print(f"config error (exit 2)  {error:.2f} s")
    print("parts of a cold start, each in a fresh process:")
    for name, seconds in parts(cold_home).items():
        print(f"  {name:<36} {seconds:6.2f} s")
    if base is not None:
        ratio = cold["overhead"] / base["overhead"]
        print(
            f"SUMMARY: ratio cold overhead / baseline cold overhead = {ratio:.2f} "
            f"(bar ≤ {BAR_COLD}); warm overhead {warm['overhead']:.2f} s (bar ≤ {BAR_WARM} s); "
            f"config error {error:.2f} s (bar ≤ {BAR_ERROR} s)"
        )
    else:
        ratio = warm["overhead"] / cold["overhead"]
        print(
            f"SUMMARY: ratio warm overhead / cold overhead = {ratio:.2f}; "
            f"warm {warm['overhead']:.2f} s (bar ≤ {BAR_WARM} s); config error {error:.2f} s "
            f"(bar ≤ {BAR_ERROR} s)"
        )
    print_floor(job, cold, warm)
    if args.tiny:
        shutil.rmtree(data / "out", ignore_errors=True)


def print_floor(job: Path, cold: dict[str, float], warm: dict[str, float]) -> None:
    """The demo job's floor (benchmarks/floor.py): its input read once in this process
    (threads, 2 cores) and a QR with Q at 2 cores' GEMM rate — what a run with no fixed cost
    at all could take."""
    spec = yaml.safe_load(job.read_text())["input"]
    m, n = spec["create_if_missing"]["shape"]
    floor = Floor(read_once_seconds([spec["url"]]), qr_flops(m, n, with_q=True), gemm_rate())
    print(floor_line(floor, {"cold wall": cold["wall"], "warm wall": warm["wall"]}))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
