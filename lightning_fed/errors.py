"""What the ``lightning-fed`` command prints when a run cannot go on: one line, ``lightning-fed: error: <what>
(<how to fix>)``, and a non-zero exit. ``--traceback`` (or ``LIGHTNING_FED_TRACEBACK=1``) shows the full trace.

Recipe errors reach the command wrapped by jsonargparse, which tries every type a value could have and lists
why each failed; :func:`explain` picks the reason that names the problem (lightning-fed's own checks say what
to do) and drops the type-by-type noise.

The errors lightning-fed raises itself live here too, torch-free, so the command can tell them apart without
importing the machinery: :class:`FederationConfigError` (nothing started; exit status 2, like a bad recipe) and
:class:`RunFailedError` (a run failed once started: a site, a site's worker process or the coordinator; exit status
1, with :func:`run_failure`'s line naming what failed and the round to resume from).
"""

from __future__ import annotations

import re
from typing import Optional

TRACEBACK_ENV = "LIGHTNING_FED_TRACEBACK"

# jsonargparse's lines that say how a value failed to match a type, not what is wrong with it
_TYPE_NOISE = re.compile(
    r"^(Expected a |Given value|Subtypes:|Errors:|Does not validate against any of the|Not a valid subclass|"
    r"Type <class|Not a valid (path|value)|Problem with given class_path|- \"?class_path\"?|Unable to load|"
    r"Not of type|Value \".*\" does not validate|Parser key|'?NoneType'? object|Not a class)"
)
_HINT = re.compile(
    r"\((see|check|use|give|pass|run|set|choose|resume|start|lower|raise|free|add|keep|point)\b|: (use|give|pass|"
    r"choose|resume|start|lower|raise|free|add|keep|point|set|check|remove|rename|download|install|register)\b"
)


class UsageError(ValueError):
    """A command line or recipe the command cannot run; its message says what to change."""


class FederationConfigError(ValueError):
    """The federation cannot start as configured (sites, resources, checkpoint); nothing was trained."""


class RunFailedError(RuntimeError):
    """A run that had started could not go on: a site raised, or a process died (a site's worker, the coordinator).
    Every worker was torn down. ``checkpoint_dir``: where its committed rounds are (``fit(ckpt_path=...)`` resumes
    from the last one; the command names it)."""

    checkpoint_dir: Optional[str] = None

    def __init__(self, message: str, checkpoint_dir: Optional[str] = None) -> None:
        super().__init__(message)
        self.checkpoint_dir = checkpoint_dir


class SiteFailedError(RunFailedError):
    """A site raised or died (its worker process exited); the message names it."""


class CoordinatorDiedError(RunFailedError):
    """The coordinator's process died (killed, out of memory, a crash): the sites lost their barrier and aggregator."""


def _chain(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _candidates(message: str) -> list[str]:
    lines = []
    for raw in message.splitlines():
        line = raw.strip()
        while line.startswith("- "):
            line = line[2:].strip()
        if line and not _TYPE_NOISE.match(line):
            lines.append(line)
    return lines


def _type_mismatch(message: str) -> Optional[str]:
    """``key: 'value' is not a valid value (expected int or None)`` from jsonargparse's union report."""
    key = re.search(r'Parser key "([^"]+)"', message)
    given = re.search(r"Given value: (.*)", message)
    if key is None or given is None:
        return None
    types = re.findall(r"<class '(?:[\w.]+\.)?(\w+)'>", (re.search(r"Subtypes: \[(.*)\]", message) or given).group(0))
    expected = " or ".join(t.replace("NoneType", "None") for t in types)
    return f"{key.group(1)}: {given.group(1).strip()!r} is not a valid value" + (
        f" (expected {expected})" if expected else ""
    )


def explain(err: BaseException, command: str = "fit") -> str:
    """One line for ``err``: what went wrong and how to fix it.

    The line lightning-fed wrote (with its fix) wins, wherever it sits in the chain of wrapped errors; then a
    type mismatch named by its key; then the first line that is not jsonargparse's type-by-type report."""
    chain = _chain(err)
    messages = [str(e).strip() for e in chain if str(e).strip()]
    candidates = list(dict.fromkeys(line for message in messages for line in _candidates(message)))
    with_fix = [line for line in candidates if _HINT.search(line)]
    own = [
        str(e).strip() for e in chain if type(e).__module__.startswith("lightning_fed") and "\n" not in str(e).strip()
    ]
    if own:
        line = own[0]
    elif with_fix:
        line = with_fix[0]
    else:
        line = next((m for m in (_type_mismatch(msg) for msg in messages) if m), None) or (
            "; ".join(candidates[:2]) if candidates else (messages[0] if messages else type(err).__name__)
        )
        named = next(
            (e for e in chain if type(e).__module__ not in ("builtins", "argparse", "jsonargparse._common")), None
        )
        if (
            named is not None
            and not line.startswith(type(named).__name__)
            and type(named).__name__ not in ("ArgumentError",)
        ):
            line = f"{type(named).__name__}: {line}"
    line = re.sub(r"\s+", " ", line.replace('"<unicode string>"', "the recipe")).strip()
    if not _HINT.search(line):
        parsed = ", --print_config shows what was parsed" if command in ("fit", "validate", "test") else ""
        line += f" (see `lightning-fed {command} --help`{parsed})"
    return line


def run_failure(err: RunFailedError) -> str:
    """One line for a run that failed: what failed (its first line), then where to resume from."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__) + resume_hint(err.checkpoint_dir)


def resume_hint(checkpoint_dir: Optional[str]) -> str:
    """How to continue a run that stopped, from its last committed round (if it has one)."""
    if not checkpoint_dir:
        return "; no round was committed (the run writes round checkpoints unless checkpoint_every=0)"
    from lightning_fed.checkpoint import find_checkpoint

    try:
        found = find_checkpoint(checkpoint_dir)
    except (FileNotFoundError, ValueError):
        return "; no round was committed yet: start it again"
    return f" (resume from round {found.round} with --ckpt_path={checkpoint_dir})"
