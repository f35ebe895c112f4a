"""Dataset files: read from a folder, downloaded with MD5 checks, clear errors otherwise."""

import functools
import http.server
import os
import shutil
import threading

import numpy as np
import pytest

from lightning_fed.data import HospitalsDataModule, load_fashion_mnist
from lightning_fed.data.download import ensure_files
from lightning_fed.data.fashion_mnist import ABNORMAL_CLASSES, FILES, fashion_mnist_root, take_pooled


@pytest.fixture
def file_server(fed_data, tmp_path):
    """The official files served over loopback HTTP, standing in for the official mirror."""
    served = tmp_path / "mirror"
    shutil.copytree(fed_data / "fashion_mnist", served)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_reads_the_official_files_from_the_data_folder(fed_data):
    images, labels = load_fashion_mnist(fed_data / "fashion_mnist", "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    _, train_labels = load_fashion_mnist(None, "train", labels_only=True)  # via $LIGHTNING_FED_DATA
    assert len(train_labels) == 60000


def test_missing_files_are_downloaded_and_verified(file_server, tmp_path):
    _, url = file_server
    root = tmp_path / "fresh" / "fashion_mnist"
    ensure_files(root, FILES, [url], "FashionMNIST")
    assert sorted(p.name for p in root.iterdir()) == sorted(FILES)  # no temporary files left behind
    _, labels = load_fashion_mnist(root, "train", labels_only=True, download=False)
    assert len(labels) == 60000


def test_a_mirror_serving_wrong_bytes_leaves_nothing(file_server, tmp_path):
    served, url = file_server
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not the file")
    root = tmp_path / "fresh"
    with pytest.raises(FileNotFoundError, match=r"\['t10k-labels-idx1-ubyte.gz'\] are missing.*MD5") as info:
        ensure_files(root, FILES, [url], "FashionMNIST")
    assert "\n" not in str(info.value)
    assert not (root / "t10k-labels-idx1-ubyte.gz").exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []


def test_offline_without_files_says_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing in .*LIGHTNING_FED_DATA") as info:
        fashion_mnist_root(tmp_path / "empty" / "fashion_mnist", download=False)
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="download failed"):
        ensure_files(tmp_path / "x", FILES, ["http://127.0.0.1:9/"], "FashionMNIST")  # nothing listens on port 9


def test_corrupt_file_is_named(fed_data, tmp_path):
    root = tmp_path / "fashion_mnist"
    shutil.copytree(fed_data / "fashion_mnist", root)
    path = root / "train-labels-idx1-ubyte.gz"
    os.chmod(path, 0o644)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz is corrupt.*delete it"):
        fashion_mnist_root(root)


def test_hospitals_draw_is_study_b_and_reproducible(fed_data):
    dm = HospitalsDataModule(seed=0)
    first, second = dm.site_indices(), HospitalsDataModule(seed=0).site_indices()
    _, train_y = load_fashion_mnist(None, "train", labels_only=True)
    _, test_y = load_fashion_mnist(None, "test", labels_only=True)
    binary = np.isin(np.concatenate([train_y, test_y]), ABNORMAL_CLASSES)
    for name, splits in first.items():
        assert all(np.array_equal(splits[k], second[name][k]) for k in splits)
        every = np.concatenate([splits["train"], splits["test"]])
        size = 30000 if name == "large" else 3000
        assert len(every) == size and len(splits["test"]) == size // 5
        assert binary[every].mean() == pytest.approx(0.5 if name == "large" else 0.1)
    all_idx = np.concatenate([np.concatenate(list(s.values())) for s in first.values()])
    assert len(np.unique(all_idx)) == len(all_idx)  # no image in two hospitals
    with pytest.raises(ValueError, match="same length"):
        HospitalsDataModule(site_names=["a"], sizes=[1, 2], positive_ratios=[0.1, 0.1])
    # each hospital's images are gathered from the two official files as if they were one pool, in its own order
    train_x, _ = load_fashion_mnist(None, "train")
    test_x, _ = load_fashion_mnist(None, "test")
    pooled = np.concatenate([train_x, test_x])
    for splits in first.values():
        for idx in splits.values():
            np.testing.assert_array_equal(take_pooled((train_x, test_x), idx), pooled[idx])
    assert take_pooled((train_x, test_x), np.array([], np.int64)).shape == (0, 28, 28)
    with pytest.raises(IndexError, match="pooled index out of range"):
        take_pooled((train_x, test_x), np.array([3, 70000]))


def test_heart_disease_hospitals_are_read_verified_and_prepared_locally(fed_data):
    from lightning_fed.data.heart_disease import HeartDiseaseSites, load_heart_disease

    sizes = {h: len(load_heart_disease(h)[1]) for h in ("cleveland", "hungary", "switzerland", "va")}
    assert sizes == {"cleveland": 303, "hungary": 294, "switzerland": 123, "va": 200}  # the UCI files, MD5-checked
    x, y = load_heart_disease("cleveland")
    assert x.shape == (303, 13) and set(np.unique(y)) == {0, 1} and np.isnan(x).sum() == 6  # '?' kept as missing
    dm = HeartDiseaseSites(seed=1)
    idx = dm.site_indices()
    for hospital, parts in idx.items():
        together = np.concatenate(list(parts.values()))
        assert sorted(together.tolist()) == list(range(sizes[hospital]))  # complete and disjoint
    assert all(np.array_equal(idx[h]["test"], HeartDiseaseSites(seed=1).site_indices()[h]["test"]) for h in idx)
    site = dm.federated_sites()[0]
    site.datamodule.setup("fit")
    train, test = (site.datamodule.datasets[s].tensors[0].numpy() for s in ("train", "test"))
    assert not np.isnan(train).any() and not np.isnan(test).any()
    assert np.allclose(train.mean(0), 0, atol=1e-5) and np.allclose(
        train.std(0), 1, atol=1e-3
    )  # the hospital's own statistics
    assert not np.allclose(
        test.mean(0), 0, atol=1e-3
    )  # the test split is scaled with the training statistics, not its own
    with pytest.raises(ValueError, match="unknown hospitals \\['zurich'\\]"):
        HeartDiseaseSites(hospitals=["cleveland", "zurich"])


@pytest.mark.usefixtures("fed_data")
def test_heart_disease_federation_tests_every_hospital(tmp_path, ray_cluster):
    import lightning as L

    from lightning_fed import FederatedStrategy
    from lightning_fed.data.heart_disease import HeartDiseaseSites
    from lightning_fed.models import TabularMLP

    strategy = FederatedStrategy(progress=False, checkpoint_every=0, workers=2)  # the tests' shared layout
    trainer = L.Trainer(
        strategy=strategy, max_epochs=3, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    dm = HeartDiseaseSites(site_cpus=2.0)
    try:
        trainer.fit(TabularMLP(), datamodule=dm)
        trainer.test(datamodule=dm, verbose=False)
    finally:
        strategy.shutdown()
    sites = strategy.last_evaluation.rows()
    assert set(sites) == {"cleveland", "hungary", "switzerland", "va", "federated"}
    counts = {h: int(np.sum(sites[h]["confusion_matrix"])) for h in dm.hospitals}
    assert counts == {
        h: len(parts["test"]) for h, parts in dm.site_indices().items()
    }  # each tested on its own patients
    assert sites["federated"]["auroc"] > 0.6


def test_retinamnist_binarised_and_split_4_to_6_as_study_a(fed_data):
    from lightning_fed.data.medmnist import MedMNISTSites, load_medmnist

    arrays = load_medmnist("retinamnist")
    dm = MedMNISTSites(
        "retinamnist",
        site_names=["site_a", "site_b"],
        site_shares=[4, 6],
        label_map=[0, None, None, 1, 1],
        label_names=["no_dr", "severe_or_proliferative_dr"],
        seed=3,
    )
    assert dm.label_names == ["no_dr", "severe_or_proliferative_dr"]
    idx = dm.site_indices()
    for split in ("train", "val", "test"):
        labels = arrays[f"{split}_labels"].reshape(-1)
        kept = np.flatnonzero(np.isin(labels, [0, 3, 4]))  # grades 1-2 dropped, nothing else
        a, b = idx["site_a"][split], idx["site_b"][split]
        assert sorted(np.concatenate([a, b]).tolist()) == kept.tolist()
        assert abs(len(a) - 0.4 * len(kept)) <= 1
    site = dm.federated_sites()[1].build_datamodule()
    site.setup("fit")
    y = site.datasets["train"].tensors[1].numpy()
    original = arrays["train_labels"].reshape(-1)[idx["site_b"]["train"]]
    assert np.array_equal(y, np.isin(original, [3, 4]).astype(np.int64))
    with pytest.raises(ValueError, match="one entry per retinamnist class"):
        MedMNISTSites("retinamnist", label_map=[0, 1])
    with pytest.raises(ValueError, match="onto 0..K-1"):
        MedMNISTSites("retinamnist", label_map=[0, None, None, 2, 2])
    with pytest.raises(ValueError, match="exclude each other"):
        MedMNISTSites("retinamnist", site_shares=[1, 1], alpha=0.5, site_names=["a", "b"])


def test_images_are_scaled_as_the_published_normalisation_bit_for_bit():
    import torch

    from lightning_fed.data.fashion_mnist import MEAN, STD, to_tensor_dataset
    from lightning_fed.data.medmnist import to_tensors

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)
    gray[0, 0, :2] = (0, 255)
    x = to_tensor_dataset(gray, np.zeros(64, dtype=np.int64)).tensors[0]
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    # FashionMNIST: (x / 255 - mean) / std, as numpy computes it in float32
    assert torch.equal(x[:, 0], torch.from_numpy((gray.astype(np.float32) / 255.0 - MEAN) / STD))
    assert x[0, 0, 0, :2].tolist() == pytest.approx([-MEAN / STD, (1 - MEAN) / STD])
    # MedMNIST: x / 127.5 - 1, grayscale and RGB (channels first)
    rgb = rng.integers(0, 256, (8, 28, 28, 3), dtype=np.uint8)
    for images in (gray, rgb):
        y = to_tensors(images, np.zeros((len(images), 1), dtype=np.int64), "binary-class").tensors[0]
        expected = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
        expected = expected.unsqueeze(1) if images.ndim == 3 else expected.permute(0, 3, 1, 2)
        assert torch.equal(y, expected)
    assert y.shape == (8, 3, 28, 28) and float(y.min()) >= -1.0 and float(y.max()) <= 1.0


def test_tensor_batches_gather_whole_batches_and_keep_the_loaders_order():
    """The built-in datamodules' TensorBatches: the same batches in the same order as a TensorDataset's loader from
    the same random state (also a simulated site's Subset, and a ConcatDataset that falls back to samples), without
    one ``__getitem__`` per sample where the whole batch can be gathered."""
    import torch
    from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset

    from lightning_fed.data import TensorBatches, collate

    class Counted(TensorBatches):
        samples = 0

        def __getitem__(self, index):
            Counted.samples += 1
            return super().__getitem__(index)

    x, y = torch.randn(100, 1, 4, 4), torch.arange(100)
    cases = [
        (TensorDataset(x, y), Counted(x, y), 0),
        (Subset(TensorDataset(x, y), list(range(5, 95))), Subset(Counted(x, y), list(range(5, 95))), 0),
        (ConcatDataset([TensorDataset(x, y)] * 2), ConcatDataset([Counted(x, y)] * 2), 200),
    ]
    for plain, gathered, per_sample_calls in cases:
        Counted.samples = 0
        torch.manual_seed(3)
        expected = list(DataLoader(plain, batch_size=16, shuffle=True))
        torch.manual_seed(3)
        got = list(DataLoader(gathered, batch_size=16, shuffle=True, collate_fn=collate))
        assert len(got) == len(expected)
        for (ex, ey), batch in zip(expected, got):
            assert isinstance(batch, list) and torch.equal(batch[0], ex) and torch.equal(batch[1], ey)
        assert Counted.samples == per_sample_calls
        torch.manual_seed(3)  # a loader of the user's own, default collate: the same batches, the slow way
        plain_collate = list(DataLoader(gathered, batch_size=16, shuffle=True))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, plain_collate))


def test_ct_slices_are_served_a_whole_batch_per_gather_with_the_samples_batches():
    """The CT hospitals' dict batches (image, label, group) gathered whole: the same keys, dtypes and values in the
    same order as one ``__getitem__`` per sample stacked by ``default_collate``, with no per-sample call (and the same
    again through a user's default collate); a hospital without training labels gets none in its batches either."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from lightning_fed.data import SimulatedCTHospitals, collate
    from lightning_fed.data.ct_vendors import CTSlices

    class Counted(CTSlices):
        samples = 0

        def __getitem__(self, index):
            Counted.samples += 1
            return super().__getitem__(index)

    class OneByOne(Dataset):  # no __getitems__: the loader asks for each sample
        def __init__(self, slices):
            self.slices = slices

        def __len__(self):
            return len(self.slices)

        def __getitem__(self, index):
            return self.slices[index]

    site = SimulatedCTHospitals(exams=24, image_size=32, batch_size=5, seed=0).hospital_data("B")
    site.setup("fit")
    train = site.datasets["train"]
    for with_labels in (True, False):
        slices = Counted(train.images, train.labels, train.groups, with_labels)
        torch.manual_seed(3)
        per_sample = list(DataLoader(OneByOne(slices), batch_size=5, shuffle=True))
        calls, Counted.samples = Counted.samples, 0
        torch.manual_seed(3)
        gathered = list(DataLoader(slices, batch_size=5, shuffle=True, collate_fn=collate))
        assert calls == len(train) and Counted.samples == 0
        torch.manual_seed(3)
        default = list(DataLoader(slices, batch_size=5, shuffle=True))  # a user's loader, default collate
        assert len(gathered) == len(default) == len(per_sample) == -(-len(train) // 5)
        for expected, batch, fallback in zip(per_sample, gathered, default):
            assert set(batch) == set(expected) == ({"image", "label", "group"} if with_labels else {"image", "group"})
            for key, value in expected.items():
                assert batch[key].dtype == value.dtype and torch.equal(batch[key], value), key
                assert torch.equal(fallback[key], value), key
