"""Worker faults on a real LocalCluster of worker processes.

A worker SIGKILLed while a pass runs costs a few seconds and changes no bit of the result
(tsqr, rsvd, nmf); workers too small for one block are refused before any compute with a
one-line error naming the memory needed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ClusterError
from tests.conftest import job_dict, kill_worker_running, two_workers, write_array

# Each job, with the prefix of the per-block task of the pass the kill hits.
JOBS = {
    "tsqr": ({"method": "tsqr"}, "block_q"),  # the second pass, writing Q
    "rsvd": ({"method": "rsvd", "rank": 4, "power_iters": 2}, "_power_block"),
    "nmf": ({"method": "nmf", "rank": 4, "max_iter": 4, "tol": 0, "init": "random"}, "block_step"),
}


@pytest.fixture
def cluster_client():
    """A fresh 2-worker cluster (processes, 1 thread) per test: killing workers must not
    touch the session's, and no test waits on the restart of a worker another killed
    (under load a killed worker's nanny was seen not to bring it back within 120 s)."""
    with two_workers("2GiB") as c:
        yield c


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Path:
    """A non-negative 180,000 × 40 float64 matrix (58 MB) in 12 row chunks: a pass takes
    about half a second."""
    path = tmp_path_factory.mktemp("faults") / "in.zarr"
    x = np.random.default_rng(5).random((180_000, 40))
    write_array(path, x, chunks=(15_000, 40))
    return path


def _factors(out: Path, method: str) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(str(out / "factors.zarr"), mode="r")[method]
    return {name: arr[...] for name, arr in group.arrays()}


def _run(job: dict, client) -> tuple[dict, float]:
    from pipeline import run_job

    t0 = time.perf_counter()
    report = run_job(job, client=client)
    return report, time.perf_counter() - t0


@pytest.mark.parametrize("method", sorted(JOBS))
def test_worker_killed_mid_pass_changes_no_bit(method, matrix, tmp_path, cluster_client):
    spec, prefix = JOBS[method]
    calm = job_dict(tmp_path / "calm", str(matrix), name=method, methods=[spec])
    _, calm_seconds = _run(calm, cluster_client)

    hit = job_dict(tmp_path / "hit", str(matrix), name=method, methods=[spec])
    outcome: dict = {}
    stop = threading.Event()

    def target() -> None:
        try:
            outcome["report"], outcome["seconds"] = _run(hit, cluster_client)
        except BaseException as exc:  # reported by the test
            outcome["error"] = exc
        finally:
            stop.set()

    runner = threading.Thread(target=target)
    runner.start()
    killed = kill_worker_running(cluster_client, prefix, stop)
    runner.join(timeout=120)
    assert not runner.is_alive(), "the run did not end within 120 s of the kill"
    assert "error" not in outcome, outcome.get("error")
    assert killed is not None, f"no {prefix} task was seen running"
    print(
        f"{method}: undisturbed {calm_seconds:.1f} s, "
        f"with a worker killed {outcome['seconds']:.1f} s"
    )
    want = _factors(tmp_path / "calm" / "out" / method, method)
    got = _factors(tmp_path / "hit" / "out" / method, method)
    assert want.keys() == got.keys() and want
    for name in want:
        assert np.array_equal(want[name], got[name]), f"{method}/{name} differs"


@pytest.fixture(scope="module")
def small_client():
    """2 workers of 200 MiB: too small for blocks of 120,000 × 40 float64 (37 MiB) the way
    TSQR's kernels hold them, next to ~160 MiB of libraries."""
    with two_workers("200MiB") as c:
        yield c


def _one_block_job(tmp_path: Path, matrix: Path) -> dict:
    spec = {"method": "tsqr", "block_rows": 120_000}
    return job_dict(tmp_path, str(matrix), name="small", methods=[spec])


def test_workers_too_small_for_a_block_are_refused_before_compute(tmp_path, matrix, small_client):
    from pipeline import run_job

    t0 = time.perf_counter()
    with pytest.raises(ClusterError) as info:
        run_job(_one_block_job(tmp_path, matrix), client=small_client)
    assert time.perf_counter() - t0 < 20
    groups = small_client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.task_groups))
    assert groups == 0, "nothing may be computed before the refusal"
    message = str(info.value)
    assert "\n" not in message
    assert "200 MiB" in message and "cluster.memory_limit to 2" in message, message
    assert "block_rows of tsqr (at most" in message, message
    assert not (tmp_path / "out" / "small").exists()


def test_workers_dying_for_memory_end_the_run_with_one_line(
    tmp_path, matrix, small_client, monkeypatch
):
    """Past the check (a kernel needing more than estimated), workers restarted for
    memory — or paused at their limit, whichever the machine's timing makes them do first
    — end the run with a ClusterError naming the limit, instead of restarts without end."""
    import pipeline.cluster
    from pipeline import run_job

    monkeypatch.setattr(pipeline.plan, "check_block_memory", lambda *args: None)
    monkeypatch.setattr(pipeline.cluster, "PAUSED_TIMEOUT", 10.0)
    t0 = time.perf_counter()
    with pytest.raises(ClusterError) as info:
        run_job(_one_block_job(tmp_path, matrix), client=small_client)
    print(f"memory failure reported after {time.perf_counter() - t0:.1f} s: {info.value}")
    message = str(info.value)
    assert "\n" not in message and "200 MiB per worker" in message, message
    assert "restarted" in message or "stayed paused for 10 s" in message, message
    assert not (tmp_path / "out" / "small").exists()


def _set_pause_fraction(client, fraction: float) -> None:
    """Move the workers' pause threshold: below their memory use, their own memory
    monitor pauses them (as when a block does not fit); back at 0.8 it resumes them."""

    def move(dask_worker, fraction=fraction):
        dask_worker.memory_manager.memory_pause_fraction = fraction

    client.run(move)


def test_all_workers_paused_end_the_run_instead_of_waiting_forever(
    tmp_path, matrix, cluster_client, monkeypatch
):
    """A paused worker (memory above the pause threshold) starts no task and is never
    restarted: with every worker paused for PAUSED_TIMEOUT the run fails with one line."""
    import pipeline.cluster
    from pipeline import run_job

    monkeypatch.setattr(pipeline.cluster, "PAUSED_TIMEOUT", 3.0)
    job = job_dict(tmp_path, str(matrix), name="paused", methods=[{"method": "tsqr", "q": False}])
    _set_pause_fraction(cluster_client, 0.01)
    try:
        t0 = time.perf_counter()
        with pytest.raises(ClusterError, match=r"all workers stayed paused for 3 s") as info:
            run_job(job, client=cluster_client)
        assert time.perf_counter() - t0 < 30
    finally:
        _set_pause_fraction(cluster_client, 0.8)
    assert "\n" not in str(info.value) and "2048 MiB per worker" in str(info.value)
    assert not (tmp_path / "out" / "paused").exists()
    run_job(job, client=cluster_client)  # the cancelled run left nothing behind
