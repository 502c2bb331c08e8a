"""Whole jobs through pipeline.run_job on the session LocalCluster (no Prefect)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from pipeline.errors import ArtifactExistsError, InputError, NonFiniteInputError
from tests.conftest import REPO, job_dict, write_array, write_job


def test_tsqr_job_end_to_end(tmp_path, client):
    import xarray as xr

    from pipeline import run_job

    a = np.random.default_rng(0).standard_normal((6000, 24))
    write_array(tmp_path / "in.zarr", a, chunks=(1000, 8), name="A")
    job = job_dict(
        tmp_path, str(tmp_path / "in.zarr"), input={"url": str(tmp_path / "in.zarr"), "array": "A"}
    )
    report = run_job(job, client=client)
    out = tmp_path / "out" / "job"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(report))
    assert metrics["status"] == "completed"
    assert metrics["input"]["shape"] == [6000, 24] and metrics["input"]["chunks"] == [1000, 8]
    assert metrics["input"]["fro_norm"] == pytest.approx(np.linalg.norm(a), rel=1e-12)
    ds = xr.open_zarr(out / "factors.zarr", group="tsqr")
    q, r = ds["Q"].values, ds["R"].values
    t = metrics["methods"]["tsqr"]
    assert t["residual_rel"] == pytest.approx(
        np.linalg.norm(a - q @ r) / np.linalg.norm(a), rel=1e-6, abs=1e-17
    )
    assert t["orthogonality"] == pytest.approx(np.linalg.norm(q.T @ q - np.eye(24)), rel=1e-6)
    assert t["residual_rel"] < 1e-14 and t["orthogonality"] < 1e-13
    assert t["passes"] == 2 and t["reads_from_storage"] == 1  # small input is kept in memory
    assert set(metrics["versions"]) >= {"zarr-factorize", "dask", "numpy"}
    assert metrics["started"] <= metrics["finished"]


@pytest.mark.parametrize(
    ("codec", "compressor"), [(None, None), ("zstd", "ZstdCodec"), ("lz4", "BloscCodec")]
)
def test_factor_arrays_are_written_with_the_output_codec(tmp_path, client, codec, compressor):
    """``output.codec``: factors uncompressed by default (incompressible floats: zstd costs
    5× the write time for ~4 % of the bytes), zstd or lz4 when asked; the same values."""
    import zarr

    from pipeline import run_job

    a = np.random.default_rng(2).standard_normal((3000, 12))
    write_array(tmp_path / "in.zarr", a, chunks=(1000, 12))
    job = job_dict(tmp_path, str(tmp_path / "in.zarr"), methods=[{"method": "tsqr"}])
    if codec is not None:
        job["output"]["codec"] = codec
    run_job(job, client=client)
    group = zarr.open_group(str(tmp_path / "out" / "job" / "factors.zarr" / "tsqr"), mode="r")
    for name in ("Q", "R"):
        codecs = [type(c).__name__ for c in group[name].metadata.codecs]
        assert codecs == ["BytesCodec"] + ([compressor] if compressor else []), (name, codecs)
    q, r = group["Q"][...], group["R"][...]
    np.testing.assert_allclose(q @ r, a, atol=1e-12)


def test_r_only_and_transpose(tmp_path, client):
    import xarray as xr

    from pipeline import run_job

    a = np.random.default_rng(1).standard_normal((40, 900))  # wide
    write_array(tmp_path / "w.zarr", a, chunks=(40, 100))
    job = job_dict(
        tmp_path,
        str(tmp_path / "w.zarr"),
        methods=[{"method": "tsqr", "q": False, "transpose": True}],
    )
    report = run_job(job, client=client)
    t = report["methods"]["tsqr"]
    assert t["passes"] == 1 and t["reads_from_storage"] == 1 and t["transposed"] is True
    assert t["norm_consistency"] < 1e-13 and t["residual_rel"] is None
    r = xr.open_zarr(tmp_path / "out" / "job" / "factors.zarr", group="tsqr")["R"].values
    r_ref = np.linalg.qr(a.T, mode="r")
    np.testing.assert_allclose(np.abs(r), np.abs(r_ref), atol=1e-10)
    assert not (tmp_path / "out" / "job" / "factors.zarr" / "tsqr" / "Q").exists()


def test_wide_without_transpose_is_refused_before_writing(tmp_path, client):
    from pipeline import run_job

    write_array(tmp_path / "w.zarr", np.ones((5, 50)))
    with pytest.raises(InputError, match="transpose: true"):
        run_job(job_dict(tmp_path, str(tmp_path / "w.zarr")), client=client)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_nan_found_in_first_pass_leaves_nothing(tmp_path, client):
    from pipeline import run_job

    a = np.ones((4000, 6))
    a[3999, 0] = np.nan
    write_array(tmp_path / "n.zarr", a, chunks=(500, 6))
    with pytest.raises(NonFiniteInputError, match="row 3999"):
        run_job(job_dict(tmp_path, str(tmp_path / "n.zarr")), client=client)
    assert list((tmp_path / "out").iterdir()) == []


def test_failure_mid_run_keeps_previous_result(tmp_path, client, monkeypatch):
    from pipeline import run_job
    from pipeline.methods import METHODS

    write_array(tmp_path / "in.zarr", np.random.default_rng(2).standard_normal((500, 5)))
    job = job_dict(
        tmp_path,
        str(tmp_path / "in.zarr"),
        output={"url": str(tmp_path / "out"), "overwrite": True},
    )
    run_job(job, client=client)
    before = (tmp_path / "out" / "job" / "metrics.json").read_text()

    def boom(*args, **kwargs):
        raise RuntimeError("worker lost")

    monkeypatch.setitem(METHODS, "tsqr", replace(METHODS["tsqr"], run=boom))
    with pytest.raises(RuntimeError, match="worker lost"):
        run_job(job, client=client)
    assert (tmp_path / "out" / "job" / "metrics.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["job"]


def test_existing_output_is_refused_untouched(tmp_path, client):
    from pipeline import run_job

    write_array(tmp_path / "in.zarr", np.ones((50, 3)))
    (tmp_path / "out" / "job").mkdir(parents=True)
    (tmp_path / "out" / "job" / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactExistsError, match="overwrite"):
        run_job(job_dict(tmp_path, str(tmp_path / "in.zarr")), client=client)
    assert [p.name for p in (tmp_path / "out" / "job").iterdir()] == ["keep.txt"]


KILL_SCRIPT = """
import sys
from pipeline import run_job
if __name__ == "__main__":
    run_job(sys.argv[1])
"""


@pytest.mark.e2e
def test_killed_run_leaves_no_complete_looking_result(tmp_path):
    job = job_dict(
        tmp_path,
        str(tmp_path / "big.zarr"),
        input={
            "url": str(tmp_path / "big.zarr"),
            "create_if_missing": {"shape": [600000, 64], "chunks": [50000, 64]},
        },
        cluster={"n_workers": 1, "threads_per_worker": 1},
    )
    path = write_job(tmp_path, job)
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)], cwd=REPO, start_new_session=True
    )
    out = tmp_path / "out"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out.exists() and list(out.glob(".job.partial-*"))):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes
    proc.wait()
    assert not (out / "job").exists()
    assert all(p.name.startswith(".job.partial-") for p in out.iterdir())


def test_skip_if_complete_follows_config_and_input(tmp_path, client):
    from pipeline import run_job

    a = np.random.default_rng(5).standard_normal((2000, 6))
    write_array(tmp_path / "in.zarr", a, chunks=(500, 6))
    job = job_dict(tmp_path, str(tmp_path / "in.zarr"), skip_if_complete=True)
    first = run_job(job, client=client)
    assert "skipped" not in first and first["input"]["fingerprint"]
    again = run_job(job, client=client)
    assert again["skipped"] and again["finished"] == first["finished"]
    # rewriting one chunk's data (same shape, chunks and dtype) is noticed
    time.sleep(0.05)
    b = a.copy()
    b[:500] *= 2.0
    write_array(tmp_path / "in.zarr", b, chunks=(500, 6))
    with pytest.raises(ArtifactExistsError, match="overwrite"):
        run_job(job, client=client)  # changed, and overwrite is false: refused, untouched
    job["output"]["overwrite"] = True
    redone = run_job(job, client=client)
    assert "skipped" not in redone
    assert redone["input"]["fro_norm"] == pytest.approx(np.linalg.norm(b), rel=1e-12)
    # a changed method option is a different job
    job["methods"] = [{"method": "tsqr", "q": False}]
    assert "skipped" not in run_job(job, client=client)
    assert run_job(job, client=client)["skipped"]


@pytest.mark.e2e
def test_job_on_an_external_dask_scheduler_and_worker(tmp_path):
    """`dask scheduler` + `dask worker` started here; the job connects by address."""
    import socket

    from pipeline import run_job

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = os.path.dirname(sys.executable)
    address = f"tcp://127.0.0.1:{port}"
    scheduler_cmd = ["scheduler", "--host", "127.0.0.1", "--port", str(port)]
    scheduler = subprocess.Popen(
        [f"{bin_dir}/dask", *scheduler_cmd, "--dashboard-address", ":0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    worker_cmd = ["worker", address, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1"]
    worker = subprocess.Popen(
        [f"{bin_dir}/dask", *worker_cmd, "--dashboard-address", ":0", "--memory-limit", "2GiB"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        a = np.random.default_rng(6).standard_normal((3000, 7))
        write_array(tmp_path / "in.zarr", a, chunks=(800, 7))
        job = job_dict(
            tmp_path,
            str(tmp_path / "in.zarr"),
            cluster={"kind": "address", "address": address, "connect_timeout": 60},
            methods=[{"method": "rsvd", "rank": 3}],
        )
        report = run_job(job)  # no client given: the job's cluster section is used
        r = report["methods"]["rsvd"]
        assert r["dask"] == {"scheduler": address, "workers": 1, "threads": 1}
        np.testing.assert_allclose(
            r["singular_values"], np.linalg.svd(a, compute_uv=False)[:3], rtol=1e-6
        )
    finally:
        for proc in (worker, scheduler):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
