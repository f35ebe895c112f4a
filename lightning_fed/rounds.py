"""What a round is: ``sync_every`` epochs (the default), or ``sync_every_steps`` optimizer steps at every site.

Counting rounds in steps is how FLamby defines its benchmark (``num_updates`` local updates per round, e.g. 100):
every site hands its update over after exactly k optimizer steps, wherever its epochs end (a small site runs
through its data several times in a round, a large one not once). Epochs then no longer line up across sites, so
whatever the federation agrees at an epoch's end moves to the round's end:

- an update weighs by the site's training samples (FedAvg's n_k, as FLamby weighs it), not by the samples of
  the round (the same k batches at every site);
- validation runs at every round's end, right after the hand-over (``val_check_interval`` = k batches, counted
  across epochs), and its merge is keyed by the round;
- the run ends at ``Trainer(max_steps=...)``: ``ceil(max_steps / k)`` rounds, the last one shorter when
  ``max_steps`` is not a multiple of k;
- what needs epoch-aligned rounds is refused before anything starts, with the way out: round checkpoints (and so
  resume), continue mode (a site rejoins at an epoch), callbacks that stop a site on their own (``EarlyStopping``,
  the ``Timer`` of ``max_time``),
  a validation schedule of the user's own, and a ``max_epochs`` limit (sites would stop apart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class RoundSchedule:
    """A round: ``every`` epochs (``in_steps=False``) or ``every`` optimizer steps (``in_steps=True``)."""

    every: int = 1
    in_steps: bool = False

    @classmethod
    def of(cls, sync_every: int, sync_every_steps: Optional[int]) -> "RoundSchedule":
        """The schedule the strategy's two options describe (at most one of them set away from its default)."""
        if sync_every_steps is None:
            return cls(sync_every, False)
        if sync_every != 1:
            raise ValueError(
                f"sync_every={sync_every} (epochs) and sync_every_steps={sync_every_steps} both given: a round is "
                "counted in epochs or in optimizer steps, give one of them"
            )
        if isinstance(sync_every_steps, bool) or not isinstance(sync_every_steps, int) or sync_every_steps < 1:
            raise ValueError(f"sync_every_steps must be an integer >= 1, got {sync_every_steps!r}")
        return cls(sync_every_steps, True)

    @property
    def unit(self) -> str:
        return "steps" if self.in_steps else "epochs"

    def total_rounds(self, max_epochs: Optional[int], max_steps: Optional[int]) -> int:
        """Rounds a fit makes (the last one partial when the limit is not a multiple of a round)."""
        limit = max_steps if self.in_steps else max_epochs
        return math.ceil(limit / self.every) if limit and limit > 0 else 0

    def due_after_step(self, global_step: int) -> bool:
        """Whether the optimizer step that brought the site to ``global_step`` ends a round (steps only)."""
        return self.in_steps and global_step > 0 and global_step % self.every == 0

    def refusals(
        self, settings: dict[str, Any], callbacks: Sequence[Any], checkpoint_every: int, tolerant: bool
    ) -> list[str]:
        """Why a fit cannot run on this schedule (empty when it can): each a line naming the way out."""
        if not self.in_steps:
            if settings.get("max_epochs") is not None and 0 < settings["max_epochs"] < self.every:
                return [
                    f"sync_every={self.every} is more than max_epochs={settings['max_epochs']}: the sites would train "
                    "alone until the very end; lower sync_every or raise max_epochs"
                ]
            return []
        k = f"sync_every_steps={self.every}"
        found = []
        if not settings.get("max_steps") or settings["max_steps"] < 1:
            found.append(f"{k} counts the run in optimizer steps: give Trainer(max_steps=...) (rounds x {self.every})")
        if settings.get("max_epochs") not in (None, -1):
            found.append(f"{k}: leave max_epochs unset (sites end their epochs at different steps); use max_steps")
        if settings.get("val_check_interval") not in (None, 1.0) or settings.get("check_val_every_n_epoch") != 1:
            found.append(
                f"{k}: the sites validate at every round's end; leave val_check_interval and "
                "check_val_every_n_epoch at their defaults"
            )
        if checkpoint_every:
            found.append(
                f"{k}: round checkpoints are written at epoch ends, which sites reach at different steps; "
                "set checkpoint_every=0 (no resume), or count rounds in epochs (sync_every)"
            )
        if tolerant:
            found.append(f"{k}: a site left out rejoins at an epoch; use on_site_failure='abort' with step rounds")
        from lightning.pytorch.callbacks import EarlyStopping, Timer

        # Timer: Trainer(max_time=...) adds one; it stops a site at its own moment, mid-round
        stoppers = sorted({type(cb).__name__ for cb in callbacks if isinstance(cb, (EarlyStopping, Timer))})
        if stoppers:
            found.append(
                f"{k}: {', '.join(stoppers)} would stop one site mid-round while the others wait for it; "
                "drop it, or count rounds in epochs (sync_every)"
            )
        return found

    def site_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The site Trainer's loop settings: with step rounds, validation at every round's end and no epoch limit."""
        if not self.in_steps:
            return settings
        accumulate = int(settings.get("accumulate_grad_batches") or 1)
        return {
            **settings,
            "max_epochs": -1,
            "val_check_interval": self.every * accumulate,  # training batches, counted across epochs
            "check_val_every_n_epoch": None,
        }
