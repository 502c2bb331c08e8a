"""Object stores as outputs, on a real S3 server (moto on 127.0.0.1) and on ``memory://``.

Publish is correct, idempotent under retries and atomic for readers; a claim is a lease
that a killed publisher's successor takes over; local publish is safe under concurrency; a
stopped or stalled endpoint fails within bounded time with one line and no traceback; an
output overlapping its input is refused. See the module docstring of
:mod:`pipeline.io.artifacts` for the protocol.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime

import numpy as np
import pytest

from pipeline.config import config_from_any
from pipeline.errors import ArtifactExistsError, ConfigError
from pipeline.io.stores import locate, location_of
from tests.conftest import (
    REPO,
    factorize_cmd,
    job_dict,
    one_line_exit,
    write_array,
    write_job,
)

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) ")
HIDDEN = (".partial-", ".old-", ".lock", ".tmp-", ".checkpoint")


def _bucket(s3) -> str:
    return s3.make_bucket(f"zf-{uuid.uuid4().hex[:10]}")


def _write_s3_input(s3, url: str, a: np.ndarray, chunks: tuple[int, int]) -> None:
    import zarr

    from pipeline.io.stores import zarr_store

    store = zarr_store(url, s3.storage_options(), read_only=False)
    arr = zarr.create_array(store=store, shape=a.shape, dtype=a.dtype, chunks=chunks)
    arr[...] = a


def _s3_round_trip_job(s3, tmp_path, seed: int, rows: int, cols: int, chunk_rows: int):
    """A fresh bucket holding a Gaussian input, and a job reading it and writing there."""
    bucket = _bucket(s3)
    a = np.random.default_rng(seed).standard_normal((rows, cols))
    _write_s3_input(s3, f"{bucket}/in.zarr", a, (chunk_rows, cols))
    opts = s3.storage_options()
    job = job_dict(
        tmp_path,
        f"{bucket}/in.zarr",
        input={"url": f"{bucket}/in.zarr", "storage_options": opts},
        output={"url": f"{bucket}/out", "storage_options": opts},
    )
    return bucket, job


def _keys(fs, root: str) -> set[str]:
    fs.invalidate_cache()
    prefix = root.rstrip("/") + "/"
    return {p[len(prefix) :] for p in fs.find(root)}


def _output(url: str, opts: dict | None, name: str, *, overwrite: bool, method: str, value: float):
    """A staged run writing ``<method>/X`` = ``value`` (its publish is up to the caller)."""
    import dask.array as da

    from pipeline.io.artifacts import RunOutput

    out = RunOutput(locate(url, opts or {}), name, overwrite=overwrite)
    out.begin()
    out.factor_array(method, "R", np.full((3, 3), value), ("component", "col"))
    out.factor_array(method, "X", da.full((40, 3), value, chunks=(10, 3)), ("row", "c")).compute()
    return out


@pytest.fixture(params=["memory", "s3"])
def store(request, s3):
    """(url, storage_options, fsspec filesystem) of an empty output location."""
    from pipeline.io.stores import split_url

    if request.param == "memory":
        url = f"memory://zf-{uuid.uuid4().hex[:8]}"
        fs, _ = split_url(url)
        yield url, None, fs
        fs.rm(url, recursive=True)
    else:
        url = _bucket(s3) + "/results"
        yield url, s3.storage_options(), s3.filesystem()


def test_publish_overwrite_retry_and_race_on_object_stores(store):
    from pipeline.io.artifacts import read_published
    from pipeline.io.stores import split_url

    url, opts, fs = store
    root = split_url(url, opts)[1]
    first = _output(url, opts, "r", overwrite=False, method="tsqr", value=1.0)
    first.publish({"status": "completed"})
    assert first.publish({"status": "completed"}) == first.final_url  # a retry: success
    assert read_published(first.out, "r")["run_id"] == first.run_id
    assert _keys(fs, root) == {f"r/{k}" for k in _keys(fs, f"{root}/r")}, "nothing hidden"

    # overwrite with another layout: keys only the old result had are gone
    second = _output(url, opts, "r", overwrite=True, method="nmf", value=2.0)
    second.publish({"status": "completed"})
    keys = _keys(fs, f"{root}/r")
    assert not any(k.startswith("factors.zarr/tsqr") for k in keys)
    assert "factors.zarr/nmf/X/zarr.json" in keys and "metrics.json" in keys
    assert _keys(fs, root) == {f"r/{k}" for k in keys}

    # two runs, overwrite false, one new name: one wins, the other is told it was discarded
    a = _output(url, opts, "s", overwrite=False, method="tsqr", value=3.0)
    b = _output(url, opts, "s", overwrite=False, method="tsqr", value=4.0)
    a.publish({"status": "completed"})
    with pytest.raises(ArtifactExistsError, match="discarded") as err:
        b.publish({"status": "completed"})
    assert "\n" not in str(err.value) and b.run_id not in str(err.value)
    assert read_published(a.out, "s")["run_id"] == a.run_id
    assert not [k for k in _keys(fs, root) if any(h in k for h in HIDDEN)]


def test_failed_copy_never_looks_complete_and_the_retry_finishes(s3):
    """Fail the copy of an overwrite halfway: ``metrics.json`` is not "completed" over the
    mix; the retried publish completes the new result. A reader polling throughout never
    sees a completed ``metrics.json`` over factors of another run."""
    import zarr

    from pipeline.io.artifacts import read_published
    from pipeline.io.stores import zarr_store

    url = _bucket(s3) + "/results"
    opts = s3.storage_options()
    fs = s3.filesystem()
    old = _output(url, opts, "r", overwrite=False, method="tsqr", value=1.0)
    old.publish({"status": "completed"})
    new = _output(url, opts, "r", overwrite=True, method="nmf", value=2.0)

    seen: list[str] = []
    stop = threading.Event()

    def reader() -> None:  # what a careful reader does: metrics, factors, metrics again
        rfs = s3.filesystem()
        base = url.removeprefix("s3://") + "/r"
        while not stop.is_set():
            rfs.invalidate_cache()
            try:
                before = json.loads(rfs.cat_file(f"{base}/metrics.json"))
                groups = {p.rsplit("/", 1)[-1] for p in rfs.ls(f"{base}/factors.zarr")}
                after = json.loads(rfs.cat_file(f"{base}/metrics.json"))
            except FileNotFoundError:
                continue
            if before.get("status") == "completed" and before == after:
                seen.append(before["run_id"])
                want = {"tsqr"} if before["run_id"] == old.run_id else {"nmf"}
                assert groups - {"zarr.json"} == want, (before["run_id"], groups)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        real_copy = new.fs.copy

        def half_copy(src, dst, **kw):  # copies half the objects, then the network fails
            real_copy(src[: len(src) // 2], dst[: len(dst) // 2], **kw)
            raise OSError("injected: connection reset during copy")

        new.fs.copy = half_copy
        with pytest.raises(OSError, match="injected"):
            new.publish({"status": "completed"})
        del new.fs.copy
        assert read_published(new.out, "r") is None, "a half-copied result looks complete"
        assert json.loads(fs.cat_file(url[5:] + "/r/metrics.json"))["status"] == "publishing"
        new.publish({"status": "completed"})  # Prefect's retry
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert read_published(new.out, "r")["run_id"] == new.run_id
    x = zarr.open_array(store=zarr_store(f"{url}/r/factors.zarr/nmf/X", opts, read_only=True))
    assert float(np.asarray(x).min()) == 2.0
    assert old.run_id in seen and new.run_id in seen, seen
    assert not [k for k in _keys(fs, url[5:]) if any(h in k for h in HIDDEN)]


def test_publish_step_twice_and_prepare_cleanup_on_s3(s3, tmp_path, client, monkeypatch):
    """The lifecycle's ``publish`` run twice (a retry) returns the same result; a
    ``prepare`` that fails after creating its staging folder removes it."""
    from pipeline.jobs import compute, plan, prepare, publish

    bucket, job = _s3_round_trip_job(s3, tmp_path, 1, 400, 5, 100)
    config = config_from_any(job)
    run = prepare(config)
    with client.as_current():
        run = plan(run)
        results = {"tsqr": compute(run, 0)}
    first = publish(run, results)
    again = publish(run, results)
    assert again["run_id"] == first["run_id"] and again["finished"] == first["finished"]
    fs = s3.filesystem()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket[5:]}/out")) == ["job"]

    import pipeline.io.artifacts as artifacts

    def broken_group(*args, **kw):
        raise OSError("injected: could not create the group")

    monkeypatch.setattr(artifacts.zarr, "open_group", broken_group)
    over = config_from_any({**job, "output": {**job["output"], "overwrite": True}})
    with pytest.raises(OSError, match="injected"):
        prepare(over)
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket[5:]}/out")) == ["job"]


def test_server_stopped_mid_run_fails_fast_with_one_line(tmp_path, client, caplog):
    """The endpoint dies after prepare: compute fails within bounded time, one line; the
    abort that cannot reach the store logs a warning instead of hanging."""
    from s3server import SECRET_KEY, moto_server

    from pipeline.jobs import abort, compute, plan, prepare

    with moto_server() as s3:
        bucket = _bucket(s3)
        opts = s3.storage_options(config_kwargs={"connect_timeout": 1, "read_timeout": 2})
        a = np.random.default_rng(2).standard_normal((400, 5))
        from tests.conftest import write_array

        write_array(tmp_path / "in.zarr", a, chunks=(100, 5))
        job = job_dict(
            tmp_path,
            str(tmp_path / "in.zarr"),
            output={"url": f"{bucket}/out", "storage_options": opts},
        )
        run = prepare(config_from_any(job))
    # the server is stopped now
    t0 = time.monotonic()
    with client.as_current(), pytest.raises(Exception) as err:
        compute(plan(run), 0)  # the steps after prepare, on a stopped endpoint
    failed_after = time.monotonic() - t0
    assert "\n" not in str(err.value).strip() and str(err.value)
    assert SECRET_KEY not in str(err.value)
    t1 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipeline.io.artifacts"):
        abort(run)
    abort_after = time.monotonic() - t1
    print(f"compute failed after {failed_after:.1f} s, abort gave up after {abort_after:.1f} s")
    assert failed_after < 60 and abort_after < 60
    assert any("could not remove staging" in r.getMessage() for r in caplog.records)


def test_retries_are_logged_one_line_each_without_credentials(caplog):
    from s3server import ACCESS_KEY, SECRET_KEY, stalled_server

    from pipeline.io.stores import split_url

    with stalled_server() as endpoint:
        opts = {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "endpoint_url": endpoint,
            "config_kwargs": {"connect_timeout": 1, "read_timeout": 1},
        }
        fs, path = split_url("s3://zf-stalled/x.zarr/zarr.json", opts)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING), pytest.raises(Exception, match=r"[Tt]imeout"):
            fs.cat_file(path)
        took = time.monotonic() - t0
    retries = [r for r in caplog.records if r.name == "pipeline.io.stores"]
    print(f"one stalled call with read_timeout 1 s gave up after {took:.1f} s")
    assert len(retries) == 2, [r.getMessage() for r in retries]  # 3 attempts
    for rec in retries:
        line = rec.getMessage()
        assert rec.levelno == logging.WARNING and "\n" not in line
        assert "Object attempt" in line and "ReadTimeoutError" in line
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert ACCESS_KEY not in text and SECRET_KEY not in text
    assert not [r for r in caplog.records if r.name.startswith("botocore.retr")]
    assert took < 3 * 1 + 10


@pytest.mark.e2e
def test_validate_on_a_stalled_endpoint_ends_with_one_line(tmp_path):
    """Default timeouts (the bound a user gets without tuning) on a stalled input, and a
    stalled output with small timeouts: both exit 2 with one line, in bounded time."""
    from s3server import ACCESS_KEY, SECRET_KEY, stalled_server

    write_array(tmp_path / "in.zarr", np.ones((50, 4)))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    with stalled_server() as endpoint:
        on_input = job_dict(
            tmp_path,
            "s3://zf-stalled/in.zarr",
            input={"url": "s3://zf-stalled/in.zarr", "storage_options": {"endpoint_url": endpoint}},
        )
        small = {
            "endpoint_url": endpoint,
            "config_kwargs": {"connect_timeout": 1, "read_timeout": 2},
        }
        on_output = job_dict(
            tmp_path,
            str(tmp_path / "in.zarr"),
            output={"url": "s3://zf-stalled/out", "storage_options": small},
        )
        procs = []
        t0 = time.monotonic()
        for name, job in (("input", on_input), ("output", on_output)):
            path = write_job(tmp_path, job, f"{name}.yaml")
            procs.append(
                subprocess.Popen(
                    [*factorize_cmd(), "validate", str(path)],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        took = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            took.append(time.monotonic() - t0)
            # the log goes to stdout; stderr holds the one-line verdict only
            logged = [ln for ln in out.splitlines() if LOG_LINE.match(ln)]
            lines = err.strip().splitlines()
            assert proc.returncode == 2, err
            assert len(lines) == 1 and "Traceback" not in out + err, err
            assert "cannot reach" in lines[0] and SECRET_KEY not in out + err
            retries = [ln for ln in logged if "object store:" in ln]
            assert retries and all("WARNING" in ln and "attempt" in ln for ln in retries)
    print(f"validate on a stalled endpoint: default bound {took[0]:.1f} s, small {took[1]:.1f} s")
    assert took[0] < 60, took


def _race(url: str, name: str, overwrite: bool, n: int = 12) -> list[BaseException | None]:
    """``n`` threads publish ``name`` at the same moment; their errors (``None``: ok)."""
    outs = [
        _output(url, None, name, overwrite=overwrite, method="tsqr", value=float(i))
        for i in range(n)
    ]
    barrier = threading.Barrier(n)
    errors: list[BaseException | None] = [None] * n

    def go(i: int) -> None:
        barrier.wait()
        try:
            outs[i].publish({"status": "completed", "value": i})
        except BaseException as exc:  # collected and asserted on by the caller
            errors[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _assert_whole(path) -> None:
    import zarr

    metrics = json.loads((path / "metrics.json").read_text())
    group = zarr.open_group(str(path / "factors.zarr"), mode="r")
    x, r = np.asarray(group["tsqr/X"]), np.asarray(group["tsqr/R"])
    assert (x == metrics["value"]).all() and (r == metrics["value"]).all(), "mixed"


def test_twelve_concurrent_local_publishers(tmp_path):
    """12 threads publish one name at once, 5 rounds with overwrite: no error, no
    leftovers, the result one whole run. Without overwrite on a new name one wins and 11
    are told their result was discarded."""
    t0 = time.monotonic()
    for _ in range(5):
        assert _race(str(tmp_path), "r", overwrite=True) == [None] * 12
        _assert_whole(tmp_path / "r")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r"], "leftovers"
    errors = _race(str(tmp_path), "s", overwrite=False)
    assert errors.count(None) == 1
    lost = [e for e in errors if e is not None]
    assert all(isinstance(e, ArtifactExistsError) and "discarded" in str(e) for e in lost)
    _assert_whole(tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "s"], "leftovers"
    print(f"6 rounds of 12 concurrent publishers: {time.monotonic() - t0:.1f} s")


def test_factorize_run_with_s3_input_and_output(s3, tmp_path, prefect_server):
    """`factorize run` end to end on S3: input and output on the server, an overwrite of
    an older result with another layout, NMF checkpoints on S3; exit 0, metrics completed,
    factors readable over S3, nothing hidden left."""
    import zarr
    from s3server import ACCESS_KEY, SECRET_KEY

    from pipeline.io.stores import zarr_store

    bucket = _bucket(s3)
    a = np.abs(np.random.default_rng(3).standard_normal((3000, 8)))
    _write_s3_input(s3, f"{bucket}/in.zarr", a, (750, 8))
    opts = s3.storage_options()
    old = _output(f"{bucket}/out", opts, "e2e", overwrite=False, method="rsvd", value=9.0)
    old.publish({"status": "completed"})
    endpoint = {"endpoint_url": s3.endpoint}  # credentials from the environment
    job = job_dict(
        tmp_path,
        f"{bucket}/in.zarr",
        name="e2e",
        input={"url": f"{bucket}/in.zarr", "storage_options": endpoint},
        methods=[
            {"method": "tsqr"},
            {"method": "nmf", "rank": 3, "max_iter": 12, "tol": 0, "checkpoint_every": 4},
        ],
        cluster={"kind": "local", "n_workers": 1, "threads_per_worker": 2},
        output={"url": f"{bucket}/out", "storage_options": endpoint, "overwrite": True},
    )
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    t0 = time.monotonic()
    proc = subprocess.run(
        [*factorize_cmd(), "run", str(write_job(tmp_path, job))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    print(f"factorize run on S3: {took:.1f} s")
    fs = s3.filesystem()
    root = f"{bucket[5:]}/out"
    metrics = json.loads(fs.cat_file(f"{root}/e2e/metrics.json"))
    assert metrics["status"] == "completed" and metrics["run_id"] != old.run_id
    assert metrics["methods"]["tsqr"]["residual_rel"] < 1e-12
    keys = _keys(fs, root)
    assert not [k for k in keys if any(h in k for h in HIDDEN)], keys
    assert not [k for k in keys if "/rsvd" in k], "a key only the old result had"
    group = zarr.open_group(
        zarr_store(f"{bucket}/out/e2e/factors.zarr", opts, read_only=True), mode="r"
    )
    q, r = np.asarray(group["tsqr/Q"]), np.asarray(group["tsqr/R"])
    np.testing.assert_allclose(q @ r, a, atol=1e-10)
    w, h = np.asarray(group["nmf/W"]), np.asarray(group["nmf/H"])
    assert w.shape == (3000, 3) and h.shape == (3, 8) and (w >= 0).all()


def test_run_job_on_s3_in_process(s3, tmp_path, client):
    """The whole lifecycle in process with S3 input and output (fast path of the e2e)."""
    from pipeline.io.artifacts import read_published
    from pipeline.jobs import run_job

    bucket, job = _s3_round_trip_job(s3, tmp_path, 4, 600, 4, 150)
    t0 = time.monotonic()
    first = run_job(job, client=client)
    second = run_job({**job, "output": {**job["output"], "overwrite": True}}, client=client)
    print(f"two in-process runs on S3: {time.monotonic() - t0:.1f} s")
    assert first["status"] == second["status"] == "completed"
    assert (
        read_published(location_of(config_from_any(job).output), "job")["run_id"]
        == second["run_id"]
    )
    keys = _keys(s3.filesystem(), f"{bucket[5:]}/out")
    assert keys and all(k.startswith("job/") for k in keys), keys


# --------------------------------------------------------------------------- output vs input


def test_an_output_overlapping_the_input_on_s3_is_refused(s3, tmp_path):
    """Same bucket and endpoint, overlapping keys: refused before anything is written,
    ``..`` in a key included; a sibling name with the same prefix is fine."""
    from s3server import SECRET_KEY

    from pipeline.jobs import precheck, prepare

    bucket, job = _s3_round_trip_job(s3, tmp_path, 5, 40, 3, 10)
    opts = s3.storage_options()
    refused = [
        ({"url": f"{bucket}/in.zarr"}, "job", "lies inside the input store"),
        ({"url": bucket}, "in.zarr", "is the input store"),
        ({"url": f"{bucket}/x/.."}, "in.zarr", "resolves to s3://"),
        ({"url": f"{bucket}/in.zarr/c/.."}, "job", "lies inside the input store"),
    ]
    for output, name, needle in refused:
        config = config_from_any(
            {**job, "name": name, "output": {**output, "storage_options": opts, "overwrite": True}}
        )
        with pytest.raises(ConfigError) as err:
            precheck(config)
        msg = str(err.value)
        assert msg.startswith("output: ") and needle in msg and "\n" not in msg, msg
        assert f"{bucket}/in.zarr" in msg and SECRET_KEY not in msg, msg
        with pytest.raises(ConfigError, match=r"choose another output\.url or name"):
            prepare(config)
    beside = {**job, "name": "in.zarr-out", "output": {"url": bucket, "storage_options": opts}}
    assert precheck(config_from_any(beside)).shape == (40, 3)
    elsewhere = {**job, "output": {"url": f"memory://{bucket[5:]}/in.zarr"}}  # another store
    assert precheck(config_from_any(elsewhere)).shape == (40, 3)
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.filesystem().ls(bucket[5:])) == ["in.zarr"]


# --------------------------------------------------------------------------- claims are leases


def _claim_on(fs, root: str, name: str, claim: dict) -> None:
    fs.pipe(f"{root}/{name}/metrics.json", json.dumps(claim).encode())
    fs.pipe(f"{root}/.{name}.partial-{claim['run_id']}/factors.zarr/zarr.json", b"{}")


def test_a_live_claim_is_refused_and_a_lapsed_one_is_taken_over(s3):
    """A claim is a lease: while it runs, validate and publish refuse the name (another
    run is publishing it); once it has lapsed — also a claim written before leases,
    with ``since`` only — the name is free, and the dead run's staging is removed."""
    from pipeline.io.artifacts import check_output_free, read_published
    from pipeline.io.owners import claim_record

    url = _bucket(s3) + "/results"
    root, fs = url[5:], s3.filesystem()
    opts = s3.storage_options()
    live = claim_record("0123456789ab")
    _claim_on(fs, root, "r", live)
    with pytest.raises(ArtifactExistsError, match=r"being published by another run 0123456789ab"):
        check_output_free(locate(url, opts), "r")
    late = _output(url, opts, "r", overwrite=True, method="tsqr", value=1.0)
    with pytest.raises(ArtifactExistsError, match=r"claim expires .*result was discarded"):
        late.publish({"status": "completed"})
    assert json.loads(fs.cat_file(f"{root}/r/metrics.json")) == live  # untouched
    assert not [k for k in _keys(fs, root) if late.run_id in k]

    old = {"status": "publishing", "run_id": "ba9876543210", "since": "2020-01-01T00:00:00+00:00"}
    lapsed = {**live, "expires": "2020-01-01T00:02:00+00:00"}  # the live run, killed since
    for claim, overwrite in ((old, False), (lapsed, True)):
        _claim_on(fs, root, "r", claim)
        spec = locate(url, opts)
        check_output_free(spec, "r", overwrite)  # what validate asks: the name is free
        out = _output(url, opts, "r", overwrite=overwrite, method="nmf", value=2.0)
        out.publish({"status": "completed"})
        assert read_published(spec, "r")["run_id"] == out.run_id
        assert not [k for k in _keys(fs, root) if claim["run_id"] in k], claim
    assert not [k for k in _keys(fs, root) if any(h in k for h in HIDDEN)]


KILLED_PUBLISHER = """
import sys, time

import numpy as np

import pipeline.io.artifacts as artifacts
import pipeline.io.owners as owners
from pipeline.io.stores import locate

owners.LEASE_SECONDS, artifacts.RENEW_SECONDS = 4, 0.5  # the real ones: 120 s and 30 s
url, endpoint, key, secret = sys.argv[1:]
options = {"endpoint_url": endpoint, "key": key, "secret": secret}
out = artifacts.RunOutput(locate(url, options), "r", overwrite=True)
out.begin()
out.factor_array("nmf", "W", np.full((3, 3), 7.0), ("row", "component"))
copy = out.fs.copy

def copy_half_then_hang(src, dst, **kw):
    copy(src[: len(src) // 2], dst[: len(dst) // 2], **kw)
    print(out.run_id, flush=True)
    time.sleep(3600)

out.fs.copy = copy_half_then_hang
out.publish({"status": "completed"})
"""


def test_a_publisher_killed_after_its_claim_is_taken_over_once_its_lease_lapses(s3, tmp_path):
    """A real publisher process claims a name, copies half its objects, renews its lease
    and gets SIGKILL. Until the lease lapses the name is refused as being published;
    then a run with ``overwrite: false`` takes it over: the killed run's staging and the
    objects it copied are gone, the result is the new run's."""
    from s3server import ACCESS_KEY, SECRET_KEY

    from pipeline.io.artifacts import check_output_free, read_published
    from pipeline.io.owners import remove_stale_staging

    url = _bucket(s3) + "/results"
    root, fs = url[5:], s3.filesystem()
    opts = s3.storage_options()
    script = tmp_path / "publisher.py"
    script.write_text(KILLED_PUBLISHER)
    proc = subprocess.Popen(
        [sys.executable, str(script), url, s3.endpoint, ACCESS_KEY, SECRET_KEY],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        killed_run = proc.stdout.readline().strip()
        time.sleep(1.2)  # a renewal or two
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    assert len(killed_run) == 12, err[-2000:]
    claim = json.loads(fs.cat_file(f"{root}/r/metrics.json"))
    assert claim["run_id"] == killed_run and claim["owner"]["pid"] == proc.pid
    assert claim["renewed"] >= claim["since"]
    assert any(k.startswith("r/factors.zarr") for k in _keys(fs, root)), "half copied"
    spec = locate(url, opts)
    with pytest.raises(ArtifactExistsError, match=f"being published by another run {killed_run}"):
        check_output_free(spec, "r")

    expires = datetime.fromisoformat(claim["expires"])
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.5)
    check_output_free(spec, "r")  # lapsed: free for overwrite: false
    staging = f"{root}/.r.partial-{killed_run}"
    assert remove_stale_staging(spec, "r") == [staging]  # what prepare does first
    new = _output(url, opts, "r", overwrite=False, method="tsqr", value=3.0)
    new.publish({"status": "completed"})
    assert read_published(spec, "r")["run_id"] == new.run_id
    keys = _keys(fs, root)
    assert not [k for k in keys if "/nmf" in k], "an object the killed run copied"
    assert not [k for k in keys if any(h in k for h in HIDDEN)], keys


# --------------------------------------------------------------------------- one line


def test_transient_errors_are_logged_on_one_line():
    """What Prefect logs for a failed or retried task (``exc_info``) and what a Dask worker
    logs for a failed task (its traceback as text) is one line for a timeout."""
    from botocore.exceptions import ReadTimeoutError

    from pipeline.io.stores import quiet_transient_errors

    quiet_transient_errors()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(n) for n in ("prefect.task_runs", "distributed.worker")]
    for logger in loggers:
        logger.addHandler(handler)
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        for exc in (ReadTimeoutError(endpoint_url="http://h/b/k"), ValueError("a bug")):
            try:
                raise exc
            except Exception as caught:
                loggers[0].error("Task run failed with exception: %r", caught, exc_info=True)
        loggers[1].error(
            "Compute Failed\nKey: %s\nState: %s\nTask: %s\nException: %r\nTraceback: %r\n",
            "store-abc",
            "executing",
            "<Task ...>",
            "ReadTimeoutError('Read timeout on endpoint URL: \"http://h/b/k\"')",
            '  File "x.py", line 1, in f\n',
        )
    finally:
        logging.getLogger().setLevel(root_level)
        for logger in loggers:
            logger.removeHandler(handler)
    text = [logging.Formatter().format(r) for r in records]
    assert text[0].startswith("Task run failed with exception: ReadTimeoutError(")
    assert "\n" not in text[0] and "Traceback" not in text[0]
    assert "Traceback" in text[1]  # a bug keeps its traceback
    assert text[2] == (
        "task store-abc failed: ReadTimeoutError('Read timeout on endpoint URL: \"http://h/b/k\"')"
    )


def test_an_endpoint_stalling_mid_run_fails_with_one_line_and_no_traceback(
    s3, tmp_path, prefect_server
):
    """`factorize run` writing to S3 through a proxy that stops answering once the run has
    opened its staging folder: exit 1 with one line; the log holds each retry as one
    WARNING line and not a single traceback (it held up to 14)."""
    from s3server import ACCESS_KEY, SECRET_KEY, StallingProxy

    bucket = _bucket(s3)
    write_array(tmp_path / "in.zarr", np.random.default_rng(6).random((20000, 20)), (1000, 20))
    proxy = StallingProxy(s3.endpoint)
    small = {"connect_timeout": 1, "read_timeout": 1}
    job = job_dict(
        tmp_path,
        str(tmp_path / "in.zarr"),
        cluster={"n_workers": 1, "threads_per_worker": 2},
        output={
            "url": f"{bucket}/out",
            "storage_options": {"endpoint_url": proxy.endpoint, "config_kwargs": small},
        },
    )
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*factorize_cmd(), "run", str(write_job(tmp_path, job))],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        fs = s3.filesystem()
        while time.monotonic() - t0 < 240 and proc.poll() is None:
            if any(".job.partial-" in p for p in fs.find(f"{bucket[5:]}/out")):
                break
            fs.invalidate_cache()
            time.sleep(0.2)
        proxy.stall()
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proxy.close()
    print(f"factorize run on an endpoint that stalls mid-run: {time.monotonic() - t0:.1f} s")
    line = one_line_exit(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 1)
    assert line.startswith("factorize: failed: ") and "Timeout" in line, line
    retries = [ln for ln in out.splitlines() if "object store:" in ln]
    assert retries and all("WARNING" in ln and "attempt" in ln for ln in retries), out[-3000:]
    assert SECRET_KEY not in out + err
