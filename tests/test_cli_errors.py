"""Every error a user can cause through the command ends in one line, `lightning-fed: error: <what> (<fix>)`, and a
non-zero exit: recipes, flags, data, checkpoints, a failed site."""

import json
import sys
from pathlib import Path

import pytest

from lightning_fed.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "hospitals.yaml")
HEART = str(REPO / "recipes" / "heart_disease.yaml")
BASE = ["fit", "--config", RECIPE, "--trainer.logger=false"]
STRATEGY = "--trainer.strategy.init_args."


def _broken_checkpoint(tmp: Path) -> str:
    folder = tmp / "ckpt" / "round-0002"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(
        json.dumps({"format": 2, "round": 2, "sites": {"large": "site-large.ckpt"}, "server": "server.pkl"})
    )
    (tmp / "ckpt" / "last.json").write_text(json.dumps({"round": 2, "path": "round-0002"}))
    return str(tmp / "ckpt")


def _bad_yaml(tmp: Path) -> str:
    path = tmp / "broken.yaml"
    path.write_text(Path(RECIPE).read_text().replace("  max_epochs: 10", "  max_epochs: [10"))
    return str(path)


def _plain_folder(tmp: Path) -> str:
    (tmp / "plain").mkdir()
    return str(tmp / "plain")


# (id, arguments (a callable gets the test's folder), what the line must say, exit status)
CASES = [
    ("unknown aggregator", BASE + [STRATEGY + "aggregator=nope"], "unknown aggregator 'nope': choose one of", 2),
    ("negative mu", BASE + [STRATEGY + "aggregator=fedprox", STRATEGY + "aggregator_kwargs={mu: -1}"], "mu", 2),
    ("sync_every 0", BASE + [STRATEGY + "sync_every=0"], "sync_every", 2),
    (
        "unknown failure policy",
        BASE + [STRATEGY + "on_site_failure=retry"],
        "on_site_failure must be 'abort' or 'continue'",
        2,
    ),
    (
        "min_sites when aborting",
        BASE + [STRATEGY + "min_sites=2"],
        "min_sites applies only with on_site_failure='continue'",
        2,
    ),
    (
        "compression under secagg",
        BASE + [STRATEGY + "compression=int8", STRATEGY + "secagg=true"],
        "compression cannot go with secure aggregation",
        2,
    ),
    (
        "unknown codec",
        BASE + [STRATEGY + "compression=zip"],
        "unknown compression 'zip': choose one of fp16, int8, topk",
        2,
    ),
    (
        "scaffold under secagg",
        BASE + [STRATEGY + "aggregator=scaffold", STRATEGY + "secagg=true"],
        "cannot run under secure aggregation",
        2,
    ),
    (
        "dp_fedavg around median",
        BASE + [STRATEGY + "aggregator=dp_fedavg", STRATEGY + "aggregator_kwargs={inner: median}"],
        "dp_fedavg cannot wrap median",
        2,
    ),
    ("norm ratio below 1", BASE + [STRATEGY + "max_update_norm_ratio=0.5"], "max_update_norm_ratio must be >= 1", 2),
    ("negative barrier timeout", BASE + [STRATEGY + "barrier_timeout=-1"], "barrier_timeout must be > 0", 2),
    ("zero round timeout", BASE + [STRATEGY + "round_timeout=0"], "round_timeout must be > 0", 2),
    ("class balance", BASE + [STRATEGY + "class_balance=weird"], "class_balance must be 'loss', 'sampler' or None", 2),
    ("no workers", BASE + [STRATEGY + "workers=0"], "placement.workers", 2),
    ("sync_every beyond max_epochs", BASE + [STRATEGY + "sync_every=50", "--trainer.max_epochs=3"], "sync_every=50", 2),
    ("test fraction", BASE + ["--data.init_args.test_fraction=1.5"], "test_fraction", 2),
    ("sizes vs names", BASE + ["--data.init_args.sizes=[10,20]"], "sizes", 2),
    ("positive ratio", BASE + ["--data.init_args.positive_ratios=[2,0.1,0.1,0.1,0.1]"], "positive_ratios", 2),
    ("unknown trainer key", BASE + ["--trainer.nonsense=1"], "nonsense", 2),
    ("unknown flag", BASE + ["--bogus=1"], "bogus", 2),
    ("wrong type", BASE + ["--trainer.max_epochs=ten"], "max_epochs", 2),
    ("missing recipe", ["fit", "--config", "/nonexistent/recipe.yaml"], "recipe.yaml", 2),
    ("broken yaml", lambda tmp: ["fit", "--config", _bad_yaml(tmp), "--trainer.logger=false"], "", 2),
    ("unknown model class", BASE + ["--model=nowhere.Model"], "nowhere.Model", 2),
    (
        "unknown site in mean_over",
        BASE + ["--results.mean_over=[nowhere]"],
        "results.mean_over names unknown sites ['nowhere']",
        2,
    ),
    (
        "plain folder as checkpoint",
        lambda tmp: BASE + [f"--ckpt_path={_plain_folder(tmp)}"],
        "must be a federated checkpoint folder",
        2,
    ),
    ("last without a checkpoint_dir", BASE + ["--ckpt_path=last"], "needs FederatedStrategy(checkpoint_dir=...)", 2),
    ("broken checkpoint", lambda tmp: BASE + [f"--ckpt_path={_broken_checkpoint(tmp)}"], "is missing parts", 2),
    (
        "compare: unknown mode",
        ["compare", "--config", HEART, "--modes", "pooled,siloed"],
        "unknown mode(s) ['siloed']",
        2,
    ),
    ("compare: unknown metric", ["compare", "--config", HEART, "--metrics", "kappa"], "unknown metric(s) ['kappa']", 2),
    ("sweep: no grid", ["sweep", "--config", HEART], "sweep needs at least one --grid", 2),
    ("sweep: grid without values", ["sweep", "--config", HEART, "--grid", "model.init_args.lr"], "lr", 2),
    ("compare: repeats not a number", ["compare", "--config", HEART, "--repeats", "two"], "--repeats", 2),
]


@pytest.mark.usefixtures("fed_data")
@pytest.mark.parametrize("argv, says, status", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_recipe_flag_or_checkpoint_ends_in_one_line(
    argv, says, status, tmp_path, capsys, monkeypatch, ray_cluster
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-fed"])  # as the command sees it
    argv = argv(tmp_path) if callable(argv) else argv
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert info.value.code == status, err
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("lightning-fed: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert says in errors[0], errors[0]
    # what to do about it is on the line too
    assert "(" in errors[0] or ": " in errors[0].removeprefix("lightning-fed: error: "), errors[0]


@pytest.mark.usefixtures("fed_data")
def test_missing_data_and_a_failed_site_end_in_one_line_naming_the_checkpoint(
    tmp_path, capsys, monkeypatch, ray_cluster
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-fed"])
    small = [
        "--data.init_args.site_names=[large,small_1]",
        "--data.init_args.sizes=[200,100]",
        "--data.init_args.positive_ratios=[0.5,0.1]",
        "--results.mean_over=null",
        "--trainer.max_epochs=1",
    ]
    with pytest.raises(SystemExit) as info:
        main(BASE + small + [f"--data.init_args.data_dir={tmp_path / 'no_scans_here'}"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and line.startswith("lightning-fed: error: FashionMNIST files"), line
    assert "are missing in" in line and "no_scans_here" in line and "download them from" in line
    # a site whose data source fails in its third epoch: the run stops and says where to resume from
    recipe = tmp_path / "failing.yaml"
    recipe.write_text(
        Path(RECIPE).read_text().split("model:")[0].replace("max_epochs: 10", "max_epochs: 4")
        + (
            "model:\n  class_path: tests.helpers.NoisyCNN\n"
            "data:\n  class_path: tests.helpers.HospitalsWithFailingSite\n  init_args:\n    fail_at_access: 270\n"
            "results:\n  test_after_fit: true\n"
        )
    )
    with pytest.raises(SystemExit) as info:
        main(
            ["fit", "--config", str(recipe), "--trainer.logger=false", f"{STRATEGY}checkpoint_dir={tmp_path / 'ckpt'}"]
        )
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert info.value.code == 1 and "Traceback" not in err, err
    assert line.startswith("lightning-fed: error: site 'bad' failed") and "scanner offline at hospital bad" in line, (
        line
    )
    assert f"with --ckpt_path={tmp_path / 'ckpt'})" in line and "resume from round " in line, line
    # --traceback shows the trace instead
    with pytest.raises(Exception, match="unknown aggregator"):
        main(BASE + [STRATEGY + "aggregator=nope", "--traceback"])
