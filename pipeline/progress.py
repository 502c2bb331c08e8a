"""How far a run is: passes, iterations and steps, reported to whoever listens.

The library reports :class:`Progress` events (``report``); sinks receive them — the
terminal bar of ``factorize run`` when stdout is a terminal (:class:`TerminalBar`), the
Prefect flow's progress artifacts (``flows``), a test. Without sinks a report costs a
list lookup. Every method reports 0 % when it starts and 100 % when it finished (from
:mod:`pipeline.jobs`); ``nmf`` reports each iteration with its error, ``rsvd`` each pass,
``tsqr`` and ``svd`` each row block of each pass (:func:`watch_blocks`).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Client

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


def _finished(prefix: str, dask_scheduler: Any = None) -> int:
    """Tasks named ``prefix-…`` that ever finished on this scheduler (its running count)."""
    found = dask_scheduler.task_prefixes.get(prefix)
    return 0 if found is None else int(found.state_counts.get("memory", 0))


@contextmanager
def watch_blocks(
    client: Client | None, prefix: str, on_count: Callable[[int], None], interval: float = 0.5
) -> Iterator[None]:
    """Call ``on_count(n)`` while the block runs, ``n`` the tasks named ``prefix`` (one per
    row block, e.g. ``factor_block``) finished since it began.

    The scheduler counts every task that reaches memory per key prefix (the figures of
    its dashboard); this polls that count. Jobs sharing a cluster and running the same
    kernel at once see each other's blocks (callers cap ``n`` at their block count).
    """
    if client is None:
        yield
        return
    start = client.run_on_scheduler(_finished, prefix)
    stop = threading.Event()
    last = [0]

    def poll() -> None:
        try:
            n = client.run_on_scheduler(_finished, prefix) - start
        except Exception:  # the client is closing: nothing left to watch
            stop.set()
            return
        if n != last[0]:
            on_count(n)
            last[0] = n

    def loop() -> None:
        while not stop.wait(interval):
            poll()

    thread = threading.Thread(target=loop, name=f"progress-{prefix}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
    poll()  # the last blocks, finished since the last look


def plural(count: int, unit: str) -> str:
    """``unit`` for ``count`` of them: pass → passes, block → blocks, iteration → iterations."""
    if count == 1:
        return unit
    return f"{unit}es" if unit.endswith(("s", "x", "ch", "sh")) else f"{unit}s"


_ACTIVE_BARS: list[TerminalBar] = []  # bars drawn on a terminal, for bar_paused


@contextmanager
def bar_paused() -> Iterator[None]:
    """Lift every open progress bar off its line for the block (e.g. while a log record is
    written), then draw it again below: a bar and a log line never share a line."""
    bars = list(_ACTIVE_BARS)
    for bar in bars:
        bar.lift()
    try:
        yield
    finally:
        for bar in bars:
            bar.redraw()


class TerminalBar:
    """A one-line bar redrawn in place (``\r``), for a terminal; a line per finished step.

    While used as a context manager it is known to :func:`bar_paused`, so log lines
    written meanwhile go above it instead of onto its line.
    """

    WIDTH = 30

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout
        self._open = ""  # the text on the current line, not yet ended by a newline
        self._lock = threading.RLock()

    def __enter__(self) -> TerminalBar:
        _ACTIVE_BARS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE_BARS.remove(self)
        self.lift()

    def __call__(self, event: Progress) -> None:
        filled = round(self.WIDTH * event.percent / 100)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        detail = f" {event.detail}" if event.detail else ""
        text = (
            f"{event.job} {event.method} [{bar}] {event.percent:3.0f}% "
            f"{event.done}/{event.total} {plural(event.total, event.unit)}{detail}"
        )
        with self._lock:
            if event.done >= event.total:
                self._write(f"\r\x1b[2K{text}\n")
                self._open = ""
            else:
                self._write(f"\r\x1b[2K{text}")
                self._open = text

    def lift(self) -> None:
        """Clear the bar's line (the cursor stays at its start)."""
        with self._lock:
            if self._open:
                self._write("\r\x1b[2K")

    def redraw(self) -> None:
        """Draw the open bar again (after :meth:`lift`)."""
        with self._lock:
            if self._open:
                self._write(f"\r\x1b[2K{self._open}")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
