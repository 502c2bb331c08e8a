"""The Prefect flow as a real flow run (not .fn) against a test API, with its artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import job_dict, write_array, write_job


def _artifacts(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_flow_run_writes_result_and_table_artifact(tmp_path, dist_client, prefect_harness):
    from flows import factorize

    a = np.random.default_rng(0).standard_normal((3000, 10))
    write_array(tmp_path / "in.zarr", a, chunks=(700, 10))
    job = job_dict(
        tmp_path,
        str(tmp_path / "in.zarr"),
        name="flow_job",
        cluster={"kind": "address", "address": dist_client.scheduler.address},
    )
    state = factorize(config=job, return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert report["methods"]["tsqr"]["residual_rel"] < 1e-14
    assert json.loads((tmp_path / "out" / "flow_job" / "metrics.json").read_text())["name"] == (
        "flow_job"
    )
    (art,) = _artifacts("metrics-flow-job")
    assert art.type == "table" and "tsqr" in json.dumps(art.data)
    assert str(state.state_details.flow_run_id) == str(art.flow_run_id)


def test_flow_accepts_a_path_and_fails_readably(tmp_path, dist_client, prefect_harness):
    from flows import factorize

    write_array(tmp_path / "w.zarr", np.ones((3, 30)))
    job = job_dict(
        tmp_path,
        str(tmp_path / "w.zarr"),
        cluster={"kind": "address", "address": dist_client.scheduler.address},
    )
    state = factorize(config=str(write_job(tmp_path, job)), return_state=True)
    assert state.is_failed()
    assert "transpose: true" in state.message or "transpose: true" in str(
        state.result(raise_on_failure=False)
    )
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_bad_config_parameter_fails_the_run(prefect_harness):
    from flows import factorize

    state = factorize(config={"name": "x", "methods": []}, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="input: required key is missing"):
        state.result()


def test_flow_runs_rsvd_and_nmf_with_metrics_table(tmp_path, dist_client, prefect_harness):
    from flows import factorize

    rng = np.random.default_rng(1)
    a = rng.random((2000, 6)) @ rng.random((6, 40))
    write_array(tmp_path / "in.zarr", a, chunks=(500, 40))
    job = job_dict(
        tmp_path,
        str(tmp_path / "in.zarr"),
        name="two-methods",
        cluster={"kind": "address", "address": dist_client.scheduler.address},
        methods=[{"method": "rsvd", "rank": 6}, {"method": "nmf", "rank": 6, "max_iter": 50}],
    )
    state = factorize(config=job, return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert report["methods"]["rsvd"]["residual_rel"] < 1e-6  # exact rank 6
    assert report["methods"]["nmf"]["iterations"] <= 50
    (art,) = _artifacts("metrics-two-methods")
    text = json.dumps(art.data)
    assert "orthogonality_u" in text and "iterations" in text


def _batch_jobs(tmp_path, names, bad=()):
    jobs = []
    methods = [{"method": "tsqr"}, {"method": "nmf", "rank": 3, "max_iter": 20}]
    for i, name in enumerate(names):
        shape = (30, 300) if name in bad else (4000, 12)  # wide: tsqr refuses it
        write_array(tmp_path / f"{name}.zarr", np.random.default_rng(i).random(shape))
        jobs.append(job_dict(tmp_path, str(tmp_path / f"{name}.zarr"), name=name, methods=methods))
    return jobs


def _runs_named(names):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as c:
        return c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))


def test_batch_runs_jobs_as_concurrent_flow_runs_on_one_cluster(
    tmp_path, dist_client, prefect_harness, monkeypatch
):
    import sys
    import threading

    from flows import factorize_batch

    module = sys.modules["flows.factorize"]  # (the package's `factorize` is the flow)

    names = ["batch_a", "batch_b", "batch_c"]
    # Each job's first method waits until all three jobs got there: run one after another,
    # the barrier would time out and the jobs fail.
    barrier = threading.Barrier(len(names), timeout=120)
    compute = module.compute

    def meet_then_run(run, index):
        if index == 0:
            barrier.wait()
        return compute(run, index)

    monkeypatch.setattr(module, "compute", meet_then_run)
    shared = {"kind": "address", "address": dist_client.scheduler.address}
    state = factorize_batch(configs=_batch_jobs(tmp_path, names), cluster=shared, return_state=True)
    assert state.is_completed(), state.message
    reports = state.result()
    assert sorted(reports) == names
    assert {r["methods"]["tsqr"]["dask"]["scheduler"] for r in reports.values()} == {
        dist_client.scheduler.address
    }
    runs = _runs_named(names)  # separate flow runs, all completed
    assert sorted(r.name for r in runs) == names and all(r.state.is_completed() for r in runs)


def test_batch_reports_failed_jobs_and_finishes_the_others(tmp_path, dist_client, prefect_harness):
    from flows import factorize_batch

    shared = {"kind": "address", "address": dist_client.scheduler.address}
    jobs = _batch_jobs(tmp_path, ["fine", "wide"], bad=("wide",))
    state = factorize_batch(configs=jobs, cluster=shared, return_state=True)
    assert state.is_failed()
    assert "1 of 2 jobs failed: wide" in state.message and "transpose" in state.message
    assert (tmp_path / "out" / "fine" / "metrics.json").exists()


def test_progress_artifacts_reach_100(tmp_path, dist_client, prefect_harness):
    from flows import factorize

    a = np.abs(np.random.default_rng(1).standard_normal((800, 10)))
    write_array(tmp_path / "in.zarr", a, chunks=(200, 10))
    job = job_dict(
        tmp_path,
        str(tmp_path / "in.zarr"),
        name="progress_flow",
        methods=[{"method": "rsvd", "rank": 2}, {"method": "nmf", "rank": 2, "max_iter": 3}],
        cluster={"kind": "address", "address": dist_client.scheduler.address},
    )
    state = factorize(config=job, return_state=True)
    assert state.is_completed(), state.message
    for method in ("rsvd", "nmf"):
        (art,) = _artifacts(f"progress-progress-flow-{method}")
        assert art.type == "progress" and art.data == 100.0, art
        assert str(state.state_details.flow_run_id) == str(art.flow_run_id)
