"""Compare and sweep results to Weights & Biases: the settings of the recipe's ``WandbLogger``, and one W&B run
(``job_type`` ``compare``/``sweep``) that holds the result tables and figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

Table = tuple[list[str], list[list[Any]]]  # column names, rows


def wandb_settings(loggers: Sequence[Any]) -> Optional[dict[str, Any]]:
    """The ``WandbLogger`` arguments (project, folder, name, offline, entity, tags) of the first W&B logger among a
    recipe's ``loggers``; ``None`` without one (then nothing goes to W&B)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            init = logger._wandb_init  # the logger keeps its wandb.init arguments only here
            return {
                "project": init.get("project"),
                "save_dir": init.get("dir") or ".",
                "name": init.get("name") or "experiment",
                "offline": bool(logger._offline or init.get("mode") == "offline"),
                **{k: init[k] for k in ("entity", "tags") if init.get(k) is not None},
            }
    return None


def log_to_wandb(
    settings: dict[str, Any], kind: str, tables: dict[str, Table], images: Sequence[Path], config: dict[str, Any]
) -> str:
    """One W&B run (``job_type`` = ``compare``/``sweep``) holding the result tables and plots; returns its folder."""
    from lightning.pytorch.loggers import WandbLogger

    settings = dict(settings)
    name = settings.pop("name")
    logger = WandbLogger(name=f"{name}-{kind}", group=f"{name}-{kind}", job_type=kind, **settings)
    logger.log_hyperparams(config)
    for key, (columns, data) in tables.items():
        logger.log_table(key=key, columns=columns, data=data)
    if images:
        logger.log_image(key="plots", images=[str(p) for p in images], caption=[p.stem for p in images])
    folder = logger.experiment.dir
    logger.experiment.finish()
    return folder
