"""Per-site loggers derived from the driver's loggers.

Loggers are not shipped to sites (pickling a ``WandbLogger`` starts a run on the driver); a :class:`SiteLoggerSpec`
is, and each site builds its own logger from it inside its actor:

- ``CSVLogger`` / ``TensorBoardLogger``: the version folder is decided once on the driver; site ``<name>`` logs to
  ``<driver log_dir>/sites/<name>/``; the driver's own logger receives the federated ``fl/...`` metrics.
- ``WandbLogger``: one run per site (``job_type="site"``) plus the driver's global run (``job_type="federated"``),
  all in one W&B group; offline stays offline. Each site's run is finished inside its actor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn


@dataclass
class SiteLoggerSpec:
    """Picklable recipe for one site's logger; ``build(site)`` runs in the site's actor."""

    kind: str
    kwargs: dict[str, Any]

    def build(self, site: str) -> Logger:
        if self.kind == "csv":
            return CSVLogger(name="sites", version=site, **self.kwargs)
        if self.kind == "tensorboard":
            return TensorBoardLogger(name="sites", version=site, **self.kwargs)
        if self.kind == "wandb":
            kwargs = dict(self.kwargs)
            # several sites may share a worker process: each needs a run of its own, not the process's global one
            return WandbLogger(name=f"{kwargs.pop('run_name')}-{site}", job_type="site", reinit="create_new", **kwargs)
        raise ValueError(f"unknown site logger kind {self.kind!r}")


def site_logger_specs(loggers: list[Logger]) -> list[SiteLoggerSpec]:
    """One spec per driver logger that can be mirrored on sites (others log on the driver only, with a warning)."""
    specs = []
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            specs.append(SiteLoggerSpec("csv", {"save_dir": logger.log_dir}))
        elif isinstance(logger, TensorBoardLogger):
            specs.append(SiteLoggerSpec("tensorboard", {"save_dir": logger.log_dir}))
        elif isinstance(logger, WandbLogger):
            specs.append(SiteLoggerSpec("wandb", wandb_site_kwargs(logger)))
        else:
            rank_zero_warn(
                f"lightning-fed mirrors CSV, TensorBoard and W&B loggers on sites; {type(logger).__name__} receives federated metrics only"
            )
    return specs


def wandb_site_kwargs(logger: WandbLogger) -> dict[str, Any]:
    """Group the driver's W&B run with its sites' runs; decide the group before the driver's run starts."""
    init: dict[str, Any] = logger._wandb_init  # the kwargs WandbLogger will pass to wandb.init
    run_name = init.get("name") or f"federation-{time.strftime('%Y%m%d-%H%M%S')}"
    group = init.get("group") or run_name
    if logger._experiment is None:
        # LightningCLI passes these as explicit None: fill the empty ones, keep what the user chose
        for key, value in (("group", group), ("job_type", "federated"), ("name", run_name)):
            if not init.get(key):
                init[key] = value
    return {
        "run_name": run_name,
        "group": group,
        "project": init.get("project"),
        "save_dir": init.get("dir") or ".",
        "offline": bool(logger._offline or init.get("mode") == "offline"),
        **{k: init[k] for k in ("tags", "config", "entity", "notes") if init.get(k) is not None},
    }


def finish_site_loggers(loggers: list[Logger]) -> bool:
    """Flush every site logger; W&B runs must be finished in the process that started them or records are lost.
    Returns whether a W&B run was finished (then :func:`stop_wandb` once the process's last site is done)."""
    used_wandb = False
    for logger in loggers:
        try:
            logger.save()
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()
                used_wandb = True
        except Exception as err:  # never let a logger hide the training result
            rank_zero_warn(f"could not finish {type(logger).__name__}: {err}")
    return used_wandb


def stop_wandb() -> None:
    """Stop this process's W&B service, so that every record is on disk before the process ends."""
    import wandb

    wandb.teardown()


def log_driver_metrics(loggers: list[Logger], metrics: dict[str, Any], step: Optional[int]) -> None:
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if not scalars:
        return
    for logger in loggers:
        logger.log_metrics(scalars, step=step)
