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
    installed = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
    paths = [p or os.getcwd() for p in sys.path if p == "" or (os.path.isdir(p) and not p.startswith(installed))]
    return {
        "address": "local",
        "num_cpus": max(os.cpu_count() or 1, math.ceil(num_cpus)),
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        # workers must import the same modules as the driver (scripts, test helpers)
        "runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}},
        **dict(extra),
    }


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
        if self.error is not None:
            raise self.error

    def cpus(self) -> float:
        return float(self.init_kwargs["num_cpus"])

    def stop(self) -> None:
        global _spare_source
        if _spare_source is self:
            _spare_source = None
        self._ready.wait()
        if self.error is None and ray.is_initialized():
            ray.shutdown()
        self._stop.set()
        self._thread.join(timeout=10)


_early: Optional[_LocalRay] = None  # started, not yet taken over by a runtime
_spare_source: Optional[_LocalRay] = None  # the early Ray, while it runs: its spare worker is for whoever asks first


def take_spare() -> Any:
    """The spare worker the early local Ray started (once; ``None`` when there is none or that Ray is gone)."""
    if _spare_source is None or _spare_source.error is not None or not ray.is_initialized():
        return None
    spare, _spare_source.spare = _spare_source.spare, None
    return spare


def start_early() -> None:
    """Start a local Ray in the background now, unless this process will join a cluster (``RAY_ADDRESS``) or is
    connected already. The next :class:`RayRuntime` that needs a local Ray takes this one over."""
    global _early, _spare_source
    if _early is None and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        # started off the main thread, Ray warns that it cannot install its SIGTERM handler: nothing to act on
        kwargs = {**_local_init_kwargs(0, {}), "logging_level": logging.ERROR}
        _early = _spare_source = _LocalRay(kwargs, spare=True)
        atexit.register(_stop_early)


def _stop_early() -> None:
    global _early
    if _early is not None:
        _early.stop()
        _early = None


def _take_early(address: Optional[str], init_kwargs: Mapping[str, Any], cpus_needed: float) -> Optional[_LocalRay]:
    """The early local Ray, if it serves this request (no cluster address, no own init arguments, enough CPUs);
    otherwise it is stopped so that the request can be served as asked."""
    global _early
    early, _early = _early, None
    if early is None:
        return None
    atexit.unregister(_stop_early)
    try:
        early.wait()
    except Exception as err:  # e.g. a port in use: start again below, as asked
        log.warning("lightning-fed: the early local Ray did not start (%s); starting it again", err)
        return None
    if address or init_kwargs or early.cpus() + 1e-9 < cpus_needed:
        early.stop()
        return None
    return early


class RayRuntime:
    """Joins the Ray cluster the process is connected to (or ``address``, or ``RAY_ADDRESS``), or starts a local
    one and owns it: :meth:`shutdown` stops only a Ray this runtime started."""

    def __init__(self, address: Optional[str] = None, init_kwargs: Optional[Mapping[str, Any]] = None) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.init_kwargs = dict(init_kwargs or {})
        self._local: Optional[_LocalRay] = None

    @property
    def started(self) -> bool:
        """Whether this runtime started (and will stop) the Ray it uses."""
        return self._local is not None

    def ensure(self, cpus_needed: float = 0.0) -> None:
        """Make sure Ray is up: joined, taken over from :func:`start_early`, or started locally with at least
        ``cpus_needed`` CPUs (and never fewer than the machine has)."""
        if self._local is not None:
            return
        early = _take_early(self.address, self.init_kwargs, cpus_needed)
        if early is not None:
            self._local = early
            return
        if ray.is_initialized():
            return
        if self.address:
            ray.init(address=self.address, **self.init_kwargs)
            return
        local = _LocalRay(_local_init_kwargs(cpus_needed, self.init_kwargs))
        local.wait()
        self._local = local

    def take_spare(self) -> Any:
        """The spare worker started with the early local Ray, if that is the Ray in use (once; else ``None``)."""
        return take_spare()

    def shutdown(self) -> None:
        if self._local is not None:
            self._local.stop()
            self._local = None
