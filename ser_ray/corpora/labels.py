"""Canonical emotion labels and the maps that combine corpora.

Every adapter emits canonical labels. A label map says, for a training run, which canonical labels
are kept, which are renamed (RAVDESS calm -> neutral when asked) and which are dropped (EmoDB boredom
in the 6-class set). One map, stated in every result.
"""

from __future__ import annotations

SIX_CLASS: tuple[str, ...] = ("anger", "disgust", "fear", "happiness", "neutral", "sadness")
EXTRA_LABELS: tuple[str, ...] = ("calm", "surprise", "boredom")
CANONICAL: tuple[str, ...] = SIX_CLASS + EXTRA_LABELS

# name -> {canonical label: mapped label or None (dropped)}
LABEL_MAPS: dict[str, dict[str, str | None]] = {
    "six": {**{label: label for label in SIX_CLASS}, "calm": None, "surprise": None, "boredom": None},
    "six_calm_as_neutral": {
        **{label: label for label in SIX_CLASS},
        "calm": "neutral",
        "surprise": None,
        "boredom": None,
    },
    "all": {label: label for label in CANONICAL},
}


def apply_label_map(manifest, name: str = "six"):
    """Return a copy of ``manifest`` with labels mapped and dropped rows removed.

    The original label is kept in ``emotion_original`` so results can say what was merged.
    """
    if name not in LABEL_MAPS:
        raise ValueError(f"unknown label map {name!r}; choose from {sorted(LABEL_MAPS)}")
    mapping = LABEL_MAPS[name]
    out = manifest.copy()
    out["emotion_original"] = out["emotion"]
    out["emotion"] = out["emotion"].map(mapping)
    return out[out["emotion"].notna()].reset_index(drop=True)


def labels_present(manifest, name: str = "six") -> list[str]:
    """Labels of ``manifest`` after mapping, in canonical order."""
    mapped = set(apply_label_map(manifest, name)["emotion"])
    return [label for label in CANONICAL if label in mapped]
