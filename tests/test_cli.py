"""The recipe CLI and W&B logging, run as a user would run them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_fed import FederatedStrategy
from lightning_fed.models import SmallCNN
from tests.helpers import small_hospitals

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "--data.site_names=[large,small_1,small_2]",
    "--data.sizes=[400,200,200]",
    "--data.positive_ratios=[0.5,0.1,0.1]",
    "--results.mean_over=[small_1,small_2]",
]


def _cli(args, cwd, ray_cluster):
    from lightning_fed.warm import current_pool

    pool = current_pool()
    if pool is not None:  # the command is another process on this cluster: idle workers holding CPUs make room
        pool.make_room([{"CPU": ray_cluster.cluster_resources()["CPU"]}])
    env = dict(os.environ)
    # join the session's Ray as `ray job submit` would (RAY_ADDRESS), instead of starting a second one
    env["RAY_ADDRESS"] = ray_cluster.get_runtime_context().gcs_address
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "lightning_fed.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.usefixtures("fed_data")
def test_cli_fit_writes_results_json(tmp_path, ray_cluster):
    recipe = REPO / "recipes" / "hospitals.yaml"
    private = '--trainer.strategy.init_args.privacy={"small_1": {"target_epsilon": 1.0}}'  # DP-SGD from a recipe
    one_worker = "--trainer.strategy.init_args.workers=1"  # the command's own process: one worker to start, not two
    proc = _cli(
        ["fit", "--config", str(recipe), "--trainer.max_epochs=1", *SMALL, private, one_worker], tmp_path, ray_cluster
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = [line for line in proc.stdout.splitlines() if line.startswith("results written to ")]
    assert printed, proc.stdout[-2000:]
    results_path = tmp_path / printed[-1].removeprefix("results written to ").strip()
    results = json.loads(results_path.read_text())
    assert set(results["test"]["sites"]) == {"large", "small_1", "small_2"}
    for site in results["test"]["sites"].values():
        assert {"recall", "precision", "auroc", "accuracy", "confusion_matrix"} <= set(site)
    mean = results["test"]["mean_over_sites"]
    assert mean["sites"] == ["small_1", "small_2"]
    assert mean["recall"] == pytest.approx(
        (results["test"]["sites"]["small_1"]["recall"] + results["test"]["sites"]["small_2"]["recall"]) / 2
    )
    assert 0.5 < results["test"]["federated"]["auroc"] <= 1.0
    assert results["config"]["trainer"]["max_epochs"] == 1
    assert results["wall_seconds"] > 0 and len(results["round_seconds"]) == 1
    assert "small_1" in proc.stdout and "federated" in proc.stdout  # the per-site table was printed
    assert set(results["privacy"]["sites"]) == {"small_1"} and 0.9 < results["privacy"]["max_epsilon"] <= 1.0
    assert "DP-SGD, from each site's accountant: small_1" in proc.stdout
    traffic = results["traffic"]  # what crossed, per site and round (1 round here), and the totals
    assert set(traffic["sites"]) == {"large", "small_1", "small_2"}
    for site in traffic["sites"].values():
        assert len(site["bytes_sent"]) == len(site["bytes_received"]) == 1
        assert 0 < site["update_bytes_sent"][0] < site["bytes_sent"][0] == site["total_sent"]
    assert traffic["bytes_sent"] == sum(s["total_sent"] for s in traffic["sites"].values())
    assert "traffic:" in proc.stdout and "sent to the coordinator" in proc.stdout


def _main(args, monkeypatch, capsys):
    """The command in this process (what ``lightning-fed ARGS`` runs): exit status, stdout, stderr."""
    from lightning_fed.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-fed"])
    try:
        main(list(args))
        code = 0
    except SystemExit as done:
        code = done.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_print_config_and_bad_recipe(tmp_path, monkeypatch, capsys):
    recipe = REPO / "recipes" / "hospitals.yaml"
    code, out, _ = _main(["fit", "--config", str(recipe), "--print_config"], monkeypatch, capsys)
    assert code == 0 and "aggregator: fedavg" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("aggregator: fedavg", "aggregator: fedavgg"))
    code, _, err = _main(["fit", "--config", str(bad)], monkeypatch, capsys)
    assert code != 0
    assert "unknown aggregator 'fedavgg'" in err


def _wandb_records(path):
    """Records of an offline ``.wandb`` file (LevelDB log format: 32 KiB blocks of CRC/length/type-framed chunks)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf + chunk if kind == 4 else chunk)
            buf = b""
            yield record
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk


def test_wandb_group_is_set_when_lightning_cli_passes_none(tmp_path):
    from lightning_fed.loggers import wandb_site_kwargs

    # LightningCLI instantiates WandbLogger with every argument, unset ones as None
    logger = WandbLogger(
        save_dir=str(tmp_path), project="p", name="hosp", offline=True, group=None, job_type=None, tags=None
    )
    site = wandb_site_kwargs(logger)
    assert logger._wandb_init["group"] == "hosp" and logger._wandb_init["job_type"] == "federated"
    assert site["group"] == "hosp" and site["run_name"] == "hosp" and site["offline"] is True and "tags" not in site
    chosen = WandbLogger(save_dir=str(tmp_path), name="x", offline=True, group="study-b", job_type="global")
    wandb_site_kwargs(chosen)
    assert chosen._wandb_init["group"] == "study-b" and chosen._wandb_init["job_type"] == "global"


@pytest.mark.usefixtures("fed_data")
def test_wandb_offline_run_per_site_plus_global(tmp_path, ray_cluster):
    torch.manual_seed(0)
    logger = WandbLogger(save_dir=str(tmp_path), project="lightning-fed-test", name="hosp", offline=True)
    strategy = FederatedStrategy(progress=False, checkpoint_every=0)
    trainer = L.Trainer(strategy=strategy, max_epochs=2, logger=logger, enable_checkpointing=False)
    trainer.fit(SmallCNN(), datamodule=small_hospitals())
    strategy.shutdown()  # finishes every site's run inside its actor
    logger.experiment.finish()
    import wandb

    wandb.teardown()  # the driver's global run is the user's to finish; the test flushes it
    runs = {}
    for path in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb"):
        info, keys, steps, exited = None, set(), 0, False
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                info = (record.run.display_name, record.run.run_group, record.run.job_type)
            elif kind == "history":
                steps += 1
                keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
            elif kind == "exit":
                exited = True
        assert info is not None, (
            path,
            path.stat().st_size,
            [r.WhichOneof("record_type") for r in _wandb_records(path)],
        )
        runs[info[0]] = {"group": info[1], "job": info[2], "keys": keys, "steps": steps, "exited": exited}
    assert sorted(runs) == ["hosp", "hosp-large", "hosp-small_1", "hosp-small_2"]
    assert {r["group"] for r in runs.values()} == {"hosp"}  # one experiment, grouped
    assert (
        runs["hosp"]["job"] == "federated"
        and {"fl/val_auroc", "fl/val_recall", "site/small_1/val_auroc"} <= runs["hosp"]["keys"]
    )
    for site in ("large", "small_1", "small_2"):
        run = runs[f"hosp-{site}"]
        assert run["job"] == "site" and run["exited"], site  # finished inside its actor
        assert {"train_loss", "val_loss", f"site/{site}/val_auroc", f"site/{site}/val_recall"} <= run["keys"]
        assert run["steps"] >= 2  # one validation per epoch


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_recipe_parses(recipe, monkeypatch, capsys):
    code, out, err = _main(["fit", "--config", str(REPO / "recipes" / recipe), "--print_config"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    assert "class_path: lightning_fed.FederatedStrategy" in out
