"""Per-speaker feature standardisation: an evaluation option of ``cv`` / ``compare`` / cross-corpus runs.

Speakers differ in loudness, pitch range and recording set-up more than emotions do. Per-utterance
CMVN (``ser_ray.models.norm``) removes those differences but also each clip's own loudness and
spectral tilt, which carry arousal (anger is louder than sadness *for the same speaker*). Standardising
every feature row with the mean and std of the whole speaker keeps the within-speaker contrasts.

The statistics of a test speaker come from that speaker's clips without their labels: transductive
speaker adaptation, as in the SER literature's "speaker normalisation". It needs all of a speaker's
clips up front, so it is not available to tuning, bundles, Serve or annotation (unknown speakers,
one file at a time), and a result directory records it (``speaker_norm`` in its summary).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

EPS = 1e-5


def speaker_normalise(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (``speaker``, ``features`` ``[C, F]`` arrays, optional ``error``) with each speaker's
    features standardised per row ``C`` over all that speaker's clips and frames.

    Rows with an extraction error keep their (all-zero) features and do not enter the statistics.
    Labels are never read.
    """
    if "speaker" not in rows.columns or "features" not in rows.columns:
        raise ValueError("speaker normalisation needs 'speaker' and 'features' columns")
    ok = rows["error"].isna() if "error" in rows.columns else pd.Series(True, index=rows.index)
    out = rows.copy()
    features = list(out["features"])
    for _, group in out[ok].groupby(out.loc[ok, "speaker"].astype(str)):
        positions = [out.index.get_loc(i) for i in group.index]
        stack = np.stack([np.asarray(features[p], dtype=np.float32) for p in positions])  # [n, C, F]
        mean = stack.mean(axis=(0, 2), keepdims=True)[0]  # [C, 1]
        std = stack.std(axis=(0, 2), keepdims=True)[0]
        for p in positions:
            features[p] = ((np.asarray(features[p], dtype=np.float32) - mean) / np.maximum(std, EPS)).astype(np.float32)
    out["features"] = features
    return out
