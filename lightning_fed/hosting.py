"""Two steps of a federation's start that need nothing of the running federation: the coordinator actor, and each
site's plan (what its worker builds it from). :class:`~lightning_fed.federation.Federation` calls them in order.
Between warm runs, :class:`NextCoordinator` keeps the next run's coordinator process started ahead."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import ray
from lightning.pytorch import LightningModule
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lightning_fed.checkpoint import RoundCheckpoint
from lightning_fed.config import FederationConfig
from lightning_fed.coordinator import RemoteCoordinator, RemoteSpareCoordinator
from lightning_fed.data.sites import Site
from lightning_fed.privacy_settings import DPSGD
from lightning_fed.role import COORDINATOR_ROLE, COORDINATOR_ROLE_ENV
from lightning_fed.site import SitePlan, TrainerJob
from lightning_fed.strategies.base import GlobalModel
from lightning_fed.strategies.site import state_to_numpy


def start_coordinator(
    config: FederationConfig,
    names: list[str],
    module: LightningModule,
    job: TrainerJob,
    layout: Optional[dict[str, Any]],
    server_state: Optional[dict[str, Any]],
    resume: Optional[RoundCheckpoint],
    spare: Optional[Any] = None,
) -> Any:
    """The coordinator actor, on the driver's node, in a process that never imports torch or Lightning. Round 0's
    global model is ``module``'s weights, unless the run resumes (then the checkpoint's server state holds it).
    ``spare``: a :class:`~lightning_fed.coordinator.SpareCoordinator` started ahead, which becomes this one."""
    options = dict(
        sync_every=config.sync_every,
        reliability=config.reliability,
        checkpointing=config.checkpointing,
        checkpoint_dir=job.checkpoint_dir,
        audit=config.audit_messages,
        server_state=server_state,
        layout=layout,
        parts=resume.parts() if resume is not None else None,
        initial_model=GlobalModel(weights=state_to_numpy(module.state_dict()), round=0) if resume is None else None,
    )
    if spare is not None:
        # waited for: a call of the driver's that overtook it (e.g. while the model travels) would find no federation
        try:
            ray.get(spare.begin.remote(config.aggregator, names, **options))
            return spare
        except RayTaskError as err:
            kill_quietly(spare)
            raise err.as_instanceof_cause() from None
        except RayActorError:  # it died starting: a new one instead
            kill_quietly(spare)
    return RemoteCoordinator.options(**_coordinator_process()).remote(config.aggregator, names, **options)


def _coordinator_process() -> dict[str, Any]:
    """Where a coordinator runs: the driver's node, in a process marked to skip torch and Lightning."""
    return dict(
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
        runtime_env={"env_vars": {COORDINATOR_ROLE_ENV: COORDINATOR_ROLE}},
    )


class NextCoordinator:
    """The coordinator process of the next warm run, started while the current one trains.

    A coordinator's process takes about a second to start (a new process: Ray, numpy, the aggregators), and the
    sites wait for it before round 1; a run that finds one started ahead waits for nothing. Each process still serves
    one federation: a run takes the spare, and once it has started, starts the next one for the run after it.
    """

    def __init__(self) -> None:
        self._spare: Optional[Any] = None
        self._started: Optional[Any] = None  # the spare's readiness

    def take(self) -> Optional[Any]:
        """The spare, if it is up and answering; ``None`` if there is none, it died, or it is still starting (it then
        stays for the next run: runs back to back go faster with two processes starting in turn than waiting for
        one)."""
        ready = _ready(self._spare, self._started) if self._spare is not None else None
        if ready is None:
            return None
        spare = self._spare if ready else None
        if not ready:
            kill_quietly(self._spare)
        self._spare = self._started = None
        return spare

    def prepare(self) -> None:
        """Start the next run's coordinator now, if none is waiting (call it once a run has started: a process
        starting beside a run's start-up slows it)."""
        if self._spare is None:
            self._spare = RemoteSpareCoordinator.options(**_coordinator_process()).remote()
            self._started = self._spare.__ray_ready__.remote()

    def idle(self) -> list[Any]:
        """The spare, kept alive by design for the next run."""
        return [self._spare] if self._spare is not None else []

    def close(self) -> None:
        """End the spare."""
        if self._spare is not None:
            kill_quietly(self._spare)
        self._spare = self._started = None


def kill_quietly(actor: Any) -> None:
    """End ``actor``'s process, if it still has one."""
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # gone already, or Ray with it
        pass


def _ready(spare: Any, started: Any) -> Optional[bool]:
    """Whether a spare can serve now: ``None`` while it is still starting, ``False`` if it died (e.g. killed for
    memory while idle, or gone with an earlier Ray)."""
    try:
        done, _ = ray.wait([started], timeout=0)
        if not done:
            return None
        ray.get(started)
        return ray.get(spare.alive.remote(), timeout=5) is True
    except Exception:
        return False


def site_plans(
    config: FederationConfig,
    sites: Sequence[Site],
    job: TrainerJob,
    coordinator: Any,
    privacy: dict[str, Optional[DPSGD]],
) -> dict[str, SitePlan]:
    """Each site's plan, in site order (site ``i`` is seeded with ``config.seed + i``); each gets its own instance
    of the aggregator's site half."""
    return {
        site.name: SitePlan(
            site=site,
            index=index,
            seed=config.seed,
            job=job,
            coordinator=coordinator,
            algorithm=config.aggregator.site_algorithm(),
            privacy=privacy[site.name],
        )
        for index, site in enumerate(sites)
    }
