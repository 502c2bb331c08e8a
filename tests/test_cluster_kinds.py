"""Clusters in the ecosystem's vocabulary: ``kind: class`` (prefect-dask's cluster_class,
cluster_kwargs, scale / adapt_kwargs, client_kwargs), ``kind: scheduler-file``,
``wait_for_workers`` and ``dask_config`` — each on a real cluster started by the test."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import factorize_cmd, job_dict, one_line_exit, write_array, write_job

from pipeline.config import parse_config, redacted_dump
from pipeline.errors import UserError, WorkersTimeoutError

A = np.random.default_rng(4).standard_normal((400, 8))
RSVD = {"method": "rsvd", "rank": 3}


def _job(tmp_path: Path, cluster: dict, methods=None) -> dict:
    url = tmp_path / "a.zarr"
    if not url.exists():
        write_array(url, A, chunks=(100, 8))
    return job_dict(tmp_path, str(url), cluster=cluster, methods=methods or [{"method": "tsqr"}])


def _r_matches(tmp_path: Path) -> None:
    import zarr

    r = zarr.open_group(tmp_path / "out" / "job" / "factors.zarr", mode="r")["tsqr/R"][...]
    np.testing.assert_allclose(np.abs(r), np.abs(np.linalg.qr(A, mode="r")), atol=1e-12)


@pytest.mark.e2e  # the job starts its own cluster of worker processes
def test_class_with_scale_and_wait(tmp_path):
    from pipeline.jobs import run_job

    cluster = {
        "kind": "class",
        "cluster_class": "distributed.LocalCluster",
        "cluster_kwargs": {"n_workers": 0, "threads_per_worker": 1, "dashboard_address": ":0"},
        "scale": {"n": 2},
        "wait_for_workers": {"n": 2, "timeout": 120},
        "dask_config": {"distributed.scheduler.allowed-failures": 5},
    }
    report = run_job(_job(tmp_path, cluster))
    assert report["methods"]["tsqr"]["dask"]["workers"] == 2
    _r_matches(tmp_path)


@pytest.mark.e2e  # the job starts its own cluster of worker processes
def test_jobqueue_cluster_with_adapt_streams_the_input(tmp_path):
    """dask-jobqueue's LocalCluster: a real JobQueueCluster whose jobs are local processes."""
    from pipeline.jobs import run_job

    cluster = {
        "kind": "class",
        "cluster_class": "dask_jobqueue.local.LocalCluster",
        "cluster_kwargs": {"cores": 1, "memory": "1GiB", "processes": 1},
        "adapt_kwargs": {"minimum": 1, "maximum": 2},
        "wait_for_workers": {"n": 1, "timeout": 120},
    }
    report = run_job(_job(tmp_path, cluster, methods=[RSVD]))
    r = report["methods"]["rsvd"]
    assert r["reads_from_storage"] == r["passes"]  # adaptive: never kept in memory
    np.testing.assert_allclose(
        r["singular_values"], np.linalg.svd(A, compute_uv=False)[:3], rtol=1e-6
    )


@pytest.fixture
def scheduler_file(tmp_path):
    """``dask scheduler --scheduler-file`` on 127.0.0.1, stopped after the test."""
    path = tmp_path / "scheduler.json"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    proc = subprocess.Popen(
        [*dask, "--scheduler-file", str(path), "--host", "127.0.0.1", "--dashboard-address", ":0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120  # a loaded 2-core machine starts it slowly
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    yield path
    proc.terminate()
    proc.wait(timeout=30)


def test_scheduler_file_with_a_worker(tmp_path, scheduler_file):
    from pipeline.jobs import run_job

    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
         str(scheduler_file), "--nthreads", "1", "--memory-limit", "1GiB", "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        cluster = {
            "kind": "scheduler-file",
            "scheduler_file": str(scheduler_file),
            "wait_for_workers": {"n": 1, "timeout": 120},
        }
        report = run_job(_job(tmp_path, cluster))
        assert report["methods"]["tsqr"]["dask"]["workers"] == 1
        _r_matches(tmp_path)
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def test_no_worker_times_out_with_one_line_and_nothing_published(
    tmp_path, scheduler_file, prefect_server
):
    from pipeline.jobs import run_job

    cluster = {
        "kind": "scheduler-file",
        "scheduler_file": str(scheduler_file),
        "wait_for_workers": {"n": 1, "timeout": 3},
    }
    with pytest.raises(WorkersTimeoutError, match=r"0 of 1 workers after 3 s"):
        run_job(_job(tmp_path, cluster))
    proc = subprocess.run(
        [*factorize_cmd(), "run", str(write_job(tmp_path, _job(tmp_path, cluster)))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert "cluster.wait_for_workers: 0 of 1 workers after 3 s" in one_line_exit(proc, 1)
    assert not (tmp_path / "out" / "job").exists()


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        (
            {"kind": "class", "cluster_class": "dask_nowhere.Cluster"},
            "cluster.cluster_class: cannot import 'dask_nowhere.Cluster' (ModuleNotFoundError",
        ),
        (
            {"kind": "class", "cluster_class": "dask_jobqueue.SLURMCluster",
             "cluster_kwargs": {"cores": 4, "walltime": "1:00:00", "queue_name": "x"}},
            "'queue_name' is not an argument of dask_jobqueue.SLURMCluster; it takes: ",
        ),
        (
            {"kind": "address", "address": "tcp://127.0.0.1:1",
             "cluster_class": "distributed.LocalCluster"},
            "address and cluster_class exclude each other",
        ),
        (
            {"kind": "class", "cluster_class": "distributed.LocalCluster",
             "scale": {"n": 2}, "adapt_kwargs": {"maximum": 2}},
            "scale and adapt_kwargs exclude each other",
        ),
        (
            {"kind": "class", "cluster_class": "distributed.LocalCluster",
             "client_kwargs": {"asynchronous": True}},
            "client_kwargs may not set 'asynchronous'",
        ),
        (
            {"kind": "local", "wait_for_workers": {"n": 2}},
            "wait_for_workers is for kinds class, address and scheduler-file",
        ),
        (
            {"kind": "scheduler-file", "scheduler_file": "/nonexistent/scheduler.json"},
            "cluster.scheduler_file: /nonexistent/scheduler.json does not exist",
        ),
    ],
)  # fmt: skip
def test_validate_refuses_bad_clusters(tmp_path, cluster, message):
    from pipeline.jobs import precheck

    job = _job(tmp_path, cluster)
    with pytest.raises(UserError) as info:  # exit 2
        precheck(parse_config(job))
    assert message in str(info.value), str(info.value)


def test_credentials_in_cluster_and_client_kwargs_are_redacted(tmp_path):
    cluster = {
        "kind": "class",
        "cluster_class": "dask_jobqueue.PBSCluster",
        "cluster_kwargs": {"cores": 4, "memory": "8GB", "job_extra_directives": []},
        "client_kwargs": {"security": {"tls_key": "/secret/key.pem", "password": "hunter2"}},
    }
    dumped = redacted_dump(parse_config(_job(tmp_path, cluster)))["cluster"]
    assert dumped["client_kwargs"]["security"] == {"tls_key": "***", "password": "***"}
    assert dumped["cluster_kwargs"]["cores"] == 4


def test_slurm_config_validates_and_renders_its_job_script_without_slurm(tmp_path):
    from pipeline.jobs import precheck

    kwargs = {
        "cores": 8,
        "memory": "32GB",
        "queue": "normal",
        "account": "lab",
        "walltime": "02:00:00",
        "job_extra_directives": ["--exclusive"],
    }
    cluster = {
        "kind": "class",
        "cluster_class": "dask_jobqueue.SLURMCluster",
        "cluster_kwargs": kwargs,
        "scale": {"jobs": 4},
        "wait_for_workers": {"n": 4, "timeout": 3600},
    }
    assert precheck(parse_config(_job(tmp_path, cluster))) is not None  # nothing started
    from dask_jobqueue import SLURMCluster

    options = {"dashboard_address": ":0", "host": "127.0.0.1"}
    with SLURMCluster(**kwargs, scheduler_options=options) as slurm:
        script = slurm.job_script()
    for line in ("#SBATCH -p normal", "#SBATCH -A lab", "#SBATCH -t 02:00:00", "--exclusive"):
        assert line in script, script
