"""How far a run is: passes, iterations and steps, reported to whoever listens.

The library reports :class:`Progress` events (``report``); sinks receive them — the
terminal bar of ``factorize run`` when stdout is a terminal (:class:`TerminalBar`), the
Prefect flow's progress artifacts (``flows``), a test. Without sinks a report costs a
list lookup. Every method reports 0 % when it starts and 100 % when it finished (from
:mod:`pipeline.jobs`); ``nmf`` reports each iteration with its error, ``rsvd`` each pass.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

log = logging.getLogger(__name__)

_SINKS: list[Callable[[Progress], None]] = []
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` ``unit``\\ s of ``method`` in job ``job`` (``detail``: e.g. the
    current error)."""

    job: str
    method: str
    done: int
    total: int
    unit: str
    detail: str = ""

    @property
    def percent(self) -> float:
        """0–100."""
        return 100.0 * min(max(self.done, 0), self.total) / max(self.total, 1)


def report(event: Progress) -> None:
    """Hand ``event`` to every sink; a failing sink is logged, never fails the run."""
    with _LOCK:
        sinks = list(_SINKS)
    for sink in sinks:
        try:
            sink(event)
        except Exception as exc:  # progress display must not break a computation
            log.debug("progress sink %r failed: %s", sink, exc)


@contextmanager
def progress_sink(sink: Callable[[Progress], None]) -> Iterator[None]:
    """Send the events reported inside the block to ``sink``."""
    with _LOCK:
        _SINKS.append(sink)
    try:
        yield
    finally:
        with _LOCK:
            _SINKS.remove(sink)


class TerminalBar:
    """A one-line bar redrawn in place (``\\r``), for a terminal; a line per finished step."""

    WIDTH = 30

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def __call__(self, event: Progress) -> None:
        filled = round(self.WIDTH * event.percent / 100)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        detail = f" {event.detail}" if event.detail else ""
        text = (
            f"{event.job} {event.method} [{bar}] {event.percent:3.0f}% "
            f"{event.done}/{event.total} {event.unit}{'s' * (event.total != 1)}{detail}"
        )
        end = "\n" if event.done >= event.total else ""
        self.stream.write(f"\r\x1b[2K{text}{end}")
        self.stream.flush()
