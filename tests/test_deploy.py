"""The model each site deploys: chosen on its own validation data among the models it holds, calibrated by
temperature scaling, kept at the site, reported by trainer.test."""

import math

import lightning as L
import numpy as np
import pytest
import torch

from lightning_fed import Deployment, FederatedStrategy
from lightning_fed.calibration import classifier_outputs, expected_calibration_error, fit_temperature
from lightning_fed.deploy import best


def test_temperature_scaling_undoes_overconfidence_and_lowers_the_calibration_error():
    torch.manual_seed(0)
    z = torch.randn(4000) * 1.5
    y = torch.bernoulli(z.sigmoid()).long()  # z is calibrated by construction
    overconfident = 4 * z
    temperature = fit_temperature(overconfident, y)
    assert temperature == pytest.approx(4.0, rel=0.1)
    before, after = (
        expected_calibration_error(overconfident, y),
        expected_calibration_error(overconfident, y, temperature),
    )
    assert after < before / 3 and after < 0.03
    # multi-class, and two logits read as binary: the same
    logits = torch.randn(3000, 4) * 2
    labels = torch.distributions.Categorical(logits=logits).sample()
    t = fit_temperature(3 * logits, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    assert expected_calibration_error(3 * logits, labels, t) < expected_calibration_error(3 * logits, labels)
    pair = torch.stack([torch.zeros_like(z), overconfident], 1)  # softmax of (0, x) is sigmoid(x)
    assert fit_temperature(pair, y) == pytest.approx(temperature, rel=1e-3)


def test_a_multi_label_model_is_calibrated_on_its_annotated_entries_only():
    torch.manual_seed(0)
    z = torch.randn(2000, 3) * 1.5
    y = torch.bernoulli(z.sigmoid()).long()
    y[:, 2] = -1  # a label this site never annotated: not a negative, not in the calibration
    y[:500, 0] = -1
    loader = [(4 * z[i : i + 250], y[i : i + 250]) for i in range(0, 2000, 250)]  # overconfident by 4
    logits, targets = classifier_outputs(torch.nn.Identity(), loader, torch.device("cpu"))
    assert logits.shape == targets.shape == (2000 + 1500,) and set(targets.tolist()) == {0, 1}
    temperature = fit_temperature(logits, targets)
    assert temperature == pytest.approx(4.0, rel=0.1)
    assert expected_calibration_error(logits, targets, temperature) < expected_calibration_error(logits, targets) / 3


def test_the_best_score_wins_nan_never_and_a_tie_goes_to_the_global_model():
    assert best({"global": 0.8, "personal": 0.9, "local": 0.7}, maximise=True) == "personal"
    assert best({"global": 0.8, "personal": 0.9, "local": 0.7}, maximise=False) == "local"
    assert best({"global": 0.9, "personal": 0.9}, maximise=True) == "global"
    assert best({"global": float("nan"), "fine_tuned": 0.1}, maximise=True) == "fine_tuned"
    with pytest.raises(ValueError, match="NaN"):
        best({"global": float("nan")}, maximise=True)
    assert Deployment(metric="loss").maximise is False and Deployment().maximise is True
    assert Deployment(metric="loss", mode="max").maximise is True
    with pytest.raises(ValueError, match="mode"):
        Deployment(mode="best")


@pytest.mark.integration
@pytest.mark.usefixtures("ray_cluster", "fed_data")
def test_each_site_deploys_the_model_best_on_its_validation_data_not_its_test_data(tmp_path):
    from lightning_fed.models import SmallCNN
    from tests.helpers import HospitalsWithFlippedTest

    torch.manual_seed(0)
    strategy = FederatedStrategy(
        aggregator="ditto",
        fine_tune_steps=2,
        deployment=Deployment(metric="auroc", local_baseline=True),
        progress=False,
        checkpoint_every=0,
        workers=2,
    )
    trainer = L.Trainer(
        strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    dm = HospitalsWithFlippedTest()
    try:
        trainer.fit(SmallCNN(), datamodule=dm)
        [out] = trainer.test(datamodule=dm, verbose=False)
    finally:
        strategy.shutdown()
    evaluation = strategy.last_evaluation
    assert set(evaluation.personal) == {"personal", "fine_tuned", "local", "deployed"}
    tested = {"global": evaluation, **evaluation.personal}
    disagree = 0
    for name, fit in strategy.last_fit.sites.items():
        deployment = fit.deployment
        scores = deployment.validation
        assert set(scores) == {"global", "personal", "fine_tuned", "local"}
        assert deployment.chosen == max(scores, key=scores.get)  # the best on validation
        assert (tmp_path / "sites" / name / "local.ckpt").exists()
        saved = torch.load(deployment.checkpoint, weights_only=False)
        assert saved["chosen"] == deployment.chosen and saved["temperature"] == deployment.temperature > 0
        row = evaluation.personal["deployed"].sites[name].values
        assert row["model"] == deployment.chosen
        assert math.isfinite(row["ece"]) and math.isfinite(row["ece_calibrated"])
        assert out[f"deployed/site/{name}/test_ece"] == pytest.approx(row["ece"])
        # the test labels are the validation labels flipped: every model's test AUROC is 1 - its validation AUROC
        test_auroc = {c: tested[c].sites[name].values["auroc"] for c in scores}
        for candidate, value in test_auroc.items():
            assert value == pytest.approx(1 - scores[candidate], abs=1e-5), (name, candidate)
        assert row["auroc"] == pytest.approx(test_auroc[deployment.chosen])
        disagree += deployment.chosen != max(test_auroc, key=test_auroc.get)
    assert disagree >= 1  # validation chose what test would not have: the choice never looks at test data
    assert np.isfinite(out["deployed/fl/test_auroc"])


def test_the_choice_reads_the_named_validation_metric_and_calibrate_false_fits_no_temperature(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_fed.deploy import choose_deployment

    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    candidates = {"global": torch.nn.Linear(3, 2), "personal": torch.nn.Linear(3, 2)}
    scores = {"global": {"auroc": 0.7, "loss": 0.4}, "personal": {"auroc": 0.6, "loss": 0.3}}
    by_name = {id(m): name for name, m in candidates.items()}

    def validate(module):
        return scores[by_name[id(module)]]

    def choose(settings, folder):
        return choose_deployment(
            "a", settings, candidates, validate, loader, torch.device("cpu"), str(tmp_path / folder)
        )

    model, temperature, report = choose(Deployment(metric="auroc"), "auroc")
    assert (
        report.chosen == "global"
        and model is candidates["global"]
        and report.validation == {"global": 0.7, "personal": 0.6}
    )
    assert temperature is not None and report.validation_ece is not None
    assert torch.load(report.checkpoint, weights_only=False)["temperature"] == temperature
    _, temperature, report = choose(Deployment(metric="loss", calibrate=False), "loss")
    assert report.chosen == "personal" and temperature is None and report.validation_ece is None
    with pytest.raises(ValueError, match="'recall' is not among its validation results \\(auroc, loss\\)"):
        choose(Deployment(metric="recall"), "recall")
