"""Corpus adapters: find audio under a directory or ``s3://`` prefix, parse labels from names.

``build_manifest(corpus, root)`` returns the manifest and a report of every file that did not become
a row (grouped by reason, with a few examples), so nothing is dropped silently.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import pandas as pd

from ser_ray import storage
from ser_ray.corpora import cremad, emodb, ravdess
from ser_ray.corpora.base import AUDIO_SUFFIXES, SkipFile, audio_info, file_name
from ser_ray.corpora.labels import apply_label_map
from ser_ray.corpora.manifest import MANIFEST_COLUMNS, empty_manifest, validate_manifest

log = logging.getLogger(__name__)

# corpus name -> adapter module. The synthetic corpus has CREMA-D names, so it shares the parser.
ADAPTERS: dict[str, ModuleType] = {"cremad": cremad, "ravdess": ravdess, "emodb": emodb, "synthetic": cremad}
CORPORA: tuple[str, ...] = tuple(ADAPTERS)
MAX_EXAMPLES = 5


def _row(uri: str, corpus: str, adapter: ModuleType, genders: dict[str, str]) -> dict:
    if not file_name(uri).lower().endswith(AUDIO_SUFFIXES):
        raise SkipFile("not audio", f"{uri}: not an audio file name ({', '.join(AUDIO_SUFFIXES)})")
    fields = adapter.parse(uri, corpus)
    duration_s, sample_rate = audio_info(uri)
    fields.setdefault("gender", genders.get(fields["speaker"], "unknown"))
    return {"path": uri, "corpus": corpus, **fields, "duration_s": duration_s, "sample_rate": sample_rate}


def build_manifest(corpus: str, root: str, label_map: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Manifest rows for every clip of ``corpus`` under ``root`` and a report of skipped files.

    ``label_map`` (``six``, ``six_calm_as_neutral``, ``all``) maps labels; ``None`` keeps the raw
    canonical labels (the usual: label maps apply at training time).
    """
    if corpus not in ADAPTERS:
        raise ValueError(f"unknown corpus {corpus!r}; choose from {list(CORPORA)}")
    adapter = ADAPTERS[corpus]
    root = str(root) if storage.is_s3(str(root)) else str(Path(root).expanduser().resolve())
    files = [u for u in storage.list_files(root) if file_name(u) not in adapter.METADATA_FILES]
    genders = adapter.genders(root, corpus)
    # Threads: local reads are header-only, S3 reads are network-bound; both overlap well.
    workers = 16 if storage.is_s3(root) else 4

    def attempt(uri: str):
        try:
            return _row(uri, corpus, adapter, genders)
        except SkipFile as skip:
            return skip

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(attempt, files))
    rows = [r for r in results if isinstance(r, dict)]
    skipped: dict[str, dict] = {}
    for skip in (r for r in results if isinstance(r, SkipFile)):
        entry = skipped.setdefault(skip.reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < MAX_EXAMPLES:
            entry["examples"].append(str(skip))
    for reason, entry in skipped.items():
        log.warning("%s: skipped %d file(s): %s, e.g. %s", root, entry["count"], reason, entry["examples"][0])

    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)) if rows else empty_manifest()
    df = validate_manifest(df.sort_values("path").reset_index(drop=True), f"{corpus} at {root}")
    if label_map is not None:
        df = apply_label_map(df, label_map)
    report = {
        "corpus": corpus,
        "root": root,
        "files_found": len(files),
        "rows": len(df),
        "speakers": int(df["speaker"].nunique()),
        "emotions": {k: int(v) for k, v in df["emotion"].value_counts().sort_index().items()},
        "skipped": skipped,
    }
    log.info("%s: %d clips, %d speakers from %d files", root, len(df), report["speakers"], len(files))
    return df, report


def combine_manifests(frames: list[pd.DataFrame], label_map: str = "six") -> pd.DataFrame:
    """Concatenate manifests of several corpora and apply one label map to all of them."""
    df = pd.concat([validate_manifest(f) for f in frames], ignore_index=True)
    return apply_label_map(validate_manifest(df, "combined manifest"), label_map)


def build_combined(sources: list[tuple[str, str]], label_map: str = "six") -> tuple[pd.DataFrame, list[dict]]:
    """``build_manifest`` for each ``(corpus, root)`` pair, combined under ``label_map``."""
    built = [build_manifest(corpus, root) for corpus, root in sources]
    return combine_manifests([df for df, _ in built], label_map), [report for _, report in built]


__all__ = ["ADAPTERS", "CORPORA", "build_manifest", "build_combined", "combine_manifests"]
