"""safetensors checkpoints by byte ranges (pipeline/io/safetensors.py), against the real
``safetensors`` package: files it writes are read by ours, files ours writes load with it.

BF16 test files are written through ``safetensors.serialize_file`` with a
``TensorSpec(dtype="bfloat16")`` over uint16 bit patterns (``safetensors.numpy.save_file``
takes a numpy dtype, and numpy has no bfloat16 without ml_dtypes); they are checked against
reference bit patterns, never against torch.

``pipeline.io.safetensors`` is imported by the ``sio`` fixture, not at module import:
importing anything under ``pipeline.io`` runs ``pipeline/io/__init__.py``, which loads dask
and zarr.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
from safetensors.numpy import load_file, save_file

from pipeline.errors import InputError

RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def sio() -> Any:
    import pipeline.io.safetensors as module

    return module


def locate(path: Any) -> Any:
    from pipeline.io.stores import locate as _locate

    return _locate(str(path))


def save_bf16(path: Path, bits: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """A file of BF16 tensors (given as uint16 bit patterns), written by safetensors."""
    specs = {
        name: safetensors.TensorSpec(
            dtype="bfloat16", shape=list(u.shape), data_ptr=u.ctypes.data, data_len=u.nbytes
        )
        for name, u in bits.items()
    }
    safetensors.serialize_file(specs, str(path), metadata=metadata)


def raw_file(path: Path, header: Any, data: bytes = b"", length: int | None = None) -> Path:
    """A hand-made file: length prefix (``length`` or the header's), header, data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + text + data)
    return path


def model_tensors() -> dict[str, np.ndarray]:
    """Tensors of a small model: a matrix, a bias (1-D), a conv kernel (4-D), an int buffer."""
    return {
        "layer.weight": RNG.standard_normal((12, 5)).astype(np.float32),
        "layer.bias": RNG.standard_normal(12).astype(np.float32),
        "conv.weight": RNG.standard_normal((4, 3, 3, 2)).astype(np.float32),
        "position_ids": np.arange(7, dtype=np.int64),
    }


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize(
    "code,dtype", [("F64", np.float64), ("F32", np.float32), ("F16", np.float16)]
)
def test_float_tensors_round_trip_in_their_dtype(sio, tmp_path, code, dtype):
    tensors = {k: v.astype(dtype) for k, v in model_tensors().items() if v.dtype.kind == "f"}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "np"})

    ckpt = sio.open_checkpoint(locate(tmp_path / "m.safetensors"))

    assert set(ckpt.tensors) == set(tensors)
    assert ckpt.metadata == {"format": "np"}
    assert ckpt.files == (str(tmp_path / "m.safetensors"),)
    for name, ref in tensors.items():
        info = ckpt.tensors[name]
        assert (info.dtype, info.shape, info.size) == (code, ref.shape, ref.size)
        assert info.nbytes == ref.nbytes
        got = sio.read_tensor(ckpt, name)
        assert got.dtype == dtype and got.shape == ref.shape
        np.testing.assert_array_equal(got, ref)
    assert ckpt.params() == sum(v.size for v in tensors.values())
    assert ckpt.total_bytes == sum(v.nbytes for v in tensors.values())


def test_tensors_come_in_file_order(sio, tmp_path):
    save_file(model_tensors(), tmp_path / "m.safetensors")
    ckpt = sio.open_checkpoint(locate(tmp_path / "m.safetensors"))
    starts = [t.start for t in ckpt.tensors.values()]
    assert starts == sorted(starts)


# bfloat16 bit patterns and the float32 each one is (the upper half of that float32)
BF16_REFERENCE = [
    (0x3F80, 1.0),
    (0xC040, -3.0),
    (0x4049, 3.140625),
    (0x0000, 0.0),
    (0x8000, -0.0),
    (0x7F7F, 3.3895313892515355e38),  # largest finite
    (0x0080, 1.1754943508222875e-38),  # smallest normal
    (0x0001, 9.183549615799121e-41),  # smallest subnormal
    (0x7F80, np.inf),
    (0xFF80, -np.inf),
]


def test_bf16_decodes_exactly_to_float32(sio, tmp_path):
    bits = np.array([b for b, _ in BF16_REFERENCE] + [0x7FC0, 0xFFC1], dtype=np.uint16)
    save_bf16(tmp_path / "bf.safetensors", {"w": bits.reshape(3, 4)})

    ckpt = sio.open_checkpoint(locate(tmp_path / "bf.safetensors"))
    got = sio.read_tensor(ckpt, "w")

    assert ckpt.tensors["w"].dtype == "BF16" and got.dtype == np.float32
    assert got.shape == (3, 4)
    flat = got.ravel()
    np.testing.assert_array_equal(flat[:-2], np.array([v for _, v in BF16_REFERENCE], "f4"))
    assert np.signbit(flat[4]) and np.isnan(flat[-2:]).all()
    # exact: every decoded float32 is the pattern shifted into the upper half
    np.testing.assert_array_equal(flat.view(np.uint32), bits.astype(np.uint32) << 16)


def test_bf16_decode_of_every_pattern_is_exact(sio):
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    np.testing.assert_array_equal(
        sio.bf16_to_float32(bits).view(np.uint32), bits.astype(np.uint32) << 16
    )
    back = sio.float32_to_bf16(sio.bf16_to_float32(bits))
    finite = ~np.isnan(sio.bf16_to_float32(bits))
    np.testing.assert_array_equal(back[finite], bits[finite])  # exact values survive
    assert np.isnan(sio.bf16_to_float32(back[~finite])).all()  # NaN stays NaN


@pytest.mark.parametrize(
    "value,expected",
    [
        (np.float32(1.0), 0x3F80),
        (np.float32(1 + 2**-8), 0x3F80),  # tie → even (down)
        (np.float32(1 + 3 * 2**-8), 0x3F82),  # tie → even (up)
        (np.float32(1 + 2**-8 + 2**-20), 0x3F81),  # above the tie → up
        (np.float32(-(1 + 2**-8 + 2**-20)), 0xBF81),
        (np.float32(3.4e38), 0x7F80),  # beyond bf16's largest finite → inf
        (np.float32(np.inf), 0x7F80),
        (np.float32(-np.inf), 0xFF80),
        (np.float32(-0.0), 0x8000),
        (np.float32(2**-134), 0x0000),  # half the smallest subnormal: tie → 0
        (np.float32(3 * 2**-134), 0x0002),  # 1.5 × smallest subnormal: tie → even (2)
        # float64 is rounded once: via float32 the tie 1 + 2**-8 would round down twice
        (np.float64(1 + 2**-8 + 2**-30), 0x3F81),
        (np.float64(1e39), 0x7F80),
        (np.float64(-1e-50), 0x8000),
    ],
)
def test_float32_to_bf16_rounds_to_nearest_even(sio, value, expected):
    assert int(sio.float32_to_bf16(np.array([value]))[0]) == expected


def test_float32_to_bf16_keeps_nan(sio):
    # a signalling NaN whose payload is all in the lower half must not become inf
    nan_low = np.array([0x7F800001, 0xFFC00000], dtype=np.uint32).view(np.float32)
    out = sio.float32_to_bf16(np.concatenate([nan_low, [np.float32(np.nan)]]))
    assert np.isnan(sio.bf16_to_float32(out)).all()
    assert np.isnan(sio.bf16_to_float32(sio.float32_to_bf16(np.array([np.nan])))).all()


def reference_bf16(x: np.ndarray) -> np.ndarray:
    """Correct round-to-nearest-even to 8 significant bits, for normal-range values:
    frexp's mantissa scaled by 2**8 is exact in float64, numpy's round is ties-to-even."""
    m, e = np.frexp(x.astype(np.float64))
    return np.ldexp(np.round(m * 2**8), e - 8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_to_bf16_matches_reference_rounding(sio, dtype):
    x = RNG.standard_normal(20_000) * np.exp(RNG.uniform(-40, 40, 20_000))
    # ties and near-ties: bf16 values plus half an ulp, ± a little
    grid = sio.bf16_to_float32(RNG.integers(0x0080, 0x7F00, 5_000).astype(np.uint16))
    half_ulp = np.ldexp(1.0, np.frexp(grid.astype(np.float64))[1] - 9)
    ties = np.concatenate([grid + half_ulp, grid + half_ulp * (1 + 2**-20), -grid - half_ulp])
    x = np.concatenate([x, ties]).astype(dtype)
    got = sio.bf16_to_float32(sio.float32_to_bf16(x)).astype(np.float64)
    np.testing.assert_array_equal(got, reference_bf16(x))


@pytest.mark.parametrize("rows", [(0, 12), (0, 1), (3, 7), (11, 12), (5, 5)])
def test_row_range_reads(sio, tmp_path, rows):
    tensors = model_tensors()
    save_file(tensors, tmp_path / "m.safetensors")
    ckpt = sio.open_checkpoint(locate(tmp_path / "m.safetensors"))
    r0, r1 = rows
    np.testing.assert_array_equal(
        sio.read_tensor(ckpt, "layer.weight", rows=rows), tensors["layer.weight"][r0:r1]
    )
    np.testing.assert_array_equal(
        sio.read_tensor(ckpt, "conv.weight", rows=(1, 3)), tensors["conv.weight"][1:3]
    )
    np.testing.assert_array_equal(
        sio.read_tensor(ckpt, "layer.bias", rows=rows), tensors["layer.bias"][r0:r1]
    )


def test_bf16_row_range(sio, tmp_path):
    bits = RNG.integers(0, 0x7F00, (6, 4)).astype(np.uint16)
    save_bf16(tmp_path / "bf.safetensors", {"w": bits})
    ckpt = sio.open_checkpoint(locate(tmp_path / "bf.safetensors"))
    got = sio.read_tensor(ckpt, "w", rows=(2, 5))
    np.testing.assert_array_equal(got.view(np.uint32), bits[2:5].astype(np.uint32) << 16)


@pytest.mark.parametrize("rows", [(-1, 2), (3, 2), (0, 13)])
def test_rows_outside_the_tensor_are_a_value_error(sio, tmp_path, rows):
    save_file(model_tensors(), tmp_path / "m.safetensors")
    ckpt = sio.open_checkpoint(locate(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="rows must satisfy"):
        sio.read_tensor(ckpt, "layer.weight", rows=rows)


def test_read_tensor_refuses_non_float_and_unknown_names(sio, tmp_path):
    save_file(model_tensors(), tmp_path / "m.safetensors")
    ckpt = sio.open_checkpoint(locate(tmp_path / "m.safetensors"))
    with pytest.raises(InputError) as info:
        sio.read_tensor(ckpt, "position_ids")
    assert str(info.value) == (
        "input.url: tensor 'position_ids' has dtype I64, which cannot be factorized "
        "(float tensors only)"
    )
    with pytest.raises(InputError, match=r"^input\.url: .* has no tensor named 'nope'$"):
        sio.read_tensor(ckpt, "nope")


def test_read_bytes_is_the_raw_tensor(sio, tmp_path):
    tensors = model_tensors()
    save_file(tensors, tmp_path / "m.safetensors")
    bits = RNG.integers(0, 2**16, (3, 5)).astype(np.uint16)
    save_bf16(tmp_path / "bf.safetensors", {"w": bits})
    ckpt = sio.open_checkpoint(locate(tmp_path / "m.safetensors"))
    for name, ref in tensors.items():
        assert sio.read_bytes(ckpt, name) == ref.astype(ref.dtype.newbyteorder("<")).tobytes()
    bf = sio.open_checkpoint(locate(tmp_path / "bf.safetensors"))
    assert sio.read_bytes(bf, "w") == bits.astype("<u2").tobytes()


def write_hf_shards(folder: Path, shards: list[dict[str, np.ndarray]], base: str = "model"):
    """Hugging Face's sharded layout, shards written by safetensors."""
    folder.mkdir(exist_ok=True)
    weight_map = {}
    for i, tensors in enumerate(shards, 1):
        name = f"{base}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    total = sum(v.nbytes for s in shards for v in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{base}.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def test_sharded_checkpoint_in_hf_layout(sio, tmp_path):
    t = model_tensors()
    shards = [
        {"layer.weight": t["layer.weight"], "layer.bias": t["layer.bias"]},
        {"conv.weight": t["conv.weight"]},
        {"position_ids": t["position_ids"]},
    ]
    weight_map = write_hf_shards(tmp_path / "ckpt", shards)

    for at in (tmp_path / "ckpt", tmp_path / "ckpt" / "model.safetensors.index.json"):
        ckpt = sio.open_checkpoint(locate(at))
        assert ckpt.files == tuple(
            str(tmp_path / "ckpt" / f) for f in dict.fromkeys(weight_map.values())
        )
        assert set(ckpt.tensors) == set(t)
        for name, info in ckpt.tensors.items():
            assert info.file == str(tmp_path / "ckpt" / weight_map[name])
        np.testing.assert_array_equal(sio.read_tensor(ckpt, "conv.weight"), t["conv.weight"])
        np.testing.assert_array_equal(
            sio.read_tensor(ckpt, "layer.weight", rows=(2, 4)), t["layer.weight"][2:4]
        )
        assert ckpt.metadata == {"format": "pt"}


def test_folder_with_single_file(sio, tmp_path):
    (tmp_path / "m").mkdir()
    save_file(model_tensors(), tmp_path / "m" / "model.safetensors")
    ckpt = sio.open_checkpoint(locate(tmp_path / "m"))
    assert ckpt.files == (str(tmp_path / "m" / "model.safetensors"),)


# --------------------------------------------------------------------------- refusals


def _missing(tmp: Path) -> Path:
    return tmp / "nothing.safetensors"


def _empty_folder(tmp: Path) -> Path:
    (tmp / "folder").mkdir()
    (tmp / "folder" / "config.json").write_text("{}")
    return tmp / "folder"


def _truncated(tmp: Path) -> Path:
    save_file(model_tensors(), tmp / "m.safetensors")
    data = (tmp / "m.safetensors").read_bytes()
    (tmp / "m.safetensors").write_bytes(data[:-10])
    return tmp / "m.safetensors"


def _tiny(tmp: Path) -> Path:
    (tmp / "m.safetensors").write_bytes(b"abc")
    return tmp / "m.safetensors"


def _header_beyond_file(tmp: Path) -> Path:
    return raw_file(tmp / "m.safetensors", b"{}" + b" " * 110, length=9 * 10**18)


def _bad_json(tmp: Path) -> Path:
    return raw_file(tmp / "m.safetensors", b'{"w": {"dtype": "F32", ', b"\0" * 8)


def _json_list(tmp: Path) -> Path:
    return raw_file(tmp / "m.safetensors", [1, 2])


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _unknown_dtype(tmp: Path) -> Path:
    return raw_file(tmp / "m.safetensors", {"w": _entry(dtype="Q8")}, b"\0" * 8)


def _offsets_vs_shape(tmp: Path) -> Path:
    return raw_file(tmp / "m.safetensors", {"w": _entry(shape=(3,))}, b"\0" * 12)


def _bad_shape(tmp: Path) -> Path:
    return raw_file(tmp / "m.safetensors", {"w": _entry(shape=(-2,))}, b"\0" * 8)


def _overlap(tmp: Path) -> Path:
    header = {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}
    return raw_file(tmp / "m.safetensors", header, b"\0" * 12)


def _outside(tmp: Path) -> Path:
    return raw_file(tmp / "m.safetensors", {"w": _entry(offsets=(8, 16))}, b"\0" * 8)


def _bad_metadata(tmp: Path) -> Path:
    header = {"__metadata__": {"n": 3}, "w": _entry()}
    return raw_file(tmp / "m.safetensors", header, b"\0" * 8)


def _duplicate_key(tmp: Path) -> Path:
    text = b'{"w": ' + json.dumps(_entry()).encode() + b', "w": ' + json.dumps(_entry()).encode()
    return raw_file(tmp / "m.safetensors", text + b"}", b"\0" * 8)


def _index_missing_shard(tmp: Path) -> Path:
    write_hf_shards(tmp / "c", [{"a": np.zeros(2, "f4")}, {"b": np.zeros(2, "f4")}])
    (tmp / "c" / "model-00002-of-00002.safetensors").unlink()
    return tmp / "c"


def _index_tensor_not_in_shard(tmp: Path) -> Path:
    write_hf_shards(tmp / "c", [{"a": np.zeros(2, "f4")}, {"b": np.zeros(2, "f4")}])
    index = json.loads((tmp / "c" / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    (tmp / "c" / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp / "c"


def _name_in_two_shards(tmp: Path) -> Path:
    write_hf_shards(tmp / "c", [{"a": np.zeros(2, "f4")}, {"b": np.zeros(2, "f4")}])
    save_file(
        {"a": np.ones(2, "f4"), "b": np.ones(2, "f4")},
        tmp / "c" / "model-00002-of-00002.safetensors",
    )
    return tmp / "c"


def _index_without_weight_map(tmp: Path) -> Path:
    (tmp / "c").mkdir()
    (tmp / "c" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return tmp / "c"


def _index_bad_json(tmp: Path) -> Path:
    (tmp / "c").mkdir()
    (tmp / "c" / "model.safetensors.index.json").write_text('{"weight_map": ')
    return tmp / "c"


def _index_escaping_folder(tmp: Path) -> Path:
    (tmp / "c").mkdir()
    save_file({"a": np.zeros(2, "f4")}, tmp / "outside.safetensors")
    index = {"weight_map": {"a": "../outside.safetensors"}}
    (tmp / "c" / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp / "c"


REFUSALS = [
    (_missing, r"'{p}' does not exist$"),
    (
        _empty_folder,
        r"'{p}' is a folder without model\.safetensors or model\.safetensors\.index\.json",
    ),
    (
        _truncated,
        r"'{p}' is truncated: tensor '[\w.]+' ends at byte \d+ but the file has \d+ bytes$",
    ),
    (_tiny, r"'{p}' is not a safetensors file \(3 bytes; one starts with an 8-byte header"),
    (
        _header_beyond_file,
        r"'{p}' is not a safetensors file \(header length 9000000000000000000 exceeds the "
        r"file's 120 bytes\)$",
    ),
    (_bad_json, r"'{p}' is not a safetensors header: its header is not valid JSON \("),
    (_json_list, r"'{p}' is not a safetensors header: its header is a JSON list, not an object$"),
    (
        _unknown_dtype,
        r"'{p}' is not a valid safetensors file: tensor 'w' has unknown dtype code 'Q8'",
    ),
    (
        _offsets_vs_shape,
        r"tensor 'w': data_offsets \[0, 8\] hold 8 bytes, but shape \[3\] of F32 needs 12$",
    ),
    (_bad_shape, r"tensor 'w' has shape \[-2\], not a list of non-negative integers$"),
    (_overlap, r"'{p}' is not a valid safetensors file: tensors 'a' and 'b' overlap$"),
    (_outside, r"'{p}' is truncated: tensor 'w' ends at byte \d+ but the file has \d+ bytes$"),
    (_bad_metadata, r"'{p}' has __metadata__ that is not a \{{str: str\}} map$"),
    (_duplicate_key, r"header is not valid JSON \(ValueError: key 'w' appears twice\)$"),
    (
        _index_missing_shard,
        r"'{p}/model\.safetensors\.index\.json' names shard "
        r"'model-00002-of-00002\.safetensors', which does not exist$",
    ),
    (
        _index_tensor_not_in_shard,
        r"index\.json' puts tensor 'ghost' in 'model-00001-of-00002\.safetensors', which does "
        r"not hold it$",
    ),
    (
        _name_in_two_shards,
        r"'{p}' holds tensor 'a' twice, in "
        r"'{p}/model-00001-of-00002\.safetensors' and '{p}/model-00002-of-00002\.safetensors'$",
    ),
    (_index_without_weight_map, r"is not a safetensors index: it has no weight_map of"),
    (_index_bad_json, r"is not a safetensors index: its index is not valid JSON"),
    (
        _index_escaping_folder,
        r"names shard '\.\./outside\.safetensors' outside the index's folder$",
    ),
]


@pytest.mark.parametrize("build,pattern", REFUSALS, ids=[b.__name__[1:] for b, _ in REFUSALS])
def test_open_checkpoint_refuses_with_one_line(sio, tmp_path, build, pattern):
    import re

    path = build(tmp_path)
    with pytest.raises(InputError) as info:
        sio.open_checkpoint(locate(path), "input.url")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("input.url: ")
    assert re.search(pattern.format(p=re.escape(str(path))), message), message


def test_refusals_name_the_field_given(sio, tmp_path):
    with pytest.raises(InputError, match=r"^model\.url: '.*nothing\.safetensors' does not exist$"):
        sio.open_checkpoint(locate(_missing(tmp_path)), "model.url")


def test_a_file_shortened_after_opening_is_refused_on_read(sio, tmp_path):
    save_file(model_tensors(), tmp_path / "m.safetensors")
    ckpt = sio.open_checkpoint(locate(tmp_path / "m.safetensors"))
    last = max(ckpt.tensors.values(), key=lambda t: t.end)
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: last.start + 2])
    with pytest.raises(
        InputError, match=r"^input\.url: '.*' is truncated \(bytes \d+–\d+ asked, 2 read\)$"
    ):
        sio.read_bytes(ckpt, last.name)


@pytest.mark.parametrize(
    "error,raised",
    [(TimeoutError("read timed out"), TimeoutError), (PermissionError("denied"), InputError)],
)
def test_read_errors_transient_propagate_others_are_input_errors(sio, tmp_path, error, raised):
    """A timeout reading a tensor stays a timeout (its task is retried); a permission error
    is the user's to fix."""
    save_file(model_tensors(), tmp_path / "m.safetensors")
    ckpt = sio.open_checkpoint(locate(tmp_path / "m.safetensors"))

    class Failing:
        def cat_file(self, *args, **kwargs):
            raise error

    broken = type(ckpt)(ckpt.display, Failing(), ckpt.files, ckpt.tensors, ckpt.metadata)
    with pytest.raises(raised) as info:
        sio.read_tensor(broken, "layer.weight")
    if raised is InputError:
        assert str(info.value) == (
            f"input.url: cannot read '{ckpt.display}': PermissionError: denied"
        )


# --------------------------------------------------------------------------- bytes read


def counting_location(path: Path) -> tuple[Any, list[tuple[str, int | None, int | None, int]]]:
    """A :class:`Location` on a local filesystem that records every ``cat_file`` (path,
    start, end, bytes returned) and refuses any other way of opening a file for reading."""
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.io.stores import Location

    reads: list[tuple[str, int | None, int | None, int]] = []

    class CountingFileSystem(LocalFileSystem):
        cachable = False  # an instance of its own, not fsspec's cached one

        def cat_file(self, path, start=None, end=None, **kwargs):
            self._in_cat = True
            try:
                data = super().cat_file(path, start=start, end=end, **kwargs)
            finally:
                self._in_cat = False
            reads.append((Path(path).name, start, end, len(data)))
            return data

        def _open(self, path, mode="rb", **kwargs):
            assert getattr(self, "_in_cat", False) or "r" not in mode, "read outside cat_file"
            return super()._open(path, mode=mode, **kwargs)

    return Location(str(path), str(path), CountingFileSystem(), {}), reads


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_open_reads_headers_only_and_read_tensor_its_range(sio, tmp_path):
    tensors = {"big": RNG.standard_normal((400, 300)).astype(np.float32), **model_tensors()}
    save_file(tensors, tmp_path / "m.safetensors")
    n = header_length(tmp_path / "m.safetensors")
    at, reads = counting_location(tmp_path / "m.safetensors")

    ckpt = sio.open_checkpoint(at)
    assert reads == [("m.safetensors", 0, 8, 8), ("m.safetensors", 8, 8 + n, n)]

    reads.clear()
    sio.read_tensor(ckpt, "layer.weight")
    info = ckpt.tensors["layer.weight"]
    assert reads == [("m.safetensors", info.start, info.end, info.nbytes)]

    reads.clear()
    np.testing.assert_array_equal(
        sio.read_tensor(ckpt, "big", rows=(10, 13)), tensors["big"][10:13]
    )
    big = ckpt.tensors["big"]
    assert reads == [("m.safetensors", big.start + 10 * 1200, big.start + 13 * 1200, 3 * 1200)]

    reads.clear()
    sio.read_bytes(ckpt, "position_ids")
    assert [r[3] for r in reads] == [56]


def test_sharded_open_reads_the_index_and_shard_headers_only(sio, tmp_path):
    t = model_tensors()
    write_hf_shards(
        tmp_path / "c", [{"layer.weight": t["layer.weight"]}, {"conv.weight": t["conv.weight"]}]
    )
    at, reads = counting_location(tmp_path / "c")
    index = tmp_path / "c" / "model.safetensors.index.json"
    shard1, shard2 = (tmp_path / "c" / f"model-0000{i}-of-00002.safetensors" for i in (1, 2))

    sio.open_checkpoint(at)

    n1, n2 = header_length(shard1), header_length(shard2)
    size = index.stat().st_size
    assert reads == [
        (index.name, 0, size, size),
        (shard1.name, 0, 8, 8),
        (shard1.name, 8, 8 + n1, n1),
        (shard2.name, 0, 8, 8),
        (shard2.name, 8, 8 + n2, n2),
    ]


def test_memory_filesystem_as_a_remote_store(sio, tmp_path):
    """A non-local fsspec filesystem (``memory://``) through the same calls."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/zf-safetensors-test-{tmp_path.name}"
    try:
        t = model_tensors()
        write_hf_shards(
            tmp_path / "c", [{"layer.weight": t["layer.weight"]}, {"conv.weight": t["conv.weight"]}]
        )
        for f in (tmp_path / "c").iterdir():
            fs.pipe(f"{root}/c/{f.name}", f.read_bytes())
        ckpt = sio.open_checkpoint(locate(f"memory://{root}/c"))
        assert ckpt.display == f"memory://{root}/c"
        np.testing.assert_array_equal(
            sio.read_tensor(ckpt, "conv.weight", rows=(1, 2)), t["conv.weight"][1:2]
        )
        with pytest.raises(InputError, match="does not exist"):
            sio.open_checkpoint(locate(f"memory://{root}/nothing"))
    finally:
        fs.rm(root, recursive=True)


# --------------------------------------------------------------------------- writing


def outputs(sio, tensors: dict[str, tuple[np.ndarray, str]]) -> list:
    """:class:`TensorOut` of ``{name: (array, code)}``, bytes made when asked."""
    return [
        sio.TensorOut(
            name,
            code,
            x.shape,
            x.size * sio.DTYPE_BITS[code] // 8,
            lambda x=x, code=code: sio.encode(x, code),
        )
        for name, (x, code) in tensors.items()
    ]


def test_write_checkpoint_single_file_loads_with_safetensors(sio, tmp_path):
    import fsspec

    t = model_tensors()
    spec = {name: (x, {"f": "F32", "i": "I64"}[x.dtype.kind]) for name, x in t.items()}
    spec["half"] = (t["layer.weight"], "F16")
    spec["double"] = (t["layer.bias"], "F64")
    meta = {"format": "np", "zarr_factorize": json.dumps({"shapes": {}})}

    names = sio.write_checkpoint(
        fsspec.filesystem("file"), str(tmp_path / "out"), "compressed", outputs(sio, spec), meta
    )

    assert names == ["compressed.safetensors"]
    path = tmp_path / "out" / "compressed.safetensors"
    assert (8 + header_length(path)) % 8 == 0  # data aligned, as safetensors writes it
    loaded = load_file(path)
    assert list(loaded) == list(spec)
    for name, (x, code) in spec.items():
        np.testing.assert_array_equal(loaded[name], x.astype(sio.NUMPY_DTYPES[code]))
    with safetensors.safe_open(path, framework="numpy") as f:
        assert f.metadata() == meta
    ckpt = sio.open_checkpoint(locate(tmp_path / "out"), basename="compressed")
    assert ckpt.metadata == meta and list(ckpt.tensors) == list(spec)


def test_write_checkpoint_bf16_is_read_back_by_safetensors(sio, tmp_path):
    import fsspec

    x = RNG.standard_normal((5, 7))
    sio.write_checkpoint(
        fsspec.filesystem("file"), str(tmp_path), "c", outputs(sio, {"w": (x, "BF16")}), {}
    )
    ((name, view),) = safetensors.deserialize((tmp_path / "c.safetensors").read_bytes())
    assert (name, view["dtype"], view["shape"]) == ("w", "BF16", [5, 7])
    bits = np.frombuffer(view["data"], "<u2").reshape(5, 7)
    np.testing.assert_array_equal(bits, sio.float32_to_bf16(x))
    np.testing.assert_array_equal(sio.bf16_to_float32(bits), reference_bf16(x).astype(np.float32))


def test_write_checkpoint_shards_in_hf_layout(sio, tmp_path):
    import fsspec

    t = model_tensors()  # 240 + 48 + 288 + 56 bytes
    spec = {name: (x, {"f": "F32", "i": "I64"}[x.dtype.kind]) for name, x in t.items()}

    names = sio.write_checkpoint(
        fsspec.filesystem("file"),
        str(tmp_path),
        "compressed",
        outputs(sio, spec),
        {"k": "v"},
        max_shard_bytes=290,
    )

    shards = [f"compressed-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert names == [*shards, "compressed.safetensors.index.json"]
    index = json.loads((tmp_path / "compressed.safetensors.index.json").read_text())
    assert index == {
        "metadata": {"total_size": 632},
        "weight_map": {
            "layer.weight": shards[0],
            "layer.bias": shards[0],
            "conv.weight": shards[1],  # alone: with the bias before it, 576 > 290
            "position_ids": shards[2],
        },
    }
    for shard in shards:
        with safetensors.safe_open(tmp_path / shard, framework="numpy") as f:
            assert f.metadata() == {"k": "v"}
            for name in f.keys():
                np.testing.assert_array_equal(f.get_tensor(name), t[name])
    ckpt = sio.open_checkpoint(locate(tmp_path), basename="compressed")
    assert list(ckpt.tensors) == list(t) and ckpt.metadata == {"k": "v"}


def test_write_checkpoint_streams_one_tensor_at_a_time(sio, tmp_path):
    """The header is written before any ``data()`` is made; each tensor is written before
    the next one is made."""
    from fsspec.implementations.local import LocalFileSystem

    events: list[str] = []

    class RecordingFileSystem(LocalFileSystem):
        cachable = False

        def _open(self, path, mode="rb", **kwargs):
            f = super()._open(path, mode=mode, **kwargs)
            write = f.write

            def recorded(data):
                events.append(f"write {len(data)}")
                return write(data)

            f.write = recorded
            return f

    def made(name, x):
        def data():
            events.append(f"data {name}")
            return x.tobytes()

        return sio.TensorOut(name, "F32", x.shape, x.nbytes, data)

    a, b = np.zeros((3, 2), "f4"), np.ones(5, "f4")
    sio.write_checkpoint(
        RecordingFileSystem(), str(tmp_path), "m", [made("a", a), made("b", b)], {}
    )
    assert events[1:] == ["data a", "write 24", "data b", "write 20"]
    assert events[0].startswith("write ")


@pytest.mark.parametrize(
    "tensor,metadata,pattern",
    [
        (("w", "F32", (2, 3), 20), {}, r"nbytes 20 does not match shape \(2, 3\) of F32"),
        (("w", "Q8", (2,), 2), {}, r"unknown dtype code 'Q8'"),
        (("w", "F32", (2,), 8), {"n": 3}, r"metadata must map str to str"),
    ],
    ids=["nbytes", "dtype", "metadata"],
)
def test_write_checkpoint_refuses_inconsistent_outputs(sio, tmp_path, tensor, metadata, pattern):
    import fsspec

    out = sio.TensorOut(*tensor, data=lambda: b"")
    with pytest.raises(ValueError, match=pattern):
        sio.write_checkpoint(fsspec.filesystem("file"), str(tmp_path), "m", [out], metadata)


def test_write_checkpoint_refuses_data_of_another_length(sio, tmp_path):
    import fsspec

    out = sio.TensorOut("w", "F32", (2,), 8, lambda: b"\0" * 4)
    with pytest.raises(ValueError, match=r"data\(\) returned 4 bytes, 8 declared"):
        sio.write_checkpoint(fsspec.filesystem("file"), str(tmp_path), "m", [out], {})


# --------------------------------------------------------------------------- load_compressed


def compressed(sio, folder: Path, factor_code: str, max_shard_bytes: int = 2**30):
    """What ``compress`` writes: a linear layer and a conv kernel as factor pairs, a bias
    and an int buffer unchanged, original shapes in ``__metadata__["zarr_factorize"]``."""
    import fsspec

    b_lin, a_lin = RNG.standard_normal((12, 2)), RNG.standard_normal((2, 5))
    b_conv, a_conv = RNG.standard_normal((4, 3)), RNG.standard_normal((3, 18))
    bias = RNG.standard_normal(12).astype(np.float32)
    ids = np.arange(7, dtype=np.int64)
    spec = {
        "layer.weight.lowrank_B": (b_lin, factor_code),
        "layer.weight.lowrank_A": (a_lin, factor_code),
        "layer.bias": (bias, "F32"),
        "conv.weight.lowrank_B": (b_conv, factor_code),
        "conv.weight.lowrank_A": (a_conv, factor_code),
        "position_ids": (ids, "I64"),
    }
    shapes = {"layer.weight": [12, 5], "conv.weight": [4, 3, 3, 2]}
    meta = {"zarr_factorize": json.dumps({"shapes": shapes, "version": 1})}
    sio.write_checkpoint(
        fsspec.filesystem("file"),
        str(folder),
        "compressed",
        outputs(sio, spec),
        meta,
        max_shard_bytes=max_shard_bytes,
    )
    stored = {name: _as_stored(sio, x, code) for name, (x, code) in spec.items()}
    return stored


def _as_stored(sio, x: np.ndarray, code: str) -> np.ndarray:
    if code == "BF16":
        return sio.bf16_to_float32(sio.float32_to_bf16(x))
    return x.astype(sio.NUMPY_DTYPES[code])


@pytest.mark.parametrize(
    "code,dtype",
    [("F32", np.float32), ("BF16", np.float32), ("F16", np.float32), ("F64", np.float64)],
)
@pytest.mark.parametrize("max_shard_bytes", [2**30, 100])
def test_load_compressed_dense(sio, tmp_path, code, dtype, max_shard_bytes):
    stored = compressed(sio, tmp_path / "out", code, max_shard_bytes)

    got = sio.load_compressed(str(tmp_path / "out"))

    assert list(got) == ["layer.weight", "layer.bias", "conv.weight", "position_ids"]
    for base, shape in (("layer.weight", (12, 5)), ("conv.weight", (4, 3, 3, 2))):
        b, a = stored[f"{base}.lowrank_B"], stored[f"{base}.lowrank_A"]
        expected = (b.astype(dtype) @ a.astype(dtype)).reshape(shape)
        assert got[base].dtype == dtype and got[base].shape == shape
        np.testing.assert_allclose(got[base], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got["layer.bias"], stored["layer.bias"])
    assert got["position_ids"].dtype == np.int64
    np.testing.assert_array_equal(got["position_ids"], np.arange(7))


def test_load_compressed_factors(sio, tmp_path):
    stored = compressed(sio, tmp_path / "out", "BF16")

    got = sio.load_compressed(str(tmp_path / "out" / "compressed.safetensors"), dense=False)

    b, a = got["conv.weight"]
    assert b.dtype == a.dtype == np.float32 and (b.shape, a.shape) == ((4, 3), (3, 18))
    np.testing.assert_array_equal(b, stored["conv.weight.lowrank_B"])  # BF16 decoded exactly
    np.testing.assert_array_equal(a, stored["conv.weight.lowrank_A"])
    assert isinstance(got["layer.weight"], tuple) and "layer.weight.lowrank_B" not in got


def test_load_compressed_from_a_memory_url(sio, tmp_path):
    import fsspec

    compressed(sio, tmp_path / "out", "F32")
    fs = fsspec.filesystem("memory")
    root = f"/zf-load-compressed-{tmp_path.name}"
    try:
        fs.pipe(
            f"{root}/compressed.safetensors",
            (tmp_path / "out" / "compressed.safetensors").read_bytes(),
        )
        got = sio.load_compressed(f"memory://{root}", {})
        assert got["conv.weight"].shape == (4, 3, 3, 2)
    finally:
        fs.rm(root, recursive=True)


def test_load_compressed_refuses_a_lone_factor(sio, tmp_path):
    save_file({"w.lowrank_A": np.zeros((2, 3), "f4")}, tmp_path / "compressed.safetensors")
    with pytest.raises(
        InputError, match=r"^url: '.*' holds 'w\.lowrank_A' without 'w\.lowrank_B'$"
    ):
        sio.load_compressed(str(tmp_path))
    save_file({"w.lowrank_B": np.zeros((2, 3), "f4")}, tmp_path / "compressed.safetensors")
    with pytest.raises(
        InputError, match=r"^url: '.*' holds 'w\.lowrank_B' without 'w\.lowrank_A'$"
    ):
        sio.load_compressed(str(tmp_path))


def test_load_compressed_refuses_a_shape_the_factors_cannot_take(sio, tmp_path):
    meta = {"zarr_factorize": json.dumps({"shapes": {"w": [4, 4]}})}
    save_file(
        {"w.lowrank_B": np.zeros((3, 2), "f4"), "w.lowrank_A": np.zeros((2, 5), "f4")},
        tmp_path / "compressed.safetensors",
        metadata=meta,
    )
    with pytest.raises(
        InputError, match=r"multiply to \(3, 5\), which cannot take its recorded shape \[4, 4\]$"
    ):
        sio.load_compressed(str(tmp_path))


def test_load_compressed_of_a_missing_url(sio, tmp_path):
    with pytest.raises(InputError, match=r"^url: '.*' does not exist$"):
        sio.load_compressed(str(tmp_path / "nothing"))
