"""Two steps of a federation's start that need nothing of the running federation: the coordinator actor, and each
site's plan (what its worker builds it from). :class:`~lightning_fed.federation.Federation` calls them in order.
Between warm runs, :class:`IdleCoordinator` keeps the coordinator's process for the next run."""

from __future__ import annotations

import uuid
from typing import Any, Optional, Sequence

import ray
from lightning.pytorch import LightningModule
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lightning_fed.checkpoint import RoundCheckpoint
from lightning_fed.config import FederationConfig
from lightning_fed.coordinator_process import CoordinatorLink, RemoteCoordinatorProcess
from lightning_fed.data.sites import Site
from lightning_fed.privacy_settings import DPSGD
from lightning_fed.role import COORDINATOR_ROLE, COORDINATOR_ROLE_ENV
from lightning_fed.site import SitePlan, TrainerJob
from lightning_fed.strategies.base import GlobalModel
from lightning_fed.strategies.site import state_to_numpy

END_SECONDS = 5.0  # how long a run's end may take in its coordinator before the process is ended instead


def start_coordinator(
    config: FederationConfig,
    names: list[str],
    module: LightningModule,
    job: TrainerJob,
    layout: Optional[dict[str, Any]],
    server_state: Optional[dict[str, Any]],
    resume: Optional[RoundCheckpoint],
    idle: Optional[Any] = None,
) -> CoordinatorLink:
    """The run's coordinator, on the driver's node, in a process that never imports Lightning (torch only for an
    aggregator that needs it): ``idle`` (a :class:`~lightning_fed.coordinator_process.CoordinatorProcess` kept from an
    earlier run) or a new one. Round 0's global model is ``module``'s weights, unless the run resumes (then the
    checkpoint's server state holds it)."""
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
    run = uuid.uuid4().hex
    if idle is not None:
        # waited for: a call of the driver's that overtook it (e.g. while the model travels) would find no federation
        try:
            ray.get(idle.begin.remote(run, config.aggregator, names, **options))
            return CoordinatorLink(idle, run)
        except RayTaskError as err:
            kill_quietly(idle)
            raise err.as_instanceof_cause() from None
        except RayActorError:  # it died while idle: a new one instead
            kill_quietly(idle)
    # a new process begins in its constructor, which Ray runs before any call reaches it
    actor = RemoteCoordinatorProcess.options(**_coordinator_process()).remote(run, config.aggregator, names, **options)
    return CoordinatorLink(actor, run)


def _coordinator_process() -> dict[str, Any]:
    """Where a coordinator runs: the driver's node, in a process marked to skip torch and Lightning."""
    return dict(
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
        runtime_env={"env_vars": {COORDINATOR_ROLE_ENV: COORDINATOR_ROLE}},
    )


class IdleCoordinator:
    """The coordinator process a warm pool keeps between runs: a run that ends hands its coordinator's process back
    (its federation ended, its state gone), and the next run is coordinated there instead of in a new process, which
    would cost it about a second of CPU (a process start: Ray, numpy, the aggregators). One process at a time."""

    def __init__(self) -> None:
        self._actor: Optional[Any] = None

    def take(self) -> Optional[Any]:
        """The kept process, if it still answers (``None`` if there is none or it died while idle, e.g. killed for
        memory, or gone with an earlier Ray)."""
        actor, self._actor = self._actor, None
        if actor is None:
            return None
        try:
            if ray.get(actor.alive.remote(), timeout=5) is True:
                return actor
        except Exception:
            pass
        kill_quietly(actor)
        return None

    def keep(self, link: CoordinatorLink) -> bool:
        """End ``link``'s run in its coordinator (sites still waiting on it stop with an error) and keep the process
        for the next run. A process that does not answer within :data:`END_SECONDS` (dead, or stuck in an aggregator)
        is ended instead, as is one that has loaded torch (a DP-FedAvg accountant does; kept, it would hold torch's
        memory for runs that never use it) and one more than this keeps. Returns whether it was kept."""
        try:
            ended, heavy = ray.get(
                [link.actor.end.remote(link.run), link.actor.has_loaded.remote("torch")], timeout=END_SECONDS
            )
        except Exception:
            ended, heavy = False, True
        if ended is not True or heavy or self._actor is not None:
            kill_quietly(link.actor)
            return False
        self._actor = link.actor
        return True

    def idle(self) -> list[Any]:
        """The kept process, alive by design for the next run."""
        return [self._actor] if self._actor is not None else []

    def close(self) -> None:
        """End the kept process."""
        if self._actor is not None:
            kill_quietly(self._actor)
        self._actor = None


def kill_quietly(actor: Any) -> None:
    """End ``actor``'s process, if it still has one."""
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # gone already, or Ray with it
        pass


def site_plans(
    config: FederationConfig,
    sites: Sequence[Site],
    job: TrainerJob,
    coordinator: CoordinatorLink,
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
