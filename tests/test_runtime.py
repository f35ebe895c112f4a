"""Ray start/stop, third-party aggregators through entry points, the progress view."""

import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_fed.progress import FederatedProgress, results_table
from lightning_fed.results import ProgressSnapshot
from lightning_fed.strategies import available_aggregators, get_aggregator

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration  # starts processes
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
@pytest.mark.usefixtures("fed_data")
def test_local_ray_is_started_with_explicit_resources_and_stopped(tmp_path):
    script = textwrap.dedent(
        """
        import json, os, sys, ray, torch, lightning as L
        from lightning_fed import FederatedStrategy

        def descendants():
            # (pid, name) of every live process below this one, from /proc
            parent = {}
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        stat = open(f"/proc/{entry}/stat").read()
                    except OSError:
                        continue
                    name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
                    if rest[0] != "Z":
                        parent[int(entry)] = (int(rest[1]), name)
            found, frontier = [], [os.getpid()]
            while frontier:
                pid = frontier.pop()
                kids = [p for p, (pp, _) in parent.items() if pp == pid]
                found += [parent[k][1] for k in kids]
                frontier += kids
            return found

        from tests.helpers import small_hospitals

        # the model comes from a folder only this script puts on its path, and the user's own runtime_env must not
        # take that path from the workers
        sys.path.insert(0, os.path.abspath("project"))
        from site_model import SiteCNN

        assert not ray.is_initialized()
        # a fixed layout holding more CPUs than this machine has cores: one worker with three, which the local Ray
        # must have
        strategy = FederatedStrategy(
            progress=False,
            checkpoint_every=0,
            workers=1,
            worker_cpus=3,
            ray_init_kwargs={"runtime_env": {"env_vars": {"LF_SITE_NOTE": "kept"}}},
        )
        trainer = L.Trainer(strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False)
        trainer.fit(SiteCNN(), datamodule=small_hospitals(sizes=(200, 100, 100)))
        cpus = ray.cluster_resources()["CPU"]
        children = descendants()
        strategy.shutdown()
        alive = descendants()
        print(json.dumps({"cpus": cpus, "before": children, "after": alive, "initialized": ray.is_initialized(),
                          "pythonpath": os.environ.get("PYTHONPATH")}))
        """
    )
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "site_model.py").write_text(
        textwrap.dedent(
            """
            import os
            from lightning_fed.models import SmallCNN

            class SiteCNN(SmallCNN):
                def training_step(self, batch, batch_idx):
                    assert os.environ.get("LF_SITE_NOTE") == "kept", "the runtime_env's variable did not reach the site"
                    return super().training_step(batch, batch_idx)
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # a worker holding three CPUs gets three (at least the machine's cores)
    assert report["cpus"] == max(os.cpu_count(), 3)
    assert any("raylet" in name for name in report["before"])
    assert report["after"] == [] and report["initialized"] is False  # everything it started is gone
    assert report["pythonpath"] == str(REPO)  # the driver's own environment, as it was before Ray started


def test_a_local_ray_gets_what_a_fixed_layout_holds_and_never_fewer_cpus_than_the_machine():
    from lightning_fed.config import Placement
    from lightning_fed.pool import layout_cpus
    from lightning_fed.runtime import _local_init_kwargs
    from tests.helpers import small_hospitals

    sites = small_hospitals(sizes=(200, 100, 100)).federated_sites()
    cores = os.cpu_count()
    assert _local_init_kwargs(0.0, {})["num_cpus"] == cores  # packed (automatic): the machine as it is
    assert layout_cpus(sites, Placement(sites_per_worker=1)) == 3.0  # one one-CPU process per site
    assert _local_init_kwargs(3.0, {})["num_cpus"] == max(cores, 3)
    assert _local_init_kwargs(0.5, {"num_cpus": 7})["num_cpus"] == 7  # the user's init_kwargs win


def test_entry_point_aggregator_is_found_by_name(tmp_path, monkeypatch):
    package = tmp_path / "thirdparty_rules"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
        from lightning_fed.strategies import Aggregator, GlobalModel

        class FirstSite(Aggregator):
            def aggregate(self, round, updates, current):
                return GlobalModel(dict(updates[0].weights), round)
        """
        )
    )
    dist = tmp_path / "thirdparty_rules-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-rules\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[lightning_fed.aggregators]\nfirst_site = thirdparty_rules:FirstSite\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "first_site" in available_aggregators()
    rule = get_aggregator("first_site")
    assert type(rule).__name__ == "FirstSite" and rule.name == "first_site"


@pytest.mark.integration  # starts processes
def test_importing_the_package_registers_every_aggregator_flag():
    script = "import lightning as L, lightning_fed\nfor name in lightning_fed.available_aggregators():\n    assert type(L.Trainer(strategy=name, logger=False).strategy).__name__ == 'FederatedStrategy', name\nprint('ok')"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.integration  # starts processes
def test_the_command_imports_lightning_after_the_package_so_rays_early_start_is_not_held_back():
    # as the `lightning-fed` command, the package only starts Ray early (here a cluster address, so nothing starts):
    # still initialising, it would hold back the spare worker Ray pickles by reference; the command itself then
    # imports the strategy, so a job's recipe has every aggregator flag
    script = textwrap.dedent(
        """
        import sys
        sys.argv = ["lightning-fed", "fit"]
        import lightning_fed
        assert "torch" not in sys.modules and "lightning" not in sys.modules, "the package imported Lightning"
        from lightning_fed import cli
        try:
            cli.main(["fit", "--help"])
        except SystemExit as done:
            assert done.code in (0, None), done.code
        import lightning as L
        for name in lightning_fed.available_aggregators():
            assert type(L.Trainer(strategy=name, logger=False).strategy).__name__ == "FederatedStrategy", name
        print("ok")
        """
    )
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}  # a cluster to join later: no local Ray starts early
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "ok", proc.stderr[-2000:]


@pytest.mark.integration  # starts processes
def test_a_spare_worker_the_command_never_used_leaves_no_file_behind():
    # the command starts Ray and a spare worker before it reads the recipe; a command that fails first (a recipe
    # error, found after the spare came up) stops them, and the file the spare's worker notes sites in goes too
    script = textwrap.dedent(
        """
        import os, sys
        sys.argv = ["lightning-fed", "fit"]
        import ray
        import lightning_fed
        from lightning_fed import runtime
        from lightning_fed.worker import computing_marker

        runtime._local.wait()
        spare = runtime._local.spare
        ray.get(spare.__ray_ready__.remote())
        marker = computing_marker(spare._actor_id.hex())
        assert os.path.exists(marker), marker
        runtime._stop_local()
        assert not ray.is_initialized()
        assert not os.path.exists(marker), "the spare's file was left behind"
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "ok", proc.stderr[-2000:]


def test_progress_view_prints_one_line_per_change():
    stream = io.StringIO()
    view = FederatedProgress(total_rounds=3, stream=stream)
    snap = ProgressSnapshot(
        round=1, sites={"a": {"status": "training", "epoch": 1}, "b": {"status": "training", "epoch": 1}}
    )
    view.update(snap, {"fl/val_auroc": 0.91234})
    view.update(snap, {"fl/val_auroc": 0.91234})  # nothing changed: nothing printed
    view.update(dataclasses.replace(snap, round=2), {"fl/val_auroc": 0.95})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[lightning-fed] round 1/3 | a: e1 training | b: e1 training | fl/val_auroc=0.9123")
    assert "round 2/3" in lines[1]
    table = results_table({"a": {"recall": 0.5, "auroc": 0.75}, "federated": {"recall": 0.6}}, ("recall", "auroc"))
    assert table.splitlines()[2].split() == ["a", "0.5000", "0.7500"]
    assert table.splitlines()[3].split() == ["federated", "0.6000", "-"]
