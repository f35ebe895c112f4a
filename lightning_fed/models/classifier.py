"""A ready image classifier on any timm backbone: binary, multi-class or multi-label (with partial labels)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import timm
import torch
from torch import nn
from torch.nn import functional as F

from lightning_fed.models.base import StagedModule

Task = Literal["binary", "multiclass", "multilabel"]
UNLABELLED = -1  # a target entry the site did not annotate: left out of the loss, never read as a negative


class ImageClassifier(StagedModule):
    """A `timm <https://github.com/huggingface/pytorch-image-models>`_ backbone (by name) with a classification head.

    Args:
        backbone: any ``timm.list_models()`` name, e.g. ``"resnet18"``, ``"densenet121"``, ``"resnet10t"``.
        task: ``"binary"`` (one logit; targets ``[B]`` in {0, 1}), ``"multiclass"`` (``num_classes`` logits; targets
            ``[B]`` class indices) or ``"multilabel"`` (``num_classes`` logits; targets ``[B, num_classes]`` in
            {0, 1}). A target of ``-1`` marks an entry the site did not annotate: it is left out of the loss (masked
            BCE for multi-label), never treated as a negative.
        num_classes: classes (multiclass) or labels (multilabel); ignored for binary.
        in_chans: input channels; pretrained stem weights are adapted when they differ (e.g. 1 for X-rays).
        pretrained: ``False`` (random init), ``True`` (ImageNet weights through timm; needs internet), or the path
            of a local checkpoint file (a state dict, a timm/``torch.save`` checkpoint or a Lightning ``.ckpt`` of
            this class). A head whose shape differs from the task's is re-initialised; any other mismatch is an
            error that names the keys.
        lr, weight_decay, optimizer: the site optimizer (``"adamw"``, ``"adam"`` or ``"sgd"`` with ``momentum``).
            Only parameters that require gradients are handed to it, so layers frozen by an aggregator (FedFBN's
            BatchNorm) are never touched.
        head_warmup_epochs: train only the head for this many epochs first (the FedFBN authors warm the head up
            before federated training), then the whole network.
        drop_rate: dropout before the head.
        label_names: names of the classes/labels, kept in the hyper-parameters for reports.

    Logs ``train_loss``, ``val_loss``, ``test_loss``; lightning-fed adds accuracy, precision, recall, AUROC (per
    label for multi-label, averaged over labels with support) per site and federated.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        task: Task = "multiclass",
        num_classes: int = 2,
        in_chans: int = 3,
        pretrained: Union[bool, str] = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
        momentum: float = 0.9,
        head_warmup_epochs: int = 0,
        drop_rate: float = 0.0,
        label_names: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__()
        if task not in ("binary", "multiclass", "multilabel"):
            raise ValueError(f"task must be 'binary', 'multiclass' or 'multilabel', got {task!r}")
        if task != "binary" and num_classes < 2:
            raise ValueError(f"a {task} task needs num_classes >= 2, got {num_classes}")
        if optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optimizer must be 'adamw', 'adam' or 'sgd', got {optimizer!r}")
        if label_names is not None and task != "binary" and len(label_names) != num_classes:
            raise ValueError(f"label_names has {len(label_names)} names for num_classes={num_classes}")
        self.save_hyperparameters()
        outputs = 1 if task == "binary" else num_classes
        self.backbone = create_backbone(backbone, outputs, in_chans, pretrained, drop_rate)
        self._warmup_params: Optional[list[nn.Parameter]] = None

    # -- model -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, stage: str = "train") -> torch.Tensor:
        """Mean loss over annotated entries only (``-1`` targets are skipped); 0 when a batch has none.

        With class weights set (:class:`~lightning_fed.balance.ClassBalance`) the training loss is class-weighted:
        per class for binary/multi-class targets, as ``pos_weight`` per label for multi-label targets.
        """
        task = self.hparams.task
        if task == "multiclass":
            labelled = targets != UNLABELLED
            if not labelled.any():
                return logits.sum() * 0.0
            return F.cross_entropy(
                logits[labelled], targets[labelled].long(), weight=self._loss_weights(logits.shape[-1], stage)
            )
        if task == "binary":
            logits, targets = logits.reshape(-1), targets.reshape(-1)
        mask = (targets != UNLABELLED).to(logits.dtype)
        weights = self._loss_weights(2 if task == "binary" else logits.shape[-1], stage)
        pos_weight = weights if task == "multilabel" else None
        per_entry = F.binary_cross_entropy_with_logits(
            logits, targets.clamp(min=0).to(logits.dtype), reduction="none", pos_weight=pos_weight
        )
        if task == "binary" and weights is not None:
            mask = mask * weights[targets.clamp(min=0).long()]  # a weighted mean, as cross_entropy(weight=...) takes
        return (per_entry * mask).sum() / mask.sum().clamp(min=1e-12 if weights is not None else 1.0)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y, stage)
        self.log(f"{stage}_loss", loss, prog_bar=stage != "test", on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        logits = self(batch[0] if isinstance(batch, (list, tuple)) else batch)
        return logits.softmax(-1) if self.hparams.task == "multiclass" else logits.sigmoid()

    # -- training --------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        h = self.hparams
        if h.optimizer == "sgd":
            return torch.optim.SGD(params, lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        cls = torch.optim.AdamW if h.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=h.lr, weight_decay=h.weight_decay)

    def on_train_epoch_start(self) -> None:
        if not self.hparams.head_warmup_epochs:
            return
        if self._warmup_params is None:
            # what is trainable now, minus the head: layers someone else froze stay frozen after the warm-up
            head = {id(p) for p in self.backbone.get_classifier().parameters()}
            self._warmup_params = [p for p in self.backbone.parameters() if p.requires_grad and id(p) not in head]
        warming_up = self.current_epoch < self.hparams.head_warmup_epochs
        for p in self._warmup_params:
            p.requires_grad_(not warming_up)


def create_backbone(
    name: str, outputs: int, in_chans: int, pretrained: Union[bool, str], drop_rate: float = 0.0
) -> nn.Module:
    """``timm.create_model`` with ImageNet weights (``True``), a local checkpoint file (a path), or none."""
    if not timm.is_model(name.split(".")[0]):  # "resnet18.a1_in1k" names a weight tag of resnet18
        close = timm.list_models(f"*{name.split('_')[0].split('.')[0]}*")[:5]
        raise ValueError(
            f"unknown timm backbone {name!r}{f' (close: {close})' if close else ''}: pick a name from timm.list_models()"
        )
    if pretrained is True:
        try:
            return timm.create_model(name, pretrained=True, num_classes=outputs, in_chans=in_chans, drop_rate=drop_rate)
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeError(
                f"could not fetch ImageNet weights for {name!r} ({type(err).__name__}: {reason}): "
                "without internet pass pretrained='<path to a local checkpoint file>'"
            ) from None
    model = timm.create_model(name, pretrained=False, num_classes=outputs, in_chans=in_chans, drop_rate=drop_rate)
    if pretrained:
        load_backbone_checkpoint(model, pretrained, name)
    return model


def load_backbone_checkpoint(model: nn.Module, path: Union[str, Path], name: str = "backbone") -> None:
    """Load a local checkpoint into a timm model: head re-initialised if its shape differs, stem adapted to the
    model's input channels, anything else that does not fit is an error naming the keys."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint {path} does not exist: pass the path of a weights file for {name!r}, or pretrained=False"
        )
    try:
        state = timm.models.load_state_dict(str(path), use_ema=False)
    except Exception as err:
        raise ValueError(
            f"pretrained checkpoint {path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): pass a torch.save'd state dict"
        ) from None
    own = model.state_dict()
    state = _strip_prefix(state, own)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    for key in list(state):
        if key not in own or state[key].shape == own[key].shape:
            continue
        if any(key.startswith(h + ".") for h in heads):
            del state[key]  # a head for another task: the new task's head starts fresh
        elif key == f"{cfg.get('first_conv')}.weight" and state[key].dim() == 4:
            state[key] = timm.models.adapt_input_conv(own[key].shape[1], state[key])
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if wrong:
        raise ValueError(
            f"pretrained checkpoint {path} does not fit {name!r}: shapes differ for {wrong[:3]} ({len(wrong)} keys): was it saved from another architecture?"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not any(k.startswith(h + ".") for h in heads)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"pretrained checkpoint {path} does not fit {name!r}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:3]}: was it saved from another architecture?"
        )


def _strip_prefix(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # a Lightning checkpoint of ImageClassifier (or any wrapper) stores "backbone.conv1.weight" for "conv1.weight"
    if not state or any(k in own for k in state):
        return state
    for prefix in {k.split(".", 1)[0] + "." for k in state if "." in k}:
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if any(k in own for k in stripped):
            return stripped
    return state
