"""The simulation engine: sites packed onto workers, placement, a coordinator free of torch, grouped options."""

import lightning as L
import numpy as np
import pytest
import torch

from lightning_fed import Checkpointing, FederatedStrategy, Placement, Simulation
from lightning_fed.config import FederationConfig
from lightning_fed.data.sites import Site
from lightning_fed.models import SmallCNN
from lightning_fed.placement import WorkerSpec, deal, place_sites
from tests.helpers import NoisyCNN, small_hospitals


def _fit(tmp_path, placement, sizes=(160, 120, 100, 80)):
    L.seed_everything(7, verbose=False)
    model = NoisyCNN()
    dm = small_hospitals(sizes=sizes, ratios=(0.5, 0.2, 0.2, 0.2), val_fraction=0.2, seed=3)
    strategy = FederatedStrategy(progress=False, checkpoint_every=0, seed=7, placement=placement)
    trainer = L.Trainer(
        strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    trainer.fit(model, datamodule=dm)
    try:
        layout = strategy.last_fit.startup.layout
        sites = strategy.federation.site_weights()
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("fl/")}
    finally:
        strategy.shutdown()
    return layout, {k: v.clone() for k, v in model.state_dict().items()}, sites, metrics


@pytest.mark.usefixtures("ray_cluster", "fed_data")
def test_packed_and_one_process_per_site_give_bit_identical_results(tmp_path):
    # the same threads per worker (1) in both layouts: packing is the only difference
    packed_layout, packed, packed_sites, packed_metrics = _fit(
        tmp_path / "a", Placement(sites_per_worker=2, worker_cpus=1)
    )
    alone_layout, alone, alone_sites, alone_metrics = _fit(tmp_path / "b", Placement(sites_per_worker=1))
    assert packed_layout.startswith("2 workers") and alone_layout.startswith("4 workers"), (packed_layout, alone_layout)
    for key in packed:
        assert torch.equal(packed[key], alone[key]), key
    for site, weights in packed_sites.items():
        for key, value in weights.items():
            np.testing.assert_array_equal(value, alone_sites[site][key], err_msg=f"{site}:{key}")
    assert packed_metrics == alone_metrics and "fl/val_auroc" in packed_metrics


@pytest.mark.usefixtures("ray_cluster", "fed_data")
def test_the_coordinator_process_never_imports_torch_or_lightning(tmp_path):
    torch.manual_seed(0)
    strategy = FederatedStrategy(
        aggregator="fedavg", progress=False, checkpointing=Checkpointing(dirpath=str(tmp_path / "ckpt"))
    )
    trainer = L.Trainer(
        strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    trainer.fit(SmallCNN(), datamodule=small_hospitals(sizes=(200, 100, 100)))

    def heavy_modules(coordinator):  # runs inside the coordinator's process (pickled by value)
        import sys

        return sorted(
            {m.split(".")[0] for m in sys.modules}
            & {"torch", "lightning", "torchmetrics", "pytorch_lightning", "opacus"}
        )

    try:
        import ray

        assert "fl/val_auroc" in trainer.callback_metrics  # metric states were merged there
        assert (tmp_path / "ckpt" / "round-0002" / "server.pkl").is_file()  # and a round was committed there
        assert ray.get(strategy.federation.coordinator.actor.__ray_call__.remote(heavy_modules)) == []
        worker = strategy.federation.workers[0]
        assert "torch" in ray.get(worker.__ray_call__.remote(heavy_modules))  # the check sees imports where they are
    finally:
        strategy.shutdown()


def _site(name, size=None, cpus=1.0, gpus=0.0, resources=None):
    return Site(name, lambda: None, num_cpus=cpus, num_gpus=gpus, resources=resources or {}, train_size=size)


STUDY_B = [_site("large", 24000)] + [_site(f"small_{i}", 2400) for i in range(1, 5)]


def test_placement_packs_by_size_and_threads():
    # one large site and four small ones on 2 CPUs: one worker, both threads (the large site alone is the slow path)
    assert place_sites(STUDY_B, Placement(), free_cpus=2) == [
        WorkerSpec(0, ("large", "small_1", "small_2", "small_3", "small_4"), 2.0, 0.0, (), 2)
    ]
    # many equal sites: one single-thread worker per CPU, sites dealt evenly
    equal = place_sites([_site(f"s{i}") for i in range(100)], Placement(), free_cpus=2)
    assert [(len(w.sites), w.threads, w.num_cpus) for w in equal] == [(50, 1, 1.0), (50, 1, 1.0)]
    # fixed layouts: never more sites per worker than asked, the largest work first onto the least-loaded worker
    assert [w.sites for w in place_sites(STUDY_B, Placement(sites_per_worker=2), 8)] == [
        ("large",),
        ("small_1", "small_3"),
        ("small_2", "small_4"),
    ]
    assert [w.sites for w in place_sites(STUDY_B, Placement(workers=2), 8)] == [
        ("large",),
        ("small_1", "small_2", "small_3", "small_4"),
    ]
    alone = place_sites([_site("a", 10, cpus=2), _site("b", 10)], Placement(sites_per_worker=1), 8)
    assert [(w.sites, w.num_cpus, w.threads) for w in alone] == [(("a",), 2, 2), (("b",), 1, 1)]  # each its own ask
    assert [w.num_cpus for w in place_sites(STUDY_B, Placement(worker_cpus=3), 8)] == [3, 3]
    assert deal([5, 1, 1, 1], 2, capacity=2) == [
        [0, 3],
        [1, 2],
    ]  # the full worker takes no more: the last one overflows


def test_placement_keeps_pinned_sites_alone_and_shares_gpus():
    sites = [_site("a", 10, resources={"site:a": 1}), _site("b", 10), _site("c", 10)]
    specs = place_sites(sites, Placement(), free_cpus=3)
    assert specs[0] == WorkerSpec(0, ("a",), 1.0, 0.0, (("site:a", 1.0),), 1)
    assert sum(s.num_cpus for s in specs) <= 3  # the pool sizes itself to what the pinned site leaves
    gpu = [_site(f"g{i}", 10, gpus=0.25) for i in range(4)]
    (shared,) = place_sites(gpu, Placement(), free_cpus=16, free_gpus=1)
    assert shared.sites == ("g0", "g1", "g2", "g3") and shared.num_gpus == 1.0  # the sum of their shares, on one GPU
    split = place_sites(gpu, Placement(sites_per_worker=1), free_cpus=16, free_gpus=1)
    assert [w.num_gpus for w in split] == [0.25] * 4


def test_grouped_options_and_todays_flat_names_agree():
    flat = FederatedStrategy(
        num_sites=4, checkpoint_every=0, keep_checkpoints=3, sites_per_worker=1, ray_address="auto"
    )
    grouped = FederatedStrategy(
        simulation=Simulation(num_sites=4),
        checkpointing=Checkpointing(every_n_rounds=0, keep=3),
        placement=Placement(sites_per_worker=1),
        cluster=flat.config.cluster,
    )
    assert (
        flat.config.simulation == grouped.config.simulation
        and flat.config.checkpointing == grouped.config.checkpointing
    )
    assert flat.config.placement == grouped.config.placement and flat.config.cluster.address == "auto"
    assert isinstance(flat.config, FederationConfig)
    with pytest.raises(ValueError, match="num_sites is given twice"):
        FederatedStrategy(num_sites=3, simulation=Simulation(num_sites=4))
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_site'"):
        FederatedStrategy(num_site=3)
    with pytest.raises(ValueError, match="placement.workers or placement.sites_per_worker, not both"):
        Placement(workers=2, sites_per_worker=2)
    with pytest.raises(ValueError, match=r"sync_every must be an integer >= 1"):
        FederatedStrategy(sync_every=0)
    with pytest.raises(dataclasses_frozen()):
        flat.config.sync_every = 3  # passed down frozen


def dataclasses_frozen():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_the_compute_thread_flushes_denormal_floats():
    """Sites compute on a thread that flushes denormals to zero (a CPU step on them can be 10-40x slower); the
    thread that asked is left as it was."""
    import torch

    from lightning_fed.scheduler import Scheduler, SiteState

    tiny = torch.tensor([1e-39], dtype=torch.float32)
    torch.set_flush_denormal(False)
    assert float(tiny * 1.0) != 0.0  # denormals kept here
    computed = Scheduler(1).call(SiteState(), lambda: float(tiny * 1.0))
    assert computed == 0.0
    assert float(tiny * 1.0) != 0.0


def test_idle_layouts_give_way_least_recently_used_first_and_only_as_far_as_a_run_needs(monkeypatch):
    import ray

    from lightning_fed.pool import WorkerPool

    pool = WorkerPool()
    old = ((2.0, 0.0, (), 2), (2.0, 0.0, (), 2))
    middle, recent = ((0.5, 0.0, (), 1),), ((1.0, 0.0, (), 1),)
    for layout in (old, middle, recent):  # given back in this order; no real workers behind them
        pool._idle[layout] = (None, [], [1] * len(layout))
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.5})
    pool.make_room([{"CPU": 0.5}])  # fits as it is: every layout stays warm
    assert list(pool._idle) == [old, middle, recent]
    pool.make_room([{"CPU": 1.0}, {"CPU": 0.25}])  # 0.75 short: the oldest layout (4 CPUs) is enough
    assert list(pool._idle) == [middle, recent]
    pool.make_room([{"CPU": 2.5}])  # 2 short: both remaining layouts (1.5 CPUs) go, still short
    assert pool._idle == {}


def test_a_nested_warm_workers_block_shares_the_enclosing_pool_and_leaves_it_open(monkeypatch):
    from lightning_fed.pool import WorkerPool
    from lightning_fed.warm import current_pool, warm_workers

    closed = []
    monkeypatch.setattr(WorkerPool, "close", lambda self: closed.append(self))
    with warm_workers(enabled=False):  # whatever block this test runs in (the session's), none is enclosing here
        with warm_workers() as outer:
            with warm_workers() as inner:  # e.g. the block `compare` opens, called inside a notebook's
                assert inner is outer and current_pool() is outer
            assert closed == [] and current_pool() is outer  # its idle workers outlive the inner block
            with warm_workers(enabled=False) as off:  # switched off: a run there starts fresh workers
                assert off is None and current_pool() is None
                with warm_workers() as own:  # a block inside that one has a pool of its own, ended with it
                    assert own is not None and own is not outer
                assert closed == [own]
        assert closed == [own, outer] and current_pool() is None
