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

A dataset whose samples are dicts (``{"image": ..., "label": ...}``) does the same by answering ``__getitems__`` with
a :class:`GatheredBatch` of a dict of batched tensors (the CT hospitals' slices do).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch.utils.data import TensorDataset, default_collate


class GatheredBatch(Sequence):
    """A whole batch gathered by a dataset's ``__getitems__`` (:meth:`TensorBatches.__getitems__`): ``tensors`` holds
    one batched tensor per field, as a tuple or as a dict by field name.

    :func:`collate` hands ``tensors`` on as they are (a tuple as a list, as ``default_collate`` gives it). To any other
    collate function it is what ``DataLoader`` would otherwise have passed, a sequence of samples (one tuple or dict of
    tensors each), so ``default_collate`` and wrappers such as Opacus' stay correct, only without the saving."""

    def __init__(self, tensors: Union[tuple[torch.Tensor, ...], Mapping[str, torch.Tensor]]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        fields = list(self.tensors.values()) if isinstance(self.tensors, Mapping) else self.tensors
        return len(fields[0]) if fields else 0

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        if isinstance(self.tensors, Mapping):
            return {key: tensor[index] for key, tensor in self.tensors.items()}
        return tuple(tensor[index] for tensor in self.tensors)


class TensorBatches(TensorDataset):
    """A :class:`~torch.utils.data.TensorDataset` that gives ``DataLoader`` whole batches: pair it with
    :func:`collate` (``DataLoader(..., collate_fn=collate)``) for the saving. With any other collate function, and
    one sample at a time (``dataset[i]``), it is a ``TensorDataset`` as before."""

    def __getitems__(self, indices: Sequence[int]) -> GatheredBatch:
        index = torch.as_tensor(indices, dtype=torch.long)
        return GatheredBatch(tuple(tensor[index] for tensor in self.tensors))


def collate(data: Any) -> Any:
    """A gathered batch as a list of tensors (what ``default_collate`` makes of a ``TensorDataset``'s samples), or as a
    dict of batched tensors where the samples are dicts; anything else through ``default_collate``."""
    if isinstance(data, GatheredBatch):
        return dict(data.tensors) if isinstance(data.tensors, Mapping) else list(data.tensors)
    return default_collate(data)
