"""Set-up of the worker processes of the local clusters we start (distributed's ``preload``),
whose output is the run's own.

distributed logs every failed task as an ERROR record with the task and its traceback
("Compute Failed … Traceback: …"). A task that fails on the user's data (NaN, a negative
entry, a corrupt chunk) raises a :class:`~pipeline.errors.UserError`, which the run reports
as its one-line verdict: that record only repeats it with a traceback, so it is dropped
(kept with ``--log-level DEBUG``, which sets distributed's loggers to INFO). Failures of
other kinds keep distributed's record.

Kept small on purpose: preloading the kernels' modules (SciPy, zarr) here delays the
workers' start, which is on the critical path of a run on a lasting server. A cluster
started ahead of its job imports them in tasks instead (see :func:`pipeline.cluster.prestart`),
while the run's other start-up work goes on.
"""

from __future__ import annotations

import logging
from typing import Any

COMPUTE_FAILED = "Compute Failed"


def user_error_names() -> frozenset[str]:
    """Class names of :class:`~pipeline.errors.UserError` and its subclasses."""
    from pipeline.errors import UserError

    names, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return frozenset(names)


class QuietUserErrors(logging.Filter):
    """Drop distributed's "Compute Failed" record of a task that raised a user error.

    The record's arguments are ``(key, state, task, exception repr, traceback text)``; the
    exception's repr starts with its class name.
    """

    def __init__(self, names: frozenset[str]) -> None:
        super().__init__()
        self.names = names

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(COMPUTE_FAILED):
            return True
        if logging.getLogger("distributed").getEffectiveLevel() <= logging.INFO:
            return True  # --log-level DEBUG: keep everything
        args = record.args if isinstance(record.args, tuple) else ()
        exception = str(args[3]) if len(args) > 3 else ""
        return exception.split("(", 1)[0] not in self.names


def dask_setup(worker: Any) -> None:
    """distributed's preload hook: drop the "Compute Failed" records of user errors."""
    logging.getLogger("distributed.worker").addFilter(QuietUserErrors(user_error_names()))
