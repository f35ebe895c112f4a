"""Dataset files: read from the user's folder, download with checksum checks when missing, or say where to put them."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Mapping, Optional, Sequence

DATA_ENV = "LIGHTNING_FED_DATA"
_VERIFIED: set[tuple[str, str]] = set()


def data_root(data_dir: Optional[str | os.PathLike], dataset: str) -> Path:
    """``data_dir`` if given, else ``$LIGHTNING_FED_DATA/<dataset>``, else ``~/.cache/lightning_fed/<dataset>``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    base = os.environ.get(DATA_ENV)
    if base:
        return Path(base).expanduser() / dataset
    return Path.home() / ".cache" / "lightning_fed" / dataset


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_files(
    root: Path,
    files: Mapping[str, str],
    mirrors: Sequence[str],
    dataset: str,
    download: bool = True,
) -> Path:
    """Make sure every ``name -> md5`` in ``files`` is present and intact in ``root``; download what is missing.

    Raises ``FileNotFoundError`` (one line: which files, where to put them, where they come from) when a file is
    missing and cannot be downloaded, and ``ValueError`` when a file is present but its checksum is wrong.
    """
    missing = [name for name in files if not (root / name).is_file()]
    failures: list[str] = []
    if missing and download:
        for name in missing:
            error = _download(root, name, files[name], mirrors)
            if error:
                failures.append(error)
        missing = [name for name in files if not (root / name).is_file()]
    if missing:
        why = f" (download failed: {failures[0]})" if failures else ""
        raise FileNotFoundError(
            f"{dataset} files {missing} are missing in {root}{why}: download them from {mirrors[0]} into that folder, "
            f"or point ${DATA_ENV} (or the data_dir argument) at a folder holding a '{root.name}' directory with them"
        )
    for name, expected in files.items():
        key = (str(root / name), expected)
        if key in _VERIFIED:
            continue
        actual = md5(root / name)
        if actual != expected:
            raise ValueError(
                f"{root / name} is corrupt (MD5 {actual}, expected {expected}): delete it to download it again"
            )
        _VERIFIED.add(key)
    return root


def _download(root: Path, name: str, expected_md5: str, mirrors: Sequence[str]) -> Optional[str]:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create {root}: {err}"
    last = f"{name}: no mirror"
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        tmp = None
        try:
            with (
                urllib.request.urlopen(url, timeout=30) as response,
                tempfile.NamedTemporaryFile(dir=root, prefix=f".{name}.", delete=False) as fh,
            ):
                tmp = Path(fh.name)
                shutil.copyfileobj(response, fh)
            actual = md5(tmp)
            if actual != expected_md5:
                last = f"{url}: MD5 {actual}, expected {expected_md5}"
                continue
            os.replace(tmp, root / name)  # only a verified file ever appears under its real name
            tmp = None
            return None
        except OSError as err:
            last = f"{url}: {getattr(err, 'reason', err)}"
        finally:
            if tmp is not None and tmp.exists():
                tmp.unlink()
    return last
