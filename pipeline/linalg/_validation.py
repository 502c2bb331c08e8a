"""Argument checks of the public algorithms, run once at their top (one wording everywhere).

Messages follow scikit-learn's style, ``"<name> must be <what>, got <value>"``, and every
check raises :class:`~pipeline.errors.InputError` (a ``ValueError``).

The dtype rule (the same one jobs apply when they open the input, see
:func:`pipeline.io.source.open_matrix`): integers and bool are computed in float64,
float16 in float32, float32 and float64 as they are; complex and non-numeric dtypes are
refused.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np

from pipeline.errors import InputError

__all__ = [
    "as_matrix",
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_rank",
    "check_tall",
    "working_dtype",
]


def working_dtype(dtype: Any, *, name: str = "a") -> np.dtype:
    """The dtype an input of ``dtype`` is factorized in.

    Integers and bool → float64, float16 → float32, float32 / float64 unchanged.

    Raises
    ------
    InputError
        For complex or non-numeric dtypes.
    """
    dt = np.dtype(dtype)
    if dt.kind in "biu":
        return np.dtype(np.float64)
    if dt.kind == "f":
        if dt.itemsize < 4:
            return np.dtype(np.float32)
        if dt.itemsize > 8:  # longdouble: computed in float64 (LAPACK has no wider type)
            return np.dtype(np.float64)
        return dt
    raise InputError(f"{name} must have a real numeric dtype, got {dt}")


def as_matrix(a: Any, *, name: str = "a") -> da.Array:
    """``a`` as a non-empty 2-D dask array in its working dtype (see :func:`working_dtype`).

    A numpy (or other array-like) input is wrapped with ``da.from_array``. When the chunk
    sizes are unknown (NaN, e.g. after boolean indexing) they are computed with
    ``compute_chunk_sizes()`` — that costs one pass over the graph that produces ``a``.
    The chunking is left as it is (the algorithms rechunk to row blocks themselves).

    Raises
    ------
    InputError
        Not 2-D, empty, or a dtype outside the rule.
    """
    if not isinstance(a, da.Array) and not (hasattr(a, "shape") and hasattr(a, "dtype")):
        a = np.asarray(a)
    if a.ndim != 2:
        raise InputError(f"{name} must be a 2-D matrix, got {a.ndim}-D with shape {a.shape}")
    dtype = working_dtype(a.dtype, name=name)  # before computing chunk sizes: refuse cheaply
    if not isinstance(a, da.Array):
        _check_non_empty(a.shape, name)
        a = da.from_array(a)
    if any(math.isnan(c) for dim in a.chunks for c in dim):
        a = a.compute_chunk_sizes()
    _check_non_empty(a.shape, name)
    if a.dtype != dtype:
        a = a.astype(dtype)
    return a


def _check_non_empty(shape: tuple[int, ...], name: str) -> None:
    if 0 in shape:
        raise InputError(f"{name} must be a non-empty matrix, got shape {tuple(shape)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_rank(rank: Any, shape: tuple[int, int], *, name: str = "rank") -> None:
    """Refuse a ``rank`` that is not an int in ``[1, min(shape)]``.

    Raises
    ------
    InputError
    """
    m, n = shape
    k = min(m, n)
    if not _is_int(rank) or not 1 <= rank <= k:
        raise InputError(
            f"{name} must be between 1 and {k} (the smaller dimension of A, shape ({m}, {n})), "
            f"got {rank!r}"
        )


def check_tall(
    shape: tuple[int, int],
    *,
    name: str = "a",
    hint: str = "factorize a.T instead (transpose: true in a job)",
) -> None:
    """Refuse a wide ``shape`` (TSQR needs rows ≥ columns).

    Raises
    ------
    InputError
    """
    m, n = shape
    if m < n:
        raise InputError(
            f"{name} must be tall (rows ≥ columns) for TSQR, got shape ({m}, {n}); {hint}"
        )


def check_int(value: Any, name: str, *, low: int, high: int | None = None) -> None:
    """Refuse a ``value`` that is not an int in ``[low, high]`` (``high=None``: no bound).

    Raises
    ------
    InputError
    """
    if _is_int(value) and value >= low and (high is None or value <= high):
        return
    what = f"an int ≥ {low}" if high is None else f"an int between {low} and {high}"
    raise InputError(f"{name} must be {what}, got {value!r}")


def check_number(value: Any, name: str, *, low: float = 0.0) -> None:
    """Refuse a ``value`` that is not a finite real number ≥ ``low``.

    Raises
    ------
    InputError
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if ok and math.isfinite(value) and value >= low:
        return
    what = f"≥ {low:g}" if ok else f"a real number ≥ {low:g}"
    raise InputError(f"{name} must be {what}, got {value!r}")


def check_bool(value: Any, name: str) -> None:
    """Refuse a ``value`` that is not ``True`` or ``False``.

    Raises
    ------
    InputError
    """
    if isinstance(value, (bool, np.bool_)):
        return
    raise InputError(f"{name} must be True or False, got {value!r}")


def check_choice(value: Any, name: str, options: Sequence[str]) -> None:
    """Refuse a ``value`` not among ``options``.

    Raises
    ------
    InputError
    """
    if isinstance(value, str) and value in options:
        return
    listed = ", ".join(repr(o) for o in options)
    raise InputError(f"{name} must be one of {listed}, got {value!r}")
