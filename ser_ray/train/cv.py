"""Speaker-independent cross-validation of one model family, written to a result directory.

manifest -> label map -> speaker-disjoint folds -> feature cache -> per fold: speaker-disjoint
validation split of the training speakers, ``fit`` (best epoch chosen on validation, never on test),
predictions for the held-out speakers. The result directory::

    folds.json                 speakers of every fold (test / train / val)
    fold_<i>/metrics.json      UA, WA, macro-F1, per class, confusion, by intensity, ECE, best epoch
    fold_<i>/predictions.parquet
    fold_<i>/model/            the selected model (save_model layout)
    fold_<i>/learning_curves.png
    confusion.png              confusion matrix summed over folds (row-normalised)
    summary.json               mean ± std over folds, labels, label map, protocol, leak check
    ray/                       Ray Train runs (checkpoints), unless storage_path says otherwise

A rerun into the same directory skips folds that already have ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ser_ray.artefacts import CvResult
from ser_ray.features.config import FeatureConfig
from ser_ray.train.config import TrainConfig
from ser_ray.train.data import (assign_folds, feature_rows, fold_frames, label_mapped, load_manifest, speaker_list,
                                speed_copies)
from ser_ray.train.metrics import (
    classification_metrics,
    expected_calibration_error,
    metrics_by_group,
    summarize_folds,
)

log = logging.getLogger(__name__)


# -- one fold --------------------------------------------------------------------------------------


def run_fold(
    fold: int,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    test_df: pd.DataFrame,
    labels: list[str],
    feature_config: FeatureConfig,
    config: TrainConfig,
    fold_dir: Path,
    *,
    run_name: str,
    storage_path: str,
    extra_loop_config: dict | None = None,
    copies: pd.DataFrame | None = None,
) -> dict:
    """Train on ``train_df`` (with the speed-perturbed ``copies`` of its clips, classical families),
    select on ``val_df``, evaluate on ``test_df``; write ``fold_dir``; return metrics."""
    from ser_ray.train.loop import fit

    start = time.perf_counter()
    result = fit(train_df, val_df, labels, feature_config, config, name=run_name,
                 storage_path=storage_path, extra_loop_config=extra_loop_config, copies=copies)
    return finish_fold(fold, result, train_df, val_df, test_df, labels, config, fold_dir,
                       train_s=time.perf_counter() - start)


def finish_fold(fold: int, result, train_df: pd.DataFrame, val_df: pd.DataFrame, test_df: pd.DataFrame,
                labels: list[str], config: TrainConfig, fold_dir: Path, *, train_s: float) -> dict:
    """A trained fold (``result``: its best model, trained in ``train_s`` seconds) scored on ``test_df``
    and written to ``fold_dir``; ``seconds`` in its metrics is training plus this."""
    start = time.perf_counter()
    from ser_ray.models import load_model, save_model
    from ser_ray.report.plots import plot_learning_curves
    from ser_ray.train.evaluate import predict

    predictions = predict(result.best_checkpoint, test_df, batch_size=max(64, config.batch_size))
    metrics = classification_metrics(predictions["true"], predictions["pred"], labels)
    probs = predictions[[f"prob_{label}" for label in labels]].to_numpy()
    y = predictions["true"].map({label: i for i, label in enumerate(labels)}).to_numpy()
    metrics.update(
        fold=fold,
        ece=expected_calibration_error(probs, y),
        by_intensity=metrics_by_group(predictions, "intensity") if "intensity" in predictions else {},
        test_speakers=speaker_list(test_df),
        val_speakers=speaker_list(val_df),
        n_train=len(train_df),
        n_val=len(val_df),
        best_epoch=int(result.best_metrics["epoch"]),
        epochs_run=len(result.history),
        best_val=dict(result.best_metrics),
        checkpoint=result.best_checkpoint,
        seconds=round(train_s + time.perf_counter() - start, 1),
    )
    fold_dir.mkdir(parents=True, exist_ok=True)
    model, meta = load_model(result.best_checkpoint)
    # the model records how its inputs were normalised, so a bundle of it annotates the same way
    save_model(str(fold_dir / "model"), model, family=meta.family, hparams=meta.hparams, labels=meta.labels,
               feature_config=meta.feature_config, extra={**meta.extra, "normalise_by": config.data.normalise_by})
    predictions.to_parquet(fold_dir / "predictions.parquet", index=False)
    oof = out_of_fold_predictions(result)
    validation_predictions(result, val_df, oof).to_parquet(fold_dir / "val_predictions.parquet", index=False)
    if oof is not None:  # a classical fit: held-out predictions of every training speaker
        oof.to_parquet(fold_dir / "oof_predictions.parquet", index=False)
    (fold_dir / "history.json").write_text(json.dumps(result.history, indent=1))
    plot_learning_curves(result.history, fold_dir / "learning_curves.png", title=f"fold {fold}")
    # metrics.json last: its presence marks the fold as done
    (fold_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log.info("fold %d: test UA %.3f WA %.3f macro-F1 %.3f (best epoch %d of %d, %.0f s)", fold,
             metrics["ua"], metrics["wa"], metrics["macro_f1"], metrics["best_epoch"], metrics["epochs_run"],
             metrics["seconds"])
    return metrics


def validation_predictions(result, val_df: pd.DataFrame, oof: pd.DataFrame | None) -> pd.DataFrame:
    """Predictions for the validation speakers from models that never trained on them (what per-fold
    ensembles fit their weights on): the selected model for a deep family (validation chose its epoch,
    nothing more), the out-of-fold predictions ``oof`` of the inner cross-validation for a classical one
    (its final model trained on those speakers too)."""
    from ser_ray.train.evaluate import predict

    if oof is not None:
        return oof[oof["path"].isin(val_df["path"])].reset_index(drop=True)
    return predict(result.best_checkpoint, val_df)


def out_of_fold_predictions(result) -> pd.DataFrame | None:
    """A classical fit's out-of-fold predictions of all its training clips (None for a deep family)."""
    from ser_ray import storage
    from ser_ray.train.classical import OOF_PREDICTIONS

    uri = storage.join(result.path, OOF_PREDICTIONS)
    return storage.read_parquet(uri) if storage.exists(uri) else None


# -- the whole cross-validation --------------------------------------------------------------------


def fold_concurrency(config: TrainConfig, n_folds: int) -> int:
    """Folds to train at once: ``config.concurrent_folds``, or (0) as many as the cluster's CPUs (and
    GPUs, when training uses them) hold, one Ray Train run each; classical fits (seconds, in this
    process) one after another."""
    from ser_ray.models.classical import is_classical

    if n_folds <= 1 or is_classical(config.family):
        return 1
    if config.concurrent_folds > 0:
        return min(config.concurrent_folds, n_folds)
    import ray

    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 1) // max(config.num_workers * config.cpus_per_worker, 1e-9))
    gpus = resources.get("GPU", 0)
    if (config.use_gpu or (config.use_gpu is None and gpus >= 1)) and config.gpus_per_worker > 0:
        fits = min(fits, int(gpus // (config.num_workers * config.gpus_per_worker)))
    return max(1, min(fits, n_folds))



def run_cv(config: TrainConfig, out: str | Path, *, max_folds: int | None = None,
           folds: list[int] | None = None) -> dict:
    """Cross-validate ``config.family`` on ``config.data``; write the result directory ``out``; return the summary.

    ``folds`` picks test folds to run (``ser-ray train`` runs one); ``max_folds`` the first N.
    """
    from ser_ray.models import family_feature_config
    from ser_ray.report.plots import plot_confusion

    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = config.data
    manifest, labels = label_mapped(load_manifest(config), config.label_map)
    if len(labels) < 2:
        raise ValueError(f"only labels {labels} after label map {config.label_map!r}: nothing to classify")
    manifest, n_folds = assign_folds(manifest, data.protocol, data.k, config.seed, data.folds)
    chosen = list(range(n_folds)) if folds is None else list(folds)
    if max_folds is not None:
        chosen = chosen[:max_folds]
    bad = [f for f in chosen if not 0 <= f < n_folds]
    if bad:
        raise ValueError(f"fold(s) {bad} do not exist: protocol {data.protocol} has folds 0..{n_folds - 1}")

    # Speaker lists of every fold, written before any training so a reader can check the split.
    splits = {f: fold_frames(manifest, data.protocol, f, data.val_fraction, config.seed) for f in range(n_folds)}
    fold_lists = [{"fold": f, **split.speakers()} for f, split in splits.items()]
    leaky = any(entry["overlap"] for entry in fold_lists)
    result = CvResult(out)
    result.folds_json.write_text(json.dumps({"protocol": data.protocol, "k": data.k, "seed": config.seed,
                                             "folds_file": data.folds, "folds": fold_lists}, indent=1))
    if leaky:
        raise RuntimeError(f"{result.folds_json}: speakers shared between train/val/test; the split is not speaker-independent")

    feature_config = family_feature_config(config.family, FeatureConfig(**data.features))
    if data.speaker_norm:
        log.info("speaker normalisation on: each speaker's features standardised with its own clips' "
                 "statistics (test speakers included, labels unused)")
    rows, cache = feature_rows(manifest, feature_config, data.cache_root or str(out / "cache"),
                               speaker_norm=data.speaker_norm)

    storage_path = config.storage_path or str(out / "ray")
    run_id = config.name or f"{config.family}-{data.protocol}"
    done = {}
    for f in chosen:
        if result.fold_done(f):
            log.info("fold %d: already done (%s), skipping", f, result.fold_file(f, "metrics.json"))
            done[f] = json.loads(result.fold_file(f, "metrics.json").read_text())
    todo = [f for f in chosen if f not in done]

    copies = speed_copies(manifest, feature_config, data.cache_root or str(out / "cache"), data.speed_perturb,
                          family=config.family, speaker_norm=data.speaker_norm) if todo else None

    def frames(f: int):
        tr, va, te = splits[f].with_features(rows, keep_failed=True)
        log.info("fold %d/%d: train %d clips (%d speakers), val %d (%d), test %d (%s)", f + 1, n_folds,
                 len(tr), tr["speaker"].nunique(), len(va), va["speaker"].nunique(), len(te),
                 ", ".join(speaker_list(te)[:4]) + ("..." if te["speaker"].nunique() > 4 else ""))
        return tr, va, te

    def one_fold(f: int) -> dict:  # a classical fit: seconds in this process
        return run_fold(f, *frames(f), labels, feature_config, config, result.fold_dir(f),
                        run_name=f"{run_id}-fold{f}", storage_path=storage_path, copies=copies)

    def fold_group(group: list[int]) -> list[dict]:
        """A deep family's folds, one after another in one Ray Train run (its start-up paid once)."""
        from ser_ray.train.loop import fit_folds

        parts = {f: frames(f) for f in group}
        trained = fit_folds({f: (tr, va) for f, (tr, va, _) in parts.items()}, labels, feature_config, config,
                            name=f"{run_id}-folds-" + "-".join(map(str, group)), storage_path=storage_path)
        # a fold's training time is its own epochs' (the group's start-up is shared by its folds)
        return [finish_fold(f, trained[f], *parts[f], labels, config, result.fold_dir(f),
                            train_s=sum(h["epoch_s"] for h in trained[f].history)) for f in group]

    from ser_ray.models.classical import is_classical

    if is_classical(config.family):
        done.update((f, one_fold(f)) for f in todo)
    elif todo:
        # Folds run in groups, each group one Ray Train run that trains its folds one after another:
        # the worker group's start-up is paid once per group, and groups run at once as the cluster
        # holds them. Each fold's result is the same as when it runs alone (same seed, data, threads).
        at_once = fold_concurrency(config, len(todo))
        groups = [todo[i::at_once] for i in range(at_once)]
        log.info("%d folds to train in %d Ray Train run(s) at once: %s", len(todo), at_once, groups)
        with ThreadPoolExecutor(at_once, thread_name_prefix="folds") as pool:
            for group, metrics in zip(groups, pool.map(fold_group, groups)):
                done.update(zip(group, metrics))
    all_metrics = [done[f] for f in chosen]

    confusion = np.sum([np.asarray(m["confusion"]) for m in all_metrics], axis=0)
    plot_confusion(confusion, labels, result.confusion_png,
                   title=f"{config.family} {data.protocol}: {len(all_metrics)} fold(s), row-normalised")
    summary = {
        **summarize_folds(all_metrics),
        "family": config.family,
        "corpus": data.corpus_name,
        "protocol": data.protocol,
        "folds_file": data.folds,
        "n_folds": n_folds,
        "folds_run": chosen,
        "labels": labels,
        "label_map": config.label_map,
        "leaky": leaky,
        "speaker_norm": data.speaker_norm,
        "normalise_by": data.normalise_by,
        "n_clips": int(len(manifest)),
        "n_speakers": int(manifest["speaker"].nunique()),
        "confusion": confusion.tolist(),
        "feature_config": feature_config.to_dict(),
        "feature_cache": cache.path,
        "config": config.to_dict(),
    }
    result.write_summary(summary)
    log.info("%s %s over %d fold(s): UA %.3f ± %.3f, WA %.3f ± %.3f, macro-F1 %.3f ± %.3f -> %s",
             config.family, data.protocol, len(all_metrics), summary["ua"]["mean"], summary["ua"]["std"],
             summary["wa"]["mean"], summary["wa"]["std"], summary["macro_f1"]["mean"],
             summary["macro_f1"]["std"], out)
    return summary
