"""One job lifecycle: what a `factorize run` costs in parsing, opening and listing; the
boundary every run passes (precheck, prepare) refusing an output that overlaps its input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from tests.conftest import (
    REPO,
    factorize_cmd,
    job_dict,
    one_line_exit,
    write_array,
    write_job,
)

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


def test_run_parses_once_opens_once_per_task_and_lists_nothing(
    tmp_path, dist_client, prefect_server
):
    write_array(tmp_path / "in.zarr", np.random.default_rng(0).random((2000, 8)), chunks=(500, 8))
    job = job_dict(
        tmp_path,
        str(tmp_path / "in.zarr"),
        cluster={"kind": "address", "address": dist_client.scheduler.address},
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


# --------------------------------------------------------------------------- output vs input


def _overlap_cases(tmp_path):
    """(case, job overrides, the result folder as the message names it) — each job would
    replace or write into its own input store ``tmp_path/in.zarr`` (or hold it)."""
    store = tmp_path / "in.zarr"
    (tmp_path / "sub").mkdir()
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "job").symlink_to(store)  # a real symlink: links/job → in.zarr
    inner = tmp_path / "out" / "job" / "in.zarr"  # an input inside the result folder
    write_array(inner, np.ones((40, 3)), chunks=(10, 3))
    return [
        ("inside the store", {"output": {"url": str(store)}}, f"{store}/job"),
        ("the store's own folder", {"name": "in.zarr", "output": {"url": str(tmp_path)}}, store),
        ("a symlinked name", {"output": {"url": str(tmp_path / "links")}}, "resolves to"),
        (
            "'..' in the path",
            {"name": "in.zarr", "output": {"url": f"{tmp_path}/sub/.."}},
            "resolves to",
        ),
        (
            "the store inside the result",
            {"input": {"url": str(inner)}, "output": {"url": str(tmp_path / "out")}},
            "lies inside the output",
        ),
    ]


def test_an_output_overlapping_the_input_is_refused_before_anything_is_written(tmp_path):
    """Each case used to replace the input and exit 0. precheck (validate, run) and
    prepare (the flow's first task) refuse it; the input is untouched, nothing written."""
    import zarr

    from pipeline.config import parse_config
    from pipeline.errors import ConfigError, InputError
    from pipeline.jobs import precheck, prepare

    data = np.random.default_rng(0).random((40, 3))
    write_array(tmp_path / "in.zarr", data, chunks=(10, 3))
    for case, over, shown in _overlap_cases(tmp_path):
        job = job_dict(tmp_path, str(tmp_path / "in.zarr"), **over)
        job["output"]["overwrite"] = True
        config = parse_config(job)
        for step in (precheck, prepare):
            with pytest.raises(ConfigError) as err:
                step(config)
            msg = str(err.value)
            assert "\n" not in msg and str(shown) in msg, (case, step.__name__, msg)
            assert msg.startswith("output: ") and "in.zarr" in msg, msg
            assert msg.endswith("choose another output.url or name"), msg
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "in.zarr"))[...], data)
    hidden = [p for p in tmp_path.rglob(".*") if ".partial-" in p.name or ".old-" in p.name]
    assert not hidden and not (tmp_path / "in.zarr" / "job").exists()
    assert (tmp_path / "links" / "job").is_symlink()

    beside = job_dict(tmp_path, str(tmp_path / "in.zarr"), name="in.zarr-results")
    beside["output"] = {"url": str(tmp_path), "overwrite": True}  # a sibling, same prefix
    assert precheck(parse_config(beside)).shape == (40, 3)
    unknown = job_dict(tmp_path, "foo://x/in.zarr")  # still the input's own one line
    with pytest.raises(InputError, match=r"^input.url: cannot open 'foo://x/in.zarr'"):
        precheck(parse_config(unknown))


@pytest.mark.e2e
def test_validate_and_run_refuse_an_output_inside_the_input_with_one_line(tmp_path):
    store = tmp_path / "in.zarr"
    write_array(store, np.ones((40, 3)), chunks=(10, 3))
    inside = job_dict(tmp_path, str(store), output={"url": str(store), "overwrite": True})
    itself = job_dict(
        tmp_path, str(store), name="in.zarr", output={"url": str(tmp_path), "overwrite": True}
    )
    runs = [
        ("validate", write_job(tmp_path, inside, "inside.yaml"), f"{store}/job lies inside"),
        ("run", write_job(tmp_path, itself, "itself.yaml"), f"{store} is the input store"),
    ]
    procs = [
        subprocess.Popen(
            [*factorize_cmd(), command, str(path)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command, path, _ in runs
    ]
    for (command, path, says), proc in zip(runs, procs, strict=True):
        out, err = proc.communicate(timeout=180)
        line = one_line_exit(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        assert line.startswith(f"factorize: error: {path}: output: {says}"), (command, line)
        assert f"the input store {store}" in line or f"is the input store {store}" in line
    assert sorted(p.name for p in store.iterdir()) == ["c", "zarr.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr", "inside.yaml", "itself.yaml"]
