"""Per-site classification and segmentation metrics and their exact federated merge.

Every site measures accuracy, precision, recall, AUROC and the confusion matrix of the module's own outputs on
its own evaluation data (segmentation: Dice per class and per group, e.g. scanner vendor, and the predictive
uncertainty per group). What leaves the site is each metric's *state* (confusion counts, binned ROC counts, pixel
counts and uncertainty sums), never predictions. The coordinator sums the states, so the federated value equals what
pooling every site's predictions would give (AUROC with ``thresholds`` bins; Dice over all pixels), which averaging
site scores does not.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torchmetrics.classification as tmc
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle
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


def targets_of(batch: Any) -> Optional[torch.Tensor]:
    """The targets of an ``(inputs, targets)`` batch or of a dict batch (``label``, ``target``, ...), if any."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    if isinstance(batch, dict):
        for key in ("target", "targets", "label", "labels", "y"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    return None


def inputs_of(batch: Any) -> Any:
    """The inputs of an ``(inputs, targets)`` batch or of a dict batch (``image``, ``input``, ``x``, ...)."""
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "images", "input", "inputs", "x"):
            if key in batch:
                return batch[key]
    return batch


def _logits_of(output: Any) -> Optional[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = output.get("logits", next(iter(output.values()), None))
        return output if isinstance(output, torch.Tensor) else None
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


class SiteMetrics(Callback):
    """Measures the module's outputs on this site's validation and test data and logs ``site/<name>/<stage>_<metric>``.

    Outputs are captured with a forward hook when ``validation_step``/``test_step`` call the module (no extra
    compute); otherwise the batch's inputs are run through ``forward`` once more. Batches are ``(inputs, targets)``
    pairs or dicts with a ``target``/``label`` key. Outputs shaped ``[B, C, H, W]`` against targets ``[B, H, W]``
    are a segmentation: Dice per class and per ``group`` (a batch key; names from the datamodule's
    ``group_names``), and, when the module offers ``predictive_uncertainty(images)``, its uncertainty per group,
    measured on images alone (so also at a site without labels).
    """

    def __init__(self, site: str, thresholds: int = DEFAULT_THRESHOLDS) -> None:
        self.site = site
        self.thresholds = thresholds
        self.spec: Optional[TaskSpec] = None
        self._metrics: dict[str, dict[str, Any]] = {}
        self._samples: dict[str, int] = {}
        self._captured: list[torch.Tensor] = []
        self._handle: Optional[RemovableHandle] = None
        self._disabled: Optional[str] = None
        self.groups: tuple[str, ...] = ()
        self.results: dict[str, dict[str, Any]] = {}

    # -- capture ---------------------------------------------------------------------------------
    def _start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # group names (e.g. vendors) of the batches' ``group`` index, from the site's datamodule
        self.groups = (
            tuple(getattr(trainer.datamodule, "group_names", None) or ()) if self.spec is None else self.spec.groups
        )
        self._metrics.pop(stage, None)
        self._samples[stage] = 0
        self._captured = []

        def hook(_module: Any, _args: Any, output: Any) -> None:
            self._captured.append(output)

        self._handle = pl_module.register_forward_hook(hook)

    def _stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _update(self, pl_module: LightningModule, batch: Any, stage: str) -> None:
        captured, self._captured = self._captured, []
        if self._disabled:
            return
        targets = targets_of(batch)
        uncertainty = getattr(pl_module, "predictive_uncertainty", None)
        if targets is None and not callable(uncertainty):
            return self._disable(
                "batches have no recognisable targets (expected (inputs, targets) or a dict with 'label')"
            )
        inputs = inputs_of(batch)
        count = len(targets) if targets is not None else len(inputs)
        logits = next((lg for lg in map(_logits_of, reversed(captured)) if lg is not None and len(lg) == count), None)
        if logits is None:
            try:
                with torch.no_grad():
                    logits = _logits_of(pl_module(inputs))
            except Exception as err:  # a module whose forward needs more than the inputs
                return self._disable(f"forward(inputs) failed ({type(err).__name__}: {err})")
            if logits is None or len(logits) != count:
                return self._disable("forward(inputs) did not return one row of logits per target")
        if self.spec is None:
            try:
                self.spec = TaskSpec.infer(logits, targets, self.thresholds, self.groups)
            except ValueError:
                return self._disable("batches have no targets and the outputs are not a segmentation")
        if stage not in self._metrics:
            self._metrics[stage] = {k: m.to(logits.device) for k, m in self.spec.build().items()}
        if self.spec.kind == "segmentation":
            return self._update_segmentation(uncertainty, inputs, logits, targets, batch, stage)
        if targets is None:
            return
        probs = self.spec.probabilities(logits)
        target = targets.long()
        if self.spec.kind == "binary":
            target = target.reshape(-1)
        for metric in self._metrics[stage].values():
            metric.update(probs, target)
        self._samples[stage] += (
            int((target != IGNORE_INDEX).any(-1).sum()) if target.dim() > 1 else int((target != IGNORE_INDEX).sum())
        )

    def _update_segmentation(
        self,
        uncertainty: Any,
        inputs: torch.Tensor,
        logits: torch.Tensor,
        targets: Optional[torch.Tensor],
        batch: Any,
        stage: str,
    ) -> None:
        group = batch.get("group") if isinstance(batch, dict) else None
        groups = (
            group.to(logits.device)
            if isinstance(group, torch.Tensor)
            else torch.full((len(logits),), -1, device=logits.device)
        )
        metrics = self._metrics[stage]
        if targets is not None:
            metrics["dice"].update(logits.argmax(1), targets, groups)
        if callable(uncertainty):
            metrics["uncertainty"].update(uncertainty(inputs), groups)
            self._captured = []  # the extra passes are not this batch's outputs
        self._samples[stage] += len(logits)

    def _disable(self, why: str) -> None:
        self._disabled = why
        rank_zero_warn(f"lightning-fed metrics are off on site {self.site!r}: {why}")

    def _finish(self, pl_module: LightningModule, stage: str) -> None:
        self._stop()
        if stage not in self._metrics or self.spec is None:
            return
        values = compute_metrics(self.spec, self._metrics[stage])
        self.results[stage] = values
        for name, value in values.items():
            if isinstance(value, float):
                pl_module.log(f"site/{self.site}/{stage}_{name}", value, on_epoch=True, batch_size=1)

    def export(self, stage: str) -> Optional[dict[str, Any]]:
        """This site's mergeable metric states for ``stage`` (``None`` when nothing was measured)."""
        if stage not in self._metrics or self.spec is None:
            return None
        return {
            "spec": dataclasses.asdict(self.spec),
            "states": metric_states(self._metrics[stage]),
            "num_samples": self._samples.get(stage, 0),
        }

    def samples(self, stage: str) -> int:
        return self._samples.get(stage, 0)

    # -- Lightning hooks ----------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._start(trainer, pl_module, "val")

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._update(pl_module, batch, "val")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish(pl_module, "val")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update(pl_module, batch, "test")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(pl_module, "test")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stop()
