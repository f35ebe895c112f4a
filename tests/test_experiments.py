"""`lightning-fed compare` / `sweep`: pooled, local and federated runs, every model tested on every site."""

import json
from pathlib import Path

import numpy as np
import pytest

from lightning_fed.errors import UsageError
from lightning_fed.experiments import compare, expand_grid, point_arguments, split_values, sweep
from lightning_fed.warm import warm_workers

HEART = [
    "--config",
    str(Path(__file__).resolve().parents[1] / "recipes" / "heart_disease.yaml"),
    "--trainer.logger=false",
    "--data.init_args.site_cpus=0.5",
]
HOSPITALS = ["cleveland", "hungary", "switzerland", "va"]


def test_grid_expansion_and_list_overrides():
    assert split_values("0.1, 2, [1,2], 'a,b', null") == [0.1, 2, [1, 2], "a,b", None]
    points = expand_grid(["a=1,2", "b=x,y,z"], ["c[0]=10,20", "d=p,q"])
    assert len(points) == 2 * 3 * 2
    assert points[0] == {"a": 1, "b": "x", "c[0]": 10, "d": "p"} and points[1] == {
        "a": 1,
        "b": "x",
        "c[0]": 20,
        "d": "q",
    }
    assert {(p["c[0]"], p["d"]) for p in points} == {(10, "p"), (20, "q")}  # zipped axes vary together
    assert {(p["a"], p["b"]) for p in points} == {(a, b) for a in (1, 2) for b in "xyz"}  # grid axes: the product
    base = {"data": {"init_args": {"positive_ratios": [0.5, 0.1, 0.1, 0.1, 0.1], "sizes": [30000, 3000]}}}
    args = point_arguments(
        {
            "data.init_args.positive_ratios[0]": 0.2,
            "data.init_args.positive_ratios[1:]": 0.05,
            "data.init_args.sizes[-2]": 6000,
            "trainer.max_epochs": 3,
        },
        base,
    )
    assert args == [
        "--data.init_args.positive_ratios=[0.2, 0.05, 0.05, 0.05, 0.05]",
        "--data.init_args.sizes=[6000, 3000]",
        "--trainer.max_epochs=3",
    ]
    assert base["data"]["init_args"]["positive_ratios"] == [0.5, 0.1, 0.1, 0.1, 0.1]  # the recipe itself is untouched
    with pytest.raises(ValueError, match="same number of values"):
        expand_grid([], ["a=1,2", "b=1"])
    with pytest.raises(ValueError, match="must look like KEY=V1,V2"):
        expand_grid(["max_epochs"])
    with pytest.raises(ValueError, match="given twice"):
        expand_grid(["a=1", "a=2"])
    with pytest.raises(ValueError, match="index out of range"):
        point_arguments({"data.init_args.sizes[5]": 1}, base)
    with pytest.raises(ValueError, match="no list at 'data.init_args.nope'"):
        point_arguments({"data.init_args.nope[0]": 1}, base)


@pytest.fixture(scope="module")
def heart_compare(tmp_path_factory, ray_cluster):
    out = tmp_path_factory.mktemp("compare")
    # the federated runs fine-tune at every hospital too: compare reports that model beside the others
    report = compare(
        [*HEART, "--trainer.max_epochs=2", "--trainer.strategy.init_args.fine_tune_epochs=1", "--repeats", "2"]
        + ["--out", str(out)]
    )
    return report, out


def test_compare_tests_every_model_on_every_site(heart_compare):
    from lightning_fed.data.heart_disease import HeartDiseaseSites

    report, out = heart_compare
    assert report["sites"] == HOSPITALS and report["seeds"] == [0, 1]
    assert report["models"] == ["pooled", "local", *[f"local:{h}" for h in HOSPITALS], "federated", "fine-tuned"]
    runs = report["runs"]
    assert [(r["repeat"], r["mode"]) for r in runs] == [
        (0, "pooled"),
        (0, "local"),
        (0, "federated"),
        (1, "pooled"),
        (1, "local"),
        (1, "federated"),
    ]
    for run in runs:
        # repetition r splits the data with seed 0 + r: every model is tested on exactly that split's test patients
        tests = {h: len(p["test"]) for h, p in HeartDiseaseSites(seed=run["repeat"]).site_indices().items()}
        for model, rows in run["evaluations"].items():
            assert set(rows) == {*HOSPITALS, "federated"}
            for hospital in HOSPITALS:
                assert int(np.sum(rows[hospital]["confusion_matrix"])) == tests[hospital], (model, hospital)
            # the merged column is every site's test data together: its confusion matrix is the sum of theirs
            assert (
                rows["federated"]["confusion_matrix"]
                == np.sum([rows[h]["confusion_matrix"] for h in HOSPITALS], axis=0).tolist()
            )
        if run["mode"] == "local":
            for hospital in HOSPITALS:  # the "local" row is each hospital's own model on its own data
                assert run["evaluations"]["local"][hospital] == run["evaluations"][f"local:{hospital}"][hospital]
            # four different models: the same test data gives different results
            assert (
                len({json.dumps(run["evaluations"][f"local:{h}"]["cleveland"]["confusion_matrix"]) for h in HOSPITALS})
                > 1
            )
    summary = report["summary"]
    for model in report["models"]:
        for column in [*HOSPITALS, "federated"]:
            stats = summary[model][column]["accuracy"]
            values = [r["evaluations"][model][column]["accuracy"] for r in runs if model in r["evaluations"]]
            assert stats["n"] == 2 and stats["values"] == values
            assert stats["mean"] == pytest.approx(np.mean(values)) and stats["std"] == pytest.approx(
                np.std(values, ddof=1)
            )
    md = (out / "results.md").read_text()
    for metric in ("accuracy", "precision", "recall", "auroc"):
        table = md.split(f"### {metric}\n\n")[1].split("\n\n")[0].splitlines()
        assert len(table) == 2 + len(report["models"]) and table[0].count("|") == 2 + len(HOSPITALS) + 1
        assert (out / f"{metric}.png").stat().st_size > 5000
    assert "cleveland only" in md and "±" in md and (out / "confusion_matrices.png").is_file()
    traffic = report["traffic"]  # the federated runs' bytes per site and round, over repetitions
    assert (
        traffic["sent"]["n"] == 2
        and traffic["update"]["mean"] < traffic["sent"]["mean"] < 10 * traffic["received"]["mean"]
    )
    assert "### communication (federated, per site and round)" in md
    assert json.loads((out / "results.json").read_text())["summary"] == json.loads(json.dumps(summary))
    startup = report["startup"]
    # 6 runs, 26 workers in all (each pooled fit one, and 4 for every 4-site federation). The session's idle workers
    # serve it (compare shares the enclosing warm_workers pool); at most the first run starts processes: its fit one,
    # and its 4-site test the ones the pool lacks. Every later run is warm
    assert startup["worker_processes_started"] + startup["worker_processes_reused"] == 2 * (1 + 4 + 4 + 4)
    assert startup["worker_processes_started"] <= 1 + 3 and startup["warm_runs"] >= 5


def test_pooled_site_trains_on_the_union_of_the_sites(fed_data):
    from lightning_fed.data.heart_disease import HeartDiseaseSites
    from lightning_fed.data.pooled import PooledSites

    sites = HeartDiseaseSites().federated_sites()
    (pooled,) = PooledSites(sites).federated_sites()
    assert pooled.name == "pooled" and pooled.num_cpus == 1.0
    data = pooled.build_datamodule()
    data.setup("fit")
    parts = []
    for site in sites:
        dm = site.build_datamodule()
        dm.setup("fit")
        parts.append(dm.datasets["train"])
    assert len(data.train_dataloader().dataset) == sum(len(p) for p in parts)
    x = np.concatenate([p.tensors[0].numpy() for p in parts])
    pooled_x = np.concatenate([data.train_dataloader().dataset[i][0].numpy()[None] for i in range(len(x))])
    assert np.array_equal(pooled_x, x)  # each site's own preprocessing kept, in site order
    pinned = [type(sites[0])(name="a", datamodule=sites[0].datamodule, resources={"site:a": 1})]
    with pytest.raises(ValueError, match="pinned to their own nodes"):
        PooledSites(pinned)


def test_sweep_reuses_warm_sites_and_gives_the_same_result_as_a_fresh_start(tmp_path, ray_cluster, fed_data):
    out = tmp_path / "sweep"
    # the four hospitals packed two to a worker: two fresh processes to start, not four (each imports Lightning)
    packed = [*HEART, "--trainer.strategy.init_args.sites_per_worker=2", "--trainer.max_epochs=1"]
    with warm_workers(enabled=False):  # not the session's warm workers: the sweep's first run starts fresh ones
        report = sweep([*packed, "--grid", "model.init_args.lr=0.003,0.03,0.003", "--out", str(out)])
    runs = report["runs"]
    assert [r["point"] for r in runs] == [{"model.init_args.lr": v} for v in (0.003, 0.03, 0.003)]
    assert [r["warm"] for r in runs] == [False, True, True]
    assert report["startup"]["worker_processes_started"] == 2 and report["startup"]["worker_processes_reused"] == 4
    # a warm site is reset from its new plan: the third run (warm, after a different run) equals the first (fresh)
    assert runs[2]["evaluations"] == runs[0]["evaluations"]
    assert runs[1]["evaluations"] != runs[0]["evaluations"]
    assert len(report["rows"]) == 3 and all(r["model"] == "federated" for r in report["rows"])
    md = (out / "results.md").read_text()
    assert md.count("| federated |") == 3 and "an estimated" in md and report["startup"]["estimated_saving_seconds"] > 0
    assert all((out / f"{m}.png").is_file() for m in ("accuracy", "precision", "recall", "auroc"))


def test_sweep_over_compression_plots_accuracy_against_bytes(tmp_path, ray_cluster, fed_data):
    from lightning_fed.warm import current_pool

    out = tmp_path / "codecs"
    session = current_pool()  # the session's warm workers: the sweep shares the block it is called in
    uses = session.started + session.reused
    report = sweep(
        [
            *HEART,
            "--trainer.max_epochs=1",
            "--grid",
            "trainer.strategy.init_args.compression=null,fp16,int8",
            "--out",
            str(out),
        ]
    )
    update = {
        json.dumps(r["point"]["trainer.strategy.init_args.compression"]): r["traffic"]["update"]["mean"]
        for r in report["rows"]
    }
    assert update["null"] > update['"fp16"'] > update['"int8"']
    assert update['"int8"'] < 0.6 * update["null"]  # the model is small: pickling overhead keeps int8 above a quarter
    assert session.started + session.reused == uses + 3 * len(HOSPITALS)  # one worker per hospital, 3 points
    startup = report["startup"]
    assert startup["worker_processes_started"] + startup["worker_processes_reused"] == 3 * len(HOSPITALS)
    assert (out / "accuracy_vs_bytes.png").stat().st_size > 5000
    assert "MB sent / site / round" in (out / "results.md").read_text()


def test_compare_and_sweep_refuse_bad_input_in_one_line(tmp_path, capsys):
    with pytest.raises(UsageError, match="unknown mode\\(s\\) \\['siloed'\\]"):
        compare([*HEART, "--modes", "pooled,siloed", "--out", str(tmp_path)])
    with pytest.raises(UsageError, match="needs at least one --grid"):
        sweep([*HEART, "--out", str(tmp_path)])
    with pytest.raises(UsageError, match="no list at 'data.init_args.sizes'"):
        sweep([*HEART, "--grid", "data.init_args.sizes[0]=1,2", "--out", str(tmp_path)])
    with pytest.raises(UsageError, match="--x 'lr' is not a grid key"):
        sweep([*HEART, "--grid", "model.init_args.lr=0.1,0.2", "--x", "lr", "--out", str(tmp_path)])


def test_compare_results_go_to_one_wandb_run(heart_compare, tmp_path):
    from lightning_fed.experiments import log_to_wandb
    from tests.test_cli import _wandb_records

    report, out = heart_compare
    table = {
        "accuracy": (
            ["model", "cleveland"],
            [[m, report["summary"][m]["cleveland"]["accuracy"]["mean"]] for m in report["models"]],
        )
    }
    settings = {"project": "lightning-fed-test", "save_dir": str(tmp_path), "name": "heart", "offline": True}
    log_to_wandb(settings, "compare", table, [out / "accuracy.png"], {"command": report["command"]})
    import wandb

    wandb.teardown()
    (path,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    info, keys, files = None, set(), set()
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info = (record.run.display_name, record.run.run_group, record.run.job_type)
        elif kind == "history":
            keys |= {item.key or item.nested_key[0] for item in record.history.item}
        elif kind == "files":
            files |= {f.path for f in record.files.files}
    assert info == ("heart-compare", "heart-compare", "compare")
    assert {"accuracy", "plots"} <= keys
    assert any(f.endswith(".table.json") for f in files) and any(f.endswith(".png") for f in files)
