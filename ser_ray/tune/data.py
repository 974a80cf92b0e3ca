"""What every trial of a search trains and validates on: the manifest, its label map, one
speaker-disjoint train/val/test split and the feature caches (the same path as ``ser-ray train``)."""

from __future__ import annotations

import dataclasses
import logging

import pandas as pd

from ser_ray import storage
from ser_ray.train.data import Split
from ser_ray.tune.config import SearchConfig, storage_root

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SearchData:
    """What every trial needs besides its sampled config (shipped once via ``tune.with_parameters``)."""

    labels: list[str]
    frames: dict[str, Split]  # family -> rows with features (families with equal features share them)
    base_train: dict  # TrainConfig fields every trial starts from
    max_epochs: int
    resources: dict[str, dict]  # family -> {cpu, gpu}
    use_gpu: bool
    train_storage: str  # where the trials' Train runs go
    # family -> speed-perturbed copies of the training clips (data.speed_perturb; classical families)
    copies: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)
    # the manifest rows (label-mapped) with `split` train/val/test: what `ser-ray ensemble --from`
    # fits and evaluates on, saved as <experiment>/split.parquet
    split_manifest: pd.DataFrame | None = None


def load_search_data(cfg: SearchConfig, *, use_gpu: bool = False) -> SearchData:
    """Manifest, label map, the fixed speaker-disjoint split (``data.test_fold``) and feature caches.

    Selection uses the validation speakers only; test speakers are evaluated once, for the best trial.
    """
    from ser_ray.features.config import FeatureConfig
    from ser_ray.models import family_feature_config
    from ser_ray.models.classical import is_classical
    from ser_ray.train.config import TrainConfig
    from ser_ray.train.data import assign_folds, feature_rows, fold_frames, label_mapped, load_manifest, speed_copies

    base = TrainConfig.from_dict({**cfg.train, "data": dataclasses.asdict(cfg.data)})
    manifest, labels = label_mapped(load_manifest(base), base.label_map)
    if len(labels) < 2:
        raise ValueError(f"only labels {labels} after label map {base.label_map!r}: nothing to classify")
    manifest, n_folds = assign_folds(manifest, cfg.data.protocol, cfg.data.k, base.seed, cfg.data.folds)
    if not 0 <= cfg.data.test_fold < n_folds:
        raise ValueError(f"data.test_fold {cfg.data.test_fold}: protocol {cfg.data.protocol} has folds 0..{n_folds - 1}")
    split = fold_frames(manifest, cfg.data.protocol, cfg.data.test_fold, cfg.data.val_fraction, base.seed)
    split.check_speaker_disjoint()
    log.info("split %s fold %d: train %d clips (%d speakers), val %d (%d), test %d (%d)",
             cfg.data.protocol, cfg.data.test_fold, *[x for p in split for x in (len(p), p["speaker"].nunique())])

    cache_root = cfg.data.cache_root or storage.join(storage_root(cfg.storage_path), "cache")
    frames: dict[str, Split] = {}
    by_key: dict[str, Split] = {}
    copies: dict[str, pd.DataFrame] = {}
    by_copy_key: dict[tuple[str, bool], pd.DataFrame | None] = {}
    for family in cfg.families:
        feature_config = family_feature_config(family, FeatureConfig(**cfg.data.features))
        if feature_config.key() not in by_key:
            rows, _ = feature_rows(manifest, feature_config, cache_root)
            by_key[feature_config.key()] = split.with_features(rows, feature_config)
        frames[family] = by_key[feature_config.key()]
        # families reading the same features share one copy frame (loaded once, shipped once)
        copy_key = (feature_config.key(), is_classical(family))
        if copy_key not in by_copy_key:
            by_copy_key[copy_key] = speed_copies(split.train, feature_config, cache_root, cfg.data.speed_perturb,
                                                 family=family)
        if by_copy_key[copy_key] is not None:
            copies[family] = by_copy_key[copy_key]
    split_manifest = split.manifest()
    return SearchData(
        labels=labels,
        split_manifest=split_manifest,
        frames=frames,
        base_train=dict(cfg.train),
        max_epochs=cfg.max_epochs,
        resources={f: cfg.family_resources(f) for f in cfg.families},
        use_gpu=use_gpu,
        train_storage=storage.join(cfg.experiment_path, "train"),
        copies=copies,
    )

