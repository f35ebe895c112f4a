"""Why a run stopped, in one line the command can print: a site raised, a site's worker process died (taking the
sites it hosted along), or the coordinator's process died; with the round it happened in.

The driver raises these lines as :class:`~lightning_fed.errors.SiteFailedError` and
:class:`~lightning_fed.errors.CoordinatorDiedError`; ``lightning-fed`` adds where to resume from.
"""

from __future__ import annotations

import time
from typing import Optional

import ray
from ray.exceptions import RayActorError

from lightning_fed.checkpoint import find_checkpoint
from lightning_fed.coordinator_process import CoordinatorLink
from lightning_fed.worker import SiteStartError, read_marker

EXITED = "its process exited (killed, out of memory, or a native crash)"


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` of what a site raised (Ray's wrapper unwrapped)."""
    cause = getattr(err, "cause", None) or err
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def when(what: str, rounds_seen: int, checkpoint_dir: Optional[str]) -> str:
    """``in round N`` during a fit (the round after the last one the driver saw aggregated, or found committed:
    the coordinator may have been further than the driver's last look), else ``during <what>``."""
    if what != "fit":
        return f"during {what}"
    try:
        committed = find_checkpoint(checkpoint_dir).round if checkpoint_dir else 0
    except (FileNotFoundError, ValueError):
        committed = 0
    return f"in round {max(rounds_seen, committed) + 1}"


def reported_reason(coordinator: CoordinatorLink, wait: bool) -> Optional[str]:
    """Why the coordinator stopped the run, if it did: a site that raised reports it, perhaps still on its way
    (``wait``: give it two seconds). Raises :class:`~ray.exceptions.RayActorError` when the coordinator is dead."""
    deadline = time.monotonic() + (2.0 if wait else 0.0)
    while True:
        try:
            reason = ray.get(coordinator.remote("abort_reason"), timeout=2)
        except RayActorError:
            raise
        except Exception:
            return None  # busy: what the driver saw will do
        if reason is not None or time.monotonic() >= deadline:
            return reason
        time.sleep(0.1)


def site_failure(site: str, err: BaseException, what: str, hosted: list[str], marker: str, at: str) -> str:
    """The line for a call to ``site`` that failed during ``what`` (``at``: :func:`when`): it could not start, it
    raised, or its worker process died, ``hosted`` (every site of that worker) with it. ``marker``: the file in
    which the worker noted which of its sites was computing: that one is named as the cause."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, SiteStartError):
        return str(cause)
    if not isinstance(err, RayActorError):
        return f"site {site!r} failed during {what}: {first_line(err)}"
    if err.actor_init_failed:
        # Ray keeps the creation error only as text: its last line is "ExceptionType: message"
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return f"site {site!r} failed to start: {lines[-1] if lines else err}"
    computing = read_marker(marker) if marker else None
    suspects = [computing] if computing in hosted else hosted
    others = [s for s in hosted if s not in suspects]
    also = f" (its worker also hosted {others})" if others else ""
    who = f"site {suspects[0]!r}" if len(suspects) == 1 else f"sites {suspects} (one worker)"
    return f"{who} died {at}: its worker process exited (killed, out of memory, or a native crash){also}"


def coordinator_death(at: str) -> str:
    return f"the coordinator died {at}: {EXITED}"
