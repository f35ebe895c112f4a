"""Per-site classification and segmentation metrics and their exact federated merge.

Every site measures accuracy, precision, recall, AUROC and the confusion matrix of the module's own outputs on
its own evaluation data (segmentation: Dice per class and per group, e.g. scanner vendor, and the predictive
uncertainty per group). What leaves the site is each metric's *state* (confusion counts, binned ROC counts, pixel
counts and uncertainty sums), never predictions. The coordinator sums the states, so the federated value equals what
pooling every site's predictions would give (AUROC with ``thresholds`` bins; Dice over all pixels), which averaging
site scores does not.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torchmetrics.classification as tmc
from torch.nn import functional as F
from torchmetrics import Metric

DEFAULT_THRESHOLDS = 1000
IGNORE_INDEX = -1  # unlabelled targets (partial labels) never count as negatives


@dataclass(frozen=True)
class TaskSpec:
    """What kind of classification the module's outputs describe, inferred from the first evaluated batch."""

    kind: str  # "binary" | "multiclass" | "multilabel" | "segmentation"
    num_classes: int
    thresholds: int = DEFAULT_THRESHOLDS
    groups: tuple[str, ...] = ()  # segmentation: names of the batches' ``group`` indices (e.g. vendors)

    @staticmethod
    def infer(
        logits: torch.Tensor,
        targets: Optional[torch.Tensor],
        thresholds: int = DEFAULT_THRESHOLDS,
        groups: tuple[str, ...] = (),
    ) -> "TaskSpec":
        if logits.dim() >= 3 and (targets is None or tuple(targets.shape) == (logits.shape[0], *logits.shape[2:])):
            return TaskSpec("segmentation", logits.shape[1], thresholds, tuple(groups))
        if targets is None:
            raise ValueError("classification metrics need targets")
        if targets.dim() == 2 and logits.shape == targets.shape:
            return TaskSpec("multilabel", logits.shape[1], thresholds)
        if logits.dim() == 1 or logits.shape[-1] in (1, 2):
            return TaskSpec("binary", 2, thresholds)
        return TaskSpec("multiclass", logits.shape[-1], thresholds)

    def build(self) -> dict[str, Any]:
        t, common = self.thresholds, {"ignore_index": IGNORE_INDEX}
        if self.kind == "segmentation":
            return {
                "dice": GroupedOverlap(self.num_classes, len(self.groups)),
                "uncertainty": GroupedUncertainty(len(self.groups)),
            }
        if self.kind == "binary":
            return {
                "accuracy": tmc.BinaryAccuracy(**common),
                "precision": tmc.BinaryPrecision(**common),
                "recall": tmc.BinaryRecall(**common),
                "auroc": tmc.BinaryAUROC(thresholds=t, **common),
                "confusion_matrix": tmc.BinaryConfusionMatrix(**common),
            }
        if self.kind == "multiclass":
            c = {"num_classes": self.num_classes, **common}
            return {
                "accuracy": tmc.MulticlassAccuracy(average="micro", **c),
                "precision": tmc.MulticlassPrecision(average="macro", **c),
                "recall": tmc.MulticlassRecall(average="macro", **c),
                "auroc": tmc.MulticlassAUROC(average="macro", thresholds=t, **c),
                "confusion_matrix": tmc.MulticlassConfusionMatrix(**c),
            }
        c = {"num_labels": self.num_classes, **common}
        return {
            "accuracy": tmc.MultilabelAccuracy(average="micro", **c),
            "precision": tmc.MultilabelPrecision(average="macro", **c),
            "recall": tmc.MultilabelRecall(average="macro", **c),
            # per label, then the mean over labels that have both classes (a label without support would read 0.0)
            "auroc": tmc.MultilabelAUROC(average="none", thresholds=t, **c),
        }

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.detach().float()
        if self.kind == "binary":
            if logits.dim() > 1 and logits.shape[-1] == 2:
                return logits.softmax(-1)[..., 1]
            return logits.reshape(-1).sigmoid()
        if self.kind == "multiclass":
            return logits.softmax(-1)
        return logits.sigmoid()


class GroupedOverlap(Metric):
    """Pixel counts of true positives, false positives and false negatives per group and class (all sums).

    Row ``g`` holds the images of group ``g``; the last row those without a known group. Dice of class ``c`` is
    ``2 tp / (2 tp + fp + fn)`` over every pixel counted, so sites' counts add up to the pooled Dice.
    """

    full_state_update = False

    def __init__(self, num_classes: int, num_groups: int) -> None:
        super().__init__()
        self.num_classes, self.num_groups = num_classes, num_groups
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.zeros(num_groups + 1, num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, groups: torch.Tensor) -> None:
        c = self.num_classes
        pred = F.one_hot(preds.long().clamp(0, c - 1), c).flatten(1, -2).double()  # [B, pixels, C]
        true = F.one_hot(target.long().clamp(0, c - 1), c).flatten(1, -2).double()
        rows = _group_rows(groups, self.num_groups)
        self.tp.index_add_(0, rows, (pred * true).sum(1))
        self.fp.index_add_(0, rows, (pred * (1 - true)).sum(1))
        self.fn.index_add_(0, rows, ((1 - pred) * true).sum(1))

    def compute(self) -> torch.Tensor:
        return dice_scores(self.tp.sum(0), self.fp.sum(0), self.fn.sum(0))


class GroupedUncertainty(Metric):
    """Sums of per-pixel entropy, aleatoric entropy and mutual information, and pixel counts, per group."""

    full_state_update = False
    TERMS = ("entropy", "aleatoric", "mutual_information")

    def __init__(self, num_groups: int) -> None:
        super().__init__()
        self.num_groups = num_groups
        for name in (*self.TERMS, "pixels"):
            self.add_state(name, torch.zeros(num_groups + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, uncertainty: Any, groups: torch.Tensor) -> None:
        rows = _group_rows(groups, self.num_groups)
        for name in self.TERMS:
            values = getattr(uncertainty, name).double().flatten(1)
            getattr(self, name).index_add_(0, rows, values.sum(1))
        self.pixels.index_add_(
            0,
            rows,
            torch.full((len(rows),), float(uncertainty.entropy[0].numel()), dtype=torch.float64, device=rows.device),
        )

    def compute(self) -> torch.Tensor:
        return self.entropy.sum() / self.pixels.sum().clamp_min(1)


def _group_rows(groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    rows = groups.long().reshape(-1)
    return torch.where((rows >= 0) & (rows < num_groups), rows, torch.full_like(rows, num_groups))


def dice_scores(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """Dice per class from pixel counts; NaN where a class is neither present nor predicted."""
    denominator = 2 * tp + fp + fn
    return torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1e-12), torch.full_like(tp, float("nan")))


def _mean_foreground(dice: torch.Tensor) -> float:
    values = [float(v) for v in dice[1:] if not torch.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def metric_key(name: str) -> str:
    """A group name as it appears in metric keys: lower case, letters, digits and ``_``."""
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_") or "group"


def segmentation_values(spec: TaskSpec, metrics: dict[str, Any]) -> dict[str, Any]:
    """``dice`` (mean over foreground classes), ``dice_per_class``, ``dice_<group>``; ``entropy``, ``aleatoric``,
    ``mutual_information`` (mean per pixel) and ``<term>_<group>``; groups without images are left out."""
    overlap, uncertainty = metrics["dice"], metrics["uncertainty"]
    out: dict[str, Any] = {}
    labelled = float((overlap.tp + overlap.fn).sum()) > 0
    if labelled:
        dice = dice_scores(overlap.tp.sum(0), overlap.fp.sum(0), overlap.fn.sum(0))
        out["dice"] = _mean_foreground(dice)
        out["dice_per_class"] = [None if torch.isnan(v) else float(v) for v in dice]
    pixels = uncertainty.pixels
    if float(pixels.sum()) > 0:
        for term in GroupedUncertainty.TERMS:
            out[term] = float(getattr(uncertainty, term).sum() / pixels.sum())
    for g, name in enumerate(spec.groups):
        key = metric_key(name)
        if labelled and float((overlap.tp[g] + overlap.fn[g]).sum()) > 0:
            out[f"dice_{key}"] = _mean_foreground(dice_scores(overlap.tp[g], overlap.fp[g], overlap.fn[g]))
        if float(pixels[g]) > 0:
            for term in GroupedUncertainty.TERMS:
                out[f"{term}_{key}"] = float(getattr(uncertainty, term)[g] / pixels[g])
    return out


def compute_metrics(spec: TaskSpec, metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalars as floats, the confusion matrix as nested lists, multi-label AUROC averaged over supported labels."""
    if spec.kind == "segmentation":
        return segmentation_values(spec, metrics)
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no positive samples" etc.: reflected in the value, not worth a warning
        for name, metric in metrics.items():
            value = metric.compute()
            if name == "confusion_matrix":
                out[name] = value.long().tolist()
            elif name == "auroc" and spec.kind == "multilabel":
                supported = _labels_with_support(metric)
                out["auroc_per_label"] = [float(v) if s else None for v, s in zip(value.tolist(), supported)]
                vals = [float(v) for v, s in zip(value.tolist(), supported) if s]
                out["auroc"] = float(np.mean(vals)) if vals else float("nan")
            else:
                out[name] = float(value)
    return out


def _labels_with_support(metric: Any) -> list[bool]:
    # binned state: confmat [T, L, 2, 2]; a label is supported when it has at least one positive and one negative
    confmat = metric.confmat[0]  # [L, 2, 2] at the first threshold: rows are the true class
    positives = confmat[:, 1, :].sum(-1)
    negatives = confmat[:, 0, :].sum(-1)
    return [bool(p > 0 and n > 0) for p, n in zip(positives, negatives)]


def metric_states(metrics: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Each metric's state as numpy arrays. Every state is a count (summed across sites); say so if one is not."""
    for name, metric in metrics.items():
        others = [k for k, fx in metric._reductions.items() if getattr(fx, "__name__", "") != "dim_zero_sum"]
        if others:
            raise ValueError(
                f"metric {name!r} keeps states {others} that are not sums: they cannot be merged across sites"
            )
    return {name: {k: v.detach().cpu().numpy() for k, v in m.metric_state.items()} for name, m in metrics.items()}


def merge_metric_states(spec: TaskSpec, states: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """The federated metrics: the sites' states summed into fresh metrics, then computed once."""
    merged = spec.build()
    for site_state in states:
        for name, metric in merged.items():
            metric.merge_state({k: torch.from_numpy(np.array(v)) for k, v in site_state[name].items()})
            metric._update_count += 1  # merge_state does not count as an update; compute() would warn otherwise
    return compute_metrics(spec, merged)


def federated_metrics(merged: dict[str, Any], stage: str) -> dict[str, Any]:
    """``fl/<key>`` for the merged scalars and for the metrics of the summed states
    (:func:`lightning_fed.metric_states.merge_reports`); ``fl/<stage>_confusion_matrix`` as a list."""
    out: dict[str, Any] = {f"fl/{k}": v for k, v in merged["scalars"].items()}
    summed = merged.get("metrics")
    if summed is not None:
        for name, value in merge_metric_states(TaskSpec(**summed["spec"]), [summed["states"]]).items():
            out[f"fl/{stage}_{name}"] = value
    return out
