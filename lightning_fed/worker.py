"""A worker: one Ray actor (one process) hosting one or more sites.

Each hosted site is a :class:`~lightning_fed.site.SiteRuntime` with its own Trainer, module, data, callbacks and
random streams; the worker runs each site's calls on a thread of their own and lets one site compute at a time
(:class:`~lightning_fed.turn.Turn`), with all of the worker's threads. A site hands the turn on whenever it
waits for the others, so a worker with several sites trains them one after another, as a plain loop would.

Where the sites go is decided on the driver (:mod:`lightning_fed.placement`); a worker started for one run can
host the sites of the next run of the same layout (``host`` replaces its sites).
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import ray
import torch

from lightning_fed.loggers import stop_wandb
from lightning_fed.results import SiteEvaluation, SiteFit, SiteReady
from lightning_fed.site import SitePlan, SiteRuntime
from lightning_fed.strategies.base import GlobalModel, Weights
from lightning_fed.turn import Turn


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
    for message in (".*treespec.*", ".*does not have many workers.*", ".*Total length of .* across ranks is zero.*",
                    ".*smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=message)


class Worker:
    """Hosts sites and runs their calls, one site computing at a time with ``threads`` torch threads."""

    def __init__(self, index: int, threads: int, gpu_share: float = 0.0) -> None:
        _quiet()
        self.index = index
        torch.set_num_threads(max(1, threads))
        if 0 < gpu_share < 1 and torch.cuda.is_available():
            # Ray's GPU shares are bookkeeping only; this keeps the worker's sites inside theirs
            torch.cuda.set_per_process_memory_fraction(gpu_share)
        self.turn = Turn()
        self.sites: dict[str, SiteRuntime] = {}

    def host(self, plans: list[SitePlan], stage: str) -> dict[str, SiteReady]:
        """Set up these sites (replacing any hosted before) and check each one's data for ``stage``."""
        self.sites = {}
        ready = {}
        for plan in plans:
            name = plan.site.name
            try:
                site = SiteRuntime(plan, self.turn, self.index)
                with self.turn.taken(site.streams):
                    site.start()
                    ready[name] = site.ready(stage)
            except Exception as err:
                first = str(err).strip().splitlines()
                raise SiteStartError(name, f"{type(err).__name__}: {first[0] if first else ''}") from None
            self.sites[name] = site
        return ready

    def _site(self, name: str) -> SiteRuntime:
        return self.sites[name]

    def fit(self, site: str, ckpt_path: Optional[str] = None) -> SiteFit:
        runtime = self._site(site)
        with self.turn.taken(runtime.streams):
            return runtime.fit(ckpt_path)

    def evaluate(self, site: str, stage: str, model: GlobalModel, exact: bool = False) -> SiteEvaluation:
        runtime = self._site(site)
        with self.turn.taken(runtime.streams):
            return runtime.evaluate(stage, model, exact)

    def weights(self, site: str) -> Weights:
        runtime = self._site(site)
        with self.turn.taken(runtime.streams):
            return runtime.weights()

    def close(self) -> None:
        """Finish every hosted site's loggers (W&B runs must end in the process that started them)."""
        used_wandb = False
        for runtime in self.sites.values():
            with self.turn.taken(runtime.streams):
                used_wandb |= runtime.close()
        if used_wandb:
            stop_wandb()

    def threads(self) -> int:
        return torch.get_num_threads()


RemoteWorker = ray.remote(max_restarts=0, max_task_retries=0)(Worker)
"""The worker actor. Nothing restarts by itself (Ray's retry would rerun a site's whole fit from epoch 0)."""
