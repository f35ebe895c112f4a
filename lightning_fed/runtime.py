"""Ray for a federation: join the cluster the process is connected to (or ``RAY_ADDRESS``, as under ``ray job
submit``), or start a local one for the run and stop it afterwards.

A local Ray takes seconds to start. ``lightning-fed`` starts it in the background as its first act
(:func:`start_early`), so it comes up while the driver is still importing torch and Lightning, and starts one
spare worker right away, whose own imports then overlap the driver's; the federation finds Ray ready and adopts
the spare. Ray's processes die with the thread that started them (they are spawned with a parent-death signal),
so that thread stays alive, idle, until Ray is shut down.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import threading
from typing import Any, Mapping, Optional

import ray

log = logging.getLogger(__name__)


def _local_init_kwargs(num_cpus: float, extra: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "address": "local",
        "num_cpus": max(os.cpu_count() or 1, math.ceil(num_cpus)),
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        # sites write their console output to their own log files (lightning_fed.console); what Ray would still
        # forward (its own notes on a worker that died) the driver reports itself, in one line naming the site
        "log_to_driver": False,
        **dict(extra),
    }


def _driver_paths() -> str:
    """The driver's own import paths (its script's folder, the working folder, ``PYTHONPATH``; not the installed
    packages), as a ``PYTHONPATH``: workers must import the same modules as the driver (scripts, test helpers)."""
    installed = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
    paths = [p or os.getcwd() for p in sys.path if p == "" or (os.path.isdir(p) and not p.startswith(installed))]
    return os.pathsep.join(dict.fromkeys(paths))


class _DriverPaths:
    """The driver's import paths as ``PYTHONPATH`` while a local Ray starts, so that its processes, and the workers
    they start, inherit them; then the driver's own ``PYTHONPATH`` again.

    Not a job-wide ``runtime_env``: with one, every new worker process waited for Ray's runtime-env agent (measured
    on the 2-core machine: two new actors ready in 0.75-1.05 s instead of 0.15-0.2 s), and a ``runtime_env`` of the
    user's replaced it, paths and all. Set and restored by the thread that asks for Ray (the main thread, which may
    be importing meanwhile), never by the thread that starts it."""

    def __init__(self) -> None:
        self._saved: Optional[str] = os.environ.get("PYTHONPATH")
        self._set = True
        os.environ["PYTHONPATH"] = _driver_paths()

    def restore(self) -> None:
        if self._set:
            self._set = False
            if self._saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = self._saved


class _LocalRay:
    """A local Ray started on a thread of its own, which stays alive (idle) until Ray is shut down."""

    def __init__(self, init_kwargs: dict[str, Any], spare: bool = False) -> None:
        self.init_kwargs = init_kwargs
        self.error: Optional[BaseException] = None
        self.spare: Any = None
        self._want_spare = spare
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lightning-fed-ray", daemon=True)
        self._paths = _DriverPaths()  # until Ray has started
        self._thread.start()

    def _run(self) -> None:
        try:
            ray.init(**self.init_kwargs)
            if self._want_spare:
                from lightning_fed.worker import start_spare

                self.spare = start_spare()
        except BaseException as err:  # handed to whoever waits for it
            self.error = err
            self._ready.set()
            return
        self._ready.set()
        self._stop.wait()

    def wait(self) -> None:
        self._ready.wait()
        self._paths.restore()
        if self.error is not None:
            raise self.error

    def cpus(self) -> float:
        return float(self.init_kwargs["num_cpus"])

    def stop(self) -> None:
        self._ready.wait()
        self._paths.restore()
        spare, self.spare = self.spare, None
        if self.error is None and ray.is_initialized():
            _end_monitor()
            ray.shutdown()
        if spare is not None:  # never adopted (the command failed first): nobody else removes its worker's file
            from lightning_fed.worker import remove_marker

            remove_marker(spare)
        self._stop.set()
        self._thread.join(timeout=10)


def _end_monitor() -> None:
    """End the local Ray's autoscaler monitor, before ``ray.shutdown`` stops the rest.

    ``ray.shutdown`` stops a local Ray's processes one at a time, giving each a second after SIGTERM before SIGKILL.
    The monitor (the autoscaler, idle in a local Ray of fixed size) stops after the GCS and no longer answers SIGTERM
    then, so every shutdown waited that full second before killing it anyway (measured on the 2-core machine:
    ``ray.shutdown`` 1.35-1.46 s, against 0.35-0.45 s with the monitor ended first). It is found through Ray's record
    of the processes it started for this driver; where that record is not there (another Ray version), the shutdown
    goes as before."""
    try:
        node = ray._private.worker._global_node
        monitors = [info.process for info in node.all_processes.get("monitor", [])] if node is not None else []
    except Exception:  # Ray's internals moved: nothing to end early
        return
    for process in monitors:
        try:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=1)
        except Exception:  # gone already, or slow to reap: ray.shutdown deals with it as before
            pass


_local: Optional[_LocalRay] = None  # the local Ray this process started (early, or for a runtime), while it runs
_users: set[int] = set()  # the runtimes using it: it stops when the last one is done (or at exit)


def local_ray_started() -> bool:
    """Whether this process started the local Ray (early, or for a runtime) and it still runs."""
    return _local is not None


def take_spare() -> Any:
    """The spare worker the early local Ray started (once; ``None`` when there is none or that Ray is gone)."""
    if _local is None or _local.error is not None or not ray.is_initialized():
        return None
    spare, _local.spare = _local.spare, None
    return spare


def start_early() -> None:
    """Start a local Ray in the background now, unless this process will join a cluster (``RAY_ADDRESS``) or is
    connected already. The first :class:`RayRuntime` that needs a local Ray uses this one."""
    global _local
    if _local is None and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        # started off the main thread, Ray warns that it cannot install its SIGTERM handler: nothing to act on
        kwargs = {**_local_init_kwargs(0, {}), "logging_level": logging.ERROR}
        _local = _LocalRay(kwargs, spare=True)
        atexit.register(_stop_local)


def hold_local_ray(holder: object) -> None:
    """Keep the process's local Ray (the one running, or the next one started) up for ``holder`` after the runtimes
    using it shut down, until :func:`release_local_ray` (warm workers live in it)."""
    _users.add(id(holder))


def release_local_ray(holder: object) -> None:
    """``holder`` no longer needs the local Ray: it stops now if no runtime uses it."""
    _users.discard(id(holder))
    if not _users:
        _stop_local()


def _stop_local() -> None:
    global _local
    if _local is not None:
        _local.stop()
        _local = None
    _users.clear()


def _usable_local(address: Optional[str], init_kwargs: Mapping[str, Any], cpus_needed: float) -> Optional[_LocalRay]:
    """The process's local Ray, if it serves this request. One nobody uses yet that does not fit it (a cluster
    address, own ``ray.init`` arguments, too few CPUs, a failed start) is stopped, so the request can be served as
    asked; one in use is shared as it is."""
    if _local is None:
        return None
    try:
        _local.wait()
    except Exception as err:  # e.g. a port in use: start again, as asked
        log.warning("lightning-fed: the early local Ray did not start (%s); starting it again", err)
        _stop_local()
        return None
    if not _users and (address or init_kwargs or _local.cpus() + 1e-9 < cpus_needed):
        _stop_local()
        return None
    return _local


class RayRuntime:
    """Joins the Ray cluster the process is connected to (or ``address``, or ``RAY_ADDRESS``), or uses the local Ray
    this process started (starting it if needed). A local Ray is shared by every runtime of the process (several
    federations in one notebook) and stopped when the last of them shuts down; a joined cluster is left running."""

    def __init__(self, address: Optional[str] = None, init_kwargs: Optional[Mapping[str, Any]] = None) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.init_kwargs = dict(init_kwargs or {})
        self._uses_local = False

    def ensure(self, cpus_needed: float = 0.0) -> None:
        """Make sure Ray is up: the process's local Ray, a joined cluster, or a local Ray started now with at least
        ``cpus_needed`` CPUs (and never fewer than the machine has)."""
        global _local
        if self._uses_local and _local is not None:
            return
        if _usable_local(self.address, self.init_kwargs, cpus_needed) is None:
            if ray.is_initialized():
                return  # a Ray the user started: joined, never stopped here
            if self.address:
                ray.init(address=self.address, **self.init_kwargs)
                return
            _local = _LocalRay(_local_init_kwargs(cpus_needed, self.init_kwargs))
            _local.wait()
            atexit.register(_stop_local)
        _users.add(id(self))
        self._uses_local = True

    def take_spare(self) -> Any:
        """The spare worker started with the early local Ray, if that is the Ray in use (once; else ``None``)."""
        return take_spare()

    def shutdown(self) -> None:
        """Stop using Ray; the process's local Ray stops once no runtime uses it."""
        if self._uses_local:
            _users.discard(id(self))
            self._uses_local = False
            if not _users:
                _stop_local()
