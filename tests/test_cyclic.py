"""Cyclic weight transfer: the turn order, the rule against a hand-run cycle, its state across a restart, and a
real federation whose every global model is the turn site's SGD steps from the previous one."""

import copy
import json
import pickle

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from lightning_fed import FederatedStrategy
from lightning_fed.data.flamby import HEART_SIZES, FedHeartDisease
from lightning_fed.models.survival import LogisticRegression
from lightning_fed.strategies import Cyclic, SiteUpdate, available_aggregators, get_aggregator

SITES = ["a", "b", "c", "d", "e"]


def _turns(rule: Cyclic, rounds: int) -> list[str]:
    return [rule.turn(r) for r in range(1, rounds + 1)]


def _flamby_orders(seed: int, n: int, cycles: int) -> list[list[int]]:
    """FLamby's Cyclic reshuffle: ``np.random.default_rng(seed).permutation(n)`` once per cycle."""
    rng = np.random.default_rng(seed)
    return [list(rng.permutation(n)) for _ in range(cycles)]


# -- the order -------------------------------------------------------------------------------------------------
def test_a_deterministic_cycle_visits_the_sites_in_federation_order():
    rule = Cyclic(deterministic_cycle=True)
    rule.prepare(SITES)
    assert _turns(rule, 12) == SITES + SITES + SITES[:2]


def test_a_seeded_cycle_is_a_fresh_permutation_every_cycle_as_flamby_draws_them():
    rule = Cyclic(seed=42)
    rule.prepare(SITES)
    turns = _turns(rule, 5 * 6)
    cycles = [turns[i : i + 5] for i in range(0, 30, 5)]
    assert all(sorted(c) == SITES for c in cycles)  # every site exactly once per cycle
    assert len({tuple(c) for c in cycles}) > 1  # reshuffled between cycles
    assert cycles == [[SITES[i] for i in order] for order in _flamby_orders(42, 5, 6)]
    again = Cyclic(seed=42)
    again.prepare(SITES)
    assert _turns(again, 30) == turns  # the seed decides everything
    other = Cyclic(seed=43)
    other.prepare(SITES)
    assert _turns(other, 30) != turns


def test_the_rule_is_registered_and_checks_its_options():
    assert "cyclic" in available_aggregators()
    rule = get_aggregator("cyclic", seed=3, deterministic_cycle=True)
    assert isinstance(rule, Cyclic) and rule.seed == 3 and rule.deterministic_cycle
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        Cyclic(seed=-1)
    with pytest.raises(ValueError, match="distinct site names"):
        Cyclic().prepare(["a", "a"])


# -- the rule on plain numpy updates ---------------------------------------------------------------------------
def _train(site: int, w: np.ndarray) -> np.ndarray:
    """A site's "local training": an affine map of its own, so the order of visits changes the result."""
    return w * np.float32(1.0 + 0.1 * site) + np.float32(site - 2.0)  # float32 throughout, whatever int type


def _federate(rule: Cyclic, rounds: int, start: int = 1, w: np.ndarray = None) -> list[np.ndarray]:
    """Every site trains from the current global model every round, as the machinery runs them; the rule chooses."""
    w = np.array([0.5, -1.0], dtype=np.float32) if w is None else w
    models = []
    for r in range(start, start + rounds):
        updates = [
            SiteUpdate(name, {"w": _train(i, w), "n": np.array(r, dtype=np.int64)}, 10 + i)
            for i, name in enumerate(SITES)
        ]
        w = rule.aggregate(r, updates, {"w": w}).weights["w"]
        models.append(w)
    return models


@pytest.mark.parametrize("deterministic", [True, False])
def test_the_global_models_are_a_hand_run_cycle_of_weight_transfer(deterministic):
    rule = Cyclic(deterministic_cycle=deterministic, seed=7)
    models = _federate(rule, 13)  # not prepared: the first round's sites, in order
    orders = [list(range(5))] * 3 if deterministic else _flamby_orders(7, 5, 3)
    visits = [i for order in orders for i in order][:13]
    w, expected = np.array([0.5, -1.0], dtype=np.float32), []
    for site in visits:  # the model goes from site to site, each training what the previous one handed on
        w = _train(site, w)
        expected.append(w)
    for r, (got, want) in enumerate(zip(models, expected), start=1):
        np.testing.assert_array_equal(got, want, err_msg=f"round {r}")


def test_the_turn_sites_update_is_taken_whole_and_copied():
    rule = Cyclic(deterministic_cycle=True)
    update = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(4, np.int64)}
    out = rule.aggregate(
        1, [SiteUpdate("a", update, 1), SiteUpdate("b", {k: v * 0 for k, v in update.items()}, 99)], None
    )
    assert int(out.weights["n"]) == 4 and out.weights["w"].dtype == np.float32  # integer buffers too, not the largest's
    assert out.weights["w"] is not update["w"] and not np.shares_memory(out.weights["w"], update["w"])
    assert out.extras["metrics"] == {"cyclic_site": 0.0}


def test_a_round_without_the_turn_site_is_refused_and_continue_mode_too():
    rule = Cyclic(deterministic_cycle=True)
    rule.prepare(["a", "b"])
    w = {"w": np.zeros(1, np.float32)}
    with pytest.raises(ValueError, match="round 1 is site 'a'.s turn but its update is not among the round's"):
        rule.aggregate(1, [SiteUpdate("b", w, 1)], w)
    with pytest.raises(ValueError, match="use on_site_failure='abort' with cyclic"):
        FederatedStrategy(aggregator="cyclic", on_site_failure="continue")


# -- state -----------------------------------------------------------------------------------------------------
def test_a_restored_rule_continues_the_same_cycles():
    rule = Cyclic(seed=11)
    first = _federate(rule, 7)  # mid-cycle: two cycles drawn
    saved = pickle.loads(pickle.dumps(copy.deepcopy(rule.state_dict())))  # as a round checkpoint keeps it
    assert saved["sites"] == SITES and saved["cycle"] == 1
    restored = Cyclic(seed=999)  # the seed is spent: the generator's state decides what comes next
    restored.load_state_dict(saved)
    tail = _federate(rule, 14, start=8, w=first[-1])
    assert [np.array_equal(a, b) for a, b in zip(_federate(restored, 14, start=8, w=first[-1]), tail)] == [True] * 14
    with pytest.raises(ValueError, match="cannot go back to round 3"):
        restored.turn(3)


# -- a real federation -----------------------------------------------------------------------------------------
STEPS, ROUNDS, LR, SEED = 5, 4, 0.01, 5
SITE_OF_SIZE = {train: name for name, (train, _) in HEART_SIZES.items()}  # the four train sizes differ


class RecordsCycle(LogisticRegression):
    """Notes every batch a site trains on and every global model it loads (a file per site)."""

    record_dir = ""  # set on the instance: it travels to the sites with the module

    def _note(self, record: dict) -> None:
        site = SITE_OF_SIZE[len(self.trainer.train_dataloader.dataset)]
        with open(f"{self.record_dir}/{site}.jsonl", "a") as f:
            f.write(json.dumps({"site": site, **record}) + "\n")

    def training_step(self, batch, batch_idx):
        x, y = batch
        self._note({"step": self.trainer.global_step, "x": x.tolist(), "y": y.tolist()})
        return super().training_step(batch, batch_idx)

    def on_global_model_loaded(self, round: int) -> None:
        if round == 0 or self._trainer is None:
            return
        self._note({"round": round, "weights": {k: v.tolist() for k, v in self.state_dict().items()}})


@pytest.mark.integration
@pytest.mark.usefixtures("ray_cluster", "fed_data")
def test_each_round_hands_on_the_turn_sites_sgd_steps_from_the_previous_global_model(tmp_path):
    import lightning as L

    torch.manual_seed(0)
    model = RecordsCycle(optimizer="sgd", lr=LR)
    model.record_dir = str(tmp_path)
    start = copy.deepcopy(model.state_dict())
    strategy = FederatedStrategy(
        aggregator="cyclic",
        aggregator_kwargs={"seed": SEED},
        sync_every_steps=STEPS,
        progress=False,
        checkpoint_every=0,
    )
    trainer = L.Trainer(
        strategy=strategy,
        max_steps=STEPS * ROUNDS,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    try:
        trainer.fit(model, datamodule=FedHeartDisease())
    finally:
        strategy.shutdown()
    records = [json.loads(line) for site in HEART_SIZES for line in open(tmp_path / f"{site}.jsonl")]
    batches = {(r["site"], r["step"]): r for r in records if "step" in r}
    loaded = {(r["site"], r["round"]): r["weights"] for r in records if "round" in r}
    assert len(batches) == len(HEART_SIZES) * STEPS * ROUNDS and len(loaded) == len(HEART_SIZES) * ROUNDS

    # the hand-run sequence: round r's turn site takes the previous global model through its own 5 batches of
    # that round with plain SGD; FLamby's order for the seed decides the turns
    sites = list(HEART_SIZES)
    turns = [sites[i] for i in _flamby_orders(SEED, len(sites), 1)[0]]
    hand = LogisticRegression(optimizer="sgd", lr=LR)
    hand.load_state_dict(start)
    sgd = torch.optim.SGD(hand.parameters(), lr=LR)
    for r, site in enumerate(turns, start=1):
        for step in range((r - 1) * STEPS, r * STEPS):
            batch = batches[(site, step)]
            x, y = torch.tensor(batch["x"]), torch.tensor(batch["y"])
            loss = F.binary_cross_entropy_with_logits(hand(x).reshape(-1), y)
            sgd.zero_grad()
            loss.backward()
            sgd.step()
        for name in sites:  # every site holds the same global model: the turn site's, by hand
            for key, value in hand.state_dict().items():
                np.testing.assert_allclose(
                    loaded[(name, r)][key], value.numpy(), rtol=1e-6, atol=1e-7, err_msg=f"round {r} at {name}"
                )
    for key, value in hand.state_dict().items():  # the driver's module ends with the last turn's model
        np.testing.assert_allclose(model.state_dict()[key].numpy(), value.numpy(), rtol=1e-6, atol=1e-7)
    assert float(trainer.callback_metrics["fl/cyclic_site"]) == sites.index(turns[-1])
