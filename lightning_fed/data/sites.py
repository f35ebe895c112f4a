"""Sites: where each site's data lives and how it is loaded inside the site's actor."""

from __future__ import annotations

import copy
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Subset

from lightning_fed.data.partition import IID, Partitioner
from lightning_fed.data.tensors import collate

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

DataFactory = Union[LightningDataModule, Callable[[], LightningDataModule]]


@dataclass
class Site:
    """One site of a federation.

    Args:
        name: unique name; used in metric keys (``site/<name>/...``), log folders and error messages.
        datamodule: a :class:`~lightning.pytorch.LightningDataModule` (or a zero-argument callable returning one)
            whose ``prepare_data``/``setup`` run *inside the site's actor*, so the data is read where it lives,
            from a site-local path, and never crosses the network. Only the object's configuration is shipped.
        num_cpus, num_gpus: Ray resources the site's actor holds for its lifetime (``num_gpus`` may be a fraction).
        resources: custom Ray resources, e.g. ``{"site:hospital_a": 1}`` to pin the site to the node that
            carries that resource (the hospital's own machine). A pinned site gets a worker process of its own;
            the others share workers (:mod:`lightning_fed.placement`).
        train_size: the number of training samples, when it is known without loading the data: sites sharing
            workers are balanced by it (a guess is fine; unknown sizes count as the mean of the known ones).
        labelled: ``False`` for a site without ground truth: its training batches must carry no targets (the
            federation checks every batch), so it can never compute a supervised loss; its module learns from
            images alone (e.g. pseudo-labels). Evaluation results of such a site are marked ``labels: hidden``
            (simulated data may keep hidden labels for evaluation; real data has none).
    """

    name: str
    datamodule: DataFactory
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    train_size: Optional[int] = None
    labelled: bool = True

    def __post_init__(self) -> None:
        if not _SITE_NAME.match(self.name):
            raise ValueError(
                f"site name {self.name!r} must be letters, digits, '_', '.' or '-' (it names folders and metric keys)"
            )
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"site {self.name!r}: num_cpus and num_gpus must be >= 0")
        if self.train_size is not None and self.train_size < 0:
            raise ValueError(f"site {self.name!r}: train_size must be >= 0 (or None when unknown)")

    def build_datamodule(self) -> LightningDataModule:
        dm = self.datamodule if isinstance(self.datamodule, LightningDataModule) else self.datamodule()
        if not isinstance(dm, LightningDataModule):
            raise TypeError(
                f"site {self.name!r}: datamodule factory returned {type(dm).__name__}, not a LightningDataModule"
            )
        return dm


def describe_sites(datamodule: Any) -> Optional[list[Site]]:
    """The sites a datamodule declares through ``federated_sites()``, or ``None`` for a plain datamodule."""
    hook = getattr(datamodule, "federated_sites", None)
    if hook is None:
        return None
    sites = list(hook())
    if not sites:
        raise ValueError(f"{type(datamodule).__name__}.federated_sites() returned no sites")
    names = [s.name for s in sites]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"{type(datamodule).__name__}.federated_sites() repeats site names {dupes}: names must be unique"
        )
    return sites


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Class labels of a dataset, read from ``targets``/``labels`` when present, else from each sample."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices)]
    for attr in ("targets", "labels", "y"):
        values = getattr(dataset, attr, None)
        if values is not None:
            return np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values).reshape(len(dataset), -1)[
                :, 0
            ]
    try:
        return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])
    except (IndexError, TypeError, ValueError, KeyError):
        raise ValueError(
            f"a split by label needs class labels, but the samples of {type(dataset).__name__} are not "
            "(input, label) pairs and it has no targets/labels attribute: use partitioner=IID() or describe "
            "sites with federated_sites()"
        ) from None


def chosen_sites(chosen: Sequence[str], known: Sequence[str], what: str = "hospitals") -> list[str]:
    """``chosen`` checked against the ``known`` names: none unknown, none twice, at least one."""
    unknown = sorted(set(chosen) - set(known))
    if unknown or not chosen:
        raise ValueError(f"unknown {what} {unknown}: pick from {sorted(known)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{what} {list(chosen)} name a site twice: each is one site")
    return list(chosen)


def per_site(value: Union[float, Sequence[float]], sites: int, name: str = "site_cpus") -> list[float]:
    """One number for every site, or one per site (checked)."""
    values = [float(value)] * sites if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != sites:
        raise ValueError(f"{name} has {len(values)} entries for {sites} sites: give one number or one per site")
    return values


class SplitLoaders(LightningDataModule):
    """Lightning's three loader hooks, each answered by ``_loader(split)``."""

    def _loader(self, split: str) -> Any:
        raise NotImplementedError

    def train_dataloader(self) -> Any:
        return self._loader("train")

    def val_dataloader(self) -> Any:
        return self._loader("val")

    def test_dataloader(self) -> Any:
        return self._loader("test")


class SiteSplits(SplitLoaders):
    """One site's data as named splits: subclasses fill ``self.datasets["train"|"val"|"test"]`` in ``setup``
    (inside the site's actor). A missing or empty split gives no batches; a
    :class:`~lightning_fed.data.tensors.TensorBatches` split is served a whole batch per gather."""

    def __init__(self, batch_size: int, eval_batch_size: int = 512) -> None:
        super().__init__()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.datasets: dict[str, Dataset] = {}

    def _loader(self, split: str) -> Union[DataLoader, list]:
        if len(self.datasets.get(split, ())) == 0:
            return []
        train = split == "train"
        # collate: a TensorBatches dataset's batches come gathered whole (lightning_fed.data.tensors)
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            collate_fn=collate,
        )


@dataclass(frozen=True)
class Shard:
    """A site's share of an iterable dataset (no indices to split): every ``count``-th item from the ``index``-th."""

    index: int
    count: int


class ShardedIterable(IterableDataset):
    """Items ``index, index + count, ...`` of ``dataset`` (round-robin), as Lightning would deal it to ranks."""

    def __init__(self, dataset: IterableDataset, shard: Shard) -> None:
        self.dataset, self.shard = dataset, shard

    def __iter__(self) -> Any:
        for position, item in enumerate(self.dataset):
            if position % self.shard.count == self.shard.index:
                yield item


def rebuild_loader(loader: DataLoader, dataset: Dataset) -> DataLoader:
    """A DataLoader like ``loader`` (batch size, workers, collate, shuffling) over another dataset."""
    return DataLoader(
        dataset,
        batch_size=loader.batch_size,
        shuffle=isinstance(loader.sampler, RandomSampler) and not isinstance(dataset, IterableDataset),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
    )


_SOURCE_STAGES: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()


class SimulatedSiteData(SplitLoaders):
    """One simulated site's share of a single-machine dataset (the unmodified-script path).

    ``source`` is the user's datamodule (set up again inside the worker) or a mapping of stage name to
    DataLoader(s); ``indices`` maps ``"train"``/``"val"``/``"test"`` to this site's share: its sample indices, or,
    where the split has several loaders (a list, tuple or dict, which Lightning combines), one share per loader
    by position or key; a share of an iterable dataset is a :class:`Shard`. Sites hosted by one worker arrive
    together and share one ``source``: it is set up once per stage and each site reads its share from it, so a
    worker holds the dataset once, however many sites it hosts.
    """

    def __init__(self, source: Union[LightningDataModule, Mapping[str, Any]], indices: Mapping[str, Any]) -> None:
        super().__init__()
        self.source = source
        self.indices = dict(indices)
        self._loaders: dict[str, Any] = {}

    def setup(self, stage: str) -> None:
        if isinstance(self.source, LightningDataModule):
            done = _SOURCE_STAGES.setdefault(self.source, set())
            if stage not in done:
                self.source.setup(stage)
                done.add(stage)

    def _loader(self, split: str) -> Any:
        if split not in self._loaders:
            original = source_loaders(self.source, split)
            if original is None or split not in self.indices:
                self._loaders[split] = []
            elif isinstance(original, DataLoader):
                self._loaders[split] = _site_share(original, self.indices[split])
            else:
                share = self.indices[split]
                rebuilt = {key: _site_share(loader, share[key]) for key, loader in _items(original)}
                self._loaders[split] = (
                    rebuilt
                    if isinstance(original, Mapping)
                    else type(original)(rebuilt[k] for k in range(len(original)))
                )
        return self._loaders[split]


def _site_share(loader: DataLoader, share: Any) -> DataLoader:
    if isinstance(share, Shard):
        return rebuild_loader(loader, ShardedIterable(loader.dataset, share))
    return rebuild_loader(loader, Subset(loader.dataset, np.asarray(share).tolist()))


def _items(loaders: Any) -> list[tuple[Any, DataLoader]]:
    return list(loaders.items()) if isinstance(loaders, Mapping) else list(enumerate(loaders))


def source_loaders(source: Union[LightningDataModule, Mapping[str, Any]], split: str) -> Any:
    """What a datamodule or loader mapping provides for ``split``: one DataLoader, or a list, tuple or dict of
    them (``None`` if it has none)."""
    loaders = _raw_loaders(source, split)
    if loaders is None or (isinstance(loaders, (list, tuple, Mapping)) and not loaders):
        return None
    if isinstance(loaders, (list, tuple, Mapping)):
        if len(loaders) == 1 and not isinstance(loaders, Mapping):
            loaders = loaders[0]
        else:
            for key, loader in _items(loaders):
                if not isinstance(loader, DataLoader):
                    raise TypeError(
                        f"simulation needs torch DataLoaders for {split}, got {type(loader).__name__} at {key!r}: "
                        "describe sites with federated_sites() instead"
                    )
            return loaders
    if not isinstance(loaders, DataLoader):
        raise TypeError(
            f"simulation needs a torch DataLoader for {split} (or a list or dict of them), got "
            f"{type(loaders).__name__}: describe sites with federated_sites() instead"
        )
    return loaders


def _raw_loaders(source: Union[LightningDataModule, Mapping[str, Any]], split: str) -> Any:
    if isinstance(source, Mapping):
        return source.get(split)
    from lightning.pytorch.utilities.model_helpers import is_overridden

    hook = getattr(source, f"{split}_dataloader", None)
    # LightningDataModule's own hooks for a split the datamodule does not define only raise
    defined = hook is not None and (
        not isinstance(source, LightningDataModule) or is_overridden(f"{split}_dataloader", source)
    )
    try:
        return hook() if defined else None
    except NotImplementedError:
        return None


def source_loader(source: Union[LightningDataModule, Mapping[str, Any]], split: str) -> Optional[DataLoader]:
    """The single DataLoader that a datamodule or loader mapping provides for ``split`` (``None`` if it has none)."""
    loaders = source_loaders(source, split)
    if loaders is not None and not isinstance(loaders, DataLoader):
        raise ValueError(f"this needs one {split} DataLoader per site; got {len(loaders)}: give each site one loader")
    return loaders


def simulate_sites(
    source: Union[LightningDataModule, Mapping[str, Any]],
    num_sites: int,
    partitioner: Partitioner,
    splits: Sequence[str],
    site_cpus: float = 1.0,
    site_gpus: float = 0.0,
) -> list[Site]:
    """Split a single-machine dataset across ``num_sites`` simulated sites.

    The training split is divided by ``partitioner`` (which may read labels); validation and test splits are dealt
    out IID with the same seed, so every site is evaluated on its own share and the federated merge covers the
    whole split.
    """
    shipped = source
    if isinstance(source, LightningDataModule):
        # what the sites get is the datamodule as configured, not as set up here (its data would travel with it)
        shipped = copy.deepcopy(source)
        source.prepare_data()
    per_site: list[dict[str, Any]] = [{} for _ in range(num_sites)]
    sizes = [0] * num_sites
    seed = getattr(partitioner, "seed", 0)
    for split in splits:
        if isinstance(source, LightningDataModule):
            source.setup("fit" if split in ("train", "val") else split)
        loaders = source_loaders(source, split)
        if loaders is None:
            continue
        several = not isinstance(loaders, DataLoader)
        items = _items(loaders) if several else [(None, loaders)]
        items.sort(key=lambda item: not isinstance(item[1].dataset, IterableDataset))  # refusals before label reads
        for key, loader in items:
            parts = _split(loader.dataset, split, partitioner if split == "train" else IID(seed=seed), num_sites)
            for site, part in enumerate(parts):
                if several:
                    per_site[site].setdefault(split, {})[key] = part
                else:
                    per_site[site][split] = part
                if split == "train":
                    sizes[site] += len(part) if not isinstance(part, Shard) else 0
    if not any("train" in p for p in per_site) and "train" in splits:
        raise ValueError("the datamodule has no train_dataloader to split across simulated sites")
    return [
        Site(
            name=f"site_{k}",
            datamodule=SimulatedSiteData(shipped, per_site[k]),
            num_cpus=site_cpus,
            num_gpus=site_gpus,
            train_size=sizes[k] if "train" in per_site[k] and sizes[k] else None,
        )
        for k in range(num_sites)
    ]


def _split(dataset: Dataset, split: str, partitioner: Partitioner, num_sites: int) -> list[Any]:
    """Each site's share of one loader's dataset: indices by ``partitioner``, or a round-robin :class:`Shard` of an
    iterable dataset (which has no indices; only an IID split can be dealt that way)."""
    if isinstance(dataset, IterableDataset):
        if not isinstance(partitioner, IID):
            raise ValueError(
                f"the {split} loader's dataset is an IterableDataset, which simulation can only deal out "
                f"round-robin (IID), not by {type(partitioner).__name__}: use partitioner=IID() or describe "
                "sites with federated_sites()"
            )
        return [Shard(k, num_sites) for k in range(num_sites)]
    labels = dataset_labels(dataset) if not isinstance(partitioner, IID) else np.zeros(len(dataset))
    return partitioner(labels, num_sites)
