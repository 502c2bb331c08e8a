"""Who owns a staging folder or a claimed name, and cleaning up after runs that died.

A run killed outright (SIGKILL, a power cut, the OOM killer) cannot remove its staging
folder ``.<name>.partial-<run id>``. On a local filesystem :meth:`RunOutput.begin
<pipeline.io.artifacts.RunOutput.begin>` records the process that owns it in
``.owner.json`` inside it (host, pid, the process's start time, boot and pid namespace),
and the next run of that name removes the folders whose owner is certainly dead
(:func:`remove_stale_staging`): same host, boot and pid namespace, and no process with that
pid and start time. Anything else — another host or container, no owner file — is left in
place and logged.

On object stores no process can be asked, so a publisher's claim on ``<name>/`` is a
*lease* (:func:`claim_record`): the claim in ``<name>/metrics.json`` records its run, its
owner (host, pid) and an expiry :data:`LEASE_SECONDS` ahead, which the publisher renews
every :data:`RENEW_SECONDS` while it copies. A claim whose expiry has passed
(:func:`lease_lapsed`) belongs to a run that died (or lost the store for longer than the
lease): the next run of that name removes that run's staging prefix
(:func:`remove_stale_staging`) and takes the name over when it publishes. Other staging
prefixes on object stores are left in place and logged.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.io.stores import Location
from pipeline.secrets import redact

log = logging.getLogger(__name__)

OWNER = ".owner.json"
PUBLISHING = "publishing"  # the status of a claim in <name>/metrics.json
# A claim lasts 2 minutes unless renewed; its publisher renews it every 30 s, so three
# renewals in a row may fail (each S3 call gives up after ~35 s) before it lapses. A name
# left claimed by a killed publisher is free again at most 2 minutes after the kill.
LEASE_SECONDS = 120
RENEW_SECONDS = 30
_RUN_ID = re.compile(r"[0-9a-f]{12}")  # RunOutput's run ids: 12 hex digits


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


# --------------------------------------------------------------------------- leases


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="seconds")


def claim_record(run_id: str, since: str | None = None) -> dict[str, Any]:
    """The claim of run ``run_id`` on a name, leased for :data:`LEASE_SECONDS` from now.

    Parameters
    ----------
    run_id
        The claiming run.
    since
        When the run first claimed the name (kept by renewals); default now.
    """
    now = datetime.now(UTC)
    return {
        "status": PUBLISHING,
        "run_id": run_id,
        "owner": {"host": socket.gethostname(), "pid": os.getpid()},
        "since": since or _iso(now),
        "renewed": _iso(now),
        "lease_seconds": LEASE_SECONDS,
        "expires": _iso(now + timedelta(seconds=LEASE_SECONDS)),
    }


def is_claim(record: dict[str, Any] | None) -> bool:
    """Whether ``record`` (a ``metrics.json``) is a publisher's claim, not a result."""
    return record is not None and record.get("status") == PUBLISHING


def _parsed_time(value: Any) -> datetime | None:
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def lease_expiry(claim: dict[str, Any]) -> datetime | None:
    """When ``claim`` lapses: its ``expires``, or (claims written before leases) its
    ``since`` plus :data:`LEASE_SECONDS`; ``None`` when it records neither."""
    expires = _parsed_time(claim.get("expires"))
    if expires is not None:
        return expires
    since = _parsed_time(claim.get("since"))
    return since + timedelta(seconds=LEASE_SECONDS) if since is not None else None


def lease_lapsed(claim: dict[str, Any]) -> bool:
    """Whether the publisher of ``claim`` stopped renewing it: its expiry has passed (a
    claim without any time is taken as lapsed)."""
    expiry = lease_expiry(claim)
    return expiry is None or expiry <= datetime.now(UTC)


def describe_claim(claim: dict[str, Any]) -> str:
    """``run <id> (host <host>, pid <pid>), claim expires <time>`` for messages."""
    owner = claim.get("owner") if isinstance(claim.get("owner"), dict) else {}
    expiry = lease_expiry(claim)
    until = _iso(expiry) if expiry is not None else "unknown"
    return (
        f"run {claim.get('run_id')} (host {owner.get('host', '?')}, pid "
        f"{owner.get('pid', '?')}), claim expires {until}"
    )


def staging_of(root: str, name: str, run_id: Any) -> str | None:
    """The staging prefix of run ``run_id`` of ``name`` under ``root`` (``None`` for an
    id that is not one of ours, so a claim's content never names another path)."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        return None
    return f"{root.rstrip('/')}/.{name}.partial-{run_id}"


def _read_claim(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        fs.invalidate_cache(path)
        record = json.loads(fs.cat_file(path))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and is_claim(record) else None


def _remove_lapsed_claims_staging(fs: Any, root: str, name: str) -> list[str]:
    """Object stores: remove the staging prefix of the run whose claim on ``name`` lapsed."""
    claim = _read_claim(fs, f"{root.rstrip('/')}/{name}/metrics.json")
    if claim is None or not lease_lapsed(claim):
        return []
    staging = staging_of(root, name, claim.get("run_id"))
    if staging is None or not fs.exists(staging):
        return []
    fs.rm(staging, recursive=True)
    fs.invalidate_cache(staging)
    log.info(
        "removed %s, the staging of a publisher whose claim lapsed (%s)",
        redact(fs.unstrip_protocol(staging)),
        describe_claim(claim),
    )
    return [staging]


def _remove_stale_object_staging(out: Location, name: str) -> list[str]:
    """:func:`remove_stale_staging` on an object store: only a lapsed claim's staging."""
    fs, root = out.fs, out.path
    try:
        removed = _remove_lapsed_claims_staging(fs, root, name)
        found = fs.glob(f"{root.rstrip('/')}/.{name}.partial-*")
    except Exception:  # cleaning up is a courtesy here: the run goes on
        return []
    if found:
        log.info(
            "%d staging folder(s) of other runs of %s at %s left in place (on an object "
            "store only a lapsed claim tells that a run died)",
            len(found),
            name,
            out.display,
        )
    return removed


def remove_local(path: str) -> None:
    """Remove the local folder ``path``; a symbolic link is unlinked (what it points to
    is left alone); a missing path is fine."""
    if os.path.islink(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    shutil.rmtree(path, ignore_errors=True)


def remove_dead_local(folder: str, name: str) -> list[str]:
    """Remove the hidden ``.<name>.partial-*`` folders in the local ``folder`` whose owner
    process is certainly dead (see :func:`owner_dead`); return them.

    Folders of live runs, of other hosts and without an owner record are left and logged.
    """
    removed = []
    pattern = os.path.join(glob.escape(folder), glob.escape(f".{name}.partial-"))
    for staging in sorted(glob.glob(pattern + "*")):
        owner = _owner_of(staging) if os.path.isdir(staging) else None
        dead = owner_dead(owner) if owner else None
        if dead:
            remove_local(staging)
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


def remove_stale_staging(out: Location, name: str) -> list[str]:
    """Remove the staging folders of ``name`` whose owner is dead; return them.

    Locally: folders whose owner process is certainly gone (:func:`remove_dead_local`).
    On object stores: the staging prefix of a publisher whose claim on ``name`` lapsed.
    Never raises for what it finds: a folder it cannot judge or remove is logged and left.
    """
    if not out.local:
        return _remove_stale_object_staging(out, name)
    return remove_dead_local(out.path, name)


__all__ = [
    "LEASE_SECONDS",
    "OWNER",
    "PUBLISHING",
    "RENEW_SECONDS",
    "claim_record",
    "describe_claim",
    "is_claim",
    "lease_expiry",
    "lease_lapsed",
    "owner_dead",
    "owner_record",
    "remove_dead_local",
    "remove_local",
    "remove_owner",
    "remove_stale_staging",
    "staging_of",
    "write_owner",
]


@contextmanager
def written_aside(path: str) -> Iterator[str]:
    """A hidden folder beside local ``path`` to write a store into, renamed into place when
    the block ends (atomic on one disk) and removed when it fails. When another run put
    its complete store in place meanwhile, that one is kept.

    The store is written in ``.<name>.partial-<id>/store``; its hidden parent also records
    the owner process (outside the store, which Zarr may clear when it creates it), so the
    leftovers of a writer killed outright are removed by the next writer of ``path`` (see
    :func:`remove_dead_local`).
    """
    final = os.path.abspath(path)
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    remove_dead_local(parent, name)
    aside = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:12]}")
    os.mkdir(aside)  # honours the umask, unlike mkdtemp's 0700
    try:
        write_owner(aside)
        store = os.path.join(aside, "store")
        os.mkdir(store)
        yield store
        try:
            os.rename(store, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            log.info("%s was created meanwhile by another run; using it", final)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
