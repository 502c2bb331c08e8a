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
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = sorted((REPO / "benchmarks").glob("bench_*.py"))
RATIO_LINE = re.compile(r"\bratio\b.*\d", re.IGNORECASE)
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
    assert data_dir.is_dir(), f"{script.name} ignored --data-dir"
