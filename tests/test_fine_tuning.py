"""Fine-tuning after the federated run, as one site runs it: its own Trainer, the run's optimizer and scheduler carried
on, exactly the asked steps or epochs. Plain objects, no Ray (a federation's fine-tuning is in test_flamby)."""

import lightning as L
import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_fed import FederatedStrategy, FineTuning
from lightning_fed.fine_tuning import fine_tune
from lightning_fed.privacy_settings import DPSGD


class Counting(L.LightningModule):
    """A linear model that counts the training batches and optimizer steps it has seen; SGD with momentum, its rate
    halved every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.batches = 0
        self.steps = 0

    def on_before_optimizer_step(self, optimizer):
        self.steps += 1

    def training_step(self, batch, batch_idx):
        self.batches += 1
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.linear(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


def _run(tmp_path, accumulate=1):
    torch.manual_seed(0)
    data = L.LightningDataModule.from_datasets(
        train_dataset=TensorDataset(torch.randn(40, 3), torch.randn(40, 1)), batch_size=8
    )  # 5 batches an epoch
    module = Counting()
    trainer = L.Trainer(
        max_epochs=2,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    return trainer, module, data


def test_fine_tuning_by_epochs_carries_on_the_runs_optimizer_and_scheduler(tmp_path):
    run, module, data = _run(tmp_path)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    settings = {"max_epochs": 99, "limit_val_batches": 1.0, "accumulate_grad_batches": 1}  # only step settings count
    tuned, result = fine_tune("a", FineTuning(epochs=3), run, module, data, settings, str(tmp_path), "cpu", [])
    assert (result.epochs, result.steps, tuned.batches, module.batches) == (3, 15, 10 + 15, 10)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())  # the run's model is left alone
    assert not torch.equal(tuned.linear.weight, module.linear.weight)
    saved = torch.load(result.checkpoint, weights_only=False)
    assert result.checkpoint == str(tmp_path / "fine_tuned.ckpt")
    # the scheduler halved the rate twice in the run and three times more here; momentum buffers came along
    assert saved["lr_schedulers"][0]["last_epoch"] == 5
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.5**5)
    assert result.train_metrics["train_loss"] > 0


def test_fine_tuning_by_steps_counts_optimizer_steps_under_accumulation(tmp_path):
    run, module, data = _run(tmp_path, accumulate=2)
    tuned, result = fine_tune(
        "a", FineTuning(steps=4), run, module, data, {"accumulate_grad_batches": 2}, str(tmp_path), "cpu", []
    )
    assert result.steps == 4 and tuned.steps - module.steps == 4
    # two batches a step, and Lightning steps on the 5th batch of an epoch too: 5 + 2 batches
    assert tuned.batches - module.batches == 7 and result.epochs == 2  # the second one cut short


def test_fine_tuning_options_are_checked_and_reach_the_config():
    for bad in ({}, {"steps": 3, "epochs": 1}, {"steps": 0}, {"epochs": -1}, {"steps": 2.5}):
        with pytest.raises(ValueError, match="fine-tuning"):
            FineTuning(**bad)
    assert FederatedStrategy(fine_tune_steps=3).config.fine_tuning == FineTuning(steps=3)
    strategy = FederatedStrategy(fine_tuning=FineTuning(epochs=2))
    assert strategy.config.hyperparameters()["fl_fine_tuning"] == "2 epoch(s)"
    assert "fl_fine_tuning" not in FederatedStrategy().config.hyperparameters()
    with pytest.raises(ValueError, match="not both"):
        FederatedStrategy(fine_tuning=FineTuning(steps=1), fine_tune_epochs=1)
    with pytest.raises(ValueError, match="accountants"):
        FederatedStrategy(fine_tune_steps=3, privacy=DPSGD(noise_multiplier=1.0))
