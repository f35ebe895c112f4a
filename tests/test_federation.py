"""Real federations on real Ray with real FashionMNIST subsets."""

import json
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_fed import Dirichlet, FederatedStrategy, FederationConfigError, SiteFailedError
from lightning_fed.models import SmallCNN
from tests.helpers import (
    HospitalsWithFailingSite,
    PlainFashionMNIST,
    UnmodifiedMLP,
    assert_sites_hold,
    small_hospitals,
    unmounted_scans,
)

pytestmark = pytest.mark.usefixtures("ray_cluster", "fed_data")


def _trainer(tmp_path, strategy, **kw):
    kw.setdefault("max_epochs", 2)
    kw.setdefault("logger", CSVLogger(tmp_path, name="run"))
    return L.Trainer(strategy=strategy, enable_checkpointing=False, default_root_dir=tmp_path, **kw)


def _our_actors_alive():
    """Live workers and coordinators, but those idle in the session's warm pool (kept alive by design, for the next
    federation, with the last run's coordinator process): what a run that ended would leak."""
    # GCS's own table (the state API would need the dashboard, which tests do not start)
    from ray._private.state import actors

    from lightning_fed.warm import current_pool

    pool = current_pool()
    kept = [*pool.idle_workers(), *pool.coordinators.idle()] if pool is not None else []
    idle = {actor._actor_id.hex() for actor in kept}
    ours = ("Worker", "CoordinatorProcess")
    return [
        a
        for a in actors().values()
        if a["State"] != "DEAD" and a["ActorClassName"] in ours and a["ActorID"] not in idle
    ]


def _none_alive_within(seconds: float) -> bool:
    """Whether every actor a run started is gone (or idle in the pool) within ``seconds``: ``ray.kill`` returns
    before the cluster's table says so."""
    deadline = time.monotonic() + seconds
    while _our_actors_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _our_actors_alive()


def test_three_sites_end_identical_and_equal_to_driver(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = FederatedStrategy(aggregator="fedavg", sync_every=1, progress=False)
    trainer = _trainer(tmp_path, strategy)
    trainer.fit(model, datamodule=small_hospitals())
    try:
        weights = strategy.federation.site_weights()
        assert list(weights) == ["large", "small_1", "small_2"]
        assert_sites_hold(model, weights)
        assert any(not torch.equal(initial[k], model.state_dict()[k]) for k in initial)  # it trained
        # the driver's trainer looks like it trained itself
        assert trainer.state.finished and trainer.state.fn == "fit"
        assert trainer.current_epoch == 2
        large_batches = 240 // 50 + 1  # 400 images * 0.6 train = 240 -> 5 batches of 50
        assert trainer.global_step == 2 * large_batches
        metrics = trainer.callback_metrics
        for key in ("fl/val_loss", "fl/val_auroc", "fl/val_recall", "fl/val_precision", "site/small_1/val_auroc"):
            assert key in metrics, key
        assert 0.5 < float(metrics["fl/val_auroc"]) <= 1.0
        # the federation's rounds were committed as checkpoints
        ckpt_root = Path(trainer.log_dir) / "federated_checkpoints"
        assert json.loads((ckpt_root / "last.json").read_text())["round"] == 2
    finally:
        strategy.shutdown()
    assert _none_alive_within(10)


def test_sync_every_k_epochs_with_a_final_partial_round(tmp_path):
    torch.manual_seed(0)
    strategy = FederatedStrategy(sync_every=2, progress=False, checkpoint_every=0)
    trainer = _trainer(tmp_path, strategy, max_epochs=3, logger=False)
    model = SmallCNN()
    trainer.fit(model, datamodule=small_hospitals(val_fraction=0.0))
    try:
        # epochs 1-2 are round 1; epoch 3 alone is round 2, handed over when training ends
        assert len(strategy.last_fit.round_seconds) == 2
        assert all(len(s) == 2 for s in strategy.last_fit.sync_seconds.values())
        assert_sites_hold(model, strategy.federation.site_weights())
    finally:
        strategy.shutdown()


def test_unmodified_module_via_string_flag_simulates_sites(tmp_path):
    torch.manual_seed(0)
    model, dm = UnmodifiedMLP(), PlainFashionMNIST(n=600)
    trainer = _trainer(tmp_path, "fedavg", max_epochs=2)
    assert isinstance(trainer.strategy, FederatedStrategy) and trainer.strategy.config.simulation.num_sites == 2
    trainer.fit(model, datamodule=dm)
    strategy = trainer.strategy
    try:
        # IID simulation: two sites with 300 training images each (6 batches of 50 per epoch)
        assert trainer.global_step == 2 * 6
        assert {"fl/val_loss", "fl/val_accuracy", "fl/val_auroc"} <= set(trainer.callback_metrics)
        out = trainer.test(model, datamodule=dm, verbose=False)[0]
        assert {
            "fl/test_loss",
            "fl/test_accuracy",
            "fl/test_auroc",
            "site/site_0/test_auroc",
            "site/site_1/test_recall",
        } <= set(out)
        # the module's own key, as a plain fit returns it, holds the federated value (every site's test data)
        assert out["test_loss"] == out["fl/test_loss"] and out["test_loss"] != out["site/site_0/test_loss"]
        assert trainer.callback_metrics["val_loss"] == pytest.approx(trainer.callback_metrics["fl/val_loss"])
        assert out["fl/test_accuracy"] > 0.5  # 10 classes: chance is 0.1
        # federated accuracy over both halves is the sample-weighted mean of the sites' (100 + 100 test images)
        site_acc = [out[f"site/site_{i}/test_accuracy"] for i in range(2)]
        assert out["fl/test_accuracy"] == pytest.approx(np.mean(site_acc), abs=1e-6)
        cm = strategy.last_evaluation.confusion_matrices["federated"]
        assert np.array(cm).shape == (10, 10) and np.array(cm).sum() == 200
        # validate runs inside the same site actors, on each site's share of the validation split
        val = trainer.validate(model, datamodule=dm, verbose=False)[0]
        assert val["fl/val_loss"] == pytest.approx(
            np.mean([val["site/site_0/val_loss"], val["site/site_1/val_loss"]]), rel=1e-5
        )
        assert val["fl/val_accuracy"] == pytest.approx(
            out["fl/test_accuracy"]
        )  # this module's val and test data coincide
        # the module's StepLR(gamma=0.5) lived through both rounds on every site: lr 0.05 -> 0.0125
        ckpt = torch.load(
            Path(trainer.log_dir) / "federated_checkpoints" / "round-0002" / "site-site_1.ckpt",
            map_location="cpu",
            weights_only=False,
        )
        assert ckpt["lr_schedulers"][0]["last_epoch"] == 2
        assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0125)
    finally:
        strategy.shutdown()


def test_three_fits_in_one_process_as_in_a_notebook(tmp_path):
    # nothing shut down in between: each new federation releases the previous one's workers
    strategies, first_weights = [], None
    for run in range(3):
        torch.manual_seed(0)
        model = UnmodifiedMLP()
        trainer = _trainer(
            tmp_path / str(run),
            FederatedStrategy(num_sites=2, progress=False, checkpoint_every=0, seed=0),
            max_epochs=1,
            logger=False,
        )
        trainer.fit(model, datamodule=PlainFashionMNIST(n=200))  # before: "the cluster could not place the sites"
        assert trainer.global_step == 2 and "val_loss" in trainer.callback_metrics
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        first_weights = weights if first_weights is None else first_weights
        assert torch.equal(weights, first_weights)  # same seed, same result: nothing carried over between fits
        strategies.append(trainer.strategy)
    assert len([a for a in _our_actors_alive() if a["ActorClassName"] == "Worker"]) <= 2
    # the last fit's federation is still live (trainer.test would reuse it); the earlier ones were let go
    assert [s.federation is not None and s.federation.alive for s in strategies] == [False, False, True]
    strategies[-1].shutdown()


def test_sites_console_output_goes_to_their_log_files(tmp_path, capfd):
    class Chatty(UnmodifiedMLP):
        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                print(f"chatty step at epoch {self.current_epoch}")  # a user's print, on a site
            return super().training_step(batch, batch_idx)

    # two runs into two folders: the second reuses the first one's warm worker, and its sites' output must follow
    # the new run (not the files of the earlier sites of the same names)
    for run in ("first", "second"):
        strategy = FederatedStrategy(num_sites=2, progress=True, checkpoint_every=0, sites_per_worker=2)
        trainer = _trainer(tmp_path / run, strategy, max_epochs=2, logger=False)
        trainer.fit(Chatty(), datamodule=PlainFashionMNIST(n=200))
        strategy.shutdown()
    time.sleep(1.5)  # Ray forwards worker output asynchronously: give it time to show up if it would
    out, err = capfd.readouterr()
    assert "chatty step" not in out + err
    assert out.count("[lightning-fed] round 2/2") >= 2  # the progress view is the driver's (both runs)
    for run in ("first", "second"):
        for site in ("site_0", "site_1"):
            log = (tmp_path / run / "sites" / site / "console.log").read_text()
            assert log.count("chatty step at epoch 0") == 1 and log.count("chatty step at epoch 1") == 1, log
        assert (tmp_path / run / "sites" / "worker-0.log").is_file()


class _Numbered(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from (torch.tensor([100.0 + i]) for i in range(16))


class _TwoTrainLoaders(L.LightningDataModule):
    """Two training loaders (a map-style dataset of 0..15 and an iterable one of 100..115), as Lightning combines them."""

    def train_dataloader(self):
        return [
            DataLoader(torch.utils.data.TensorDataset(torch.arange(16.0).unsqueeze(1)), batch_size=2),
            DataLoader(_Numbered(), batch_size=2),
        ]

    def val_dataloader(self):
        return DataLoader(torch.utils.data.TensorDataset(torch.arange(8.0).unsqueeze(1)), batch_size=4)


class _SeesIds(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        (mapped,), numbered = batch  # one batch from each loader per step
        self.log("map_ids", mapped.sum(), reduce_fx="sum", on_step=False, on_epoch=True)
        self.log("iter_ids", numbered.sum(), reduce_fx="sum", on_step=False, on_epoch=True)
        return (self.w * (mapped.sum() + numbered.sum())).sum() * 1e-3

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", (self.w * batch[0]).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_several_train_loaders_and_iterable_datasets_are_split_across_sites(tmp_path):
    strategy = FederatedStrategy(num_sites=2, progress=False, checkpoint_every=0)
    trainer = _trainer(tmp_path, strategy, max_epochs=1, logger=False)
    trainer.fit(_SeesIds(), datamodule=_TwoTrainLoaders())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    strategy.shutdown()
    # every sample of the map-style loader reached exactly one site; the iterable one was dealt round-robin
    assert metrics["site/site_0/map_ids"] + metrics["site/site_1/map_ids"] == sum(range(16))
    assert metrics["site/site_0/iter_ids"] == sum(range(100, 116, 2)) and metrics["site/site_1/iter_ids"] == sum(
        range(101, 116, 2)
    )
    assert trainer.global_step == 4  # 8 samples a site in each loader, batches of 2
    # a non-IID split needs indices: an iterable dataset is refused in one line
    strategy = FederatedStrategy(num_sites=2, partitioner=Dirichlet(alpha=0.5), progress=False, checkpoint_every=0)
    with pytest.raises(ValueError, match="IterableDataset, which simulation can only deal out round-robin"):
        _trainer(tmp_path, strategy, max_epochs=1, logger=False).fit(_SeesIds(), datamodule=_TwoTrainLoaders())
    strategy.shutdown()


def test_module_with_its_own_dataloaders_runs_unchanged(tmp_path):
    class SelfContained(UnmodifiedMLP):
        def setup(self, stage):
            self.data = PlainFashionMNIST(n=300)
            self.data.setup(stage)

        def train_dataloader(self):
            return self.data.train_dataloader()

    dm_free = SelfContained()
    strategy = FederatedStrategy(num_sites=3, progress=False, checkpoint_every=0)
    trainer = _trainer(tmp_path, strategy, max_epochs=1, logger=False)
    trainer.fit(dm_free)
    strategy.shutdown()
    assert trainer.global_step == 2  # 300 images over 3 sites: 100 each, 2 batches of 50


def test_trainer_test_runs_on_every_site_after_fit(tmp_path):
    torch.manual_seed(0)
    dm, model = small_hospitals(val_fraction=0.0), SmallCNN()
    strategy = FederatedStrategy(progress=False, checkpoint_every=0)
    trainer = _trainer(tmp_path, strategy, max_epochs=1)
    trainer.fit(model, datamodule=dm)
    try:
        workers_before = list(strategy.federation.workers)
        out = trainer.test(model, datamodule=dm, verbose=False)[0]
        assert strategy.federation.workers == workers_before  # the same workers, no restart
        for site in ("large", "small_1", "small_2"):
            assert 0.0 <= out[f"site/{site}/test_recall"] <= 1.0
        # each small hospital has 40 test images (200 * 0.2), the large one 80
        cms = strategy.last_evaluation.confusion_matrices
        assert np.array(cms["small_1"]).sum() == 40 and np.array(cms["large"]).sum() == 80
        assert np.array(cms["federated"]).sum() == 160
    finally:
        strategy.shutdown()


def test_early_stopping_and_model_checkpoint_behave_per_site(tmp_path):
    torch.manual_seed(0)
    # patience 0 on a federated key: every site sees the same value and all stop in the same epoch
    stop = EarlyStopping(monitor="fl/val_loss", patience=0, min_delta=10.0)
    best = ModelCheckpoint(
        dirpath=tmp_path / "best", monitor="fl/val_auroc", mode="max", save_top_k=1, filename="{epoch}"
    )
    strategy = FederatedStrategy(progress=False, checkpoint_every=0)
    trainer = L.Trainer(
        strategy=strategy,
        max_epochs=6,
        callbacks=[stop, best],
        logger=CSVLogger(tmp_path, name="run"),
        default_root_dir=tmp_path,
    )
    t0 = time.monotonic()
    trainer.fit(SmallCNN(), datamodule=small_hospitals())
    strategy.shutdown()
    assert trainer.current_epoch == 2  # epoch 0 sets the best, epoch 1 fails min_delta, stop
    assert time.monotonic() - t0 < 120
    # each site keeps its own top-k in its own folder; no site overwrote another's file
    for site in ("large", "small_1", "small_2"):
        files = sorted(p.name for p in (tmp_path / "best" / site).glob("*.ckpt"))
        assert len(files) == 1 and files[0] in ("epoch=0.ckpt", "epoch=1.ckpt"), (site, files)
        saved = torch.load(tmp_path / "best" / site / files[0], map_location="cpu", weights_only=False)
        assert saved["callbacks"]  # a full Lightning checkpoint of that site's run


@pytest.mark.parametrize("mode, expected", [("raise", "scanner offline at hospital bad"), ("die", "died")])
def test_failing_site_stops_the_run_with_its_name(tmp_path, mode, expected):
    # 'bad' has 120 training images: it fails in its third epoch. Every site reports its round-1 checkpoint to the
    # coordinator before it can reach the round-2 barrier, so round 1 (perhaps round 2 too) is certainly committed;
    # failing in epoch 2 would race the other sites' round-1 saves.
    strategy = FederatedStrategy(progress=False)
    trainer = _trainer(tmp_path, strategy, max_epochs=5)
    failed = tmp_path / "failed"  # made by the failing site just before it raises or dies
    with pytest.raises(SiteFailedError, match=rf"site 'bad'.*{expected}") as info:
        trainer.fit(
            SmallCNN(), datamodule=HospitalsWithFailingSite(fail_at_access=270, mode=mode, once_flag=str(failed))
        )
    assert time.time() - failed.stat().st_mtime < 30  # the run ended within 30 s of the failure
    assert "\n" not in str(info.value)
    assert strategy.federation is None or not strategy.federation.alive
    assert _none_alive_within(20)
    # the last committed round is intact and loadable
    from lightning_fed.checkpoint import find_checkpoint

    ckpt = find_checkpoint(Path(trainer.log_dir) / "federated_checkpoints")
    assert ckpt.round in (1, 2)
    state = ckpt.server_state()
    assert state["round"] == ckpt.round and set(state["sites"]) == {"large", "small_1", "bad"}
    for path in ckpt.site_paths.values():
        torch.load(path, map_location="cpu", weights_only=False)


def test_resume_continues_the_federation(tmp_path):
    torch.manual_seed(0)
    ckpt_dir = tmp_path / "fed_ckpt"
    first = FederatedStrategy(progress=False, checkpoint_dir=str(ckpt_dir))
    trainer = _trainer(tmp_path, first, max_epochs=2)
    trainer.fit(SmallCNN(), datamodule=small_hospitals())
    first.shutdown()
    steps_per_epoch = trainer.global_step // 2
    assert json.loads((ckpt_dir / "last.json").read_text())["round"] == 2

    second = FederatedStrategy(progress=False, checkpoint_dir=str(ckpt_dir))
    resumed = _trainer(tmp_path, second, max_epochs=4)
    model = SmallCNN()
    resumed.fit(model, datamodule=small_hospitals(), ckpt_path=str(ckpt_dir))
    try:
        assert resumed.current_epoch == 4
        assert resumed.global_step == 4 * steps_per_epoch  # counters continue, not restart
        assert json.loads((ckpt_dir / "last.json").read_text())["round"] == 4
        assert sorted(p.name for p in ckpt_dir.glob("round-*")) == ["round-0003", "round-0004"]  # keep_checkpoints=2
        # the resumed sites carry the checkpointed optimizer state (Adam step counts continue past round 2)
        site_ckpt = torch.load(ckpt_dir / "round-0004" / "site-small_1.ckpt", map_location="cpu", weights_only=False)
        adam_step = next(iter(site_ckpt["optimizer_states"][0]["state"].values()))["step"]
        assert int(adam_step) == 4 * (120 // 50 + 1)
    finally:
        second.shutdown()
    # a checkpoint another rule wrote is refused before anything starts, naming both rules and the way out
    other = FederatedStrategy(aggregator="fedprox", progress=False, checkpoint_dir=str(tmp_path / "other"))
    with pytest.raises(FederationConfigError) as refused:
        _trainer(tmp_path, other, max_epochs=5).fit(SmallCNN(), datamodule=small_hospitals(), ckpt_path=str(ckpt_dir))
    other.shutdown()
    message = str(refused.value)
    assert "written by aggregator 'fedavg'" in message and "'fedprox'" in message, message
    assert "resume with the same aggregator" in message and "\n" not in message


def test_bad_layouts_fail_before_training(tmp_path):
    from lightning_fed.data import Site
    from lightning_fed.data.fashion_mnist import PooledIndexData

    class Pinned(L.LightningDataModule):
        def federated_sites(self):
            idx = {"train": np.arange(10), "val": np.arange(10, 20), "test": np.arange(20, 30)}
            return [
                Site("a", PooledIndexData(None, idx, 5), resources={"site:hospital_a": 1}),
                Site("b", PooledIndexData(None, idx, 5)),
            ]

    class Empty(L.LightningDataModule):
        def federated_sites(self):
            full = {"train": np.arange(10), "val": np.arange(10, 20), "test": np.arange(20, 30)}
            none = {"train": np.arange(0), "val": np.arange(10, 20), "test": np.arange(20, 30)}
            return [Site("full", PooledIndexData(None, full, 5)), Site("empty", PooledIndexData(None, none, 5))]

    strategy = FederatedStrategy(progress=False)
    with pytest.raises(FederationConfigError, match=r"sites \['a'\] need 1 site:hospital_a.*--resources"):
        _trainer(tmp_path, strategy).fit(SmallCNN(), datamodule=Pinned())
    with pytest.raises(FederationConfigError, match=r"\['empty'\] have no training samples"):
        _trainer(tmp_path, strategy).fit(SmallCNN(), datamodule=Empty())

    class Unmounted(L.LightningDataModule):
        def federated_sites(self):
            return [*small_hospitals().federated_sites()[:2], Site("broken", unmounted_scans)]

    with pytest.raises(
        SiteFailedError, match=r"^site 'broken' failed to start: FileNotFoundError: /data/scans is not mounted$"
    ):
        _trainer(tmp_path, strategy).fit(SmallCNN(), datamodule=Unmounted())
    assert _none_alive_within(10)
    with pytest.raises(FederationConfigError, match="must be a federated checkpoint folder"):
        _trainer(tmp_path, strategy).fit(
            SmallCNN(), datamodule=small_hospitals(), ckpt_path=str(tmp_path / "nothing.ckpt")
        )


class _RaisesInSecondEpoch(UnmodifiedMLP):
    """Site ``site_1`` raises in its second epoch (``site_0`` is then waiting on the round barrier or training)."""

    def training_step(self, batch, batch_idx):
        if self.current_epoch == 1 and Path(self.trainer.default_root_dir).name == "site_1":  # sites/<name>
            raise ValueError("scanner offline")
        return super().training_step(batch, batch_idx)


def test_idle_workers_serve_any_later_layout_and_outlive_a_failed_run(tmp_path):
    from lightning_fed import warm_workers
    from lightning_fed.worker import computing_marker

    def fit(name, module, **options):
        strategy = FederatedStrategy(num_sites=2, progress=False, checkpoint_every=0, **options)
        trainer = L.Trainer(
            strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path / name
        )
        try:
            trainer.fit(module, datamodule=PlainFashionMNIST(n=200))
        finally:
            strategy.shutdown()
        return strategy.last_fit

    with warm_workers(enabled=False), warm_workers() as pool:  # a pool of this test's own, not the session's
        first = fit("two-workers", UnmodifiedMLP())
        assert first.startup.workers == 2 and not first.startup.warm and pool.started == 2
        (coordinator,) = [c._actor_id.hex() for c in pool.coordinators.idle()]  # kept for the next run
        # another layout (one worker hosting both sites): it takes an idle process, sets its threads, starts none
        packed = fit("one-worker", UnmodifiedMLP(), sites_per_worker=2)
        assert packed.startup.workers == 1 and packed.startup.warm and pool.started == 2
        assert len(pool.idle_workers()) == 2
        # a failed run: its workers' sites stop at once, so both go back idle instead of being ended
        with pytest.raises(SiteFailedError, match="site 'site_1'.*scanner offline"):
            fit("failed", _RaisesInSecondEpoch())
        idle = pool.idle_workers()
        assert len(idle) == 2 and pool.started == 2
        # every run so far, the failed one too, was coordinated in the first run's coordinator process, and so is the
        # next (the failed run's late calls, if any, are refused there: tests/test_coordinator.py)
        assert [c._actor_id.hex() for c in pool.coordinators.idle()] == [coordinator]
        again = fit("after-failure", UnmodifiedMLP())
        assert again.startup.warm and pool.started == 2
        assert [c._actor_id.hex() for c in pool.coordinators.idle()] == [coordinator]
        assert np.isfinite(again.metrics["fl/train_loss"])
        markers = [computing_marker(w._actor_id.hex()) for w in pool.idle_workers()]
        assert all(Path(m).is_file() for m in markers)
    # the block ended its pool: the workers are gone, and with them the files noting which site computes
    assert not any(Path(m).exists() for m in markers)
    assert _none_alive_within(10)


def test_workers_move_into_their_group_when_it_is_placed_on_another_node(tmp_path, monkeypatch):
    import ray

    from lightning_fed import warm_workers
    from lightning_fed.pool import Workers

    # as if the cluster had grown since the run started and the group's bundles had landed on the new node: the
    # resource-free workers on the driver's node would compute on CPUs reserved elsewhere
    monkeypatch.setattr(Workers, "_placed_here", lambda self: False)
    strategy = FederatedStrategy(num_sites=2, progress=False, checkpoint_every=0)
    trainer = L.Trainer(
        strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    with warm_workers(enabled=False):
        try:
            trainer.fit(UnmodifiedMLP(), datamodule=PlainFashionMNIST(n=200))
            hosts = strategy.federation.hosts
            assert not hosts.free and not hosts.warm and hosts.adopted == {} and len(hosts.actors) == 2
            from ray.util.placement_group import placement_group_table

            assert len(placement_group_table(hosts.pg)["bundles"]) == 2
            # each worker holds its bundle's CPUs: none of the group's is left free (Ray reports usage late)
            group_cpus = f"CPU_group_{hosts.pg.id.hex()}"
            deadline = time.monotonic() + 10
            while ray.available_resources().get(group_cpus, 0.0) > 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert ray.available_resources().get(group_cpus, 0.0) == 0
            assert set(strategy.last_fit.sites) == {"site_0", "site_1"}
        finally:
            strategy.shutdown()
    assert _none_alive_within(10)


def test_an_idle_worker_or_kept_coordinator_that_died_is_replaced_not_handed_to_the_next_run(tmp_path):
    import ray

    from lightning_fed import warm_workers

    def fit(name):
        strategy = FederatedStrategy(num_sites=2, progress=False, checkpoint_every=0)
        trainer = L.Trainer(
            strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path / name
        )
        try:
            trainer.fit(UnmodifiedMLP(), datamodule=PlainFashionMNIST(n=200))
            coordinator = strategy.federation.coordinator.actor._actor_id.hex()
        finally:
            strategy.shutdown()
        return strategy.last_fit, coordinator

    def kept(pool):
        (process,) = pool.coordinators.idle()  # the last run's coordinator process, kept for the next run
        assert ray.get(process.alive.remote(), timeout=60)
        return process._actor_id.hex()

    with warm_workers(enabled=False), warm_workers() as pool:  # a pool of this test's own, not the session's
        _, first_coordinator = fit("first")
        assert pool.started == 2 and len(pool.idle_workers()) == 2 and kept(pool) == first_coordinator
        dead = pool.idle_workers()[0]
        ray.kill(dead, no_restart=True)  # as if its process had been killed (for memory) while idle
        (dead_coordinator,) = pool.coordinators.idle()
        ray.kill(dead_coordinator, no_restart=True)  # the same for the kept coordinator
        second, used = fit("second")
        assert pool.started == 3 and not second.startup.warm  # the survivor was reused, one new process started
        assert np.isfinite(second.metrics["fl/train_loss"])
        assert dead._actor_id.hex() not in {w._actor_id.hex() for w in pool.idle_workers()}
        assert used != first_coordinator  # a new coordinator, not the dead one
        # the second run's coordinator process coordinates the third, which starts no process at all
        assert kept(pool) == used
        third, used_again = fit("third")
        assert used_again == used and third.startup.warm and pool.started == 3
        assert np.isfinite(third.metrics["fl/train_loss"])
    assert _none_alive_within(10)
