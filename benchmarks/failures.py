"""Failures, measured on study B's hospitals (the large one and two small ones): how long a dead hospital takes to be noticed, how long a
restarted one takes to be back, and what the random streams add to each round checkpoint.

One hospital ('bad') kills its own worker process (``os._exit``, as ``kill -9`` or the OOM killer would) in its
third epoch, after noting the time. Three runs, side by side in one invocation:

- ``abort`` (the default policy): seconds from the death to ``SiteFailedError`` on the driver, and to the last
  worker gone;
- ``continue``: seconds from the death to the restarted site being back in the federation (a new worker process
  imports torch and Lightning, sets the site up from its last committed round, and waits for the next round to
  start), and the rounds it missed;
- the same federation with no failure: the round time the other two are measured against.

Then the cost of exact resume: the size of one site's random streams (torch, numpy, Python, sampler
generators) against its whole round checkpoint, and the time to capture them against a round.

    python benchmarks/failures.py                       # 3 hospitals (30,000 + 2 x 3,000 images), 6 epochs
    python benchmarks/failures.py --repeats 3

Data: $LIGHTNING_FED_DATA/fashion_mnist.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_fed import FederatedStrategy, SiteFailedError
from lightning_fed.data import HospitalsDataModule, Site
from lightning_fed.data.fashion_mnist import PooledIndexData
from lightning_fed.models import SmallCNN


class DyingDataset(Dataset):
    """Real samples until ``die_at`` have been read; then the time is noted in ``stamp`` and the process exits."""

    def __init__(self, base: Dataset, die_at: int, stamp: str) -> None:
        self.base, self.die_at, self.stamp, self.reads = base, die_at, stamp, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.reads += 1
        if self.reads > self.die_at and not os.path.exists(self.stamp):
            Path(self.stamp).write_text(repr(time.time()))
            os._exit(9)
        return self.base[i]


class DyingHospital(PooledIndexData):
    def __init__(self, *args, die_at: int, stamp: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.die_at, self.stamp = die_at, stamp

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not isinstance(self.datasets["train"], DyingDataset):
            self.datasets["train"] = DyingDataset(self.datasets["train"], self.die_at, self.stamp)

    def train_dataloader(self):
        return DataLoader(self.datasets["train"], batch_size=self.batch_size, shuffle=True)


class Hospitals(L.LightningDataModule):
    def __init__(self, die_at: int | None, stamp: str) -> None:
        super().__init__()
        self.base = HospitalsDataModule(
            site_names=["large", "small_1", "bad"],
            sizes=[30000, 3000, 3000],
            positive_ratios=[0.5, 0.1, 0.1],
            test_fraction=0.2,
            batch_size=64,
            seed=0,
        )
        self.die_at, self.stamp = die_at, stamp

    def federated_sites(self):
        sites = self.base.federated_sites()
        if self.die_at is not None:
            bad = sites[-1].datamodule
            sites[-1] = Site(
                "bad", DyingHospital(bad.data_dir, bad.indices, bad.batch_size, die_at=self.die_at, stamp=self.stamp)
            )
        return sites


def _alive_workers() -> int:
    from ray._private.state import actors

    return sum(1 for a in actors().values() if a["State"] != "DEAD" and a["ActorClassName"] == "Worker")


def run(policy: str, epochs: int, root: Path) -> dict:
    stamp = str(root / f"{policy}.died")
    die_at = None if policy == "none" else 2 * 2400 + 1000  # 2,400 training images an epoch: dies in its third epoch
    options = {} if policy != "continue" else {"on_site_failure": "continue"}
    strategy = FederatedStrategy(
        progress=False, sites_per_worker=1, seed=0, checkpoint_dir=str(root / f"{policy}-ckpt"), **options
    )
    trainer = L.Trainer(
        strategy=strategy,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(root / policy),
    )
    L.seed_everything(0, verbose=False)
    out: dict = {"policy": policy}
    t0 = time.time()
    try:
        trainer.fit(SmallCNN(num_classes=2), datamodule=Hospitals(die_at, stamp))
        fit = strategy.last_fit
        out["round_seconds"] = statistics.median(fit.round_seconds)
        out["fit_seconds"] = fit.fit_seconds
        if policy == "continue":
            died = float(Path(stamp).read_text())
            back = next(e for e in fit.events if e.event == "rejoined")
            out["rejoin_seconds"] = back.time - died
            out["rounds_missed"] = back.round - 3
            out["round_sites"] = [len(r) for r in fit.round_sites]
        ckpt = root / f"{policy}-ckpt"
        parts = sorted(ckpt.glob("round-*/site-large.ckpt"))
        if parts:
            out["site_checkpoint_bytes"] = parts[-1].stat().st_size
    except SiteFailedError as err:
        raised = time.time()
        died = float(Path(stamp).read_text())
        out["detect_seconds"] = raised - died
        out["message"] = str(err)
        while _alive_workers() and time.time() - raised < 60:
            time.sleep(0.05)
        out["all_workers_gone_seconds"] = time.time() - died
    finally:
        strategy.shutdown()
    out["wall_seconds"] = time.time() - t0
    return out


def random_streams_cost() -> dict:
    """What exact resume adds to a site's checkpoint: the site's random streams, and the time to capture them."""
    from lightning_fed.scheduler import random_state

    generator = torch.Generator().manual_seed(0)
    state = {"random_state": random_state(), "sampler_generators": [generator.get_state()]}
    t0 = time.perf_counter()
    for _ in range(200):
        random_state()
        generator.get_state()
    return {"random_state_bytes": len(pickle.dumps(state)), "capture_ms": (time.perf_counter() - t0) / 200 * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    import ray

    # one worker process per hospital (so a death takes only that hospital): at least one CPU slot each
    ray.init(
        num_cpus=max(3, os.cpu_count() or 1),
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}},
    )
    runs = []
    try:
        for repeat in range(args.repeats):
            for policy in ("none", "abort", "continue"):
                with tempfile.TemporaryDirectory() as tmp:
                    result = run(policy, args.epochs, Path(tmp))
                result["repeat"] = repeat
                runs.append(result)
                print(
                    json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}), flush=True
                )
    finally:
        ray.shutdown()
    cost = random_streams_cost()

    def median(policy: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["policy"] == policy and key in r)

    round_s = median("none", "round_seconds")
    ckpt = median("none", "site_checkpoint_bytes")
    print()
    print(f"round (no failure, median):           {round_s:.2f} s")
    print(
        f"dead site noticed (abort):            {median('abort', 'detect_seconds'):.2f} s after it died "
        f"(every worker gone {median('abort', 'all_workers_gone_seconds'):.2f} s after)"
    )
    print(
        f"restarted site back in (continue):    {median('continue', 'rejoin_seconds'):.2f} s after it died "
        f"({median('continue', 'rejoin_seconds') / round_s:.1f} rounds; missed {median('continue', 'rounds_missed'):.0f} round(s))"
    )
    print(
        f"continue-mode run vs no failure:      {median('continue', 'fit_seconds') / median('none', 'fit_seconds'):.2f}x fit time"
    )
    print(
        f"random streams in a site checkpoint:  {cost['random_state_bytes'] / 1024:.1f} KiB of {ckpt / 1024:.0f} KiB "
        f"({100 * cost['random_state_bytes'] / ckpt:.1f} %), captured in {cost['capture_ms']:.3f} ms "
        f"({100 * cost['capture_ms'] / 1e3 / round_s:.3f} % of a round)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "random_streams": cost}, indent=2))


if __name__ == "__main__":
    main()
