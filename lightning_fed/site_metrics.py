"""The site half of the metrics: :class:`SiteMetrics` measures the module's outputs on a site's own evaluation data
and keeps each metric's *state* (what :mod:`lightning_fed.metrics` merges across sites); the helpers that read a
batch's inputs and targets whatever its shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.hooks import RemovableHandle

from lightning_fed.metrics import DEFAULT_THRESHOLDS, IGNORE_INDEX, TaskSpec, compute_metrics, metric_states


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


def logits_of(output: Any) -> Optional[torch.Tensor]:
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
    measured on images alone (so also at a site without labels). A module whose outputs are no class scores or masks
    (e.g. a Cox model's log hazards) sets ``lightning_fed_metrics = False``: only its own logged metrics are reported.
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
        self._own_metrics_only = False  # the module set lightning_fed_metrics = False
        self.groups: tuple[str, ...] = ()
        self.results: dict[str, dict[str, Any]] = {}

    # -- capture ---------------------------------------------------------------------------------
    def _start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._own_metrics_only = getattr(pl_module, "lightning_fed_metrics", True) is False
        if self._own_metrics_only:
            # the module measures itself (e.g. a Cox model's C-index): its outputs are no class scores to rate; its
            # samples still weigh its scalars in the federated means
            self._samples[stage] = 0
            return
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
        if self._own_metrics_only:
            self._samples[stage] += len(inputs_of(batch))
            return
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
        logits = next((lg for lg in map(logits_of, reversed(captured)) if lg is not None and len(lg) == count), None)
        if logits is None:
            try:
                with torch.no_grad():
                    logits = logits_of(pl_module(inputs))
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
