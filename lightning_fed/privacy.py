"""Sample-level differential privacy on a site: DP-SGD through Opacus, one accountant for the whole run.

    FederatedStrategy(privacy={"small_1": DPSGD(target_epsilon=1.0), "small_2": DPSGD(noise_multiplier=1.1)})
    FederatedStrategy(privacy=DPSGD(target_epsilon=2.0, delta=1e-5, max_grad_norm=1.0))       # every site

Inside the site's Trainer, :class:`SiteDPSGD` makes the user's LightningModule and optimizer private without
touching them: per-sample gradients (Opacus ``GradSampleModule`` hooks), clipping to ``max_grad_norm``, Gaussian
noise ``noise_multiplier * max_grad_norm``, Poisson-sampled batches, and an accountant (RDP, or PRV for a tighter
ε) that lives as long as the site (saved in the site's checkpoints, so ε keeps growing across rounds and resumes).
Trainable BatchNorm is refused (it mixes samples); frozen BatchNorm (FedFBN) is fine. The settings themselves
(:class:`DPSGD`, :func:`site_privacy`) live in the torch-free :mod:`lightning_fed.privacy_settings`, re-exported here.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_fed.privacy_settings import ACCOUNTANTS, DEFAULT_DELTA, DPSGD, PrivacySpec, site_privacy

__all__ = ["ACCOUNTANTS", "DEFAULT_DELTA", "DPSGD", "PrivacySpec", "SiteDPSGD", "site_dp_optimizer", "site_privacy"]


@functools.cache
def site_dp_optimizer() -> type:
    """Opacus' DPOptimizer, extended; built on first use so that runs without DP never import Opacus."""
    from opacus.optimizers import DPOptimizer

    class SiteDPOptimizer(DPOptimizer):
        """Opacus replaces ``.grad`` with the noised mean of clipped per-sample gradients, which would silently drop
        gradient terms that depend only on the weights (FedProx's proximal term, SCAFFOLD's correction). Those are
        data-independent, so they are added back after the noise at no privacy cost."""

        def pre_step(self, closure: Any = None) -> Optional[bool]:
            extras = []
            for p in self.params:
                base = getattr(p, "_autograd_grad", None)
                if base is not None and p.grad is not None:
                    extras.append((p, p.grad - base))
                    p._autograd_grad = None
            ready = super().pre_step(closure)
            if ready:
                for p, extra in extras:
                    p.grad.add_(extra)
            return ready

    return SiteDPOptimizer


class SiteDPSGD(Callback):
    """DP-SGD for one site's Trainer: private optimizer, Poisson-sampled data, one accountant for the whole run."""

    carried_by_coordinator = True  # a restarted site's accountant continues from its last released update

    def __init__(self, site: str, config: DPSGD) -> None:
        from opacus.accountants import create_accountant

        self.site, self.config = site, config
        self.accountant = create_accountant(config.accountant)
        self.noise_multiplier: Optional[float] = None
        self.sample_rate: Optional[float] = None
        self.epsilon_history: list[float] = []
        self._grad_sample_module: Any = None  # kept here, never as a module attribute (it would contain itself)
        # Opacus' hooks on the first layer, whose input needs no gradient: expected, and repeated every step
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or not self.config.poisson_sampling:
            return
        owner = trainer.datamodule if trainer.datamodule is not None else pl_module
        original = owner.train_dataloader
        if getattr(original, "_poisson", False):
            return

        def poisson_loader() -> Any:
            from opacus.data_loader import DPDataLoader

            return DPDataLoader.from_data_loader(original(), distributed=False)

        poisson_loader._poisson = True  # type: ignore[attr-defined]
        owner.train_dataloader = poisson_loader

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_module(pl_module)
        if trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"site {self.site!r}: DP-SGD cannot accumulate gradients over batches (accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}): raise the batch size instead"
            )
        loader = trainer.train_dataloader
        batches = len(loader)
        self.sample_rate = 1.0 / batches if self.config.poisson_sampling else loader.batch_size / len(loader.dataset)
        if self.noise_multiplier is None:  # on resume it comes from the checkpoint: the same σ for the whole run
            self.noise_multiplier = self._noise_multiplier(trainer)
        from opacus import GradSampleModule

        if self._grad_sample_module is None:
            self._grad_sample_module = GradSampleModule(pl_module, batch_first=True, loss_reduction="mean")
        expected = max(1, round(self.sample_rate * len(loader.dataset)))
        optimizers = []
        for opt in trainer.strategy.optimizers:
            if isinstance(opt, site_dp_optimizer()):
                optimizers.append(opt)
                continue
            private = site_dp_optimizer()(
                opt,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.config.max_grad_norm,
                expected_batch_size=expected,
                loss_reduction="mean",
            )
            private.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
            optimizers.append(private)
        # LR schedulers keep working: the private optimizer shares the wrapped one's param_groups and state
        trainer.strategy.optimizers = optimizers

    def _noise_multiplier(self, trainer: Trainer) -> float:
        if self.config.noise_multiplier is not None:
            return float(self.config.noise_multiplier)
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            raise ValueError(
                f"site {self.site!r}: DPSGD(target_epsilon=...) needs max_epochs to spread ε over the run; set max_epochs or give noise_multiplier"
            )
        from opacus.accountants.utils import get_noise_multiplier

        return float(
            get_noise_multiplier(
                target_epsilon=self.config.target_epsilon,
                target_delta=self.config.delta,
                sample_rate=self.sample_rate,
                epochs=trainer.max_epochs,
                accountant=self.config.accountant,
            )
        )

    def _check_module(self, pl_module: LightningModule) -> None:
        from opacus.validators import ModuleValidator

        trainable_norms = [
            name
            for name, m in pl_module.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in m.parameters())
        ]
        if trainable_norms:
            raise ValueError(
                f"site {self.site!r}: DP-SGD cannot train BatchNorm layers {trainable_norms[:3]} (they mix samples in a batch): "
                "freeze them (aggregator='fedfbn' does) or replace them with GroupNorm in the model explicitly"
            )
        errors = [str(e).splitlines()[0] for e in ModuleValidator.validate(pl_module, strict=False)]
        if errors:
            raise ValueError(f"site {self.site!r}: Opacus cannot make this model private: {'; '.join(errors[:3])}")

    # -- training --------------------------------------------------------------------------------
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the data gradient as autograd left it: whatever callbacks add to .grad after this is re-applied after noise
        for p in pl_module.parameters():
            if p.requires_grad and p.grad is not None:
                p._autograd_grad = p.grad.detach().clone()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epsilon = self.epsilon
        self.epsilon_history.append(epsilon)
        pl_module.log(f"site/{self.site}/dp_epsilon", epsilon, on_epoch=True, batch_size=1)

    @property
    def epsilon(self) -> float:
        """ε spent so far at this site's δ, from its accountant (0 before the first step, inf without noise)."""
        if not self.accountant.history:
            return 0.0
        if not self.noise_multiplier:
            return float("inf")
        return float(self.accountant.get_epsilon(self.config.delta))

    def report(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "delta": self.config.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "max_grad_norm": self.config.max_grad_norm,
            "steps": sum(steps for _, _, steps in self.accountant.history),
            "epsilon_per_epoch": list(self.epsilon_history),
            "accountant": self.config.accountant,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.accountant.history),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "epsilon_history": list(self.epsilon_history),
            "accountant": self.config.accountant,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("accountant", "rdp")
        if saved != self.config.accountant:
            raise ValueError(
                f"site {self.site!r}: its checkpoint's privacy was accounted with {saved!r}, this run uses "
                f"{self.config.accountant!r}: resume with DPSGD(accountant={saved!r}) (σ was calibrated with it)"
            )
        self.accountant.history = [tuple(h) for h in state_dict.get("history", [])]
        self.noise_multiplier = state_dict.get("noise_multiplier")
        self.epsilon_history = list(state_dict.get("epsilon_history", []))
