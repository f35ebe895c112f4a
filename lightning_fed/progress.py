"""One readable progress view on the driver instead of N interleaved progress bars."""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

_SHOWN = ("loss", "acc", "auroc", "recall", "precision")


def _fmt_metrics(metrics: dict[str, Any], limit: int = 6) -> str:
    keys = [k for k in metrics if isinstance(metrics[k], float) and any(s in k for s in _SHOWN)]
    return "  ".join(f"{k}={metrics[k]:.4f}" for k in sorted(keys)[:limit])


class FederatedProgress:
    """Prints ``round r/N``, each site's epoch and status, and the latest federated metrics.

    On a terminal one status line is rewritten in place; elsewhere (CI logs, ``ray job logs``) a line is printed
    whenever the round or a site's status changes, so logs stay readable.
    """

    def __init__(self, total_rounds: int, stream: Optional[TextIO] = None, enabled: bool = True) -> None:
        self.total_rounds = total_rounds
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self._last_line = ""
        self._last_key: tuple = ()
        self._start = time.monotonic()
        self._events = 0

    def update(self, snapshot: dict[str, Any], fl_metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        events = snapshot.get("events", [])[self._events:]  # sites left out or back in: a line each, kept on screen
        for event in events:
            reason = f": {event['reason']}" if event.get("reason") else ""
            self.stream.write(("\r\033[K" if self.tty else "")
                              + f"[lightning-fed] site {event['site']!r} {event['event']} (round {event['round']}){reason}\n")
        self._events += len(events)
        if events and self.tty:
            self._last_line = ""
        sites = snapshot["sites"]
        parts = [f"{name}: e{info.get('epoch', 0)} {info.get('status', '?')}" for name, info in sites.items()]
        line = f"[lightning-fed] round {snapshot['round']}/{self.total_rounds} | " + " | ".join(parts)
        metrics = _fmt_metrics(fl_metrics)
        if metrics:
            line += f" | {metrics}"
        key = (snapshot["round"], tuple(sorted((n, i.get("status"), i.get("epoch")) for n, i in sites.items())), metrics)
        if self.tty:
            if line != self._last_line:
                self.stream.write("\r\033[K" + line[: 400])
                self.stream.flush()
        elif key != self._last_key:
            self.stream.write(f"{line}  ({time.monotonic() - self._start:.0f}s)\n")
            self.stream.flush()
        self._last_line, self._last_key = line, key

    def close(self) -> None:
        if self.enabled and self.tty and self._last_line:
            self.stream.write("\n")
            self.stream.flush()


CLASSIFICATION_COLUMNS = ("loss", "accuracy", "precision", "recall", "auroc")
SEGMENTATION_COLUMNS = ("loss", "dice", "entropy", "mutual_information")


def report_columns(rows: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """Metric columns for a results table: segmentation's when the sites measured Dice or uncertainty."""
    segmentation = any("dice" in r or "mutual_information" in r for r in rows.values())
    return SEGMENTATION_COLUMNS if segmentation else CLASSIFICATION_COLUMNS


def results_table(rows: dict[str, dict[str, Any]], columns: Optional[tuple[str, ...]] = None) -> str:
    """A plain-text table: one row per site plus the federated row, one column per metric (by default
    :func:`report_columns`); a site without labels is marked ``(no labels)``."""
    columns = columns or report_columns(rows)
    header = ["site", *columns]
    body = []
    for name, values in rows.items():
        cells = [f"{name} (no labels)" if values.get("labels") == "hidden" else name]
        for col in columns:
            value = values.get(col)
            cells.append(f"{value:.4f}" if isinstance(value, float) else "-")
        body.append(cells)
    return text_table(header, body)


def text_table(header: list[str], body: list[list[str]]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def per_label_table(rows: dict[str, dict[str, Any]], label_names: Optional[list[str]] = None, key: str = "auroc_per_label") -> Optional[str]:
    """Multi-label AUROC per label: one row per label, one column per site and the federated value.

    ``-`` marks a label without support there (no annotated positive and negative): left out of the macro mean.
    """
    columns = {name: values[key] for name, values in rows.items() if isinstance(values.get(key), list)}
    if not columns:
        return None
    count = max(len(v) for v in columns.values())
    names = list(label_names) if label_names and len(label_names) == count else [str(i) for i in range(count)]
    header = ["label", *columns]
    body = [[names[i], *(f"{v[i]:.4f}" if i < len(v) and v[i] is not None else "-" for v in columns.values())] for i in range(count)]
    return text_table(header, body)
