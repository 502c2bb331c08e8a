"""Dask clusters from the ``cluster:`` section of a job."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask.array as da
from distributed import Client

from pipeline.config import ClusterSpec
from pipeline.errors import ClusterError

log = logging.getLogger(__name__)

# Fraction of the workers' total memory_limit an input may take to be kept in memory
# between passes; the rest is head-room for blocks in flight and factor outputs.
PERSIST_FRACTION = 0.4

_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def available_cores() -> int:
    """CPU cores this process may use (honours affinity masks and cgroups via sched)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def local_defaults(spec: ClusterSpec) -> dict[str, Any]:
    """LocalCluster arguments chosen from the machine.

    Linear algebra runs in BLAS, which releases the GIL but should not oversubscribe:
    by default one worker process per core with one thread, and BLAS in each worker
    limited to the worker's thread count.
    """
    cores = available_cores()
    threads = spec.threads_per_worker or 1
    workers = spec.n_workers or max(1, cores // threads)
    blas = {name: str(threads) for name in _BLAS_ENV}
    return {
        "n_workers": workers,
        "threads_per_worker": threads,
        "memory_limit": spec.memory_limit,
        "processes": True,
        "dashboard_address": ":0",
        "env": blas,
    }


def check_cluster_available(spec: ClusterSpec) -> None:
    """Fail fast, before anything starts, when the cluster kind cannot work here.

    Raises
    ------
    ClusterError
    """
    if spec.kind == "local-cuda":
        import importlib.util

        if importlib.util.find_spec("dask_cuda") is None:
            raise ClusterError(
                "cluster.kind: local-cuda needs dask-cuda and cupy; install them with "
                "pip install 'zarr-factorize[gpu]'"
            )


@contextmanager
def cluster_from_spec(spec: ClusterSpec) -> Iterator[Client]:
    """Yield a ``distributed.Client`` for the job's cluster, closing what it started.

    Raises
    ------
    ClusterError
        When the scheduler cannot be reached, or ``local-cuda`` lacks dask-cuda.
    """
    if spec.kind == "address":
        shared = _client_for(spec.address)
        if shared is not None:  # a batch in this process already holds one: share it
            log.info("using this process's client of scheduler %s", spec.address)
            yield shared
            return
        try:
            client = Client(spec.address, timeout=spec.connect_timeout, set_as_default=True)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cluster.address: cannot connect to {spec.address} within "
                f"{spec.connect_timeout:g} s ({type(exc).__name__}); is the scheduler running?"
            ) from None
        log.info("connected to scheduler %s; dashboard: %s", spec.address, client.dashboard_link)
        try:
            with client.as_current():  # wins over an enclosing client's context
                yield client
        finally:
            client.close()
        return

    if spec.kind == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise ClusterError(
                "cluster.kind: local-cuda needs dask-cuda and cupy; install them with "
                "pip install 'zarr-factorize[gpu]'"
            ) from None
        kwargs = {"dashboard_address": ":0", "memory_limit": spec.memory_limit}
        if spec.n_workers:
            kwargs["n_workers"] = spec.n_workers
        if spec.threads_per_worker:
            kwargs["threads_per_worker"] = spec.threads_per_worker
        cluster = LocalCUDACluster(**kwargs)
    else:
        from distributed import LocalCluster

        try:
            cluster = LocalCluster(**local_defaults(spec))
        except ValueError as exc:  # e.g. an unparsable memory_limit
            raise ClusterError(f"cluster: cannot start a LocalCluster: {exc}") from None
    try:
        with Client(cluster, set_as_default=True) as client:
            info = client.scheduler_info()["workers"].values()
            total = sum(w.get("memory_limit", 0) for w in info)
            log.info(
                "started %s with %d workers × %d threads, %.1f GiB memory; dashboard: %s",
                type(cluster).__name__,
                len(info),
                max((w.get("nthreads", 0) for w in info), default=0),
                total / 2**30,
                client.dashboard_link,
            )
            yield client
    finally:
        cluster.close()


def _client_for(address: str | None) -> Client | None:
    """This process's open default client when it talks to ``address``, else ``None``.

    Jobs of a batch run in threads of one process against one cluster; they must share
    one client — a second client's ``close()`` would release futures the other job holds.
    """
    from distributed import default_client

    try:
        client = default_client()
    except ValueError:
        return None
    if client.status != "running" or address is None:
        return None
    return client if client.scheduler.address == address else None


def cluster_memory(client: Client | None) -> int:
    """Sum of the workers' ``memory_limit`` in bytes (0 when unknown or unlimited)."""
    if client is None:
        return 0
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return int(sum(w.get("memory_limit") or 0 for w in workers))


def keep_in_memory(x: da.Array, client: Client | None) -> tuple[da.Array, bool]:
    """Persist ``x`` on the cluster when it fits comfortably, so later passes skip I/O.

    Returns ``(array, persisted)``; the array is unchanged when it does not fit.
    """
    budget = cluster_memory(client) * PERSIST_FRACTION
    if budget and x.nbytes <= budget:
        log.info(
            "input (%.2f GiB) fits in %.0f%% of cluster memory: reading it once and keeping it",
            x.nbytes / 2**30,
            PERSIST_FRACTION * 100,
        )
        return x.persist(), True
    log.info("input (%.2f GiB) is streamed from storage on every pass", x.nbytes / 2**30)
    return x, False
