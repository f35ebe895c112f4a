"""Class imbalance options: weights from each site's own labels, in the loss or in the sampler."""

import lightning as L
import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed.balance import ClassBalance, balanced, class_weights
from lightning_fed.models import ImageClassifier, TabularMLP


def _imbalanced(n0=30, n1=10, features=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n0 + n1, features, generator=g)
    y = torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)])
    return TensorDataset(x, y)


class Recorder(L.Callback):
    """Keeps the first training batch and the loss the module computed on it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0 and not hasattr(self, "loss"):
            self.batch, self.loss = [t.clone() for t in batch], outputs["loss"].detach().clone()
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_class_weighted_loss_uses_the_sites_own_counts(tmp_path):
    torch.manual_seed(0)  # an initialisation whose weighted and plain losses differ clearly (0.736 vs 0.659)
    data = _imbalanced(30, 10)
    model = TabularMLP(in_features=4, hidden=[8], dropout=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = Recorder()
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        callbacks=[ClassBalance("loss"), recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(data, batch_size=40))
    expected = torch.tensor([40 / (2 * 30), 40 / (2 * 10)])
    assert torch.allclose(model.class_weights, expected)  # n / (C n_c): the minority class weighs 3x the majority
    assert float(trainer.callback_metrics["class_weight_1"]) == pytest.approx(2.0)
    # the loss the module trained on is the class-weighted cross-entropy, not the plain one
    x, y = recorder.batch
    fresh = TabularMLP(in_features=4, hidden=[8], dropout=0.0)
    fresh.load_state_dict(before)
    logits = fresh(x)
    assert recorder.loss == pytest.approx(float(F.cross_entropy(logits, y, weight=expected)), rel=1e-5)
    assert recorder.loss != pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-3)
    assert "class_weights" not in "".join(model.state_dict())  # never averaged, never sent
    # evaluation losses stay unweighted
    assert float(fresh.cross_entropy(logits, y, "val")) == pytest.approx(float(F.cross_entropy(logits, y)))


def test_weighted_losses_of_the_image_classifier():
    torch.manual_seed(0)
    binary = ImageClassifier("resnet10t", task="binary", in_chans=1)
    logits, y = torch.randn(6), torch.tensor([0, 0, 0, 0, 1, -1])
    binary.set_class_weights(torch.tensor([0.5, 2.0]))
    w = torch.tensor([0.5, 0.5, 0.5, 0.5, 2.0])
    per = F.binary_cross_entropy_with_logits(logits[:5], y[:5].float(), reduction="none")
    assert float(binary.loss(logits, y)) == pytest.approx(float((per * w).sum() / w.sum()))  # -1 still skipped
    assert float(binary.loss(logits, y, "test")) == pytest.approx(float(per.mean()))
    multilabel = ImageClassifier("resnet10t", task="multilabel", num_classes=3, in_chans=1)
    targets = torch.tensor([[1, 0, -1], [0, 0, 1], [0, 1, 0], [0, 0, 0]])
    weights = class_weights(targets)
    assert weights.tolist() == [3.0, 3.0, 2.0]  # n_neg / n_pos per label over annotated entries
    multilabel.set_class_weights(weights)
    ml_logits = torch.randn(4, 3)
    per = F.binary_cross_entropy_with_logits(
        ml_logits, targets.clamp(min=0).float(), pos_weight=weights, reduction="none"
    )
    mask = (targets != -1).float()
    assert float(multilabel.loss(ml_logits, targets)) == pytest.approx(float((per * mask).sum() / mask.sum()))


def test_balanced_sampler_draws_every_class_equally_often():
    loader = balanced(DataLoader(_imbalanced(90, 10), batch_size=50), seed=0)
    assert isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler) and loader.batch_size == 50
    drawn = torch.cat([torch.cat([b[1] for b in loader]) for _ in range(30)])
    assert len(drawn) == 30 * 100
    assert abs(float(drawn.float().mean()) - 0.5) < 0.03  # the plain loader gives 0.10
    with pytest.raises(ValueError, match="single-label targets"):
        balanced(DataLoader(TensorDataset(torch.zeros(4, 2), torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]]))))


def test_class_balance_refuses_what_it_cannot_do(tmp_path):
    from lightning_fed.privacy import DPSGD, SiteDPSGD

    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    kw = dict(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    with pytest.raises(ValueError, match="needs a module with set_class_weights.*use class_balance='sampler'"):
        L.Trainer(callbacks=[ClassBalance("loss")], **kw).fit(Plain(), DataLoader(_imbalanced(), batch_size=8))
    with pytest.raises(ValueError, match="use class_balance='loss' with DP-SGD"):
        L.Trainer(callbacks=[SiteDPSGD("a", DPSGD(noise_multiplier=1.0)), ClassBalance("sampler")], **kw).fit(
            Plain(), DataLoader(_imbalanced(), batch_size=8)
        )
    with pytest.raises(ValueError, match="'loss' or 'sampler'"):
        ClassBalance("oversample")
    from lightning_fed import FederatedStrategy

    with pytest.raises(ValueError, match="class_balance must be 'loss', 'sampler' or None"):
        FederatedStrategy(class_balance="weights")


def test_each_hospital_weights_its_loss_by_its_own_labels(tmp_path, ray_cluster, fed_data):
    from lightning_fed import FederatedStrategy
    from lightning_fed.data.heart_disease import HeartDiseaseSites, load_heart_disease

    # two workers of two CPUs each: the layout most tests use, so its warm workers serve this one too
    strategy = FederatedStrategy(progress=False, checkpoint_every=0, class_balance="loss", workers=2)
    trainer = L.Trainer(
        strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    dm = HeartDiseaseSites(site_cpus=2.0)
    try:
        trainer.fit(TabularMLP(), datamodule=dm)
    finally:
        strategy.shutdown()
    metrics = trainer.callback_metrics
    seen = {}
    for hospital, parts in dm.site_indices().items():
        _, y = load_heart_disease(hospital)
        counts = np.bincount(y[parts["train"]], minlength=2)
        expected = counts.sum() / (2 * counts)
        seen[hospital] = float(metrics[f"site/{hospital}/class_weight_1"])
        assert seen[hospital] == pytest.approx(expected[1], rel=1e-5)
        assert float(metrics[f"site/{hospital}/class_weight_0"]) == pytest.approx(expected[0], rel=1e-5)
    # Switzerland is ~94 % positive, Cleveland ~46 %: their weights differ as their data do
    assert seen["switzerland"] < 0.6 < 1.0 < seen["cleveland"]
