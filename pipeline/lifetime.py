"""What lives and dies with a ``factorize`` process: signals and the temporary Prefect API.

SIGTERM becomes :class:`Terminated` in the main thread (like SIGINT's
``KeyboardInterrupt``), so a run unwinds the same way: the job's staging folder is
removed, the Dask cluster closed, the flow run marked crashed, one line on stderr.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server itself, on its first API
call, as a plain child process: a terminal's Ctrl-C (SIGINT to the whole process group)
kills it mid-run, and SIGTERM or SIGKILL of the CLI leave it running. :func:`start_api_server`
starts the same server (same command and environment as Prefect 3.8's
``SubprocessASGIServer``) before Prefect is imported, so that it

- runs in its own session: a terminal's signals do not reach it;
- gets SIGKILL from the kernel when this process dies, however it dies
  (``prctl(PR_SET_PDEATHSIG)``);
- is stopped (SIGTERM, then SIGKILL after 5 s) when this process exits.

This module imports nothing from Prefect: it only runs ``python -m uvicorn`` on Prefect's
server app.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

# Offline and start-up settings (``flows.OFFLINE_ENV`` extends them); values already set win.
SERVER_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}
# What Prefect's SubprocessASGIServer adds for its ephemeral server (no UI).
_EPHEMERAL_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}
_PR_SET_PDEATHSIG = 1
_PORT_IN_USE = 3  # uvicorn's exit status when it cannot bind


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread (an interrupt: ``except Exception`` skips it)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def raise_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread.

    Prefect's flow engine swaps in its own handler while a flow runs (it raises
    ``TerminationSignal``, marks the flow run crashed, then restores this handler and sends
    SIGTERM again), so a run ends in :class:`Terminated` either way.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


# --------------------------------------------------------------------------- Prefect API


def needs_api_server(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """True when Prefect would start a temporary server: no API URL in the environment
    or in the active profile of ``PREFECT_HOME/profiles.toml``, and Prefect not imported
    yet (once imported, its settings are fixed: it starts its own server)."""
    if environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return False
    home = Path(environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    try:
        profiles = tomllib.loads((home / "profiles.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return True
    active = environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    profile = profiles.get("profiles", {}).get(active, {})
    return not (isinstance(profile, dict) and profile.get("PREFECT_API_URL"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _death_signal_setter(parent: int) -> Callable[[], None]:
    """The child's pre-exec step: SIGKILL when ``parent`` dies (even by SIGKILL).

    ``prctl`` is looked up here, in the parent: the child runs only the call (other
    threads' locks, e.g. the dynamic loader's, may be held at fork).
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    sigkill = int(signal.SIGKILL)

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody would stop us
            os._exit(1)

    return set_death_signal


class ApiServer:
    """Prefect's API server as a child process that dies with this one.

    Parameters
    ----------
    timeout : seconds to wait for ``/api/health``; default
        ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (180)
    services : run the server's background services too (the scheduler among them,
        which ``serve`` needs for its schedules); Prefect's ephemeral server runs
        almost none
    """

    def __init__(self, timeout: float | None = None, services: bool = False) -> None:
        self.services = services
        self.timeout = timeout or float(
            os.environ.get(
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                SERVER_DEFAULTS["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"],
            )
        )
        self.port = 0
        self._t0 = 0.0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        """``http://127.0.0.1:<port>/api``."""
        return f"http://127.0.0.1:{self.port}/api"

    def _command(self) -> list[str]:
        spec = importlib.util.find_spec("prefect")  # finds, does not import, Prefect
        if spec is None or spec.origin is None:
            raise RuntimeError("prefect is not installed")
        app_dir = Path(spec.origin).parent.parent
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(app_dir),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]

    def _spawn(self) -> None:
        self.port = _free_port()
        env = {**SERVER_DEFAULTS, **os.environ, **_EPHEMERAL_ENV}
        if self.services:
            del env["PREFECT__SERVER_EPHEMERAL"]
        sys.stdout.flush()
        self.process = subprocess.Popen(
            self._command(),
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,  # our stderr is for the one-line verdict only
            start_new_session=True,  # a terminal's Ctrl-C is for us, not for the server
            preexec_fn=_death_signal_setter(os.getpid()),
        )

    def start(self) -> None:
        """Start the server; set ``PREFECT_API_URL`` for this process and its children.

        Call from the main thread (the kernel ties the death signal to the thread that
        started the child), before Prefect is imported; then :meth:`wait` before the first
        API call (importing Prefect in between overlaps the two start-ups).
        """
        self._t0 = time.monotonic()
        atexit.register(self.stop)
        self._spawn()
        os.environ["PREFECT_API_URL"] = self.api_url
        log.debug("starting a temporary Prefect API server on %s", self.api_url)

    def wait(self) -> None:
        """Return once ``/api/health`` answers.

        Raises
        ------
        RuntimeError
            The server exited or did not answer within ``timeout`` seconds.
        """
        while not self._healthy():
            assert self.process is not None, "start() first"
            code = self.process.poll()
            if code == _PORT_IN_USE:  # another process took the port: try another
                self._spawn()
                os.environ["PREFECT_API_URL"] = self.api_url
            elif code is not None:
                raise RuntimeError(
                    f"the temporary Prefect API server exited with status {code} "
                    "(its output is in the log above)"
                )
            elif time.monotonic() - self._t0 > self.timeout:
                self.stop()
                raise RuntimeError(
                    f"the temporary Prefect API server did not answer within {self.timeout:g} "
                    "s; raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
                )
            time.sleep(0.1)
        log.debug("Prefect API ready after %.1f s", time.monotonic() - self._t0)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM; SIGKILL after 5 s). Safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_pending: ApiServer | None = None  # started by start_api_server, not yet answering


def start_api_server(services: bool = False) -> None:
    """Start a temporary Prefect API server when Prefect would start one (see the module
    docstring), without waiting for it: call :func:`wait_api_server` before the first API
    call. Call before Prefect is imported; a no-op when an API URL is configured.
    ``services``: with the server's scheduler and other services (see :class:`ApiServer`).
    """
    global _pending
    if _pending is None and needs_api_server():
        _pending = ApiServer(services=services)
        _pending.start()


def wait_api_server() -> None:
    """Return once the server :func:`start_api_server` started answers (no-op without one)."""
    global _pending
    if _pending is not None:
        _pending.wait()
        _pending = None


__all__ = [
    "ApiServer",
    "Terminated",
    "needs_api_server",
    "raise_on_sigterm",
    "start_api_server",
    "wait_api_server",
]
