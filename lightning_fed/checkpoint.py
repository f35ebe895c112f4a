"""Federated checkpoints: one folder per round, committed only when every part is on disk.

Layout::

    <checkpoint_dir>/
        round-0003/
            site-<name>.ckpt   each site's full Lightning checkpoint (weights, optimizer, scheduler, loops, callbacks)
            server.pkl         the coordinator's state (global weights, aggregator state, round): numpy arrays
                               in a pickle, so the coordinator writes it without torch (format 1 wrote server.pt)
            manifest.json      written last: a round folder without it is incomplete and never resumed from
        last.json              points at the newest complete round (replaced atomically)

A crash while writing round r leaves round r-1 untouched and ``last.json`` pointing at it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

MANIFEST = "manifest.json"
LAST = "last.json"
SERVER = "server.pkl"
FORMAT_VERSION = 2


def round_dir(root: str | os.PathLike, round: int) -> Path:
    return Path(root) / f"round-{round:04d}"


def site_checkpoint_path(root: str | os.PathLike, round: int, site: str) -> Path:
    return round_dir(root, round) / f"site-{site}.ckpt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def commit_round(
    root: str | os.PathLike,
    round: int,
    sites: list[str],
    server_state: dict[str, Any],
    keep_last: int,
    earlier: Optional[dict[str, tuple[str, int]]] = None,
    absent: Optional[list[str]] = None,
) -> Path:
    """Write the server part and the manifest of ``round`` (site parts must already be on disk), then prune.

    ``earlier``: sites that were out of this round (``on_site_failure="continue"``), each with the path of its latest
    committed part and the round that part is from; the part is linked into this round's folder so that pruning
    never loses it. ``absent``: sites out since before their first part (a resumed run starts them
    from the global model)."""
    folder = round_dir(root, round)
    earlier, absent = dict(earlier or {}), list(absent or [])
    for site, (source, _) in earlier.items():
        if Path(source) != site_checkpoint_path(root, round, site):
            _link(Path(source), site_checkpoint_path(root, round, site))
    present = [s for s in sites if s not in absent]
    missing = [s for s in present if not site_checkpoint_path(root, round, s).is_file()]
    if missing:
        raise FileNotFoundError(f"round {round} checkpoint lacks site files for {missing}")
    atomic_write_bytes(folder / SERVER, pickle.dumps(server_state, protocol=pickle.HIGHEST_PROTOCOL))
    manifest = {
        "format": FORMAT_VERSION,
        "round": round,
        "sites": {s: f"site-{s}.ckpt" for s in present},
        "server": SERVER,
        "site_rounds": {s: earlier[s][1] if s in earlier else round for s in present},
        "absent": absent,
    }
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=2).encode())
    atomic_write_bytes(Path(root) / LAST, json.dumps({"round": round, "path": folder.name}).encode())
    if keep_last > 0:
        complete = sorted(p for p in Path(root).glob("round-*") if (p / MANIFEST).is_file())
        for old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _link(source: Path, target: Path) -> None:
    """``target`` becomes the same file as ``source`` (a hard link; a copy where links are not possible)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


@dataclass
class RoundCheckpoint:
    """A complete federated checkpoint found on disk."""

    folder: Path
    round: int
    site_paths: dict[str, Path]
    server_path: Path
    site_rounds: dict[str, int] = field(default_factory=dict)  # sites whose part is from an earlier round
    absent: list[str] = field(default_factory=list)  # sites with no part at all (out before their first)

    def parts(self) -> dict[str, tuple[str, int]]:
        """Each site's part and the round it is from."""
        return {s: (str(p), self.site_rounds.get(s, self.round)) for s, p in self.site_paths.items()}

    def behind(self) -> list[str]:
        """Sites whose part is older than the round (they were out of it): a resumed run brings them in from the
        round's global model."""
        return sorted([s for s, r in self.site_rounds.items() if r < self.round] + list(self.absent))

    def server_state(self) -> dict[str, Any]:
        try:
            if self.server_path.suffix == ".pt":  # format 1
                import torch

                return torch.load(self.server_path, map_location="cpu", weights_only=False)
            return pickle.loads(self.server_path.read_bytes())
        except Exception as err:
            raise ValueError(
                f"federated checkpoint {self.server_path} cannot be read ({type(err).__name__}: {err}): resume from an earlier round folder"
            ) from None


def find_checkpoint(path: str | os.PathLike) -> RoundCheckpoint:
    """Resolve a checkpoint folder (``last.json`` inside) or one ``round-NNNN`` folder to a complete round."""
    path = Path(path)
    if (path / LAST).is_file():
        try:
            path = path / json.loads((path / LAST).read_text())["path"]
        except (ValueError, KeyError) as err:
            raise ValueError(f"{path / LAST} is unreadable ({err}): pass a round-NNNN folder instead") from None
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a complete federated checkpoint (no {MANIFEST}): pass the checkpoint folder or a round-NNNN folder inside it"
        )
    manifest = json.loads(manifest_file.read_text())
    sites = {name: path / rel for name, rel in manifest["sites"].items()}
    missing = [str(p) for p in sites.values() if not p.is_file()]
    if missing or not (path / manifest["server"]).is_file():
        raise FileNotFoundError(
            f"federated checkpoint {path} is missing parts {missing or [manifest['server']]}: resume from an earlier round"
        )
    return RoundCheckpoint(
        folder=path,
        round=int(manifest["round"]),
        site_paths=sites,
        server_path=path / manifest["server"],
        site_rounds={k: int(v) for k, v in manifest.get("site_rounds", {}).items()},
        absent=list(manifest.get("absent", [])),
    )


def is_federated_checkpoint(path: Optional[str | os.PathLike]) -> bool:
    return (
        path is not None
        and Path(path).is_dir()
        and ((Path(path) / LAST).is_file() or (Path(path) / MANIFEST).is_file())
    )
