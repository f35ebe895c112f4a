"""Round checkpoints, committed as the sites write them.

Each site writes its own part of a round (a full Lightning checkpoint) and says so; the coordinator keeps the
server's state of every aggregated round until the round is complete on disk, then :class:`RoundCommits` writes the
server part and the manifest at once (:func:`~lightning_fed.checkpoint.commit_round`), so a round folder is either
whole or not there. A site that was out of a round has its latest earlier part linked in. Torch-free: this runs in
the coordinator's process.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning_fed.checkpoint import commit_round, site_checkpoint_path


class RoundCommits:
    """The rounds waiting to be committed, and each site's latest committed part.

    Args:
        folder: where round folders go (``None``: this run writes no checkpoints).
        sites: every site of the federation.
        keep: complete rounds kept on disk (0: all).
        parts: each site's part in the checkpoint a resumed run started from, with the round the part is from.
    """

    def __init__(
        self, folder: Optional[str], sites: list[str], keep: int = 2, parts: Optional[dict[str, tuple[str, int]]] = None
    ) -> None:
        self.folder, self.sites, self.keep = folder, list(sites), keep
        self.parts: dict[str, tuple[str, int]] = dict(parts or {})  # site -> (its latest committed part, its round)
        self._pending: dict[int, dict[str, Any]] = {}  # round -> the server's state as the round was aggregated
        self._saved: dict[int, set[str]] = {}  # round -> sites that wrote their part

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def aggregated(self, round: int, server_state: dict[str, Any]) -> None:
        """``round`` was aggregated into ``server_state``: it is committed once its sites have saved their parts."""
        if self.enabled:
            self._pending[round] = server_state

    def saved(self, site: str, round: int) -> None:
        """``site`` wrote its part of ``round``."""
        self._saved.setdefault(round, set()).add(site)

    def waiting(self) -> list[int]:
        """The aggregated rounds not committed yet."""
        return list(self._pending)

    def commit_if_complete(self, round: int, expected: set[str]) -> Optional[str]:
        """Commit ``round`` if every site in ``expected`` (those in the round) saved its part; earlier rounds still
        waiting are then dropped (this one supersedes them). Returns why the commit failed, if it did."""
        saved = self._saved.get(round, set())
        if round not in self._pending or not saved >= expected:
            return None
        # a site out of this round: its latest part, found in the latest committed folder (older ones get pruned)
        earlier = {s: self.parts[s] for s in self.sites if s not in saved and s in self.parts}
        missing = [s for s in self.sites if s not in saved and s not in earlier]
        state = self._pending.pop(round)
        error = None
        try:
            commit_round(self.folder, round, self.sites, state, self.keep, earlier=earlier, absent=missing)
        except Exception as err:
            error = f"checkpoint of round {round} could not be written: {type(err).__name__}: {err}"
        for site in [*saved, *earlier]:
            self.parts[site] = (
                str(site_checkpoint_path(self.folder, round, site)),
                round if site in saved else earlier[site][1],
            )
        self._saved.pop(round, None)
        for older in [r for r in self._pending if r < round]:
            self._pending.pop(older)
        return error


def check_resumable(server_state: dict[str, Any], aggregator: Optional[str], sites: list[str]) -> None:
    """Refuse to resume from a checkpoint that another aggregator wrote, or that holds other sites."""
    if server_state.get("aggregator_name") != aggregator:
        raise ValueError(
            f"checkpoint was written by aggregator {server_state.get('aggregator_name')!r}, this run uses "
            f"{aggregator!r}: resume with the same aggregator"
        )
    if sorted(server_state.get("sites", [])) != sorted(sites):
        raise ValueError(
            f"checkpoint has sites {server_state.get('sites')}, this run has {sites}: resume with the same sites"
        )
