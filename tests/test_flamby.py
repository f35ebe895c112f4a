"""FLamby's Fed-Heart-Disease and Fed-TCGA-BRCA: FLamby's exact splits, its Cox loss and C-index, and federations
that report every centre's metrics."""

import csv
import hashlib
import math

import numpy as np
import pytest
import torch

from lightning_fed.data.flamby import (
    HEART_SIZES,
    TCGA_REGIONS,
    TCGA_SIZES,
    FedHeartDisease,
    FedTcgaBrca,
    load_tcga_brca,
)
from lightning_fed.models.survival import CoxModel, LogisticRegression, concordance_index, cox_loss


def _site_data(dm, name):
    data = next(s for s in dm.federated_sites() if s.name == name).build_datamodule()
    data.setup("fit")
    return data.datasets


def _trainer(max_epochs, **kwargs):
    import lightning as L

    return L.Trainer(
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


# -- the splits ----------------------------------------------------------------------------------------------------
# FLamby's fed_heart_disease/README.md: "Train/Test: 199/104, 172/89, 30/16, 85/45"; the labels and the fingerprint
# of the encoded (unstandardised) features and labels of each split come from running FLamby's own dataset.py
# (owkin/FLamby @ edacf54) on the same four files
FLAMBY_HEART = {
    "cleveland": ((199, 91, "7d9912231d278b46"), (104, 48, "3c1059d0270add94")),
    "hungary": ((172, 65, "75c994c9d7bfa1c5"), (89, 33, "2b06af9156512dde")),
    "switzerland": ((30, 30, "c08f78aba985271f"), (16, 15, "c2ae9d85fdeda361")),
    "va_long_beach": ((85, 66, "471b0ce511e653bc"), (45, 35, "842f6bb8a2f2c422")),
}
# FLamby's fed_tcga_brca/README.md: "Train/Test: 248/63, 156/40, 164/42, 129/33, 129/33, 40/11"; events per split
TCGA_EVENTS = {
    "northeast": (45, 14),
    "south": (35, 4),
    "west": (14, 8),
    "midwest": (16, 3),
    "europe": (7, 2),
    "canada": (2, 1),
}


def test_heart_disease_centres_are_flambys_split_encoding_and_scaling(fed_data):
    assert {c: tuple(n for n, _, _ in v) for c, v in FLAMBY_HEART.items()} == HEART_SIZES
    for centre, expected in FLAMBY_HEART.items():
        raw = _site_data(FedHeartDisease(normalize=False), centre)
        for split, (size, positives, fingerprint) in zip(("train", "test"), expected):
            x, y = raw[split].tensors
            assert x.shape == (size, 13) and int(y.sum()) == positives
            assert hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16] == fingerprint
        # FLamby standardises each centre with its own training rows (unbiased std + 1e-9)
        x = _site_data(FedHeartDisease(), centre)["train"].tensors[0]
        constant = raw["train"].tensors[0].std(0) == 0  # Zurich's cholesterol is always 0: it stays 0
        assert torch.allclose(x.mean(0), torch.zeros(13), atol=1e-5)
        assert torch.allclose(x.std(0)[~constant], torch.ones(int((~constant).sum())), atol=1e-4)
        assert torch.all(x[:, constant] == 0)
    pooled = _site_data(FedHeartDisease(pooled=True), "pooled")
    assert [len(pooled[s]) for s in ("train", "test")] == [486, 254]
    x = pooled["train"].tensors[0]  # pooled: one set of statistics over every centre's training rows
    assert torch.allclose(x.mean(0), torch.zeros(13), atol=1e-5) and abs(float(x[:199].mean(0).abs().max())) > 0.1


def test_tcga_brca_regions_are_flambys_split(fed_data):
    for region in TCGA_REGIONS:
        data = _site_data(FedTcgaBrca(), region)
        for split, size, events in zip(("train", "test"), TCGA_SIZES[region], TCGA_EVENTS[region]):
            x, event, time = data[split].tensors
            assert x.shape == (size, 39) and int(event.sum()) == events
            assert set(event.tolist()) <= {0.0, 1.0} and bool((time >= 0).all())
    pooled = _site_data(FedTcgaBrca(pooled=True), "pooled")
    assert [len(pooled[s]) for s in ("train", "test")] == [866, 222]
    # FLamby's region k is fold2 train_k/test_k; its name is the region of the patients' tissue source sites
    with open(fed_data / "fed_tcga_brca" / "centers.csv", newline="") as fh:
        region_of = {row["TSS Code"]: row["Region"].lower() for row in csv.DictReader(fh)}
    with open(fed_data / "fed_tcga_brca" / "train_test_split.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            assert region_of[row["pid"].split("-")[1]] == TCGA_REGIONS[int(row["fold2"].split("_")[1])]


def test_a_federation_needs_the_strategy_and_missing_files_say_where(tmp_path):
    with pytest.raises(ValueError, match="FederatedStrategy"):
        FedTcgaBrca().setup("fit")
    with pytest.raises(FileNotFoundError, match="LIGHTNING_FED_DATA") as err:
        load_tcga_brca("train", data_dir=str(tmp_path), download=False)
    assert str(tmp_path) in str(err.value) and "brca.csv" in str(err.value)
    with pytest.raises(ValueError, match="pick from"):
        FedHeartDisease(centres=["cleveland", "zurich"])


# -- the Cox loss and the C-index ------------------------------------------------------------------------------------
def test_cox_loss_is_flambys_partial_likelihood():
    h = [0.5, -1.0, 2.0, 0.3, 0.1]
    time = [5.0, 3.0, 5.0, 8.0, 1.0]  # patients 0 and 2 both die at t = 5
    event = [1.0, 1.0, 1.0, 0.0, 1.0]  # patient 3 is censored
    e = [math.exp(v) for v in h]
    # FLamby orders by time, longest first, keeping the batch's order among ties: 3, 0, 2, 1, 4; each event's risk
    # set is itself and everyone before it, so patient 0 (tied with 2 but earlier) does not have 2 in its risk set
    by_hand = (
        (math.log(e[3] + e[0]) - h[0])
        + (math.log(e[3] + e[0] + e[2]) - h[2])
        + (math.log(e[3] + e[0] + e[2] + e[1]) - h[1])
        + (math.log(sum(e)) - h[4])
    ) / 5  # divided by every patient, the censored one included
    loss = cox_loss(torch.tensor(h).reshape(5, 1), torch.tensor(event), torch.tensor(time))
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)
    assert float(cox_loss(torch.tensor([0.3]), torch.tensor([1.0]), torch.tensor([2.0]))) == 0.0

    torchsurv = pytest.importorskip("torchsurv.loss.cox")  # (torchsurv 0.2 also needs pandas installed)
    # without tied times it is the exact partial likelihood: torchsurv's mean over events, rescaled to all patients
    g = torch.Generator().manual_seed(0)
    h, time = torch.randn(40, generator=g), torch.randperm(40, generator=g).float()
    event = torch.rand(40, generator=g) < 0.4
    library = torchsurv.neg_partial_log_likelihood(h, event, time, reduction="mean")
    assert float(cox_loss(h, event, time)) == pytest.approx(float(library) * int(event.sum()) / 40, rel=1e-5)


def test_concordance_index_is_harrells_c_with_flambys_ties():
    time = torch.tensor([1.0, 2.0, 2.0, 3.0, 4.0, 2.0])
    event = torch.tensor([1, 1, 0, 1, 0, 1])
    risk = torch.tensor([0.9, 0.5, 0.5, 0.7, 0.1, 0.2])
    # comparable pairs (i died first; a death and a censoring at the same time count, two deaths at one time not):
    # 0 vs 1,2,3,4,5: all concordant (5); 1 vs 2 (tied risk: 1/2), 3 (discordant), 4 (concordant): 1.5 of 3;
    # 5 vs 2, 3 (discordant), 4 (concordant): 1 of 3; 3 vs 4: concordant (1)
    assert concordance_index(risk, event, time) == pytest.approx(8.5 / 12)
    assert math.isnan(concordance_index(risk, torch.zeros(6), time))  # no event: no comparable pair

    cindex = pytest.importorskip("torchsurv.metrics.cindex")
    g = torch.Generator().manual_seed(1)
    time, event = torch.randint(0, 12, (60,), generator=g).float(), torch.rand(60, generator=g) < 0.5
    risk = torch.randint(0, 5, (60,), generator=g).float()  # ties in time and in risk
    library = cindex.ConcordanceIndex()(risk, event, time)
    assert concordance_index(risk, event, time) == pytest.approx(float(library), abs=1e-6)


def test_cox_model_scores_the_whole_epoch_not_batches(fed_data):
    torch.manual_seed(0)
    dm = FedTcgaBrca(pooled=True, eval_batch_size=16)
    model = CoxModel()
    trainer = _trainer(2)
    trainer.fit(model, datamodule=dm)
    [result] = trainer.test(model, datamodule=dm, verbose=False)
    x, event, time = dm.datasets["test"].tensors
    with torch.no_grad():
        whole = concordance_index(model(x), event, time)
    assert result["test_c_index"] == pytest.approx(whole, abs=1e-6)
    assert (
        result["test_c_index"] > 0.65
    )  # FLamby's pooled baseline: 0.70 ± 0.11 (five seeds, 30 epochs, pooled test set)


# -- federations -----------------------------------------------------------------------------------------------------
def _federate(model, dm, tmp_path, max_epochs=2):
    import lightning as L

    from lightning_fed import FederatedStrategy

    strategy = FederatedStrategy(progress=False, checkpoint_every=0, workers=2)  # with 2-CPU sites: the tests' layout
    trainer = L.Trainer(
        strategy=strategy, max_epochs=max_epochs, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    try:
        trainer.fit(model, datamodule=dm)
        trainer.test(datamodule=dm, verbose=False)
    finally:
        strategy.shutdown()
    return strategy.last_evaluation.rows()


@pytest.mark.integration
@pytest.mark.usefixtures("fed_data")
def test_heart_disease_federation_tests_every_centre(tmp_path, ray_cluster):
    torch.manual_seed(0)
    # lr 1e-2 (FLamby's Cyclic and FedAdam rate): at the pooled baseline's 1e-3, two epochs barely move the weights
    rows = _federate(LogisticRegression(lr=1e-2), FedHeartDisease(site_cpus=2.0), tmp_path)
    assert set(rows) == {*HEART_SIZES, "federated"}
    for centre, (_, test) in HEART_SIZES.items():
        assert int(np.sum(rows[centre]["confusion_matrix"])) == test  # each tested on its own patients
        assert 0.0 <= rows[centre]["acc"] <= 1.0
    assert rows["federated"]["acc"] > 0.65  # FLamby's FedAvg: 0.75 on its pooled test set (15 rounds of 100 steps)


@pytest.mark.integration
@pytest.mark.usefixtures("fed_data")
def test_tcga_brca_federation_reports_each_regions_c_index(tmp_path, ray_cluster):
    torch.manual_seed(0)
    rows = _federate(CoxModel(), FedTcgaBrca(site_cpus=2.0), tmp_path)
    assert set(rows) == {*TCGA_REGIONS, "federated"}
    for region, (_, test) in TCGA_SIZES.items():
        assert 0.0 <= rows[region]["c_index"] <= 1.0 and math.isfinite(rows[region]["loss"])
        # log hazards are no class scores: the built-in classification metrics stay off (lightning_fed_metrics)
        assert not {"accuracy", "recall", "auroc", "confusion_matrix"} & set(rows[region])
    assert rows["federated"]["c_index"] > 0.5


# -- fine-tuning after the federated run (FLamby's FedAvgFineTuning) -------------------------------------------------
@pytest.mark.integration
@pytest.mark.usefixtures("fed_data")
def test_fine_tuning_takes_its_steps_with_the_sites_optimizer_and_is_tested_beside_the_global_model(
    tmp_path, ray_cluster
):
    import lightning as L

    from lightning_fed import FederatedStrategy

    torch.manual_seed(0)
    dm = FedHeartDisease()
    strategy = FederatedStrategy(progress=False, checkpoint_every=0, sync_every_steps=5, fine_tune_steps=7)
    trainer = L.Trainer(
        strategy=strategy, max_steps=10, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    try:
        trainer.fit(LogisticRegression(lr=1e-2), datamodule=dm)
        global_weights = {k: v.clone() for k, v in trainer.lightning_module.state_dict().items()}
        [out] = trainer.test(datamodule=dm, verbose=False)
    finally:
        strategy.shutdown()
    evaluation = strategy.last_evaluation
    assert set(evaluation.personal) == {"fine_tuned"}
    tuned = evaluation.personal["fine_tuned"]
    # the module's own key keeps meaning the global model; the fine-tuned models are under fine_tuned/...
    assert out["test_acc"] == pytest.approx(evaluation.federated["fl/test_acc"])
    assert out["fine_tuned/test_acc"] == pytest.approx(tuned.federated["fl/test_acc"])
    moved = 0
    for name in HEART_SIZES:
        fine_tuning = strategy.last_fit.sites[name].fine_tuning
        assert fine_tuning.steps == 7 and f"site/{name}/fine_tuned/train_loss" in trainer.callback_metrics
        saved = torch.load(fine_tuning.checkpoint, weights_only=False)
        assert fine_tuning.checkpoint == str(tmp_path / "sites" / name / "fine_tuned.ckpt")
        assert saved["global_step"] == 7
        # Adam carried on from the federated run: 10 steps there, 7 here
        assert {int(s["step"]) for s in saved["optimizer_states"][0]["state"].values()} == {17}
        weights = saved["state_dict"]
        assert not all(torch.equal(weights[k], global_weights[k]) for k in global_weights)
        # what the site tested as its fine-tuned model is the model it kept: tested again here, outside
        model = LogisticRegression(lr=1e-2)
        model.load_state_dict(weights)
        x, y = _site_data(dm, name)["test"].tensors
        with torch.no_grad():
            accuracy = float(((model(x).squeeze(-1) > 0) == (y.squeeze(-1) > 0.5)).float().mean())
        assert tuned.sites[name].scalars["test_acc"] == pytest.approx(accuracy, abs=1e-6)
        assert out[f"fine_tuned/site/{name}/test_acc"] == pytest.approx(accuracy, abs=1e-6)
        moved += tuned.sites[name].scalars["test_loss"] != evaluation.sites[name].scalars["test_loss"]
    assert moved == len(HEART_SIZES)
