"""Smoke runs of the benchmark scripts, so they cannot rot unnoticed.

Every ``benchmarks/bench_*.py`` is picked up automatically and must follow this contract:

* ``--tiny`` runs in seconds (tiny shapes, one repeat, the long parts shrunk) yet goes
  through every code path of the full run: ours and the anchor(s), the correctness checks
  and the ratio print; it exits 0.
* ``--data-dir DIR`` is honoured: inputs and outputs go under ``DIR`` only.
* Ratio convention: at least one printed line contains the word ``ratio`` (any case, as a
  whole word) followed by a number on the same line, e.g.
  ``ratio ours / dask QR: 0.71`` or ``SUMMARY: ratio ours Q+R / dask Q+R = 0.62 (...)``.
  The check is :data:`RATIO_LINE`.
* The machine's floor (``benchmarks/floor.py``, issue 24): at least one line gives a timed
  run's ratio to it, ``ratio <run> / floor = <number>`` (:data:`FLOOR_LINE`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

SCRIPTS = sorted((REPO / "benchmarks").glob("bench_*.py"))
RATIO_LINE = re.compile(r"\bratio\b.*\d", re.IGNORECASE)
FLOOR_LINE = re.compile(r"\bratio [^;=]+ / floor = \d+\.\d+")
TIMEOUT_S = 240  # each tiny run takes ~10-30 s on 2 busy cores


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = "1"
    return env


def test_scripts_found():
    assert SCRIPTS, "no benchmarks/bench_*.py found"


@pytest.mark.e2e
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_tiny_run(script: Path, tmp_path: Path):
    data_dir = tmp_path / "bench"
    cmd = [sys.executable, str(script.relative_to(REPO)), "--tiny", "--data-dir", str(data_dir)]
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")[-4000:]
        pytest.fail(f"{script.name} --tiny ran past {TIMEOUT_S} s; output tail:\n{out!r}")
    tail = f"stdout tail:\n{proc.stdout[-4000:]}\nstderr tail:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"{script.name} --tiny exited {proc.returncode}\n{tail}"
    assert any(RATIO_LINE.search(line) for line in proc.stdout.splitlines()), (
        f"{script.name} printed no line with 'ratio' and a number\n{tail}"
    )
    assert FLOOR_LINE.search(proc.stdout), f"{script.name} printed no ratio to the floor\n{tail}"
    assert data_dir.is_dir(), f"{script.name} ignored --data-dir"


def test_floor_counts_and_line():
    """benchmarks/floor.py: the textbook counts, the larger part as the floor, the line the
    smoke runs look for, and a GEMM rate measured on this machine."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import floor
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    m, n = 1000, 30
    assert floor.qr_flops(m, n, with_q=False) == 2 * n * n * (m - n / 3)
    assert floor.qr_flops(m, n, with_q=True) == 4 * n * n * (m - n / 3)
    assert floor.svd_flops(m, n, with_u=True) == floor.qr_flops(m, n, with_q=True) + 2 * m * n * n
    assert floor.rsvd_flops(m, n, 60, 2) == 6 * 2 * m * n * 60  # sketch, 2 × 2, projection
    assert floor.rsvd_flops(m, n, 60, 0, nnz=500) == 2 * 2 * 500 * 60
    assert floor.nmf_flops(m, n, 20, 10) == 4 * 20 * m * n * 10
    assert floor.als_flops(100, 50, 1000, 8) == 2 * 1000 * 64 + 150 * 512 / 3
    assert floor.als_flops(100, 50, 1000, 8, cg_steps=3) == 3 * (2 * 150 * 64 + 8 * 1000 * 8)
    read_bound = floor.Floor(read=2.0, flops=1e9, rate=1e9)
    assert read_bound.compute == 1.0 and read_bound.seconds == 2.0
    line = floor.floor_line(read_bound, {"ours": 3.0, "anchor": 5.0})
    assert "ratio ours / floor = 1.50" in line and "ratio anchor / floor = 2.50" in line
    assert FLOOR_LINE.search(line)
    rate = floor.gemm_rate(np.float64, cores=2)
    assert 1e8 < rate < 1e13  # a CPU core does between 0.05 and 5,000 GFLOP/s
