"""Temperature scaling (Guo et al., 2017) and expected calibration error, for a classifier's logits at one site.

A temperature ``T > 0`` divides the logits before the softmax (or sigmoid); it is fitted by minimising the negative
log-likelihood on the site's validation data, so it changes the model's confidence, never its ranking or its
predicted class. Expected calibration error is torchmetrics' ``CalibrationError`` (15 equal-width bins, L1).
Binary outputs are one logit (sigmoid) or two (softmax); more are multi-class; multi-label outputs (one logit per
label, targets of the same shape) are calibrated as binary predictions, one per annotated label entry (unannotated
``-1`` entries left out), with one temperature for every label; segmentation is not calibrated here. The temperature
is kept within ``[1/20, 20]``: on a validation split where the model ranks worse than chance, the likelihood is best
with every probability at chance, i.e. ``T`` without bound.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch.nn import functional as F
from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

from lightning_fed.metrics import IGNORE_INDEX
from lightning_fed.site_metrics import inputs_of, logits_of, targets_of

BINS = 15
MAX_TEMPERATURE = 20.0


def classifier_outputs(
    module: torch.nn.Module, loader: Any, device: torch.device
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``module``'s logits and the targets over ``loader``, multi-label entries flattened to binary ones (``None``: not
    a classifier's outputs)."""
    logits, targets = [], []
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                target = targets_of(batch)
                if target is None:
                    return None
                inputs = inputs_of(batch)
                out = logits_of(module(inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs))
                if out is None or len(out) != len(target):
                    return None
                logits.append(out.detach().float().cpu())
                targets.append(target.detach().cpu())
    finally:
        module.train(was_training)
    if not logits:
        return None
    x, y = torch.cat(logits), torch.cat(targets)
    if x.dim() == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() == 2 and y.shape == x.shape:  # multi-label: every annotated (sample, label) entry a binary prediction
        x, y = x.reshape(-1), y.reshape(-1)
    if x.dim() > 2 or (x.dim() == 2 and y.dim() != 1) or (x.dim() == 1 and y.reshape(-1).shape != x.shape):
        return None  # segmentation, or outputs that do not match their targets
    keep = y.reshape(-1) != IGNORE_INDEX
    return x[keep], y.reshape(-1)[keep].long()


def _nll(logits: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    if logits.dim() == 1:
        return F.binary_cross_entropy_with_logits(logits / temperature, targets.float())
    return F.cross_entropy(logits / temperature, targets)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature in ``[1/20, 20]`` that minimises the negative log-likelihood of ``targets`` (L-BFGS on a
    bounded parametrisation ``log T = log 20 · tanh(u)``)."""
    bound = math.log(MAX_TEMPERATURE)
    u = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([u], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _nll(logits, targets, (bound * torch.tanh(u)).exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    return float((bound * torch.tanh(u.detach())).exp())


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """ECE of the probabilities ``logits / temperature`` give, against ``targets``."""
    scaled = logits / temperature
    if scaled.dim() == 1:
        return float(BinaryCalibrationError(n_bins=BINS)(scaled.sigmoid(), targets))
    if scaled.shape[1] == 2:
        return float(BinaryCalibrationError(n_bins=BINS)(scaled.softmax(1)[:, 1], targets))
    return float(MulticlassCalibrationError(num_classes=scaled.shape[1], n_bins=BINS)(scaled.softmax(1), targets))
