"""A worker: one Ray actor (one process) hosting one or more sites.

Each hosted site is a :class:`~lightning_fed.site.SiteRuntime` with its own Trainer, module, data, callbacks and
random streams; the worker runs every site's calls on its one compute thread, one site at a time, with all of the
worker's torch threads (:class:`~lightning_fed.scheduler.Scheduler`). A site lets the others compute whenever it
waits for the federation, so a worker with several sites trains them one after another, as a plain loop would.

Where the sites go is decided on the driver (:mod:`lightning_fed.placement`); a worker started for one run can
host the sites of the next run of the same layout (``host`` replaces its sites). This module imports torch and
Lightning only inside the worker (in :class:`Worker`'s constructor), so a driver can start workers, and they can
import, while the driver itself is still importing.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from typing import TYPE_CHECKING, Any, Optional

import ray

if TYPE_CHECKING:
    from lightning_fed.results import SiteEvaluation, SiteFit, SiteReady
    from lightning_fed.site import SitePlan, SiteRuntime
    from lightning_fed.strategies.base import GlobalModel, Weights

SPARE_CONCURRENCY = 64  # calls a spare worker can run at once: it can host up to this many sites, less 3


def worker_concurrency(sites: int) -> int:
    """Calls a worker hosting ``sites`` sites runs at once: one per site's call plus three for control calls, and
    never fewer than a spare's, so that a warm worker can host another run's sites (idle threads cost nothing)."""
    return max(sites + 3, SPARE_CONCURRENCY)


_MARK_BYTES = 256


def computing_marker(worker_id: str) -> str:
    """The file in which a worker notes which of its sites is computing (readable on its node after it died)."""
    return os.path.join(tempfile.gettempdir(), f"lightning-fed-worker-{worker_id}.computing")


def remove_marker(actor: Any) -> None:
    """Remove the file in which ``actor``'s worker noted which site computes (a worker that was killed never does)."""
    try:
        os.remove(computing_marker(actor._actor_id.hex()))
    except (OSError, AttributeError):
        pass


def read_marker(path: str) -> Optional[str]:
    """The site a worker last noted as computing (``None``: no note here, or none was computing)."""
    try:
        with open(path, "rb") as fh:
            name = fh.read(_MARK_BYTES).rstrip(b"\0").decode(errors="replace")
    except OSError:
        return None
    return name or None


class SiteStartError(RuntimeError):
    """A site could not be set up in its worker (its data, its module, its Trainer); names the site."""

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(f"site {site!r} failed to start: {reason}")
        self.site, self.reason = site, reason

    def __reduce__(self) -> tuple:
        return (SiteStartError, (self.site, self.reason))


def _quiet() -> None:
    for logger_name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(logger_name).setLevel(logging.WARNING)
    # the driver already showed these once; copies from every worker through Ray's log forwarding help nobody
    for message in (
        ".*treespec.*",
        ".*does not have many workers.*",
        ".*Total length of .* across ranks is zero.*",
        ".*smaller than the logging interval.*",
    ):
        warnings.filterwarnings("ignore", message=message)


class Worker:
    """Hosts sites and runs their calls, one site computing at a time with ``threads`` torch threads."""

    def __init__(self, index: int, threads: int, gpu_share: float = 0.0) -> None:
        import lightning_fed.site  # noqa: F401  (torch and Lightning: imported here, in the worker, at once)
        from lightning_fed.console import SiteConsole
        from lightning_fed.scheduler import Scheduler

        _quiet()
        self.console = SiteConsole()
        self.scheduler = Scheduler(threads)
        self.sites: dict[str, SiteRuntime] = {}
        self.marker = computing_marker(ray.get_runtime_context().get_actor_id())
        self._marker_fd = os.open(self.marker, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.adopt(index, threads, gpu_share)

    def mark(self, site: str) -> None:
        """Note (a write, no message) the site now computing, or ``""``; read by the driver if this process dies.
        Its console output goes to its own log file meanwhile."""
        os.pwrite(self._marker_fd, site.encode()[:_MARK_BYTES].ljust(_MARK_BYTES, b"\0"), 0)
        self.console.current = site

    def adopt(self, index: int, threads: int, gpu_share: float = 0.0) -> None:
        """Take the place of worker ``index`` in a layout (a spare started early is fitted to it this way)."""
        import torch

        self.index = index
        self.scheduler.set_threads(threads)
        if 0 < gpu_share < 1 and torch.cuda.is_available():
            # Ray's GPU shares are bookkeeping only; this keeps the worker's sites inside theirs
            torch.cuda.set_per_process_memory_fraction(gpu_share)

    def host(self, plans: list[SitePlan], stage: str) -> dict[str, SiteReady]:
        """Set up these sites (replacing any hosted before) and check each one's data for ``stage``."""
        self.sites = {}
        ready = {}
        if plans:
            self.console.open(plans[0].job.root_dir, self.index, [p.site.name for p in plans])
        for plan in plans:
            ready[plan.site.name] = self._start_site(plan, stage)
        return ready

    def _start_site(self, plan: SitePlan, stage: str) -> SiteReady:
        """Build one site (Trainer, module, data) on the compute thread and host it; failures name the site."""
        from lightning_fed.site import SiteRuntime

        name = plan.site.name
        try:
            site = SiteRuntime(plan, self.scheduler, self.index, self.mark, self.marker)
            ready = self.scheduler.call(site.state, site.start, stage)
        except Exception as err:
            first = str(err).strip().splitlines()
            raise SiteStartError(name, f"{type(err).__name__}: {first[0] if first else ''}") from None
        self.sites[name] = site
        return ready

    def fit(self, site: str, ckpt_path: Optional[str] = None, join: Any = None) -> SiteFit:
        runtime = self.sites[site]
        return self.scheduler.call(runtime.state, runtime.fit, ckpt_path, join)

    def rejoin(self, plan: SitePlan, ckpt_path: Optional[str] = None) -> SiteFit:
        """Set the site up again (a fresh Trainer, module and data), wait for the coordinator to let it back in at
        the next round, restore it from ``ckpt_path`` (its last committed part, if any) and train to the end."""
        name = plan.site.name
        self.sites.pop(name, None)
        self.console.open(plan.job.root_dir, self.index, [name, *self.sites])
        self._start_site(plan, "fit")
        site = self.sites[name]
        return self.scheduler.call(site.state, site.fit, ckpt_path, "ask")

    def evaluate(self, site: str, stage: str, model: GlobalModel, exact: bool = False) -> SiteEvaluation:
        runtime = self.sites[site]
        return self.scheduler.call(runtime.state, runtime.evaluate, stage, model, exact)

    def weights(self, site: str) -> Weights:
        runtime = self.sites[site]
        return self.scheduler.call(runtime.state, runtime.weights)

    def close(self) -> None:
        """Finish every hosted site's loggers (W&B runs must end in the process that started them)."""
        from lightning_fed.loggers import stop_wandb

        used_wandb = False
        for runtime in self.sites.values():
            used_wandb |= self.scheduler.call(runtime.state, runtime.close)
        if used_wandb:
            stop_wandb()
        self.console.flush()

    def alive(self) -> bool:
        """Answers at once (a pool asks an idle worker before handing it to a run)."""
        return True

    def release(self, timeout: float) -> bool:
        """After a failed run: once every site's call has ended (within ``timeout`` seconds; the coordinator they
        wait on has ended their run), finish their loggers and host nothing. Returns whether this worker can serve
        another run; ``False``: a site is still computing (this worker must be ended)."""
        if not self.scheduler.wait_idle(timeout):
            return False
        try:
            self.close()
        except Exception:  # a site that failed may not close; the process is sound all the same
            self.console.flush()
        self.sites = {}
        self.mark("")
        return True


RemoteWorker = ray.remote(max_restarts=0, max_task_retries=0)(Worker)
"""The worker actor. Nothing restarts by itself (Ray's retry would rerun a site's whole fit from epoch 0)."""


def start_spare() -> Any:
    """A worker holding no resources, started before any layout is known so that its imports overlap the
    driver's; a federation on this machine adopts it for one of its CPU workers (whose bundle it then leaves
    reserved but idle)."""
    return RemoteWorker.options(num_cpus=0, max_concurrency=SPARE_CONCURRENCY).remote(-1, 1)
