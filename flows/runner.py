"""The warm runner of the lasting server: ``factorize run`` without the imports' cost.

A ``factorize run`` process spends most of its fixed cost importing Prefect, Dask, zarr
and SciPy (about 4 s here) before its job starts. The lasting server of
``factorize server start`` (:mod:`flows.server`) therefore keeps one process that has
imported them all and waits on a Unix socket beside its record
(``PREFECT_HOME/zarr-factorize-runner.sock``, mode 0600: only its owner can connect).

For each run the client (:func:`pipeline.lifetime.run_warm`) sends its arguments, working
folder and environment, and hands over its stdin, stdout and stderr (``SCM_RIGHTS``);
this process forks a child that becomes that command: same files, folder, environment
and arguments, :func:`pipeline.cli.main` run as in a fresh process, its exit status sent
back. The client relays SIGINT, SIGTERM and SIGHUP to the child; a client that dies
however it dies closes the connection, and the child then ends as on SIGTERM (staging
removed, cluster closed, flow run marked crashed).

A run whose Prefect settings differ from this process's (``PREFECT_*`` variables other
than the API's address) is declined and runs in the client's own process: Prefect reads
its settings when imported.
"""

from __future__ import annotations

import argparse
import array
import atexit
import json
import os
import signal
import socket
import sys
import threading
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import lifetime
from pipeline.lifetime import WARM_FDS, WARM_MAX_MESSAGE, prefect_settings_env


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The request (one JSON line) and the client's file descriptors (sent with its first
    bytes)."""
    fds = array.array("i")
    space = socket.CMSG_LEN(WARM_FDS * fds.itemsize)
    data, ancillary, _, _ = conn.recvmsg(WARM_MAX_MESSAGE, space)
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    while not data.endswith(b"\n") and len(data) < WARM_MAX_MESSAGE:
        more = conn.recv(WARM_MAX_MESSAGE)
        if not more:
            break
        data += more
    return json.loads(data), list(fds)


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _end_when_client_leaves(conn: socket.socket) -> None:
    """SIGTERM to this run once its client closed the connection (it died or was killed):
    the run unwinds as a terminated one instead of running on unwatched."""

    def watch() -> None:
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="warm-client-watch", daemon=True).start()


def _become(request: dict[str, Any], fds: list[int], api_url: str) -> None:
    """Turn this forked child into the client's command: its files, folder, environment."""
    for fd, target in zip(fds, (0, 1, 2), strict=True):
        os.dup2(fd, target)
        os.close(fd)
    lifetime.warm_run_of = os.getppid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ["PREFECT_API_URL"] = api_url
    sys.argv = ["factorize", *request["argv"]]
    # A process that multiprocessing spawns (a LocalCluster's worker) imports its parent's
    # __main__ again; this one is flows.runner, whose imports are Prefect's: give the run a
    # bare __main__, as the console script's.
    sys.modules["__main__"] = types.ModuleType("__main__")
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    sys.stderr.reconfigure(line_buffering=True)
    import dask

    dask.config.refresh()  # the client's DASK_* variables, not this process's
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)


def _run_child(conn: socket.socket, request: dict[str, Any], fds: list[int], api_url: str) -> None:
    """The forked child: run the command, report its status, exit with it.

    It never returns: unwinding would run the frames it shares with the listening
    parent (which close and remove the socket). Exit hooks run as at a normal exit (Prefect
    sends its last log records), then ``os._exit``.
    """
    code = 1
    try:
        os.setsid()  # its own process group: its cluster's workers go with it
        _become(request, fds, api_url)
        _send(conn, {"pid": os.getpid()})
        _end_when_client_leaves(conn)
        from pipeline.cli import main

        code = main(request["argv"])  # as a fresh process would; never delegates again
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # a failure of the hand-over itself: exit 1
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            _send(conn, {"exit": code})
        finally:
            os._exit(code)


def _declined(request: dict[str, Any]) -> str | None:
    """Why this process cannot run the request (``None``: it can)."""
    ours, theirs = prefect_settings_env(os.environ), prefect_settings_env(request["env"])
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    return f"Prefect settings differ: {', '.join(differ)}" if differ else None


def _serve_one(conn: socket.socket, listener: socket.socket, api_url: str) -> None:
    request, fds = _receive(conn)
    reason = _declined(request) if len(fds) == WARM_FDS else "no file descriptors"
    if reason:
        for fd in fds:
            os.close(fd)
        _send(conn, {"declined": reason})
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        listener.close()
        _run_child(conn, request, fds, api_url)
    for fd in fds:
        os.close(fd)
    conn.close()


def _reap() -> None:
    """Collect the exit status of finished runs (no zombies)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def serve(path: Path, api_url: str) -> None:
    """Listen on ``path`` and fork a child per connection until SIGTERM."""
    # Prefect and the flows; zarr, Dask, SciPy and the methods; matplotlib
    import flows  # noqa: F401
    import pipeline.cli
    import pipeline.jobs
    import pipeline.plots  # noqa: F401

    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is its owner's only
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(16)
    listener.settimeout(1.0)
    try:
        while True:
            _reap()
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            try:
                _serve_one(conn, listener, api_url)
            except (OSError, ValueError):
                conn.close()
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m flows.runner --socket PATH --api-url URL``."""
    parser = argparse.ArgumentParser(prog="python -m flows.runner")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--api-url", required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(args.socket, args.api_url)


if __name__ == "__main__":
    main()
