"""Survival analysis as a task, and FLamby's two tabular baselines (Ogier du Terrail et al., NeurIPS 2022).

:func:`cox_loss` and :func:`concordance_index` compute what FLamby's Fed-TCGA-BRCA benchmark computes
(``owkin/FLamby`` @ edacf54, ``flamby/datasets/fed_tcga_brca/loss.py`` and ``metric.py``); :class:`CoxModel` is its
baseline (a linear Cox model) and :class:`LogisticRegression` the Fed-Heart-Disease baseline, both as
LightningModules that run unchanged under :class:`~lightning_fed.FederatedStrategy`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from lightning_fed.models.base import StagedModule

Optimizer = Literal["adam", "sgd"]


def cox_loss(log_hazard: torch.Tensor, event: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """FLamby's Cox loss: the negative Cox partial log-likelihood of the batch, summed over events and divided by
    the number of patients (censored ones included).

    Each event contributes ``log(sum_{j in R_i} exp(h_j)) - h_i``. FLamby orders the batch by time, longest first,
    keeping the batch's order among equal times, and a patient's risk set ``R_i`` is itself and everyone before it:
    without ties that is the exact partial likelihood; among tied times only the patients earlier in the batch
    count (neither Breslow's nor Efron's correction), which this reproduces.
    """
    log_hazard, event, time = log_hazard.reshape(-1), event.reshape(-1), time.reshape(-1)
    order = torch.sort(time, descending=True, stable=True).indices
    h = log_hazard[order]
    return ((torch.logcumsumexp(h, 0) - h) * event[order].to(h.dtype)).mean()


def concordance_index(log_hazard: torch.Tensor, event: torch.Tensor, time: torch.Tensor) -> float:
    """Harrell's C of risk scores, as FLamby computes it (``lifelines.utils.concordance_index(time, -risk, event)``).

    A pair is comparable when the patient with the shorter time had the event (a death and a censoring at the same
    time count, the death first; two deaths at the same time do not); it is concordant when that patient has the
    higher risk, and counts one half when the risks are equal. NaN when no pair is comparable (e.g. no event).
    All pairs at once: memory grows with the square of the patients (fine for a site's epoch of tabular data).
    """
    risk = log_hazard.detach().reshape(-1).double()
    event, time = event.detach().reshape(-1).bool(), time.detach().reshape(-1).double()
    # i (rows) had the event and left first: before j, or at the same time as a censored j (never i itself)
    comparable = event[:, None] & (
        (time[:, None] < time[None, :]) | ((time[:, None] == time[None, :]) & ~event[None, :])
    )
    pairs = int(comparable.sum())
    if pairs == 0:
        return math.nan
    higher = (comparable & (risk[:, None] > risk[None, :])).sum()
    equal = (comparable & (risk[:, None] == risk[None, :])).sum()
    return float(higher + 0.5 * equal) / pairs


class _FlambyBaseline(StagedModule):
    """What both baselines share: FLamby's optimizers (Adam for its pooled baseline, SGD for its strategies)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        if h.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=h.lr)
        return torch.optim.Adam(self.parameters(), lr=h.lr)

    @staticmethod
    def _check_optimizer(optimizer: str) -> None:
        if optimizer not in ("adam", "sgd"):
            raise ValueError(
                f"optimizer must be 'adam' (FLamby's pooled baseline) or 'sgd' (its strategies), got {optimizer!r}"
            )


class CoxModel(_FlambyBaseline):
    """FLamby's Fed-TCGA-BRCA baseline: a linear Cox proportional-hazards model (``in_features`` → one log hazard),
    trained with FLamby's :func:`cox_loss`; Adam with learning rate 0.1 as FLamby's pooled baseline (its federated
    strategies use SGD: ``optimizer="sgd"``).

    Batches are ``(features, event, time)`` (:class:`~lightning_fed.data.flamby.FedTcgaBrca`) or
    ``(features, target)`` with FLamby's target ``[B, 2]`` = (event, time). Logs ``train_loss``,
    ``val_loss``/``test_loss`` and ``val_c_index``/``test_c_index``: Harrell's C (:func:`concordance_index`) of the
    whole epoch's predictions, kept per stage, so each site's value is computed on all its patients at once, as
    FLamby evaluates each centre. A federation's ``fl/test_c_index`` is the sample-weighted mean of the sites' values,
    not the C-index of the pooled test set (pairs across sites are never compared).
    """

    lightning_fed_metrics = False  # log hazards, not class scores: the C-index is this module's own metric

    def __init__(self, in_features: int = 39, lr: float = 0.1, optimizer: Optimizer = "adam") -> None:
        super().__init__()
        self._check_optimizer(optimizer)
        self.save_hyperparameters()
        self.fc = nn.Linear(in_features, 1)
        self._epoch: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    @staticmethod
    def unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(features, event, time)`` of a ``(features, event, time)`` or ``(features, [event, time])`` batch."""
        if len(batch) == 3:
            return batch[0], batch[1], batch[2]
        x, target = batch
        if target.dim() != 2 or target.shape[1] != 2:
            raise ValueError(
                f"CoxModel needs (features, event, time) batches or a target [B, 2] = (event, time), got a target of "
                f"shape {tuple(target.shape)}"
            )
        return x, target[:, 0], target[:, 1]

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, event, time = self.unpack(batch)
        log_hazard = self(x)
        loss = cox_loss(log_hazard, event, time)
        self.log(f"{stage}_loss", loss, prog_bar=stage != "test", on_step=False, on_epoch=True, batch_size=len(x))
        if stage != "train":
            self._epoch.setdefault(stage, []).append((log_hazard.detach().reshape(-1), event, time))
        return loss

    def _start(self, stage: str) -> None:
        self._epoch[stage] = []

    def _finish(self, stage: str) -> None:
        parts = self._epoch.pop(stage, [])
        if parts:
            value = concordance_index(*(torch.cat(t).cpu() for t in zip(*parts)))
            self.log(f"{stage}_c_index", value, prog_bar=stage != "test", batch_size=sum(len(p[0]) for p in parts))

    def on_validation_epoch_start(self) -> None:
        self._start("val")

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_start(self) -> None:
        self._start("test")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The log hazard (risk score) of each patient."""
        return self(batch[0] if isinstance(batch, (list, tuple)) else batch)


class LogisticRegression(_FlambyBaseline):
    """FLamby's Fed-Heart-Disease baseline: one linear layer (``in_features`` → 1) with a sigmoid and binary
    cross-entropy; Adam with learning rate 1e-3 as FLamby's pooled baseline (its strategies use SGD:
    ``optimizer="sgd"``).

    ``forward`` returns the logit (the sigmoid sits in the loss, which is FLamby's ``BCELoss`` of sigmoid outputs
    computed stably), because lightning-fed's site metrics apply the sigmoid to a binary module's outputs
    themselves; ``predict_step`` returns the probability. Logs ``{stage}_loss`` and ``val_acc``/``test_acc``
    (FLamby's metric: probability above 0.5); lightning-fed adds AUROC, precision and recall per site.
    """

    def __init__(self, in_features: int = 13, lr: float = 1e-3, optimizer: Optimizer = "adam") -> None:
        super().__init__()
        self._check_optimizer(optimizer)
        self.save_hyperparameters()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logit = self(x).reshape(-1)
        target = y.reshape(-1).to(logit.dtype)
        loss = F.binary_cross_entropy_with_logits(logit, target)
        self.log(f"{stage}_loss", loss, prog_bar=stage != "test", on_step=False, on_epoch=True, batch_size=len(y))
        if stage != "train":
            predicted = logit.sigmoid() > 0.5  # FLamby thresholds the probability
            self.log(f"{stage}_acc", (predicted == (target > 0.5)).float().mean(), on_epoch=True, batch_size=len(y))
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The probability of heart disease."""
        return self(batch[0] if isinstance(batch, (list, tuple)) else batch).sigmoid()
