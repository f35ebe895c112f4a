"""ImageClassifier: timm backbones from local checkpoints, masked losses for partial labels, head warm-up."""

import os
import subprocess
import sys

import lightning as L
import pytest
import timm
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed.models import ImageClassifier
from tests.conftest import REPO


def _trained_timm(name="resnet10t", num_classes=10, in_chans=1, seed=0):
    """A 'pretrained' timm model: random weights plus BatchNorm statistics from a few batches."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, in_chans, 32, 32) * 2 + 1)
    return model


def test_local_checkpoint_loads_every_backbone_tensor_and_replaces_the_head(tmp_path):
    source = _trained_timm()
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": source.state_dict(), "source": "test"}, path)
    model = ImageClassifier("resnet10t", task="multilabel", num_classes=3, in_chans=1, pretrained=str(path))
    loaded, original = model.backbone.state_dict(), source.state_dict()
    for key, value in original.items():
        if key.startswith("fc."):
            assert loaded[key].shape != value.shape  # a new 3-label head, not the 10-class one
        else:
            assert torch.equal(loaded[key], value), key
    assert loaded["fc.weight"].shape == (3, 512)


def test_stem_is_adapted_to_fewer_input_channels(tmp_path):
    source = _trained_timm(in_chans=3)
    path = tmp_path / "rgb.pth"
    torch.save(source.state_dict(), path)
    model = ImageClassifier("resnet10t", task="binary", in_chans=1, pretrained=str(path))
    stem = model.backbone.state_dict()["conv1.0.weight"]
    # timm's rule for one channel: the RGB kernels summed
    assert torch.allclose(stem, source.state_dict()["conv1.0.weight"].sum(1, keepdim=True))
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 1)


def test_lightning_checkpoint_of_the_classifier_is_a_valid_source(tmp_path):
    first = ImageClassifier("resnet10t", task="multiclass", num_classes=4, in_chans=1)
    with torch.no_grad():
        first.backbone.conv1[0].weight.mul_(3.0)
    trainer = L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(first)
    trainer.save_checkpoint(tmp_path / "first.ckpt")
    second = ImageClassifier(
        "resnet10t", task="multiclass", num_classes=4, in_chans=1, pretrained=str(tmp_path / "first.ckpt")
    )
    for key, value in first.backbone.state_dict().items():
        assert torch.equal(second.backbone.state_dict()[key], value), key  # "backbone." prefix stripped, head kept


def test_checkpoints_that_do_not_fit_fail_with_one_line(tmp_path):
    wrong = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), wrong)
    with pytest.raises(ValueError, match=r"does not fit 'resnet10t'.*another architecture") as info:
        ImageClassifier("resnet10t", pretrained=str(wrong))
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageClassifier("resnet10t", pretrained=str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        ImageClassifier("resnet10t", pretrained=str(garbage))
    with pytest.raises(ValueError, match="unknown timm backbone 'resnett10'"):
        ImageClassifier("resnett10")
    with pytest.raises(ValueError, match="task must be"):
        ImageClassifier("resnet10t", task="regression")


@pytest.mark.integration  # starts processes
def test_imagenet_weights_without_internet_name_the_local_file_option():
    code = "from lightning_fed.models import ImageClassifier; ImageClassifier('resnet10t', pretrained=True)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "HF_HOME": "/nonexistent-hf-home"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: could not fetch ImageNet weights for 'resnet10t'")
    assert "pretrained='<path to a local checkpoint file>'" in last


def test_masked_losses_skip_unannotated_entries():
    torch.manual_seed(0)
    model = ImageClassifier("resnet10t", task="multilabel", num_classes=3, in_chans=1)
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.tensor([[1, 0, -1], [-1, -1, 1], [0, 1, 1], [-1, -1, -1]])
    loss = model.loss(logits, targets)
    annotated = targets >= 0
    expected = F.binary_cross_entropy_with_logits(logits[annotated], targets[annotated].float())
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.all(logits.grad[~annotated] == 0)  # an unknown label pushes the logit neither way
    assert torch.all(logits.grad[annotated] != 0)
    # an unannotated entry is not a negative: what the model says there never changes the loss
    shifted = logits.detach().clone()
    shifted[~annotated] += 100.0
    assert torch.allclose(model.loss(shifted, targets), expected)

    binary = ImageClassifier("resnet10t", task="binary", in_chans=1)
    b_logits, b_targets = torch.randn(4, 1), torch.tensor([1, -1, 0, 1])
    assert torch.allclose(
        binary.loss(b_logits, b_targets),
        F.binary_cross_entropy_with_logits(b_logits.reshape(-1)[[0, 2, 3]], torch.tensor([1.0, 0.0, 1.0])),
    )
    multiclass = ImageClassifier("resnet10t", task="multiclass", num_classes=3, in_chans=1)
    m_logits, m_targets = torch.randn(3, 3), torch.tensor([2, -1, 0])
    assert torch.allclose(multiclass.loss(m_logits, m_targets), F.cross_entropy(m_logits[[0, 2]], torch.tensor([2, 0])))
    assert multiclass.loss(m_logits, torch.tensor([-1, -1, -1])) == 0  # nothing annotated: no signal, no NaN


def test_head_warmup_trains_only_the_head_then_everything_but_frozen_layers():
    from lightning_fed.strategies.site.fedfbn import FedFBNSite, batchnorm_layers

    torch.manual_seed(0)
    model = ImageClassifier("resnet10t", task="multilabel", num_classes=3, in_chans=1, head_warmup_epochs=1, lr=1e-2)
    data = DataLoader(TensorDataset(torch.randn(32, 1, 32, 32), torch.randint(0, 2, (32, 3))), batch_size=8)
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots.append({k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()})

    start = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FedFBNSite(), Snapshot()],
    )
    trainer.fit(model, data)
    after_warmup, after_all = snapshots
    bn_keys = {f"{n}.{k}" for n, layer in batchnorm_layers(model.backbone).items() for k in layer.state_dict()}
    conv_keys = [k for k in start if k not in bn_keys and not k.startswith("fc.")]
    assert not torch.equal(after_warmup["fc.weight"], start["fc.weight"])
    assert all(torch.equal(after_warmup[k], start[k]) for k in conv_keys)  # epoch 0: the head alone
    assert any(not torch.equal(after_all[k], after_warmup[k]) for k in conv_keys)  # epoch 1: the backbone too
    assert all(torch.equal(after_all[k], start[k]) for k in bn_keys)  # FedFBN's frozen BatchNorm stays frozen
    assert all(not p.requires_grad for layer in batchnorm_layers(model.backbone).values() for p in layer.parameters())
