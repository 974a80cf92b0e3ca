"""What every trial of a search trains and validates on: the manifest, its label map, one
speaker-disjoint train/val/test split and the feature caches (the same path as ``ser-ray train``)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pandas as pd

from ser_ray import storage
from ser_ray.tune.config import SearchConfig, storage_root

log = logging.getLogger(__name__)


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

    cache_root = cfg.data.cache_root or storage.join(storage_root(cfg.storage_path), "cache")
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

