"""Corrupt, incomplete and hostile inputs are refused: never a wrong result with exit 0.

Real Zarr stores on disk, damaged one chunk at a time, run through the job lifecycle
(:func:`pipeline.jobs.run_job`) on the session's 2-worker cluster: the chunk is read on a
worker, and the error that reaches the client must be an ``InputError`` of one line naming
the array and the chunk. One case goes through the ``factorize run`` CLI (exit 2).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import factorize_cmd, job_dict, one_line_exit, write_array, write_job

from pipeline.config import SyntheticSpec, parse_config
from pipeline.errors import ConfigError, InputError

A = np.random.default_rng(7).standard_normal((40, 6))
CHUNK_BYTES = 10 * 6 * 8  # chunks of 10 × 6 float64: chunk (2, 0) holds rows 20–29


def _store(tmp_path: Path, data: np.ndarray = A) -> Path:
    url = tmp_path / "in.zarr"
    write_array(url, data, chunks=(10, 6))
    return url


def _chunk(url: Path, i: int = 2, j: int = 0) -> Path:
    return url / "c" / str(i) / str(j)


def _short_frame(p: Path) -> None:  # a valid zstd frame of 2 rows where 10 belong
    import numcodecs

    p.write_bytes(numcodecs.Zstd().encode(A[:2].tobytes()))


def _long_frame(p: Path) -> None:
    import numcodecs

    p.write_bytes(numcodecs.Zstd().encode(A[:11].tobytes()))


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x00not a zstd frame\xff" * 8)


def _directory(p: Path) -> None:
    p.unlink()
    p.mkdir()


def _fifo(p: Path) -> None:  # opening it for reading waits for a writer: forever
    p.unlink()
    os.mkfifo(p)


FAULTS = {
    "short zstd frame": (_short_frame, f"is corrupt: decodes to 96 bytes, {CHUNK_BYTES} expected"),
    "over-long frame": (_long_frame, f"is corrupt: decodes to 528 bytes, {CHUNK_BYTES} expected"),
    "garbage bytes": (_garbage, "is corrupt: it does not decode (RuntimeError: Zstd"),
    "directory in place of a chunk": (_directory, "is a directory, not a regular file"),
    "FIFO in place of a chunk": (_fifo, "is a FIFO, not a regular file"),
}


def _assert_refused(exc: BaseException, url: Path, what: str) -> None:
    msg = str(exc)
    assert type(exc) is InputError, repr(exc)  # pickled back from the worker as itself
    assert msg.startswith(f"input: chunk (2, 0) of {url} {what}"), msg
    assert "\n" not in msg


@pytest.mark.timeout(120)  # the FIFO used to hang the run for ever
@pytest.mark.parametrize("fault", FAULTS)
def test_corrupt_chunk_is_named_and_nothing_is_published(tmp_path, client, fault):
    from pipeline.jobs import run_job

    url = _store(tmp_path)
    damage, what = FAULTS[fault]
    damage(_chunk(url))
    with pytest.raises(InputError) as info:
        run_job(job_dict(tmp_path, str(url)), client=client)
    _assert_refused(info.value, url, what)
    assert not (tmp_path / "out" / "job").exists()


@pytest.mark.e2e
def test_unreadable_chunk_is_named(tmp_path):
    """chmod 000. root reads such a file anyway (CAP_DAC_OVERRIDE): as root the read runs
    in a child whose capability bounding set lacks the two DAC capabilities."""
    url = _store(tmp_path)
    _chunk(url).chmod(0)
    read = (  # the direct reader alone: a light import
        "import sys, fsspec, zarr\n"
        "from pipeline.errors import InputError\n"
        "from pipeline.io.fastread import plan\n"
        "url = sys.argv[1]\n"
        "reader = plan(zarr.open_array(url), fsspec.filesystem('file'), url, name=url)\n"
        "try:\n"
        "    reader.read(2, 0, (10, 6))\n"
        "except InputError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(2)\n"
    )
    cmd = [sys.executable, "-c", read, str(url)]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == f"input: chunk (2, 0) of {url} cannot be read (Permission denied)"


def test_missing_chunk_is_refused_at_validate_and_run(tmp_path, client):
    from pipeline.jobs import precheck, run_job

    url = _store(tmp_path)
    _chunk(url).unlink()
    config = parse_config(job_dict(tmp_path, str(url)))
    expected = f"input: {url} has 1 of 4 chunks missing (first: (2, 0)); "
    for call in (lambda: precheck(config), lambda: run_job(config, client=client)):
        with pytest.raises(InputError) as info:
            call()
        msg = str(info.value)
        assert msg.startswith(expected) and "\n" not in msg, msg
        assert "write_empty_chunks=False" in msg and msg.endswith("input.missing_chunks: fill")


def test_missing_chunk_with_fill_warns_and_reads_the_fill_value(tmp_path, client, caplog):
    """zarr 3 omits an all-zero block it writes (write_empty_chunks=False): a sparse store."""
    from pipeline.jobs import run_job

    sparse = A.copy()
    sparse[20:30] = 0.0
    url = _store(tmp_path, sparse)
    assert not _chunk(url).exists()
    job = job_dict(tmp_path, str(url), input={"url": str(url), "missing_chunks": "fill"})
    with caplog.at_level(logging.WARNING, logger="pipeline.io.source"):
        report = run_job(job, client=client)
    warned = [r.getMessage() for r in caplog.records if "missing" in r.getMessage()]
    assert warned == [
        f"input: {url} has 1 of 4 chunks missing; they read as the fill value 0.0 "
        "(input.missing_chunks: fill)"
    ]
    assert report["input"]["fro_norm"] == pytest.approx(np.linalg.norm(sparse), rel=1e-12)


def test_chunk_deleted_after_validation_is_refused_by_the_reader(tmp_path, client):
    from pipeline.jobs import Steps, execute, prepare

    url = _store(tmp_path)

    def prepare_then_delete(config):
        run = prepare(config)
        _chunk(url).unlink()
        return run

    config = parse_config(job_dict(tmp_path, str(url)))
    with pytest.raises(InputError) as info:
        execute(config, Steps(prepare=prepare_then_delete), client=client)
    _assert_refused(info.value, url, "is missing; set input.missing_chunks: fill")


def test_missing_shard_is_counted_through_zarr(tmp_path, client):
    """A sharded v3 array is read through zarr (no direct reader): the count still refuses."""
    import zarr

    from pipeline.jobs import run_job

    sparse = A.copy()
    sparse[20:40] = 0.0
    url = tmp_path / "in.zarr"
    z = zarr.create_array(store=str(url), shape=A.shape, dtype="f8", chunks=(10, 6), shards=(20, 6))
    z[...] = sparse
    assert sorted(p.name for p in (url / "c").iterdir()) == ["0"]  # shard (1, 0) omitted
    with pytest.raises(InputError, match=r"has 1 of 2 shards missing \(first: \(1, 0\)\)"):
        run_job(job_dict(tmp_path, str(url)), client=client)


def test_failed_create_if_missing_leaves_nothing_and_a_rerun_creates(tmp_path, client):
    """A write that fails (here a negative seed, which validation now refuses) used to leave
    the store's metadata without its chunks, which the next run factorized as zeros."""
    import zarr

    from pipeline.datasets import synthetic_array, write_synthetic
    from pipeline.jobs import run_job

    url = tmp_path / "made.zarr"
    recipe = {"kind": "gaussian", "shape": [40, 6], "chunks": [10, 6]}
    negative = {"url": str(url), "create_if_missing": {**recipe, "seed": -1}}
    with pytest.raises(ConfigError, match=r"seed: must be ≥ 0, got -1"):
        parse_config(job_dict(tmp_path, str(url), input=negative))
    failing = SyntheticSpec.model_construct(**{**SyntheticSpec(**recipe).model_dump(), "seed": -1})
    with pytest.raises(ValueError, match="negative"):
        write_synthetic(str(url), failing)
    assert list(tmp_path.iterdir()) == []  # neither the store nor the hidden folder beside it
    job = job_dict(tmp_path, str(url), input={"url": str(url), "create_if_missing": recipe})
    report = run_job(job, client=client)
    expected = synthetic_array(SyntheticSpec(**recipe)).compute(scheduler="sync")
    np.testing.assert_array_equal(zarr.open_array(str(url))[...], expected)
    assert report["input"]["fro_norm"] == pytest.approx(np.linalg.norm(expected), rel=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made.zarr", "out"]


def test_short_frame_through_the_cli_exits_2_with_one_line(tmp_path, prefect_server):
    url = _store(tmp_path)
    _short_frame(_chunk(url))
    job = write_job(tmp_path, job_dict(tmp_path, str(url)))
    proc = subprocess.run(
        [*factorize_cmd(), "run", str(job)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert one_line_exit(proc).endswith(
        f"input: chunk (2, 0) of {url} is corrupt: decodes to 96 bytes, 480 expected"
    )
    assert not (tmp_path / "out" / "job").exists()


def test_failed_create_on_s3_leaves_no_store_and_a_rerun_overwrites_leftovers(tmp_path, client, s3):
    """Object stores have no rename: the metadata is written after every chunk, so the
    leftover of a failed write is not a Zarr store, and the next run writes over it."""
    from pipeline.datasets import input_will_be_created, synthetic_array, write_synthetic
    from pipeline.jobs import run_job

    bucket = s3.make_bucket("zf-input-faults")
    url, opts = f"{bucket}/made.zarr", s3.storage_options()
    recipe = {"kind": "gaussian", "shape": [40, 6], "chunks": [10, 6]}
    job = job_dict(
        tmp_path,
        url,
        input={"url": url, "storage_options": opts, "create_if_missing": recipe},
    )
    failing = SyntheticSpec.model_construct(**{**SyntheticSpec(**recipe).model_dump(), "seed": -1})
    with pytest.raises(ValueError, match="negative"):
        write_synthetic(url, failing, opts)
    fs = s3.filesystem()
    fs.pipe(f"{url.removeprefix('s3://')}/c/3/0", b"a chunk of an earlier, killed write")
    assert input_will_be_created(parse_config(job).input)  # objects, but no metadata: not a store
    report = run_job(job, client=client)
    expected = synthetic_array(SyntheticSpec(**recipe)).compute(scheduler="sync")
    assert report["input"]["fro_norm"] == pytest.approx(np.linalg.norm(expected), rel=1e-12)
    assert not input_will_be_created(parse_config(job).input)
