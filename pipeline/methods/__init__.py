"""The method registry: every ``method:`` a job file may name, in one place.

Each method is one module that defines its config model, checks, runner, output arrays,
headline metrics, plots and hooks as a :class:`~pipeline.methods.base.Method`. Adding a
method is writing that module and adding it to the line below; the config union, the
JSON Schema, error paths, the runner table and the report are all built from
:data:`METHODS`.
"""

from __future__ import annotations

from pipeline.methods import als, compress, nmf, rsvd, svd, tsqr
from pipeline.methods.base import FactorArray, Method, MethodSpec, RunContext

METHODS: dict[str, Method] = {
    m.METHOD.name: m.METHOD for m in (tsqr, svd, rsvd, nmf, compress, als)
}


def get(name: str) -> Method:
    """The registered method called ``name``."""
    return METHODS[name]


__all__ = ["METHODS", "FactorArray", "Method", "MethodSpec", "RunContext", "get"]
