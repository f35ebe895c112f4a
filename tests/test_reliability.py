"""Reliability: exact resume after a crash, garbage updates refused."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lightning_fed import DPSGD, FederatedStrategy, SiteFailedError
from lightning_fed.screening import screen
from lightning_fed.strategies import SiteUpdate
from tests.helpers import HospitalsWithFailingSite, NoisyCNN


def _fit(root, epochs, fail_at=10**9, resume=None, privacy=None, options=None, evaluate=False):
    """The federation of 'large', 'small_1' and 'bad' (120 training images); 'bad' dies once it has read
    ``fail_at`` training samples (a kill -9 of its worker). ``evaluate``: also test, and return the test metrics and
    every site's weights."""
    L.seed_everything(3, verbose=False)
    model = NoisyCNN()
    strategy = FederatedStrategy(
        progress=False, seed=3, checkpoint_dir=str(root / "ckpt"), privacy=privacy, **(options or {})
    )
    trainer = L.Trainer(
        strategy=strategy, max_epochs=epochs, logger=False, enable_checkpointing=False, default_root_dir=root
    )
    dm = HospitalsWithFailingSite(fail_at_access=fail_at, mode="die")
    seen = None
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=resume)
        if evaluate:
            trainer.test(datamodule=dm, verbose=False)
            seen = (strategy.last_evaluation.metrics(), strategy.federation.site_weights())
    finally:
        strategy.shutdown()
    return {k: v.clone() for k, v in model.state_dict().items()}, trainer, seen


@pytest.mark.usefixtures("ray_cluster", "fed_data")
@pytest.mark.parametrize(
    "privacy, options",
    [
        (None, None),
        ({"small_1": DPSGD(noise_multiplier=1.0)}, None),
        (None, {"aggregator": "ditto", "personal": ["classifier.*"]}),
    ],
    ids=["plain", "dp-sgd", "ditto-personal-head"],
)
def test_resume_after_a_crash_equals_the_uninterrupted_run_bit_for_bit(tmp_path, privacy, options):
    personal = options is not None  # personal state at the sites: Ditto's models and each site's own head
    straight, first, seen = _fit(tmp_path / "straight", 4, privacy=privacy, options=options, evaluate=personal)
    layout = first.strategy.last_fit.startup.layout
    with pytest.raises(SiteFailedError, match="site 'bad'"):
        _fit(tmp_path / "crashed", 4, fail_at=270, privacy=privacy, options=options)  # dies in its third epoch
    resume = str(tmp_path / "crashed" / "ckpt")  # rounds 1-2 committed
    resumed, trainer, seen_resumed = _fit(
        tmp_path / "crashed", 4, resume=resume, privacy=privacy, options=options, evaluate=personal
    )
    assert trainer.current_epoch == 4
    # the checkpoint's layout (threads per site) was reused: float reductions depend on the thread count
    assert trainer.strategy.last_fit.startup.layout == layout
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
    if personal:
        metrics, weights = seen
        assert any(k.startswith("personal/site/") for k in metrics)  # each site's Ditto model was tested
        assert metrics == seen_resumed[0]  # every site's personal model tested the same, to the last bit
        for site, state in weights.items():  # every site's head, its own, the same to the last bit
            for key, value in state.items():
                np.testing.assert_array_equal(value, seen_resumed[1][site][key], err_msg=f"{site} {key}")


def test_screening_refuses_non_finite_and_outlying_updates():
    current = {"w": np.zeros(4, np.float32), "n": np.array(3)}

    def update(site, scale, **extras):
        return SiteUpdate(site, {"w": np.full(4, scale, np.float32), "n": np.array(5)}, 10, extras)

    sound = [update("a", 1.0), update("b", 1.2), update("c", 0.9)]
    assert screen(sound, current, max_norm_ratio=3) == {}
    refused = screen([*sound, update("d", float("nan"))], current, None)
    assert list(refused) == ["d"] and "NaN or Inf (in 'w')" in refused["d"]
    far = screen([*sound, update("e", 50.0)], current, max_norm_ratio=10)
    assert list(far) == ["e"] and "max_update_norm_ratio=10" in far["e"]
    assert screen([*sound, update("e", 50.0)], current, None) == {}  # no bound unless asked
    # differences (DP-FedAvg) are measured as they are; masked updates (secure aggregation) cannot be screened
    deltas = [update(s, v, delta=True) for s, v in (("a", 0.1), ("b", 0.12), ("c", 5.0))]
    assert list(screen(deltas, {"w": np.full(4, 100.0, np.float32)}, max_norm_ratio=10)) == ["c"]
    assert screen([update("a", float("nan"), secagg={"w": "float32"})], current, 2) == {}


@pytest.mark.usefixtures("ray_cluster", "fed_data")
def test_a_diverging_site_stops_the_run_before_its_update_is_averaged(tmp_path):
    strategy = FederatedStrategy(progress=False, checkpoint_every=0)
    trainer = L.Trainer(
        strategy=strategy, max_epochs=4, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    with pytest.raises(SiteFailedError) as info:
        trainer.fit(NoisyCNN(), datamodule=HospitalsWithFailingSite(fail_at_access=130, mode="nan"))
    message = str(info.value)
    assert "\n" not in message
    assert "site 'bad'" in message and "training diverged in round 2" in message and "NaN or Inf" in message, message
    assert "last training loss nan" in message and "lower the learning rate" in message


@pytest.mark.usefixtures("ray_cluster", "fed_data")
@pytest.mark.parametrize("mode", ["die", "raise"])
def test_a_failed_site_is_left_out_restarted_and_rejoins_in_continue_mode(tmp_path, mode):
    # 'bad' (120 training images, DP-SGD) is killed -9 (or its data raises) in its third epoch; its worker is its own
    strategy = FederatedStrategy(
        progress=False,
        seed=3,
        sites_per_worker=1,
        on_site_failure="continue",
        checkpoint_dir=str(tmp_path / "ckpt"),
        privacy={"bad": DPSGD(noise_multiplier=1.0)},
    )
    trainer = L.Trainer(
        strategy=strategy, max_epochs=8, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    datamodule = HospitalsWithFailingSite(fail_at_access=290, mode=mode, once_flag=str(tmp_path / "failed-once"))
    try:
        trainer.fit(NoisyCNN(), datamodule=datamodule)
        fit = strategy.last_fit
        assert trainer.current_epoch == 8 and len(fit.round_sites) == 8
        assert len(fit.events) == 2, "\n".join(map(repr, fit.events))
        left, back = fit.events
        assert (left.site, left.event, left.round) == ("bad", "left out", 3), fit.events
        assert ("died" if mode == "die" else "scanner offline") in left.reason
        if mode == "die":  # the file in which its killed worker noted which site computes went with it
            assert not Path(strategy.federation.calls.markers["bad"]).exists()
        # it comes back at the first round that starts once it is up again (a new process after kill -9 takes a
        # few seconds of imports; round 9 means the others finished first and it took the final model)
        assert (back.site, back.event) == ("bad", "rejoined") and 4 <= back.round <= 9, fit.events
        if mode == "raise":
            assert back.round <= 8  # set up again in its own worker: back while the others still train
        everyone = ["large", "small_1", "bad"]
        assert fit.round_sites == [everyone] * 2 + [["large", "small_1"]] * (back.round - 3) + [everyone] * (
            9 - back.round
        )
        # its accountant went on from its last released update: the epochs of the rounds it took part in, no more
        batches = 3  # Poisson sampling: len(loader) steps per epoch, 120 images in batches of 50
        assert fit.privacy.sites["bad"].steps == batches * (2 + 9 - back.round)
        # rounds it missed were committed with its latest part linked in
        import json

        manifest = json.loads((tmp_path / "ckpt" / "round-0008" / "manifest.json").read_text())
        assert manifest["site_rounds"] == {"large": 8, "small_1": 8, "bad": 8 if back.round <= 8 else 2}
        # every site, the restarted one included, tests the global model
        out = trainer.test(NoisyCNN(), datamodule=datamodule, verbose=False)[0]
        assert all(f"site/{s}/test_accuracy" in out for s in everyone)
        assert trainer.callback_metrics["fl/rounds_with_sites_left_out"] == back.round - 3
    finally:
        strategy.shutdown()


@pytest.mark.usefixtures("ray_cluster", "fed_data")
def test_a_straggler_past_round_timeout_is_left_out_or_aborts_the_run(tmp_path):
    strategy = FederatedStrategy(
        progress=False, checkpoint_every=0, sites_per_worker=1, on_site_failure="continue", round_timeout=3
    )
    trainer = L.Trainer(
        strategy=strategy, max_epochs=5, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    try:
        # 'bad' stalls 6 s in epoch 2 (once): twice the round's deadline (a healthy round takes well under a second;
        # round 1's deadline counts from the end of the sites' set-up, so a cold worker does not count)
        trainer.fit(
            NoisyCNN(),
            datamodule=HospitalsWithFailingSite(
                fail_at_access=150, mode="stall", once_flag=str(tmp_path / "stalled"), stall_seconds=6
            ),
        )
        fit = strategy.last_fit
        assert (
            fit.events[0].event == "left out"
            and fit.events[0].round == 2
            and "round_timeout=3s" in fit.events[0].reason
        )
        assert fit.round_sites[1] == ["large", "small_1"] and trainer.current_epoch == 5
    finally:
        strategy.shutdown()
    # the same straggler with min_sites=3 ends the run, naming it
    strategy = FederatedStrategy(
        progress=False, checkpoint_every=0, sites_per_worker=1, on_site_failure="continue", round_timeout=3, min_sites=3
    )
    trainer = L.Trainer(
        strategy=strategy, max_epochs=3, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    with pytest.raises(
        SiteFailedError,
        match=r"site 'bad' missed round 2's deadline \(round_timeout=3s\); 2 site\(s\) left, fewer than min_sites=3",
    ):
        trainer.fit(NoisyCNN(), datamodule=HospitalsWithFailingSite(fail_at_access=150, mode="stall", stall_seconds=6))
    strategy.shutdown()


def test_continue_mode_refuses_rules_that_need_every_site():
    FederatedStrategy(secagg=True, on_site_failure="continue")  # a dropped site's masks are rebuilt (test_secagg)
    with pytest.raises(ValueError, match="on_site_failure='continue': scaffold's server control variate"):
        FederatedStrategy(aggregator="scaffold", on_site_failure="continue")
    with pytest.raises(ValueError, match="min_sites applies only with on_site_failure='continue'"):
        FederatedStrategy(min_sites=2)
    with pytest.raises(ValueError, match="on_site_failure must be 'abort' or 'continue'"):
        FederatedStrategy(on_site_failure="retry")
    FederatedStrategy(aggregator="dp_fedavg", on_site_failure="continue", min_sites=2)  # noise on the sum: fine


@pytest.mark.usefixtures("ray_cluster", "fed_data")
def test_resuming_a_round_a_site_missed_brings_it_in_at_the_next_round(tmp_path):
    ckpt = tmp_path / "ckpt"

    def fit(epochs, datamodule, resume=None):
        strategy = FederatedStrategy(
            progress=False, seed=3, sites_per_worker=1, on_site_failure="continue", checkpoint_dir=str(ckpt)
        )
        trainer = L.Trainer(
            strategy=strategy, max_epochs=epochs, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
        )
        try:
            trainer.fit(NoisyCNN(), datamodule=datamodule, ckpt_path=resume)
            return trainer, strategy.last_fit
        finally:
            strategy.shutdown()

    # 'bad' fails in its fourth (last) epoch: round 4 is committed with its part from round 3
    trainer, first = fit(4, HospitalsWithFailingSite(fail_at_access=400, once_flag=str(tmp_path / "failed")))
    assert [e.event for e in first.events] == ["left out", "rejoined"] and first.round_sites[-1] == ["large", "small_1"]
    import json

    manifest = json.loads((ckpt / "round-0004" / "manifest.json").read_text())
    assert manifest["site_rounds"] == {"large": 4, "small_1": 4, "bad": 3}
    # two more rounds from there: 'bad' comes in at round 5 from round 4's global model, and every round has all three
    trainer, resumed = fit(6, HospitalsWithFailingSite(fail_at_access=10**9), resume=str(ckpt))
    assert trainer.current_epoch == 6 and resumed.round_sites == [["large", "small_1", "bad"]] * 2
    [event] = resumed.events
    assert (event.site, event.event, event.round) == ("bad", "rejoined", 5) and "earlier round" in event.reason
