"""A process the user does not control dies mid-run (the coordinator, or the worker process hosting sites): the
command fails like a failed site does, with exit status 1 and one line naming what died, the round, and the
`--ckpt_path` to resume from, which works."""

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import ray
from lightning.pytorch import Callback

from lightning_fed.checkpoint import find_checkpoint
from lightning_fed.cli import main


class KillsTheCoordinator(Callback):
    """At the start of epoch ``at_epoch`` (round ``at_epoch + 1``), site ``site`` kills the coordinator's process
    with SIGKILL, as the kernel's OOM killer or an operator would."""

    def __init__(self, at_epoch: int = 2, site: str = "large") -> None:
        self.at_epoch, self.site = at_epoch, site

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        context = getattr(trainer.strategy, "context", None)  # a site's Trainer (the driver's never trains)
        if context is None or context.site != self.site or trainer.current_epoch != self.at_epoch:
            return
        pid = ray.get(context._coordinator.actor.__ray_call__.remote(lambda coordinator: os.getpid()))
        time.sleep(1.5)  # the driver's progress poll (every 0.5 s) sees the round just aggregated
        os.kill(pid, signal.SIGKILL)


class KillsItsWorker(Callback):
    """At the start of epoch ``at_epoch``, site ``site`` kills its own worker process (and the sites it hosts)."""

    def __init__(self, at_epoch: int = 2, site: str = "small_1") -> None:
        self.at_epoch, self.site = at_epoch, site

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        context = getattr(trainer.strategy, "context", None)
        if context is not None and context.site == self.site and trainer.current_epoch == self.at_epoch:
            time.sleep(1.5)
            os.kill(os.getpid(), signal.SIGKILL)


def _recipe(tmp: Path, callback: str, epochs: int = 4) -> str:
    """Two small hospitals on one worker process, a round checkpoint every round."""
    path = tmp / f"{callback or 'plain'}.yaml"
    callbacks = f"  callbacks:\n    - class_path: tests.test_coordinator_death.{callback}\n" if callback else ""
    path.write_text(f"""seed_everything: 0
trainer:
  max_epochs: {epochs}
  enable_checkpointing: false
  logger: false
{callbacks}  strategy:
    class_path: lightning_fed.FederatedStrategy
    init_args:
      aggregator: fedavg
      workers: 1
      progress: false
      checkpoint_dir: {tmp / "ckpt"}
model:
  class_path: lightning_fed.models.SmallCNN
  init_args: {{num_classes: 2, lr: 0.001}}
data:
  class_path: lightning_fed.data.HospitalsDataModule
  init_args:
    site_names: [large, small_1]
    sizes: [200, 100]
    positive_ratios: [0.5, 0.1]
    test_fraction: 0.2
    batch_size: 50
    seed: 0
results:
  mean_over: null
  test_after_fit: false
""")
    return str(path)


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lightning-fed: error: ")]
    assert info.value.code == 1 and "Traceback" not in err, err
    assert len(errors) == 1, err  # one line, whatever Ray printed around it
    return errors[0]


@pytest.mark.usefixtures("fed_data")
def test_the_coordinator_dying_ends_the_run_with_the_round_to_resume_from(tmp_path, capsys, monkeypatch, ray_cluster):
    monkeypatch.setattr(sys, "argv", ["lightning-fed"])
    line = _fails(["fit", "--config", _recipe(tmp_path, "KillsTheCoordinator")], capsys)
    assert line.startswith("lightning-fed: error: the coordinator died in round 3: its process exited"), line
    assert "--help" not in line, line  # not the user's input: nothing to look up
    ckpt = tmp_path / "ckpt"
    committed = find_checkpoint(ckpt).round
    assert line.endswith(f"(resume from round {committed} with --ckpt_path={ckpt})") and committed in (1, 2), line
    # and resuming from there finishes the run
    main(["fit", "--config", _recipe(tmp_path, ""), f"--ckpt_path={ckpt}"])
    assert find_checkpoint(ckpt).round == 4


@pytest.mark.usefixtures("fed_data")
def test_a_worker_process_dying_with_its_sites_ends_the_run_naming_them(tmp_path, capsys, monkeypatch, ray_cluster):
    monkeypatch.setattr(sys, "argv", ["lightning-fed"])
    line = _fails(["fit", "--config", _recipe(tmp_path, "KillsItsWorker", epochs=3)], capsys)
    # the site computing when the process died is named first, then the sites that died with it
    assert line.startswith("lightning-fed: error: site 'small_1' died in round 3: its worker process exited"), line
    assert "(its worker also hosted ['large'])" in line, line
    ckpt = tmp_path / "ckpt"
    assert line.endswith(f"(resume from round {find_checkpoint(ckpt).round} with --ckpt_path={ckpt})"), line
