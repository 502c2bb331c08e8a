"""The lasting local Prefect server of ``factorize server start`` (run as ``python -m
flows.server``).

One process: Prefect's API and UI with the server's services (what ``prefect server
start`` serves) under uvicorn on 127.0.0.1, plus a thread that stops it once it has been
idle for ``--idle-minutes``: no ``factorize run`` marked the record used
(:func:`pipeline.lifetime.mark_used` touches it) and no flow run is pending or running.
It writes its record (:func:`pipeline.lifetime.write_owned_record`) once it answers and
removes it when it stops, so a record names a live server; SIGTERM stops it
(``factorize server stop``). Beside it runs the warm runner (:mod:`flows.runner`), a child
that dies with it, which starts ``factorize run`` commands without their imports' cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from pipeline.lifetime import WARM_SOCKET, OwnedServer, death_signal_setter, write_owned_record

IDLE_CHECK_SECONDS = 30.0  # how often idleness is judged (at most every quarter timeout)
BUSY_STATES = ["PENDING", "RUNNING", "CANCELLING"]
# On stop, open connections (a browser's, a client's keep-alive, the events websocket)
# get this long to finish; uvicorn would otherwise wait for them indefinitely.
GRACEFUL_SECONDS = 3


def _busy_runs(api_url: str) -> int:
    """Flow runs pending or running on this server (the API's own count); a server that
    cannot answer counts as busy, so it is never stopped mid-request."""
    body = {"flow_runs": {"state": {"type": {"any_": BUSY_STATES}}}}
    request = urllib.request.Request(
        f"{api_url}/flow_runs/count",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(json.loads(response.read()))
    except (urllib.error.URLError, OSError, ValueError):
        return 1


def _answers(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _last_used(record: Path, started: float) -> float:
    """The latest of the start and the record's modification time (runs touch it)."""
    try:
        return max(started, record.stat().st_mtime)
    except OSError:
        return started


def _watch(server: object, me: OwnedServer, record: Path) -> None:
    """Record the server once it answers, then stop it when it has been idle too long."""
    while not _answers(me.api_url):
        if getattr(server, "should_exit", False):
            return
        time.sleep(0.2)
    write_owned_record(record, me)
    if me.idle_timeout <= 0:
        return
    interval = min(IDLE_CHECK_SECONDS, me.idle_timeout / 4)
    while not getattr(server, "should_exit", False):
        time.sleep(interval)
        idle = time.time() - _last_used(record, me.started)
        if idle >= me.idle_timeout and _busy_runs(me.api_url) == 0:
            server.should_exit = True  # type: ignore[attr-defined]  # uvicorn's stop flag
            return


def _start_runner(socket_path: Path, api_url: str) -> subprocess.Popen[bytes]:
    """The warm runner (:mod:`flows.runner`) as a child that dies with this process."""
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.Popen(
        [sys.executable, "-m", "flows.runner", "--socket", str(socket_path), "--api-url", api_url],
        env=env,
        stdin=subprocess.DEVNULL,
        preexec_fn=death_signal_setter(os.getpid()),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until idle, SIGTERM or SIGINT; remove the record on the way out."""
    parser = argparse.ArgumentParser(prog="python -m flows.server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-minutes", type=float, required=True)
    parser.add_argument("--record", type=Path, required=True)
    args = parser.parse_args(argv)

    import uvicorn
    from prefect.server.api.server import create_app

    me = OwnedServer(os.getpid(), args.port, args.idle_minutes * 60, time.time())
    runner = _start_runner(args.record.with_name(WARM_SOCKET), me.api_url)
    config = uvicorn.Config(
        create_app(final=True),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
    )
    server = uvicorn.Server(config)
    threading.Thread(target=_watch, args=(server, me, args.record), daemon=True).start()
    try:
        server.run()
    finally:
        runner.terminate()
        try:
            if json.loads(args.record.read_text()).get("pid") == me.pid:
                args.record.unlink()
        except (OSError, ValueError):
            pass


if __name__ == "__main__":
    main()
