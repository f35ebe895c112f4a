"""A ready segmentation model with uncertainty: a MONAI U-Net with Monte-Carlo dropout or an evidential head.

Batches are dicts: ``image`` ``[B, 1, H, W]``, ``label`` ``[B, H, W]`` class indices (absent at a site without
ground truth), optionally ``group`` (e.g. the scanner vendor). lightning-fed measures Dice per class (and per
group), merged across sites as counts, and the predictive uncertainty per group (:class:`PixelUncertainty`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.nn import functional as F

from lightning_fed.models.base import StagedModule

Head = Literal["softmax", "evidential"]


@dataclass
class PixelUncertainty:
    """Per-pixel predictive uncertainty of a segmentation (natural logs).

    ``entropy`` is the entropy of the predictive mean ``probs``; it splits into ``aleatoric`` (expected entropy:
    what the images leave ambiguous) and ``mutual_information`` (what the model does not know: high where the
    images differ from what it was trained on). Under MC dropout these are the usual BALD terms over the dropout
    samples; with an evidential head, the Dirichlet's expected entropy and the remainder (as FedEvi computes them).
    """

    probs: torch.Tensor  # [B, C, H, W]
    entropy: torch.Tensor  # [B, H, W]
    aleatoric: torch.Tensor  # [B, H, W]
    mutual_information: torch.Tensor  # [B, H, W]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(1)


def dirichlet_uncertainty(logits: torch.Tensor) -> PixelUncertainty:
    """Evidential terms of ``alpha = exp(logits) + 1``: expected probabilities, their entropy, the Dirichlet's
    expected entropy ``sum_c p_c (psi(S + 1) - psi(alpha_c + 1))`` and the difference (distributional)."""
    alpha = logits.float().clamp(max=80).exp() + 1
    total = alpha.sum(1, keepdim=True)
    probs = alpha / total
    entropy = _entropy(probs)
    aleatoric = (probs * (torch.digamma(total + 1) - torch.digamma(alpha + 1))).sum(1)
    return PixelUncertainty(probs, entropy, aleatoric, (entropy - aleatoric).clamp_min(0))


def mc_dropout_uncertainty(net: nn.Module, images: torch.Tensor, samples: int) -> PixelUncertainty:
    """``samples`` stochastic passes with only the dropout layers in training mode (BatchNorm keeps its running
    statistics): predictive mean, its entropy, the mean entropy of the passes and their difference (BALD)."""
    modes = {m: m.training for m in net.modules()}
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train()
    try:
        with torch.no_grad():
            passes = torch.stack([net(images).float().softmax(1) for _ in range(samples)])
    finally:
        for m, mode in modes.items():
            m.train(mode)
    probs = passes.mean(0)
    entropy = _entropy(probs)
    aleatoric = torch.stack([_entropy(p) for p in passes]).mean(0)
    return PixelUncertainty(probs, entropy, aleatoric, (entropy - aleatoric).clamp_min(0))


class SegmentationModel(StagedModule):
    """A 2-D `MONAI <https://monai.io>`_ U-Net for multi-class segmentation, with uncertainty.

    Args:
        num_classes: classes including background (index 0).
        in_channels: image channels.
        channels, strides, num_res_units: the U-Net's layout (MONAI ``UNet``); BatchNorm throughout, so FedBN and
            FedFBN have layers to keep local or freeze.
        dropout: dropout in every block; Monte-Carlo dropout draws ``mc_samples`` passes for the uncertainty.
        head: ``"softmax"`` (Dice + cross-entropy; uncertainty by MC dropout) or ``"evidential"`` (Dirichlet
            outputs ``alpha = exp(logits) + 1``, trained with the evidential cross-entropy, an annealed KL term and
            Dice on the expected probabilities; uncertainty from one pass).
        lr, weight_decay: AdamW.
        pseudo_label_entropy: at a site without labels, pixels whose normalised predictive entropy (0-1) under
            the global model is below this become pseudo-labels; the rest are left out of the loss.
        kl_weight, kl_annealing_epochs: the evidential KL term's weight, reached linearly over these epochs.
        class_names: names of the classes, for reports.

    Training batches without ``label`` (a site declared ``labelled=False``) never reach a supervised loss: the
    model labels them itself with the global model it last received (:meth:`on_global_model_loaded`), keeping
    only its confident pixels. ``supervised_batches``/``pseudo_labelled_batches`` count both kinds.
    """

    def __init__(
        self,
        num_classes: int = 4,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64),
        strides: Sequence[int] = (2, 2),
        num_res_units: int = 1,
        dropout: float = 0.1,
        head: Head = "softmax",
        mc_samples: int = 8,
        lr: float = 2e-3,
        weight_decay: float = 1e-5,
        pseudo_label_entropy: float = 0.25,
        kl_weight: float = 0.01,
        kl_annealing_epochs: int = 10,
        class_names: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background too: need >= 2, got {num_classes}")
        if head not in ("softmax", "evidential"):
            raise ValueError(f"head must be 'softmax' or 'evidential', got {head!r}")
        if len(strides) != len(channels) - 1:
            raise ValueError(
                f"a U-Net with {len(channels)} levels needs {len(channels) - 1} strides, got {list(strides)}"
            )
        if head == "softmax" and (dropout <= 0 or mc_samples < 2):
            raise ValueError("MC-dropout uncertainty needs dropout > 0 and mc_samples >= 2 (or head='evidential')")
        if not 0 < pseudo_label_entropy <= 1:
            raise ValueError(f"pseudo_label_entropy is a normalised entropy in (0, 1], got {pseudo_label_entropy}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        self.save_hyperparameters()
        from monai.networks.nets import UNet

        self.net = UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=num_classes,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            dropout=dropout,
            norm="batch",
        )
        self._teacher: Optional[nn.Module] = None
        self.supervised_batches = 0
        self.pseudo_labelled_batches = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    # -- uncertainty -----------------------------------------------------------------------------
    def predictive_uncertainty(self, images: torch.Tensor, net: Optional[nn.Module] = None) -> PixelUncertainty:
        """Per-pixel uncertainty of ``net`` (default this model) on ``images``, without gradients."""
        net = net or self.net
        if self.hparams.head == "evidential":
            modes = {m: m.training for m in net.modules()}
            net.eval()
            try:
                with torch.no_grad():
                    return dirichlet_uncertainty(net(images))
            finally:
                for m, mode in modes.items():
                    m.train(mode)
        return mc_dropout_uncertainty(net, images, self.hparams.mc_samples)

    def on_global_model_loaded(self, round: int) -> None:
        """Called by lightning-fed when this site's module has just loaded the global model of ``round`` (0: the
        shared initial model at the start of training): it becomes the teacher of unlabelled batches."""
        # kept outside the module tree: the teacher is never part of the state dict that travels
        object.__setattr__(self, "_teacher", copy.deepcopy(self.net).requires_grad_(False))

    # -- losses ----------------------------------------------------------------------------------
    def supervised_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Dice + cross-entropy (softmax head) or evidential cross-entropy + annealed KL + Dice (evidential head)."""
        labels = labels.long()
        if self.hparams.head == "evidential":
            return self._evidential_loss(logits, labels, torch.ones_like(labels, dtype=torch.bool), with_dice=True)
        probs = logits.softmax(1)
        return F.cross_entropy(logits, labels) + soft_dice_loss(probs, labels)

    def _evidential_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, with_dice: bool
    ) -> torch.Tensor:
        alpha = logits.clamp(max=80).exp() + 1
        total = alpha.sum(1, keepdim=True)
        onehot = F.one_hot(labels, alpha.shape[1]).movedim(-1, 1).to(alpha.dtype)
        risk = (onehot * (torch.digamma(total) - torch.digamma(alpha))).sum(1)
        tilde = onehot + (1 - onehot) * alpha  # evidence for the wrong classes only
        kl = _kl_to_uniform_dirichlet(tilde)
        anneal = min(1.0, self.current_epoch / max(1, self.hparams.kl_annealing_epochs))
        per_pixel = risk + self.hparams.kl_weight * anneal * kl
        loss = (per_pixel * keep).sum() / keep.sum().clamp_min(1)
        return loss + soft_dice_loss(alpha / total, labels) if with_dice else loss

    def pseudo_label_loss(self, logits: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss on the teacher's confident pixels (and the fraction kept): labels the site never had."""
        teacher = self.predictive_uncertainty(images, self._teacher)
        pseudo = teacher.probs.argmax(1)
        keep = teacher.entropy / math.log(self.hparams.num_classes) < self.hparams.pseudo_label_entropy
        if self.hparams.head == "evidential":
            loss = self._evidential_loss(logits, pseudo, keep, with_dice=False)
        else:
            loss = (F.cross_entropy(logits, pseudo, reduction="none") * keep).sum() / keep.sum().clamp_min(1)
        return loss, keep.float().mean()

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        images = batch["image"]
        logits = self(images)
        if "label" in batch:
            loss = self.supervised_loss(logits, batch["label"])
            if stage == "train":
                self.supervised_batches += 1
        elif stage == "train":
            loss, kept = self.pseudo_label_loss(logits, images)
            self.pseudo_labelled_batches += 1
            self.log("train_pseudo_label_fraction", kept, on_step=False, on_epoch=True, batch_size=len(images))
        else:
            return logits.sum() * 0.0  # evaluation without labels: lightning-fed still measures the uncertainty
        self.log(f"{stage}_loss", loss, prog_bar=stage != "test", on_step=False, on_epoch=True, batch_size=len(images))
        return loss

    def configure_callbacks(self) -> list[Callback]:
        return [SegmentationOverlays(self.hparams.class_names)]

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.predictive_uncertainty(batch["image"] if isinstance(batch, dict) else batch).probs

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def soft_dice_loss(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean_c (2 sum p y + eps) / (sum p + sum y + eps)`` over the classes present in the batch."""
    onehot = F.one_hot(labels, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, probs.dim()))
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    present = onehot.sum(dims) > 0
    dice = (2 * intersection + eps) / (denominator + eps)
    return 1 - dice[present].mean()


def _kl_to_uniform_dirichlet(alpha: torch.Tensor) -> torch.Tensor:
    """``KL(Dir(alpha) || Dir(1))`` per pixel (Sensoy et al., 2018)."""
    k = alpha.shape[1]
    total = alpha.sum(1)
    return (
        torch.lgamma(total)
        - torch.lgamma(alpha).sum(1)
        - math.lgamma(k)
        + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(total)[:, None])).sum(1)
    )


class SegmentationOverlays(Callback):
    """After each test: the first ``count`` test images with the labels, the prediction and the mutual information
    side by side, as ``overlays/test.png`` in the trainer's log folder and as an image in its W&B run.

    In a federation this runs inside each site, so the images stay where the site keeps its logs (its own folder
    and W&B run on its own node): patients' images never travel to the driver.
    """

    def __init__(self, class_names: Optional[Sequence[str]] = None, count: int = 4) -> None:
        self.class_names, self.count = class_names, count
        self._shown: Optional[dict[str, torch.Tensor]] = None
        self.path: Optional[Path] = None

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._shown = None

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if (
            self._shown is not None
            or not isinstance(batch, dict)
            or not callable(getattr(pl_module, "predictive_uncertainty", None))
        ):
            return
        images = batch["image"][: self.count]
        u = pl_module.predictive_uncertainty(images)
        self._shown = {
            "image": images.detach().cpu(),
            "prediction": u.probs.argmax(1).cpu(),
            "mi": u.mutual_information.cpu(),
        }
        if "label" in batch:
            self._shown["label"] = batch["label"][: self.count].cpu()

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._shown is None or trainer.sanity_checking:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shown, classes = self._shown, int(pl_module.hparams.get("num_classes", 4))
        rows = [
            ("image", "image"),
            *([("label", "labels")] if "label" in shown else []),
            ("prediction", "prediction"),
            ("mi", "mutual information"),
        ]
        n = len(shown["image"])
        fig, axes = plt.subplots(len(rows), n, figsize=(1.7 * n, 1.7 * len(rows)), squeeze=False)
        for r, (key, title) in enumerate(rows):
            for c in range(n):
                ax = axes[r][c]
                ax.axis("off")
                ax.imshow(shown["image"][c, 0], cmap="gray", vmin=0, vmax=1)
                if key in ("label", "prediction"):
                    ax.imshow(
                        torch.where(shown[key][c] > 0, shown[key][c], 0).numpy(),
                        cmap="tab10",
                        vmin=0,
                        vmax=9,
                        alpha=(shown[key][c] > 0).float().numpy() * 0.45,
                        interpolation="nearest",
                    )
                elif key == "mi":
                    ax.imshow(shown["mi"][c], cmap="magma", alpha=0.8)
                if c == 0:
                    ax.set_title(title, fontsize=8, loc="left")
        names = ", ".join(f"{i}={n}" for i, n in enumerate(self.class_names or range(classes)))
        fig.suptitle(f"classes {names}", fontsize=7)
        fig.tight_layout()
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "overlays"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "test.png"
        fig.savefig(self.path, dpi=90)
        plt.close(fig)
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="test/overlays", images=[str(self.path)])
