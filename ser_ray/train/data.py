"""The dataset layer: a run's manifest under its label map, speaker-disjoint folds, one fold's
train/val/test :class:`Split`, and feature rows from the cache joined onto it once.

Used by cross-validation (``cv``, ``compare``), cross-corpus runs, the search and the demo, so every
stage assembles its data the same way.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator

import pandas as pd

from ser_ray.features.config import FeatureConfig
from ser_ray.train.config import DataSpec, TrainConfig

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclasses.dataclass
class Split:
    """One speaker-disjoint split: train, validation and test rows (manifest columns, plus ``features``
    and ``error`` once joined with :meth:`with_features`). Unpacks as ``train, val, test``."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    feature_config: FeatureConfig | None = None

    @classmethod
    def from_manifest(cls, manifest: pd.DataFrame) -> "Split":
        """The parts of a manifest with a ``split`` column (``split.parquet``, ``ser-ray splits``)."""
        if "split" not in manifest:
            raise ValueError("the manifest has no `split` column; run `ser-ray splits` first")
        return cls(*(manifest[manifest["split"] == name] for name in SPLIT_NAMES))

    def __iter__(self) -> Iterator[pd.DataFrame]:
        return iter((self.train, self.val, self.test))

    def speakers(self) -> dict:
        """Speakers and sizes of each part, and any speaker found in two parts (``overlap``)."""
        s_tr, s_va, s_te = (set(speaker_list(part)) for part in self)
        return {"test_speakers": sorted(s_te), "val_speakers": sorted(s_va), "train_speakers": sorted(s_tr),
                "n_train": len(self.train), "n_val": len(self.val), "n_test": len(self.test),
                "overlap": sorted((s_tr & s_va) | (s_tr & s_te) | (s_va & s_te))}

    def check_speaker_disjoint(self) -> None:
        overlap = self.speakers()["overlap"]
        if overlap:
            raise RuntimeError(f"train/val/test share speakers {overlap[:5]}: the split is not speaker-independent")

    def manifest(self) -> pd.DataFrame:
        """The manifest rows of all three parts with a ``split`` column (``split.parquet``)."""
        from ser_ray.corpora.manifest import MANIFEST_COLUMNS

        return pd.concat([part[list(MANIFEST_COLUMNS)].assign(split=name) for name, part in zip(SPLIT_NAMES, self)],
                         ignore_index=True)

    def with_features(self, rows: pd.DataFrame, feature_config: FeatureConfig | None = None, *,
                      keep_failed: bool = False) -> "Split":
        """Each part's rows taken from ``rows`` (``feature_rows`` output, one row per path); clips whose
        extraction failed are dropped unless ``keep_failed`` (then their ``error`` says why)."""
        if not keep_failed and "error" in rows:
            rows = rows[rows["error"].isna()]
        parts = [rows[rows["path"].isin(part["path"])] for part in self]
        return Split(*parts, feature_config=feature_config or self.feature_config)


def load_manifest(config: TrainConfig | DataSpec) -> pd.DataFrame:
    """The run's manifest with canonical (not yet label-mapped) labels.

    Built from ``data.corpus`` + ``data.root`` and/or ``data.corpora`` (several corpora combined;
    speakers stay namespaced per corpus, e.g. ``emodb:03``), or read from ``data.manifest``.
    """
    data = config.data if isinstance(config, TrainConfig) else config
    sources = data.sources()
    if data.manifest:
        from ser_ray.corpora.manifest import read_manifest

        df = read_manifest(data.manifest)
    elif len(sources) == 1:
        from ser_ray.corpora import build_manifest

        df, _ = build_manifest(*sources[0])
    elif sources:
        from ser_ray.corpora import build_combined

        names = [corpus for corpus, _ in sources]
        if len(set(names)) < len(names):
            # speaker ids are namespaced by corpus name only: two roots of one corpus share speaker ids
            log.warning("data.corpora names %s more than once; its speakers are treated as the same people", names)
        # "all" keeps every canonical label; the run's label map is applied once, by label_mapped
        df, _ = build_combined(sources, label_map="all")
    else:
        raise ValueError("no data: set data.corpus and data.root (e.g. --corpus emodb --root DIR), "
                         "data.corpora or data.manifest")
    if len(df) == 0:
        raise ValueError(f"no clips found for {data.manifest or sources}")
    return df


def label_mapped(manifest: pd.DataFrame, label_map: str) -> tuple[pd.DataFrame, list[str]]:
    """The manifest under ``label_map`` and its labels in canonical order."""
    from ser_ray.corpora.labels import CANONICAL, apply_label_map

    df = apply_label_map(manifest, label_map)
    present = set(df["emotion"])
    return df, [label for label in CANONICAL if label in present]


def assign_folds(df: pd.DataFrame, protocol: str, k: int, seed: int, folds: str | None = None) -> tuple[pd.DataFrame, int]:
    """``df`` with ``fold`` (loso/kfold, or published ``folds`` from a file, used as given) or ``split``
    (cremad-fixed/fixed) and the number of test folds."""
    from ser_ray import splits

    if folds:
        df = splits.given_folds(df, splits.read_folds(folds), where=folds)
        return df, int(df["fold"].max()) + 1
    df = splits.apply_protocol(df, protocol, k=k, seed=seed)
    return df, (int(df["fold"].max()) + 1 if "fold" in df.columns else 1)


def fold_frames(df: pd.DataFrame, protocol: str, fold: int, val_fraction: float, seed: int) -> Split:
    """The :class:`Split` (train, val, test rows) of one fold of ``assign_folds(df, protocol, ...)``.

    Validation speakers are drawn from the training speakers (fixed splits bring their own).
    """
    from ser_ray import splits

    if "split" in df.columns:  # a fixed split brings its own validation speakers
        return Split(df[df["split"] == "train"], df[df["split"] == "val"], df[df["split"] == "test"])
    test = df[df["fold"] == fold]
    train, val = splits.train_val_split(df[df["fold"] != fold], val_frac=val_fraction, seed=seed + fold)
    return Split(train, val, test)


def feature_rows(manifest: pd.DataFrame, feature_config: FeatureConfig, cache_root: str, *,
                 speaker_norm: bool = False):
    """``(manifest rows + features/error columns, CacheInfo)``: the feature cache of these clips, built if missing.

    ``speaker_norm`` standardises the features of each speaker with its own statistics (see
    ``ser_ray.features.speaker_norm``); the cache itself stays unnormalised.
    """
    from ser_ray.corpora.manifest import MANIFEST_COLUMNS
    from ser_ray.features.pipeline import load_cache_pandas, prepare
    from ser_ray.features.speaker_norm import speaker_normalise

    # manifest columns only: the cache is shared by every protocol/fold assignment of these clips
    cache = prepare(manifest[list(MANIFEST_COLUMNS)], cache_root, feature_config)
    if cache.n_error:
        log.warning("%d clip(s) failed feature extraction and are left out, e.g. %s", cache.n_error, cache.errors[:1])
    features = load_cache_pandas(cache)[["path", "features", "error"]]
    rows = manifest.merge(features, on="path", how="left", validate="one_to_one")
    return (speaker_normalise(rows) if speaker_norm else rows), cache


def speaker_list(df: pd.DataFrame) -> list[str]:
    return sorted(df["speaker"].astype(str).unique())


def speed_copies(manifest: pd.DataFrame, feature_config: FeatureConfig, cache_root: str, speeds, *, family: str,
                 speaker_norm: bool = False) -> pd.DataFrame | None:
    """Speed-perturbed copies of every clip of ``manifest`` (``data.speed_perturb``): feature rows like
    :func:`feature_rows`'s, one set per speed (``speed`` column), each in its own cache. Only the
    classical fits read them, and only for the clips they train on: None without speeds or for a deep
    ``family`` (logged: it leaves them unused).

    Speaker normalisation treats each speed's copies of a speaker as a speaker of their own: the copies
    are standardised with their own statistics, as every real speaker is.
    """
    import dataclasses

    from ser_ray.models.classical import is_classical

    if not speeds:
        return None
    if not is_classical(family):
        log.warning("data.speed_perturb %s is left unused: %s is not a classical family", list(speeds), family)
        return None
    log.info("speed perturbation: %s trains on copies at speeds %s of its training clips", family, list(speeds))
    parts = []
    for speed in speeds:
        rows, _ = feature_rows(manifest, dataclasses.replace(feature_config, speed=float(speed)), cache_root,
                               speaker_norm=speaker_norm)
        parts.append(rows.assign(speed=float(speed)))
    return pd.concat(parts, ignore_index=True)
