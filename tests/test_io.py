"""Opening inputs (Zarr v2/v3, groups, fsspec URLs), atomic result folders, and generated
inputs that appear whole or leave nothing (also after a failure or a kill)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numcodecs
import numpy as np
import pytest
import zarr

from pipeline.config import InputSpec, SyntheticSpec
from pipeline.errors import ArtifactExistsError, InputError
from pipeline.io.stores import locate
from tests.conftest import REPO, write_array


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_open_array_and_group_member(tmp_path, zarr_format):
    from pipeline.io import open_matrix

    data = np.arange(60, dtype=np.float32).reshape(12, 5)
    write_array(tmp_path / "a.zarr", data, chunks=(4, 5), zarr_format=zarr_format)
    write_array(tmp_path / "g.zarr", data, chunks=(6, 5), zarr_format=zarr_format, name="x/A")
    x, m = open_matrix(InputSpec(url=str(tmp_path / "a.zarr")))
    assert m.shape == (12, 5) and m.chunks == (4, 5) and m.zarr_format == zarr_format
    np.testing.assert_array_equal(x.compute(), data)
    y, m2 = open_matrix(InputSpec(url=f"file://{tmp_path}/g.zarr", array="x/A"))
    assert m2.array == "x/A" and y.chunks[0] == (6, 6)
    np.testing.assert_array_equal(y.compute(), data)


LAYOUTS = {
    "v2 zstd": dict(zarr_format=2),
    "v2 raw, F order, '/' keys": dict(
        zarr_format=2,
        compressors=None,
        order="F",
        chunk_key_encoding={"name": "v2", "separator": "/"},
    ),
    "v2 shuffle filter": dict(zarr_format=2, filters=[numcodecs.Shuffle(elementsize=8)]),
    "v3 zstd": dict(zarr_format=3),
    "v3 blosc": dict(zarr_format=3, compressors=[zarr.codecs.BloscCodec()]),
    "v3 gzip": dict(zarr_format=3, compressors=[zarr.codecs.GzipCodec()]),
    "v3 raw": dict(zarr_format=3, compressors=None),
    "v3 sharded": dict(zarr_format=3, shards=(8, 6)),
    "v3 sharded blosc": dict(zarr_format=3, shards=(4, 6), compressors=[zarr.codecs.BloscCodec()]),
    "v3 big-endian (through zarr)": dict(
        zarr_format=3, serializer=zarr.codecs.BytesCodec(endian="big")
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_direct_chunk_reads_equal_zarr(tmp_path, layout):
    """Fast path and zarr agree on every layout: edge chunks, unwritten chunks (fill
    value), filters, order; unsupported layouts fall back to zarr."""
    from pipeline.io import open_matrix

    a = np.random.default_rng(0).standard_normal((10, 7))
    z = zarr.create_array(
        store=str(tmp_path / "t.zarr"),
        shape=a.shape,
        chunks=(4, 3),
        dtype="f8",
        fill_value=1.5,
        **LAYOUTS[layout],
    )
    z[:6] = a[:6]  # rows 8–9 are never written
    x, _ = open_matrix(InputSpec(url=str(tmp_path / "t.zarr"), missing_chunks="fill"))
    direct = "through zarr" not in layout
    assert x.name.startswith("read-zarr-" if direct else "from-zarr-"), x.name
    got = x.compute(scheduler="sync")
    np.testing.assert_array_equal(got, zarr.open_array(str(tmp_path / "t.zarr"))[...])
    assert got[9, 6] == 1.5 and got.flags.writeable


def test_integers_are_cast_to_float64(tmp_path):
    from pipeline.io import open_matrix

    write_array(tmp_path / "i.zarr", np.arange(20, dtype=np.int16).reshape(10, 2))
    x, m = open_matrix(InputSpec(url=str(tmp_path / "i.zarr")))
    assert x.dtype == np.float64 and m.dtype == "int16"


def test_memory_url():
    import fsspec

    from pipeline.io import open_matrix

    fs = fsspec.filesystem("memory")
    store = zarr.storage.FsspecStore.from_url("memory://mem.zarr")
    arr = zarr.create_array(store=store, shape=(8, 2), dtype="f8", chunks=(4, 2))
    arr[...] = 1.0
    x, _ = open_matrix(InputSpec(url="memory://mem.zarr"))
    assert float(x.sum().compute(scheduler="sync")) == 16.0
    fs.rm("/mem.zarr", recursive=True)


@pytest.mark.parametrize(
    "setup,spec_kw,match",
    [
        ("none", {}, "does not exist"),
        ("group", {}, "is a Zarr group; set input.array.*A"),
        ("group", {"array": "B"}, "'B' not found.*it holds arrays: A"),
        ("array", {"array": "A"}, "is itself an array"),
        ("1d", {}, "must be a 2-D matrix; got 1-D"),
        ("3d", {}, "must be a 2-D matrix; got 3-D"),
        ("str", {}, "non-numeric dtype"),
        ("complex", {}, "complex dtype"),
        ("empty", {}, "is empty"),
    ],
)
def test_bad_inputs(tmp_path, setup, spec_kw, match):
    from pipeline.io import open_matrix

    url = tmp_path / "in.zarr"
    if setup == "group":
        write_array(url, np.ones((4, 2)), name="A")
    elif setup == "array":
        write_array(url, np.ones((4, 2)))
    elif setup == "1d":
        write_array(url, np.ones(4))
    elif setup == "3d":
        write_array(url, np.ones((2, 2, 2)))
    elif setup == "str":
        zarr.create_array(store=str(url), shape=(2, 2), dtype=str)
    elif setup == "complex":
        write_array(url, np.ones((4, 2), dtype=np.complex128))
    elif setup == "empty":
        write_array(url, np.ones((0, 3)))
    with pytest.raises(InputError, match=match):
        open_matrix(InputSpec(url=str(url), **spec_kw))


def test_run_output_is_atomic_and_respects_overwrite(tmp_path):
    import dask.array as da
    import xarray as xr

    from pipeline.io import RunOutput

    spec = locate(str(tmp_path))
    out = RunOutput(spec, "r1")
    out.begin()
    out.factor_array("tsqr", "R", np.eye(3), ("component", "col"))
    stored = out.factor_array("tsqr", "Q", da.ones((10, 3), chunks=(4, 3)), ("row", "component"))
    stored.compute()
    assert not (tmp_path / "r1").exists(), "nothing may appear before publish"
    final = out.publish({"status": "completed"})
    assert final == str(tmp_path / "r1")
    assert not list(tmp_path.glob(".r1.partial-*"))
    assert json.loads((tmp_path / "r1" / "metrics.json").read_text())["status"] == "completed"
    ds = xr.open_zarr(tmp_path / "r1" / "factors.zarr", group="tsqr")
    assert ds["Q"].dims == ("row", "component") and ds["R"].dims == ("component", "col")
    assert float(ds["Q"].sum()) == 30.0

    with pytest.raises(ArtifactExistsError, match="overwrite"):
        RunOutput(spec, "r1").begin()
    # overwrite: the old result stays intact until the new one is published
    over = RunOutput(locate(str(tmp_path)), "r1", overwrite=True)
    over.begin()
    over.factor_array("tsqr", "R", 2 * np.eye(3), ("component", "col"))
    assert xr.open_zarr(tmp_path / "r1" / "factors.zarr", group="tsqr")["R"][0, 0] == 1.0
    over.publish({"status": "completed", "v": 2})
    assert json.loads((tmp_path / "r1" / "metrics.json").read_text())["v"] == 2
    assert not list(tmp_path.glob(".r1.*"))


def test_abort_removes_staging_only(tmp_path):
    from pipeline.io import RunOutput

    out = RunOutput(locate(str(tmp_path)), "r2")
    out.begin()
    staging = out.staging
    out.abort()
    assert not (tmp_path / "r2").exists()
    assert not list(tmp_path.iterdir()), f"left behind: {staging}"


def test_object_store_publish_leaves_complete_result_only():
    """On fsspec stores without rename (memory here, S3 in test_s3) publish copies the
    staged tree and writes the completed metrics.json; no staging is left behind."""
    import fsspec

    from pipeline.io import RunOutput

    fs = fsspec.filesystem("memory")
    out = RunOutput(locate("memory://results"), "r3")
    out.begin()
    out.factor_array("tsqr", "R", np.eye(2), ("component", "col"))
    try:
        out.publish({"status": "completed"})
        assert fs.exists("/results/r3/factors.zarr/tsqr/R/zarr.json")
        assert json.loads(fs.cat("/results/r3/metrics.json"))["status"] == "completed"
        assert not [p for p in fs.ls("/results", detail=False) if ".partial-" in p]
    finally:
        fs.rm("/results", recursive=True)


def _flip_index_byte(raw: bytes) -> bytes:
    return raw[:-10] + bytes([raw[-10] ^ 1]) + raw[-9:]


def _offset_past_end(raw: bytes) -> bytes:  # first inner chunk's offset → 10⁶, CRC redone
    n = 2 * 16 + 4  # a shard of 8 × 3 holds two 4 × 3 inner chunks
    index = bytearray(raw[-n:-4])
    index[:8] = (10**6).to_bytes(8, "little")
    return raw[:-n] + bytes(numcodecs.CRC32C().encode(bytes(index)))


@pytest.mark.parametrize(
    ("damage", "missing", "message"),
    [
        (
            _flip_index_byte,
            "error",
            "is corrupt: its index RuntimeError: Stored and computed crc32c",
        ),
        (_offset_past_end, "error", "is corrupt: inner chunk (0, 0) lies past its end"),
        (None, "error", "lacks inner chunk (1, 0); set input.missing_chunks: fill"),
    ],
)
def test_damaged_shards_are_refused_naming_the_shard(tmp_path, damage, missing, message):
    from pipeline.io import open_matrix

    url = tmp_path / "s.zarr"
    z = zarr.create_array(store=str(url), shape=(16, 3), chunks=(4, 3), shards=(8, 3), dtype="f8")
    z[:12] = 1.0  # rows 12–15 (inner chunk (1, 0) of shard (1, 0)) stay unwritten
    shard = url / "c" / "1" / "0"
    if damage is not None:
        shard.write_bytes(damage(shard.read_bytes()))
    x, _ = open_matrix(InputSpec(url=str(url), missing_chunks=missing))
    with pytest.raises(InputError) as info:
        x.compute(scheduler="sync")
    assert message in str(info.value)
    assert str(info.value).startswith(f"input: chunk (1, 0) of {url} ")


def test_overwriting_a_symlinked_name_leaves_no_link_aside(tmp_path):
    """``<name>`` a symbolic link to a result elsewhere: the overwrite moved the link aside
    and ``rmtree`` refused to remove a link, so ``.r.old-*`` stayed for ever. Now the
    link goes (what it pointed to stays), and so does such a leftover of a killed run."""
    from pipeline.io import RunOutput

    elsewhere = tmp_path / "elsewhere" / "r"
    elsewhere.mkdir(parents=True)
    (elsewhere / "metrics.json").write_text('{"status": "completed"}')
    out = tmp_path / "out"
    out.mkdir()
    (out / "r").symlink_to(elsewhere)
    (out / ".r.old-0123456789ab").symlink_to(elsewhere)  # a publisher killed between renames
    new = RunOutput(locate(str(out)), "r", overwrite=True)
    new.begin()
    new.factor_array("tsqr", "R", np.eye(2), ("component", "col"))
    new.publish({"status": "completed", "v": 2})
    assert sorted(p.name for p in out.iterdir()) == ["r"]
    assert not (out / "r").is_symlink()
    assert json.loads((out / "r" / "metrics.json").read_text())["v"] == 2
    assert (elsewhere / "metrics.json").read_text() == '{"status": "completed"}'

    import fsspec

    from pipeline.io.artifacts import replace_tree

    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "state.json").write_text("{}")
    (tmp_path / "ckpt").symlink_to(elsewhere)  # a checkpoint folder that is a link
    replace_tree(fsspec.filesystem("file"), str(tmp_path / "new"), str(tmp_path / "ckpt"), "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "elsewhere", "out"]
    assert (elsewhere / "metrics.json").exists()


def test_a_failed_generate_leaves_no_hidden_folder(tmp_path, monkeypatch):
    """One chunk fails while another is being made: Dask raised at once, the hidden
    folder was removed, and the chunk still in flight re-created it (Zarr makes the
    parents of every chunk it writes). Now chunks in flight finish first, then it goes."""
    import threading

    import pipeline.datasets as datasets

    make = datasets._block
    failing, in_flight = threading.Event(), threading.Event()

    def third_fails_while_another_runs(kind, seed, block_id, *args):
        if block_id[0] == 3:
            failing.set()
            in_flight.wait(10)  # another chunk is being made now
            raise RuntimeError("injected: disk error")
        if failing.is_set():
            in_flight.set()
            time.sleep(0.3)  # written after the failure was raised
        return make(kind, seed, block_id, *args)

    monkeypatch.setattr(datasets, "_block", third_fails_while_another_runs)
    spec = SyntheticSpec(kind="gaussian", shape=(400, 6), chunks=(10, 6))
    with pytest.raises(RuntimeError, match="injected"):
        datasets.write_synthetic(str(tmp_path / "m.zarr"), spec)
    assert in_flight.is_set()
    time.sleep(0.6)  # a chunk still being written would show up by now
    assert list(tmp_path.iterdir()) == []


KILLED_GENERATOR = """
import sys, time

import pipeline.datasets as datasets
from pipeline.config import SyntheticSpec

make = datasets._block

def slow(*args):
    time.sleep(0.5)
    return make(*args)

datasets._block = slow
datasets.write_synthetic(sys.argv[1], SyntheticSpec(shape=(400, 6), chunks=(10, 6)))
"""


@pytest.mark.e2e
def test_a_killed_generate_is_cleaned_up_by_the_next(tmp_path):
    """A real ``create_if_missing`` writer killed with SIGKILL leaves its hidden folder
    with an owner record; the next writer of that store removes it and writes whole."""
    from pipeline.datasets import synthetic_array, write_synthetic

    script = tmp_path / "generate.py"
    script.write_text(KILLED_GENERATOR)
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(data / "m.zarr")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(data.glob(".m.zarr.partial-*/store/c/*")) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    (leftover,) = data.glob(".m.zarr.partial-*")
    assert json.loads((leftover / ".owner.json").read_text())["pid"] == proc.pid
    spec = SyntheticSpec(shape=(400, 6), chunks=(10, 6))
    write_synthetic(str(data / "m.zarr"), spec)
    assert sorted(p.name for p in data.iterdir()) == ["m.zarr"]
    expected = synthetic_array(spec).compute(scheduler="sync")
    np.testing.assert_array_equal(zarr.open_array(str(data / "m.zarr"))[...], expected)
