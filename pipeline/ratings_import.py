"""``factorize import-ratings``: a ratings log (CSV or Parquet) as an AnnData-layout CSR store.

A log holds one rating per line — a user id, an item id and, optionally, a rating
(MovieLens: ``userId,movieId,rating,timestamp``). The store it becomes is the input of
``method: als``: rows are users, columns items, and the **stored entries are the observed
ratings** (a stored 0 is an observed 0; a missing entry is unknown).

The log is streamed, never held whole (pandas ``read_csv(chunksize=…)`` or pyarrow's
``ParquetFile.iter_batches``):

0. CSV only: one scan of the raw bytes checks every line's field count against the header
   (a quoted file is scanned with the :mod:`csv` module, so quoted separators and line
   breaks count right), and maps records to the line numbers an editor shows.
1. Pass 1 collects the distinct user and item ids and each user's count (ids fit in memory:
   ``m + n`` entries) and checks every value: an empty id, a rating that is not a finite
   number. Rows and columns are ordered by sorted id — numerically when every id of that
   side is an integer (``"2"`` before ``"10"``; equal numbers such as ``"7"`` and ``"07"``
   by their text), else as strings (code-point order). The ids, as text, are the
   ``obs``/``var`` names.
2. Pass 2 maps ids to rows and columns and spills ``(row, column, value)`` records per block
   of users (at most about :data:`BLOCK_ENTRIES` ratings a block, cut at user boundaries)
   to temporary files beside the output, in file order. Each block is then read back,
   sorted by (row, column) with a stable sort — so repeats stay in file order — its
   duplicates resolved, and its CSR slice appended to the store.

Duplicates (one user and item on several lines): ``last`` keeps the last in file order
(the default with ratings), ``sum`` adds them (the default without: each line counts 1,
so a value is the number of lines), ``mean`` averages them. Sums and means are computed in
float64 and stored in ``--dtype`` (default float32: half stars and counts below 2²⁴ are
exact).

The store is Zarr v3 in AnnData's on-disk layout (``anndata.read_zarr`` opens it): ``X``
the CSR matrix (``data``; ``indices`` and ``indptr`` int32, both int64 for logs of 2³¹
lines or more), ``obs``/``var`` dataframes whose ``_index`` are the ids,
``uns/ratings_import`` what was read (source, columns, policy, lines, duplicates
resolved), the other groups empty. It is written into a hidden sibling folder and renamed
into place (:func:`pipeline.io.owners.written_aside`): it appears complete or not at all.
An existing ``--out`` is refused unless ``overwrite``, and only a Zarr store is ever replaced.

Every problem of the log is an :class:`~pipeline.errors.InputError` of one line naming the
file and the line (1-based, as an editor shows it; ``row N`` of a Parquet file): a missing
column, a wrong field count, an empty line before the end, an empty id, a rating that is
empty, not a number, NaN or infinite; an empty log. The first such line in file order is
the one named.
"""

from __future__ import annotations

import bisect
import csv
import io
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
import zarr

from pipeline.errors import ArtifactExistsError, ConfigError, InputError
from pipeline.io.anndata_out import DICT
from pipeline.io.owners import written_aside
from pipeline.io.stores import is_local, split_url
from pipeline.sparse_datasets import CsrWriter, anndata_skeleton, write_uns

log = logging.getLogger(__name__)

READ_ROWS = 500_000  # log lines per pandas / pyarrow chunk (a few hundred MB of text)
SCAN_BYTES = 16 << 20  # bytes per read of the field-count scan
BLOCK_ENTRIES = 1 << 21  # ratings per user block sorted in memory (~80 MB with the sort)
DUPLICATES = ("last", "sum", "mean")
DEFAULTS = {"user": "userId", "item": "movieId", "rating": "rating"}  # MovieLens
_SPILL = np.dtype([("row", "<i4"), ("col", "<i4"), ("value", "<f8")])
_INTEGER = re.compile(r"[+-]?[0-9]+")


# --------------------------------------------------------------------------- reading logs


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise InputError(
            "import-ratings needs pandas: pip install 'zarr-factorize[ratings]'"
        ) from None
    return pandas


def _parquet() -> Any:
    try:
        import pyarrow.parquet
    except ImportError:
        raise InputError(
            "reading Parquet needs pyarrow: pip install 'zarr-factorize[ratings]'"
        ) from None
    return pyarrow.parquet


@dataclass
class _Shape:
    """What the field-count scan found: how many records come before the first malformed
    line (all of them when none is) and that line's message; records → line numbers."""

    records: int
    error: str | None = None
    first_line: int = 2  # line of record 0 (the header is line 1)
    jumps: list[int] = field(default_factory=list)  # records after which lines skip …
    extra: list[int] = field(default_factory=list)  # … to this many extra lines in all

    def line(self, record: int) -> int:
        at = bisect.bisect_right(self.jumps, record) - 1
        return self.first_line + record + (self.extra[at] if at >= 0 else 0)


class _Log(Protocol):
    """A ratings log (:class:`_CsvLog`, :class:`_ParquetLog`): its columns, its records in
    chunks, where a record is."""

    name: str

    def columns(self) -> list[str]: ...

    def shape(self, expected: int) -> _Shape: ...

    def chunks(self, cols: list[str], records: int) -> Iterator[tuple[int, Any]]:
        """``(index of its first record, frame)`` over the first ``records`` records."""
        ...

    def where(self, record: int) -> str: ...


class _CsvLog:
    def __init__(self, source: str, sep: str) -> None:
        self.name, self.sep = source, sep
        self._shape = _Shape(records=0)

    @contextmanager
    def _open(self) -> Iterator[Any]:
        import fsspec

        try:
            with fsspec.open(self.name, "rb", compression="infer") as f:
                yield f
        except FileNotFoundError:
            raise InputError(f"{self.name}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{self.name}: is a folder, not a CSV file") from None

    def columns(self) -> list[str]:
        pd = _pandas()
        with self._open() as f:
            try:
                frame = pd.read_csv(f, sep=self.sep, nrows=0, encoding="utf-8")
            except pd.errors.EmptyDataError:
                raise InputError(f"{self.name}: empty file (no header line)") from None
            except (ValueError, UnicodeDecodeError) as exc:
                raise InputError(f"{self.name}: line 1: {_one_line(exc)}") from None
        return [str(c) for c in frame.columns]

    def shape(self, expected: int) -> _Shape:
        with self._open() as f:
            shape = _scan_plain(f, self.sep.encode(), expected, self.name)
        if shape is None:  # quotes: let the csv module count
            with self._open() as f:
                shape = _scan_quoted(f, self.sep, expected, self.name)
        self._shape = shape
        return shape

    def chunks(self, cols: list[str], records: int) -> Iterator[tuple[int, Any]]:
        pd = _pandas()
        if records == 0:
            return
        with self._open() as f:
            reader = pd.read_csv(
                f,
                sep=self.sep,
                usecols=cols,
                dtype=str,
                na_filter=False,
                nrows=records,
                chunksize=READ_ROWS,
                encoding="utf-8",
            )
            start = 0
            try:
                for frame in reader:
                    yield start, frame
                    start += len(frame)
            except (pd.errors.ParserError, UnicodeDecodeError) as exc:
                raise InputError(f"{self.name}: {_one_line(exc)}") from None

    def where(self, record: int) -> str:
        return f"line {self._shape.line(record)}"


class _ParquetLog:
    def __init__(self, source: str) -> None:
        self.name = source

    @contextmanager
    def _file(self) -> Iterator[Any]:
        import fsspec

        pq = _parquet()
        try:
            with fsspec.open(self.name, "rb") as f:
                try:
                    parquet = pq.ParquetFile(f)
                except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                    raise InputError(
                        f"{self.name}: not a Parquet file ({_one_line(exc)})"
                    ) from None
                yield parquet
        except FileNotFoundError:
            raise InputError(f"{self.name}: no such file") from None

    def columns(self) -> list[str]:
        with self._file() as pf:
            return list(pf.schema_arrow.names)

    def shape(self, expected: int) -> _Shape:
        with self._file() as pf:
            return _Shape(records=pf.metadata.num_rows, first_line=1)

    def chunks(self, cols: list[str], records: int) -> Iterator[tuple[int, Any]]:
        import pyarrow as pa

        pd = _pandas()
        with self._file() as pf:
            start = 0
            for batch in pf.iter_batches(batch_size=READ_ROWS, columns=cols):
                frame = {}
                for i, col in enumerate(cols):
                    arr = batch.column(i)
                    if i < 2:  # ids as text (integers stay "12", not "12.0"); null → ""
                        if not pa.types.is_string(arr.type):
                            arr = arr.cast(pa.string())
                        frame[col] = arr.to_pandas().fillna("").astype(object)
                    else:
                        frame[col] = arr.to_pandas()
                yield start, pd.DataFrame(frame)
                start += batch.num_rows

    def where(self, record: int) -> str:
        return f"row {record + 1}"


def _wrong_count(fields: int, expected: int) -> str:
    return f"{fields} field{'s' * (fields != 1)}, expected {expected} as in the header"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _scan_plain(f: Any, sep: bytes, expected: int, name: str) -> _Shape | None:
    """Count the fields of every line with numpy, :data:`SCAN_BYTES` at a time; ``None``
    when the file holds a quote (a quoted field may hold the separator or a line break).

    An empty line is allowed only after the last record (an editor's trailing newlines).
    """
    sep_byte = sep[0]
    carry = b""
    line = 0  # lines done
    records = 0  # data lines done (non-empty, after the header)
    blank: tuple[int, int] | None = None  # first empty line not yet followed by a record
    while True:
        chunk = f.read(SCAN_BYTES)
        buf = carry + chunk
        if b'"' in buf:
            return None
        arr = np.frombuffer(buf, dtype=np.uint8)
        ends = np.flatnonzero(arr == 10)
        if not chunk:  # the last line may lack its newline
            ends = np.append(ends, arr.size) if arr.size else ends
        if ends.size:
            starts = np.concatenate([[0], ends[:-1] + 1])
            seps = np.flatnonzero(arr == sep_byte)
            fields = np.searchsorted(seps, ends) - np.searchsorted(seps, starts) + 1
            length = ends - starts
            cr = np.zeros(ends.size, dtype=bool)
            cr[length > 0] = arr[ends[length > 0] - 1] == 13
            empty = length - cr == 0
            numbers = line + 1 + np.arange(ends.size)
            found = _first_malformed(numbers, fields, empty, expected, records, blank)
            if found is not None:
                bad_line, before, what = found
                return _Shape(records=before, error=f"{name}: line {bad_line}: {what}")
            data = ~empty & (numbers > 1)
            if blank is None and (empty & (numbers > 1)).any():
                first = int(np.argmax(empty & (numbers > 1)))
                blank = (int(numbers[first]), records + int(data[:first].sum()))
            records += int(data.sum())
            line += ends.size
            carry = buf[int(ends[-1]) + 1 :] if chunk else b""
        else:
            carry = buf
        if not chunk:
            return _Shape(records=records)


def _first_malformed(
    numbers: np.ndarray,
    fields: np.ndarray,
    empty: np.ndarray,
    expected: int,
    records: int,
    blank: tuple[int, int] | None,
) -> tuple[int, int, str] | None:
    """The first malformed line of a scanned stretch: ``(line, records before, message)``."""
    data = numbers > 1
    content = data & ~empty
    if numbers[0] == 1 and empty[0]:
        return 1, 0, "empty line where the header belongs"
    if blank is not None and content.any():  # an empty line earlier, then a record
        return blank[0], blank[1], "empty line (only the end of the file may have them)"
    wrong = content & (fields != expected)
    gaps = np.flatnonzero(data & empty)
    later = gaps[gaps < np.flatnonzero(content)[-1]] if content.any() else gaps[:0]
    candidates = []
    if wrong.any():
        i = int(np.argmax(wrong))
        what = _wrong_count(int(fields[i]), expected)
        candidates.append((i, what))
    if later.size:
        candidates.append((int(later[0]), "empty line (only the end of the file may have them)"))
    if not candidates:
        return None
    i, what = min(candidates)
    return int(numbers[i]), records + int(content[:i].sum()), what


def _scan_quoted(f: Any, sep: str, expected: int, name: str) -> _Shape:
    """The field-count scan of a file with quotes, by the :mod:`csv` module (as pandas
    reads quotes: ``"`` quotes, ``""`` inside is one), recording where a record spans
    several lines so later records keep their true line numbers."""
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    reader = csv.reader(text, delimiter=sep)
    shape = _Shape(records=0)
    try:
        next(reader, None)  # the header
        prev = reader.line_num
        shape.first_line = prev + 1
        blank: tuple[int, int] | None = None
        for row in reader:
            start, prev = prev + 1, reader.line_num
            if not row:
                blank = blank or (start, shape.records)
                continue
            if blank is not None:
                bad, shape.records = blank
                shape.error = (
                    f"{name}: line {bad}: empty line (only the end of the file may have them)"
                )
                return shape
            if len(row) != expected:
                shape.error = f"{name}: line {start}: {_wrong_count(len(row), expected)}"
                return shape
            if start != shape.line(shape.records):
                shape.jumps.append(shape.records)
                shape.extra.append(start - shape.first_line - shape.records)
            shape.records += 1
    except csv.Error as exc:
        shape.error = f"{name}: line {reader.line_num}: {_one_line(exc)}"
    except UnicodeDecodeError as exc:
        shape.error = f"{name}: not UTF-8 text ({_one_line(exc)})"
    finally:
        text.detach()
    return shape


# --------------------------------------------------------------------------- the import


@dataclass(frozen=True)
class ImportSummary:
    """What :func:`import_ratings` wrote."""

    out: str
    users: int
    items: int
    ratings: int
    lines: int
    duplicates: int
    policy: str
    implicit: bool

    @property
    def density(self) -> float:
        return self.ratings / (self.users * self.items)

    def line(self) -> str:
        """The one summary line the CLI prints."""
        what = "counts" if self.implicit else "ratings"
        return (
            f"wrote {self.out}: {self.users:,} users × {self.items:,} items, "
            f"{self.ratings:,} {what} from {self.lines:,} lines ({self.duplicates:,} "
            f"duplicates resolved: {self.policy}), density {self.density:.3g}"
        )


def _rating_error(raw: Any, value: float) -> str:
    text = "" if raw is None else str(raw)
    if not text.strip() or (isinstance(raw, float) and np.isnan(raw)):
        return "empty rating"
    if np.isnan(value):
        return (
            "rating is NaN" if text.strip().lower() == "nan" else f"rating {text!r} is not a number"
        )
    return f"rating {text!r} is not finite"


def _ratings(frame: Any, cols: list[str]) -> np.ndarray | None:
    """The chunk's ratings (column ``cols[2]``) as float64 (NaN where not a number);
    ``None`` without a rating column."""
    if len(cols) < 3:
        return None
    return _pandas().to_numeric(frame[cols[2]], errors="coerce").to_numpy(dtype=np.float64)


def _first_bad(frame: Any, values: np.ndarray | None, cols: list[str]) -> tuple[int, str] | None:
    """The chunk's first bad record ``(index in the chunk, message)``, if any: an empty id
    or a rating that is not a finite number."""
    bad: list[tuple[int, str]] = []
    for col, what in zip(cols, ("user", "item"), strict=False):
        empty = (frame[col].str.strip() == "").to_numpy()
        if empty.any():
            bad.append((int(np.argmax(empty)), f"empty {what} id (column {col})"))
    if values is not None:
        wrong = ~np.isfinite(values)
        if wrong.any():
            i = int(np.argmax(wrong))
            raw = frame[cols[2]].iloc[i]
            bad.append((i, f"{_rating_error(raw, values[i])} (column {cols[2]})"))
    return min(bad) if bad else None


def _ordered(ids: Any) -> list[str]:
    """Ids in row (column) order: numerically when all are integers, else as strings."""
    ids = [str(i) for i in ids]
    if all(_INTEGER.fullmatch(i) for i in ids):
        return sorted(ids, key=lambda i: (int(i), i))
    return sorted(ids)


def _pass1(src: _Log, cols: list[str], records: int) -> tuple[Any, set[str]]:
    """Per user id its lines (a pandas Series) and the distinct item ids of the first
    ``records`` records; the first bad one raises."""
    users, items = _pandas().Series(dtype=np.int64), set()
    for start, frame in src.chunks(cols, records):
        error = _first_bad(frame, _ratings(frame, cols), cols)
        if error is not None:
            raise InputError(f"{src.name}: {src.where(start + error[0])}: {error[1]}")
        users = users.add(frame[cols[0]].value_counts(), fill_value=0)
        items.update(frame[cols[1]].unique())
    return users, items


def _user_blocks(counts: np.ndarray) -> np.ndarray:
    """First row of each user block: blocks of about :data:`BLOCK_ENTRIES` ratings, cut
    at user boundaries (a user with more has a block of its own)."""
    before = np.cumsum(counts) - counts
    block = before // BLOCK_ENTRIES
    return np.concatenate([[0], np.flatnonzero(np.diff(block)) + 1]).astype(np.int64)


def _spill(
    src: _Log,
    cols: list[str],
    records: int,
    index: tuple[Any, Any],
    starts: np.ndarray,
    folder: str,
) -> None:
    """Pass 2: each record as (row in its block, column, value), appended to its block's
    file in file order."""
    for _, frame in src.chunks(cols, records):
        values = _ratings(frame, cols)
        rows = index[0].get_indexer(frame[cols[0]])
        columns = index[1].get_indexer(frame[cols[1]])
        block = np.searchsorted(starts, rows, side="right") - 1
        order = np.argsort(block, kind="stable")  # stable: file order within a block
        cuts = np.flatnonzero(np.diff(block[order])) + 1
        for lo, sel in zip(np.concatenate([[0], cuts]), np.split(order, cuts), strict=True):
            b = int(block[order[lo]])
            rec = np.empty(sel.size, dtype=_SPILL)
            rec["row"] = rows[sel] - starts[b]
            rec["col"] = columns[sel]
            rec["value"] = 1.0 if values is None else values[sel]
            with open(os.path.join(folder, f"{b}.bin"), "ab") as f:
                rec.tofile(f)


def resolve_duplicates(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int], policy: str
) -> tuple[sp.csr_matrix, int]:
    """CSR of entries given in file order, repeats of a (row, column) resolved by
    ``policy``; with the number of entries dropped."""
    key = rows.astype(np.int64) * shape[1] + cols
    order = np.argsort(key, kind="stable")  # stable: repeats stay in file order
    key, values = key[order], values[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(key)) + 1]) if key.size else key
    if policy == "last":
        ends = np.append(starts[1:], key.size) - 1
        data = values[ends]
    else:
        data = np.add.reduceat(values, starts) if key.size else values
        if policy == "mean":
            data = data / np.diff(np.append(starts, key.size))
    unique = key[starts]
    r, c = np.divmod(unique, shape[1])
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=shape[0]))])
    out = sp.csr_matrix((data, c.astype(np.int32), indptr), shape=shape)
    return out, int(key.size - unique.size)


def _write_blocks(writer: CsrWriter, starts: np.ndarray, folder: str, policy: str) -> int:
    """Each spilled block resolved and appended, in order; the duplicates dropped."""
    m, n = writer.shape
    dropped = 0
    ends = np.append(starts[1:], m)
    for b, (r0, r1) in enumerate(zip(starts, ends, strict=True)):
        path = os.path.join(folder, f"{b}.bin")  # every user has lines: every block a file
        rec = np.fromfile(path, dtype=_SPILL)
        os.remove(path)
        block, d = resolve_duplicates(
            rec["row"], rec["col"], rec["value"], (int(r1 - r0), n), policy
        )
        writer.append(block)
        dropped += d
    return dropped


def _open_log(source: str, fmt: str | None, sep: str | None) -> _Log:
    name = source.lower()
    if fmt is None:
        fmt = "parquet" if name.endswith((".parquet", ".pq")) else "csv"
    if fmt == "parquet":
        return _ParquetLog(source)
    if sep is None:
        sep = "\t" if re.search(r"\.tsv(\.[a-z0-9]+)?$", name) else ","
    if len(sep) != 1:
        raise ConfigError(f"--sep: one character, got {sep!r}")
    return _CsvLog(source, sep)


def _check_out(out: str, overwrite: bool) -> str:
    fs, path = split_url(out)
    if not is_local(fs):
        raise ConfigError(
            f"--out: import-ratings writes a local path; write it locally and copy it to "
            f"{out.split('://', 1)[0]}://"
        )
    path = os.path.abspath(path)
    if os.path.lexists(path):
        if not overwrite:
            raise ArtifactExistsError(f"--out: {out} exists; pass --overwrite to replace it")
        if not any(os.path.exists(os.path.join(path, d)) for d in ("zarr.json", ".zgroup")):
            raise ArtifactExistsError(
                f"--out: {out} exists and is not a Zarr store; it is not replaced"
            )
    return path


def _pick_columns(
    src: _Log, user: str, item: str, rating: str | None, no_rating: bool
) -> tuple[list[str], str | None]:
    header = src.columns()
    listed = ", ".join(header)
    for col, flag in ((user, "--user"), (item, "--item")):
        if col not in header:
            raise InputError(
                f"{src.name}: no column {col!r} (columns: {listed}); name it with {flag}"
            )
    if user == item:
        raise ConfigError(f"--user and --item name the same column {user!r}")
    if no_rating:
        if rating is not None:
            raise ConfigError("--rating and --no-rating exclude each other")
        return header, None
    if rating is None:  # the default column, when the log has one
        return header, DEFAULTS["rating"] if DEFAULTS["rating"] in header else None
    if rating not in header:
        raise InputError(
            f"{src.name}: no column {rating!r} (columns: {listed}); name it with --rating, "
            "or pass --no-rating to count lines"
        )
    return header, rating


def import_ratings(
    source: str,
    out: str,
    *,
    user: str = DEFAULTS["user"],
    item: str = DEFAULTS["item"],
    rating: str | None = None,
    no_rating: bool = False,
    duplicates: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    fmt: str | None = None,
    sep: str | None = None,
) -> ImportSummary:
    """Convert the ratings log ``source`` (CSV, optionally compressed, or Parquet) into the
    AnnData-layout CSR store ``out`` (a local path); see the module docstring.

    Parameters
    ----------
    rating : the rating column; ``None``: ``rating`` when the log has one, else each line
        counts 1
    no_rating : ignore any rating column: each line counts 1
    duplicates : ``last``, ``sum`` or ``mean``; default ``last`` with ratings, ``sum``
        without
    dtype : of the stored values, ``float32`` or ``float64``
    fmt : ``csv`` or ``parquet``; default from the name (``.parquet``/``.pq``)
    sep : the CSV separator; default ``,`` (tab for ``.tsv``)

    Raises
    ------
    InputError
        The log is malformed (the message names the file and the line), empty or absent.
    ConfigError, ArtifactExistsError
        Bad options; ``out`` exists and ``overwrite`` is false.
    """
    if duplicates is not None and duplicates not in DUPLICATES:
        raise ConfigError(f"--duplicates: one of {', '.join(DUPLICATES)}, got {duplicates!r}")
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"--dtype: float32 or float64, got {dtype!r}")
    path = _check_out(out, overwrite)
    src = _open_log(source, fmt, sep)
    header, rating = _pick_columns(src, user, item, rating, no_rating)
    policy = duplicates or ("sum" if rating is None else "last")
    cols = [user, item] + ([rating] if rating else [])
    log.info("%s: checking the lines and collecting the ids (pass 1 of 2)", src.name)
    shape = src.shape(len(header))
    lines_per_user, item_ids = _pass1(src, cols, shape.records)
    if shape.error is not None:
        raise InputError(shape.error)
    if shape.records == 0:
        raise InputError(f"{src.name}: no ratings (only a header)")
    users = _ordered(lines_per_user.index)
    items = _ordered(item_ids)
    m, n = len(users), len(items)
    pd = _pandas()
    index = (pd.Index(users, dtype=object), pd.Index(items, dtype=object))
    counts = lines_per_user.reindex(index[0]).to_numpy(dtype=np.int64)
    starts = _user_blocks(counts)
    log.info("%s: %d users × %d items; writing %s (pass 2 of 2)", src.name, m, n, out)
    old = None
    try:
        with written_aside(path) as aside:
            # beside the store, in its hidden parent: removed with it whatever happens
            spill = os.path.join(os.path.dirname(aside), "spill")
            os.mkdir(spill)
            _spill(src, cols, shape.records, index, starts, spill)
            root = zarr.open_group(aside, mode="w", zarr_format=3)
            writer = CsrWriter(anndata_skeleton(root, users, items), (m, n), dtype, shape.records)
            dropped = _write_blocks(writer, starts, spill, policy)
            nnz = writer.close()
            write_uns(
                root["uns"].create_group("ratings_import", attributes=DICT),
                {
                    "source": source,
                    "user_column": user,
                    "item_column": item,
                    "rating_column": rating or "",
                    "duplicates": policy,
                    "lines": shape.records,
                    "duplicates_resolved": dropped,
                },
            )
            if os.path.lexists(path):  # --overwrite: the old store steps aside last
                old = os.path.join(
                    os.path.dirname(path), f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:12]}"
                )
                os.rename(path, old)
    finally:
        if old is not None:
            if os.path.lexists(path):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, path)
    return ImportSummary(out, m, n, nnz, shape.records, dropped, policy, rating is None)
