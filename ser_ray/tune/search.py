"""Hyperparameter search: Ray Tune + OptunaSearch (TPE, seeded) + ASHA on validation UA.

One trial = one ``TorchTrainer`` run of the train stage's own worker loop
(``ser_ray.train.loop.make_trainer`` with a ``TuneReportCallback``): a function trainable builds the
trainer, fits it, and every epoch's metrics (and checkpoint path) flow to Tune, where ASHA may stop
the trial. Why a TorchTrainer per trial and not ``tune.report`` from the loop directly:

* the loop is a Ray Train worker function (``ray.train.get_context``/``get_dataset_shard``/
  ``report``); ``ray.train.report`` raises inside a Tune function trainable in Ray 2.60, so running
  it "directly" would need a second session abstraction in the loop. One loop, one code path.
* the same trial runs multi-worker DDP (``train.num_workers``) or on a fractional GPU unchanged.
* the cost, measured on a 2-core VM (see the tune report): a few seconds of Train start-up per trial,
  and ASHA-stopped trials release their Train resources only when the dashboard (State API) runs —
  so ``ser_ray.session`` starts a local Ray *with* the dashboard, and clusters have it anyway.

The experiment directory ``<storage_path>/<name>/`` (local or ``s3://``) holds Tune's state (resumable
with ``run_search(..., resume=True)``), ``train/`` (the trials' Train runs and checkpoints) and::

    trials.parquet, trials.csv   every trial: id, family, params, best val UA/WA/F1, epochs, stop reason
    best.json                    per family: best trial (on validation), its val and test metrics, model dir
    split.parquet                the manifest rows the search used, with `split` train/val/test
    best/<family>/model/         that model in the save_model layout
    search_curves.png            val UA of every trial over time
    param_importances.png        Optuna (fANOVA) importances per family

This module builds and runs the Tuner; ``config`` (the search config), ``data`` (split and feature
caches), ``trial`` (one trial) and ``results`` (tables, best.json) hold the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable

import pandas as pd

from ser_ray.tune import space as spaces
from ser_ray.train.config import EPOCHS
from ser_ray.tune.config import SearchConfig, storage_root
from ser_ray.tune.data import load_search_data
from ser_ray.tune.results import mark_default_trials, results_table, write_best, write_table
from ser_ray.tune.trial import make_trainable

log = logging.getLogger(__name__)


def default_points(cfg: SearchConfig) -> list[dict]:
    """Optuna start points: each family at its default (the ``TrainConfig``/``Hparams`` default value
    of every searched parameter that has one; with ``augment.p = 0`` the other augment values are moot)."""
    from ser_ray.models import default_hparams
    from ser_ray.train.config import TrainConfig

    base = spaces.deep_merge(dataclasses.asdict(TrainConfig()), cfg.train)
    if not base.get("augment"):  # the default trains without augmentation: p = 0 says the same
        base["augment"] = {"p": 0.0}
    points = []
    for family in cfg.families:
        defaults = spaces.deep_merge(base, {"hparams": default_hparams(family)})
        point = {"family": family} if len(cfg.families) > 1 else {}
        for name, domain in spaces.flatten({family: spaces.family_space(family, cfg.space.get(family))}).items():
            value = _lookup(defaults, name.split("/")[1:])
            if isinstance(domain, spaces.Domain) and value is not None and _in_domain(domain, value):
                point[name] = value
        points.append(point)
    return points


def _lookup(tree: dict, keys: list[str]):
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _in_domain(domain, value) -> bool:
    categories = getattr(domain, "categories", None)
    if categories is not None:
        return value in categories
    try:
        return domain.lower <= value <= domain.upper
    except TypeError:
        return False


def build_tuner(
    trainable: Callable,
    space_fn: Callable,
    cfg: SearchConfig,
    *,
    resources: dict | Callable | None = None,
    points_to_evaluate: list[dict] | None = None,
):
    """The ``tune.Tuner``: ``trainable`` under OptunaSearch(TPE, ``cfg.seed``) + ASHA on ``cfg.metric``.

    ``trainable`` is a parameter so tests run the same construction on a toy objective.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    import optuna

    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.tpe_startup_trials)
    searcher = OptunaSearch(space=space_fn, metric=cfg.metric, mode="max", sampler=sampler,
                            points_to_evaluate=points_to_evaluate or None)
    # max_t one past the last epoch: a trial that runs all its epochs ends on its own (its TorchTrainer
    # shuts down cleanly) instead of being STOPped by ASHA at its final report, which raced Train's
    # resource cleanup and left the next trials waiting for CPUs in a measured `ray job` run.
    scheduler = ASHAScheduler(time_attr=EPOCHS, metric=cfg.metric, mode="max",
                              max_t=cfg.max_epochs + 1, grace_period=min(cfg.grace_period, cfg.max_epochs),
                              reduction_factor=cfg.reduction_factor)
    if resources is not None:
        trainable = tune.with_resources(trainable, resources)
    # Tune's status tables only with -v; otherwise one line per finished trial
    verbose = 1 if logging.getLogger().isEnabledFor(logging.DEBUG) else 0
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.num_samples,
                                    max_concurrent_trials=cfg.max_concurrent_trials),
        run_config=tune.RunConfig(name=cfg.name, storage_path=storage_root(cfg.storage_path),
                                  failure_config=tune.FailureConfig(max_failures=cfg.trial_retries), verbose=verbose,
                                  callbacks=[] if verbose else [trial_lines(cfg)]),
    )


def trial_lines(cfg: SearchConfig):
    """A Tune callback printing one line per finished trial: family, best metric, epochs, why it stopped."""
    from ray import tune

    class TrialLines(tune.Callback):
        def __init__(self):
            self.best: dict[str, float] = {}
            self.done = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(cfg.metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.best[trial.trial_id] = max(value, self.best.get(trial.trial_id, -math.inf))

        def _line(self, trial, outcome: str) -> None:
            self.done += 1
            epochs = (trial.last_result or {}).get(EPOCHS, 0)
            best = self.best.get(trial.trial_id)
            family = trial.config.get("family", cfg.families[0])
            score = f"best {cfg.metric} {best:.3f}" if best is not None else f"no {cfg.metric}"
            print(f"  trial {self.done}/{cfg.num_samples} {family}: {score} after {epochs} epoch(s), {outcome}",
                  flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            from ser_ray.models.classical import is_classical

            epochs = (trial.last_result or {}).get(EPOCHS, 0)
            family = trial.config.get("family", cfg.families[0])
            early = epochs < cfg.max_epochs and not is_classical(family)
            self._line(trial, "stopped early by ASHA" if early else "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "FAILED (see trials.csv `error`)")

    return TrialLines()


def restore_tuner(path: str, trainable: Callable, *, resources: dict | Callable | None = None):
    """Continue an interrupted experiment: finished trials are kept, unfinished/errored ones rerun."""
    from ray import tune

    if resources is not None:
        trainable = tune.with_resources(trainable, resources)
    return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)



# -- the whole search ------------------------------------------------------------------------------


@dataclasses.dataclass
class SearchResult:
    path: str  # experiment directory
    table: pd.DataFrame
    best: dict
    grid: Any  # ray.tune.ResultGrid
    notes: list[str]


def run_search(cfg: SearchConfig, *, resume: bool = False) -> SearchResult:
    """Run (or with ``resume`` continue) the search; write the tables, best.json and plots."""
    import ray
    from ray import tune

    from ser_ray.tune import plots

    from ser_ray.session import check_fits

    use_gpu = cfg.gpu if cfg.gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    for family in cfg.families:  # before any feature is prepared: a trial that can never start
        res = cfg.family_resources(family)
        check_fits({"CPU": res["cpu"], "GPU": res.get("gpu", 0.0) if use_gpu else 0.0}, what=f"a {family} trial",
                   settings=f"resources.{family}.cpu / .gpu in the search config")
    start = time.perf_counter()
    data = load_search_data(cfg, use_gpu=bool(use_gpu))
    trainable = make_trainable(data, cfg)
    path = cfg.experiment_path
    points = default_points(cfg) if cfg.start_from_defaults else None
    if resume and tune.Tuner.can_restore(path):
        log.info("resuming the search in %s (finished trials are kept)", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if resume:
            log.info("nothing to resume at %s: starting a new search", path)
        space_fn = spaces.define_by_run({f: spaces.family_space(f, cfg.space.get(f)) for f in cfg.families})
        tuner = build_tuner(trainable, space_fn, cfg, points_to_evaluate=points)
    log.info("search %s: %d trial(s) over %s, up to %d epochs each, %d at a time -> %s", cfg.name,
             cfg.num_samples, ",".join(cfg.families), cfg.max_epochs, cfg.max_concurrent_trials, path)
    grid = tuner.fit()
    table = mark_default_trials(results_table(grid, cfg), points)
    write_table(table, cfg)
    best = write_best(table, data, cfg)
    notes = plots.write_plots(table, cfg)
    n_asha = int((table["stop_reason"] == "asha").sum()) if "stop_reason" in table else 0
    log.info("search done in %.0f s: %d trial(s), %d stopped early by ASHA; best: %s", time.perf_counter() - start,
             len(table), n_asha,
             ", ".join(f"{f} val UA {b['val']['ua']:.3f}" + (f" (default config {b['default']['val_ua']:.3f})"
                                                            if "default" in b else "") for f, b in best.items()))
    return SearchResult(path=path, table=table, best=best, grid=grid, notes=notes)

