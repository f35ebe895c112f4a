"""Starts or joins Ray, places one actor per site plus the coordinator, runs the federation, brings results home.

Lightning routes ``fit``/``validate``/``test`` through ``strategy.launcher.launch``; :class:`FederatedLauncher`
runs them across the sites instead of in the driver process, then updates the driver's Trainer the way
DDP-spawn's launcher does (weights, ``trainer.state``, loop counters, callback metrics). ``predict`` runs locally
on the global model.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import ray
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.strategies.launchers.launcher import _Launcher
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from lightning_fed import COORDINATOR_ROLE_ENV
from lightning_fed.audit import describe
from lightning_fed.checkpoint import find_checkpoint, is_federated_checkpoint
from lightning_fed.coordinator import RemoteCoordinator, federated_metrics
from lightning_fed.data.sites import Site, describe_sites, simulate_sites
from lightning_fed.loggers import log_driver_metrics, site_logger_specs
from lightning_fed.privacy import site_privacy
from lightning_fed.progress import FederatedProgress, results_table
from lightning_fed.site import RemoteSiteActor, SitePlan
from lightning_fed.strategies.base import GlobalModel
from lightning_fed.strategies.site import load_weights, state_to_numpy

if TYPE_CHECKING:
    from lightning_fed.strategy import FederatedStrategy

log = logging.getLogger(__name__)


class SiteFailedError(RuntimeError):
    """A site raised or died; the federation was stopped and every actor torn down."""


class FederationConfigError(ValueError):
    """The federation cannot start as configured (sites, resources, checkpoint); nothing was trained."""


def trainer_settings(trainer: Trainer) -> dict[str, Any]:
    """The driver Trainer's loop settings, replayed in every site's Trainer."""
    return {
        "max_epochs": trainer.max_epochs,
        "min_epochs": trainer.min_epochs,
        "max_steps": trainer.max_steps,
        "min_steps": trainer.min_steps,
        "limit_train_batches": trainer.limit_train_batches,
        "limit_val_batches": trainer.limit_val_batches,
        "limit_test_batches": trainer.limit_test_batches,
        "val_check_interval": trainer.val_check_interval,
        "check_val_every_n_epoch": trainer.check_val_every_n_epoch,
        "num_sanity_val_steps": trainer.num_sanity_val_steps,
        "log_every_n_steps": trainer.log_every_n_steps,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "gradient_clip_val": trainer.gradient_clip_val,
        "gradient_clip_algorithm": getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm),
        "precision": trainer.precision,
        "reload_dataloaders_every_n_epochs": trainer.reload_dataloaders_every_n_epochs,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }


def user_callbacks(trainer: Trainer) -> list:
    """The driver's callbacks that sites replay (progress bars, model summaries and the CLI's config saver stay on
    the driver: they describe the run, not a site's training)."""
    from lightning.pytorch.cli import SaveConfigCallback

    return [cb for cb in trainer.callbacks if not isinstance(cb, (ProgressBar, ModelSummary, SaveConfigCallback))]


class RayRuntime:
    """Joins the Ray cluster the process is connected to (or ``RAY_ADDRESS``, as under ``ray job submit``), or
    starts a local one sized for the sites and shuts it down afterwards."""

    def __init__(self, address: Optional[str], init_kwargs: dict[str, Any]) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.init_kwargs = init_kwargs
        self.started = False

    def ensure(self, cpus_needed: float) -> None:
        if ray.is_initialized():
            return
        if self.address:
            ray.init(address=self.address, **self.init_kwargs)
            return
        installed = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
        paths = [p or os.getcwd() for p in sys.path if p == "" or (os.path.isdir(p) and not p.startswith(installed))]
        kwargs = {
            "num_cpus": max(os.cpu_count() or 1, math.ceil(cpus_needed)),
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            # actors must import the same modules as the driver (scripts, test helpers)
            "runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}},
            **self.init_kwargs,
        }
        ray.init(address="local", **kwargs)
        self.started = True

    def shutdown(self) -> None:
        if self.started and ray.is_initialized():
            ray.shutdown()
        self.started = False


class SitePool:
    """Site actors kept warm between runs that use the same site layout (names and resources, in order).

    A new run of that layout resets the idle actors with its own plan (new module, data, Trainer, coordinator)
    instead of starting new processes, which saves each site its process start and its torch/Lightning imports.
    Only actors of runs that ended cleanly come back; a failed run's actors are always killed. The pool lives as
    long as the Ray session that its owner (``lightning-fed compare``/``sweep``) started; call :meth:`close`.
    """

    def __init__(self) -> None:
        self._idle: dict[tuple, tuple[Any, dict[str, Any]]] = {}
        self.started = 0  # site actor processes started for runs using this pool
        self.reused = 0  # site actors handed to a later run instead

    @staticmethod
    def layout(sites: list[Site]) -> tuple:
        return tuple((s.name, s.num_cpus, s.num_gpus, tuple(sorted(s.resources.items()))) for s in sites)

    def take(self, sites: list[Site]) -> Optional[tuple[Any, dict[str, Any]]]:
        warm = self._idle.pop(self.layout(sites), None)
        if warm is not None:
            self.reused += len(warm[1])
        return warm

    def give(self, sites: list[Site], pg: Any, actors: dict[str, Any]) -> None:
        old = self._idle.pop(self.layout(sites), None)
        if old is not None:
            _kill(*old)
        self._idle[self.layout(sites)] = (pg, actors)

    def make_room(self, bundles: list[dict[str, float]]) -> None:
        """Free idle layouts when the cluster could not otherwise place ``bundles``."""
        need: dict[str, float] = {}
        for bundle in bundles:
            for key, value in bundle.items():
                need[key] = need.get(key, 0.0) + value
        free = ray.available_resources()
        if self._idle and any(free.get(k, 0.0) + 1e-9 < v for k, v in need.items()):
            self.close()

    def close(self) -> None:
        """End every idle actor and its placement group."""
        for pg, actors in self._idle.values():
            _kill(pg, actors)
        self._idle.clear()


def _kill(pg: Any, actors: dict[str, Any]) -> None:
    for actor in actors.values():
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass
    if pg is not None:
        try:
            remove_placement_group(pg)
        except Exception:
            pass


class Federation:
    """A running federation: the coordinator and one actor per site, alive from ``fit`` until :meth:`shutdown`."""

    def __init__(self, strategy: "FederatedStrategy", trainer: Trainer, model: LightningModule, sites: list[Site], source_id: Optional[int], resume: Any = None) -> None:
        self.strategy = strategy
        self.sites = sites
        self.names = [s.name for s in sites]
        self._audit: Optional[list[dict[str, Any]]] = [] if strategy.audit_messages else None
        self.source_id = source_id
        self.runtime = RayRuntime(strategy.ray_address, strategy.ray_init_kwargs)
        self.actors: dict[str, Any] = {}
        self.coordinator: Any = None
        self.pg: Any = None
        self.checkpoint_dir: Optional[str] = None
        self.site_nodes: dict[str, str] = {}  # site -> Ray node id it runs on
        self.startup_seconds = 0.0
        self.alive = False
        t0 = time.monotonic()
        try:
            self._start(trainer, model, resume)
        except BaseException:
            self.shutdown(reuse=False)
            raise
        self.startup_seconds = time.monotonic() - t0

    # -- start-up --------------------------------------------------------------------------------
    def _start(self, trainer: Trainer, model: LightningModule, resume: Any) -> None:
        try:
            privacy = site_privacy(self.strategy.privacy, self.names)
        except ValueError as err:
            raise FederationConfigError(str(err)) from None
        self.runtime.ensure(sum(s.num_cpus for s in self.sites))
        self._check_resources()
        pool = self.strategy.site_pool
        warm = pool.take(self.sites) if pool is not None else None
        if warm is None:
            if pool is not None:
                pool.make_room([_bundle(s) for s in self.sites])
            self.pg = placement_group([_bundle(s) for s in self.sites], strategy="PACK")
            try:
                ray.get(self.pg.ready(), timeout=self.strategy.placement_timeout)
            except GetTimeoutError:
                raise FederationConfigError(
                    f"the cluster could not place the sites {self.names} within {self.strategy.placement_timeout:.0f}s "
                    f"(available: {_fmt_resources(ray.available_resources())}): free resources or lower the sites' num_cpus/num_gpus"
                ) from None
        else:
            self.pg = warm[0]
        self.checkpoint_dir = self.strategy.resolve_checkpoint_dir(trainer, resume)
        self.coordinator = RemoteCoordinator.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
            runtime_env={"env_vars": {COORDINATOR_ROLE_ENV: "coordinator"}},
        ).remote(
            self.strategy.aggregator,
            self.names,
            self.checkpoint_dir,
            self.strategy.keep_checkpoints,
            self.strategy.barrier_timeout,
            resume.server_state() if resume is not None else None,
            GlobalModel(weights=state_to_numpy(model.state_dict()), round=0) if resume is None else None,
            audit=self.strategy.audit_messages,
        )
        module_ref = ray.put(model)
        callbacks = user_callbacks(trainer)
        loggers = site_logger_specs(trainer.loggers)
        settings = trainer_settings(trainer)
        root = self.strategy.run_root(trainer)
        for index, site in enumerate(self.sites):
            plan = SitePlan(
                site=site, index=index, module_ref=module_ref, coordinator=self.coordinator,
                algorithm=self.strategy.aggregator.site_algorithm(), trainer_settings=settings, callbacks=callbacks,
                loggers=loggers, sync_every=self.strategy.sync_every, root_dir=root, checkpoint_dir=self.checkpoint_dir,
                checkpoint_every=self.strategy.checkpoint_every, seed=self.strategy.seed,
                metric_thresholds=self.strategy.metric_thresholds, privacy=privacy[site.name],
                class_balance=self.strategy.class_balance,
            )
            if warm is not None:
                self.actors[site.name] = warm[1][site.name]
                self.actors[site.name].reset.remote(plan)  # runs before ready(): one caller's calls keep their order
                continue
            self.actors[site.name] = RemoteSiteActor.options(
                num_cpus=site.num_cpus, num_gpus=site.num_gpus, resources=site.resources or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=index),
                name=None,
            ).remote(plan)
            if pool is not None:
                pool.started += 1
        self.alive = True
        atexit.register(self.shutdown)
        stage = "fit" if trainer.state.fn == TrainerFn.FITTING else "test" if trainer.state.fn == TrainerFn.TESTING else "validate"
        reports = self._gather({n: a.ready.remote(stage) for n, a in self.actors.items()}, "start")
        self.site_nodes = {n: r["node"] for n, r in reports.items()}
        empty = [n for n, r in reports.items() if r["train_samples"] == 0]
        if empty and trainer.state.fn == TrainerFn.FITTING:
            raise FederationConfigError(f"site(s) {empty} have no training samples: give every site data or drop it from the federation")

    def _check_resources(self) -> None:
        total = ray.cluster_resources()
        need: dict[str, float] = {}
        for site in self.sites:
            for key, value in _bundle(site).items():
                need[key] = need.get(key, 0.0) + value
        for key, value in need.items():
            if total.get(key, 0.0) + 1e-9 < value:
                users = [s.name for s in self.sites if _bundle(s).get(key)]
                hint = (
                    f"start the node holding that data with --resources '{{\"{key}\": 1}}'"
                    if key not in ("CPU", "GPU", "memory")
                    else "lower the sites' num_cpus/num_gpus or add nodes"
                )
                raise FederationConfigError(
                    f"sites {users} need {value:g} {key} but the Ray cluster has {total.get(key, 0.0):g}: {hint}"
                )

    # -- running ---------------------------------------------------------------------------------
    def _gather(self, refs: dict[str, Any], what: str, on_poll: Optional[Callable[[], None]] = None) -> dict[str, Any]:
        """Wait for one call per site; the first failure stops the federation and raises with the site's name."""
        by_ref = {ref: name for name, ref in refs.items()}
        pending, results = list(by_ref), {}
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=self.strategy.poll_interval)
            for ref in done:
                name = by_ref[ref]
                try:
                    results[name] = ray.get(ref)
                except (RayTaskError, RayActorError) as err:
                    self._fail(name, err, what)
                if self._audit is not None:
                    self._audit.append({"method": what, "site": name, "payload": describe([results[name]])})
            if on_poll is not None:
                on_poll()
        return {name: results[name] for name in refs}  # site order, not completion order

    def _fail(self, name: str, err: Exception, what: str) -> None:
        reason = None
        if self.coordinator is not None:
            deadline = time.monotonic() + 2.0
            while reason is None and time.monotonic() < deadline:  # the site's own one-line report may be in flight
                try:
                    reason = ray.get(self.coordinator.abort_reason.remote(), timeout=2)
                except Exception:
                    break
                if reason is None:
                    time.sleep(0.1)
        if reason is None:
            if isinstance(err, RayActorError) and err.actor_init_failed:
                # Ray keeps the creation error only as text: its last line is "ExceptionType: message"
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                reason = f"site {name!r} failed to start: {lines[-1] if lines else err}"
            elif isinstance(err, RayActorError):
                reason = f"site {name!r} died during {what}: its actor process exited (killed, out of memory, or a native crash)"
            else:
                cause = getattr(err, "cause", None) or err
                first = str(cause).strip().splitlines()
                reason = f"site {name!r} failed during {what}: {type(cause).__name__}: {first[0] if first else ''}"
            if self.coordinator is not None:
                self.coordinator.abort.remote(reason)
        self.shutdown(graceful=False)
        raise SiteFailedError(reason) from None

    def fit(self, trainer: Trainer, resume: Any) -> dict[str, Any]:
        total_rounds = math.ceil(trainer.max_epochs / self.strategy.sync_every) if trainer.max_epochs and trainer.max_epochs > 0 else 0
        progress = FederatedProgress(total_rounds, enabled=self.strategy.progress)
        state = {"since": 0, "fl": {}, "snapshot": None}

        def poll() -> None:
            snap = ray.get(self.coordinator.progress.remote(state["since"]))
            state["since"] = snap["history_len"]
            state["snapshot"] = snap
            for entry in snap["history"]:
                state["fl"].update(entry["fl"])
                site_scalars = {}
                for site, values in entry["sites"].items():
                    for key, value in values.items():
                        site_scalars[key if key.startswith("site/") else f"site/{site}/{key}"] = value
                log_driver_metrics(trainer.loggers, {**entry["fl"], **site_scalars}, step=entry["epoch"])
            progress.update(snap, state["fl"])

        t0 = time.monotonic()
        ray.get(self.coordinator.start_clock.remote())
        refs = {n: a.fit.remote(str(resume.site_paths[n]) if resume else None) for n, a in self.actors.items()}
        try:
            results = self._gather(refs, "fit", on_poll=poll)
            poll()
        finally:
            progress.close()
        final = ray.get(self.coordinator.final_global.remote())
        global_model = ray.get(final[0]) if final else None
        return {
            "sites": results,
            "global": global_model if global_model is not None and global_model.round > 0 else None,
            "fl": state["fl"],
            "round_seconds": (state["snapshot"] or {}).get("round_seconds", []),
            "aggregate_seconds": (state["snapshot"] or {}).get("aggregate_seconds", []),
            "sync_seconds": {n: r["sync_seconds"] for n, r in results.items()},
            "fit_seconds": time.monotonic() - t0,
        }

    def evaluate(self, stage: str, model: LightningModule, exact: bool = False) -> dict[str, Any]:
        """``test``/``validate`` ``model`` at every site; ``exact`` loads every tensor as given (no algorithm hook:
        to test a model trained elsewhere, e.g. another site's local model, on every site's data)."""
        ref = ray.put(GlobalModel(weights=state_to_numpy(model.state_dict()), round=-1))
        return self._gather({n: a.evaluate.remote(stage, ref, exact) for n, a in self.actors.items()}, stage)

    def audit(self) -> dict[str, list[dict[str, Any]]]:
        """Structure (never values) of every message sites sent the coordinator and every result they returned
        to the driver; needs ``FederatedStrategy(audit_messages=True)`` and a live federation."""
        if self._audit is None:
            raise FederationConfigError("message audit is off: create the strategy with FederatedStrategy(audit_messages=True)")
        return {"coordinator": ray.get(self.coordinator.audit_log.remote()), "driver": list(self._audit)}

    def site_weights(self) -> dict[str, dict[str, Any]]:
        """Every site's current weights, by site name."""
        return self._gather({n: a.weights.remote() for n, a in self.actors.items()}, "weights")

    # -- shutdown --------------------------------------------------------------------------------
    def shutdown(self, graceful: bool = True, reuse: bool = True) -> None:
        """Finish site loggers, end every actor this federation started (or, with a :class:`SitePool`, hand them
        back to it warm when everything closed cleanly), and stop Ray if it was started here."""
        if not ray.is_initialized():
            self.alive = False
            return
        reuse = reuse and graceful and self.alive
        if graceful and self.actors:
            try:
                ray.get([a.close.remote() for a in self.actors.values()], timeout=60)
            except Exception as err:
                reuse = False
                log.warning("lightning-fed: some sites did not close cleanly: %s", err)
        pool = self.strategy.site_pool
        if reuse and pool is not None and self.actors and not self.runtime.started:
            pool.give(self.sites, self.pg, self.actors)  # warm for the next run of this layout
        else:
            _kill(self.pg, self.actors)
        if self.coordinator is not None:
            try:
                ray.kill(self.coordinator, no_restart=True)
            except Exception:
                pass
        self.actors, self.coordinator, self.pg, self.alive = {}, None, None, False
        self.runtime.shutdown()
        try:
            atexit.unregister(self.shutdown)
        except Exception:
            pass


def evaluation_rows(results: dict[str, Any], prefix: str = "test", merged: Optional[dict[str, Any]] = None) -> dict[str, dict[str, Any]]:
    """One row per site (its scalars and metrics, prefix stripped) plus ``"federated"``: every site's metric
    states merged, i.e. the model's metrics over all those sites' data together."""
    merged = merged if merged is not None else federated_metrics(results, prefix)
    rows = {name: {**{k.removeprefix(f"{prefix}_"): v for k, v in r["scalars"].items()}, **r["site_values"]} for name, r in results.items()}
    rows["federated"] = {k.removeprefix(f"fl/{prefix}_"): v for k, v in merged.items()}
    return rows


def _module_loaders(model: LightningModule) -> dict[str, Any]:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if is_overridden("setup", model):
        model.setup("fit")  # as Lightning would before asking for loaders
    return {split: getattr(model, f"{split}_dataloader")() if is_overridden(f"{split}_dataloader", model) else None
            for split in ("train", "val", "test")}


def _bundle(site: Site) -> dict[str, float]:
    bundle = {"CPU": float(site.num_cpus), **{k: float(v) for k, v in site.resources.items()}}
    if site.num_gpus:
        bundle["GPU"] = float(site.num_gpus)
    return {k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.001}


def _fmt_resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items()) if not k.startswith(("node:", "object_store", "memory")))


class FederatedLauncher(_Launcher):
    """Runs ``fit``/``validate``/``test`` across the federation instead of in the driver process."""

    def __init__(self, strategy: "FederatedStrategy") -> None:
        self.strategy = strategy

    @property
    def is_interactive_compatible(self) -> bool:
        return True

    def launch(self, function: Callable, *args: Any, trainer: Optional[Trainer] = None, **kwargs: Any) -> Any:
        assert trainer is not None
        fn = trainer.state.fn
        if fn == TrainerFn.FITTING:
            return self._fit(trainer, *args, **kwargs)
        if fn in (TrainerFn.TESTING, TrainerFn.VALIDATING):
            return self._evaluate(trainer, "test" if fn == TrainerFn.TESTING else "validate", *args, **kwargs)
        return function(*args, **kwargs)  # predict: the driver holds the global model

    def kill(self, signum: Any) -> None:
        self.strategy.shutdown()

    # -- fit -------------------------------------------------------------------------------------
    def _fit(self, trainer: Trainer, model: LightningModule, train_dataloaders: Any = None, val_dataloaders: Any = None,
             datamodule: Optional[LightningDataModule] = None, ckpt_path: Any = None, weights_only: Any = None) -> None:
        if isinstance(train_dataloaders, LightningDataModule):
            datamodule, train_dataloaders = train_dataloaders, None
        try:
            self.strategy.aggregator.check_model(model)
        except ValueError as err:
            raise FederationConfigError(str(err)) from None
        resume = self._resume_point(ckpt_path)
        source = datamodule if datamodule is not None else {"train": train_dataloaders, "val": val_dataloaders}
        if isinstance(source, dict) and all(v is None for v in source.values()):
            source = _module_loaders(model)  # a module that brings its own *_dataloader hooks
        sites = self._sites(source, model)
        self.strategy.shutdown()  # a new fit starts from fresh sites
        federation = Federation(self.strategy, trainer, model, sites, id(datamodule) if datamodule is not None else None, resume)
        self.strategy.federation = federation
        for logger in trainer.loggers:
            logger.log_hyperparams({**dict(model.hparams), **self.strategy.describe()})
        try:
            out = federation.fit(trainer, resume)
        except SiteFailedError:
            raise
        except BaseException:
            federation.shutdown(graceful=False)
            raise
        self._bring_home(trainer, model, out)
        out["startup_seconds"] = federation.startup_seconds
        self.strategy.last_fit = out

    def _resume_point(self, ckpt_path: Any) -> Any:
        if ckpt_path is None:
            return None
        if ckpt_path == "last":
            if not self.strategy.checkpoint_dir:
                raise FederationConfigError("fit(ckpt_path='last') needs FederatedStrategy(checkpoint_dir=...) to know where the federation's checkpoints are")
            return find_checkpoint(self.strategy.checkpoint_dir)
        if not is_federated_checkpoint(ckpt_path):
            raise FederationConfigError(
                f"fit(ckpt_path={str(ckpt_path)!r}) must be a federated checkpoint folder (one with last.json or manifest.json); "
                "to start from a plain Lightning checkpoint, load its weights into the model before fit"
            )
        return find_checkpoint(ckpt_path)

    def _sites(self, source: Any, model: LightningModule, splits: tuple[str, ...] = ("train", "val", "test")) -> list[Site]:
        sites = describe_sites(source) if isinstance(source, LightningDataModule) else None
        if sites is None:
            if isinstance(source, dict) and all(v is None for v in source.values()):
                raise FederationConfigError("no data: pass a datamodule (or dataloaders) to fit/test, as you would without lightning-fed")
            sites = simulate_sites(source, self.strategy.num_sites, self.strategy.partitioner, splits, self.strategy.site_cpus, self.strategy.site_gpus)
        return sites

    def _bring_home(self, trainer: Trainer, model: LightningModule, out: dict[str, Any]) -> None:
        """Global weights, state, counters and metrics onto the driver's Trainer, as if it had trained itself."""
        if out["global"] is not None:
            load_weights(model, out["global"].weights)
        reference = max(out["sites"].values(), key=lambda r: r["global_step"])
        trainer.fit_loop.load_state_dict(reference["fit_loop"])
        trainer.fit_loop.restarting = False
        metrics = {}
        for name, result in out["sites"].items():
            for key, value in result["callback_metrics"].items():
                if key.startswith("fl/"):
                    metrics[key] = value
                else:
                    metrics[key if key.startswith("site/") else f"site/{name}/{key}"] = value
        metrics.update({k: v for k, v in out["fl"].items() if isinstance(v, float)})
        if out["global"] is not None:  # figures the aggregator reports about the global model (e.g. client-level ε)
            metrics.update({f"fl/{k}": float(v) for k, v in out["global"].extras.get("metrics", {}).items()})
        private = {n: r["privacy"] for n, r in out["sites"].items() if r.get("privacy")}
        if private:
            # the federation's guarantee is the weakest site's: the max ε, never a mean
            out["privacy"] = {"sites": private, "max_epsilon": max(p["epsilon"] for p in private.values())}
            metrics["fl/dp_epsilon_max"] = out["privacy"]["max_epsilon"]
            metrics.update({f"site/{n}/dp_epsilon": p["epsilon"] for n, p in private.items()})
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        trainer.state.status = TrainerStatus.FINISHED
        trainer.state.stage = None
        trainer.training = False
        for logger in trainer.loggers:
            logger.save()

    # -- evaluate --------------------------------------------------------------------------------
    def _evaluate(self, trainer: Trainer, stage: str, model: Optional[LightningModule] = None, dataloaders: Any = None,
                  ckpt_path: Any = None, verbose: bool = True, datamodule: Optional[LightningDataModule] = None,
                  weights_only: Any = None) -> list[dict[str, Any]]:
        if isinstance(dataloaders, LightningDataModule):
            datamodule, dataloaders = dataloaders, None
        model = model or trainer.lightning_module
        if model is None:
            raise FederationConfigError(f"trainer.{stage}() needs a model: pass one or call fit first")
        if ckpt_path is not None:
            self._load_weights(model, ckpt_path)
        federation = self.strategy.federation
        reuse = federation is not None and federation.alive and (
            (datamodule is None and dataloaders is None) or (datamodule is not None and id(datamodule) == federation.source_id)
        )
        if not reuse:
            split = "test" if stage == "test" else "val"
            source = datamodule if datamodule is not None else {split: dataloaders}
            if datamodule is None and dataloaders is None:
                raise FederationConfigError(f"trainer.{stage}() needs data: pass the datamodule or dataloaders")
            sites = self._sites(source, model, splits=(split,))
            self.strategy.shutdown()
            federation = Federation(self.strategy, trainer, model, sites, id(datamodule) if datamodule is not None else None)
            self.strategy.federation = federation
        results = federation.evaluate(stage, model)
        prefix = "test" if stage == "test" else "val"
        fl = federated_metrics(results, prefix)
        output: dict[str, Any] = {k: v for k, v in fl.items() if isinstance(v, float)}
        for name, result in results.items():
            output.update({f"site/{name}/{k}": v for k, v in result["scalars"].items()})
            output.update({f"site/{name}/{prefix}_{k}": v for k, v in result["site_values"].items() if isinstance(v, float)})
        table = evaluation_rows(results, prefix, fl)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in output.items()})
        log_driver_metrics(trainer.loggers, output, step=None)
        self.strategy.last_evaluation = {"stage": stage, "sites": {n: r for n, r in table.items()}, "metrics": output,
                                         "confusion_matrices": {**{n: r["site_values"].get("confusion_matrix") for n, r in results.items()},
                                                                "federated": fl.get(f"fl/{prefix}_confusion_matrix")}}
        notes = sorted({r["note"] for r in results.values() if r.get("note")})
        self.strategy.last_evaluation["notes"] = notes
        if verbose:
            print(f"\n{stage} results (each site on its own data; 'federated' merges every site's metric states):")
            print(results_table(table))
            for note in notes:
                print(f"note: {note}")
        trainer.state.status = TrainerStatus.FINISHED
        trainer.state.stage = None
        return [output]

    def _load_weights(self, model: LightningModule, ckpt_path: Any) -> None:
        if ckpt_path in ("last", "best") or is_federated_checkpoint(ckpt_path):
            root = self.strategy.checkpoint_dir if ckpt_path in ("last", "best") else ckpt_path
            if not root:
                raise FederationConfigError(f"ckpt_path={ckpt_path!r} needs FederatedStrategy(checkpoint_dir=...)")
            state = find_checkpoint(root).server_state()
            load_weights(model, state["global_model"].weights)
            return
        if not Path(str(ckpt_path)).is_file():
            raise FederationConfigError(f"checkpoint {ckpt_path} does not exist")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint.get("state_dict", checkpoint))
