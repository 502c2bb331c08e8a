"""The suite's tiers hold (tests/conftest.py): a fast-tier test that starts a process fails
at once, and the end-to-end tier's process clusters are real worker processes."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_the_fast_tier_refuses_a_subprocess():
    with pytest.raises(AssertionError, match="starts a process but is not marked e2e"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)


def test_the_fast_tier_refuses_a_process_cluster_at_once():
    from distributed import LocalCluster

    with pytest.raises(AssertionError, match="starts a process but is not marked e2e"):
        LocalCluster(n_workers=1, processes=True, dashboard_address=":0")


@pytest.mark.e2e
def test_process_clusters_of_the_suite_run_forked_worker_processes():
    """Forked from the session's forkserver (conftest), not spawned by this process (whose
    nannies start them): other processes, with one parent that is not this process, and BLAS
    limited to one thread."""
    import os

    from tests.conftest import two_workers

    def facts() -> tuple[int, int, str | None]:
        return os.getpid(), os.getppid(), os.environ.get("OPENBLAS_NUM_THREADS")

    with two_workers("1GiB") as client:
        got = list(client.run(facts).values())
    pids, parents = {f[0] for f in got}, {f[1] for f in got}
    assert len(pids) == 2 and os.getpid() not in pids
    assert len(parents) == 1 and os.getpid() not in parents  # the forkserver
    assert {f[2] for f in got} == {"1"}
