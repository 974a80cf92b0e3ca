"""Several model families cross-validated the same way, side by side in one table and one chart.

``run_compare(config, families, out)`` runs :func:`ser_ray.train.cv.run_cv` once per family (same
data, protocol, folds, seed, epochs) into ``out/<family>/`` and writes::

    comparison.csv   family, UA/WA/macro-F1 mean and std over folds, parameters, training seconds per
                     epoch, inference ms per clip (CPU), folds, result directory
    comparison.md    the same table, metrics as ``mean ± std``
    comparison.png   UA / WA / macro-F1 per family with the std over folds as error bars
    cache/           the feature caches, shared by families with the same feature config

Inference time is measured here, on CPU, by re-running each fold's saved model over that fold's test
clips (one warm-up batch first), so it does not depend on where training ran.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ser_ray.train.config import TrainConfig

log = logging.getLogger(__name__)

METRICS = ("ua", "wa", "macro_f1")
METRIC_NAMES = {"ua": "UA", "wa": "WA", "macro_f1": "macro-F1"}
INFER_BATCH = 64


def family_config(config: TrainConfig, family: str, hparams: dict | None = None) -> TrainConfig:
    """``config`` for ``family``: ``hparams`` (default: ``config.hparams`` for ``config.family``, the
    family's defaults for any other) and, when ``config.scheduler`` is the automatic choice for
    ``config.family``, the family's automatic one."""
    if hparams is None:
        hparams = config.hparams if family == config.family else {}
    auto = TrainConfig(family=config.family).scheduler
    plain = {**config.to_dict(), "family": family, "hparams": dict(hparams),
             "scheduler": None if config.scheduler == auto else config.scheduler}
    return TrainConfig.from_dict(plain)


def model_costs(result_dir: str | Path, summary: dict) -> dict:
    """Parameters, mean training seconds per epoch and CPU inference ms per clip of a cv result."""
    import torch

    from ser_ray.features.pipeline import features_array, load_cache_pandas
    from ser_ray.models import load_model
    from ser_ray.train.evaluate import predict_proba

    result_dir = Path(result_dir)
    cache = load_cache_pandas(summary["feature_cache"], columns=["path", "features", "error"])
    params, epoch_s, infer_s, clips = None, [], 0.0, 0
    for fold in summary["folds_run"]:
        fold_dir = result_dir / f"fold_{fold}"
        model, _ = load_model(str(fold_dir / "model"), map_location="cpu")
        params = int(sum(p.numel() for p in model.parameters()))
        history = json.loads((fold_dir / "history.json").read_text())
        epoch_s += [h["epoch_s"] for h in history if "epoch_s" in h]
        paths = pd.read_parquet(fold_dir / "predictions.parquet", columns=["path"])["path"]
        features = features_array(cache[cache["path"].isin(paths) & cache["error"].isna()])
        predict_proba(model, features[:INFER_BATCH], INFER_BATCH, "cpu")  # warm-up (allocations, kernels)
        start = time.perf_counter()
        predict_proba(model, features, INFER_BATCH, "cpu")
        infer_s += time.perf_counter() - start
        clips += len(features)
    return {
        "params": params,
        "train_s_per_epoch": float(np.mean(epoch_s)) if epoch_s else float("nan"),
        "infer_ms_per_clip": 1000.0 * infer_s / max(clips, 1),
        "infer_clips": clips,
        "infer_threads": torch.get_num_threads(),
    }


def run_compare(config: TrainConfig, families: list[str], out: str | Path, *, max_folds: int | None = None,
                hparams: dict[str, dict] | None = None) -> pd.DataFrame:
    """Cross-validate each of ``families`` like ``config`` into ``out/<family>``; write and return the table.

    ``hparams`` maps a family to its hyperparameters (default: the family's defaults). A rerun
    reuses finished folds (see ``run_cv``).
    """
    from ser_ray.models import MODELS
    from ser_ray.train.cv import run_cv

    unknown = [f for f in families if f not in MODELS]
    if unknown or not families:
        raise ValueError(f"families {unknown or families}: choose one or more of {sorted(MODELS)}")
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    # one cache root: families that read the same features share one cache
    data = dataclasses.replace(config.data, cache_root=config.data.cache_root or str(out / "cache"))
    rows = []
    for i, family in enumerate(families):
        log.info("compare: family %d/%d %s", i + 1, len(families), family)
        cfg = dataclasses.replace(family_config(config, family, (hparams or {}).get(family)), data=data)
        summary = run_cv(cfg, out / family, max_folds=max_folds)
        row = {"family": family}
        for key in METRICS:
            row[f"{key}_mean"], row[f"{key}_std"] = summary[key]["mean"], summary[key]["std"]
        row.update(model_costs(out / family, summary), folds=len(summary["folds_run"]), result_dir=str(out / family))
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(comparison_markdown(table, config))
    plot_comparison(table, out / "comparison.png",
                    title=f"{config.data.corpus_name} {config.data.protocol}"
                    + (" + speaker norm" if config.data.speaker_norm else "")
                    + f", {int(table['folds'].max())} fold(s)")
    log.info("compare: %d families -> %s", len(table), out / "comparison.csv")
    return table


def comparison_markdown(table: pd.DataFrame, config: TrainConfig) -> str:
    """The comparison table as Markdown, metrics as ``mean ± std`` over folds."""
    head = ["family", *(METRIC_NAMES[k] for k in METRICS), "parameters", "train s/epoch", "inference ms/clip", "folds"]
    lines = [
        (f"# Model comparison: {config.data.corpus_name}, protocol {config.data.protocol}, "
         f"label map {config.label_map}, up to {config.epochs} epochs"
         + (", speaker-normalised features (test speakers' unlabelled clips included)"
            if config.data.speaker_norm else "")),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for row in table.to_dict("records"):
        cells = [row["family"], *(f"{row[f'{k}_mean']:.3f} ± {row[f'{k}_std']:.3f}" for k in METRICS),
                 f"{row['params']:,}", f"{row['train_s_per_epoch']:.2f}", f"{row['infer_ms_per_clip']:.3f}",
                 str(row["folds"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± population std over folds; inference timed on CPU over each fold's test clips.", ""]
    return "\n".join(lines)


def plot_comparison(table: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """Grouped bars: UA, WA and macro-F1 per family, std over folds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ser_ray.report.plots import save_figure

    x = np.arange(len(table))
    width = 0.8 / len(METRICS)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(table) + 2), 3.8))
    for j, key in enumerate(METRICS):
        ax.bar(x + (j - (len(METRICS) - 1) / 2) * width, table[f"{key}_mean"], width, yerr=table[f"{key}_std"],
               capsize=3, label=METRIC_NAMES[key])
    ax.set_xticks(x, table["family"], rotation=30 if len(table) > 4 else 0, ha="right" if len(table) > 4 else "center")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.legend(ncol=len(METRICS), fontsize=8)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
