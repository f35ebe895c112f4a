"""What travels between the sites and the coordinator, measured exactly.

Every message a site sends the coordinator (its update, metric states, agreed decisions, status reports, key
exchanges) and every answer it gets back (the global model, merged metrics) is counted at the coordinator, the hub
every message passes through, as its serialized size: the pickle-5 bytes Ray writes for it, in-band bytes plus the
out-of-band array buffers (:func:`wire_size`). Ray's own framing (some tens of bytes per call) is not counted.

Messages count towards rounds: round ``r`` of a site is everything from the end of its hand-over ``r − 1`` to the
end of its hand-over ``r`` (so round 1 holds the start-up exchanges, and the validation of round ``r − 1``'s model
counts in round ``r``); what a site sends after the last hand-over (the last validation, its final report) counts
in the last round. A round's figures are complete the moment it is aggregated.
"""

from __future__ import annotations

import pickle
from typing import Any

from ray import cloudpickle


def wire_size(obj: Any) -> int:
    """Bytes of ``obj`` serialized as Ray serializes it: pickle protocol 5 with arrays as out-of-band buffers."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    except (pickle.PicklingError, TypeError, AttributeError):  # lambdas, local classes: what cloudpickle is for
        buffers.clear()
        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return len(data) + sum(b.raw().nbytes for b in buffers)


class TrafficLedger:
    """Bytes sent and received per site and round, kept by the coordinator (and in its checkpoints)."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        # site -> round -> [sent, received, of which the update]
        self._rounds: dict[str, dict[int, list[int]]] = {}
        self._current: dict[str, int] = {}
        if state:
            self._rounds = {
                s: {int(r): [*v, 0, 0, 0][:3] for r, v in rounds.items()} for s, rounds in state["rounds"].items()
            }
            self._current = {s: int(r) for s, r in state["current"].items()}

    def _slot(self, site: str) -> list[int]:
        return self._rounds.setdefault(site, {}).setdefault(self._current.get(site, 1), [0, 0, 0])

    def sent(self, site: str, nbytes: int, update: bool = False) -> None:
        """``update``: the message is the site's hand-over (its update and what it carries)."""
        slot = self._slot(site)
        slot[0] += nbytes
        slot[2] += nbytes if update else 0

    def received(self, site: str, nbytes: int) -> None:
        self._slot(site)[1] += nbytes

    def round_ended(self, site: str, round: int) -> None:
        """``site``'s hand-over of ``round`` is complete: what it sends from now on counts in ``round + 1``."""
        self._current[site] = round + 1

    def joins_at(self, site: str, round: int) -> None:
        """A site rejoining counts its messages in the round it rejoins at."""
        self._current[site] = round

    def round_totals(self, round: int) -> dict[str, tuple[int, int]]:
        """Every site's (sent, received) bytes in ``round`` (sites with no message in it are left out)."""
        return {s: (v[round][0], v[round][1]) for s, v in self._rounds.items() if round in v}

    def per_site(self, last_round: int) -> dict[str, dict[str, list[int]]]:
        """``{site: {"sent": [...], "received": [...], "update_sent": [...]}}``, one entry per round
        1..``last_round``; messages after the last round count in it."""
        out = {}
        rounds_kept = max(last_round, 1)
        for site, rounds in self._rounds.items():
            columns = [[0] * rounds_kept for _ in range(3)]
            for r, slot in rounds.items():
                i = min(max(r, 1), rounds_kept) - 1
                for column, value in zip(columns, slot):
                    column[i] += value
            out[site] = dict(zip(("sent", "received", "update_sent"), columns))
        return out

    def state(self) -> dict[str, Any]:
        return {
            "rounds": {s: {r: list(v) for r, v in rounds.items()} for s, rounds in self._rounds.items()},
            "current": dict(self._current),
        }
