"""Study C: simulated multi-vendor CT hospitals, Dice and uncertainty metrics, uncertainty-weighted averaging,
hospitals without labels, the DICOM inventory, and a real ten-hospital federation of the recipe."""

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_fed import FederatedStrategy
from lightning_fed.data.ct_vendors import (
    SIGNATURES,
    STUDY_EXAMS,
    VENDORS,
    CTSlices,
    Exam,
    SimulatedCTHospitals,
    hospital_exams,
    simulate_exam,
    vendor_counts,
    window,
)
from lightning_fed.metric_states import sum_metric_states
from lightning_fed.metrics import TaskSpec, merge_metric_states, metric_states
from lightning_fed.models.segmentation import SegmentationModel
from lightning_fed.strategies import SiteUpdate, get_aggregator
from tests.test_cli import _main

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "ct_vendors.yaml"


# -- the simulated hospitals ------------------------------------------------------------------------------
@pytest.mark.parametrize("exams", [40, 97, 1000])
def test_vendor_mix_of_each_hospital_matches_the_study_table(exams):
    for hospital, counts in STUDY_EXAMS.items():
        total = sum(counts.values())
        drawn = vendor_counts(hospital, exams)
        assert sum(drawn.values()) == exams
        for vendor in VENDORS:
            assert abs(drawn[vendor] - exams * counts[vendor] / total) < 1, (hospital, vendor)
            if counts[vendor] == 0:
                assert drawn[vendor] == 0  # a vendor a hospital never had is never simulated there
        listed = hospital_exams(hospital, exams, seed=3)
        assert {v: sum(e.vendor == v for e in listed) for v in VENDORS} == drawn
        for exam in listed:  # each exam's model and kernel belong to its vendor
            assert exam.model in SIGNATURES[exam.vendor].models
            assert exam.kernel in {k.name for k in SIGNATURES[exam.vendor].kernels}
    assert vendor_counts("E", 40) == {"CANON": 40, "GE": 0, "PHILIPS": 0, "SIEMENS": 0}
    assert hospital_exams("G", 50, seed=0) == hospital_exams("G", 50, seed=0) != hospital_exams("G", 50, seed=1)


def test_a_hospital_without_labels_trains_on_images_alone():
    dm = SimulatedCTHospitals(hospitals=["A", "G"], exams=20, unlabelled=["G"], image_size=32)
    sites = {s.name: s for s in dm.federated_sites()}
    assert sites["A"].labelled and not sites["G"].labelled
    for name, site in sites.items():
        data = site.build_datamodule()
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        assert set(batch) == ({"image", "group"} if name == "G" else {"image", "group", "label"})
        assert (
            batch["image"].shape[1:] == (1, 32, 32)
            and 0 <= float(batch["image"].min())
            and float(batch["image"].max()) <= 1
        )
        assert "label" in next(iter(data.test_dataloader()))  # simulation keeps hidden labels for evaluation
    with pytest.raises(ValueError, match="at least one hospital needs ground truth"):
        SimulatedCTHospitals(hospitals=["A"], unlabelled=["A"])
    with pytest.raises(ValueError, match="unknown hospitals"):
        SimulatedCTHospitals(hospitals=["A", "K"])


# -- Dice, merged as counts -------------------------------------------------------------------------------
def _hand_dice(pred, true, classes):
    out = []
    for c in classes:
        tp = np.sum((pred == c) & (true == c))
        fp = np.sum((pred == c) & (true != c))
        fn = np.sum((pred != c) & (true == c))
        out.append(2 * tp / (2 * tp + fp + fn))
    return out


def test_dice_per_class_group_and_federated_merge_match_hand_computations():
    rng = np.random.default_rng(0)
    spec = TaskSpec("segmentation", 3, groups=("CANON", "GE"))
    sites, exports = {}, []
    for k, n in enumerate((2, 5)):
        true = rng.integers(0, 3, size=(n, 6, 6))
        pred = np.where(rng.random((n, 6, 6)) < 0.3 + 0.4 * k, rng.integers(0, 3, size=(n, 6, 6)), true)
        groups = np.array([0] * (n - 1) + [1])
        metrics = spec.build()
        logits = torch.nn.functional.one_hot(torch.from_numpy(pred), 3).permute(0, 3, 1, 2).float()
        metrics["dice"].update(logits.argmax(1), torch.from_numpy(true), torch.from_numpy(groups))
        values = merge_metric_states(spec, [metric_states(metrics)])
        expected = _hand_dice(pred, true, range(3))
        assert values["dice_per_class"] == pytest.approx(expected)
        assert values["dice"] == pytest.approx(np.mean(expected[1:]))  # mean over foreground classes
        assert values["dice_ge"] == pytest.approx(np.mean(_hand_dice(pred[groups == 1], true[groups == 1], (1, 2))))
        sites[k] = (pred, true, values["dice"])
        exports.append({"spec": spec.__dict__, "states": metric_states(metrics), "num_samples": n})
    summed = sum_metric_states(exports)
    merged = merge_metric_states(TaskSpec(**summed["spec"]), [summed["states"]])
    pooled_pred = np.concatenate([sites[0][0], sites[1][0]])
    pooled_true = np.concatenate([sites[0][1], sites[1][1]])
    assert merged["dice"] == pytest.approx(np.mean(_hand_dice(pooled_pred, pooled_true, (1, 2))))
    assert merged["dice"] != pytest.approx(np.mean([sites[0][2], sites[1][2]]))  # not the mean of the sites' scores


# -- uncertainty under shift ------------------------------------------------------------------------------
def _vendor_exams(vendor, n, offset):
    exams = [
        Exam(offset + i, vendor, SIGNATURES[vendor].models[i % 2], SIGNATURES[vendor].kernels[i % 2].name)
        for i in range(n)
    ]
    drawn = [simulate_exam(e, 0, "A", 64) for e in exams]
    return CTSlices(
        np.stack([window(h) for h, _ in drawn]),
        np.stack([label for _, label in drawn]),
        np.full(n, VENDORS.index(vendor)),
        with_labels=True,
    )


def test_mc_dropout_uncertainty_is_higher_on_a_shifted_vendor():
    L.seed_everything(0)
    model = SegmentationModel()
    trainer = L.Trainer(
        max_epochs=40, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, DataLoader(_vendor_exams("CANON", 32, 0), batch_size=8, shuffle=True))
    seen = {}
    for vendor in ("CANON", "SIEMENS"):
        batch = next(iter(DataLoader(_vendor_exams(vendor, 16, 1000), batch_size=16)))
        u = model.predictive_uncertainty(batch["image"])
        model.eval()
        with torch.no_grad():
            accuracy = float((model(batch["image"]).argmax(1) == batch["label"]).float().mean())
        seen[vendor] = (float(u.mutual_information.mean()), float(u.entropy.mean()), accuracy)
        torch.testing.assert_close(u.entropy, u.aleatoric + u.mutual_information)  # BALD's split of the entropy
    assert seen["SIEMENS"][0] > 1.3 * seen["CANON"][0], seen  # mutual information: what the model does not know
    assert seen["SIEMENS"][1] > seen["CANON"][1] and seen["SIEMENS"][2] < seen["CANON"][2], seen


def test_evidential_head_uncertainty_and_loss():
    model = SegmentationModel(head="evidential", dropout=0.0)
    batch = next(iter(DataLoader(_vendor_exams("GE", 4, 0), batch_size=4)))
    u = model.predictive_uncertainty(batch["image"])
    torch.testing.assert_close(u.probs.sum(1), torch.ones(4, 64, 64))
    assert torch.all(u.mutual_information >= 0) and torch.all(u.aleatoric > 0)
    loss = model.supervised_loss(model(batch["image"]), batch["label"])
    loss.backward()
    assert torch.isfinite(loss) and model.net.model[0].conv.unit0.conv.weight.grad.abs().sum() > 0


# -- hospitals without labels -----------------------------------------------------------------------------
def test_an_unlabelled_batch_never_reaches_the_supervised_loss(monkeypatch):
    model = SegmentationModel()
    monkeypatch.setattr(model, "supervised_loss", lambda *a: pytest.fail("supervised loss on an unlabelled site"))
    dm = SimulatedCTHospitals(hospitals=["A", "J"], exams=16, unlabelled=["J"], image_size=32)
    data = dm.hospital_data("J")
    data.setup("fit")
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, data.train_dataloader())
    assert model.supervised_batches == 0 and model.pseudo_labelled_batches == len(data.train_dataloader())
    assert 0 <= float(trainer.callback_metrics["train_pseudo_label_fraction"]) <= 1


# -- uncertainty-weighted averaging -----------------------------------------------------------------------
def test_uncertainty_weighted_rule_against_hand_computation():
    updates = [
        SiteUpdate(
            s, {"w": np.array([w], np.float32), "n": np.array(c)}, n, {"uncertainty": {"epistemic": e, "aleatoric": a}}
        )
        for s, w, c, n, e, a in [
            ("a", 1.0, 3, 10, 0.02, 0.10),
            ("b", 2.0, 5, 30, 0.06, 0.05),
            ("c", 4.0, 7, 20, 0.01, 0.20),
        ]
    ]
    fedevi = get_aggregator("uncertainty_weighted")
    raw = np.array([0.02 / 0.10, 0.06 / 0.05, 0.01 / 0.20])
    a = raw / raw.sum()
    out = fedevi.aggregate(1, updates, None)
    assert out.weights["w"][0] == pytest.approx(float(a @ [1.0, 2.0, 4.0]), rel=1e-6)
    assert int(out.weights["n"]) == 5  # integer buffers from the largest site, never averaged
    assert [out.extras["metrics"][f"weight/{s}"] for s in "abc"] == pytest.approx(list(a))
    floored = get_aggregator("uncertainty_weighted", min_weight=0.1).site_weights(updates)
    clipped = np.clip(a, 0.1, None)
    assert list(floored) == pytest.approx(list(clipped / clipped.sum()))
    epistemic = get_aggregator("uncertainty_weighted", score="epistemic").site_weights(updates)
    b = np.array([10 * 0.02, 30 * 0.06, 20 * 0.01])
    assert list(epistemic) == pytest.approx(list(b / b.sum()))
    with pytest.raises(ValueError, match="sent no uncertainty scores"):
        fedevi.aggregate(2, [SiteUpdate("x", {"w": np.ones(1, np.float32)}, 1)], None)
    with pytest.raises(ValueError, match="predictive_uncertainty"):
        fedevi.check_model(torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="score must be"):
        get_aggregator("uncertainty_weighted", score="entropy")


# -- inventory from DICOM headers -------------------------------------------------------------------------
def _dicom_sites(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    a, b = tmp_path / "hospital_a", tmp_path / "hospital_b"
    (a / "series1").mkdir(parents=True)
    b.mkdir()
    ct = get_testdata_file("CT_small.dcm")
    shutil.copy(ct, a / "series1" / "1.dcm")
    (a / "notes.txt").write_text("not a DICOM file")
    study = generate_uid()
    for i, (maker, model, kernel, exam) in enumerate(
        [
            ("TOSHIBA", "Aquilion", "FC18", study),
            ("TOSHIBA", "Aquilion", "FC18", study),
            ("SIEMENS", "SOMATOM Force", "Br40", generate_uid()),
        ]
    ):
        ds = pydicom.dcmread(ct)  # two images of one Toshiba exam, one Siemens exam
        ds.Manufacturer, ds.ManufacturerModelName, ds.ConvolutionKernel, ds.StudyInstanceUID = (
            maker,
            model,
            kernel,
            exam,
        )
        ds.save_as(b / f"{i}.dcm")
    return a, b


def test_inventory_reads_vendor_model_and_kernel_from_dicom_headers(tmp_path, monkeypatch, capsys):
    from lightning_fed.data.dicom import count_exams, read_dicom_headers

    a, b = _dicom_sites(tmp_path)
    records, skipped = read_dicom_headers(a)
    assert skipped == 1 and len(records) == 1
    assert count_exams(records) == [
        {"vendor": "GE", "model": "RHAPSODE", "kernel": "STANDARD", "exams": 1, "images": 1}
    ]
    rows = count_exams(read_dicom_headers(b)[0])
    assert rows == [
        {"vendor": "CANON", "model": "Aquilion", "kernel": "FC18", "exams": 1, "images": 2},  # Toshiba is Canon now
        {"vendor": "SIEMENS", "model": "SOMATOM Force", "kernel": "Br40", "exams": 1, "images": 1},
    ]
    out = tmp_path / "inventory.csv"
    code, stdout, err = _main(["inventory", str(a), str(b), "--out", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert "1 files were not DICOM" in stdout and "SOMATOM Force" in stdout
    lines = out.read_text().splitlines()
    assert lines[0] == "site,vendor,model,kernel,exams,images" and "hospital_b,CANON,Aquilion,FC18,1,2" in lines
    code, _, err = _main(["inventory", str(tmp_path / "nope")], monkeypatch, capsys)
    assert code == 2 and "does not exist" in err.strip().splitlines()[-1]


def test_inventory_of_the_recipe_counts_inside_every_site(ray_cluster, tmp_path):
    from lightning_fed.inventory import recipe_inventory

    rows = recipe_inventory([str(RECIPE)], ["--trainer.logger=false", "--data.init_args.exams=30"])
    assert {r["site"] for r in rows} == set(STUDY_EXAMS)
    for hospital in STUDY_EXAMS:
        per_vendor = {v: sum(r["exams"] for r in rows if r["site"] == hospital and r["vendor"] == v) for v in VENDORS}
        assert per_vendor == vendor_counts(hospital, 30)


# -- the recipe, federated --------------------------------------------------------------------------------
def test_ten_hospital_federation_with_three_unlabelled(ray_cluster, tmp_path):
    """The recipe's ten hospitals, three without labels, uncertainty-weighted: trains, weights every round,
    reports Dice and uncertainty per hospital and vendor, marks the hidden labels."""
    dm = SimulatedCTHospitals(exams=24, unlabelled=["C", "G", "J"], image_size=32, site_cpus=0.2)
    # two one-thread workers of five hospitals each: two processes to start instead of five
    strategy = FederatedStrategy(aggregator="uncertainty_weighted", sync_every=1, progress=False, workers=2)
    trainer = L.Trainer(
        strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    trainer.fit(SegmentationModel(mc_samples=4), datamodule=dm)
    fit = strategy.last_fit
    assert len(fit.round_metrics) == 2
    for weights in fit.round_metrics:
        assert sum(weights[f"weight/{h}"] for h in STUDY_EXAMS) == pytest.approx(1.0)
    metrics = trainer.callback_metrics
    assert "site/C/train_pseudo_label_fraction" in metrics and "site/A/train_pseudo_label_fraction" not in metrics
    trainer.test(trainer.lightning_module, datamodule=dm, verbose=False)
    evaluation = strategy.last_evaluation
    rows = evaluation.rows()
    assert {r.get("labels") for n, r in rows.items() if n in ("C", "G", "J")} == {"hidden"}
    assert all("labels" not in rows[n] for n in ("A", "B", "D"))
    assert any("without labels (C, G, J)" in note for note in evaluation.notes)
    assert 0 < rows["federated"]["dice"] < 1 and rows["federated"]["mutual_information"] > 0
    assert "dice_siemens" in rows["G"] and "dice_siemens" not in rows["E"]  # E scans on CANON only
    assert "mutual_information_canon" in rows["E"]


class _MislabelledSites(SimulatedCTHospitals):
    def federated_sites(self):
        sites = super().federated_sites()
        sites[1].labelled = False  # declared without labels, but its data still carries them
        return sites


def test_a_site_declared_unlabelled_whose_batches_carry_labels_is_stopped(ray_cluster, tmp_path):
    dm = _MislabelledSites(hospitals=["A", "B"], exams=12, image_size=32, site_cpus=0.5)
    trainer = L.Trainer(
        strategy=FederatedStrategy(progress=False),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(Exception, match="site 'B' is declared labelled=False but its training batches carry targets"):
        trainer.fit(SegmentationModel(mc_samples=2), datamodule=dm)


# -- a hospital's own CT folder ---------------------------------------------------------------------------
def _nifti_folder(root, cases=5, with_labels=True):
    import nibabel as nib

    (root / "images").mkdir(parents=True)
    if with_labels:
        (root / "labels").mkdir()
    for i in range(cases):
        volume, mask = np.full((40, 40, 6), -1000.0), np.zeros((40, 40, 6), np.uint8)
        volume[8:32, 8:32, 1:5], mask[8:32, 8:32, 1:5] = -100, 1  # fat around muscle, on slices 1-4
        volume[14:26, 14:26, 1:5], mask[14:26, 14:26, 1:5] = 50, 2
        affine = np.diag([0.8, 0.8, 5.0, 1])
        nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), root / "images" / f"case{i}.nii.gz")
        if with_labels:
            nib.save(nib.Nifti1Image(mask, affine), root / "labels" / f"case{i}.nii.gz")
    (root / "cases.csv").write_text(
        "case,vendor\n" + "".join(f"case{i},{'GE' if i % 2 else 'Siemens'}\n" for i in range(cases))
    )
    return root


def test_ct_folder_site_reads_nifti_volumes_by_case(tmp_path):
    from lightning_fed.data.ct import CTFolderSite

    site = CTFolderSite(str(_nifti_folder(tmp_path / "h")), image_size=32, test_fraction=0.2, val_fraction=0.2)
    site.setup("fit")
    splits = site.split_cases()
    assert sorted(sum(splits.values(), [])) == [f"case{i}" for i in range(5)]  # cases, not slices, are split
    assert {k: len(v) for k, v in site.datasets.items()} == {
        k: 4 * len(v) for k, v in splits.items()
    }  # 4 labelled slices each
    batch = next(iter(site.train_dataloader()))
    assert (
        batch["image"].shape[1:] == (1, 32, 32)
        and float(batch["image"].max()) <= 1
        and float(batch["image"].min()) >= 0
    )
    assert set(batch["label"].unique().tolist()) == {0, 1, 2}
    assert set(batch["group"].tolist()) <= {VENDORS.index("GE"), VENDORS.index("SIEMENS")}
    assert site.inventory() == [
        {"vendor": "SIEMENS", "model": "(not recorded)", "kernel": "(not recorded)", "exams": 3, "images": 3},
        {"vendor": "GE", "model": "(not recorded)", "kernel": "(not recorded)", "exams": 2, "images": 2},
    ]
    unlabelled = CTFolderSite(str(_nifti_folder(tmp_path / "u", with_labels=False)), image_size=32, slice_step=2)
    unlabelled.setup("fit")
    assert "label" not in next(iter(unlabelled.train_dataloader()))
    with pytest.raises(FileNotFoundError, match="has no images/ folder"):
        CTFolderSite(str(tmp_path / "nothing")).setup("fit")


def test_ct_folder_site_reads_a_dicom_series(tmp_path):
    import copy

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from lightning_fed.data.ct import CTFolderSite

    series_dir = tmp_path / "h" / "images" / "p1"
    series_dir.mkdir(parents=True)
    source, series = pydicom.dcmread(get_testdata_file("CT_small.dcm")), generate_uid()
    for z in range(3):
        ds = copy.deepcopy(source)
        ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = generate_uid(), series, z + 1
        ds.ImagePositionPatient = [
            *map(float, source.ImagePositionPatient[:2]),
            float(source.ImagePositionPatient[2]) + 5 * z,
        ]
        ds.save_as(series_dir / f"{z}.dcm")
    site = CTFolderSite(str(tmp_path / "h"), image_size=32, spacing=None, slice_step=1)
    assert site.vendors() == {"p1": "GE"}
    assert site.inventory() == [{"vendor": "GE", "model": "RHAPSODE", "kernel": "STANDARD", "exams": 1, "images": 3}]
    images, labels = site._slices("p1", site.cases()["p1"], with_labels=False)
    assert images.shape == (3, 32, 32) and labels is None and 0 <= images.min() < images.max() <= 1


def test_compare_holds_hospitals_out_in_turn(ray_cluster, tmp_path):
    """Leave-one-hospital-out: no model trains on the held-out hospital, every model is tested there."""
    from lightning_fed.experiments import compare

    out = tmp_path / "loo"
    report = compare(
        [
            "--config",
            str(RECIPE),
            "--modes",
            "pooled,federated",
            "--holdout",
            "E,G",
            "--out",
            str(out),
            "--trainer.logger=false",
            "--trainer.max_epochs=1",
            "--data.init_args.hospitals=[A,E,G]",
            "--data.init_args.exams=12",
            "--data.init_args.image_size=32",
            "--data.init_args.site_cpus=0.5",
        ]
    )
    assert report["holdouts"] == ["E", "G"] and report["metrics"] == ["dice", "mutual_information", "entropy"]
    for held in ("E", "G"):
        single = json.loads((out / f"holdout-{held}" / "results.json").read_text())
        assert single["holdout"] == held and held in single["columns"]
        for run in single["runs"]:
            assert run["holdout"] == held and held in run["evaluations"][run["mode"]]
        assert report["rows"]["federated"][held]["dice"]["mean"] == single["summary"]["federated"][held]["dice"]["mean"]
        assert (out / f"holdout-{held}" / "shift_federated.png").is_file()
    assert "| federated |" in (out / "results.md").read_text() and "E (held out)" in (out / "results.md").read_text()
    # the held-out sites share one pool: the second one's runs start no worker process
    second = json.loads((out / "holdout-G" / "results.json").read_text())
    assert all(run["warm"] for run in second["runs"]) and second["startup"]["worker_processes_started"] == 0


def test_held_out_sites_leave_exactly_one_hospital_out():
    from lightning_fed.data.pooled import HeldOutSites

    dm = SimulatedCTHospitals(hospitals=["A", "E", "G"], exams=12)
    assert [s.name for s in HeldOutSites(dm, "E").federated_sites()] == ["A", "G"]
    with pytest.raises(ValueError, match="'K' is not a site of the recipe"):
        HeldOutSites(dm, "K").federated_sites()
    with pytest.raises(ValueError, match="needs a datamodule that names its sites"):
        HeldOutSites(L.LightningDataModule(), "A").federated_sites()


def test_fiva_weights_each_parameter_by_its_precision():
    updates = [
        SiteUpdate(
            "a",
            {"w": np.array([1.0, 1.0], np.float32), "bn": np.array([1.0], np.float32)},
            10,
            {"precision": {"w": np.array([3.0, 1e-8])}},
        ),
        SiteUpdate(
            "b",
            {"w": np.array([3.0, 5.0], np.float32), "bn": np.array([5.0], np.float32)},
            30,
            {"precision": {"w": np.array([1.0, 2.0])}},
        ),
    ]
    out = get_aggregator("fiva").aggregate(1, updates, None).weights
    assert out["w"] == pytest.approx([(3 * 1 + 1 * 3) / 4, 5.0], rel=1e-6)  # a parameter site a never moved: b's
    assert out["bn"] == pytest.approx([0.25 * 1 + 0.75 * 5])  # no precision (a buffer): sample-weighted
    with pytest.raises(ValueError, match="sent no precisions"):
        get_aggregator("fiva").aggregate(1, [SiteUpdate("x", {"w": np.ones(1, np.float32)}, 1)], None)


def test_fiva_site_half_sends_n_times_the_mean_squared_gradient():
    from lightning_fed.strategies.site.fiva import FisherPrecision

    module = torch.nn.Linear(2, 1, bias=False)
    site = FisherPrecision(prior=0.5)
    for grad in ([1.0, 2.0], [3.0, 0.0]):
        module.weight.grad = torch.tensor([grad])
        site.on_after_backward(None, module)
    update = site.local_update(None, module, num_samples=8)
    assert update.extras["precision"]["weight"] == pytest.approx(np.array([[8 * (1 + 9) / 2 + 0.5, 8 * 4 / 2 + 0.5]]))
