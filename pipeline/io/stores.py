"""URL → filesystem and Zarr store, for local paths and any fsspec URL.

This is the one place fsspec filesystems are made: :func:`split_url` (and
:func:`zarr_store`, which builds Zarr's store on a filesystem made here), with the job's
``storage_options`` passed through :func:`effective_options`.

Object-store calls are bounded in time. For S3 each request waits at most
``connect_timeout`` (5 s) to connect and ``read_timeout`` (10 s) between bytes of the
answer, and botocore's standard retry mode makes at most ``total_max_attempts`` (3)
attempts with back-off (botocore's ``max_attempts`` would count retries, not attempts), so
one call on an endpoint that accepts connections but never answers gives up after about
3 × 10 s plus back-off (≈ 33 s; ``factorize validate`` on a stalled input ends after
≈ 40 s, see ``tests/test_s3.py``). s3fs would repeat every
call 5 times on top (its class attribute ``S3FileSystem.retries``, not a constructor
option): our ``BoundedS3FileSystem`` makes one attempt and leaves retrying to botocore.
A job tunes the bound with ``storage_options.config_kwargs`` (its values win). Each retry
botocore makes is logged at WARNING on ``pipeline.io.stores`` as one line naming the
operation and the error (never a request, a header or a credential).

A transient object-store error (a timeout, a refused or reset connection: see
:func:`is_transient`) is one line wherever it is logged: in a process that opened an
object store, records about one lose their traceback (Prefect logs a failed or retried task
and a failed flow with ``exc_info``; a Dask worker logs a failed task with its traceback
text). ``--log-level DEBUG`` keeps the tracebacks.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

S3_CONFIG: dict[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 10,
    "retries": {"total_max_attempts": 3, "mode": "standard"},
}
S3_PREFIXES = ("s3://", "s3a://")


def effective_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The options fsspec gets for ``url``: the job's, plus bounded timeouts for S3.

    The single entry point from a job's ``storage_options`` to what a filesystem is
    built with. ``${env:NAME}``/``${secret:NAME}`` references are resolved here, and the
    credentials are remembered so that logs and error messages mask them
    (:mod:`pipeline.secrets`).
    """
    from pipeline.secrets import register_options, resolve

    opts = resolve(dict(storage_options or {}))
    register_options(opts)
    if url.startswith(S3_PREFIXES):
        opts["config_kwargs"] = {**S3_CONFIG, **opts.get("config_kwargs", {})}
    return opts


_BOUNDED_S3: type | None = None


def _s3_class() -> type:
    """:class:`BoundedS3FileSystem`, made on first use (s3fs is imported only for S3)."""
    global _BOUNDED_S3
    if _BOUNDED_S3 is None:
        import s3fs

        class BoundedS3FileSystem(s3fs.S3FileSystem):
            """s3fs with one attempt per call: botocore's bounded retries are the only ones.

            A class attribute, not an instance setting, so that the bound survives
            pickling to Dask workers (they rebuild a filesystem from its constructor
            options and find this class by name in this module).
            """

            retries = 1

        BoundedS3FileSystem.__module__ = __name__
        BoundedS3FileSystem.__qualname__ = "BoundedS3FileSystem"
        _BOUNDED_S3 = BoundedS3FileSystem
        _surface_retries()
        quiet_transient_errors()
    return _BOUNDED_S3


def __getattr__(name: str) -> Any:
    """``BoundedS3FileSystem`` by name, as unpickling (on a worker) looks it up."""
    if name == "BoundedS3FileSystem":
        return _s3_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def split_url(
    url: str, storage_options: dict[str, Any] | None = None, *, asynchronous: bool = False
) -> tuple[Any, str]:
    """Return ``(filesystem, path)`` for a local path or fsspec URL.

    Parameters
    ----------
    url : local path or fsspec URL
    storage_options : the job's options (see :func:`effective_options`)
    asynchronous : an asynchronous instance (for Zarr's ``FsspecStore``)
    """
    return _filesystem(url, effective_options(url, storage_options), asynchronous)


def _filesystem(url: str, opts: dict[str, Any], asynchronous: bool = False) -> tuple[Any, str]:
    """``(filesystem, path)`` for ``url`` built with the effective options ``opts``."""
    opts = dict(opts)
    if url.startswith(S3_PREFIXES):
        cls = _s3_class()
        fs = cls(asynchronous=asynchronous, **opts)
        return fs, cls._strip_protocol(url)
    if asynchronous:
        opts["asynchronous"] = True
    fs, path = fsspec.core.url_to_fs(url, **opts)
    if not is_local(fs):
        quiet_transient_errors()
    return fs, path


@dataclass(frozen=True)
class Location:
    """A store location resolved once: its filesystem, its path there, and how to show it.

    Made by :func:`locate` (or :func:`location_of` a job section) once per lifecycle step;
    the I/O functions take it, so credentials are resolved once, not at every call. The
    effective options (credentials resolved) and the filesystem never appear in its
    ``repr``.
    """

    url: str  # as the job names it (fsspec URL or local path)
    path: str  # in the filesystem
    fs: Any = field(repr=False, compare=False)
    options: dict[str, Any] = field(repr=False, compare=False)  # effective options

    @property
    def display(self) -> str:
        """The URL with credentials masked, for logs and errors."""
        from pipeline.secrets import redact

        return redact(self.url)

    @property
    def local(self) -> bool:
        """Whether it is on the local filesystem (where rename is atomic)."""
        return is_local(self.fs)

    @property
    def full_url(self) -> str:
        """The local path, or the fsspec URL with its protocol."""
        return self.path if self.local else self.fs.unstrip_protocol(self.path)

    def join(self, *parts: str) -> Location:
        """The location ``parts`` below this one, on the same filesystem."""
        tail = "/".join(parts)
        return replace(
            self,
            url=f"{self.url.rstrip('/')}/{tail}",
            path=f"{self.path.rstrip('/')}/{tail}",
        )

    def at(self, path: str) -> Location:
        """The location of ``path`` on the same filesystem (a path it listed or made)."""
        url = path if self.local else self.fs.unstrip_protocol(path)
        return replace(self, url=url, path=path)

    def zarr_store(self, *, read_only: bool) -> Any:
        """A Zarr v3 store here (see :func:`zarr_store`), from the resolved options."""
        return _zarr_store(self.url, self.options, read_only=read_only)


def locate(url: str, storage_options: dict[str, Any] | None = None) -> Location:
    """The :class:`Location` of ``url``: credentials resolved (and remembered for
    masking) once, the filesystem made once."""
    opts = effective_options(url, storage_options)
    fs, path = _filesystem(url, opts)
    return Location(url, path, fs, opts)


def location_of(section: Any) -> Location:
    """The :class:`Location` of a job section with ``url`` and ``storage_options``
    (``input``, ``output``)."""
    return locate(section.url, section.storage_options)


def is_local(fs: Any) -> bool:
    """True for the local filesystem (where rename is atomic)."""
    return isinstance(fs, LocalFileSystem)


def zarr_store(url: str, storage_options: dict[str, Any] | None = None, *, read_only: bool) -> Any:
    """A Zarr v3 store object for ``url``: ``LocalStore`` for paths, ``FsspecStore`` else.

    The ``FsspecStore`` wraps a filesystem made here, so Zarr's reads and writes get the
    same bounded timeouts and retries as everything else.
    """
    return _zarr_store(url, effective_options(url, storage_options), read_only=read_only)


def _zarr_store(url: str, opts: dict[str, Any], *, read_only: bool) -> Any:
    from zarr.storage import FsspecStore, LocalStore

    fs, path = _filesystem(url, opts, asynchronous=True)
    if is_local(fs):
        return LocalStore(os.path.abspath(path), read_only=read_only)
    if not fs.async_impl:  # e.g. memory://: Zarr needs an asynchronous filesystem
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        fs = AsyncFileSystemWrapper(fs, asynchronous=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*asynchronous=True", category=UserWarning)
        return FsspecStore(fs=fs, path=path, read_only=read_only)


# --------------------------------------------------------------------------- retry log

_RETRY_LOGGERS = ("botocore.retries.standard", "botocore.retryhandler")


class _RetryToWarning(logging.Handler):
    """Re-log botocore's DEBUG "Retry needed" records as one WARNING line each.

    The line names the operation, the attempt and the error class with its message
    (botocore's, e.g. ``Read timeout on endpoint URL: "http://host/bucket/key"``); request
    headers, bodies and credentials are never part of it. The cause is read from the
    retry context of botocore's handler on the call stack.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if not record.getMessage().startswith("Retry needed"):
            return
        try:
            log.warning("object store: %s", _describe_retry(record))
        except Exception:  # logging must never break a request
            pass


def _describe_retry(record: logging.LogRecord) -> str:
    from pipeline.secrets import redact

    delay = record.args[0] if isinstance(record.args, tuple) and record.args else None
    context = _retry_context()
    what = "request"
    if context is not None:
        op = getattr(getattr(context, "operation_model", None), "name", None) or "request"
        what = f"{op} attempt {getattr(context, 'attempt_number', '?')}"
        exc = getattr(context, "caught_exception", None)
        status = getattr(getattr(context, "http_response", None), "status_code", None)
        if exc is not None:
            what += f" failed ({type(exc).__name__}: {redact(str(exc))})"
        elif status is not None:
            what += f" failed (HTTP {status})"
    if isinstance(delay, int | float):
        return f"{what}; retrying in {delay:.1f} s"
    return f"{what}; retrying"


def _retry_context() -> Any:
    """botocore's ``RetryContext`` of the retry being logged, if found on the stack."""
    frame = sys._getframe(1)
    for _ in range(40):
        if frame is None:
            return None
        ctx = frame.f_locals.get("context")
        if ctx is not None and hasattr(ctx, "attempt_number"):
            return ctx
        frame = frame.f_back
    return None


def _surface_retries() -> None:
    """Route botocore's retry records to :class:`_RetryToWarning` (once per process).

    The two retry loggers stop propagating so their DEBUG records reach no other handler;
    what they say is re-logged as one WARNING line by our handler.
    """
    for name in _RETRY_LOGGERS:
        logger = logging.getLogger(name)
        if any(isinstance(h, _RetryToWarning) for h in logger.handlers):
            continue
        logger.addHandler(_RetryToWarning(logging.DEBUG))
        logger.setLevel(logging.DEBUG)
        logger.propagate = False


# --------------------------------------------------------------------------- transient errors

# Classes (by name, anywhere in an exception's MRO) of errors that say "the store did not
# answer in time or the connection broke": botocore's HTTP client errors and connection
# errors, aiohttp's connection errors, the builtin timeouts and connection errors.
_TRANSIENT_BASES = frozenset(
    {"TimeoutError", "ConnectionError", "HTTPClientError", "ClientConnectionError"}
)
# The same errors by the names a Dask worker reports them with (it logs only their text).
_TRANSIENT_NAMES = _TRANSIENT_BASES | {
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "SocketTimeoutError",
    "ConnectionResetError",
    "ConnectionRefusedError",
    "BrokenPipeError",
}


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a timeout or a broken connection (worth a retry, not a traceback).

    Judged by class names, so that neither botocore nor aiohttp is imported to ask.
    """
    return any(cls.__name__ in _TRANSIENT_BASES for cls in type(exc).__mro__)


def _worker_failure_of_transient(record: logging.LogRecord) -> bool:
    """A Dask worker's "Compute Failed" record (key, state, task, exception text,
    traceback text) about a transient error."""
    args = record.args
    if not (str(record.msg).startswith("Compute Failed") and isinstance(args, tuple)):
        return False
    text = str(args[3]) if len(args) > 3 else ""
    return text.split("(", 1)[0].rsplit(".", 1)[-1] in _TRANSIENT_NAMES


def _one_line_if_transient(record: logging.LogRecord, exc_info: Any) -> None:
    """Drop the traceback of a record about a transient error (see :func:`is_transient`)."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        return
    exc = exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) > 1 else None
    if exc is not None and is_transient(exc):
        record.exc_info, record.exc_text = None, None
    elif _worker_failure_of_transient(record):
        args = record.args
        record.msg, record.args = "task %s failed: %s", (args[0], args[3])


_QUIET_INSTALLED = False


def quiet_transient_errors() -> None:
    """Make every log record of this process about a transient error one line (once).

    A :class:`logging.LogRecord` factory wrapping the current one (the credential scrubber
    of :mod:`pipeline.secrets` among them): the exception a record was created with is
    looked at, whatever an inner factory did to the record.
    """
    global _QUIET_INSTALLED
    if _QUIET_INSTALLED:  # a factory installed later (the scrubber) wraps this one
        return
    _QUIET_INSTALLED = True
    current = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        exc_info = kwargs.get("exc_info", args[6] if len(args) > 6 else None)
        try:
            _one_line_if_transient(record, exc_info)
        except Exception:  # logging must never fail for this
            pass
        return record

    # the scrubber's own "installed already" mark stays visible through this wrapper
    factory._zf_scrubber = getattr(current, "_zf_scrubber", False)  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
