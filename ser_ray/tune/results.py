"""What a finished search leaves behind: the trials table, the best trial per family (chosen on
validation, tested once) with its model, and ``best.json`` (layout in ``ser_ray.artefacts``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ser_ray import storage
from ser_ray.tune import space as spaces
from ser_ray.train.config import EPOCHS
from ser_ray.tune.config import SearchConfig
from ser_ray.tune.data import SearchData


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
            # a trial started again after a lost node resumes from its checkpoint: keep each epoch once
            history = history.dropna(subset=[cfg.metric]).drop_duplicates(EPOCHS, keep="last")
            # the last of equal best epochs: Train keeps the later of equally scored checkpoints
            # (num_to_keep), so the first may be deleted already
            best = history.loc[history[cfg.metric][::-1].idxmax()]
            epochs = int(history[EPOCHS].max())
            last_flag = history.iloc[-1].get("early_stop")  # the loop's own (patience) early stopping
            patience_stop = isinstance(last_flag, (bool, np.bool_)) and bool(last_flag)
            done = epochs >= cfg.max_epochs or is_classical(family)  # a classical fit is one step
            row.update(
                best_val_ua=float(best.get("val_ua", math.nan)),
                best_val_wa=float(best.get("val_wa", math.nan)),
                best_val_macro_f1=float(best.get("val_macro_f1", math.nan)),
                best_epoch=int(best[EPOCHS]),
                epochs_run=epochs,
                # times its training resumed from a checkpoint (a lost worker or node)
                restarts=int(history["restarts"].max()) if "restarts" in history else 0,
                stopped_early=not done and result.error is None,
                stop_reason=("error" if result.error is not None else "completed" if done
                             else "patience" if patience_stop else "asha"),
                time_s=float(history["time_total_s"].max()) if "time_total_s" in history else math.nan,
                started=float(history["timestamp"].min() - history["time_this_iter_s"].iloc[0])
                if "timestamp" in history and "time_this_iter_s" in history else math.nan,
                checkpoint_path=_checkpoint_uri(best.get("checkpoint_path"), cfg),
                history=json.dumps([_clean(r) for r in history[[EPOCHS, "timestamp", cfg.metric]]
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
               "split": {"protocol": cfg.data.protocol, "test_fold": cfg.data.test_fold, "leaky": False},
               "config": cfg.to_dict()}  # what `ser-ray run` compares before it skips a finished search
    experiment.write_best(best, summary)
    return best


def write_table(table: pd.DataFrame, cfg: SearchConfig) -> None:
    from ser_ray.artefacts import Experiment

    experiment = Experiment(cfg.experiment_path)
    storage.write_parquet(experiment.trials, table)
    storage.write_bytes(experiment.trials_csv, table.to_csv(index=False).encode())

