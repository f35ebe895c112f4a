"""The two halves of a federated algorithm.

An algorithm is an :class:`Aggregator` (the server half, run by the coordinator once per round) and a
:class:`SiteAlgorithm` (the site half, a Lightning callback living in every site's Trainer). The machinery
in :mod:`lightning_fed` moves :class:`SiteUpdate` objects from sites to the coordinator and a
:class:`GlobalModel` back, and knows nothing else about the algorithm.

Everything that crosses the network is parameter-shaped ``numpy`` arrays, sample counts and small named
extras (control variates, clipping norms): never samples or per-sample outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

Weights = dict[str, np.ndarray]
"""A model's state as named numpy arrays (what travels through Ray's object store, zero-copy)."""


@dataclass
class SiteUpdate:
    """What one site sends to the coordinator at the end of a round."""

    site: str
    weights: Weights
    num_samples: int
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class GlobalModel:
    """What the coordinator sends back to every site after aggregating a round."""

    weights: Weights
    round: int
    extras: dict[str, Any] = field(default_factory=dict)


def state_to_numpy(state: dict[str, torch.Tensor]) -> Weights:
    """Detach a state dict to CPU numpy arrays; bf16 and other non-numpy dtypes are upcast to float32."""
    out: Weights = {}
    for key, tensor in state.items():
        t = tensor.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16) or not _numpy_has(t.dtype):
            t = t.float()
        out[key] = t.numpy()
    return out


def _numpy_has(dtype: torch.dtype) -> bool:
    try:
        torch.empty(0, dtype=dtype).numpy()
        return True
    except TypeError:
        return False


def is_averageable(array: np.ndarray) -> bool:
    """Floating-point arrays are averaged; integer and boolean buffers (``num_batches_tracked``) never are."""
    return np.issubdtype(array.dtype, np.floating)


class SiteAlgorithm(Callback):
    """The site half of an algorithm: a Lightning callback in the site's Trainer, plus the two hand-over hooks.

    The default sends every tensor of the module's state and loads every tensor it gets back, which is what
    FedAvg-style algorithms need. Subclasses override the hooks named after the moment they run, e.g.
    ``on_before_optimizer_step`` for a proximal term, ``setup`` to freeze layers. Its ``state_dict`` is saved in
    the site's Lightning checkpoint, so state that must survive rounds and restarts lives here.
    """

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        """Called at the end of every k-th epoch: what this site sends to the coordinator."""
        weights = state_to_numpy(pl_module.state_dict())
        return SiteUpdate(site="", weights=weights, num_samples=num_samples)

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        """Called right after aggregation, before validation: load the global model into this site's module."""
        load_weights(pl_module, model.weights)


def load_weights(module: torch.nn.Module, weights: Weights, skip: set[str] | None = None) -> None:
    """Copy ``weights`` into ``module`` in place (keeping dtype and device), except the keys in ``skip``."""
    state = module.state_dict()
    unknown = set(weights) - set(state)
    if unknown:
        raise KeyError(f"global model has keys this site's module lacks: {sorted(unknown)[:5]}")
    with torch.no_grad():
        for key, array in weights.items():
            if skip and key in skip:
                continue
            target = state[key]
            # np arrays from the object store are read-only: copy before handing them to torch.
            target.copy_(torch.from_numpy(np.array(array, copy=True)).to(dtype=target.dtype))


class Aggregator:
    """The server half of an algorithm, in the spirit of Flower's ``Strategy``.

    ``aggregate`` receives this round's :class:`SiteUpdate` objects and the current global weights and returns the
    new :class:`GlobalModel`. It runs in the coordinator, never on a site. State that must survive a restart
    (server optimizer moments, control variates, privacy accountants) goes in ``state_dict``.
    """

    name: ClassVar[str] = ""

    def site_algorithm(self) -> SiteAlgorithm:
        """A fresh site half, sent to every site at start-up (each site gets its own copy)."""
        return SiteAlgorithm()

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but the checkpoint holds {sorted(state)}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
