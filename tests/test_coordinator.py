"""The coordinator's parts as plain objects, no Ray: barrier keys and who each barrier waits for, the roster of
continue mode, round commits, and the coordinator's own barriers driven by asyncio. The frozen configuration and the
coordinator import without torch."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_fed.barriers import BarrierKey, Barriers, FederationAborted, SiteLeftOut
from lightning_fed.checkpoint import find_checkpoint, site_checkpoint_path
from lightning_fed.commits import RoundCommits
from lightning_fed.config import Checkpointing, Reliability
from lightning_fed.coordinator import Coordinator
from lightning_fed.results import ProgressSnapshot
from lightning_fed.roster import FAILURES_BEFORE_OUT, Roster
from lightning_fed.strategies.fedavg import FedAvg

REPO = Path(__file__).resolve().parents[1]
CONTINUE = Reliability(on_site_failure="continue")


# -- barrier keys ------------------------------------------------------------------------------------
def test_site_keys_read_as_kind_epoch_and_tag_and_print_as_before():
    assert BarrierKey.from_site(("epoch_end", 3)) == BarrierKey("epoch_end", epoch=3)
    assert BarrierKey.from_site(("val", 3, 2)) == BarrierKey("val", epoch=3, tag=(2,))
    assert BarrierKey.from_site(["decision", 0, 1]) == BarrierKey(
        "decision", epoch=0, tag=(1,)
    )  # as pickled lists come
    assert BarrierKey.from_site(("stop", "late")) == BarrierKey("stop", tag=("late",))  # no epoch: every site
    assert BarrierKey.from_site(("val", 3, 1)) != BarrierKey.from_site(("val", 3, 2))
    assert [
        str(k)
        for k in (BarrierKey.hand_over(4), BarrierKey.from_site(("val", 3, 2)), BarrierKey.exchange("secagg/2/keys"))
    ] == ["round 4", "val 3", "gather secagg/2/keys"]


def test_a_key_expects_the_sites_that_take_part_in_its_round_or_epoch():
    # with two epochs per round, round 3 starts at epoch 4
    assert BarrierKey.hand_over(3).expects(joins_at=3, sync_every=2) and not BarrierKey.hand_over(2).expects(3, 2)
    assert BarrierKey.answers(3).expects(3, 2) and not BarrierKey.answers(2).expects(3, 2)
    assert BarrierKey("val", epoch=4).expects(3, 2) and not BarrierKey("val", epoch=3).expects(3, 2)
    assert BarrierKey.exchange("keys").expects(joins_at=9, sync_every=1)  # key exchanges: everyone still in

    roster = Roster(["a", "b", "c", "d"])
    roster.leave_out("b", "died", round=1)
    roster.joins["c"] = 3  # c rejoined at round 3
    barriers = Barriers(roster, sync_every=2, reliability=CONTINUE, on_late=lambda sites, what: None)
    assert barriers.expected(BarrierKey.hand_over(2)) == {"a", "d"}
    assert barriers.expected(BarrierKey.hand_over(3)) == {"a", "c", "d"}
    assert barriers.expected(BarrierKey.from_site(("epoch_end", 3))) == {"a", "d"}
    assert barriers.expected(BarrierKey.from_site(("epoch_end", 4))) == {"a", "c", "d"}
    assert barriers.expected(BarrierKey.exchange("keys")) == {"a", "c", "d"}


# -- roster ------------------------------------------------------------------------------------------
def test_roster_leaves_out_admits_back_and_keeps_a_site_out_after_failing_in_a_row():
    roster = Roster(["a", "b", "c"])
    assert not roster.leave_out("c", "died", round=2)  # out of round 3, may come back
    assert roster.out == {"c": "died"} and roster.status["c"]["status"] == "left out" and roster.may_rejoin("c")
    assert roster.left_out_message("c") == "site 'c' was left out of round 3: died"
    assert roster.running() == {"a", "b"} and roster.live() == {"a", "b"}
    roster.report("c", {"status": "training", "epoch": 5})  # late news from a site already out: ignored
    assert roster.status["c"]["status"] == "left out"
    roster.wait_to_rejoin("c")
    assert roster.live() == {"a", "b"} and roster.status["c"]["status"] == "rejoining"
    roster.admit(next_round=4)
    assert roster.out == {} and roster.joins_at("c") == 4 and roster.joins_at("a") == 1 and not roster.rejoining
    assert [(e.round, e.site, e.event) for e in roster.events] == [(3, "c", "left out"), (4, "c", "rejoined")]
    with pytest.raises(ValueError, match="not out of the federation"):
        roster.wait_to_rejoin("a")
    # failing again before another round is aggregated counts in a row; after a round, the count starts over
    for count in range(1, FAILURES_BEFORE_OUT):
        assert not roster.leave_out("b", f"failure {count}", round=5)
        roster.out.pop("b")
    assert roster.leave_out("b", "failure 3", round=5) and not roster.may_rejoin("b")
    assert roster.status["b"]["status"] == "out" and roster.events[-1].event == "out for good"
    assert not roster.leave_out("a", "failure", round=5) and not roster.leave_out("a", "again", round=6)
    assert roster.failures["a"] == (6, 1)


# -- round commits -----------------------------------------------------------------------------------
def _part(folder: Path, round: int, site: str) -> None:
    path = site_checkpoint_path(folder, round, site)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(f"{site} after round {round}".encode())


def test_a_round_is_committed_once_every_site_in_it_saved_and_a_site_out_of_it_keeps_its_earlier_part(tmp_path):
    commits = RoundCommits(str(tmp_path), ["a", "b"], keep=2)
    commits.aggregated(1, {"round": 1})
    _part(tmp_path, 1, "a")
    commits.saved("a", 1)
    assert commits.commit_if_complete(1, expected={"a", "b"}) is None and commits.waiting() == [1]
    assert not (tmp_path / "last.json").exists()  # b has not saved: nothing committed
    _part(tmp_path, 1, "b")
    commits.saved("b", 1)
    assert commits.commit_if_complete(1, expected={"a", "b"}) is None and commits.waiting() == []
    assert find_checkpoint(tmp_path).round == 1
    # round 2 without b (left out): its round-1 part is linked into round 2's folder
    commits.aggregated(2, {"round": 2})
    _part(tmp_path, 2, "a")
    commits.saved("a", 2)
    assert commits.commit_if_complete(2, expected={"a"}) is None
    ckpt = find_checkpoint(tmp_path)
    assert ckpt.round == 2 and ckpt.behind() == ["b"] and ckpt.site_paths["b"].read_bytes() == b"b after round 1"
    assert commits.parts["b"] == (str(site_checkpoint_path(tmp_path, 2, "b")), 1) and commits.parts["a"][1] == 2
    # a part that never reached the disk: the commit fails and says why
    commits.aggregated(3, {"round": 3})
    commits.saved("a", 3)
    assert "checkpoint of round 3 could not be written: FileNotFoundError" in commits.commit_if_complete(
        3, expected={"a"}
    )
    # a later round supersedes earlier ones still waiting
    commits.aggregated(4, {"round": 4})
    commits.aggregated(5, {"round": 5})
    for site in "ab":
        _part(tmp_path, 5, site)
        commits.saved(site, 5)
    assert commits.commit_if_complete(5, expected={"a", "b"}) is None and commits.waiting() == []


def test_no_folder_no_commits():
    commits = RoundCommits(None, ["a"])
    commits.aggregated(1, {"round": 1})
    commits.saved("a", 1)
    assert not commits.enabled and commits.waiting() == [] and commits.commit_if_complete(1, {"a"}) is None


# -- the coordinator, driven by asyncio ----------------------------------------------------------------
def test_continue_mode_completes_a_barrier_without_the_failed_site_and_lets_it_rejoin_at_the_end():
    async def scenario():
        coordinator = Coordinator(FedAvg(), ["a", "b", "c"], reliability=CONTINUE, checkpointing=Checkpointing(keep=1))
        a = asyncio.ensure_future(coordinator.agree("a", ("epoch_end", 0), True, all=False))
        b = asyncio.ensure_future(coordinator.agree("b", ("epoch_end", 0), False, all=False))
        await asyncio.sleep(0)
        assert not a.done()  # c has not arrived
        coordinator.site_finished("c", "RuntimeError: scanner offline")
        decided = await asyncio.wait_for(asyncio.gather(a, b), timeout=5)
        with pytest.raises(
            SiteLeftOut, match="site 'c' was left out of round 1: failed: RuntimeError: scanner offline"
        ):
            await coordinator.agree("c", ("epoch_end", 0), True, all=False)
        rejoining = asyncio.ensure_future(coordinator.rejoin("c"))
        await asyncio.sleep(0)
        coordinator.site_finished("a")
        coordinator.site_finished("b")
        back = await asyncio.wait_for(rejoining, timeout=5)
        return decided, back, coordinator.progress()

    decided, back, progress = asyncio.run(scenario())
    assert decided == [True, True]
    assert back.finished and back.model is None  # the run ended while c was out: it only loads the final model
    assert isinstance(progress, ProgressSnapshot)
    assert [(e.site, e.event) for e in progress.events] == [("c", "left out"), ("c", "rejoined")]
    assert {s: v["status"] for s, v in progress.sites.items()} == {"a": "done", "b": "done", "c": "done"}


def test_a_late_site_is_left_out_in_continue_mode_and_stops_the_run_otherwise():
    async def late(reliability):
        coordinator = Coordinator(FedAvg(), ["a", "b"], reliability=reliability)
        return await asyncio.wait_for(
            coordinator.agree("a", ("decision", 1, 1), True, all=True), timeout=5
        ), coordinator

    decided, coordinator = asyncio.run(late(Reliability(on_site_failure="continue", barrier_timeout=0.05)))
    assert decided and coordinator.roster.out == {"b": "missed decision 1 within barrier_timeout=0.05s"}
    with pytest.raises(FederationAborted, match=r"sites \['b'\] did not reach decision 1 within barrier_timeout=0.05s"):
        asyncio.run(late(Reliability(barrier_timeout=0.05)))
    with pytest.raises(FederationAborted, match="fewer than min_sites=2"):
        asyncio.run(late(Reliability(on_site_failure="continue", min_sites=2, barrier_timeout=0.05)))


# -- the coordinator's process, one run after another ------------------------------------------------
def test_a_coordinator_process_serves_one_run_at_a_time_and_refuses_calls_of_another():
    from lightning_fed.coordinator_process import CoordinatorProcess, StaleCallError

    async def runs():
        process = CoordinatorProcess("first", FedAvg(), ["a", "b"])
        # the first run: b waits at a barrier a never reaches
        waiting = asyncio.ensure_future(process.call("first", "agree", "b", ("decision", 0, 1), True, True))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        with pytest.raises(StaleCallError, match="'agree' was called for run second"):
            await process.call("second", "agree", "a", ("decision", 0, 1), True, True)  # not begun yet
        with pytest.raises(RuntimeError, match="still serves run first: end it first"):
            process.begin("second", FedAvg(), ["a"])
        assert not process.end("second") and process.end("first")  # only the run it serves
        with pytest.raises(FederationAborted, match="the federation was shut down"):
            await asyncio.wait_for(waiting, timeout=5)  # the waiting site is released, with the reason
        # the next run: a new federation in the same process; the first run's calls are refused
        process.begin("second", FedAvg(), ["a"])
        with pytest.raises(StaleCallError, match="'report' was called for run first"):
            await process.call("first", "report", "a", {"status": "done"})
        await process.told("first", "report", "a", {"status": "done"})  # a status report no one waits on: dropped
        await process.told("second", "report", "a", {"status": "training", "epoch": 0})
        decided = await asyncio.wait_for(process.call("second", "agree", "a", ("decision", 0, 1), True, True), 5)
        progress = await process.call("second", "progress")
        with pytest.raises(AttributeError, match="no method '_late'"):
            await process.call("second", "_late", ["a"], "x")
        return decided, progress

    decided, progress = asyncio.run(runs())
    assert decided is True and isinstance(progress, ProgressSnapshot) and progress.aborted is None
    assert progress.sites["a"]["status"] == "training"  # the second run's report reached it, the first's did not


# -- imports -------------------------------------------------------------------------------------------
def test_the_frozen_configuration_and_the_coordinator_import_without_torch():
    # as in the coordinator's process: the package's own __init__ then skips Lightning, so what loads is what
    # these modules import themselves
    script = (
        "import sys\nimport lightning_fed.config, lightning_fed.privacy_settings, lightning_fed.coordinator\n"
        "print(sorted(m for m in ('torch', 'lightning', 'opacus', 'lightning_fed.data') if m in sys.modules))"
    )
    env = {**os.environ, "LIGHTNING_FED_ROLE": "coordinator", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=REPO
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]
    from lightning_fed.config import DPSGD as configured
    from lightning_fed.privacy import DPSGD

    assert DPSGD is configured  # privacy.py re-exports the torch-free settings
