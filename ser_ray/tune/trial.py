"""One trial of a search: its ``TrainConfig`` from the sampled point, then one ``TorchTrainer`` run of
the train stage's loop (a classical family: a scikit-learn fit in the trial's own process)."""

from __future__ import annotations

import dataclasses

from ser_ray import storage
from ser_ray.tune import space as spaces
from ser_ray.tune.config import DRIVER_CPU, SearchConfig
from ser_ray.tune.data import SearchData


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
                               pool_validation=False, copies=data.copies.get(train_cfg.family))
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


def make_trainable(data: SearchData, cfg: SearchConfig):
    """``tune_trial`` with the data attached; per-family worker resources travel in ``data.resources``."""
    from ray import tune

    trainable = tune.with_parameters(tune_trial, data=data)
    # Only the trial's own process; the TorchTrainer requests its worker's CPU/GPU itself.
    return tune.with_resources(trainable, {"cpu": DRIVER_CPU})

