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
  so :func:`ensure_ray` starts a local Ray *with* the dashboard, and clusters have it anyway.

The experiment directory ``<storage_path>/<name>/`` (local or ``s3://``) holds Tune's state (resumable
with ``run_search(..., resume=True)``), ``train/`` (the trials' Train runs and checkpoints) and::

    trials.parquet, trials.csv   every trial: id, family, params, best val UA/WA/F1, epochs, stop reason
    best.json                    per family: best trial (on validation), its val and test metrics, model dir
    split.parquet                the manifest rows the search used, with `split` train/val/test
    best/<family>/model/         that model in the save_model layout
    search_curves.png            val UA of every trial over time
    param_importances.png        Optuna (fANOVA) importances per family
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import yaml

from ser_ray import storage
from ser_ray.train.config import DataSpec
from ser_ray.tune import space as spaces

log = logging.getLogger(__name__)

# Per-trial resources of one Train worker; cnn/bigru_attn share a GPU four ways.
DEFAULT_RESOURCES: dict[str, dict] = {
    "cnn": {"cpu": 1.0, "gpu": 0.25},
    "bigru_attn": {"cpu": 1.0, "gpu": 0.25},
    "wav2vec2": {"cpu": 4.0, "gpu": 1.0},
}
DRIVER_CPU = 0.25  # the trial's own process (builds datasets, waits on the TorchTrainer)


@dataclasses.dataclass
class SearchConfig:
    """One search: data, families, budget, scheduler, resources, storage. Loadable from YAML."""

    name: str = "tune"
    data: DataSpec = dataclasses.field(default_factory=DataSpec)  # corpus, root, protocol, test_fold, features
    families: list[str] = dataclasses.field(default_factory=lambda: ["cnn", "bigru_attn"])
    num_samples: int = 16  # trials in all (over every family)
    max_epochs: int = 20  # epochs of a trial that ASHA never stops
    grace_period: int = 2  # epochs every trial gets before ASHA may stop it
    reduction_factor: int = 3  # ASHA keeps the top 1/reduction_factor at each rung
    max_concurrent_trials: int = 2
    resources: dict = dataclasses.field(default_factory=dict)  # family -> {cpu, gpu}; merged over DEFAULT_RESOURCES
    gpu: bool | None = None  # None: use GPUs when the cluster has them
    seed: int = 0
    tpe_startup_trials: int = 5  # random trials before TPE models the results (Optuna's default is 10)
    metric: str = "val_ua"
    storage_path: str = "~/ser-ray-results/tune"  # local directory or s3:// prefix
    train: dict = dataclasses.field(default_factory=dict)  # TrainConfig fields every trial starts from
    space: dict = dataclasses.field(default_factory=dict)  # family -> space overrides (see space.py)
    start_from_defaults: bool = True  # each family's first trial is its default config (a baseline)
    evaluate_test: bool = True  # test metrics of the best trial per family (selection stays on val)

    def __post_init__(self):
        if isinstance(self.data, dict):
            self.data = DataSpec(**self.data)
        if self.data.speaker_norm:
            raise ValueError("data.speaker_norm is an evaluation option of cv/compare (it needs every clip "
                             "of the test speakers up front); the models a search leaves behind serve unknown "
                             "speakers, so tune does not take it")
        if isinstance(self.families, str):
            self.families = [f.strip() for f in self.families.split(",") if f.strip()]
        if not self.families:
            raise ValueError("families: name at least one model family, e.g. [cnn, bigru_attn]")
        for family in self.families:
            spaces.family_space(family)  # unknown family -> clear error
        for name in ("num_samples", "max_epochs", "grace_period", "max_concurrent_trials"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        unknown = sorted(set(self.space) - set(spaces.DEFAULT_SPACES))
        if unknown:
            raise ValueError(f"space: unknown family {unknown}; known: {sorted(spaces.DEFAULT_SPACES)}")

    @property
    def experiment_path(self) -> str:
        return storage.join(_storage_root(self.storage_path), self.name)

    def family_resources(self, family: str) -> dict:
        return {**DEFAULT_RESOURCES.get(family, {"cpu": 1.0, "gpu": 0.0}), **(self.resources.get(family) or {})}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_search_config(path: str | Path | None = None, **overrides: Any) -> SearchConfig:
    """A ``SearchConfig`` from YAML, with keyword overrides (``None`` values are ignored)."""
    data: dict = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a tune config is a YAML mapping (see configs/tune-synthetic.yaml)")
    return search_config_from_mapping(data, str(path or "tune config"), **overrides)


def search_config_from_mapping(data: dict, where: str = "tune config", **overrides: Any) -> SearchConfig:
    """A ``SearchConfig`` from a mapping and keyword overrides (``data.root=...``; ``None`` values are
    ignored); unknown keys are refused, naming the valid ones."""
    data = dict(data)
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("data."):
            data["data"] = {**(data.get("data") or {}), key[5:]: value}
        else:
            data[key] = value
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    try:
        return SearchConfig(**data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _storage_root(path: str) -> str:
    return path if storage.is_s3(path) else str(Path(path).expanduser().resolve())


# -- data: the same manifest -> split -> feature cache path as `ser-ray train` --------------------


@dataclasses.dataclass
class SplitFrames:
    """Feature-cache rows of one input kind (``logmel``/``waveform``) split train/val/test."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    feature_config: Any  # FeatureConfig


@dataclasses.dataclass
class SearchData:
    """What every trial needs besides its sampled config (shipped once via ``tune.with_parameters``)."""

    labels: list[str]
    frames: dict[str, SplitFrames]  # input kind -> rows
    base_train: dict  # TrainConfig fields every trial starts from
    max_epochs: int
    resources: dict[str, dict]  # family -> {cpu, gpu}
    use_gpu: bool
    train_storage: str  # where the trials' Train runs go
    # the manifest rows (label-mapped) with `split` train/val/test: what `ser-ray ensemble --from`
    # fits and evaluates on, saved as <experiment>/split.parquet
    split_manifest: pd.DataFrame | None = None


def load_search_data(cfg: SearchConfig, *, use_gpu: bool = False) -> SearchData:
    """Manifest, label map, the fixed speaker-disjoint split (``data.test_fold``) and feature caches.

    Selection uses the validation speakers only; test speakers are evaluated once, for the best trial.
    """
    from ser_ray.corpora.manifest import MANIFEST_COLUMNS
    from ser_ray.features.config import FeatureConfig
    from ser_ray.features.pipeline import load_cache_pandas, prepare
    from ser_ray.models import family_feature_config
    from ser_ray.train.config import TrainConfig
    from ser_ray.train.cv import assign_folds, fold_frames, label_mapped, load_manifest

    base = TrainConfig.from_dict({**cfg.train, "data": dataclasses.asdict(cfg.data)})
    manifest, labels = label_mapped(load_manifest(base), base.label_map)
    if len(labels) < 2:
        raise ValueError(f"only labels {labels} after label map {base.label_map!r}: nothing to classify")
    manifest, n_folds = assign_folds(manifest, cfg.data.protocol, cfg.data.k, base.seed, cfg.data.folds)
    if not 0 <= cfg.data.test_fold < n_folds:
        raise ValueError(f"data.test_fold {cfg.data.test_fold}: protocol {cfg.data.protocol} has folds 0..{n_folds - 1}")
    parts = fold_frames(manifest, cfg.data.protocol, cfg.data.test_fold, cfg.data.val_fraction, base.seed)
    speakers = [set(p["speaker"]) for p in parts]
    if speakers[0] & speakers[1] or speakers[0] & speakers[2] or speakers[1] & speakers[2]:
        raise RuntimeError("train/val/test share speakers: the split is not speaker-independent")
    log.info("split %s fold %d: train %d clips (%d speakers), val %d (%d), test %d (%d)",
             cfg.data.protocol, cfg.data.test_fold, *[x for p in parts for x in (len(p), p["speaker"].nunique())])

    cache_root = cfg.data.cache_root or storage.join(_storage_root(cfg.storage_path), "cache")
    frames: dict[str, SplitFrames] = {}  # family -> rows; families with the same features share them
    by_key: dict[str, SplitFrames] = {}
    for family in cfg.families:
        feature_config = family_feature_config(family, FeatureConfig(**cfg.data.features))
        if feature_config.key() not in by_key:
            cache = prepare(manifest[list(MANIFEST_COLUMNS)], cache_root, feature_config)
            if cache.n_error:
                log.warning("%d clip(s) failed feature extraction and are left out, e.g. %s",
                            cache.n_error, cache.errors[:1])
            feats = load_cache_pandas(cache)[["path", "features", "error"]]
            feats = feats[feats["error"].isna()]
            split = [p.merge(feats, on="path", how="inner", validate="one_to_one") for p in parts]
            by_key[feature_config.key()] = SplitFrames(*split, feature_config=feature_config)
        frames[family] = by_key[feature_config.key()]
    split_manifest = pd.concat([p[list(MANIFEST_COLUMNS)].assign(split=name)
                                for name, p in zip(("train", "val", "test"), parts)], ignore_index=True)
    return SearchData(
        labels=labels,
        split_manifest=split_manifest,
        frames=frames,
        base_train=dict(cfg.train),
        max_epochs=cfg.max_epochs,
        resources={f: cfg.family_resources(f) for f in cfg.families},
        use_gpu=use_gpu,
        train_storage=storage.join(cfg.experiment_path, "train"),
    )


# -- one trial -------------------------------------------------------------------------------------


def trial_train_config(data: SearchData, config: dict):
    """The ``TrainConfig`` of a trial: base fields, the trial's sampled overrides, budget, resources."""
    from ser_ray.train.config import TrainConfig

    family, overrides = spaces.trial_overrides(config)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    res = data.resources[family]
    merged = spaces.deep_merge(data.base_train, overrides)
    merged.update(family=family, epochs=data.max_epochs, num_workers=merged.get("num_workers", 1),
                  cpus_per_worker=res["cpu"], use_gpu=bool(data.use_gpu and res.get("gpu", 0) > 0))
    if "gpus_per_worker" in fields and merged["use_gpu"]:
        merged["gpus_per_worker"] = res["gpu"]  # fractional GPU sharing
    return TrainConfig.from_dict(merged)


def tune_trial(config: dict, data: SearchData) -> None:
    """Ray Tune function trainable: fit one TorchTrainer; each epoch's metrics reach Tune (and ASHA)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ser_ray.models.classical import is_classical
    from ser_ray.train.loop import loop_config, make_dataset, make_trainer

    train_cfg = trial_train_config(data, config)
    frames = data.frames[train_cfg.family]
    if is_classical(train_cfg.family):  # seconds of scikit-learn in this trial's process, no worker group
        from ser_ray.train.classical import fit_classical

        result = fit_classical(frames.train, frames.val, data.labels, frames.feature_config, train_cfg,
                               run_dir=storage.join(data.train_storage, f"train-{tune.get_context().get_trial_id()}"),
                               pool_validation=False)
        tune.report({**result.best_metrics, "checkpoint_path": result.best_checkpoint})
        return
    datasets = {
        "train": make_dataset(frames.train, data.labels, shuffle_seed=train_cfg.seed),
        "val": make_dataset(frames.val, data.labels),
    }
    loop_cfg = loop_config(train_cfg, data.labels, frames.feature_config, frames.train)
    # Same (storage, name) after an interruption: Ray Train resumes the run from its last checkpoint.
    trainer = make_trainer(loop_cfg, datasets, train_cfg, name=f"train-{tune.get_context().get_trial_id()}",
                           storage_path=data.train_storage, callbacks=[TuneReportCallback()])
    trainer.fit()


# -- the Tuner -------------------------------------------------------------------------------------


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


def mark_default_trials(table: pd.DataFrame, points: list[dict] | None) -> pd.DataFrame:
    """``table`` with ``is_default``: the trial ran its family's default point (the baseline to beat)."""
    table = table.copy()
    table["is_default"] = False
    for point in points or []:
        params = {k: v for k, v in point.items() if k != "family"}
        family = point.get("family") or (params and next(iter(params)).split("/")[0])
        if not family or "family" not in table:  # an empty grid gives a table without columns
            continue
        match = table["family"] == family
        for name, value in params.items():
            column = "param/" + name.split("/", 1)[1]
            if column not in table:
                match &= False
            elif isinstance(value, float):
                match &= np.isclose(pd.to_numeric(table[column], errors="coerce"), value, rtol=1e-9)
            else:
                match &= table[column] == value
        table.loc[match, "is_default"] = True
    return table


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
    scheduler = ASHAScheduler(time_attr="training_iteration", metric=cfg.metric, mode="max",
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
        run_config=tune.RunConfig(name=cfg.name, storage_path=_storage_root(cfg.storage_path),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=verbose,
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
            epochs = (trial.last_result or {}).get("training_iteration", 0)
            best = self.best.get(trial.trial_id)
            family = trial.config.get("family", cfg.families[0])
            score = f"best {cfg.metric} {best:.3f}" if best is not None else f"no {cfg.metric}"
            print(f"  trial {self.done}/{cfg.num_samples} {family}: {score} after {epochs} epoch(s), {outcome}",
                  flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            from ser_ray.models.classical import is_classical

            epochs = (trial.last_result or {}).get("training_iteration", 0)
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


# -- results ---------------------------------------------------------------------------------------


def results_table(grid, cfg: SearchConfig) -> pd.DataFrame:
    """One row per trial: id, family, params (flat and as JSON), best val metrics, epochs, stop reason."""
    from ser_ray.models.classical import is_classical

    rows = []
    for result in grid:
        history = result.metrics_dataframe
        config = dict(result.config or {})
        family = config.get("family", cfg.families[0])
        row: dict[str, Any] = {
            "trial_id": (result.metrics or {}).get("trial_id") or Path(result.path).name,
            "family": family,
            "config": json.dumps(config.get(family, {}), sort_keys=True, default=str),
            "status": "error" if result.error is not None else "ok",
            "error": None if result.error is None else str(result.error).splitlines()[0][:500],
        }
        row.update({f"param/{k}": v for k, v in spaces.flatten(config.get(family, {})).items()})
        if history is not None and len(history) and cfg.metric in history:
            history = history.dropna(subset=[cfg.metric])
            best = history.loc[history[cfg.metric].idxmax()]
            epochs = int(history["training_iteration"].max())
            last_flag = history.iloc[-1].get("early_stop")  # the loop's own (patience) early stopping
            patience_stop = isinstance(last_flag, (bool, np.bool_)) and bool(last_flag)
            done = epochs >= cfg.max_epochs or is_classical(family)  # a classical fit is one step
            row.update(
                best_val_ua=float(best.get("val_ua", math.nan)),
                best_val_wa=float(best.get("val_wa", math.nan)),
                best_val_macro_f1=float(best.get("val_macro_f1", math.nan)),
                best_epoch=int(best["training_iteration"]),
                epochs_run=epochs,
                stopped_early=not done and result.error is None,
                stop_reason=("error" if result.error is not None else "completed" if done
                             else "patience" if patience_stop else "asha"),
                time_s=float(history["time_total_s"].max()) if "time_total_s" in history else math.nan,
                started=float(history["timestamp"].min() - history["time_this_iter_s"].iloc[0])
                if "timestamp" in history and "time_this_iter_s" in history else math.nan,
                checkpoint_path=_checkpoint_uri(best.get("checkpoint_path"), cfg),
                history=json.dumps([_clean(r) for r in history[["training_iteration", "timestamp", cfg.metric]]
                                    .to_dict("records")]),
            )
        else:
            row.update(epochs_run=0, stopped_early=False, stop_reason="error" if result.error else "no-results")
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table) and "best_val_ua" in table:
        table = table.sort_values("trial_id").reset_index(drop=True)
    return table


def _clean(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}


def _checkpoint_uri(path: Any, cfg: SearchConfig) -> str | None:
    if not isinstance(path, str) or not path:
        return None
    if storage.is_s3(cfg.storage_path) and not path.startswith("s3://"):
        return "s3://" + path.lstrip("/")
    return path


def best_per_family(table: pd.DataFrame) -> dict[str, pd.Series]:
    """The best trial of each family by best validation UA (ties: higher val macro-F1)."""
    ok = table[(table["status"] == "ok") & table["checkpoint_path"].notna()] if "checkpoint_path" in table else table[:0]
    out = {}
    for family, rows in ok.groupby("family"):
        out[family] = rows.sort_values(["best_val_ua", "best_val_macro_f1"], ascending=False).iloc[0]
    return out


def write_best(table: pd.DataFrame, data: SearchData | None, cfg: SearchConfig) -> dict:
    """``best.json`` + ``best/<family>/model``: the best trial per family, its val and test metrics."""
    from ser_ray.artefacts import Experiment
    from ser_ray.models import load_model, save_model

    experiment = Experiment(cfg.experiment_path)
    best = {}
    split_path = None
    if data is not None and data.split_manifest is not None:
        # the search's own split, so `ser-ray ensemble --from EXPERIMENT` fits on the same validation
        # speakers and tests on the same held-out ones, with no other input
        split_path = experiment.split
        storage.write_parquet(split_path, data.split_manifest)
    for family, row in best_per_family(table).items():
        model_dir = experiment.model_dir(family)
        model, meta = load_model(row["checkpoint_path"])
        save_model(model_dir, model, family=meta.family, hparams=meta.hparams, labels=meta.labels,
                   feature_config=meta.feature_config, extra=meta.extra)
        entry = {
            "trial_id": row["trial_id"],
            "config": json.loads(row["config"]),
            "val": {"ua": row["best_val_ua"], "wa": row["best_val_wa"], "macro_f1": row["best_val_macro_f1"],
                    "epoch": int(row["best_epoch"])},
            "epochs_run": int(row["epochs_run"]),
            "checkpoint_path": model_dir,
            "train_checkpoint": row["checkpoint_path"],
            "labels": meta.labels,
            "feature_config": meta.feature_config.to_dict(),
        }
        if split_path:
            entry["manifest"] = split_path
        if cfg.evaluate_test and data is not None:
            from ser_ray.train.evaluate import predict
            from ser_ray.train.metrics import classification_metrics

            test = data.frames[family].test
            predictions = predict(model_dir, test)
            metrics = classification_metrics(predictions["true"], predictions["pred"], data.labels)
            entry["test"] = {k: metrics[k] for k in ("ua", "wa", "macro_f1") if k in metrics}
            entry["test"]["n"] = int(len(predictions))
        defaults = table[(table["family"] == family) & table["is_default"]]
        if len(defaults):
            default = defaults.sort_values("best_val_ua", ascending=False).iloc[0]
            entry["default"] = {"trial_id": default["trial_id"], "val_ua": default["best_val_ua"],
                                "epochs_run": int(default["epochs_run"]), "stop_reason": default["stop_reason"]}
            entry["gain_over_default_val_ua"] = float(row["best_val_ua"] - default["best_val_ua"])
        best[family] = entry
    summary = {"metric": cfg.metric, "selection": "validation", "families": best,
               "experiment": cfg.experiment_path, "n_trials": int(len(table)), "manifest": split_path,
               "split": {"protocol": cfg.data.protocol, "test_fold": cfg.data.test_fold, "leaky": False}}
    experiment.write_best(best, summary)
    return best


def write_table(table: pd.DataFrame, cfg: SearchConfig) -> None:
    from ser_ray.artefacts import Experiment

    experiment = Experiment(cfg.experiment_path)
    storage.write_parquet(experiment.trials, table)
    storage.write_bytes(experiment.trials_csv, table.to_csv(index=False).encode())


# -- the whole search ------------------------------------------------------------------------------


@dataclasses.dataclass
class SearchResult:
    path: str  # experiment directory
    table: pd.DataFrame
    best: dict
    grid: Any  # ray.tune.ResultGrid
    notes: list[str]


def make_trainable(data: SearchData, cfg: SearchConfig):
    """``tune_trial`` with the data attached; per-family worker resources travel in ``data.resources``."""
    from ray import tune

    trainable = tune.with_parameters(tune_trial, data=data)
    # Only the trial's own process; the TorchTrainer requests its worker's CPU/GPU itself.
    return tune.with_resources(trainable, {"cpu": DRIVER_CPU})


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
