import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
os.environ.setdefault("LIGHTNING_FED_DATA", str(SHARED_DATA))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own folder, so what a Trainer writes to its default root (``sites/``,
    ``lightning_logs/``) never lands in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session, started with explicit resources; the strategy joins it.

    Reuses a Ray this process is already connected to, and shuts down only what it started.
    """
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(
            address="local",  # never a cluster some earlier `ray start` left behind
            num_cpus=4,
            include_dashboard=False,
            logging_level="WARNING",
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "LIGHTNING_FED_DATA": os.environ["LIGHTNING_FED_DATA"], "WANDB_MODE": "offline", "WANDB_SILENT": "true"}},
        )
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def fed_data():
    path = Path(os.environ["LIGHTNING_FED_DATA"])
    if not (path / "fashion_mnist" / "train-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"FashionMNIST files not found under {path}/fashion_mnist (set LIGHTNING_FED_DATA)")
    return path
