"""Training of the classical families (``logreg``, ``svm``): scikit-learn in the calling process.

A classical model fits in seconds, so it skips Ray Train's worker group (~20–35 s to start per run):
``ser-ray cv`` and ``compare`` fit it in the driver, a Tune trial fits it inside the trial's own
process. The open hyperparameters are chosen by speaker-grouped cross-validation inside the
training speakers (``fit_arrays``); in cv the validation speakers are pooled with them (one
validation speaker is a noisy judge), in Tune they stay held out (they choose the best trial and
fit the ensemble weights). The test speakers are never involved either way.

The result has the shape of a Ray Train run's (:class:`~ser_ray.train.loop.TrainResult`): the model
directory in ``save_model`` layout, ``val_ua`` / ``val_loss`` out of fold, and ``oof.parquet`` with
the out-of-fold probabilities of every training clip (per-fold ensembles fit their weights on it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import numpy as np
import pandas as pd

from ser_ray import storage
from ser_ray.features.config import FeatureConfig
from ser_ray.train.config import EPOCHS, TrainConfig, config_to_plain

log = logging.getLogger(__name__)

OOF_PREDICTIONS = "oof.parquet"


def fit_classical(
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    labels: list[str],
    feature_config: FeatureConfig,
    config: TrainConfig,
    *,
    run_dir: str,
    pool_validation: bool = True,
    copies: pd.DataFrame | None = None,
):
    """Fit ``config.family``; write ``run_dir/model``, ``run_dir/oof.parquet`` and ``run_dir/fit.json``.

    ``copies``: speed-perturbed feature rows (:func:`ser_ray.train.data.speed_copies`); those of the
    clips this fit trains on join its training rows, the rest are never read.

    ``pool_validation`` (cv, compare): fit on training and validation speakers together; ``val_*``
    metrics are out of fold over all of them. Otherwise (Tune trials, whose validation speakers also
    choose trials and fit ensemble weights): fit on the training speakers only and score ``val_*`` on
    the validation speakers, like a deep family.
    """
    from ser_ray.calibration import nll
    from ser_ray.features.pipeline import features_array
    from ser_ray.models import build_model, save_model
    from ser_ray.train.loop import TrainResult, usable_rows
    from ser_ray.train.metrics import classification_metrics

    train_df = usable_rows(train_df, "training set")
    val_df = usable_rows(val_df, "validation set")
    rows = pd.concat([train_df, val_df], ignore_index=True) if pool_validation else train_df.reset_index(drop=True)
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted((set(rows["emotion"]) | set(val_df["emotion"])) - set(index))
    if unknown:
        raise ValueError(f"rows with labels {unknown} are not in the label list {labels}; apply the label map first")
    start = time.perf_counter()
    model = build_model(config.family, len(labels), feature_config, **config.hparams)
    extra = None
    if copies is not None:
        copies = copies[copies["path"].isin(rows["path"]) & copies["error"].isna()]
        extra = (features_array(copies), copies["emotion"].map(index).to_numpy(), copies["speaker"].astype(str).to_numpy())
    info = model.fit_arrays(features_array(rows), rows["emotion"].map(index).to_numpy(),
                            rows["speaker"].astype(str).to_numpy(), copies=extra)
    seconds = time.perf_counter() - start
    oof = info.pop("oof_probs", None)
    metrics = {"epoch": 1, EPOCHS: 1, "epoch_s": round(seconds, 3), "inner_folds": info["inner_folds"], **info["chosen"],
               "inner_ua": info.get("inner_ua", float("nan"))}
    if pool_validation:  # out-of-fold scores over every training speaker: the "validation" of this fit
        metrics.update(val_ua=info.get("inner_ua", float("nan")), val_loss=info.get("inner_nll", float("nan")))
        if oof is not None:
            scores = classification_metrics(rows["emotion"], np.asarray(labels)[oof.argmax(1)], labels)
            metrics.update(val_wa=scores["wa"], val_macro_f1=scores["macro_f1"])
    else:
        import torch

        with torch.no_grad():
            probs = torch.softmax(model(torch.as_tensor(features_array(val_df))), dim=-1).numpy()
        y_val = val_df["emotion"].map(index).to_numpy()
        scores = classification_metrics(y_val, probs.argmax(1), labels)
        metrics.update(val_ua=scores["ua"], val_wa=scores["wa"], val_macro_f1=scores["macro_f1"],
                       val_loss=nll(probs, y_val))
    model_dir = storage.join(run_dir, "model")
    save_model(model_dir, model, family=config.family, hparams=dataclasses.asdict(model.hparams), labels=labels,
               feature_config=feature_config, extra={"fit": _plain(info)})
    if oof is not None:
        frame = rows[["path", "speaker", "emotion"]].rename(columns={"emotion": "true"}).reset_index(drop=True)
        for i, label in enumerate(labels):
            frame[f"prob_{label}"] = oof[:, i].astype(np.float32)
        storage.write_parquet(storage.join(run_dir, OOF_PREDICTIONS), frame)
    storage.write_bytes(storage.join(run_dir, "fit.json"), json.dumps(_plain({**info, **metrics}), indent=1).encode())
    log.info("%s: chose %s by %d-fold speaker-grouped CV on %d clips (%d speakers, %d speed copies): inner UA %.3f, "
             "val UA %.3f, %.1f s", config.family, info["chosen"], info["inner_folds"], len(rows),
             rows["speaker"].nunique(), info["n_copies"], metrics["inner_ua"], metrics["val_ua"], seconds)
    return TrainResult(best_checkpoint=model_dir, best_metrics=metrics, history=[metrics], path=run_dir,
                       labels=list(labels), config=config_to_plain(config))


def _plain(value):
    """JSON-safe copy (numpy scalars to Python numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
