"""The pooled (centralised) baseline: every site's data in one place, as one site.

Pooling is what a federation exists to avoid; it is offered only as the reference a federated model is compared
with (``lightning-fed compare --modes pooled``), where the sites are simulated or their data is readable from one
machine. Each site's datamodule is still built and set up exactly as it would be at the site (its own
preprocessing, its own split); the pooled site trains on the union of their training splits.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import LightningDataModule
from torch.utils.data import ConcatDataset

from lightning_fed.data.sites import Site, SplitLoaders, rebuild_loader, source_loader

POOLED = "pooled"


class PooledSiteData(SplitLoaders):
    """The union of ``sites``' splits: built inside the pooled run's one actor from each site's own datamodule."""

    def __init__(self, sites: list[Site]) -> None:
        super().__init__()
        self.sites = sites
        self.parts: Optional[list[LightningDataModule]] = None
        self._loaders: dict[str, Any] = {}

    def prepare_data(self) -> None:
        for dm in self._parts():
            dm.prepare_data()

    def _parts(self) -> list[LightningDataModule]:
        if self.parts is None:
            self.parts = [site.build_datamodule() for site in self.sites]
        return self.parts

    def setup(self, stage: str) -> None:
        for dm in self._parts():
            dm.setup(stage)
        self._loaders.clear()

    def _loader(self, split: str) -> Any:
        if split not in self._loaders:
            # sites without labels have no training targets to pool: the pooled reference learns from the labelled ones
            parts = [dm for site, dm in zip(self.sites, self._parts()) if split != "train" or site.labelled]
            loaders = [loader for loader in (source_loader(dm, split) for dm in parts) if loader is not None]
            datasets = [loader.dataset for loader in loaders if len(loader.dataset) > 0]
            self._loaders[split] = rebuild_loader(loaders[0], ConcatDataset(datasets)) if datasets else []
        return self._loaders[split]


class PooledSites(LightningDataModule):
    """One site named ``"pooled"`` holding the union of ``sites``' data (simulation baseline only); the training
    data of sites without labels (``labelled=False``) is left out: there is nothing to supervise it with.

    Sites pinned to their own machines (``resources={"site:...": 1}``) cannot be pooled: their data is, by design,
    only readable there.
    """

    def __init__(self, sites: list[Site], num_cpus: Optional[float] = None) -> None:
        super().__init__()
        pinned = [s.name for s in sites if any(k.startswith("site:") for k in s.resources)]
        if pinned:
            raise ValueError(
                f"sites {pinned} are pinned to their own nodes, so their data cannot be pooled: "
                "run the pooled baseline only where every site's data is readable from one machine"
            )
        self.sites = sites
        self.num_cpus = num_cpus if num_cpus is not None else max(s.num_cpus for s in sites)
        self.num_gpus = max(s.num_gpus for s in sites)

    def federated_sites(self) -> list[Site]:
        sizes = [s.train_size for s in self.sites]
        total = sum(sizes) if all(n is not None for n in sizes) else None
        return [
            Site(POOLED, PooledSiteData(self.sites), num_cpus=self.num_cpus, num_gpus=self.num_gpus, train_size=total)
        ]


class HeldOutSites(LightningDataModule):
    """A datamodule's sites except ``holdout``: what ``lightning-fed compare --holdout SITE`` trains on, so that the
    held-out site's test data measures how the models do at a hospital they never saw."""

    def __init__(self, datamodule: Any, holdout: str) -> None:
        super().__init__()
        self.datamodule, self.holdout = datamodule, holdout

    def federated_sites(self) -> list[Site]:
        from lightning_fed.data.sites import describe_sites

        sites = describe_sites(self.datamodule)
        if sites is None:
            raise ValueError(
                f"--holdout needs a datamodule that names its sites (federated_sites()); "
                f"{type(self.datamodule).__name__} is split by simulation, so no site is a hospital to hold out"
            )
        names = [s.name for s in sites]
        if self.holdout not in names:
            raise ValueError(f"--holdout {self.holdout!r} is not a site of the recipe: its sites are {names}")
        if len(sites) < 2:
            raise ValueError("--holdout needs at least two sites: one to hold out, one to train on")
        return [s for s in sites if s.name != self.holdout]
