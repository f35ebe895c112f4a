"""Ready LightningModules for recipes. Any LightningModule works with lightning-fed; these save writing one."""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "CoxModel": "lightning_fed.models.survival",
    "LogisticRegression": "lightning_fed.models.survival",
    "concordance_index": "lightning_fed.models.survival",
    "cox_loss": "lightning_fed.models.survival",
    "ImageClassifier": "lightning_fed.models.classifier",
    "create_backbone": "lightning_fed.models.classifier",
    "load_backbone_checkpoint": "lightning_fed.models.classifier",
    "PixelUncertainty": "lightning_fed.models.segmentation",
    "SegmentationModel": "lightning_fed.models.segmentation",
    "SmallCNN": "lightning_fed.models.cnn",
    "TabularMLP": "lightning_fed.models.tabular",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # lazy: a site unpickling SmallCNN should not pay for importing timm
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_fed.models' has no attribute {name!r}")
