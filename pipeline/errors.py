"""One small exception hierarchy.

Every error a user can fix (bad config, bad input, an existing result) derives from
:class:`UserError`; the CLI turns those into exit code 2 with a single line on stderr.
Each class is also a builtin (``ValueError``, ``FileExistsError`` ...) so callers can
catch either.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class FactorizeError(Exception):
    """Base class of all zarr-factorize errors."""

    exit_code = 1


class UserError(FactorizeError):
    """An error the user can fix by changing the config, the input or the environment."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """The job config is missing, unreadable or invalid."""


class InputError(UserError, ValueError):
    """The input array is missing or unsuitable (shape, dtype, values)."""


class NonFiniteInputError(InputError):
    """The input holds NaN or Inf; raised by the first pass over the data."""


class ArtifactExistsError(UserError, FileExistsError):
    """The output folder exists and ``output.overwrite`` is false."""


class ClusterError(UserError, RuntimeError):
    """The Dask cluster cannot be created or reached."""


class WorkersTimeoutError(FactorizeError, TimeoutError):
    """Fewer workers than ``cluster.wait_for_workers`` asked for joined in time (exit 1:
    the config may be right and the queue slow)."""


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"`` (``"TypeName"`` without a message): an
    exception as one line, for errors that wrap another."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def in_file(exc: UserError, path: str) -> UserError:
    """``exc`` with its message prefixed by the job file ``path`` (unless it names it
    already), of the same class where that class takes a message."""
    text = str(exc)
    if text.startswith(f"{path}:"):
        return exc
    try:
        named = type(exc)(f"{path}: {text}")
    except Exception:  # a constructor with another signature
        named = UserError(f"{path}: {text}")
    named.exit_code = exc.exit_code
    return named


@contextmanager
def naming_file(path: str) -> Iterator[None]:
    """Re-raise a :class:`UserError` from the block with the job file's name in front."""
    try:
        yield
    except UserError as exc:
        named = in_file(exc, path)
        if named is exc:
            raise
        raise named from None
