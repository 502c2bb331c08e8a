"""Dask clusters from the ``cluster:`` section of a job."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import dask.array as da
from distributed import Client

from pipeline.errors import ClusterError, ConfigError, WorkersTimeoutError, first_line
from pipeline.memory import PERSIST_FRACTION, Workers, scheduler_workers, will_keep, workers_of
from pipeline.sections import ClusterSpec

if TYPE_CHECKING:
    from distributed import LocalCluster

log = logging.getLogger(__name__)

# Threads of a local-cuda worker (one worker per GPU): blocks are decoded on the host by
# one thread while another's block products run on the device.
GPU_WORKER_THREADS = 4

_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# Imported by each worker of the local clusters we start (see pipeline.worker_setup).
WORKER_PRELOAD = ["pipeline.worker_setup"]


def available_cores() -> int:
    """CPU cores this process may use (honours affinity masks and cgroups via sched)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def local_defaults(spec: ClusterSpec) -> dict[str, Any]:
    """LocalCluster arguments chosen from the machine.

    Linear algebra runs in BLAS, which releases the GIL but should not oversubscribe:
    by default one worker process per core with one thread, and BLAS in each worker
    limited to the worker's thread count.
    """
    cores = available_cores()
    threads = spec.threads_per_worker or 1
    workers = spec.n_workers or max(1, cores // threads)
    blas = {name: str(threads) for name in _BLAS_ENV}
    return {
        "n_workers": workers,
        "threads_per_worker": threads,
        "memory_limit": spec.memory_limit,
        "processes": True,
        "dashboard_address": ":0",
        "env": blas,
        "preload": WORKER_PRELOAD,
    }


def check_cluster_available(spec: ClusterSpec) -> None:
    """Fail fast, before anything starts, when the cluster kind cannot work here.

    Raises
    ------
    ClusterError
    """
    if spec.kind == "class":
        check_cluster_class(spec)
    if spec.kind == "scheduler-file":
        check_scheduler_file(spec)
    if spec.kind == "local-cuda":
        import importlib.util

        if importlib.util.find_spec("dask_cuda") is None:
            raise ClusterError(
                "cluster.kind: local-cuda needs dask-cuda and cupy; install them with "
                "pip install 'zarr-factorize[gpu-cu12]' (CUDA 12) or '[gpu-cu13]' (CUDA 13)"
            )


@contextmanager
def cluster_from_spec(spec: ClusterSpec) -> Iterator[Client]:
    """Yield a ``distributed.Client`` for the job's cluster, closing what it started.

    ``dask_config`` is set for the duration (before a cluster class is imported, as
    dask-jobqueue reads its defaults from it); with ``wait_for_workers`` the job waits for
    that many workers, then fails instead of hanging.

    Raises
    ------
    ClusterError
        When the scheduler cannot be reached, the class cannot be built, or ``local-cuda``
        lacks dask-cuda.
    WorkersTimeoutError
        Fewer than ``wait_for_workers.n`` workers within its timeout.
    """
    import dask

    with dask.config.set(spec.dask_config), _kind_client(spec) as client:
        if spec.wait_for_workers is not None:
            wait_for_workers(client, spec.wait_for_workers.n, spec.wait_for_workers.timeout)
        yield client


@contextmanager
def _kind_client(spec: ClusterSpec) -> Iterator[Client]:
    """The client of ``spec.kind``'s cluster (see :func:`cluster_from_spec`)."""
    if spec.kind == "class":
        with _class_client(spec) as client:
            yield client
        return
    if spec.kind == "scheduler-file":
        with _scheduler_file_client(spec) as client:
            yield client
        return
    if spec.kind == "address":
        shared = _client_for(spec.address)
        if shared is not None:  # a batch in this process already holds one: share it
            log.info("using this process's client of scheduler %s", spec.address)
            yield shared
            return
        try:
            client = Client(spec.address, timeout=spec.connect_timeout, set_as_default=True)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cluster.address: cannot connect to {spec.address} within "
                f"{spec.connect_timeout:g} s ({type(exc).__name__}); is the scheduler running?"
            ) from None
        log.info("connected to scheduler %s; dashboard: %s", spec.address, client.dashboard_link)
        try:
            with client.as_current():  # wins over an enclosing client's context
                yield client
        finally:
            client.close()
        return

    if spec.kind == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise ClusterError(
                "cluster.kind: local-cuda needs dask-cuda and cupy; install them with "
                "pip install 'zarr-factorize[gpu-cu12]' (CUDA 12) or '[gpu-cu13]' (CUDA 13)"
            ) from None
        kwargs = {
            "dashboard_address": ":0",
            "memory_limit": spec.memory_limit,
            # one worker per GPU; more than one thread, so the next block is read and
            # decoded on the host while the device works on this one
            "threads_per_worker": spec.threads_per_worker or GPU_WORKER_THREADS,
            "preload": WORKER_PRELOAD,
        }
        if spec.n_workers:
            kwargs["n_workers"] = spec.n_workers
        cluster = LocalCUDACluster(**kwargs)
    else:
        cluster = _take_prestarted(spec) or _local_cluster(spec)
    try:
        with Client(cluster, set_as_default=True) as client:
            info = scheduler_workers(client).values()
            total = sum(w.get("memory_limit", 0) for w in info)
            log.info(
                "started %s with %d workers × %d threads, %.1f GiB memory; dashboard: %s",
                type(cluster).__name__,
                len(info),
                max((w.get("nthreads", 0) for w in info), default=0),
                total / 2**30,
                client.dashboard_link,
            )
            yield client
    finally:
        _close_in_background(cluster)


# Threads closing the clusters this module started (see _close_in_background).
_CLOSING: list[threading.Thread] = []


def _close_in_background(cluster: Any) -> None:
    """Close a cluster this module started without waiting for it: the job's results are in
    hand by then, and its workers' exit (a few tenths of a second here) overlaps what the
    run does next (publishing). The thread is not a daemon: the interpreter waits for it
    at exit, :func:`wait_closed` earlier."""
    thread = threading.Thread(target=cluster.close, name="close-cluster")
    thread.start()
    _CLOSING.append(thread)


def wait_closed() -> None:
    """Wait until the clusters being closed in the background are closed."""
    while _CLOSING:
        _CLOSING.pop().join()


def _local_cluster(spec: ClusterSpec) -> LocalCluster:
    from distributed import LocalCluster

    try:
        return LocalCluster(**local_defaults(spec))
    except ValueError as exc:  # e.g. an unparsable memory_limit
        raise ClusterError(f"cluster: cannot start a LocalCluster: {exc}") from None


# LocalClusters started ahead of their job (see prestart), by their spec's JSON.
_PRESTARTED: dict[str, Future[LocalCluster]] = {}


def prestart(spec: ClusterSpec) -> None:
    """Start the ``local`` cluster of ``spec`` in a background thread, so that its worker
    processes start while the caller does other start-up work (``factorize run`` imports
    Prefect and waits for its API meanwhile); :func:`cluster_from_spec` takes it.

    Other kinds, and specs with ``dask_config`` (set process-wide for the cluster's
    lifetime), start when the job needs them. Call :func:`discard_prestarted` when done.
    """
    key = spec.model_dump_json()
    if spec.kind != "local" or spec.dask_config or key in _PRESTARTED:
        return
    future: Future[LocalCluster] = Future()

    def start() -> None:
        try:
            cluster = _local_cluster(spec)
            _warm_up(cluster)
            future.set_result(cluster)
        except BaseException as exc:  # handed to the job that takes it
            future.set_exception(exc)

    _PRESTARTED[key] = future
    threading.Thread(target=start, name="prestart-cluster", daemon=True).start()


# Modules the first tasks of a pass import: the block kernels and the block readers.
KERNEL_MODULES = ("pipeline.linalg", "pipeline.io.fastread")


def _warm_up(cluster: LocalCluster) -> None:
    """Have each worker import :data:`KERNEL_MODULES` now, while the run starts (tasks
    left to finish on their own), rather than inside the first task of the first pass."""
    import importlib

    from distributed import fire_and_forget

    with Client(cluster, set_as_default=False) as client:
        for address in scheduler_workers(client):
            for module in KERNEL_MODULES:
                task = client.submit(
                    importlib.import_module,
                    module,
                    workers=[address],
                    allow_other_workers=False,
                    pure=False,
                )
                fire_and_forget(task)


def _take_prestarted(spec: ClusterSpec) -> LocalCluster | None:
    """The cluster :func:`prestart` started for an equal spec (waiting for it), if any."""
    future = _PRESTARTED.pop(spec.model_dump_json(), None)
    return None if future is None else future.result()


def discard_prestarted() -> None:
    """Close the clusters :func:`prestart` started that no job took (e.g. after an error),
    and wait for those being closed in the background."""
    while _PRESTARTED:
        _, future = _PRESTARTED.popitem()
        try:
            future.result().close()
        except Exception as exc:  # it failed to start: nothing to close
            log.debug("a cluster started ahead of its job failed: %s", exc)
    wait_closed()


_ADAPTIVE: set[int] = set()  # ids of the clients of adaptive clusters (see keep_in_memory)


def import_cluster_class(path: str) -> type:
    """The class named by the dotted ``path``.

    Raises
    ------
    ConfigError
        The module or the name does not exist, or is not a class.
    """
    import importlib

    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"cluster.cluster_class: cannot import {path!r} ({first_line(exc)}); "
            "is its package installed?"
        ) from None
    if not isinstance(cls, type):
        raise ConfigError(f"cluster.cluster_class: {path!r} is not a class")
    return cls


def _accepted_kwargs(cls: type) -> set[str] | None:
    """Keyword arguments ``cls(...)`` accepts, or ``None`` when it takes any.

    dask-jobqueue clusters take ``**job_kwargs`` on to their ``job_cls``: its ``__init__``
    and those of its bases are searched too.
    """
    import inspect

    def named(func: Any) -> tuple[set[str], bool]:
        params = inspect.signature(func).parameters.values()
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return names - {"self"}, any(p.kind == p.VAR_KEYWORD for p in params)

    names, open_ended = named(cls)
    if not open_ended:
        return names
    job = getattr(cls, "job_cls", None)
    if not isinstance(job, type):
        return None
    for base in inspect.getmro(job):
        if "__init__" in vars(base) and base is not object:
            more, open_ended = named(base.__init__)
            names |= more
            if not open_ended:
                return names
    return names


def check_cluster_class(spec: ClusterSpec) -> type:
    """Import ``cluster_class`` (with ``dask_config`` set) and check ``cluster_kwargs``
    against its signature, starting nothing.

    Raises
    ------
    ConfigError
    """
    import dask

    with dask.config.set(spec.dask_config):
        cls = import_cluster_class(spec.cluster_class)
        accepted = _accepted_kwargs(cls)
    if "asynchronous" in spec.cluster_kwargs:
        raise ConfigError("cluster.cluster_kwargs: asynchronous is not supported (jobs block)")
    unknown = sorted(set(spec.cluster_kwargs) - accepted) if accepted is not None else []
    if unknown:
        raise ConfigError(
            f"cluster.cluster_kwargs: {unknown[0]!r} is not an argument of "
            f"{spec.cluster_class}; it takes: {', '.join(sorted(accepted))}"
        )
    return cls


@contextmanager
def _class_client(spec: ClusterSpec) -> Iterator[Client]:
    """``cluster_class(**cluster_kwargs)``, scaled or adaptive, and a client of it."""
    cls = check_cluster_class(spec)
    try:
        cluster = cls(**spec.cluster_kwargs)
    except Exception as exc:
        raise ClusterError(
            f"cluster: {spec.cluster_class}(**cluster_kwargs) failed: {first_line(exc)}"
        ) from None
    try:
        if spec.scale:
            cluster.scale(**spec.scale)
        if spec.adapt_kwargs:
            cluster.adapt(**spec.adapt_kwargs)
        with Client(cluster, set_as_default=True, **spec.client_kwargs) as client:
            log.info("started %s; dashboard: %s", spec.cluster_class, client.dashboard_link)
            if spec.adapt_kwargs:
                _ADAPTIVE.add(id(client))
            try:
                yield client
            finally:
                _ADAPTIVE.discard(id(client))
    finally:
        cluster.close()


@contextmanager
def _scheduler_file_client(spec: ClusterSpec) -> Iterator[Client]:
    """A client of the scheduler that wrote ``scheduler_file`` (the HPC pattern)."""
    check_scheduler_file(spec)
    try:
        client = Client(
            scheduler_file=os.path.expanduser(spec.scheduler_file),
            timeout=spec.connect_timeout,
            set_as_default=True,
            **spec.client_kwargs,
        )
    except (OSError, TimeoutError) as exc:
        raise ClusterError(
            f"cluster.scheduler_file: cannot connect to the scheduler of {spec.scheduler_file} "
            f"within {spec.connect_timeout:g} s ({type(exc).__name__}); is it running?"
        ) from None
    log.info("connected to the scheduler of %s", spec.scheduler_file)
    try:
        with client.as_current():
            yield client
    finally:
        client.close()


def check_scheduler_file(spec: ClusterSpec) -> None:
    """Refuse a ``scheduler_file`` that does not exist (yet).

    Raises
    ------
    ClusterError
    """
    if not os.path.isfile(os.path.expanduser(spec.scheduler_file)):
        raise ClusterError(
            f"cluster.scheduler_file: {spec.scheduler_file} does not exist; start the "
            "scheduler with dask scheduler --scheduler-file first"
        )


def wait_for_workers(client: Client, n: int, timeout: float) -> None:
    """Block until ``n`` workers joined, or fail after ``timeout`` seconds.

    Raises
    ------
    WorkersTimeoutError
    """
    try:
        client.wait_for_workers(n, timeout=timeout)
    except TimeoutError:
        have = len(scheduler_workers(client))
        raise WorkersTimeoutError(
            f"cluster.wait_for_workers: {have} of {n} workers after {timeout:g} s; did the "
            "worker jobs start? (raise wait_for_workers.timeout or check the queue)"
        ) from None
    log.info("%d workers joined", n)


def _client_for(address: str | None) -> Client | None:
    """This process's open default client when it talks to ``address``, else ``None``.

    Jobs of a batch run in threads of one process against one cluster; they must share
    one client — a second client's ``close()`` would release futures the other job holds.
    """
    from distributed import default_client

    try:
        client = default_client()
    except ValueError:
        return None
    if client.status != "running" or address is None:
        return None
    return client if client.scheduler.address == address else None


def plan_workers(client: Client | None, on_device: bool = False) -> Workers | None:
    """The running cluster as the plan sees it (:class:`~pipeline.memory.Workers`): count,
    threads, ``memory_limit``, whether it is adaptive and, with ``on_device``, its
    devices' memory; ``None`` without a client or workers."""
    workers = workers_of(client)
    if workers is None:
        return None
    device = 0
    if on_device:
        from pipeline.backend import device as current_device

        device = int(sum(client.run(lambda: current_device().memory_bytes()).values()))
    return replace(workers, device_memory=device, adaptive=id(client) in _ADAPTIVE)


def cluster_memory(client: Client | None, on_device: bool = False) -> int:
    """Bytes the workers have for data (:meth:`pipeline.memory.Workers.data_memory`)."""
    workers = plan_workers(client, on_device)
    return workers.data_memory(on_device) if workers is not None else 0


def keep_in_memory(
    x: da.Array, client: Client | None, on_device: bool = False, nbytes: int | None = None
) -> tuple[da.Array, bool]:
    """Persist ``x`` on the cluster when it fits comfortably, so later passes skip I/O.

    Device blocks are budgeted from the devices' memory, host blocks from the workers'
    ``memory_limit``; ``nbytes`` is ``x``'s size in memory when that is not its dense
    size (sparse blocks). Returns ``(array, persisted)``; the array is unchanged when it
    does not fit.
    """
    where = "device" if on_device else "cluster"
    size = x.nbytes if nbytes is None else nbytes
    workers = plan_workers(client, on_device)
    if workers is not None and workers.adaptive:
        log.info("input (%.2f GiB) is streamed: the cluster is adaptive", size / 2**30)
        return x, False
    if will_keep(size, workers, on_device):
        log.info(
            "input (%.2f GiB) fits in %.0f%% of %s memory: reading it once and keeping it",
            size / 2**30,
            PERSIST_FRACTION * 100,
            where,
        )
        return x.persist(), True
    log.info("input (%.2f GiB) is streamed from storage on every pass", size / 2**30)
    return x, False


# --------------------------------------------------------------------------- worker memory

# How long every worker may stay paused (memory above distributed's pause threshold, no
# task starts) before the run is failed instead of waiting forever.
PAUSED_TIMEOUT = 60.0
# Workers restarted for memory during one method before the run is failed: distributed
# counts a death against a task only when the task was running on the worker, so a worker
# killed while it holds data (or waits, paused) can be restarted without end.
MAX_MEMORY_RESTARTS = 4
_MiB = 2**20


def worker_memory_limit(client: Client | None) -> int:
    """The smallest ``memory_limit`` among the workers in bytes (0 when unknown or unlimited)."""
    workers = workers_of(client)
    return workers.memory_limit if workers is not None else 0


class _NannyRestarts(logging.Handler):
    """Counts the nannies' memory restarts logged in this process."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "memory budget" in record.getMessage():
            self.count += 1


class _MemoryWatchdog:
    """Watches the workers while a method runs; cancels the client's work when workers keep
    dying for memory or all stay paused (see :func:`guard_workers`)."""

    def __init__(self, client: Client, interval: float = 1.0) -> None:
        import threading

        self.client = client
        self.interval = interval
        self.error: str | None = None
        self.restarts = 0
        self._seen: dict[str, tuple[str, int, int]] = {}
        self._paused_since: float | None = None
        self.limit = worker_memory_limit(client)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-watchdog", daemon=True)
        self._nanny_lines = _NannyRestarts()

    def __enter__(self) -> _MemoryWatchdog:
        # Nannies of a LocalCluster live in this process: their "exceeded 95% memory
        # budget" lines count every memory restart (polling sees only some of them).
        logging.getLogger("distributed.nanny.memory").addHandler(self._nanny_lines)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        logging.getLogger("distributed.nanny.memory").removeHandler(self._nanny_lines)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                workers = scheduler_workers(self.client)
            except Exception:  # the client is closing: nothing left to watch
                return
            self.error = self._judge(workers)
            if self.error:
                self._cancel()
                return

    def _judge(self, workers: dict[str, dict[str, Any]]) -> str | None:
        import time

        now = {
            addr: (
                str(w.get("status", "")),
                int(w.get("metrics", {}).get("memory") or 0),
                int(w.get("memory_limit") or 0),
            )
            for addr, w in workers.items()
        }
        lost = 0
        for addr, (status, used, limit) in self._seen.items():
            if addr not in now and (status == "paused" or (limit and used > 0.8 * limit)):
                lost += 1
                log.warning(
                    "worker %s was lost at %.0f of %.0f MiB", addr, used / _MiB, limit / _MiB
                )
        self._seen = now
        self.restarts = max(self.restarts + lost, self._nanny_lines.count)
        # the workers' limit (remembered: all of them may be restarting right now)
        self.limit = min((x[2] for x in now.values() if x[2]), default=self.limit)
        limit = self.limit
        if self.restarts >= MAX_MEMORY_RESTARTS:
            return (
                f"{self.restarts} workers were restarted for running out of memory "
                f"(memory_limit {limit / _MiB:.0f} MiB per worker)"
            )
        paused = bool(now) and all(s == "paused" for s, _, _ in now.values())
        self._paused_since = (self._paused_since or time.monotonic()) if paused else None
        if paused and time.monotonic() - self._paused_since >= PAUSED_TIMEOUT:
            return (
                f"all workers stayed paused for {PAUSED_TIMEOUT:.0f} s at their memory limit "
                f"({limit / _MiB:.0f} MiB per worker)"
            )
        return None

    def _cancel(self) -> None:
        from distributed import Future

        futures = [Future(key, self.client) for key in list(self.client.futures)]
        if futures:
            self.client.cancel(futures, reason="memory-watchdog")


MEMORY_HINT = "raise cluster.memory_limit or lower block_rows of the method"


@contextmanager
def guard_workers(client: Client | None, method: str) -> Iterator[None]:
    """Turn workers lost for memory into one ``ClusterError`` line instead of a hang.

    ``KilledWorker`` (a task's workers died ``allowed-failures + 1`` times) names the
    memory limit; a watchdog fails the run when :data:`MAX_MEMORY_RESTARTS` workers die
    for memory or every worker stays paused for :data:`PAUSED_TIMEOUT` seconds — cases
    distributed itself would retry or wait on forever.
    """
    if client is None:
        yield
        return
    from distributed import KilledWorker

    with _MemoryWatchdog(client) as dog:
        try:
            yield
        except KilledWorker as exc:
            limit = worker_memory_limit(client) or dog.limit  # workers may be restarting
            raise ClusterError(
                f"{method}: workers died again and again running the same task "
                f"{_task_name(exc)} (memory_limit "
                f"{limit / _MiB:.0f} MiB per worker): {MEMORY_HINT}"
            ) from None
        except Exception:
            if dog.error:
                raise ClusterError(f"{method}: {dog.error}: {MEMORY_HINT}") from None
            raise
    if dog.error:  # the cancelled work ended without raising
        raise ClusterError(f"{method}: {dog.error}: {MEMORY_HINT}")


def _task_name(exc: BaseException) -> str:
    """The task group of a ``KilledWorker`` (its key's name without the token)."""
    key = getattr(exc, "task", None) or (exc.args[0] if exc.args else "")
    name = key[0] if isinstance(key, tuple) else str(key)
    return name.rsplit("-", 1)[0] if "-" in name else name
