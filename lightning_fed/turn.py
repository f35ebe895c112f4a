"""Sites sharing a worker take turns: one computes at a time, with all of the worker's threads.

Each hosted site runs on a thread of its own. A site holds the worker's :class:`Turn` while it computes and hands
it on whenever it waits for the other sites (a round barrier, an agreed decision), so the worker is never idle
while any of its sites has work, and never runs two at once.

Process-wide random generators (torch's, numpy's, Python's) are part of a site's state, not the worker's: each
site's :class:`RandomStreams` are put in place when it takes the turn and saved when it hands it on. A site
therefore draws exactly the numbers it would draw alone in its own process, which is what makes results the same
however sites are packed.
"""

from __future__ import annotations

import random
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import numpy as np
import torch


class RandomStreams:
    """One site's random number generators: torch (CPU and, once initialised, CUDA), numpy's and Python's global."""

    def __init__(self) -> None:
        self._state: Optional[dict[str, Any]] = None

    def capture(self) -> None:
        """Save the process-wide generators as this site's streams."""
        self._state = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }

    def restore(self) -> None:
        """Put this site's streams back into the process-wide generators."""
        if self._state is None:
            return
        torch.set_rng_state(self._state["torch"])
        if self._state["cuda"] is not None:
            torch.cuda.set_rng_state_all(self._state["cuda"])
        np.random.set_state(self._state["numpy"])
        random.setstate(self._state["python"])

    def state_dict(self) -> Optional[dict[str, Any]]:
        return self._state

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        self._state = state


class Turn:
    """The right to compute in one worker; held by one hosted site at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @contextmanager
    def taken(self, streams: RandomStreams) -> Iterator[None]:
        """Compute as this site: wait for the turn, with the site's random streams in place."""
        self._lock.acquire()
        streams.restore()
        try:
            yield
        finally:
            streams.capture()
            self._lock.release()

    @contextmanager
    def handed_on(self, streams: RandomStreams) -> Iterator[None]:
        """Wait (for other sites, for the coordinator) while the worker's other sites compute."""
        streams.capture()
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            streams.restore()
