"""Clean interruption of ``factorize run``: SIGINT to the process group (a terminal's
Ctrl-C), SIGTERM to the PID, SIGKILL.

Each case starts the real CLI in its own session with no ``PREFECT_API_URL`` (so the CLI
starts the temporary Prefect API server itself) on an NMF job that computes for minutes,
signals it once the computation runs, and checks: the exit status, one line on stderr,
the staging folder removed (SIGKILL: left, and removed by the next run's ``prepare``), the
flow run's final state in Prefect's database, and that no process the run started survives
— the Prefect server and the Dask workers included.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import REPO, factorize_cmd, job_dict, write_array, write_job

from pipeline.config import load_config
from pipeline.io.stores import locate

pytestmark = pytest.mark.e2e

COMPUTING = "up to 1000000 iterations"  # nmf's first log line, once the cluster is up


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One Prefect home for the module: only the first run pays for the database."""
    return tmp_path_factory.mktemp("prefect-home")


class Run:
    """``factorize run JOB`` in its own session, its output collected by threads."""

    def __init__(self, job: Path, home: Path) -> None:
        env = {**os.environ, "PREFECT_HOME": str(home)}
        env.pop("PREFECT_API_URL", None)
        env.pop("PREFECT_PROFILE", None)
        self.proc = subprocess.Popen(
            [*factorize_cmd(), "run", str(job)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # our own process group: signal it like a terminal
        )
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=sink.extend, args=(stream,), daemon=True).start()

    def wait_for(self, text: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in list(self.out)):
            assert self.proc.poll() is None, "".join(self.out + self.err)
            assert time.monotonic() < deadline, f"no {text!r} in:\n" + "".join(self.out)
            time.sleep(0.2)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def signal(self, sig: int, group: bool = False) -> float:
        """Send ``sig``; return the seconds until the CLI exited."""
        t0 = time.monotonic()
        (os.killpg if group else os.kill)(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # fail without leaving the run to load the suite
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        return time.monotonic() - t0

    def stderr(self) -> str:
        time.sleep(0.2)  # the reader threads drain what is left
        return "".join(self.err)


def _endless_job(tmp_path: Path, name: str) -> Path:
    """The file of an NMF job that would compute for minutes, on its own LocalCluster."""
    rng = np.random.default_rng(0)
    data = tmp_path / "a.zarr"
    write_array(data, rng.random((2000, 20)), chunks=(500, 20))
    nmf = {"method": "nmf", "rank": 3, "max_iter": 1_000_000, "tol": 0.0}
    nmf["checkpoint_every"] = 1_000_000
    job = job_dict(tmp_path, str(data), name=name, methods=[nmf])
    job["cluster"] = {"kind": "local", "n_workers": 1, "threads_per_worker": 1}
    return write_job(tmp_path, job)


def _start(tmp_path: Path, home: Path, name: str) -> tuple[Run, list[psutil.Process], Path]:
    """A run of an NMF job that would compute for minutes, once it computes; with the
    processes it started by then."""
    run = Run(_endless_job(tmp_path, name), home)
    run.wait_for(COMPUTING)
    time.sleep(1)  # inside the iterations
    procs = run.descendants()
    commands = [" ".join(p.cmdline()) for p in procs]
    server = [p for p, cmd in zip(procs, commands, strict=True) if "uvicorn" in cmd]
    assert len(server) == 1, commands  # the CLI's own temporary Prefect server
    assert os.getsid(server[0].pid) != run.proc.pid  # out of reach of a terminal's Ctrl-C
    assert any("multiprocessing.spawn" in cmd for cmd in commands), commands  # the worker
    return run, procs, tmp_path / "out"


def _survivors(procs: list[psutil.Process], within: float = 15) -> list[str]:
    """The processes still alive after ``within`` seconds (zombies count as gone)."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {' '.join(p.cmdline()[:4])}")
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _staging(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".*.partial-*")) if out.exists() else []


def _flow_run_state(home: Path, name: str) -> str:
    with sqlite3.connect(home / "prefect.db") as db:
        rows = db.execute("select state_type from flow_run where name = ?", (name,)).fetchall()
    assert len(rows) == 1, rows
    return rows[0][0]


def _check_clean_exit(run: Run, procs, out: Path, status: int, line: str, seconds: float):
    survivors = _survivors(procs)
    _kill(procs)
    err = run.stderr()
    print(f"{line}: exit {run.proc.returncode} {seconds:.1f} s after the signal")
    assert run.proc.returncode == status, err + "".join(run.out[-40:])
    assert err.splitlines() == [line], err
    assert _staging(out) == []
    assert survivors == []
    assert seconds < 60


def test_ctrl_c_in_a_terminal_ends_the_run_cleanly(tmp_path, prefect_home):
    """SIGINT to the whole process group (the Dask workers get it too)."""
    run, procs, out = _start(tmp_path, prefect_home, "sigint")
    seconds = run.signal(signal.SIGINT, group=True)
    _check_clean_exit(run, procs, out, 130, "factorize: interrupted", seconds)
    assert _flow_run_state(prefect_home, "sigint") == "CRASHED"


def test_sigterm_ends_the_run_cleanly(tmp_path, prefect_home):
    run, procs, out = _start(tmp_path, prefect_home, "sigterm")
    seconds = run.signal(signal.SIGTERM)
    _check_clean_exit(run, procs, out, 143, "factorize: terminated", seconds)
    assert _flow_run_state(prefect_home, "sigterm") == "CRASHED"


def test_sigkill_leaves_no_process_and_the_next_run_removes_its_staging(tmp_path, prefect_home):
    from pipeline.io.owners import OWNER

    run, procs, out = _start(tmp_path, prefect_home, "sigkill")
    run.signal(signal.SIGKILL)
    survivors = _survivors(procs)
    _kill(procs)
    assert run.proc.returncode == -signal.SIGKILL
    assert run.stderr() == ""
    assert survivors == []  # the Prefect server died with it (PR_SET_PDEATHSIG)
    left = _staging(out)
    assert len(left) == 1, left
    assert (out / left[0] / OWNER).is_file()

    from pipeline.jobs import abort, prepare  # the next run of the job

    again = prepare(load_config(tmp_path / "job.yaml"))
    try:
        assert _staging(out) == [Path(again.staging).name]
    finally:
        abort(again)


# A command whose unwinding never ends, as when Prefect's crash report to a stalled API
# retries for minutes; the bound is shortened to 1 s.
STUCK_UNWINDING = """
import sys, time
from pipeline import cli
cli.UNWIND_GRACE_S = 1.0
def stuck(args):
    try:
        print("computing", flush=True)
        time.sleep(60)
    finally:
        time.sleep(60)
cli._schema = stuck
sys.exit(cli.main(["schema"]))
"""


@pytest.mark.parametrize(
    ("sig", "status", "line"),
    [
        (signal.SIGINT, 130, "factorize: interrupted"),
        (signal.SIGTERM, 143, "factorize: terminated"),
    ],
)
def test_a_run_that_does_not_unwind_ends_after_the_grace_period(sig, status, line):
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK_UNWINDING],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline() == "computing\n"
        t0 = time.monotonic()
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == status, out + err
    assert 1 <= time.monotonic() - t0 < 15  # the grace period, then the exit
    assert err.splitlines() == [line]
    assert "did not end within 1 s of the signal" in out and "WARNING" in out
    assert "Traceback" not in out + err


# --------------------------------------------------------------------------- warm runs


def _start_warm(tmp_path: Path, server, name: str) -> tuple[Run, list[psutil.Process], Path]:
    """The NMF run of :func:`_start` handed to the lasting server's warm runner, once it
    computes; with the runner's child that runs it and that child's processes."""
    run = Run(_endless_job(tmp_path, name), Path(os.environ["PREFECT_HOME"]))
    run.wait_for(COMPUTING)
    time.sleep(1)
    assert run.descendants() == []  # the client runs nothing itself
    runner = next(
        p for p in psutil.Process(server.pid).children() if "flows.runner" in " ".join(p.cmdline())
    )
    forked = runner.children()
    assert len(forked) == 1, forked
    procs = [forked[0], *forked[0].children(recursive=True)]
    assert any("multiprocessing.spawn" in " ".join(p.cmdline()) for p in procs)
    return run, procs, tmp_path / "out"


def _api_state(server, name: str) -> str:
    import httpx

    body = {"flow_runs": {"name": {"any_": [name]}}}
    runs = httpx.post(f"{server.api_url}/flow_runs/filter", json=body).json()
    assert len(runs) == 1, runs
    return runs[0]["state_type"]


def test_a_warm_run_ends_cleanly_on_ctrl_c_relayed_by_its_client(tmp_path, prefect_server):
    run, procs, out = _start_warm(tmp_path, prefect_server, "warm-sigint")
    seconds = run.signal(signal.SIGINT, group=True)
    _check_clean_exit(run, procs, out, 130, "factorize: interrupted", seconds)
    assert _api_state(prefect_server, "warm-sigint") == "CRASHED"


def test_a_warm_run_whose_client_is_killed_ends_and_cleans_up(tmp_path, prefect_server):
    """SIGKILL of the client closes its connection: the run ends as on SIGTERM, its
    staging removed and its processes gone (no orphan computes on unwatched)."""
    run, procs, out = _start_warm(tmp_path, prefect_server, "warm-sigkill")
    run.signal(signal.SIGKILL)
    survivors = _survivors(procs, within=60)
    _kill(procs)
    assert survivors == []
    assert _staging(out) == []
    assert _api_state(prefect_server, "warm-sigkill") == "CRASHED"


# --------------------------------------------------------------------------- in-process


def _fake_staging(out: Path, tag: str, owner: dict | None, name: str = "job") -> Path:
    from pipeline.io.owners import OWNER

    folder = out / f".{name}.partial-{tag}"
    folder.mkdir(parents=True)
    if owner is not None:
        (folder / OWNER).write_text(json.dumps(owner))
    return folder


def test_only_staging_of_dead_local_owners_is_removed(tmp_path):
    from pipeline.io.owners import owner_record, remove_stale_staging

    ended = subprocess.Popen(["true"])
    ended.wait()
    me = owner_record()
    folders = {
        "dead": _fake_staging(tmp_path, "dead", {**me, "pid": ended.pid}),
        "pid-reused": _fake_staging(tmp_path, "reused", {**me, "start_ticks": 1}),
        "rebooted": _fake_staging(tmp_path, "rebooted", {**me, "boot_id": "another-boot"}),
        "alive": _fake_staging(tmp_path, "alive", me),
        "elsewhere": _fake_staging(tmp_path, "elsewhere", {**me, "host": "another-host"}),
        "no-owner": _fake_staging(tmp_path, "no-owner", None),
        "other-job": _fake_staging(tmp_path, "x", {**me, "pid": ended.pid}, name="other"),
    }
    removed = remove_stale_staging(locate(str(tmp_path)), "job")
    gone = {key for key, folder in folders.items() if not folder.exists()}
    assert gone == {"dead", "pid-reused", "rebooted"}
    assert sorted(removed) == sorted(str(folders[key]) for key in gone)


def test_api_server_only_when_prefect_would_start_one(tmp_path, monkeypatch):
    import sys

    from pipeline.lifetime import needs_api_server

    monkeypatch.setitem(sys.modules, "prefect", sys.modules.get("prefect", object()))
    assert not needs_api_server({"PREFECT_HOME": str(tmp_path)})  # its settings are fixed
    monkeypatch.delitem(sys.modules, "prefect")
    assert needs_api_server({"PREFECT_HOME": str(tmp_path)})
    assert not needs_api_server({"PREFECT_API_URL": "http://127.0.0.1:4200/api"})
    (tmp_path / "profiles.toml").write_text(
        'active = "remote"\n[profiles.remote]\nPREFECT_API_URL = "http://h:4200/api"\n'
        "[profiles.local]\n"
    )
    assert not needs_api_server({"PREFECT_HOME": str(tmp_path)})
    assert needs_api_server({"PREFECT_HOME": str(tmp_path), "PREFECT_PROFILE": "local"})


def test_owner_is_recorded_in_local_staging_and_not_published(tmp_path):
    from pipeline.io.artifacts import RunOutput
    from pipeline.io.owners import OWNER, owner_record, remove_stale_staging

    out = RunOutput(locate(str(tmp_path)), "job")
    out.begin()
    owner = json.loads((Path(out.staging) / OWNER).read_text())
    assert owner["pid"] == os.getpid() and owner["start_ticks"] == owner_record()["start_ticks"]
    assert remove_stale_staging(locate(str(tmp_path)), "job") == []  # alive: kept
    out.publish({"status": "completed"})
    assert not (tmp_path / "job" / OWNER).exists()
    assert (tmp_path / "job" / "metrics.json").exists()
