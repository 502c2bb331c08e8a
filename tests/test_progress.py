"""Progress while running: events from the methods, the terminal bar under a pseudo-terminal
(and none when stdout is not a terminal), and Prefect progress artifacts reaching 100."""

from __future__ import annotations

import io
import logging
import os
import pty
import subprocess

import numpy as np
import pytest
from conftest import factorize_cmd, job_dict, write_anndata, write_array, write_job, write_model

from pipeline.methods import METHODS as REGISTRY
from pipeline.progress import Progress, TerminalBar, plural, progress_sink, watch_blocks

A = np.abs(np.random.default_rng(2).standard_normal((600, 12)))
METHODS = [
    {"method": "rsvd", "rank": 3, "power_iters": 2},  # a known pass count
    {"method": "nmf", "rank": 3, "max_iter": 4, "tol": 0},
]


def _job(tmp_path, name="progress_job"):
    write_array(tmp_path / "a.zarr", A, chunks=(150, 12))
    return job_dict(tmp_path, str(tmp_path / "a.zarr"), name=name, methods=METHODS)


def test_methods_report_passes_iterations_and_completion(tmp_path, client):
    from pipeline.jobs import run_job

    events: list[Progress] = []
    with progress_sink(events.append):
        run_job(_job(tmp_path), client=client)
    rsvd = [(e.done, e.total, e.unit) for e in events if e.method == "rsvd"]
    assert rsvd == [(0, 1, "step"), (1, 3, "pass"), (2, 3, "pass"), (3, 3, "pass"), (1, 1, "step")]
    nmf = [e for e in events if e.method == "nmf" and e.unit == "iteration"]
    assert [e.done for e in nmf] == [1, 2, 3, 4] and all(e.total == 4 for e in nmf)
    assert nmf[-1].detail.startswith("error 0.")
    assert events[-1].percent == 100.0


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_method_reports_progress_to_completion(tmp_path, client, name):
    """Every method of the registry (its ``example``, on a matrix or a model checkpoint)
    reports progress of its own, in order, ending at 100 % (a method added to the registry
    is checked here unlisted)."""
    from pipeline.jobs import run_job

    job_input: dict = {"url": str(tmp_path / "a.zarr")}
    if REGISTRY[name].input == "model":
        job_input["url"] = str(write_model(tmp_path / "model.safetensors"))
    elif REGISTRY[name].needs_sparse:  # the same entries as observations (ALS's ratings)
        job_input["array"] = "X"
        write_anndata(tmp_path / "a.zarr", A)
    else:
        write_array(tmp_path / "a.zarr", A, chunks=(150, 12))
    job = job_dict(tmp_path, "", input=job_input, methods=[REGISTRY[name].example])
    events: list[Progress] = []
    with progress_sink(events.append):
        run_job(job, client=client)
    mine = [e for e in events if e.method == name]
    assert mine, f"{name} reported no progress"
    assert all(0 <= e.done <= e.total for e in mine), mine
    assert mine[-1].percent == 100.0, mine[-1]


def slow_block(i: int) -> int:
    import time

    time.sleep(0.3)
    return i


def test_watch_blocks_counts_the_tasks_of_a_prefix_as_they_finish(client):
    import dask
    from dask import delayed

    counts: list[int] = []
    with watch_blocks(client, "slow_block", counts.append, interval=0.05):
        dask.compute(*[delayed(slow_block, pure=False)(i) for i in range(6)])
    assert counts[-1] == 6 and counts == sorted(counts) and len(set(counts)) >= 3, counts
    with watch_blocks(None, "slow_block", counts.append):  # no cluster: nothing to watch
        pass


def test_tsqr_and_svd_report_blocks_of_each_pass(tmp_path, client):
    from pipeline.jobs import run_job

    methods = [{"method": "tsqr"}, {"method": "svd", "center": True}]
    job = job_dict(tmp_path, str(tmp_path / "a.zarr"), methods=methods)
    write_array(tmp_path / "a.zarr", A, chunks=(150, 12))  # 4 row blocks
    events: list[Progress] = []
    with progress_sink(events.append):
        run_job(job, client=client)
    for method in ("tsqr", "svd"):
        blocks = [e for e in events if e.method == method and e.unit == "block"]
        done = [e.done for e in blocks]
        assert done == sorted(done) and {4, 8} <= set(done), (method, done)
        assert all(e.total == 8 for e in blocks)
        assert blocks[-1].detail == "pass 2/2" and blocks[-1].percent == 100.0


def test_terminal_bar_redraws_one_line():
    out = io.StringIO()
    bar = TerminalBar(out)
    bar(Progress("job", "nmf", 1, 4, "iteration", "error 0.5"))
    bar(Progress("job", "nmf", 4, 4, "iteration", "error 0.25"))
    text = out.getvalue()
    assert text.startswith("\r\x1b[2Kjob nmf [" + "#" * 8 + "-" * 22 + "]  25% 1/4 iterations")
    assert text.endswith("[" + "#" * 30 + "] 100% 4/4 iterations error 0.25\n")


@pytest.mark.parametrize(
    "count,unit,expected",
    [(1, "pass", "pass"), (3, "pass", "passes"), (2, "block", "blocks"), (1, "step", "step")],
)
def test_units_are_plural_in_english(count, unit, expected):
    assert plural(count, unit) == expected
    out = io.StringIO()
    TerminalBar(out)(Progress("j", "m", 0, count, unit))
    assert out.getvalue().endswith(f"0/{count} {expected}")


def test_log_lines_go_above_an_open_bar():
    """A record written while a bar is open clears the bar's line first and draws the bar
    again below it, so the two never share a line."""
    from pipeline.cli import ConsoleHandler

    out = io.StringIO()

    handler = ConsoleHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test_progress.bar")
    logger.addHandler(handler)
    try:
        with TerminalBar(out) as bar:
            bar(Progress("job", "rsvd", 1, 3, "pass"))
            logger.warning("a log line")
            bar(Progress("job", "rsvd", 3, 3, "pass"))
            logger.warning("after the bar")
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().split("\n")
    # the bar, lifted (cleared), the record on its own line, the bar drawn again
    assert lines[0].endswith("1/3 passes\r\x1b[2Ka log line"), lines
    assert lines[1].startswith("\r\x1b[2Kjob rsvd [") and "3/3 passes" in lines[1], lines
    assert lines[2] == "after the bar"  # no bar left open: nothing to lift


def test_bar_under_a_pseudo_terminal_and_not_in_a_file(tmp_path, prefect_server):
    job = write_job(tmp_path, _job(tmp_path))
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [*factorize_cmd(), "run", str(job)],
        stdout=follower,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the pseudo-terminal closes with the process
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    os.close(leader)
    shown = b"".join(chunks).decode(errors="replace")
    assert "progress_job nmf [" in shown and "] 100% 4/4 iterations error" in shown, shown
    assert "\r\x1b[2Kprogress_job rsvd [" in shown
    log = tmp_path / "run.log"
    other = write_job(tmp_path, _job(tmp_path, name="progress_file"), "file.yaml")
    with log.open("w") as f:  # stdout a file: log lines only, no bar
        proc = subprocess.run(
            [*factorize_cmd(), "run", str(other)],
            stdout=f,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    assert "nmf: iteration 1, relative error" in text and "\r" not in text and "[#" not in text
