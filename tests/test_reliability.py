"""Reliability: exact resume after a crash, garbage updates refused."""

import lightning as L
import numpy as np
import pytest
import torch

from lightning_fed import DPSGD, FederatedStrategy, SiteFailedError
from lightning_fed.screening import screen
from lightning_fed.strategies import SiteUpdate
from tests.helpers import HospitalsWithFailingSite, NoisyCNN



def _fit(root, epochs, fail_at=10**9, resume=None, privacy=None):
    """The federation of 'large', 'small_1' and 'bad' (120 training images); 'bad' dies once it has read
    ``fail_at`` training samples (a kill -9 of its worker)."""
    L.seed_everything(3, verbose=False)
    model = NoisyCNN()
    strategy = FederatedStrategy(progress=False, seed=3, checkpoint_dir=str(root / "ckpt"), privacy=privacy)
    trainer = L.Trainer(strategy=strategy, max_epochs=epochs, logger=False, enable_checkpointing=False, default_root_dir=root)
    try:
        trainer.fit(model, datamodule=HospitalsWithFailingSite(fail_at_access=fail_at, mode="die"), ckpt_path=resume)
    finally:
        strategy.shutdown()
    return {k: v.clone() for k, v in model.state_dict().items()}, trainer


@pytest.mark.usefixtures("ray_cluster", "fed_data")
@pytest.mark.parametrize("privacy", [None, {"small_1": DPSGD(noise_multiplier=1.0)}], ids=["plain", "dp-sgd"])
def test_resume_after_a_crash_equals_the_uninterrupted_run_bit_for_bit(tmp_path, privacy):
    straight, first = _fit(tmp_path / "straight", 4, privacy=privacy)
    layout = first.strategy.last_fit.startup.layout
    with pytest.raises(SiteFailedError, match="site 'bad'"):
        _fit(tmp_path / "crashed", 4, fail_at=270, privacy=privacy)  # dies in its third epoch: rounds 1-2 committed
    resumed, trainer = _fit(tmp_path / "crashed", 4, resume=str(tmp_path / "crashed" / "ckpt"), privacy=privacy)
    assert trainer.current_epoch == 4
    # the checkpoint's layout (threads per site) was reused: float reductions depend on the thread count
    assert trainer.strategy.last_fit.startup.layout == layout
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


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
    trainer = L.Trainer(strategy=strategy, max_epochs=4, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(SiteFailedError) as info:
        trainer.fit(NoisyCNN(), datamodule=HospitalsWithFailingSite(fail_at_access=130, mode="nan"))
    message = str(info.value)
    assert "\n" not in message
    assert "site 'bad'" in message and "training diverged in round 2" in message and "NaN or Inf" in message, message
    assert "last training loss nan" in message and "lower the learning rate" in message
