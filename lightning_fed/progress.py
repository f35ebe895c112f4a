"""One readable progress view on the driver instead of N interleaved progress bars."""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

from lightning_fed.results import Evaluation, ProgressSnapshot

_SHOWN = ("loss", "acc", "auroc", "recall", "precision")


def format_bytes(n: float) -> str:
    """``1.2 MB``-style (decimal units, as network figures are quoted)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{1 if abs(n) >= 10 * size else 2}f} {unit}"
    return f"{n:.0f} B"


def _fmt_metrics(metrics: dict[str, Any], limit: int = 6) -> str:
    keys = [k for k in metrics if isinstance(metrics[k], float) and any(s in k for s in _SHOWN)]
    return "  ".join(f"{k}={metrics[k]:.4f}" for k in sorted(keys)[:limit])


class FederatedProgress:
    """The federation's progress on the driver: one view, never one progress bar per site.

    On a terminal a `rich <https://github.com/Textualize/rich>`_ table updates in place: round ``r/N``, elapsed and
    estimated time left, and per site its epoch, step, status, last training loss and the bytes it has sent and
    received, with the latest federated metrics under it. Elsewhere (CI logs, ``ray job logs``, a file) a line is
    printed whenever the round or a site's status changes (with the bytes sent so far), so logs stay readable. Sites left out or back in get a line of their own either way.
    """

    def __init__(
        self, total_rounds: int, stream: Optional[TextIO] = None, enabled: bool = True, console: Optional[Any] = None
    ) -> None:
        self.total_rounds = total_rounds
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.console = console  # a rich Console to draw the live table on (tests pass one); default: on a terminal
        self.tty = console is not None or self.stream.isatty()
        self._live: Any = None
        self._last_key: tuple = ()
        self._start = time.monotonic()
        self._round_started: dict[int, float] = {}
        self._events = 0

    def update(self, snapshot: ProgressSnapshot, fl_metrics: dict[str, Any]) -> None:
        """Show ``snapshot`` (the coordinator's view of the run) with the latest federated metrics."""
        if not self.enabled:
            return
        events = snapshot.events[self._events :]
        self._events += len(events)
        for event in events:
            self._say(f"[lightning-fed] {event.line()}")
        self._round_started.setdefault(snapshot.round, time.monotonic())
        if self.tty:
            self._draw(snapshot, fl_metrics)
            return
        sites = snapshot.sites
        metrics = _fmt_metrics(fl_metrics)
        key = (snapshot.round, tuple(sorted((n, i.get("status"), i.get("epoch")) for n, i in sites.items())), metrics)
        if key != self._last_key:
            parts = [f"{name}: e{info.get('epoch', 0)} {info.get('status', '?')}" for name, info in sites.items()]
            sent = sum(sum(v.get("sent", [])) for v in snapshot.traffic.values())
            line = f"[lightning-fed] round {snapshot.round}/{self.total_rounds} | " + " | ".join(parts)
            line += f" | {format_bytes(sent)} sent" if sent else ""
            self.stream.write(f"{line}{f' | {metrics}' if metrics else ''}  ({time.monotonic() - self._start:.0f}s)\n")
            self.stream.flush()
            self._last_key = key

    def _say(self, line: str) -> None:
        if self._live is not None:
            self._live.console.print(line, markup=False, highlight=False)  # above the live table, kept on screen
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def eta(self, round_: int) -> Optional[float]:
        """Seconds left at the mean pace of the rounds finished so far (``None`` before the first one)."""
        if round_ <= 0 or round_ >= self.total_rounds:
            return None if round_ <= 0 else 0.0
        return (time.monotonic() - self._start) / round_ * (self.total_rounds - round_)

    def table(self, snapshot: ProgressSnapshot, fl_metrics: dict[str, Any]) -> Any:
        """The live view as a rich renderable."""
        from rich.table import Table

        round_ = snapshot.round
        elapsed = time.monotonic() - self._start
        eta = self.eta(round_)
        title = f"round {round_}/{self.total_rounds} · {elapsed:.0f} s" + (f" · about {eta:.0f} s left" if eta else "")
        table = Table(title=title, title_justify="left", expand=False, pad_edge=False)
        for column, justify in (
            ("site", "left"),
            ("epoch", "right"),
            ("step", "right"),
            ("status", "left"),
            ("loss", "right"),
            ("sent", "right"),
            ("received", "right"),
        ):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        traffic = snapshot.traffic
        for name, info in snapshot.sites.items():
            crossed = traffic.get(name, {})
            loss = next((v for k, v in (info.get("metrics") or {}).items() if "loss" in k and "train" in k), None)
            status = str(info.get("status", "?"))
            style = "red" if status in ("failed", "left out", "out") else ("green" if status == "done" else None)
            table.add_row(
                name,
                str(info.get("epoch", 0)),
                str(info.get("global_step", "")),
                status,
                f"{loss:.4f}" if isinstance(loss, float) else "",
                format_bytes(sum(crossed.get("sent", []))),
                format_bytes(sum(crossed.get("received", []))),
                style=style,
            )
        metrics = _fmt_metrics(fl_metrics)
        if metrics:
            table.caption, table.caption_justify = metrics, "left"
        return table

    def _draw(self, snapshot: ProgressSnapshot, fl_metrics: dict[str, Any]) -> None:
        if self._live is None:
            from rich.console import Console
            from rich.live import Live

            console = self.console or Console(file=self.stream)
            self._live = Live(console=console, auto_refresh=False, transient=False)
            self._live.start()
        self._live.update(self.table(snapshot, fl_metrics), refresh=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


CLASSIFICATION_COLUMNS = ("loss", "accuracy", "precision", "recall", "auroc")
SEGMENTATION_COLUMNS = ("loss", "dice", "entropy", "mutual_information")
SURVIVAL_COLUMNS = ("loss", "c_index")


def report_columns(rows: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """Metric columns for a results table: segmentation's when the sites measured Dice or uncertainty, survival's
    when the module logs a concordance index (a Cox model's; classification figures mean nothing for it)."""
    if any("dice" in r or "mutual_information" in r for r in rows.values()):
        return SEGMENTATION_COLUMNS
    if any("c_index" in r for r in rows.values()):
        return SURVIVAL_COLUMNS
    return CLASSIFICATION_COLUMNS


def results_cells(
    rows: dict[str, dict[str, Any]], columns: Optional[tuple[str, ...]] = None
) -> tuple[list[str], list[list[str]]]:
    """Header and cells of a results table: one row per site plus the federated row, one column per metric (by
    default :func:`report_columns`); a site without labels is marked ``(no labels)``."""
    columns = columns or report_columns(rows)
    header = ["site", *columns]
    body = []
    for name, values in rows.items():
        cells = [f"{name} (no labels)" if values.get("labels") == "hidden" else name]
        for col in columns:
            value = values.get(col)
            cells.append(f"{value:.4f}" if isinstance(value, float) else "-")
        body.append(cells)
    return header, body


def results_table(rows: dict[str, dict[str, Any]], columns: Optional[tuple[str, ...]] = None) -> str:
    """:func:`results_cells` as plain text."""
    return text_table(*results_cells(rows, columns))


def show_table(
    header: list[str], body: list[list[str]], title: Optional[str] = None, stream: Optional[TextIO] = None
) -> None:
    """Print a table: drawn with rich on a terminal, plain text (:func:`text_table`) when piped or logged."""
    stream = stream or sys.stdout
    if title and title.startswith("\n"):
        print(file=stream)
        title = title.lstrip("\n")
    if stream.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in body:
            table.add_row(*row)
        Console(file=stream).print(table)
        return
    if title:
        print(title, file=stream)
    print(text_table(header, body), file=stream)


def show_evaluation(evaluation: Evaluation) -> None:
    """``trainer.test``/``validate``'s results on the terminal: the model at every site and merged, then each site's
    own models (fine-tuned, ...), then the notes."""
    stage = evaluation.stage
    show_table(
        *results_cells(evaluation.rows()),
        title=f"\n{stage} results (each site on its own data; 'federated' merges every site's metric states):",
    )
    for kind, personal in evaluation.personal.items():
        show_table(
            *results_cells(personal.rows()),
            title=f"\n{stage} results, {kind.replace('_', '-')} models (each site's own model on its own data; "
            f"keys {kind}/...):",
        )
    for note in evaluation.notes:
        print(f"note: {note}")


def text_table(header: list[str], body: list[list[str]]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def per_label_table(
    rows: dict[str, dict[str, Any]], label_names: Optional[list[str]] = None, key: str = "auroc_per_label"
) -> Optional[str]:
    """Multi-label AUROC per label: one row per label, one column per site and the federated value.

    ``-`` marks a label without support there (no annotated positive and negative): left out of the macro mean.
    """
    columns = {name: values[key] for name, values in rows.items() if isinstance(values.get(key), list)}
    if not columns:
        return None
    count = max(len(v) for v in columns.values())
    names = list(label_names) if label_names and len(label_names) == count else [str(i) for i in range(count)]
    header = ["label", *columns]
    body = [
        [names[i], *(f"{v[i]:.4f}" if i < len(v) and v[i] is not None else "-" for v in columns.values())]
        for i in range(count)
    ]
    return text_table(header, body)
