"""Two steps of a federation's start that need nothing of the running federation: the coordinator actor, and each
site's plan (what its worker builds it from). :class:`~lightning_fed.federation.Federation` calls them in order."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import ray
from lightning.pytorch import LightningModule
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lightning_fed.checkpoint import RoundCheckpoint
from lightning_fed.config import FederationConfig
from lightning_fed.coordinator import RemoteCoordinator
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
) -> Any:
    """The coordinator actor, on the driver's node, in a process that never imports torch or Lightning. Round 0's
    global model is ``module``'s weights, unless the run resumes (then the checkpoint's server state holds it)."""
    return RemoteCoordinator.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
        runtime_env={"env_vars": {COORDINATOR_ROLE_ENV: COORDINATOR_ROLE}},
    ).remote(
        config.aggregator,
        names,
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
