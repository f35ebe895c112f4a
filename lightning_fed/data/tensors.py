"""Batches served straight from tensors: one gather per tensor for a whole batch.

A ``DataLoader`` over a plain :class:`~torch.utils.data.TensorDataset` calls ``__getitem__`` once per sample and
stacks the samples again in ``default_collate``: Python work in every step that a small model feels (study B's
CNN spends a few per cent of its step there). :class:`TensorBatches` answers a batch's indices at once
(``DataLoader`` asks through ``__getitems__``) by indexing each tensor, and :func:`collate` passes such a batch
through. The sampler is the loader's own, so the batches are the same, in the same order, from the same random
state as before; only the work of assembling them is less.

For your own datamodule, where the data fits in memory::

    from lightning_fed.data import TensorBatches, collate

    dataset = TensorBatches(images, labels)          # instead of TensorDataset(images, labels)
    DataLoader(dataset, batch_size=64, shuffle=True, collate_fn=collate)

Wrapped in a ``Subset`` (e.g. a simulated site's share) it still gathers whole batches; in a ``ConcatDataset`` it
falls back to one sample at a time, which :func:`collate` stacks as ``default_collate`` would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import TensorDataset, default_collate


class GatheredBatch(Sequence):
    """A whole batch gathered by :meth:`TensorBatches.__getitems__`: ``tensors`` holds one batched tensor per field.

    :func:`collate` hands ``tensors`` on as they are. To any other collate function it is what ``DataLoader`` would
    otherwise have passed, a sequence of samples (one tuple of tensors each), so ``default_collate`` and wrappers
    such as Opacus' stay correct, only without the saving."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0]) if self.tensors else 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return tuple(tensor[index] for tensor in self.tensors)


class TensorBatches(TensorDataset):
    """A :class:`~torch.utils.data.TensorDataset` that gives ``DataLoader`` whole batches: pair it with
    :func:`collate` (``DataLoader(..., collate_fn=collate)``) for the saving. With any other collate function, and
    one sample at a time (``dataset[i]``), it is a ``TensorDataset`` as before."""

    def __getitems__(self, indices: Sequence[int]) -> GatheredBatch:
        index = torch.as_tensor(indices, dtype=torch.long)
        return GatheredBatch(tuple(tensor[index] for tensor in self.tensors))


def collate(data: Any) -> Any:
    """A gathered batch as a list of tensors (what ``default_collate`` makes of a ``TensorDataset``'s samples);
    anything else through ``default_collate``."""
    if isinstance(data, GatheredBatch):
        return list(data.tensors)
    return default_collate(data)
