"""Result folders that appear whole: ``<output.url>/<name>/`` with ``factors.zarr`` and
``metrics.json``.

A run writes into a hidden staging folder ``.<name>.partial-<run id>`` beside the final
one; :meth:`RunOutput.publish` puts it in place only when the run succeeded. A result is
complete exactly when its ``metrics.json`` exists with ``"status": "completed"``; that file
is always written last and records the ``run_id`` that wrote it.

Local filesystem
    ``metrics.json`` is written into the staging folder and the folder is renamed into
    place. With ``overwrite`` the old result is renamed aside first and deleted after. The
    two renames (and the check whether a result exists) run under an exclusive ``flock``
    on ``.<name>.lock`` beside the result, so concurrent publishers of one name take turns:
    with ``overwrite`` the last one wins whole, without it the first one wins and the
    others fail. Leftovers of a publisher killed between the renames (``.<name>.old-*``)
    are removed by the next publisher of that name. A reader sees the old result, no
    ``<name>/`` for an instant, or the new result — never a mix. A ``<name>`` that is a
    symbolic link is replaced as a link: the link goes, what it pointed to is left.

Object stores (S3 and any fsspec store without rename)
    1. *Claim*: ``<name>/metrics.json`` is replaced by ``{"status": "publishing",
       "run_id": …, "owner": …, "expires": …}``, in one PUT. From then on the old result
       no longer reads as complete. Without ``overwrite`` the claim is an exclusive create
       (``If-None-Match: *`` on S3), so of two runs publishing one new name only one
       gets it. The claim is a lease (:mod:`pipeline.io.owners`): it expires
       ``LEASE_SECONDS`` (2 min) after it was written and its publisher renews it every
       ``RENEW_SECONDS`` (30 s) until the commit. Another run's live claim is refused
       (that run's result is discarded); a lapsed one — its publisher was killed — is
       taken over, and the dead run's staging prefix removed.
    2. *Copy*: every staging object is copied (server-side on S3) to the same key under
       ``<name>/``; keys that only the old result had (or a dead publisher copied) are
       deleted.
    3. *Commit*: the claim is re-read (still ours?) and ``metrics.json`` is written with
       ``"status": "completed"``.
    4. The staging prefix is removed (missing prefixes are fine: S3 has no directories).

    The staging copy stays intact until the commit, so a publish that failed midway is
    simply repeated: Prefect's retry finds its own claim and copies again. A retry whose
    first try already committed finds ``metrics.json`` completed with its own ``run_id``
    and returns success (:meth:`RunOutput.published`).

Limits
    - On an object store the claim is read, then written: two runs that claim one name
      with ``overwrite: true`` within the same instant can both get it, and the factors
      of the result can mix both runs. The re-read before the commit makes the overtaken
      run fail, but copies of the overtaken run that land after the winner's copies go
      unnoticed. Publish one name from one run at a time. A publisher cut off from the
      store for longer than the lease loses its name to the next run, as a dead one.
    - A reader that read a completed ``metrics.json`` and then reads factors while an
      overwrite runs can read new factors under the old metrics; re-read ``metrics.json``
      (its ``run_id``) after reading factors to be sure.
    - A publisher killed during the copy leaves ``<name>/`` claimed (not complete) until
      its lease lapses (2 min); a run publishing that name before then is refused.
      Leases compare the publisher's clock with the reader's: clocks more than a minute
      apart shorten or lengthen them. ``flock`` on network filesystems (NFS) is only as
      good as their lock daemon.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import logging
import os
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask.array as da
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.backend import host_blocks, to_host
from pipeline.errors import ArtifactExistsError, ConfigError
from pipeline.io.owners import (
    RENEW_SECONDS,
    claim_record,
    describe_claim,
    is_claim,
    lease_lapsed,
    remove_local,
    remove_owner,
    staging_of,
    write_owner,
)
from pipeline.io.stores import Location, is_local
from pipeline.secrets import redact

log = logging.getLogger(__name__)

FACTORS = "factors.zarr"
METRICS = "metrics.json"
COMPLETED = "completed"
_PARTIAL = ".partial-"


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _url(fs: Any, path: str) -> str:
    return path if is_local(fs) else fs.unstrip_protocol(path)


def check_output_free(out: Location, name: str, overwrite: bool = False) -> None:
    """Refuse early when ``<out>/<name>`` exists and ``overwrite`` is false.

    On object stores a name that holds only a lapsed claim (its publisher died, see
    :mod:`pipeline.io.owners`) is free: the run takes it over when it publishes. A live
    claim is refused: another run is publishing that name now.

    Raises
    ------
    ArtifactExistsError
        The result exists (or is being published) and ``overwrite`` is false.
    ConfigError
        The output location cannot be reached (network, credentials, timeouts).
    """
    where = out.join(name).display
    fs, root = out.fs, out.path
    try:
        exists = fs.exists(_join(root, name))
        claim = _claim_at(fs, root, name) if exists and not overwrite else None
    except Exception as exc:  # network/credential errors from object stores
        raise ConfigError(f"output.url: cannot reach {where!r}: {_one_line(exc)}") from None
    if overwrite or not exists:
        return
    if claim is not None and lease_lapsed(claim):
        log.info("output: %s holds a dead publisher's claim (%s)", where, describe_claim(claim))
        return
    if claim is not None:
        raise ArtifactExistsError(
            f"output: {where} is being published by another {describe_claim(claim)}; "
            "wait for it, or change name"
        )
    raise ArtifactExistsError(
        f"output: {where} already exists; set output.overwrite: true to replace it, or change name"
    )


def _claim_at(fs: Any, root: str, name: str) -> dict[str, Any] | None:
    """The publisher's claim in ``<root>/<name>/metrics.json`` (object stores), else ``None``."""
    if is_local(fs):  # local results appear by rename: never claimed
        return None
    record = _read_json(fs, _join(root, name, METRICS))
    return record if is_claim(record) else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact(text)


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    """The JSON object at ``path``; ``None`` when missing or not a JSON object."""
    try:
        value = json.loads(fs.cat_file(path))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def read_published(out: Location, name: str) -> dict[str, Any] | None:
    """The ``metrics.json`` of a complete result at ``<out>/<name>/``, else ``None``."""
    metrics = _read_json(out.fs, _join(out.path, name, METRICS))
    return metrics if metrics is not None and metrics.get("status") == COMPLETED else None


def remove_tree(fs: Any, path: str) -> None:
    """Delete ``path`` and everything under it; a missing path is fine.

    On object stores a prefix whose objects are gone no longer exists (no directory
    objects), and listings may be cached: both are tolerated here.
    """
    fs.invalidate_cache(path)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(path)


def _files(fs: Any, root: str) -> set[str]:
    """Paths of all files under ``root``, relative to it (empty when missing)."""
    fs.invalidate_cache(root)
    prefix = root.rstrip("/") + "/"
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return set()
    return {p[len(prefix) :] for p in found if p.startswith(prefix)}


def sync_objects(fs: Any, src: str, dst: str, *, skip: str) -> None:
    """Make ``dst`` hold ``src``'s files (all but ``skip``): copy them, delete the rest.

    Idempotent: repeating it after a failure midway gives the same result.
    """
    new = _files(fs, src) - {skip}
    old = _files(fs, dst) - {skip}
    if new:
        keys = sorted(new)
        fs.copy([_join(src, k) for k in keys], [_join(dst, k) for k in keys])
    stale = sorted(old - new)
    if stale:
        fs.rm([_join(dst, k) for k in stale])
    fs.invalidate_cache(dst)


def replace_tree(fs: Any, src: str, dst: str, marker: str) -> None:
    """Put the finished folder ``src`` in place of ``dst``, whose ``marker`` file says
    complete; ``src`` is gone afterwards.

    Locally two renames (``dst`` never holds a mix). On object stores ``dst/marker`` is
    deleted first (the old content stops being complete), the files are synced, and the
    marker is copied last.
    """
    if is_local(fs):
        old = f"{dst}.old-{uuid.uuid4().hex[:12]}"
        if os.path.lexists(dst):
            os.rename(dst, old)
        os.rename(src, dst)
        remove_local(old)
        return
    if fs.exists(_join(dst, marker)):
        fs.rm_file(_join(dst, marker))
    sync_objects(fs, src, dst, skip=marker)
    fs.copy(_join(src, marker), _join(dst, marker))
    remove_tree(fs, src)


@contextmanager
def name_lock(root: str, name: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``<root>/.<name>.lock`` (local filesystems only).

    The lock file is removed on release. A waiter that wakes up holding a lock on a file
    already unlinked retries on the current one, so at most one holder at a time.
    """
    path = os.path.join(root, f".{name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if current.st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


def factor_compressors(codec: str) -> Any:
    """zarr's ``compressors`` for ``output.codec`` (``none``, ``zstd`` or ``lz4``).

    Factors (Q, U, W, …) are incompressible floats. On a 32 MiB float64 block of an
    orthonormal Q here, zarr's default zstd (level 0) keeps 95.6 % of the bytes and writes
    in 91 ms, Blosc lz4 with byte shuffle 93.8 % in 56 ms, no compression 18 ms; a float32
    NMF factor: 90 %, 20 ms vs 6.6 ms (issue 24; README "Output"). Hence ``none`` by
    default: writing Q was two thirds of a TSQR job with Q.
    """
    return {
        "none": None,
        "zstd": "auto",  # zarr's default: zstd level 0
        "lz4": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
    }[codec]


class RunOutput:
    """The staging folder of one run, published atomically by :meth:`publish`.

    Parameters
    ----------
    out : where results go (``output.url``)
    name : the job name (the final folder's name)
    staging : an existing staging folder (a run resumed by path, e.g. in a Prefect task)
    overwrite : replace an existing result of this name (``output.overwrite``)
    codec : compression of the factor arrays (``output.codec``, see :func:`factor_compressors`)
    """

    def __init__(
        self,
        out: Location,
        name: str,
        staging: str | None = None,
        overwrite: bool = False,
        codec: str = "none",
    ) -> None:
        self.out = out
        self.name = name
        self.overwrite = overwrite
        self.compressors = factor_compressors(codec)
        self.fs, root = out.fs, out.path
        self.root = root.rstrip("/") or root
        self.final = _join(self.root, name)
        self.staging = staging or _join(self.root, f".{name}{_PARTIAL}{uuid.uuid4().hex[:12]}")
        self._group: zarr.Group | None = None

    @property
    def run_id(self) -> str:
        """This run's id (from its staging folder's name); recorded in ``metrics.json``."""
        tail = self.staging.rstrip("/").rsplit("/", 1)[-1]
        return tail.rsplit(_PARTIAL, 1)[-1]

    @property
    def staging_url(self) -> str:
        """fsspec URL (or local path) of the staging folder."""
        return _url(self.fs, self.staging)

    @property
    def final_url(self) -> str:
        """fsspec URL (or local path) of the published folder."""
        return _url(self.fs, self.final)

    def begin(self) -> None:
        """Create the staging folder and an empty ``factors.zarr`` group.

        On failure whatever was created is removed again.
        """
        check_output_free(self.out, self.name, self.overwrite)
        try:
            self.fs.makedirs(self.staging, exist_ok=False)
            if is_local(self.fs):  # a later run removes it if this process dies
                write_owner(self.staging)
            store = self.out.at(_join(self.staging, FACTORS)).zarr_store(read_only=False)
            self._group = zarr.open_group(store=store, mode="w", zarr_format=3)
        except BaseException:
            self.abort()
            raise

    @property
    def group(self) -> zarr.Group:
        """The staging ``factors.zarr`` root group (reopened when resumed by path)."""
        if self._group is None:
            if not self.fs.exists(_join(self.staging, FACTORS)):
                raise RuntimeError(
                    f"the staging folder {redact(self.staging_url)} of run {self.run_id} "
                    "is gone (removed by another process?)"
                )
            store = self.out.at(_join(self.staging, FACTORS)).zarr_store(read_only=False)
            self._group = zarr.open_group(store=store, mode="r+")
        return self._group

    def factor_array(
        self, method: str, name: str, x: Any, dims: tuple[str, ...], attrs: dict | None = None
    ) -> Any:
        """Write a small factor now, or return a lazy store of a dask array.

        Returns
        -------
        ``None`` for in-memory arrays (already written); for dask arrays a ``Delayed``
        that writes it when computed (compute it together with the metrics that read
        the same blocks, so the input is read once).
        """
        sub = self.group.require_group(method)
        if isinstance(x, da.Array):
            x = _aligned_to_regular_chunks(x)
            chunks = tuple(c[0] for c in x.chunks)
        else:
            x = to_host(x)
            chunks = x.shape
        arr = sub.create_array(
            name,
            shape=x.shape,
            dtype=x.dtype,
            chunks=chunks,
            dimension_names=dims,
            attributes=attrs or {},
            compressors=self.compressors,
            overwrite=True,
        )
        if isinstance(x, da.Array):  # device blocks leave the device explicitly
            return da.store(host_blocks(x), arr, lock=False, compute=False)
        arr[...] = np.asarray(x)
        return None

    def write_json(self, filename: str, payload: dict[str, Any]) -> None:
        """Write a JSON file into the staging folder."""
        self.fs.pipe_file(_join(self.staging, filename), _json_bytes(payload))

    def write_bytes(self, filename: str, data: bytes) -> None:
        """Write a binary file (a plot) into the staging folder."""
        self.fs.pipe_file(_join(self.staging, filename), data)

    def published(self) -> dict[str, Any] | None:
        """The ``metrics.json`` at ``<name>/`` when this very run completed it, else ``None``.

        A retried publish whose first try committed uses this to return success.
        """
        self.fs.invalidate_cache(self.final)
        metrics = _read_json(self.fs, _join(self.final, METRICS))
        if metrics and metrics.get("run_id") == self.run_id and metrics.get("status") == COMPLETED:
            return metrics
        return None

    def publish(self, metrics: dict[str, Any]) -> str:
        """Write ``metrics.json`` (with this run's ``run_id``) and put the result in place.

        An existing result is replaced only with ``overwrite: true``, and only now, after
        the new one is complete. Safe to call again after a failure (or a success): see
        the module docstring. Returns the final URL.

        Raises
        ------
        ArtifactExistsError
            Without ``overwrite``, another run published ``<name>`` first; this run's
            result is discarded (its staging folder removed).
        """
        metrics = {**metrics, "run_id": self.run_id}
        if self.published() is not None:  # a retry: the first try got it in place
            remove_tree(self.fs, self.staging)
            return self.final_url
        with warnings.catch_warnings():  # xarray reads v3 consolidated metadata fine
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(self.group.store)
        if is_local(self.fs):
            self._publish_local(metrics)
        else:
            self._publish_objects(metrics)
        log.debug("run %s published at %s", self.run_id, redact(self.final_url))
        return self.final_url

    def _lost_race(self) -> ArtifactExistsError:
        """Discard this run's result: another run published ``<name>`` first."""
        self.abort()
        return ArtifactExistsError(
            f"output: {redact(self.final_url)} was published by another run while this one "
            "was computing; this run's result was discarded (set output.overwrite: true "
            "to replace it, or change name)"
        )

    def _publish_local(self, metrics: dict[str, Any]) -> None:
        remove_owner(self.staging)
        self.write_json(METRICS, metrics)  # inside the folder that is renamed into place
        with name_lock(self.root, self.name):
            if self.published() is not None:
                return
            pattern = os.path.join(glob.escape(self.root), glob.escape(f".{self.name}.old-"))
            for stale in glob.glob(pattern + "*"):  # of a publisher killed between renames
                remove_local(stale)
            if not os.path.lexists(self.final):
                os.rename(self.staging, self.final)
                return
            if not self.overwrite:
                raise self._lost_race()
            old = _join(self.root, f".{self.name}.old-{self.run_id}")
            os.rename(self.final, old)
            try:
                os.rename(self.staging, self.final)
            except BaseException:
                os.rename(old, self.final)  # put the old result back
                raise
            remove_local(old)  # a symbolic link <name> goes, what it pointed to stays

    def _publish_objects(self, metrics: dict[str, Any]) -> None:
        marker = _join(self.final, METRICS)
        current = _read_json(self.fs, marker)
        if current is None or current.get("run_id") != self.run_id:
            self._claim(marker, current)
        with self._lease(marker):  # renewed while the copy runs
            sync_objects(self.fs, self.staging, self.final, skip=METRICS)
        current = _read_json(self.fs, marker)
        if current is None or current.get("run_id") != self.run_id:
            self.abort()
            raise ArtifactExistsError(
                f"output: another run is publishing {redact(self.final_url)} at the same "
                "time; this run's result was discarded (publish one name from one run at "
                "a time)"
            )
        self.fs.pipe_file(marker, _json_bytes(metrics))  # the commit: complete from here
        remove_tree(self.fs, self.staging)

    def _claim(self, marker: str, current: dict[str, Any] | None) -> None:
        """Replace ``metrics.json`` by this run's claim: the old result stops being complete.

        ``current`` is what ``metrics.json`` held. Another run's live claim is refused; a
        lapsed one (its publisher died) is taken over and that run's staging removed.
        """
        took_over = False
        if is_claim(current):
            if not lease_lapsed(current):
                self.abort()
                raise ArtifactExistsError(
                    f"output: {redact(self.final_url)} is being published by another "
                    f"{describe_claim(current)}; this run's result was discarded (publish one "
                    "name from one run at a time)"
                )
            self._take_over(marker, current)
            took_over = True
        claim = claim_record(self.run_id)
        if self.overwrite:
            self.fs.pipe_file(marker, _json_bytes(claim))
            return
        if not took_over and self.fs.exists(self.final):
            raise self._lost_race()
        try:
            self.fs.pipe_file(marker, _json_bytes(claim), mode="create")
        except FileExistsError:
            raise self._lost_race() from None
        except OSError as exc:  # a store that reports the failed precondition otherwise
            if exc.errno != errno.EEXIST:
                raise
            raise self._lost_race() from None

    def _take_over(self, marker: str, lapsed: dict[str, Any]) -> None:
        """Free ``<name>`` from a claim that lapsed: remove the dead run's staging prefix,
        then its claim (keys it copied are replaced or deleted by this run's copy)."""
        log.warning(
            "output: taking over %s from a publisher that died (%s)",
            redact(self.final_url),
            describe_claim(lapsed),
        )
        staging = staging_of(self.root, self.name, lapsed.get("run_id"))
        if staging is not None and staging != self.staging:
            remove_tree(self.fs, staging)
        if not self.overwrite:  # the exclusive create needs the name free of it
            try:
                self.fs.rm_file(marker)
            except FileNotFoundError:
                pass
            self.fs.invalidate_cache(marker)

    @contextmanager
    def _lease(self, marker: str) -> Iterator[None]:
        """Renew this run's claim on ``marker`` every :data:`RENEW_SECONDS` while the block
        runs, so that no other run takes the name of a live publisher over."""
        stop = threading.Event()

        def renew_until_stopped() -> None:
            while not stop.wait(RENEW_SECONDS):
                if not self._renew(marker):
                    return

        thread = threading.Thread(target=renew_until_stopped, name="claim-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _renew(self, marker: str) -> bool:
        """Extend this run's claim by a lease; ``False`` once the claim is another run's
        (the re-read before the commit then refuses). A failed renewal is logged."""
        try:
            current = _read_json(self.fs, marker)
            if current is None or current.get("run_id") != self.run_id:
                return False
            renewed = claim_record(self.run_id, since=current.get("since"))
            self.fs.pipe_file(marker, _json_bytes(renewed))
        except Exception as exc:  # the next renewal may get through
            where = redact(self.final_url)
            log.warning("could not renew the claim on %s: %s", where, _one_line(exc))
        return True

    def abort(self) -> None:
        """Remove the staging folder (after a failure); never touches a published result."""
        try:
            remove_tree(self.fs, self.staging)
        except Exception as exc:  # cleanup must not hide the original error
            log.warning(
                "could not remove staging folder %s: %s", redact(self.staging_url), _one_line(exc)
            )


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, indent=2, default=_json_default) + "\n").encode()


def _aligned_to_regular_chunks(x: da.Array) -> da.Array:
    """Rechunk, where needed, so each dask block maps onto whole Zarr chunks.

    Zarr chunks are regular: along each axis a chunking like ``(b, b, …, last)`` with any
    ``last`` already aligns (no two tasks write into one Zarr chunk); an axis chunked
    otherwise is rechunked to its first chunk's size.
    """
    regular = all(all(size == c[0] for size in c[:-1]) for c in x.chunks)
    return x if regular else x.rechunk(tuple(c[0] for c in x.chunks))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")
