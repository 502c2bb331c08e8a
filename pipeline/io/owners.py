"""Who owns a staging folder, and removing the staging folders of runs that died.

A run killed outright (SIGKILL, a power cut, the OOM killer) cannot remove its staging
folder ``.<name>.partial-<run id>``. On a local filesystem :meth:`RunOutput.begin
<pipeline.io.artifacts.RunOutput.begin>` records the process that owns it in
``.owner.json`` inside it (host, pid, the process's start time, boot and pid namespace),
and the next run of that name removes the folders whose owner is certainly dead
(:func:`remove_stale_staging`): same host, boot and pid namespace, and no process with that
pid and start time. Anything else — another host or container, no owner file, an object
store (no local process to ask) — is left in place and logged.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
from typing import Any

from pipeline.config import OutputSpec, redact
from pipeline.io.stores import is_local, split_url

log = logging.getLogger(__name__)

OWNER = ".owner.json"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), else ``None``."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # Field 22; the command name (field 2) may hold spaces, so count from its ")".
    return int(stat.rsplit(")", 1)[1].split()[19])


def _boot_id() -> str | None:
    boot = _read("/proc/sys/kernel/random/boot_id")
    return boot.strip() if boot else None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def owner_record() -> dict[str, Any]:
    """This process as the owner of a staging folder."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start_ticks": _start_ticks(pid),
        "boot_id": _boot_id(),
        "pid_namespace": _pid_namespace(),
    }


def write_owner(staging: str) -> None:
    """Record this process as the owner of the local staging folder ``staging``."""
    with open(os.path.join(staging, OWNER), "w") as f:
        json.dump(owner_record(), f)


def remove_owner(staging: str) -> None:
    """Drop the owner record before the folder is published (it is no run's business)."""
    try:
        os.remove(os.path.join(staging, OWNER))
    except FileNotFoundError:
        pass


def owner_dead(owner: dict[str, Any]) -> bool | None:
    """``True`` when the owner process is certainly gone, ``False`` when it runs, ``None``
    when this host cannot tell (another host, container or an unreadable record)."""
    me = owner_record()
    if owner.get("host") != me["host"] or owner.get("pid_namespace") != me["pid_namespace"]:
        return None
    if owner.get("boot_id") != me["boot_id"]:
        return True  # the machine restarted since
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    started = owner.get("start_ticks")
    return started is not None and _start_ticks(pid) not in (None, started)  # pid reused


def _owner_of(staging: str) -> dict[str, Any] | None:
    text = _read(os.path.join(staging, OWNER))
    try:
        owner = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    return owner if isinstance(owner, dict) else None


def remove_stale_staging(spec: OutputSpec, name: str) -> list[str]:
    """Remove the staging folders of ``name`` whose owner process is dead; return them.

    Never raises for what it finds: a folder it cannot judge or remove is logged and left.
    """
    fs, root = split_url(spec.url, spec.storage_options)
    pattern = f"{root.rstrip('/')}/.{name}.partial-*"
    if not is_local(fs):
        try:
            found = fs.glob(pattern)
        except Exception:  # listing is a courtesy here: the run goes on
            found = []
        if found:
            log.info(
                "%d staging folder(s) of other runs of %s at %s left in place (on an object "
                "store this run cannot tell whether their runs are alive)",
                len(found),
                name,
                redact(spec.url),
            )
        return []
    removed = []
    for staging in sorted(glob.glob(glob.escape(pattern[:-1]) + "*")):
        owner = _owner_of(staging) if os.path.isdir(staging) else None
        dead = owner_dead(owner) if owner else None
        if dead:
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
            log.info(
                "removed %s, the staging folder of a run that died (pid %s)",
                staging,
                owner.get("pid") if owner else "?",
            )
        elif dead is None:
            where = f"host {owner.get('host')}" if owner else "no owner recorded"
            log.info("left %s in place: its run may be alive (%s)", staging, where)
    return removed


__all__ = [
    "OWNER",
    "owner_dead",
    "owner_record",
    "remove_owner",
    "remove_stale_staging",
    "write_owner",
]
