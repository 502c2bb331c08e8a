"""Cluster setup from the job's cluster section."""

from __future__ import annotations

import socket
import time

import pytest

from pipeline.config import ClusterSpec
from pipeline.errors import ClusterError


def test_local_defaults_follow_the_machine():
    from pipeline.cluster import local_defaults

    kw = local_defaults(ClusterSpec(threads_per_worker=2, memory_limit="1GiB"))
    assert kw["threads_per_worker"] == 2 and kw["memory_limit"] == "1GiB"
    assert kw["env"]["OPENBLAS_NUM_THREADS"] == "2" and kw["env"]["OMP_NUM_THREADS"] == "2"
    assert kw["dashboard_address"] == ":0"
    assert local_defaults(ClusterSpec(n_workers=3))["n_workers"] == 3


def test_local_cuda_without_dask_cuda_is_a_clear_error():
    from pipeline.cluster import check_cluster_available, cluster_from_spec

    with pytest.raises(ClusterError, match=r"pip install 'zarr-factorize\[gpu-cu12\]' \(CUDA 12\)"):
        check_cluster_available(ClusterSpec(kind="local-cuda"))
    with pytest.raises(ClusterError, match="dask-cuda"):
        with cluster_from_spec(ClusterSpec(kind="local-cuda")):
            pass


def test_unreachable_scheduler_is_a_clear_error():
    from pipeline.cluster import cluster_from_spec

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = ClusterSpec(kind="address", address=f"tcp://127.0.0.1:{port}", connect_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=f"cannot connect to tcp://127.0.0.1:{port}"):
        with cluster_from_spec(spec):
            pass
    assert time.monotonic() - t0 < 30


def test_address_cluster_and_keep_in_memory(dist_client):
    import dask.array as da

    from pipeline.cluster import cluster_from_spec, keep_in_memory
    from pipeline.memory import scheduler_workers

    spec = ClusterSpec(kind="address", address=dist_client.scheduler.address)
    with cluster_from_spec(spec) as c:
        assert len(scheduler_workers(c)) == 2
        small = da.ones((100, 10), chunks=(50, 10))
        kept, persisted = keep_in_memory(small, c)
        assert persisted and kept is not small
        assert float(kept.sum().compute()) == 1000.0
        huge = da.ones((10**7, 10**4), chunks=(10**4, 10**4))  # 800 GB, never computed
        same, persisted = keep_in_memory(huge, c)
        assert not persisted and same is huge


def test_scheduler_workers_does_not_read_the_clients_refreshed_cache(dist_client):
    """The client's periodic refresh (every 2 s) caches an identity without workers; a
    report that read it counted 0 workers on a 1-worker cluster (CI, scheduler-file job)."""
    from pipeline.memory import scheduler_workers, workers_of

    dist_client.sync(dist_client._update_scheduler_info)  # what the periodic callback does
    assert dist_client._scheduler_identity["workers"] == {}  # the cache a race could return
    assert len(scheduler_workers(dist_client)) == 2
    assert workers_of(dist_client).count == 2
