"""Class imbalance, handled at each site from that site's own training labels (study A's majority-class bias)."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset, WeightedRandomSampler

BalanceMode = Literal["loss", "sampler"]


class ClassBalance(Callback):
    """Counter class imbalance at every site with weights computed from the site's own training labels.

    Only label counts of the site's own data are used, inside the site; nothing about them is sent anywhere, and
    the weights are not part of the model's state (they are never averaged).

    Args:
        mode: ``"loss"``: class-weighted loss, ``w_c = n / (C * n_c)`` over the ``C`` classes present (for
            multi-label targets: ``pos_weight = n_neg / n_pos`` per label, over annotated entries). The module must
            take them through ``set_class_weights(tensor)``, as every ``lightning_fed.models`` module does.
            ``"sampler"``: balanced sampling: training batches are drawn with replacement, sample ``i`` with
            probability proportional to ``1 / n_{y_i}``, so each class is seen equally often; works with any
            module (single-label targets only).

        seed: seed of the balanced sampler (default: drawn from torch's RNG, which each site seeds itself).

    The weights used are logged as ``class_weight_<c>`` (``site/<name>/class_weight_<c>`` in a federation).
    Add it as a callback (``Trainer(callbacks=[ClassBalance("loss")])``) or with
    ``FederatedStrategy(class_balance="loss")``, which puts one in every site and in ``compare``'s pooled run.
    """

    def __init__(self, mode: BalanceMode = "loss", seed: Optional[int] = None) -> None:
        if mode not in ("loss", "sampler"):
            raise ValueError(f"class balance mode must be 'loss' or 'sampler', got {mode!r}")
        self.mode = mode
        self.seed = seed
        self.weights: Optional[torch.Tensor] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning_fed.privacy import SiteDPSGD

        if self.mode == "sampler" and any(isinstance(cb, SiteDPSGD) for cb in trainer.callbacks):
            raise ValueError(
                "class_balance='sampler' and DP-SGD both replace the training sampler (DP-SGD's privacy "
                "accounting assumes Poisson sampling): use class_balance='loss' with DP-SGD"
            )
        if self.mode == "loss" and not callable(getattr(pl_module, "set_class_weights", None)):
            raise ValueError(
                f"class_balance='loss' needs a module with set_class_weights(weights) "
                f"({type(pl_module).__name__} has none): add it, or use class_balance='sampler'"
            )
        if self.mode == "sampler":
            owner = trainer.datamodule if trainer.datamodule is not None else pl_module
            original = owner.train_dataloader
            if getattr(original, "_balanced", False):
                return

            def balanced_loader() -> Any:
                return balanced(original(), seed=self.seed)

            balanced_loader._balanced = True  # type: ignore[attr-defined]
            owner.train_dataloader = balanced_loader

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader = trainer.train_dataloader
        targets = dataset_targets(loader.dataset)
        self.weights = class_weights(targets)
        if self.mode == "loss":
            pl_module.set_class_weights(self.weights.to(pl_module.device))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.weights is not None:
            for c, w in enumerate(self.weights.tolist()):
                pl_module.log(f"class_weight_{c}", float(w), on_epoch=True, on_step=False)


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """The targets of a dataset (``[N]`` or ``[N, L]``) without reading the inputs where the dataset allows it."""
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([dataset_targets(part) for part in dataset.datasets])
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[-1]
    for attr in ("targets", "labels", "y"):
        values = getattr(dataset, attr, None)
        if values is not None:
            return torch.as_tensor(values)
    return torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]


def class_weights(targets: torch.Tensor) -> torch.Tensor:
    """``n / (C * n_c)`` per class for single-label targets (0 for a class absent here); ``n_neg / n_pos`` per label
    for multi-label targets (entries ``-1`` are unannotated and not counted; 1 where a label lacks either class)."""
    if targets.dim() == 2 and targets.shape[1] > 1:
        annotated = targets != -1
        pos = ((targets == 1) & annotated).sum(0).double()
        neg = ((targets == 0) & annotated).sum(0).double()
        return torch.where((pos > 0) & (neg > 0), neg / pos.clamp(min=1), torch.ones_like(pos)).float()
    labels = targets.reshape(-1).long()
    labels = labels[labels >= 0]
    if labels.numel() == 0:
        raise ValueError("class balance needs labelled training samples, but this site has none")
    counts = torch.bincount(labels).double()
    present = int((counts > 0).sum())
    weights = torch.where(counts > 0, labels.numel() / (present * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def balanced(loader: DataLoader, seed: Optional[int] = None) -> DataLoader:
    """``loader`` with a sampler that draws every class equally often (with replacement), same batch size."""
    targets = dataset_targets(loader.dataset)
    if targets.dim() == 2 and targets.shape[1] > 1:
        raise ValueError(
            "class_balance='sampler' needs single-label targets; for multi-label data use class_balance='loss'"
        )
    labels = targets.reshape(-1).long()
    per_class = class_weights(labels)
    weights = per_class[labels.clamp(min=0)] * (labels >= 0)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sampler = WeightedRandomSampler(weights.double(), num_samples=len(labels), replacement=True, generator=generator)
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
    )
