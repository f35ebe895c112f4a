"""``lightning-fed compare`` and ``lightning-fed sweep``: does the federated model beat each site alone, and how
close does it come to pooling all data?

``compare`` trains the recipe's model and data under each mode and tests every model on every site's own test set:

- ``pooled``: one run on the union of the sites' training data (the centralised reference; simulation only);
- ``local``: every site trains alone (the ``local`` rule: nothing exchanged); each site's model is tested on
  every site, so "site X's model on site Y's data" is in the results, and the ``local`` row is each site's own
  model on its own data;
- ``federated``: the recipe as written.

``--holdout SITE`` trains every mode without that site and tests every model on its test data too: how the models
do at a hospital they never saw (``--holdout A,B,...`` holds each out in turn: leave-one-site-out).

Repetitions change the seed (``seed_everything`` and, unless ``--fixed-data``, the data split seed) and report
mean ± std. ``sweep`` runs a grid of recipe overrides (× modes × repetitions) and reports one table and one line plot
per metric. Both keep the workers of one layout warm between runs (:class:`~lightning_fed.federation.WorkerPool`)
and report what that saved.

One job per module, each depending only on those before it:

- :mod:`~lightning_fed.experiments.grid`: ``--grid``/``--zip`` axes, points and their recipe overrides;
- :mod:`~lightning_fed.experiments.wandb_log`: results to Weights & Biases;
- :mod:`~lightning_fed.experiments.runs`: :class:`Experiment` trains and tests, one :class:`Run` per mode;
- :mod:`~lightning_fed.experiments.summaries`: mean ± std over repetitions, tables, names;
- :mod:`~lightning_fed.experiments.plots`: the figures;
- :mod:`~lightning_fed.experiments.reports`: the typed reports in results.json (:class:`CompareReport`,
  :class:`SweepReport`, :class:`LeaveOneOutReport`), written and read;
- :mod:`~lightning_fed.experiments.outputs`: an output folder's results.md, results.json and figures; :func:`replot`;
- :mod:`~lightning_fed.experiments.commands`: the commands and their flags (:data:`COMMANDS`).
"""

from lightning_fed.experiments.commands import COMMANDS, compare, main, replot_command, sweep
from lightning_fed.experiments.grid import expand_grid, parse_axis, point_arguments, point_label, split_values
from lightning_fed.experiments.outputs import replot, write_compare, write_leave_one_out, write_sweep
from lightning_fed.experiments.plots import (
    bytes_plots,
    confusion_plot,
    dot_plots,
    fitted_limits,
    heat_maps,
    line_plots,
    model_site_matrix,
)
from lightning_fed.experiments.reports import (
    CompareReport,
    LeaveOneOutReport,
    Report,
    SweepReport,
    legacy_kind,
    read_report,
    write_report,
)
from lightning_fed.experiments.runs import MERGED, METRICS, MODES, SEGMENTATION_METRICS, Experiment, Run
from lightning_fed.experiments.summaries import Stats, markdown_tables, model_order, summarize
from lightning_fed.experiments.wandb_log import log_to_wandb

__all__ = [
    "COMMANDS",
    "MERGED",
    "METRICS",
    "MODES",
    "SEGMENTATION_METRICS",
    "CompareReport",
    "Experiment",
    "LeaveOneOutReport",
    "Report",
    "Run",
    "Stats",
    "SweepReport",
    "bytes_plots",
    "compare",
    "confusion_plot",
    "dot_plots",
    "expand_grid",
    "fitted_limits",
    "heat_maps",
    "legacy_kind",
    "line_plots",
    "log_to_wandb",
    "main",
    "markdown_tables",
    "model_order",
    "model_site_matrix",
    "parse_axis",
    "point_arguments",
    "point_label",
    "read_report",
    "replot",
    "replot_command",
    "split_values",
    "summarize",
    "sweep",
    "write_compare",
    "write_leave_one_out",
    "write_report",
    "write_sweep",
]
