"""Reliability: exact resume after a crash."""

import lightning as L
import pytest
import torch

from lightning_fed import DPSGD, FederatedStrategy, SiteFailedError
from tests.helpers import HospitalsWithFailingSite, NoisyCNN

pytestmark = pytest.mark.usefixtures("ray_cluster", "fed_data")


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
