"""Small real-data federations for the tests (FashionMNIST subsets from ../shared/data)."""

from __future__ import annotations

import os
import random
import time

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_fed.data import HospitalsDataModule, Site
from lightning_fed.data.fashion_mnist import PooledIndexData
from lightning_fed.models import SmallCNN
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.site import SiteAlgorithm


def small_hospitals(
    sizes=(400, 200, 200), ratios=(0.5, 0.1, 0.1), val_fraction=0.2, batch_size=50, seed=0, **kw
) -> HospitalsDataModule:
    names = ["large"] + [f"small_{i}" for i in range(1, len(sizes))]
    return HospitalsDataModule(
        site_names=names,
        sizes=sizes,
        positive_ratios=ratios,
        val_fraction=val_fraction,
        test_fraction=0.2,
        batch_size=batch_size,
        seed=seed,
        **kw,
    )


class PlainFashionMNIST(L.LightningDataModule):
    """A plain datamodule (no federated_sites): the first ``n`` FashionMNIST training images, 10 classes."""

    def __init__(self, n: int = 600, batch_size: int = 50) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def setup(self, stage: str) -> None:
        from lightning_fed.data import load_fashion_mnist
        from lightning_fed.data.fashion_mnist import to_tensor_dataset

        x, y = load_fashion_mnist(None, "train")
        self.train = to_tensor_dataset(x[: self.n], y[: self.n])
        self.val = to_tensor_dataset(x[self.n : self.n + 200], y[self.n : self.n + 200])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=100)

    def test_dataloader(self):
        return DataLoader(self.val, batch_size=100)


class UnmodifiedMLP(L.LightningModule):
    """A LightningModule written with no knowledge of lightning-fed: logs only its own loss."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


class NoisyCNN(SmallCNN):
    """Draws from every process-wide generator while it trains: torch (dropout), numpy's and Python's."""

    def forward(self, x):
        return self.classifier(F.dropout(self.features(x).flatten(1), p=0.3, training=self.training))

    def training_step(self, batch, batch_idx):
        scale = 1.0 + 0.05 * float(np.random.rand()) + 0.05 * random.random()
        return super().training_step(batch, batch_idx) * scale


class FailingDataset(Dataset):
    """Real samples that raise once the site reaches a given epoch: a scanner going offline mid-run."""

    def __init__(
        self,
        base: Dataset,
        fail_at_access: int,
        mode: str = "raise",
        once_flag: str | None = None,
        stall_seconds: float = 30.0,
    ) -> None:
        self.base, self.fail_at_access, self.mode, self.accesses = base, fail_at_access, mode, 0
        self.stall_seconds = stall_seconds
        self.once_flag = once_flag  # a file: fail only if it does not exist yet, and create it (once per test)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.accesses += 1
        if self.accesses > self.fail_at_access and self.once_flag is not None:
            if os.path.exists(self.once_flag):
                return self.base[i]
            open(self.once_flag, "w").close()
        if self.accesses > self.fail_at_access:
            if self.mode == "die":
                os._exit(3)
            if self.mode == "stall":  # a network share hanging once (30 s unless told)
                if self.accesses == self.fail_at_access + 1:
                    time.sleep(self.stall_seconds)
                return self.base[i]
            if self.mode == "nan":  # a broken scanner: images of NaN
                x, y = self.base[i]
                return x * float("nan"), y
            raise RuntimeError("scanner offline at hospital bad")
        return self.base[i]


class FailingSiteData(PooledIndexData):
    """A hospital whose data fails after ``fail_at_access`` samples, shuffled by a generator of its own."""

    def __init__(
        self,
        *args,
        fail_at_access: int,
        mode: str = "raise",
        once_flag: str | None = None,
        stall_seconds: float = 30.0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.fail_at_access, self.mode, self.once_flag, self.stall_seconds = (
            fail_at_access,
            mode,
            once_flag,
            stall_seconds,
        )

    def setup(self, stage):
        super().setup(stage)
        self.datasets["train"] = FailingDataset(
            self.datasets["train"], self.fail_at_access, self.mode, self.once_flag, self.stall_seconds
        )

    def train_dataloader(self):
        return DataLoader(
            self.datasets["train"],
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(11),
        )


class HospitalsWithFailingSite(L.LightningDataModule):
    """Two healthy hospitals and one ('bad') whose data source fails after ``fail_at_access`` samples."""

    def __init__(
        self, fail_at_access: int, mode: str = "raise", once_flag: str | None = None, stall_seconds: float = 30.0
    ) -> None:
        super().__init__()
        self.base = small_hospitals(sizes=(300, 200, 200))
        self.fail_at_access, self.mode, self.once_flag, self.stall_seconds = (
            fail_at_access,
            mode,
            once_flag,
            stall_seconds,
        )

    def federated_sites(self):
        sites = self.base.federated_sites()
        bad = sites[-1]
        sites[-1] = Site(
            "bad",
            FailingSiteData(
                bad.datamodule.data_dir,
                bad.datamodule.indices,
                bad.datamodule.batch_size,
                fail_at_access=self.fail_at_access,
                mode=self.mode,
                once_flag=self.once_flag,
                stall_seconds=self.stall_seconds,
            ),
        )
        return sites


def unmounted_scans():
    """A site datamodule factory whose data is not where the site expects it."""
    raise FileNotFoundError("/data/scans is not mounted")


class BNCNN(L.LightningModule):
    """A small CNN with BatchNorm (for FedBN)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(4),
            nn.Flatten(),
            nn.Linear(8 * 7 * 7, 2),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class RetrainingBNCNN(BNCNN):
    """Calls ``self.train()`` inside every training step, as some user code does: FedFBN must stay frozen."""

    def training_step(self, batch, batch_idx):
        self.train()
        return super().training_step(batch, batch_idx)


def pretrained_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Stand-in for loading pretrained weights: BatchNorm statistics and affine parameters away from their init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.copy_(torch.randn(layer.num_features, generator=gen) * 0.1)
                layer.running_var.copy_(torch.rand(layer.num_features, generator=gen) + 0.5)
                layer.weight.copy_(torch.rand(layer.num_features, generator=gen) + 0.5)
                layer.bias.copy_(torch.randn(layer.num_features, generator=gen) * 0.1)
                layer.num_batches_tracked.fill_(1000)
    return model


def assert_sites_hold(model: nn.Module, site_weights: dict, skip: set = frozenset()) -> None:
    """Every site's weights equal the driver's model, bit for bit (except the ``skip`` keys)."""
    driver = {k: v.numpy() for k, v in model.state_dict().items()}
    for site, state in site_weights.items():
        for key, value in state.items():
            if key not in skip:
                np.testing.assert_array_equal(value, driver[key], err_msg=f"{site}:{key}")


class _DropsOnce(SiteAlgorithm):
    """FedAvg's site half, except that ``site`` fails once in ``round`` when its update is due: after secure
    aggregation agreed that round's keys and shares (the wrapper does that first), before the update leaves."""

    def __init__(self, site: str, round: int, once_flag: str) -> None:
        self.site, self.fail_round, self.once_flag, self.round = site, round, once_flag, 0

    def receive_global(self, trainer, pl_module, model):
        super().receive_global(trainer, pl_module, model)
        self.round = model.round

    def local_update(self, trainer, pl_module, num_samples):
        if self.context.site == self.site and self.round + 1 == self.fail_round and not os.path.exists(self.once_flag):
            open(self.once_flag, "w").close()
            raise RuntimeError("hospital network down after masking")
        return super().local_update(trainer, pl_module, num_samples)


class DropsAfterMasking(FedAvg):
    """FedAvg whose site ``site`` drops once in ``round`` after the masks were agreed."""

    def __init__(self, site: str, round: int, once_flag: str) -> None:
        self.site, self.round, self.once_flag = site, round, once_flag

    def site_algorithm(self):
        return _DropsOnce(self.site, self.round, self.once_flag)


class FlippedTestSite(PooledIndexData):
    """A hospital whose test split is its validation split with every label flipped: any model's test AUROC (and
    accuracy) is one minus its validation one, so the best model on validation is the worst on test."""

    def setup(self, stage):
        super().setup(stage)
        x, y = self.datasets["val"].tensors
        self.datasets["test"] = type(self.datasets["val"])(x, 1 - y)


class HospitalsWithFlippedTest(L.LightningDataModule):
    """small_hospitals (with validation splits), every hospital's test split its flipped validation split."""

    def __init__(self) -> None:
        super().__init__()
        self.base = small_hospitals(sizes=(300, 200, 200), val_fraction=0.3)

    def federated_sites(self):
        return [
            Site(
                s.name,
                FlippedTestSite(s.datamodule.data_dir, s.datamodule.indices, s.datamodule.batch_size),
                num_cpus=2.0,  # with workers=2: the tests' shared layout
            )
            for s in self.base.federated_sites()
        ]
