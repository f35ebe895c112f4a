"""Ready LightningModules for recipes. Any LightningModule works with lightning-fed; these save writing one."""

from lightning_fed.models.cnn import SmallCNN

__all__ = ["SmallCNN"]
