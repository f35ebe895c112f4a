"""Sites' console output goes to their own log files, not to the user's terminal.

A worker hosts sites that print (Lightning's notices, W&B's run summaries, a user's ``print``). Ray would forward
every line of every worker to the driver's terminal, where it scrolls the progress view and the results table
away. Inside a worker, :class:`SiteConsole` sends Python-level output (``sys.stdout``/``sys.stderr`` and the
logging handlers writing to them) to ``<run>/sites/<site>/console.log`` of the site computing at that moment,
and everything else (native libraries, output between sites) to ``<run>/sites/worker-<i>.log``; Ray then has
nothing of the worker's to forward. Errors still reach the driver as exceptions, named by site.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path
from typing import IO, Optional


class _Stream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a worker: writes go to the computing site's log file."""

    def __init__(self, console: "SiteConsole") -> None:
        self._console = console

    def write(self, text: str) -> int:
        target = self._console.target()
        target.write(text)
        if "\n" in text:
            target.flush()
        return len(text)

    def flush(self) -> None:
        self._console.target().flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._console.target().fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


class SiteConsole:
    """Where one worker's output goes: :meth:`open` once the run's folder and the hosted sites are known; the
    worker says which site computes (:attr:`current`)."""

    def __init__(self) -> None:
        self.current = ""
        self._files: dict[str, IO[str]] = {}
        self._worker: Optional[IO[str]] = None
        self._stream = _Stream(self)

    def open(self, root: str, worker: int, sites: list[str]) -> None:
        """Log files under ``root/sites`` for these sites (appended to: a restarted site keeps its history)."""
        folder = Path(root) / "sites"
        folder.mkdir(parents=True, exist_ok=True)
        worker_log = open(folder / f"worker-{worker}.log", "a", buffering=1, encoding="utf-8")
        for fd in (1, 2):  # native output (C++ warnings, faulthandler) and anything printed between sites
            sys.stdout.flush() if fd == 1 else sys.stderr.flush()
            os.dup2(worker_log.fileno(), fd)
        if self._worker is not None:
            self._worker.close()
        self._worker = worker_log
        for name in sites:
            path = folder / name / "console.log"
            held = self._files.get(name)
            if held is not None and held.name != str(path):  # a site of this name in an earlier run (a warm worker)
                held.close()
                held = None
            if held is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._files[name] = open(path, "a", buffering=1, encoding="utf-8")
        if sys.stdout is not self._stream:
            sys.stdout = sys.stderr = self._stream
            # handlers made at import time hold the process's original streams
            for logger in [
                logging.getLogger(),
                *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)),
            ]:
                for handler in logger.handlers:
                    if isinstance(handler, logging.StreamHandler) and handler.stream in (
                        sys.__stdout__,
                        sys.__stderr__,
                    ):
                        handler.setStream(self._stream)

    def target(self) -> IO[str]:
        return self._files.get(self.current) or self._worker or sys.__stderr__

    def flush(self) -> None:
        for handle in [*self._files.values(), *([self._worker] if self._worker else [])]:
            handle.flush()
