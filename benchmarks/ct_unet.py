"""A compute-bound workload: study C's U-Net on the ten CT hospitals, four ways, interleaved in one invocation.

Where a step is tens of milliseconds of convolutions, a federation's fixed costs should vanish into the training.
The arms, each a fresh process, taking turns (A B C D A B C D ...) so that a noisy machine slows them alike:

- ``plain``: one process, torch and MONAI only, threads set to the machine's CPUs, data as tensors, batches by
  index, a stateful U-Net and AdamW per hospital, FedAvg by hand (``benchmarks/ct_peers.py --arm plain``);
- ``flower``: Flower's simulation engine, ``--flower-cpus`` CPUs per client (default 1: two clients train at once on
  two cores, faster here than one client on two threads), the client's torch threads set to them, data as tensors
  (``ct_peers.py --arm flower``, in the Flower environment, which needs MONAI: see ``ct_peers.py``);
- ``lightning_fed``: ``lightning-fed fit --config recipes/ct_vendors.yaml`` as a user runs it, with the layout
  lightning-fed picks for this machine;
- ``lightning_fed_1w``: the same with one worker holding every CPU (``workers=1``, ``worker_cpus``): the sites take
  turns on the threads the plain loop has, so the difference to ``plain`` is lightning-fed's own cost.

Same hospitals (the slices ``SimulatedCTHospitals`` draws, written once to a file for the peers; lightning-fed's sites
draw them again inside their processes, which counts against it), network (the recipe's MONAI U-Net), loss
(cross-entropy + soft Dice), AdamW, batch size 8, one epoch per round, FedAvg weighted by training slices. Departures
from the recipe, for every arm alike: ``--exams`` slices per hospital at ``--image-size`` pixels (the recipe: 60 at
64), no validation during training (``limit_val_batches=0``; the peers validate nothing) and lightning-fed's test with
2 MC-dropout passes (the recipe: 8; the peers test one deterministic pass). Reported: wall (launch to exit), start-up
(launch to the first round), median round, mean foreground Dice, and the ratios run by run.

    python benchmarks/ct_unet.py                                   # 10 rounds, 128 px, 100 slices, 2 repetitions
    python benchmarks/ct_unet.py --epochs 2 --repeats 1 --arms plain,lightning_fed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("plain", "flower", "lightning_fed", "lightning_fed_1w")
REPO = Path(__file__).resolve().parents[1]


def write_hospitals(args: argparse.Namespace, path: Path) -> None:
    """Every hospital's training and test slices, as the recipe's sites draw them, for the peers."""
    import numpy as np

    from lightning_fed.data import SimulatedCTHospitals

    module = SimulatedCTHospitals(exams=args.exams, image_size=args.image_size, batch_size=8, seed=args.seed)
    arrays = {}
    for hospital in module.hospitals:
        data = module.hospital_data(hospital)
        data.setup("fit")
        for split in ("train", "test"):
            slices = data.datasets[split]
            arrays[f"{hospital}/{split}_x"] = slices.images[:, None].astype(np.float32)
            arrays[f"{hospital}/{split}_y"] = slices.labels.astype(np.int64)
    np.savez(path, hospitals=np.array(module.hospitals), **arrays)


def command(arm: str, args: argparse.Namespace, scratch: Path, repeat: int) -> tuple[list[str], Path]:
    root = scratch / f"{arm}_{repeat}"
    common = ["--epochs", str(args.epochs), "--seed", str(args.seed), "--data-file", str(scratch / "ct.npz")]
    if arm == "plain":
        return [sys.executable, str(REPO / "benchmarks" / "ct_peers.py"), "--arm", "plain", *common], root
    if arm == "flower":
        peers = str(REPO / "benchmarks" / "ct_peers.py")
        return [args.flower_python, peers, "--arm", "flower", "--cpus-per-client", str(args.flower_cpus), *common], root
    fit = [
        str(Path(sys.executable).parent / "lightning-fed"),
        "fit",
        "--config",
        str(REPO / "recipes" / "ct_vendors.yaml"),
        "--trainer.logger=false",
        f"--trainer.max_epochs={args.epochs}",
        f"--trainer.default_root_dir={root}",
        "--trainer.limit_val_batches=0",
        f"--data.init_args.exams={args.exams}",
        f"--data.init_args.image_size={args.image_size}",
        f"--data.init_args.seed={args.seed}",
        f"--seed_everything={args.seed}",
        "--model.init_args.mc_samples=2",
        "--trainer.strategy.init_args.progress=false",
    ]
    if arm == "lightning_fed_1w":
        fit += ["--trainer.strategy.init_args.workers=1", f"--trainer.strategy.init_args.worker_cpus={os.cpu_count()}"]
    return fit, root


def launch(arm: str, args: argparse.Namespace, scratch: Path, repeat: int) -> dict:
    cmd, root = command(arm, args, scratch, repeat)
    root.mkdir()
    # the benchmarks' folder too: the Flower clients (Ray workers) import flower_sim from it
    paths = [str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths).rstrip(os.pathsep)}
    launched = time.time()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.time() - launched
    if proc.returncode != 0:
        raise SystemExit(f"{arm} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    if arm.startswith("lightning_fed"):
        report = json.loads(next(root.rglob("results.json")).read_text())
        rounds, first = report["round_seconds"], report["fit_started_unix"]
        sites = report["test"]["sites"]
        dice = statistics.mean(sites[h]["dice"] for h in sites)
        extra = {"federation_start": report["startup_seconds"], "layout": report.get("layout")}
    else:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        first, ends = out["first_round_at"], out["round_ends"]
        rounds = [b - a for a, b in zip([first, *ends[:-1]], ends)]
        dice, extra = out["dice"], {}
    return {
        "wall": wall,
        "startup": first - launched,
        "rounds": rounds,
        "median_round": statistics.median(rounds[1:] or rounds),
        "dice": dice,
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="rounds (one epoch each)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--exams", type=int, default=100, help="slices per hospital (60 %% train, 25 %% test)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--flower-python", default=str(REPO / ".venv-flower" / "bin" / "python"))
    parser.add_argument("--flower-cpus", type=float, default=1.0, help="CPUs (and torch threads) per Flower client")
    parser.add_argument("--json", default=None, help="also write every run's figures to this file")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}: choose from {', '.join(ARMS)}")
    if "flower" in arms and not Path(args.flower_python).is_file():
        print(f"note: no Flower environment at {args.flower_python} (see benchmarks/ct_peers.py): Flower skipped")
        arms.remove("flower")
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="ct-unet-bench-") as tmp:
        scratch = Path(tmp)
        write_hospitals(args, scratch / "ct.npz")
        for repeat in range(args.repeats):
            for arm in arms:
                run = launch(arm, args, scratch, repeat)
                runs[arm].append(run)
                print(
                    f"[{repeat + 1}/{args.repeats}] {arm:16s} wall {run['wall']:6.1f}s  start-up {run['startup']:5.1f}s  "
                    f"median round {run['median_round']:.2f}s  dice {run['dice']:.3f}",
                    flush=True,
                )
    if args.json:  # the raw figures first, so that a failing table never loses them
        Path(args.json).write_text(json.dumps(runs, indent=2))
    report(runs, args)


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    print(
        f"\nStudy C's U-Net, 10 hospitals x {args.exams} slices at {args.image_size} px, {args.epochs} rounds, "
        f"{args.repeats} run(s) per arm, medians:"
    )
    print(f"{'arm':16s} {'wall s':>8s} {'start-up s':>11s} {'round s':>8s} {'dice':>6s}")
    for arm, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall", "startup", "median_round", "dice")}
        print(f"{arm:16s} {med['wall']:8.1f} {med['startup']:11.1f} {med['median_round']:8.2f} {med['dice']:6.3f}")
    for ours in ("lightning_fed", "lightning_fed_1w"):
        if ours not in runs:
            continue
        print(f"\n{ours}: layout {runs[ours][0]['layout']}")
        for other in ("plain", "flower"):
            if other in runs:
                for key, label in (("wall", "wall"), ("median_round", "median round")):
                    ratios = [a[key] / b[key] for a, b in zip(runs[ours], runs[other])]
                    print(
                        f"ratio {ours} / {other} {label}: {statistics.median(ratios):.2f}x "
                        f"(runs: {', '.join(f'{r:.2f}' for r in ratios)})"
                    )


if __name__ == "__main__":
    main()
