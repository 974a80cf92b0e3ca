"""Cross-corpus evaluation: train on every speaker of corpus A, test on every speaker of corpus B.

Both corpora go through the run's label map; only the labels both have (the shared labels) are
trained and scored, and the labels left out on either side are stated in ``summary.json``. Model
selection (best epoch, early stopping) uses a speaker-disjoint validation split of A's speakers, never
B. The result directory has cv's layout with one fold, the whole of B::

    folds.json                 train / val speakers (A) and test speakers (B)
    fold_0/metrics.json        UA, WA, macro-F1 on B over the shared labels, ...
    fold_0/predictions.parquet
    fold_0/model/              the model selected on A's validation speakers
    fold_0/learning_curves.png
    confusion.png
    summary.json               train_corpus, test_corpus, shared_labels, dropped_labels, metrics

The same training and scoring code as ``ser-ray cv`` (:func:`ser_ray.train.cv.run_fold`) runs here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from ser_ray.features.config import FeatureConfig
from ser_ray.train.config import DataSpec, TrainConfig
from ser_ray.train.cv import run_fold
from ser_ray.train.data import feature_rows, label_mapped, load_manifest, speaker_list, speed_copies
from ser_ray.train.metrics import summarize_folds

log = logging.getLogger(__name__)

PROTOCOL = "cross-corpus"


def shared_labels(train_labels: list[str], test_labels: list[str]) -> tuple[list[str], dict]:
    """Labels in both lists (in ``train_labels`` order) and the ones dropped from each side."""
    shared = [label for label in train_labels if label in set(test_labels)]
    dropped = {
        "train_only": [label for label in train_labels if label not in shared],
        "test_only": [label for label in test_labels if label not in shared],
    }
    return shared, dropped


def run_cross_corpus(config: TrainConfig, train_spec: DataSpec, test_spec: DataSpec, out: str | Path) -> dict:
    """Train ``config.family`` on all of ``train_spec``, test on all of ``test_spec``; write ``out``; return the summary.

    ``config`` gives the model, training settings, label map and seed; feature settings
    (``features``), ``val_fraction`` and ``cache_root`` come from ``train_spec`` (the test clips are
    featurised the same way). A rerun into the same directory reuses a finished ``fold_0``.
    """
    from ser_ray import splits
    from ser_ray.models import family_feature_config
    from ser_ray.report.plots import plot_confusion

    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_name, test_name = train_spec.corpus_name, test_spec.corpus_name
    train_all, train_labels = label_mapped(load_manifest(train_spec), config.label_map)
    test_all, test_labels = label_mapped(load_manifest(test_spec), config.label_map)
    shared, dropped = shared_labels(train_labels, test_labels)
    if len(shared) < 2:
        raise ValueError(
            f"{train_name} has labels {train_labels} and {test_name} has {test_labels} under label map "
            f"{config.label_map!r}: fewer than two shared labels, nothing to classify; try another --set label_map=..."
        )
    if dropped["train_only"] or dropped["test_only"]:
        log.info("shared labels %s; dropped %s (only in %s) and %s (only in %s)", shared, dropped["train_only"],
                 train_name, dropped["test_only"], test_name)
    both = sorted(set(speaker_list(train_all)) & set(speaker_list(test_all)))
    if both:
        raise ValueError(
            f"speakers {both[:5]} are in both {train_name} and {test_name}: a cross-corpus test needs "
            "different speakers (speaker ids are namespaced by corpus name; name the test corpus differently "
            "if it really holds other people)"
        )

    # Model selection on a speaker-disjoint share of A's speakers; B is only ever predicted.
    train_df, val_df = splits.train_val_split(train_all[train_all["emotion"].isin(shared)],
                                              val_frac=train_spec.val_fraction, seed=config.seed)
    test_df = test_all[test_all["emotion"].isin(shared)].reset_index(drop=True)
    (out / "folds.json").write_text(json.dumps({
        "protocol": PROTOCOL, "seed": config.seed, "train_corpus": train_name, "test_corpus": test_name,
        "folds": [{"fold": 0, "test_speakers": speaker_list(test_df), "val_speakers": speaker_list(val_df),
                   "train_speakers": speaker_list(train_df), "n_train": len(train_df), "n_val": len(val_df),
                   "n_test": len(test_df), "overlap": []}],
    }, indent=1))

    feature_config = family_feature_config(config.family, FeatureConfig(**train_spec.features))
    cache_root = train_spec.cache_root or str(out / "cache")
    # One cache per corpus (all its label-mapped clips), so cv runs on the same corpus can share it.
    norm = train_spec.speaker_norm or test_spec.speaker_norm
    train_rows, train_cache = feature_rows(train_all, feature_config, cache_root, speaker_norm=norm)
    test_rows, test_cache = feature_rows(test_all, feature_config, cache_root, speaker_norm=norm)
    tr, va = (train_rows[train_rows["path"].isin(part["path"])] for part in (train_df, val_df))
    te = test_rows[test_rows["path"].isin(test_df["path"])]

    fold_dir = out / "fold_0"
    if (fold_dir / "metrics.json").exists():
        log.info("%s: already done, reusing it", fold_dir / "metrics.json")
        metrics = json.loads((fold_dir / "metrics.json").read_text())
    else:
        log.info("cross-corpus: train %s (%d clips, %d speakers; val %d clips, %d speakers) -> test %s (%d clips, %d speakers)",
                 train_name, len(tr), tr["speaker"].nunique(), len(va), va["speaker"].nunique(), test_name, len(te),
                 te["speaker"].nunique())
        run_id = config.name or f"{config.family}-cross"
        copies = speed_copies(train_all, feature_config, cache_root, train_spec.speed_perturb, family=config.family,
                              speaker_norm=norm)
        metrics = run_fold(0, tr, va, te, shared, feature_config, config, fold_dir, run_name=f"{run_id}-fold0",
                           storage_path=config.storage_path or str(out / "ray"), copies=copies)

    confusion = np.asarray(metrics["confusion"])
    plot_confusion(confusion, shared, out / "confusion.png",
                   title=f"{config.family}: {train_name} -> {test_name}, row-normalised")
    summary = {
        **summarize_folds([metrics]),
        "family": config.family,
        "corpus": train_name,
        "train_corpus": train_name,
        "test_corpus": test_name,
        "protocol": PROTOCOL,
        "n_folds": 1,
        "folds_run": [0],
        "labels": shared,
        "shared_labels": shared,
        "dropped_labels": dropped,
        "train_labels": train_labels,
        "test_labels": test_labels,
        "label_map": config.label_map,
        "leaky": False,
        "speaker_norm": norm,
        "normalise_by": "speaker" if norm else "none",
        "n_train_clips": len(tr),
        "n_val_clips": len(va),
        "n_test_clips": len(te),
        "n_clips": len(tr) + len(va) + len(te),
        "n_speakers": int(tr["speaker"].nunique() + va["speaker"].nunique() + te["speaker"].nunique()),
        "confusion": confusion.tolist(),
        "feature_config": feature_config.to_dict(),
        "feature_cache": test_cache.path,  # where the test clips' features are (as in cv)
        "train_feature_cache": train_cache.path,
        "config": config.to_dict(),
        "train_spec": dataclasses.asdict(train_spec),
        "test_spec": dataclasses.asdict(test_spec),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("%s %s -> %s over %s: UA %.3f, WA %.3f, macro-F1 %.3f -> %s", config.family, train_name, test_name,
             shared, metrics["ua"], metrics["wa"], metrics["macro_f1"], out)
    return summary
