"""Rounds counted in optimizer steps (``sync_every_steps``, FLamby's ``num_updates``): the schedule's rules, and a
real federation whose sites hand over after exactly k steps although their epochs end elsewhere."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, Timer

from lightning_fed import FederatedStrategy, FederationConfigError
from lightning_fed.models import SmallCNN
from lightning_fed.rounds import RoundSchedule
from tests.helpers import small_hospitals

STEP_DEFAULTS = {"max_epochs": -1, "max_steps": 10, "val_check_interval": 1.0, "check_val_every_n_epoch": 1}


def test_a_round_is_epochs_or_steps_never_both():
    assert RoundSchedule.of(3, None) == RoundSchedule(3, in_steps=False)
    assert RoundSchedule.of(1, 100) == RoundSchedule(100, in_steps=True)
    with pytest.raises(ValueError, match="give one of them"):
        FederatedStrategy(sync_every=2, sync_every_steps=5)
    with pytest.raises(ValueError, match="sync_every_steps must be an integer >= 1"):
        FederatedStrategy(sync_every_steps=0)
    steps = RoundSchedule(4, in_steps=True)
    assert [steps.total_rounds(None, n) for n in (8, 10, -1)] == [2, 3, 0]  # the last round shorter; no limit
    assert RoundSchedule(2).total_rounds(5, 100) == 3  # epochs: max_steps does not count
    assert [s for s in range(1, 13) if steps.due_after_step(s)] == [4, 8, 12]
    assert not RoundSchedule(4).due_after_step(4)  # epoch rounds end at epoch ends only


def test_step_rounds_refuse_what_needs_epoch_aligned_rounds_naming_the_way_out():
    steps = RoundSchedule(5, in_steps=True)
    assert steps.refusals(STEP_DEFAULTS, [], checkpoint_every=0, tolerant=False) == []
    cases = [
        ({"max_steps": -1}, [], 0, False, "give Trainer(max_steps=...)"),
        ({"max_epochs": 3}, [], 0, False, "leave max_epochs unset"),
        ({"val_check_interval": 0.5}, [], 0, False, "validate at every round's end"),
        ({}, [], 1, False, "set checkpoint_every=0"),
        ({}, [], 0, True, "on_site_failure='abort'"),
        ({}, [EarlyStopping("val_loss")], 0, False, "EarlyStopping would stop one site mid-round"),
        ({}, [Timer(duration="00:00:10:00")], 0, False, "Timer would stop one site mid-round"),
    ]
    for changes, callbacks, every, tolerant, expected in cases:
        found = steps.refusals({**STEP_DEFAULTS, **changes}, callbacks, checkpoint_every=every, tolerant=tolerant)
        assert len(found) == 1 and expected in found[0] and found[0].startswith("sync_every_steps=5")
    settings = steps.site_settings({**STEP_DEFAULTS, "accumulate_grad_batches": 2})
    assert settings["val_check_interval"] == 10 and settings["check_val_every_n_epoch"] is None


class RecordsSyncs(SmallCNN):
    """Notes, at every global model it loads, the site's optimizer step and a checksum of its weights."""

    sync_log = ""  # set on the instance: it travels to the sites with the module

    def on_global_model_loaded(self, round: int) -> None:
        if round == 0 or self._trainer is None:
            return
        record = {
            "site": len(self.trainer.train_dataloader.dataset),  # the sites differ in size
            "round": round,
            "step": self.trainer.global_step,
            "epoch": self.trainer.current_epoch,
            "checksum": float(sum(p.double().sum() for p in self.parameters())),
        }
        with open(self.sync_log, "a") as f:
            f.write(json.dumps(record) + "\n")


@pytest.mark.integration
@pytest.mark.usefixtures("ray_cluster", "fed_data")
def test_sites_hand_over_after_exactly_k_optimizer_steps_wherever_their_epochs_end(tmp_path):
    torch.manual_seed(0)
    model = RecordsSyncs()
    model.sync_log = str(tmp_path / "syncs.jsonl")
    strategy = FederatedStrategy(sync_every_steps=4, progress=False, checkpoint_every=0)
    trainer = L.Trainer(
        strategy=strategy, max_steps=10, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    # 150 and 60 training images in batches of 25: 6 and 3 steps an epoch, so rounds end mid-epoch at both
    trainer.fit(model, datamodule=small_hospitals(sizes=(250, 100), ratios=(0.5, 0.1), batch_size=25))
    try:
        records = [json.loads(line) for line in open(model.sync_log)]
        by_site = {}
        for r in records:
            by_site.setdefault(r["site"], []).append(r)
        assert len(by_site) == 2
        for site in by_site.values():
            # rounds after steps 4 and 8, and the shorter last round at max_steps
            assert [(r["round"], r["step"]) for r in site] == [(1, 4), (2, 8), (3, 10)]
        small, large = sorted(by_site.values(), key=lambda rs: rs[0]["site"])
        assert [r["epoch"] for r in small] != [r["epoch"] for r in large]  # the sites' epochs did not line up
        for a, b in zip(small, large):  # every round: both hold the same global model
            assert a["checksum"] == pytest.approx(b["checksum"], rel=1e-12)
        assert len(strategy.last_fit.round_seconds) == 3
        assert "fl/val_loss" in trainer.callback_metrics  # validated at the rounds' ends, merged by round
    finally:
        strategy.shutdown()


@pytest.mark.integration
@pytest.mark.usefixtures("ray_cluster", "fed_data")
def test_step_rounds_without_max_steps_fail_before_anything_starts(tmp_path):
    strategy = FederatedStrategy(sync_every_steps=4, progress=False, checkpoint_every=0)
    trainer = L.Trainer(strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False)
    with pytest.raises(FederationConfigError, match=r"give Trainer\(max_steps=\.\.\.\)"):
        trainer.fit(SmallCNN(), datamodule=small_hospitals(sizes=(100, 100), ratios=(0.5, 0.1)))
