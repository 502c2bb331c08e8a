"""The lasting local Prefect server (``factorize server start|status|stop``) and which API a
run uses: a configured one, the lasting server, or a temporary one that dies with it.

Real servers on 127.0.0.1, each with its own ``PREFECT_HOME`` where it matters; the
session's server (``prefect_server``) serves the runs of the whole suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests.conftest import (
    free_port,
    job_dict,
    one_line_exit,
    write_array,
    write_job,
)

pytestmark = pytest.mark.e2e


def _env(home, **more) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(home), **more}
    env.pop("PREFECT_API_URL", None)
    return env


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_session_server_serves_runs_and_their_links(cli, tmp_path, prefect_server):
    """A run with the lasting server up uses it (no server of its own), prints its flow
    run's page, and the page and the run's record outlive the command."""
    from pipeline.lifetime import read_owned_server

    assert read_owned_server() == prefect_server
    status = cli("server", "status")
    assert status.stdout.strip() == f"running at {prefect_server.url} (pid {prefect_server.pid})"
    write_array(tmp_path / "a.zarr", np.random.default_rng(0).standard_normal((3000, 6)))
    job = job_dict(tmp_path, str(tmp_path / "a.zarr"), name="linked")
    job["cluster"] = {"kind": "local", "n_workers": 1, "memory_limit": "1GiB"}
    proc = cli("run", write_job(tmp_path, job))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("flow run "))
    run_id = line.split()[2].rstrip(":")
    assert line == f"flow run {run_id}: {prefect_server.url}/runs/flow-run/{run_id}"
    assert httpx.get(f"{prefect_server.api_url}/flow_runs/{run_id}").json()["name"] == "linked"
    page = httpx.get(  # the UI serves its pages to a browser's navigation
        f"{prefect_server.url}/runs/flow-run/{run_id}", headers={"Accept": "text/html"}
    )
    assert page.status_code == 200 and "<html" in page.text.lower()  # the UI serves it


def test_start_status_idle_stop_and_stale_records(cli, tmp_path):
    """start → status → a second start finds it → it stops itself once idle; a record
    whose process died is removed; stop of nothing says so; a taken port is refused."""
    import psutil

    from pipeline.lifetime import OWNED_RECORD, OwnedServer, write_owned_record

    home = tmp_path / "home"
    port = free_port()
    env = _env(home)
    # idle 12 s: long enough for the next two calls on a busy machine (3 s was not)
    started = cli("server", "start", "--port", port, "--idle-minutes", "0.2", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    record = json.loads((home / OWNED_RECORD).read_text())
    assert f"http://127.0.0.1:{port} (pid {record['pid']})" in started.stdout
    assert "stops after 0.2 min without a run" in started.stdout
    assert httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 200
    server = psutil.Process(record["pid"])
    assert os.getsid(server.pid) == server.pid  # its own session: no terminal signal reaches it
    again = cli("server", "start", "--port", free_port(), env=env)
    assert "already running at" in again.stdout and str(port) in again.stdout
    # idle 12 s and no flow run pending: it stops itself and removes its record
    server.wait(timeout=60)
    assert not (home / OWNED_RECORD).exists()
    assert cli("server", "status", env=env).stdout.strip() == "not running"
    assert cli("server", "stop", env=env).stdout.strip() == "no server was running"

    write_owned_record(home / OWNED_RECORD, OwnedServer(_dead_pid(), port, 60.0, time.time()))
    assert cli("server", "status", env=env).stdout.strip() == "not running"
    assert not (home / OWNED_RECORD).exists()  # the stale record is gone

    with socketserver_on(port):
        taken = cli("server", "start", "--port", port, env=env)
    assert f"port {port} on 127.0.0.1 is in use" in one_line_exit(taken)


def test_stop_ends_the_server_and_its_record(cli, tmp_path):
    import psutil

    from pipeline.lifetime import OWNED_RECORD

    home = tmp_path / "home"
    env = _env(home)
    assert cli("server", "start", "--port", free_port(), env=env).returncode == 0
    pid = json.loads((home / OWNED_RECORD).read_text())["pid"]
    stopped = cli("server", "stop", env=env)
    assert stopped.stdout.startswith("stopped the server at http://127.0.0.1:")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (home / OWNED_RECORD).exists()


def test_which_api_a_run_uses(tmp_path, monkeypatch):
    """Configured URL first; then a live lasting server; else a temporary one."""
    from pipeline.lifetime import OWNED_RECORD, OwnedServer, start_api_server, write_owned_record

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delitem(sys.modules, "prefect", raising=False)  # as in a fresh CLI process
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert start_api_server().kind == "configured"
    monkeypatch.delenv("PREFECT_API_URL")
    with httpx_health_on(port := free_port()):
        write_owned_record(tmp_path / OWNED_RECORD, OwnedServer(os.getpid(), port, 0.0, 0.0))
        choice = start_api_server()
        assert (choice.kind, choice.lasting) == ("owned", True)
        assert os.environ["PREFECT_API_URL"] == f"http://127.0.0.1:{port}/api"


class socketserver_on:
    """A listening socket holding ``port`` for the block."""

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


class httpx_health_on:
    """A tiny HTTP server answering ``/api/health`` with 200 on ``port`` for the block."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import http.server as h\n"
                "class H(h.BaseHTTPRequestHandler):\n"
                "    def do_GET(self):\n"
                "        self.send_response(200); self.end_headers(); self.wfile.write(b'true')\n"
                "    def log_message(self, *a): pass\n"
                f"h.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n",
            ]
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("the health stub did not start")

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
