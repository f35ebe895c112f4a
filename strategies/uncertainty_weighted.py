"""Uncertainty-weighted averaging: each site's weight comes from uncertainty it measures on its own images, so
it needs no labels (a hospital without ground truth is weighted like any other).

    w_{t+1} = sum_k a_k w_k / sum_k a_k

Each site reports, from images alone (:class:`~lightning_fed.strategies.site.uncertainty_weighted.UncertaintyScores`):
``epistemic`` = the mean per-pixel mutual information (MC dropout) or distributional uncertainty (evidential head)
of the global model it started the round from, and ``aleatoric`` = the mean expected entropy of its own model
after local training. ``score`` chooses ``a_k``:

* ``"fedevi"`` (Chen et al., MICCAI 2024): ``a_k = epistemic_k / aleatoric_k``, normalised, then floored at
  ``min_weight`` (as FedEvi): more weight where the global model knows least about the site's images, less where
  the images themselves are ambiguous. FedEvi scores a provisional average on each site's validation images,
  which costs a second exchange per round; here the global model is the one the round started from and the
  images are the site's training images (one exchange per round).
* ``"epistemic"``: ``a_k = n_k * epistemic_k``: FedAvg's sample weights tilted towards the sites whose images the
  global model is least sure about.

Integer buffers are taken from the site with the most samples, as in FedAvg. The weights of every round are
reported as ``fl/weight/<site>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights, combine_floating
from lightning_fed.strategies.registry import register_aggregator

if TYPE_CHECKING:
    from lightning_fed.strategies.site.uncertainty_weighted import UncertaintyScores

SCORE_KEY = "uncertainty"


@register_aggregator("uncertainty_weighted")
class UncertaintyWeighted(Aggregator):
    """Weighted averaging with label-free, uncertainty-derived site weights."""

    def __init__(
        self, score: Literal["fedevi", "epistemic"] = "fedevi", min_weight: float = 1e-3, max_images: int = 64
    ) -> None:
        if score not in ("fedevi", "epistemic"):
            raise ValueError(f"score must be 'fedevi' or 'epistemic', got {score!r}")
        if not 0 <= min_weight < 1:
            raise ValueError(f"min_weight must be in [0, 1), got {min_weight}")
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.score, self.min_weight, self.max_images = score, min_weight, max_images

    def check_model(self, model: Any) -> None:
        if not callable(getattr(model, "predictive_uncertainty", None)):
            raise ValueError(
                f"uncertainty_weighted needs a module with predictive_uncertainty(images) (e.g. "
                f"lightning_fed.models.SegmentationModel); {type(model).__name__} has none"
            )

    def site_algorithm(self) -> "UncertaintyScores":
        from lightning_fed.strategies.site.uncertainty_weighted import UncertaintyScores

        return UncertaintyScores(self.max_images)

    def site_weights(self, updates: list[SiteUpdate]) -> np.ndarray:
        """The normalised ``a_k`` of this round's sites (in their order)."""
        scores = []
        for u in updates:
            if SCORE_KEY not in u.extras:
                raise ValueError(f"site {u.site!r} sent no uncertainty scores: its site half is not UncertaintyScores")
            epistemic, aleatoric = (float(u.extras[SCORE_KEY][k]) for k in ("epistemic", "aleatoric"))
            if self.score == "fedevi":
                scores.append(epistemic / max(aleatoric, 1e-12))
            else:
                scores.append(u.num_samples * epistemic)
        a = np.asarray(scores, dtype=np.float64)
        if not np.all(np.isfinite(a)) or a.sum() <= 0:  # every site certain (or nothing measured): sample weights
            a = np.asarray([u.num_samples for u in updates], dtype=np.float64)
        a = a / a.sum()
        if self.score == "fedevi" and self.min_weight > 0:
            a = np.clip(a, self.min_weight, None)
            a = a / a.sum()
        return a

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        weights = self.site_weights(updates)
        averaged = combine_floating(updates, lambda ws: sum(a * w for a, w in zip(weights, ws)))
        metrics = {f"weight/{u.site}": float(a) for u, a in zip(updates, weights)}
        return GlobalModel(weights=averaged, round=round, extras={"metrics": metrics})
