"""One job lifecycle: what a `factorize run` costs in parsing, opening and listing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from tests.conftest import REPO, job_dict, write_array, write_job

COUNTING_RUN = """
import json, sys
from collections import Counter

import pipeline.config, pipeline.fingerprint, pipeline.jobs
from pipeline import cli

counts = {"parse": 0, "opens": [], "listings": 0}

def counting(fn, record):
    def wrapper(*args, **kwargs):
        record()
        return fn(*args, **kwargs)
    return wrapper

def where():
    from prefect.context import TaskRunContext
    ctx = TaskRunContext.get()
    return ctx.task.name if ctx else "before the flow"

def parsed():
    counts["parse"] += 1

def listed():
    counts["listings"] += 1

pipeline.config.parse_config = counting(pipeline.config.parse_config, parsed)
pipeline.jobs.open_matrix = counting(
    pipeline.jobs.open_matrix, lambda: counts["opens"].append(where())
)
pipeline.fingerprint.store_fingerprint = counting(pipeline.fingerprint.store_fingerprint, listed)
code = cli.main(["run", sys.argv[1]])
with open(sys.argv[2], "w") as f:
    json.dump({"exit": code, **counts}, f)
"""


@pytest.mark.slow
def test_run_parses_once_opens_once_per_task_and_lists_nothing(tmp_path, client):
    write_array(tmp_path / "in.zarr", np.random.default_rng(0).random((2000, 8)), chunks=(500, 8))
    job = job_dict(
        tmp_path,
        str(tmp_path / "in.zarr"),
        cluster={"kind": "address", "address": client.scheduler.address},
        methods=[{"method": "rsvd", "rank": 3}],
    )
    script = tmp_path / "counting_run.py"
    script.write_text(COUNTING_RUN)
    counts_file = tmp_path / "counts.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script), str(write_job(tmp_path, job)), str(counts_file)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = json.loads(counts_file.read_text())
    assert counts["exit"] == 0
    assert counts["parse"] == 1  # the CLI parses; the flow takes the model as it is
    opens = Counter(counts["opens"])
    # once to refuse a bad input before Prefect starts, then once in each task
    assert opens == {"before the flow": 1, "prepare": 1, "compute-rsvd": 1}, opens
    assert counts["listings"] == 0  # no store listing without skip_if_complete
    assert (tmp_path / "out" / "job" / "metrics.json").exists()
