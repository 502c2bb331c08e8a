"""Graph helpers shared by the algorithms."""

from __future__ import annotations

import sys
from typing import Any

import dask


def persist(*collections: Any, **kwargs: Any) -> tuple[Any, ...]:
    """``dask.persist`` that returns only once the results exist.

    Under ``distributed``, a persisted graph may still be waiting to be registered by the
    scheduler when the caller drops the futures it was built on (the previous iterate, a
    sketch); the scheduler then cancels it with "lost dependencies". Waiting here makes
    dropping inputs safe. ``distributed`` is used only when the caller already loaded it.
    """
    out = dask.persist(*collections, **kwargs)
    distributed = sys.modules.get("distributed")
    if distributed is not None:
        futures = distributed.futures_of(out)
        if futures:
            distributed.wait(futures)
    return out


def fetch(*persisted: Any) -> tuple[Any, ...]:
    """Values of persisted single-key ``Delayed`` objects.

    Under ``distributed`` this gathers the futures directly, without submitting a new graph
    (saves a scheduler round trip in every NMF iteration); otherwise ``dask.compute``.
    """
    distributed = sys.modules.get("distributed")
    if distributed is not None:
        futures = [distributed.futures_of(p) for p in persisted]
        if all(len(f) == 1 for f in futures):
            return tuple(distributed.default_client().gather([f[0] for f in futures]))
    return dask.compute(*persisted)
