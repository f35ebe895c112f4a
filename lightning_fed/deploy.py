"""The model a site should deploy: chosen at the site on its own validation data among the models it holds,
calibrated there, and kept there (:class:`~lightning_fed.config.Deployment`). Only the scores leave the site."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import LightningModule

from lightning_fed.calibration import classifier_outputs, expected_calibration_error, fit_temperature
from lightning_fed.config import Deployment
from lightning_fed.results import SiteDeployment


def best(scores: dict[str, float], maximise: bool) -> str:
    """The name with the best score (NaN never wins; a tie goes to the first, so ``global`` before the others)."""
    finite = {name: score for name, score in scores.items() if score == score}
    if not finite:
        raise ValueError(f"every candidate scored NaN: {scores}")
    pick = max if maximise else min
    return pick(finite, key=lambda name: finite[name])


def choose_deployment(
    site: str,
    settings: Deployment,
    candidates: dict[str, LightningModule],
    validate: Callable[[LightningModule], dict[str, float]],
    val_loader: Any,
    device: torch.device,
    site_folder: str,
) -> tuple[LightningModule, Optional[float], SiteDeployment]:
    """Validate every candidate at this site, keep the best by ``settings.metric``, fit its temperature on the same
    validation data and write both to ``<site_folder>/deployed.ckpt``. Returns the model, its temperature and the
    report (scores only)."""
    scores = {}
    for name, module in candidates.items():
        values = validate(module)
        if settings.metric not in values:
            raise ValueError(
                f"site {site!r}: the deployment metric {settings.metric!r} is not among its validation results "
                f"({', '.join(sorted(values))}): name one of those in Deployment(metric=...)"
            )
        scores[name] = float(values[settings.metric])
    try:
        chosen = best(scores, settings.maximise)
    except ValueError as err:
        raise ValueError(f"site {site!r}: no model to deploy, {err}") from None
    model, temperature, ece = candidates[chosen], None, None
    if settings.calibrate:
        outputs = classifier_outputs(model, val_loader, device)
        if outputs is not None:
            temperature = fit_temperature(*outputs)
            ece = (expected_calibration_error(*outputs), expected_calibration_error(*outputs, temperature))
    path = Path(site_folder) / "deployed.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "chosen": chosen,
            "temperature": temperature,
            "metric": settings.metric,
            "validation": scores,
        },
        path,
    )
    return model, temperature, SiteDeployment(chosen, settings.metric, scores, temperature, ece, str(path))


def calibration_on(
    model: LightningModule, temperature: Optional[float], loader: Any, device: torch.device
) -> dict[str, float]:
    """Expected calibration error of the deployed model on ``loader``, before and after its temperature."""
    outputs = classifier_outputs(model, loader, device) if temperature is not None else None
    if outputs is None:
        return {}
    return {
        "ece": expected_calibration_error(*outputs),
        "ece_calibrated": expected_calibration_error(*outputs, temperature),
    }
