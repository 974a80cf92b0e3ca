"""The manifest: one row per clip, stored as Parquet or CSV, locally or on S3."""

from __future__ import annotations

import io

import pandas as pd

from ser_ray import storage
from ser_ray.corpora.labels import CANONICAL

MANIFEST_COLUMNS: tuple[str, ...] = (
    "path",
    "corpus",
    "speaker",
    "gender",
    "sentence",
    "emotion",
    "intensity",
    "duration_s",
    "sample_rate",
)
GENDERS = ("female", "male", "unknown")
# Columns that must stay strings even when they look numeric in a CSV ("01", "1001").
_STRING_COLUMNS = ("path", "corpus", "speaker", "gender", "sentence", "emotion", "intensity", "split")


def empty_manifest() -> pd.DataFrame:
    """A manifest with no rows (what an adapter returns when nothing parses)."""
    dtypes = {"duration_s": "float64", "sample_rate": "int64"}
    return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, "object")) for c in MANIFEST_COLUMNS})


def validate_manifest(df: pd.DataFrame, name: str = "manifest") -> pd.DataFrame:
    """Check columns and values; return ``df`` with the manifest columns first, in order.

    Raises ``ValueError`` naming the manifest and what is wrong.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: missing columns {missing}; a manifest has {list(MANIFEST_COLUMNS)}")
    for column in ("path", "corpus", "speaker", "emotion"):
        if df[column].isna().any():
            raise ValueError(f"{name}: {int(df[column].isna().sum())} rows without {column!r}")
    unknown = sorted(set(df["emotion"]) - set(CANONICAL))
    if unknown:
        raise ValueError(f"{name}: unknown emotion labels {unknown}; canonical labels are {list(CANONICAL)}")
    bad_gender = sorted(set(df["gender"].dropna()) - set(GENDERS))
    if bad_gender:
        raise ValueError(f"{name}: unknown gender values {bad_gender}; use {list(GENDERS)}")
    not_namespaced = [s for s in df["speaker"].unique() if ":" not in str(s)]
    if not_namespaced:
        raise ValueError(
            f"{name}: speakers must be namespaced as 'corpus:id' (got {not_namespaced[:3]}) so that "
            "ids from different corpora never collide"
        )
    if df["path"].duplicated().any():
        dup = df.loc[df["path"].duplicated(), "path"].iloc[0]
        raise ValueError(f"{name}: path listed more than once, e.g. {dup}")
    extra = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    return df[list(MANIFEST_COLUMNS) + extra]


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for column in _STRING_COLUMNS:
        if column in df.columns:
            df[column] = df[column].astype(object).where(df[column].notna(), None)
            df[column] = df[column].map(lambda v: v if v is None else str(v))
    df["duration_s"] = df["duration_s"].astype("float64")
    df["sample_rate"] = df["sample_rate"].astype("int64")
    return df


def write_manifest(df: pd.DataFrame, path: str) -> str:
    """Write ``df`` to ``path`` (``.parquet`` or ``.csv``, local or ``s3://``); returns ``path``."""
    df = validate_manifest(df, str(path))
    path = str(path)
    buffer = io.BytesIO()
    if path.endswith(".parquet"):
        _typed(df).to_parquet(buffer, index=False)
    elif path.endswith(".csv"):
        _typed(df).to_csv(buffer, index=False)
    else:
        raise ValueError(f"{path}: manifest files end in .parquet or .csv")
    storage.write_bytes(path, buffer.getvalue())
    return path


def read_manifest(path: str) -> pd.DataFrame:
    """Read and validate a manifest written by ``write_manifest`` (or by hand, same columns)."""
    path = str(path)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: manifest not found; build one with `ser-ray manifest`") from None
    if path.endswith(".parquet"):
        df = pd.read_parquet(io.BytesIO(data))
    elif path.endswith(".csv"):
        df = pd.read_csv(
            io.BytesIO(data), dtype={c: str for c in _STRING_COLUMNS}, keep_default_na=False, na_values=[""]
        )
    else:
        raise ValueError(f"{path}: manifest files end in .parquet or .csv")
    return validate_manifest(_typed(df), path)
