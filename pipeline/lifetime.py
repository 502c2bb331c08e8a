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

A server that outlives one command is started on request (``factorize server start``,
:func:`start_owned_server`): a detached process (:mod:`flows.server`) that records itself
in ``PREFECT_HOME/zarr-factorize-server.json``, stops itself after an idle timeout and on
``factorize server stop``. Runs use it when no ``PREFECT_API_URL`` is configured
(:func:`choose_api_server`), so they skip the server's start-up and their links keep working.

This module imports nothing from Prefect: it only runs ``python -m uvicorn`` on Prefect's
server app, or ``python -m flows.server``.
"""

from __future__ import annotations

import array
import atexit
import ctypes
import importlib.util
import json
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from pipeline.errors import UserError

log = logging.getLogger(__name__)

# Offline and start-up settings (``flows.OFFLINE_ENV`` extends them); values already set win.
SERVER_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}
# What importing ``flows`` sets as well (unless set): the environment every run sees.
OFFLINE_ENV = {
    **SERVER_DEFAULTS,
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline,flows",
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


UNWIND_GRACE_S = 45.0  # after SIGINT or SIGTERM, the longest a run may take to end


def raise_on_signals(on_overdue: Callable[[int], None], grace: float = UNWIND_GRACE_S) -> None:
    """Make SIGINT raise ``KeyboardInterrupt`` and SIGTERM :class:`Terminated` in the main
    thread, and bound how long the run may then take to end: ``on_overdue(signum)`` runs
    in a timer thread if this process is still alive ``grace`` seconds after the first of
    them (it should end the process).

    The bound is for Prefect's crash report: once the interrupt has unwound our code (the
    staging folder removed, the cluster closed) Prefect sends the flow run's CRASHED
    state, and retries an API that answers slowly or with errors for minutes (5 retries
    with backoff, each up to its request timeout) — seen once with the temporary server
    under load. Prefect's flow engine swaps in its own SIGTERM handler while a flow runs
    (it raises ``TerminationSignal``, marks the flow run crashed, then restores this
    handler and sends SIGTERM again), so a run ends in :class:`Terminated` either way.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    timers: list[threading.Timer] = []

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if not timers:
            timers.append(threading.Timer(grace, on_overdue, args=(signum,)))
            timers[0].daemon = True
            timers[0].start()
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


# --------------------------------------------------------------------------- Prefect API


def prefect_home(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """``PREFECT_HOME`` (default ``~/.prefect``): Prefect's database and our server record."""
    return Path(environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def _profile_api_url(environ: dict[str, str] | os._Environ[str]) -> str | None:
    """``PREFECT_API_URL`` of the active profile in ``PREFECT_HOME/profiles.toml``."""
    try:
        profiles = tomllib.loads((prefect_home(environ) / "profiles.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    profile = profiles.get("profiles", {}).get(active, {})
    url = profile.get("PREFECT_API_URL") if isinstance(profile, dict) else None
    return url or None


def needs_api_server(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """True when Prefect would start a temporary server: no API URL in the environment
    or in the active profile of ``PREFECT_HOME/profiles.toml``, and Prefect not imported
    yet (once imported, its settings are fixed: it starts its own server)."""
    if environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return False
    return _profile_api_url(environ) is None


def _healthy(api_url: str, timeout: float = 2) -> bool:
    """Whether ``<api_url>/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def death_signal_setter(parent: int) -> Callable[[], None]:
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
            preexec_fn=death_signal_setter(os.getpid()),
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
        while not _healthy(self.api_url):
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


# --------------------------------------------------------------------------- lasting server

OWNED_RECORD = "zarr-factorize-server.json"  # in PREFECT_HOME, while our server runs
OWNED_LOG = "zarr-factorize-server.log"
DEFAULT_PORT = 4200  # Prefect's own default port
DEFAULT_IDLE_MINUTES = 60.0


@dataclass(frozen=True)
class OwnedServer:
    """A lasting Prefect server that ``factorize server start`` started (its record).

    Attributes
    ----------
    pid : its process
    port : on 127.0.0.1
    idle_timeout : seconds without a run after which it stops itself (0: never)
    started : ``time.time()`` of its start
    """

    pid: int
    port: int
    idle_timeout: float
    started: float

    @property
    def url(self) -> str:
        """The UI's address."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        """The API's address (``PREFECT_API_URL``)."""
        return f"{self.url}/api"


def owned_record(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """Where the lasting server records itself: ``PREFECT_HOME/zarr-factorize-server.json``."""
    return prefect_home(environ) / OWNED_RECORD


def write_owned_record(path: Path, server: OwnedServer) -> None:
    """Record ``server`` at ``path`` (written aside, then renamed: readers never see half)."""
    part = path.with_name(f".{path.name}.{os.getpid()}")
    part.write_text(json.dumps(asdict(server)))
    os.replace(part, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process reuses the PID
        return False
    return True


def read_owned_server(
    environ: dict[str, str] | os._Environ[str] = os.environ,
) -> OwnedServer | None:
    """The lasting server of this ``PREFECT_HOME`` when it runs and answers, else ``None``
    (a record left by a server that died is removed)."""
    path = owned_record(environ)
    try:
        server = OwnedServer(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        server = None
    if server is not None and _alive(server.pid) and _healthy(server.api_url):
        return server
    if server is None or not _alive(server.pid):
        path.unlink(missing_ok=True)
    return None


def mark_used(environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Tell the lasting server a run used it now (it measures idleness from the record's
    modification time)."""
    try:
        os.utime(owned_record(environ))
    except OSError:  # it stopped meanwhile: the run goes on with its API URL regardless
        pass


def _port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:``port`` (as uvicorn binds: connections
    of a stopped server waiting out TIME_WAIT do not hold the port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class ServerStartError(UserError, RuntimeError):
    """The lasting server could not start: its port is taken, or it exited (exit code 2)."""


def _ui_env(port: int) -> dict[str, str]:
    """Its UI on, calling this port's API (the UI's default is port 4200's)."""
    origin = f"http://127.0.0.1:{port}"
    return {
        "PREFECT_SERVER_UI_ENABLED": "true",
        "PREFECT_UI_URL": origin,
        "PREFECT_UI_API_URL": f"{origin}/api",
    }


def start_owned_server(
    port: int = DEFAULT_PORT,
    idle_minutes: float = DEFAULT_IDLE_MINUTES,
    timeout: float | None = None,
) -> tuple[OwnedServer, bool]:
    """Start the lasting server of this ``PREFECT_HOME`` unless it runs already.

    It is a detached process (its own session: it outlives this one) that serves
    Prefect's API and UI on 127.0.0.1:``port`` with the server's services, records itself
    (:func:`owned_record`) and stops itself after ``idle_minutes`` without a run (0: never),
    on SIGTERM, or with :func:`stop_owned_server`. Its output goes to
    ``PREFECT_HOME/zarr-factorize-server.log``.

    Returns
    -------
    (server, started) : ``started`` is False when it was running already.

    Raises
    ------
    ServerStartError
    """
    running = read_owned_server()
    if running is not None:
        return running, False
    if not _port_free(port):
        raise ServerStartError(f"port {port} on 127.0.0.1 is in use; choose another with --port")
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    record = owned_record()
    log_path = home / OWNED_LOG
    env = {**SERVER_DEFAULTS, **os.environ, **_ui_env(port)}
    env.pop("PREFECT_API_URL", None)  # the server is the API
    command = [sys.executable, "-m", "flows.server", "--port", str(port)]
    command += ["--idle-minutes", f"{idle_minutes:g}", "--record", str(record)]
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # lasting: no terminal signal or our exit reaches it
        )
    limit = timeout or float(env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    deadline = time.monotonic() + limit
    while (server := read_owned_server()) is None:
        if process.poll() is not None:
            raise ServerStartError(
                f"the Prefect server exited with status {process.returncode}; see {log_path}"
            )
        if time.monotonic() > deadline:
            process.terminate()
            raise ServerStartError(f"the Prefect server did not answer within {limit:g} s")
        time.sleep(0.2)
    return server, True


def stop_owned_server(timeout: float = 15) -> OwnedServer | None:
    """Stop the lasting server of this ``PREFECT_HOME`` (SIGTERM, SIGKILL after
    ``timeout`` s); return it, or ``None`` when none was running."""
    path = owned_record()
    try:
        server = OwnedServer(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        path.unlink(missing_ok=True)
        return None
    if _alive(server.pid):
        os.kill(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(server.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(server.pid):
            os.kill(server.pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return server


# --------------------------------------------------------------------------- warm runs

WARM_SOCKET = "zarr-factorize-runner.sock"  # in PREFECT_HOME, while the warm runner listens
WARM_FDS = 3  # stdin, stdout, stderr
WARM_MAX_MESSAGE = 1 << 20
# Prefect settings a warm run may differ in: its runner sets the server's addresses itself.
_PER_RUN_SETTINGS = (
    "PREFECT_API_URL",
    "PREFECT_SERVER_UI_ENABLED",
    "PREFECT_UI_URL",
    "PREFECT_UI_API_URL",
)


# Set in a process the warm runner forked for a run: the runner's PID (for the run's log).
warm_run_of: int | None = None


def warm_socket(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """Where the lasting server's warm runner listens (see :mod:`flows.runner`)."""
    return prefect_home(environ) / WARM_SOCKET


def prefect_settings_env(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The ``PREFECT_*`` variables a process with ``environ`` runs with once ``flows`` is
    imported (:data:`OFFLINE_ENV` filling the unset ones), less the per-run ones."""
    merged = {**OFFLINE_ENV, **environ}
    return {
        k: v for k, v in merged.items() if k.startswith("PREFECT_") and k not in _PER_RUN_SETTINGS
    }


def _request(argv: Sequence[str]) -> bytes:
    message = {"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ)}
    return json.dumps(message).encode() + b"\n"


def _relay_signals(pid: int) -> None:
    """Send this process's SIGINT, SIGTERM and SIGHUP on to the warm run ``pid``."""

    def relay(signum: int, frame: FrameType | None) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, relay)


def _messages(conn: socket.socket) -> Iterator[dict[str, Any]]:
    """The runner's newline-separated JSON messages, until it closes the connection."""
    buffer = b""
    while True:
        try:
            chunk = conn.recv(65536)
        except InterruptedError:  # pragma: no cover - PEP 475 retries recv
            continue
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield json.loads(line)


def run_warm(argv: Sequence[str]) -> int | None:
    """Run ``factorize ARGV`` in the warm runner of this ``PREFECT_HOME``'s lasting server
    (see :mod:`flows.runner`), with this process's files, folder and environment; return
    its exit status, or ``None`` when there is no such runner, no lasting server is the
    API this run would use, or the runner declines (then run here).

    Call from the main thread: SIGINT, SIGTERM and SIGHUP are relayed to the run.
    """
    if not needs_api_server() or read_owned_server() is None:
        return None
    path = warm_socket()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        fds = array.array("i", range(WARM_FDS))
        conn.sendmsg([_request(argv)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        messages = _messages(conn)
        first = next(messages, {"declined": "the runner closed the connection"})
    except (OSError, ValueError) as exc:
        log.debug("no warm run (%s): running in this process", exc)
        conn.close()
        return None
    if "pid" not in first:
        log.debug("warm run declined (%s): running in this process", first.get("declined"))
        conn.close()
        return None
    mark_used()
    _relay_signals(first["pid"])
    code = 1  # the run died before it reported its status
    for message in messages:
        code = message.get("exit", code)
    conn.close()
    return code


# --------------------------------------------------------------------------- which API


@dataclass(frozen=True)
class ApiChoice:
    """The Prefect API a command uses.

    Attributes
    ----------
    kind : ``configured`` (``PREFECT_API_URL`` or the active profile), ``owned`` (the
        lasting server of :func:`start_owned_server`) or ``temporary`` (a server that dies
        with this process; its records stay in ``PREFECT_HOME``'s database)
    api_url : the API's address, when known before Prefect is imported
    """

    kind: str
    api_url: str | None = None

    @property
    def lasting(self) -> bool:
        """Whether the server outlives this process (so a link to a run keeps working)."""
        return self.kind != "temporary"


_pending: ApiServer | None = None  # started by start_api_server, not yet answering


def start_api_server(services: bool = False) -> ApiChoice:
    """Choose this process's Prefect API before Prefect is imported: a configured one, the
    running lasting server (see :func:`start_owned_server`), or a temporary server started
    now without waiting for it (see the module docstring) — call :func:`wait_api_server`
    before the first API call. ``services``: the temporary server runs the server's
    scheduler and other services (see :class:`ApiServer`).
    """
    global _pending
    if _pending is not None:
        return ApiChoice("temporary", _pending.api_url)
    if not needs_api_server():  # configured, or Prefect imported already (then its own)
        url = os.environ.get("PREFECT_API_URL") or _profile_api_url(os.environ)
        return ApiChoice("configured" if url else "temporary", url)
    owned = read_owned_server()
    if owned is not None:
        os.environ["PREFECT_API_URL"] = owned.api_url
        mark_used()
        return ApiChoice("owned", owned.api_url)
    _pending = ApiServer(services=services)
    _pending.start()
    return ApiChoice("temporary", _pending.api_url)


def wait_api_server() -> None:
    """Return once the server :func:`start_api_server` started answers (no-op without one)."""
    global _pending
    if _pending is not None:
        _pending.wait()
        _pending = None


__all__ = [
    "ApiChoice",
    "ApiServer",
    "OwnedServer",
    "ServerStartError",
    "Terminated",
    "death_signal_setter",
    "mark_used",
    "needs_api_server",
    "prefect_home",
    "raise_on_signals",
    "read_owned_server",
    "run_warm",
    "start_api_server",
    "start_owned_server",
    "stop_owned_server",
    "wait_api_server",
]
