import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_folder() -> Path:
    """``$LIGHTNING_FED_DATA`` made absolute now, against the folder pytest was started from (every test then runs
    in a folder of its own, where a relative path would point nowhere); ``../shared/data`` beside the repository
    when it is not set."""
    raw = os.environ.get("LIGHTNING_FED_DATA")
    return Path(raw).expanduser().resolve() if raw else (REPO.parent / "shared" / "data").resolve()


DATA = _data_folder()
os.environ["LIGHTNING_FED_DATA"] = str(DATA)
# what the tests read; a machine without one of these cannot run the suite, so it stops at once instead of skipping
# most of itself (ChestMNIST alone is optional: too large to ship, its one test skips by name)
REQUIRED_DATA = (
    "fashion_mnist/train-images-idx3-ubyte.gz",
    "fashion_mnist/train-labels-idx1-ubyte.gz",
    "fashion_mnist/t10k-images-idx3-ubyte.gz",
    "fashion_mnist/t10k-labels-idx1-ubyte.gz",
    "heart_disease/processed.cleveland.data",
    "heart_disease/processed.hungarian.data",
    "heart_disease/processed.switzerland.data",
    "heart_disease/processed.va.data",
    "medmnist/retinamnist.npz",
    "medmnist/breastmnist.npz",
    "fed_tcga_brca/brca.csv",
    "fed_tcga_brca/train_test_split.csv",
    "fed_tcga_brca/centers.csv",
)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_configure(config: pytest.Config) -> None:
    missing = [name for name in REQUIRED_DATA if not (DATA / name).is_file()]
    if missing:
        raise pytest.UsageError(
            f"test data not found: {DATA / missing[0]} ({len(missing)} of {len(REQUIRED_DATA)} files missing; set "
            "LIGHTNING_FED_DATA to the folder holding fashion_mnist/, heart_disease/ and medmnist/, e.g. ../shared/data)"
        )


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own folder, so what a Trainer writes to its default root (``sites/``,
    ``lightning_logs/``) never lands in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (per test process: pytest-xdist runs two), started with explicit
    resources; the strategy joins it.

    Reuses a Ray this process is already connected to, and shuts down only what it started.
    """
    import ray

    started = False
    if not ray.is_initialized():
        from lightning_fed.runtime import _DriverPaths

        # the workers inherit this process's environment (the data folder, W&B offline, set above) and, while Ray
        # starts, its import paths (the repository, for the test helpers) as lightning-fed's own local Ray does
        paths = _DriverPaths()
        try:
            ray.init(
                address="local",  # never a cluster some earlier `ray start` left behind
                num_cpus=4,
                include_dashboard=False,
                logging_level="WARNING",
            )
        finally:
            paths.restore()
        started = True
    yield ray
    if started:
        from lightning_fed.runtime import _end_monitor

        _end_monitor()  # Ray's shutdown would wait a second for it (lightning_fed.runtime)
        ray.shutdown()


@pytest.fixture(scope="session")
def _session_workers(ray_cluster):
    """Warm workers for the whole session (``lightning_fed.warm_workers``): a federation that ends cleanly hands
    its workers to the next one of the same layout instead of each test starting new processes."""
    from lightning_fed import warm_workers

    with warm_workers() as pool:
        yield pool


@pytest.fixture(autouse=True)
def _worker_reuse(request):
    """Tests on the session's Ray share its warm workers."""
    if "ray_cluster" in request.fixturenames:
        request.getfixturevalue("_session_workers")
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test on Ray is an integration test (``-m "not integration"`` runs the rest in a minute or two).

    The tests that start processes of their own (a two-node cluster, a local Ray, a command) go first: the longest
    of the suite, they then run beside the others instead of ending the run alone on one of the two processes
    pytest-xdist runs (the TLS cluster test alone took the last 15 s while the other process idled)."""
    standalone = {id(item) for item in items if _standalone(item)}
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
    items.sort(key=lambda item: id(item) not in standalone)  # stable: the rest keep their order


def _standalone(item: pytest.Item) -> bool:
    """Marked ``integration`` but not on the session's Ray: it starts what it needs itself."""
    return item.get_closest_marker("integration") is not None and "ray_cluster" not in getattr(item, "fixturenames", ())


@pytest.fixture
def fed_data() -> Path:
    """The data folder (checked complete when the run started)."""
    return DATA
