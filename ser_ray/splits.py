"""Speaker-disjoint folds and fixed splits of a manifest.

Every protocol here keeps each speaker in exactly one fold or split: an utterance-level random split
lets a model recognise voices instead of emotions and overstates accuracy. The one exception,
``leaky_random_split``, exists only to show that gap; it refuses to run without an explicit flag and
marks its output ``leaky``.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

log = logging.getLogger(__name__)

PROTOCOLS = ("kfold", "loso", "cremad-fixed", "fixed", "random")

# TFDS crema_d's published actor split (5,144 / 738 / 1,556 clips).
CREMAD_TEST_ACTORS = (1010, 1013, 1022, 1026, 1037, 1038, 1040, 1045, 1047, 1048, 1059, 1065, 1066, 1068, 1071, 1073, 1084, 1086, 1088)
CREMAD_VAL_ACTORS = (1015, 1020, 1021, 1030, 1050, 1070, 1079, 1089, 1090)


class SpeakerLeakError(AssertionError):
    """A speaker appears on both sides of a split."""


def kfold(df: pd.DataFrame, k: int = 5, seed: int = 0) -> pd.DataFrame:
    """Add ``fold`` (0..k-1): speaker-grouped k-fold, stratified by emotion as far as groups allow."""
    speakers = df["speaker"].nunique()
    if not 2 <= k <= speakers:
        raise ValueError(f"kfold: k={k} needs 2 <= k <= number of speakers ({speakers})")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.empty(len(df), dtype=np.int64)
    y, groups = df["emotion"].to_numpy(dtype=object), df["speaker"].to_numpy(dtype=object)
    for index, (_, test) in enumerate(splitter.split(np.zeros(len(df)), y, groups)):
        fold[test] = index
    return df.assign(fold=fold)


def loso(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``fold``: leave-one-speaker-out, one fold per speaker in sorted order."""
    speakers = sorted(df["speaker"].unique())
    return df.assign(fold=df["speaker"].map({s: i for i, s in enumerate(speakers)}).astype("int64"))


def read_folds(path: str) -> list[list[str]]:
    """Test speakers of each fold from a file (local or ``s3://``), in fold order.

    JSON: ``[[spk, ...], ...]``, ``{"0": [spk, ...], ...}`` or ``{"folds": [{"test_speakers": [...]}, ...]}``
    (the ``folds.json`` a cv run writes). CSV: columns ``fold`` and ``speaker``, one row per speaker.
    """
    import io
    import json

    from ser_ray import storage

    raw = storage.read_bytes(path)
    if str(path).lower().endswith(".csv"):
        table = pd.read_csv(io.BytesIO(raw), dtype={"speaker": str})
        if not {"fold", "speaker"} <= set(table.columns):
            raise ValueError(f"{path}: a folds CSV has the columns fold and speaker")
        return [sorted(rows["speaker"].astype(str)) for _, rows in table.groupby("fold", sort=True)]
    data = json.loads(raw)
    if isinstance(data, dict) and "folds" in data:
        data = [f["test_speakers"] if isinstance(f, dict) else f for f in data["folds"]]
    elif isinstance(data, dict):
        data = [data[k] for k in sorted(data, key=lambda k: int(k) if str(k).isdigit() else str(k))]
    if not isinstance(data, list) or not all(isinstance(f, list) and f for f in data):
        raise ValueError(f"{path}: expected a list of test-speaker lists, one per fold")
    return [[str(s) for s in f] for f in data]


def given_folds(df: pd.DataFrame, folds: list[list[str]], where: str = "folds file") -> pd.DataFrame:
    """Add ``fold`` from published folds (test speakers per fold); speakers in no fold get -1 (always
    training). A listed speaker matches a manifest speaker exactly or by its id without the corpus
    prefix (``03`` matches ``emodb:03``). Refused: a speaker in two folds, a name matching nothing."""
    speakers = df["speaker"].astype(str)
    bare = speakers.str.split(":").str[-1]
    fold = pd.Series(-1, index=df.index, dtype="int64")
    for i, names in enumerate(folds):
        for name in names:
            hit = (speakers == name) | (bare == name)
            if not hit.any():
                raise ValueError(f"{where}: fold {i} names speaker {name!r}, which is not in the manifest")
            if (fold[hit] >= 0).any():
                raise SpeakerLeakError(f"{where}: speaker {name!r} is a test speaker of two folds")
            fold[hit] = i
    return df.assign(fold=fold.to_numpy())


def _pick_speakers(df: pd.DataFrame, fractions: list[float], seed: int) -> list[set]:
    """Disjoint speaker sets of the given fractions (at least one speaker each when > 0).

    Speakers are shuffled within each gender and interleaved, so each set mixes genders.
    """
    rng = np.random.default_rng(seed)
    genders = df.groupby("speaker")["gender"].first()
    by_gender = [list(rng.permutation(sorted(genders[genders == g].index))) for g in sorted(genders.unique())]
    order = [s for group in zip(*[g + [None] * (len(genders) - len(g)) for g in by_gender]) for s in group if s]
    sets, start = [], 0
    for frac in fractions:
        n = 0 if frac <= 0 else max(1, int(round(frac * len(order))))
        sets.append(set(order[start : start + n]))
        start += n
    if start >= len(order):
        raise ValueError(
            f"{len(order)} speakers are too few for fractions {fractions}: no speaker would be left for training"
        )
    return sets


def fixed_speaker_split(df: pd.DataFrame, val_frac: float = 0.1, test_frac: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """Add ``split`` (train/val/test) with speakers drawn deterministically: a 70/10/20 default."""
    test, val = _pick_speakers(df, [test_frac, val_frac], seed)
    split = df["speaker"].map(lambda s: "test" if s in test else "val" if s in val else "train")
    return df.assign(split=split.astype(object))


def cremad_fixed(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Add ``split``: TFDS crema_d's actor split for CREMA-D; other corpora (the synthetic one has
    fewer actors) fall back to ``fixed_speaker_split`` (70/10/20 of speakers), with a logged note."""
    if set(df["corpus"]) != {"cremad"}:
        log.info(
            "cremad-fixed: corpus %s is not CREMA-D; using a deterministic speaker-disjoint 70/10/20 "
            "split of its %d speakers (seed %d) instead",
            sorted(set(df["corpus"])),
            df["speaker"].nunique(),
            seed,
        )
        return fixed_speaker_split(df, 0.1, 0.2, seed)
    actor = df["speaker"].str.split(":").str[1].astype(int)
    split = np.where(actor.isin(CREMAD_TEST_ACTORS), "test", np.where(actor.isin(CREMAD_VAL_ACTORS), "val", "train"))
    return df.assign(split=pd.Series(split, index=df.index, dtype=object))


def train_val_split(train_df: pd.DataFrame, val_frac: float = 0.1, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A speaker-disjoint validation set inside a training fold: ``(train, val)``."""
    (val,) = _pick_speakers(train_df, [val_frac], seed)
    is_val = train_df["speaker"].isin(val)
    return train_df[~is_val].reset_index(drop=True), train_df[is_val].reset_index(drop=True)


def leaky_random_split(
    df: pd.DataFrame, val_frac: float = 0.1, test_frac: float = 0.2, seed: int = 0, *, allow_leaky: bool = False
) -> pd.DataFrame:
    """Add ``split`` by utterance, ignoring speakers, and ``leaky=True``. Only for showing the gap.

    Raises unless ``allow_leaky=True``: results on this split are not speaker-independent.
    """
    if not allow_leaky:
        raise ValueError(
            "leaky_random_split mixes speakers across train and test and overstates accuracy; "
            "pass allow_leaky=True (CLI: --leaky) only to measure that gap"
        )
    index = np.arange(len(df))
    y = df["emotion"].to_numpy(dtype=object)
    rest, test = train_test_split(index, test_size=test_frac, random_state=seed, stratify=y)
    train, val = train_test_split(rest, test_size=val_frac / (1 - test_frac), random_state=seed, stratify=y[rest])
    split = np.empty(len(df), dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    out = df.assign(split=split, leaky=True)
    out.attrs["leaky"] = True
    log.warning("leaky random split: speakers overlap between train and test; results are marked leaky")
    return out


def split_column(df: pd.DataFrame) -> str:
    for column in ("split", "fold"):
        if column in df.columns:
            return column
    raise ValueError("manifest has neither a 'split' nor a 'fold' column; run `ser-ray splits` first")


def assert_speaker_disjoint(*frames: pd.DataFrame, column: str | None = None) -> None:
    """Raise ``SpeakerLeakError`` if a speaker is in two parts.

    One frame: its parts are the values of ``column`` (``split`` or ``fold`` by default). Several
    frames (e.g. train, val, test): each frame is a part.
    """
    if len(frames) == 1:
        df = frames[0]
        column = column or split_column(df)
        parts = {str(k): set(g["speaker"]) for k, g in df.groupby(column)}
    else:
        parts = {str(i): set(f["speaker"]) for i, f in enumerate(frames)}
    names = sorted(parts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = parts[a] & parts[b]
            if shared:
                raise SpeakerLeakError(f"speakers {sorted(shared)[:5]} are in both {a!r} and {b!r}")


def fold_lists(df: pd.DataFrame, protocol: str | None = None, seed: int | None = None) -> dict:
    """Speakers (and clip counts) per fold or split, to save as JSON next to results."""
    column = split_column(df)
    groups = df.groupby(column)
    return {
        "protocol": protocol,
        "seed": seed,
        "column": column,
        "leaky": bool(df.attrs.get("leaky") or ("leaky" in df.columns and df["leaky"].any())),
        "speakers": {str(k): sorted(g["speaker"].unique()) for k, g in groups},
        "clips": {str(k): int(len(g)) for k, g in groups},
    }


def apply_protocol(df: pd.DataFrame, protocol: str, *, k: int = 5, seed: int = 0, leaky: bool = False) -> pd.DataFrame:
    """One of ``PROTOCOLS`` by name (what ``ser-ray splits --protocol`` runs)."""
    if protocol == "random":
        return leaky_random_split(df, seed=seed, allow_leaky=leaky)
    if leaky:
        raise ValueError("--leaky goes with --protocol random only; the other protocols are speaker-disjoint")
    if protocol == "kfold":
        return kfold(df, k, seed)
    if protocol == "loso":
        return loso(df)
    if protocol == "cremad-fixed":
        return cremad_fixed(df, seed)
    if protocol == "fixed":
        return fixed_speaker_split(df, seed=seed)
    raise ValueError(f"unknown split protocol {protocol!r}; choose from {list(PROTOCOLS)}")
