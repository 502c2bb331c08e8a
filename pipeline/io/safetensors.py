"""Read and write safetensors checkpoints by byte ranges, without torch.

The format (https://github.com/huggingface/safetensors, "Format")::

    8 bytes      N, the header length, unsigned little-endian
    N bytes      JSON header: {name: {"dtype": "F32", "shape": [out, in],
                                      "data_offsets": [begin, end]}, ...,
                               "__metadata__": {str: str}}   (optional)
    the rest     the tensors' bytes, row-major, little-endian; ``begin``/``end`` count from
                 the first byte after the header

A model too large for one file is *sharded* the Hugging Face way: a folder holds
``model-00001-of-0000K.safetensors`` … and ``model.safetensors.index.json``,
``{"metadata": {"total_size": N}, "weight_map": {name: shard file}}``.

Why by byte ranges: checkpoints are gigabytes, often on an object store. Opening one
(:func:`open_checkpoint`) reads the headers only (two ranged reads per file: the length,
then the JSON), and :func:`read_tensor` reads one tensor, or rows of it, in one ranged
read. Nothing reads a whole file to learn its layout, and the same ``fs.cat_file(path,
start, end)`` calls serve local files, ``memory://`` and S3 (s3fs).

Everything a user can get wrong in the file (a truncated file, a header that is not JSON,
an unknown dtype code, offsets that do not match the shape, overlapping tensors, an index
naming a shard that is not there) is refused when the checkpoint is opened, with one line
naming the field and the redacted location (:class:`~pipeline.errors.InputError`).

BF16 (bfloat16: the upper 16 bits of a float32) has no numpy dtype. It is decoded exactly
to float32 (``u16 << 16``) and encoded from float32/float64 with round-to-nearest-even, as
torch and ml_dtypes do (:func:`float32_to_bf16`).

:func:`write_checkpoint` writes the same layout: the header first, computed from the
declared sizes, then each tensor's bytes, produced and written one tensor at a time (the
memory held is one tensor). The files load with ``safetensors.safe_open``: the data of a
file is contiguous, in header order, and the header is padded with spaces to a multiple of
8 bytes, as the safetensors package writes it.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.io.stores import Location, is_transient, locate
from pipeline.secrets import redact

__all__ = [
    "FLOAT_CODES",
    "Checkpoint",
    "TensorInfo",
    "TensorOut",
    "bf16_to_float32",
    "encode",
    "float32_to_bf16",
    "load_compressed",
    "open_checkpoint",
    "read_bytes",
    "read_tensor",
    "write_checkpoint",
]

# The dtype codes a tensor may be factorized from (decoded to a numpy float dtype).
FLOAT_CODES = ("F64", "F32", "F16", "BF16")

# Bits per element of every dtype code of the format (safetensors 0.8, ``Dtype``); F4 and
# F6 are packed, several elements to a byte.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

# The codes with a numpy dtype of the same bytes (little-endian). BF16 is stored as uint16.
NUMPY_DTYPES: dict[str, str] = {
    "BOOL": "|b1",
    "U8": "|u1",
    "I8": "|i1",
    "I16": "<i2",
    "U16": "<u2",
    "F16": "<f2",
    "BF16": "<u2",
    "I32": "<i4",
    "U32": "<u4",
    "F32": "<f4",
    "C64": "<c8",
    "F64": "<f8",
    "I64": "<i8",
    "U64": "<u8",
}

# safetensors refuses a header longer than this (``MAX_HEADER_SIZE`` in its Rust crate): a
# larger length is a corrupt or foreign file, and we read no further than the package would.
MAX_HEADER_BYTES = 100_000_000
HEADER_ALIGNMENT = 8  # the package pads its headers with spaces to a multiple of 8 bytes
SINGLE_FILE = "{basename}.safetensors"
INDEX_FILE = "{basename}.safetensors.index.json"
SHARD_FILE = "{basename}-{i:05d}-of-{k:05d}.safetensors"  # Hugging Face's shard names
METADATA_KEY = "__metadata__"
COMPRESSED_METADATA_KEY = "zarr_factorize"  # JSON string: {"shapes": {name: [...]}, ...}
LOWRANK_B, LOWRANK_A = ".lowrank_B", ".lowrank_A"


# --------------------------------------------------------------------------- descriptions


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lies.

    Attributes
    ----------
    name : its name in the header
    dtype : its safetensors dtype code (``"F32"``, ``"BF16"`` …)
    shape : its shape
    file : the path, in the checkpoint's filesystem, of the file holding it
    start, end : its absolute byte offsets in ``file`` (``end`` exclusive)
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    end: int

    @property
    def size(self) -> int:
        """Number of elements (1 for a scalar)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of data in the file."""
        return self.end - self.start


@dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint: its tensors' layout, read from the headers (see
    :func:`open_checkpoint`).

    Attributes
    ----------
    display : the checkpoint's URL, credentials masked, for messages
    fs : the fsspec filesystem its files are on
    files : the paths of its files (one, or the shards in the index's order)
    tensors : ``{name: TensorInfo}``, in file order (shard by shard, by offset)
    metadata : the ``__metadata__`` of its file(s), merged (``str -> str``)
    what : the field that named it, for messages (``input.url``)
    """

    display: str
    fs: Any = field(repr=False, compare=False)
    files: tuple[str, ...]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    what: str = "input.url"

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in all files (headers not counted)."""
        return sum(t.nbytes for t in self.tensors.values())

    def params(self) -> int:
        """Number of elements of all tensors."""
        return sum(t.size for t in self.tensors.values())


# --------------------------------------------------------------------------- opening


def open_checkpoint(
    at: Location, what: str = "input.url", *, basename: str = "model"
) -> Checkpoint:
    """Open the safetensors checkpoint at ``at``, reading its headers only.

    Parameters
    ----------
    at : a ``.safetensors`` file, a ``.safetensors.index.json`` file, or a folder holding
        ``<basename>.safetensors`` or ``<basename>.safetensors.index.json`` (the single file
        wins when both are there, as in ``transformers``)
    what : the field naming ``at`` in messages
    basename : the file name stem looked for in a folder (``compress`` writes ``compressed``)

    Returns
    -------
    Checkpoint

    Raises
    ------
    InputError
        The path is missing or unreachable, a folder holds neither file, a file is not a
        valid safetensors file (truncated, header length beyond the file, bad JSON, unknown
        dtype code, offsets not matching shape × itemsize, overlapping or outside the file),
        or the index is invalid (not JSON, a missing shard, a tensor its shard lacks, a
        name in two shards).
    """
    where = at.display
    if not _exists(at, what):
        raise InputError(f"{what}: {where!r} does not exist")
    if _isdir(at, what):
        return _open_folder(at, what, basename)
    if at.path.endswith(".index.json"):
        return _open_index(at, what)
    return _checkpoint(at, what, [_read_file_header(at, what)])


def _exists(at: Location, what: str) -> bool:
    try:
        return bool(at.fs.exists(at.path))
    except Exception as exc:  # network or credential errors of object stores
        raise InputError(f"{what}: cannot reach {at.display!r}: {_one_line(exc)}") from None


def _isdir(at: Location, what: str) -> bool:
    try:
        return bool(at.fs.isdir(at.path))
    except Exception as exc:
        raise InputError(f"{what}: cannot reach {at.display!r}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    """``exc`` as one line, credentials masked."""
    lines = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)


def _open_folder(at: Location, what: str, basename: str) -> Checkpoint:
    single, index = SINGLE_FILE.format(basename=basename), INDEX_FILE.format(basename=basename)
    if _exists(at.join(single), what):
        return _checkpoint(at, what, [_read_file_header(at.join(single), what)])
    if _exists(at.join(index), what):
        return _open_index(at.join(index), what, root=at)
    raise InputError(
        f"{what}: {at.display!r} is a folder without {single} or {index} "
        "(give a .safetensors file, or a folder holding one of them)"
    )


@dataclass(frozen=True)
class _FileHeader:
    """One file's parsed header: tensors with absolute offsets, and its metadata."""

    path: str
    display: str
    tensors: list[TensorInfo]
    metadata: dict[str, str]


def _read_file_header(at: Location, what: str, missing: str | None = None) -> _FileHeader:
    """The header of the safetensors file at ``at``, checked against the file's size
    (``missing``: the message when there is no such file)."""
    where = at.display
    size = _file_size(at, what, missing)
    if size < 8:
        raise InputError(
            f"{what}: {where!r} is not a safetensors file ({size} bytes; one starts with an "
            "8-byte header length)"
        )
    (n,) = struct.unpack("<Q", _read_range(at.fs, at.path, 0, 8, what, where))
    if n > size - 8:
        raise InputError(
            f"{what}: {where!r} is not a safetensors file (header length {n} exceeds the "
            f"file's {size} bytes)"
        )
    if n > MAX_HEADER_BYTES:
        raise InputError(
            f"{what}: {where!r} is not a safetensors file (header length {n} exceeds the "
            f"format's limit of {MAX_HEADER_BYTES} bytes)"
        )
    header = _parse_json(_read_range(at.fs, at.path, 8, 8 + n, what, where), what, where)
    metadata = _metadata(header.pop(METADATA_KEY, {}), what, where)
    tensors = [
        _tensor_info(name, entry, at.path, 8 + n, what, where) for name, entry in header.items()
    ]
    _check_layout(tensors, size, what, where)
    return _FileHeader(at.path, where, tensors, metadata)


def _file_size(at: Location, what: str, missing: str | None = None) -> int:
    try:
        return int(at.fs.size(at.path))
    except FileNotFoundError:
        raise InputError(missing or f"{what}: {at.display!r} does not exist") from None
    except Exception as exc:
        raise InputError(f"{what}: cannot reach {at.display!r}: {_one_line(exc)}") from None


def _read_range(
    fs: Any, path: str, start: int, end: int, what: str, where: str, *, retryable: bool = False
) -> bytes:
    """Bytes ``[start, end)`` of ``path`` in one request; a short answer is refused.

    ``retryable``: a transient store error (:func:`~pipeline.io.stores.is_transient`) is
    raised as it is, not as an :class:`InputError`, so that the task reading a tensor is
    retried rather than failed as the user's fault.
    """
    if end <= start:
        return b""
    try:
        data = fs.cat_file(path, start=start, end=end)
    except FileNotFoundError:
        raise InputError(f"{what}: {where!r} does not exist") from None
    except Exception as exc:
        if retryable and is_transient(exc):
            raise
        raise InputError(f"{what}: cannot read {where!r}: {_one_line(exc)}") from None
    if len(data) != end - start:
        raise InputError(
            f"{what}: {where!r} is truncated (bytes {start}–{end} asked, {len(data)} read)"
        )
    return data


def _parse_json(raw: bytes, what: str, where: str, kind: str = "header") -> dict[str, Any]:
    """A JSON object from ``raw``; duplicate keys, bad UTF-8 and non-objects are refused."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup is not None:
            raise ValueError(f"key {dup!r} appears twice")
        return dict(pairs)

    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(
            f"{what}: {where!r} is not a safetensors {kind}: its {kind} is not valid JSON "
            f"({_one_line(exc)})"
        ) from None
    if not isinstance(value, dict):
        raise InputError(
            f"{what}: {where!r} is not a safetensors {kind}: its {kind} is a JSON "
            f"{type(value).__name__}, not an object"
        )
    return value


def _metadata(value: Any, what: str, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InputError(f"{what}: {where!r} has __metadata__ that is not a {{str: str}} map")
    return value


def _tensor_info(
    name: str, entry: Any, path: str, data_start: int, what: str, where: str
) -> TensorInfo:
    """One header entry checked: dtype code known, shape and offsets well formed and
    consistent (``end - begin == elements × itemsize``)."""
    bad = f"{what}: {where!r} is not a valid safetensors file: tensor {name!r}"
    if not isinstance(entry, dict):
        raise InputError(f"{bad} is described by a {type(entry).__name__}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise InputError(f"{bad} has unknown dtype code {dtype!r} (known: {', '.join(DTYPE_BITS)})")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise InputError(f"{bad} has shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise InputError(f"{bad} has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if end < begin or bits % 8 or end - begin != bits // 8:
        raise InputError(
            f"{bad}: data_offsets {offsets} hold {end - begin} bytes, but shape {shape} of "
            f"{dtype} needs {bits / 8:g}"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(tensors: list[TensorInfo], size: int, what: str, where: str) -> None:
    """Refuse tensors reaching past the end of the file or overlapping one another (gaps
    between tensors are harmless and allowed)."""
    previous: TensorInfo | None = None
    for t in sorted(tensors, key=lambda t: (t.start, t.end)):
        if t.end > size:
            raise InputError(
                f"{what}: {where!r} is truncated: tensor {t.name!r} ends at byte {t.end} but "
                f"the file has {size} bytes"
            )
        if previous is not None and t.start < previous.end and t.nbytes and previous.nbytes:
            raise InputError(
                f"{what}: {where!r} is not a valid safetensors file: tensors "
                f"{previous.name!r} and {t.name!r} overlap"
            )
        if t.nbytes:
            previous = t


def _open_index(at: Location, what: str, root: Location | None = None) -> Checkpoint:
    """A sharded checkpoint from its ``*.safetensors.index.json`` at ``at``: the index read
    whole (it is small: names only), then each shard's header. ``root``: the location the
    user named (the folder), shown as the checkpoint's ``display``."""
    where = at.display
    index = _parse_json(_read_whole(at, what), what, where, kind="index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InputError(
            f"{what}: {where!r} is not a safetensors index: it has no weight_map of "
            "{tensor name: shard file}"
        )
    folder = at.at(at.path.rpartition("/")[0])
    headers: dict[str, _FileHeader] = {}
    for shard in dict.fromkeys(weight_map.values()):  # the index's order, once each
        if shard.startswith("/") or ".." in shard.split("/"):
            raise InputError(f"{what}: {where!r} names shard {shard!r} outside the index's folder")
        missing = f"{what}: {where!r} names shard {shard!r}, which does not exist"
        headers[shard] = _read_file_header(folder.join(shard), what, missing)
    _check_index_against_shards(weight_map, headers, what, where)
    return _checkpoint(root or at, what, list(headers.values()))


def _read_whole(at: Location, what: str) -> bytes:
    size = _file_size(at, what)
    if size > MAX_HEADER_BYTES:
        raise InputError(
            f"{what}: {at.display!r} is not a safetensors index ({size} bytes, more than "
            f"{MAX_HEADER_BYTES})"
        )
    return _read_range(at.fs, at.path, 0, size, what, at.display)


def _check_index_against_shards(
    weight_map: dict[str, str], headers: dict[str, _FileHeader], what: str, where: str
) -> None:
    """Every name of the index is in the shard it names (``headers``: by shard name)."""
    held = {shard: {t.name for t in h.tensors} for shard, h in headers.items()}
    for name, shard in weight_map.items():
        if name not in held[shard]:
            raise InputError(
                f"{what}: {where!r} puts tensor {name!r} in {shard!r}, which does not hold it"
            )


def _checkpoint(at: Location, what: str, headers: list[_FileHeader]) -> Checkpoint:
    """The :class:`Checkpoint` of ``headers``: tensors in file order, a name in two files
    refused."""
    tensors: dict[str, TensorInfo] = {}
    seen_in: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for h in headers:
        for t in sorted(h.tensors, key=lambda t: (t.start, t.end)):
            if t.name in tensors:
                raise InputError(
                    f"{what}: {at.display!r} holds tensor {t.name!r} twice, in "
                    f"{seen_in[t.name]!r} and {h.display!r}"
                )
            tensors[t.name], seen_in[t.name] = t, h.display
        metadata = {**metadata, **h.metadata}
    return Checkpoint(at.display, at.fs, tuple(h.path for h in headers), tensors, metadata, what)


# --------------------------------------------------------------------------- reading


def read_tensor(ckpt: Checkpoint, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Tensor ``name`` of ``ckpt``, or rows ``[r0, r1)`` of its first axis, in one ranged
    read.

    F64, F32 and F16 come as their numpy dtype (native byte order; read-only, a view of the
    bytes read), BF16 exactly as float32 (:func:`bf16_to_float32`).

    Raises
    ------
    InputError
        No tensor of that name, a dtype other than :data:`FLOAT_CODES`, or a file that
        changed since it was opened (a short read).
    ValueError
        ``rows`` outside the first axis, or given for a scalar.
    TimeoutError, ConnectionError ...
        A transient store error, raised as it is (worth a retry, not the user's fault).
    """
    info = _info(ckpt, name)
    if info.dtype not in FLOAT_CODES:
        raise InputError(
            f"{ckpt.what}: tensor {name!r} has dtype {info.dtype}, which cannot be factorized "
            "(float tensors only)"
        )
    start, end, shape = _row_range(info, rows)
    raw = _read_range(ckpt.fs, info.file, start, end, ckpt.what, ckpt.display, retryable=True)
    return _decode(raw, info.dtype, shape)


def read_bytes(ckpt: Checkpoint, name: str) -> bytes:
    """The raw little-endian bytes of tensor ``name``, any dtype, in one ranged read (for
    tensors copied unchanged)."""
    info = _info(ckpt, name)
    return _read_range(
        ckpt.fs, info.file, info.start, info.end, ckpt.what, ckpt.display, retryable=True
    )


def _info(ckpt: Checkpoint, name: str) -> TensorInfo:
    try:
        return ckpt.tensors[name]
    except KeyError:
        raise InputError(f"{ckpt.what}: {ckpt.display!r} has no tensor named {name!r}") from None


def _row_range(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, int, tuple[int, ...]]:
    """Byte range and shape of rows ``[r0, r1)`` of ``info`` (all of it for ``None``)."""
    if rows is None:
        return info.start, info.end, info.shape
    if not info.shape:
        raise ValueError(f"tensor {info.name!r} is a scalar: it has no rows to select")
    r0, r1 = rows
    if not 0 <= r0 <= r1 <= info.shape[0]:
        raise ValueError(
            f"rows must satisfy 0 <= r0 <= r1 <= {info.shape[0]} for tensor {info.name!r}, "
            f"got {rows}"
        )
    row_bytes = math.prod(info.shape[1:]) * DTYPE_BITS[info.dtype] // 8
    start = info.start + r0 * row_bytes
    return start, start + (r1 - r0) * row_bytes, (r1 - r0, *info.shape[1:])


def _decode(raw: bytes, code: str, shape: tuple[int, ...]) -> np.ndarray:
    """``raw`` as an array of ``shape``: BF16 as float32, other codes as their numpy dtype
    in native byte order."""
    arr = np.frombuffer(raw, dtype=NUMPY_DTYPES[code]).reshape(shape)
    if code == "BF16":
        return bf16_to_float32(arr)
    native = arr.dtype.newbyteorder("=")
    return arr if arr.dtype == native else arr.astype(native)


# --------------------------------------------------------------------------- bfloat16


def bf16_to_float32(u: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as float32, exactly: a bfloat16 is the upper half of
    a float32."""
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16, as uint16 bit patterns: round to nearest, ties to even,
    overflow to ±inf, NaN kept NaN (the rounding of torch and ml_dtypes).

    float64 input is rounded once, correctly: first to float32 *rounding to odd*, which
    with 16 spare bits makes the second rounding exact (Boldo & Melquiond 2008, "Emulation
    of FMA and correctly rounded sums: proved algorithms using rounding to odd"); a plain
    float64 → float32 → bfloat16 would round some ties twice.
    """
    x = np.asarray(x)
    if x.dtype == np.float64:
        u32 = _float32_round_to_odd(x)
    else:
        u32 = x.astype(np.float32).view(np.uint32)  # same itemsize: a view of any layout
    u = u32.astype(np.uint64)  # room for the carry of the rounding, no overflow warning
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    quiet_nan = ((u >> 16) | 0x0040).astype(np.uint16)  # a NaN whose top bits are 0 stays NaN
    return np.where(np.isnan(u32.view(np.float32)), quiet_nan, rounded)


def _float32_round_to_odd(x: np.ndarray) -> np.ndarray:
    """float64 ``x`` as float32 bit patterns (uint32), rounded toward zero with the last
    bit set when inexact ("rounding to odd")."""
    with np.errstate(over="ignore"):  # beyond float32: inf, stepped back below
        nearest = x.astype(np.float32)
    away = np.abs(nearest.astype(np.float64)) > np.abs(x)
    toward_zero = np.where(away, np.nextafter(nearest, np.float32(0)), nearest)
    inexact = (toward_zero.astype(np.float64) != x) & ~np.isnan(x)
    return toward_zero.view(np.uint32) | inexact.astype(np.uint32)


def encode(x: np.ndarray, code: str) -> bytes:
    """``x`` cast to dtype ``code`` (BF16 by :func:`float32_to_bf16`), as the little-endian
    row-major bytes a safetensors file holds.

    Raises
    ------
    ValueError
        A code without a numpy dtype (F8, F6, F4).
    """
    if code == "BF16":
        return float32_to_bf16(x).astype("<u2").tobytes()
    if code not in NUMPY_DTYPES:
        raise ValueError(f"cannot encode dtype code {code!r} (known: {', '.join(NUMPY_DTYPES)})")
    return np.ascontiguousarray(x, dtype=NUMPY_DTYPES[code]).tobytes()


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorOut:
    """A tensor to write: its description, and how to make its bytes when they are due.

    Attributes
    ----------
    name, dtype, shape : as in the header (``dtype`` a code of :data:`DTYPE_BITS`)
    nbytes : the length ``data()`` returns (shape × itemsize)
    data : makes the tensor's little-endian bytes (called once, when it is written)
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    data: Callable[[], bytes] = field(repr=False, compare=False)


def write_checkpoint(
    fs: Any,
    folder: str,
    basename: str,
    tensors: Sequence[TensorOut],
    metadata: dict[str, str],
    max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
    """Write ``tensors`` as a safetensors checkpoint in ``folder`` of ``fs``.

    One ``<basename>.safetensors`` when the data fits ``max_shard_bytes``; else shards
    ``<basename>-00001-of-0000K.safetensors`` (tensors in order, a new shard when the next
    tensor would pass the limit; a larger tensor gets a shard of its own) and
    ``<basename>.safetensors.index.json``. Every file's header holds ``metadata``. Each
    header is written first, from the declared sizes; then each tensor's ``data()`` is
    called and written, one tensor at a time.

    Returns
    -------
    list of str
        The names (in ``folder``) of the files written, the index last.

    Raises
    ------
    ValueError
        Duplicate names, metadata other than ``str -> str``, ``nbytes`` not matching the
        shape and dtype, or ``data()`` returning another length.
    """
    _check_outputs(tensors, metadata)
    groups = _shard_groups(tensors, max_shard_bytes)
    fs.makedirs(folder, exist_ok=True)
    if len(groups) == 1:
        name = SINGLE_FILE.format(basename=basename)
        _write_file(fs, f"{folder.rstrip('/')}/{name}", groups[0], metadata)
        return [name]
    names = [
        SHARD_FILE.format(basename=basename, i=i + 1, k=len(groups)) for i in range(len(groups))
    ]
    for name, group in zip(names, groups, strict=True):
        _write_file(fs, f"{folder.rstrip('/')}/{name}", group, metadata)
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors)},
        "weight_map": {t.name: name for name, g in zip(names, groups, strict=True) for t in g},
    }
    index_name = INDEX_FILE.format(basename=basename)
    with fs.open(f"{folder.rstrip('/')}/{index_name}", "wb") as f:
        f.write(json.dumps(index, indent=2).encode())
    return [*names, index_name]


def _check_outputs(tensors: Sequence[TensorOut], metadata: dict[str, str]) -> None:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map str to str (safetensors' __metadata__)")
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen or t.name == METADATA_KEY:
            raise ValueError(f"tensor name {t.name!r} is used twice or reserved")
        seen.add(t.name)
        if t.dtype not in DTYPE_BITS:
            raise ValueError(f"tensor {t.name!r}: unknown dtype code {t.dtype!r}")
        bits = math.prod(t.shape) * DTYPE_BITS[t.dtype]
        if bits % 8 or bits // 8 != t.nbytes:
            raise ValueError(
                f"tensor {t.name!r}: nbytes {t.nbytes} does not match shape {t.shape} of "
                f"{t.dtype} ({bits / 8:g} bytes)"
            )


def _shard_groups(tensors: Sequence[TensorOut], max_shard_bytes: int) -> list[list[TensorOut]]:
    """``tensors`` cut, in order, into groups of at most ``max_shard_bytes`` of data (a
    larger tensor alone); one group (possibly empty) when all fit."""
    groups: list[list[TensorOut]] = [[]]
    filled = 0
    for t in tensors:
        if groups[-1] and filled + t.nbytes > max_shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(t)
        filled += t.nbytes
    return groups


def _header_bytes(tensors: Sequence[TensorOut], metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header of a file of ``tensors``, data contiguous in
    order, padded with spaces to :data:`HEADER_ALIGNMENT` (so the data starts aligned)."""
    header: dict[str, Any] = {METADATA_KEY: metadata} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text


def _write_file(fs: Any, path: str, tensors: Sequence[TensorOut], metadata: dict[str, str]) -> None:
    with fs.open(path, "wb") as f:
        f.write(_header_bytes(tensors, metadata))
        for t in tensors:
            data = t.data()
            if len(data) != t.nbytes:
                raise ValueError(
                    f"tensor {t.name!r}: data() returned {len(data)} bytes, {t.nbytes} declared"
                )
            f.write(data)


# --------------------------------------------------------------------------- compressed


def load_compressed(
    url: str, storage_options: dict[str, Any] | None = None, *, dense: bool = True
) -> dict[str, np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """Load what ``compress`` wrote: every tensor by name, factor pairs joined.

    Parameters
    ----------
    url : the output folder (holding ``compressed.safetensors`` or
        ``compressed.safetensors.index.json``), or one of those files
    storage_options : fsspec options (credentials as ``${env:NAME}``)
    dense : each ``X.lowrank_B`` / ``X.lowrank_A`` pair becomes ``X``: ``True`` gives
        ``B @ A`` reshaped to X's original shape (``__metadata__["zarr_factorize"]``'s
        ``shapes``), computed and returned in float32 (float64 when a factor is F64);
        ``False`` gives the tuple ``(B, A)`` as stored (BF16 as float32)

    Returns
    -------
    dict
        ``{name: array or (B, A)}`` in file order; tensors that were not factorized come as
        stored (integers and bools included, BF16 as float32).

    Raises
    ------
    InputError
        As :func:`open_checkpoint`, plus a factor without its partner, factors whose
        product does not match the recorded shape, or a dtype numpy cannot hold (F8, F6,
        F4).
    """
    what = "url"
    try:
        at = locate(url, storage_options)
    except (ValueError, ImportError) as exc:
        raise InputError(f"{what}: cannot open {redact(url)!r}: {_one_line(exc)}") from None
    ckpt = open_checkpoint(at, what, basename="compressed")
    shapes = _recorded_shapes(ckpt)
    out: dict[str, np.ndarray | tuple[np.ndarray, np.ndarray]] = {}
    for name, info in ckpt.tensors.items():
        base, factor = _split_factor_name(name)
        if factor is None:
            out[name] = _read_any(ckpt, info)
        elif factor == LOWRANK_B:
            b, a = _read_pair(ckpt, base)
            out[base] = _join(b, a, shapes.get(base), base, ckpt) if dense else (b, a)
        elif base + LOWRANK_B not in ckpt.tensors:
            raise InputError(
                f"{what}: {ckpt.display!r} holds {name!r} without {base + LOWRANK_B!r}"
            )
    return out


def _split_factor_name(name: str) -> tuple[str, str | None]:
    for suffix in (LOWRANK_B, LOWRANK_A):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, None


def _recorded_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """The original shapes of factorized tensors, from ``__metadata__["zarr_factorize"]``."""
    text = ckpt.metadata.get(COMPRESSED_METADATA_KEY)
    if text is None:
        return {}
    try:
        shapes = json.loads(text).get("shapes", {})
        return {str(k): tuple(int(d) for d in v) for k, v in shapes.items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputError(
            f"{ckpt.what}: {ckpt.display!r} has unreadable __metadata__"
            f"[{COMPRESSED_METADATA_KEY!r}] ({_one_line(exc)})"
        ) from None


def _read_any(ckpt: Checkpoint, info: TensorInfo) -> np.ndarray:
    if info.dtype not in NUMPY_DTYPES:
        raise InputError(
            f"{ckpt.what}: tensor {info.name!r} of {ckpt.display!r} has dtype {info.dtype}, "
            "which numpy cannot hold"
        )
    return _decode(read_bytes(ckpt, info.name), info.dtype, info.shape)


def _read_pair(ckpt: Checkpoint, base: str) -> tuple[np.ndarray, np.ndarray]:
    if base + LOWRANK_A not in ckpt.tensors:
        raise InputError(
            f"{ckpt.what}: {ckpt.display!r} holds {base + LOWRANK_B!r} without {base + LOWRANK_A!r}"
        )
    return read_tensor(ckpt, base + LOWRANK_B), read_tensor(ckpt, base + LOWRANK_A)


def _join(
    b: np.ndarray, a: np.ndarray, shape: tuple[int, ...] | None, base: str, ckpt: Checkpoint
) -> np.ndarray:
    """``B @ A`` in float32 (float64 when a factor is float64), reshaped to ``shape``."""
    dtype = np.float64 if np.float64 in (b.dtype, a.dtype) else np.float32
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise InputError(
            f"{ckpt.what}: {ckpt.display!r}: factors of {base!r} have shapes {b.shape} and "
            f"{a.shape}, which do not multiply"
        )
    w = b.astype(dtype, copy=False) @ a.astype(dtype, copy=False)
    if shape is None:
        return w
    if math.prod(shape) != w.size:
        raise InputError(
            f"{ckpt.what}: {ckpt.display!r}: factors of {base!r} multiply to {w.shape}, "
            f"which cannot take its recorded shape {list(shape)}"
        )
    return w.reshape(shape)
