"""Window-level accuracy of annotations against a ground-truth timeline (the synthetic archive's
``timeline.csv``: file, start_s, end_s, emotion; pauses are labelled ``silence``)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

NON_SPEECH = ("silence",)


def window_truth(segments_df: pd.DataFrame, timeline_df: pd.DataFrame) -> pd.Series:
    """The true label of each segment: the timeline span overlapping it most (NaN when that span is
    silence or nothing overlaps). Files match on their base name."""
    truth = pd.Series(np.nan, index=segments_df.index, dtype=object)
    key = "file" if "file" in timeline_df else "uri"
    spans = timeline_df.assign(_name=timeline_df[key].map(lambda u: os.path.basename(str(u))))
    by_file = {name: g for name, g in spans.groupby("_name")}
    for idx, seg in segments_df.iterrows():
        g = by_file.get(os.path.basename(str(seg["uri"])))
        if g is None:
            continue
        overlap = np.minimum(g["end_s"], seg["end_s"]) - np.maximum(g["start_s"], seg["start_s"])
        best = int(np.argmax(overlap.to_numpy()))
        if overlap.iloc[best] > 0 and g["emotion"].iloc[best] not in NON_SPEECH:
            truth[idx] = g["emotion"].iloc[best]
    return truth


def window_accuracy(segments_df: pd.DataFrame, timeline_df: pd.DataFrame) -> float:
    """Share of scored windows whose predicted ``label`` equals the dominant true emotion.

    Windows mostly over silence, or in files absent from the timeline, are not scored; NaN when no
    window is scored.
    """
    truth = window_truth(segments_df, timeline_df)
    scored = truth.notna()
    if not scored.any():
        return float("nan")
    return float((segments_df.loc[scored, "label"] == truth[scored]).mean())
