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
    ok = rows["error"].isna().to_numpy() if "error" in rows.columns else np.ones(len(rows), dtype=bool)
    speakers = rows["speaker"].astype(str).to_numpy()
    features = rows["features"].to_numpy(copy=True)  # object array of [C, F] arrays
    for speaker in np.unique(speakers[ok]):
        idx = np.flatnonzero(ok & (speakers == speaker))
        stack = np.stack(features[idx]).astype(np.float32, copy=False)  # [n, C, F]
        mean = stack.mean(axis=(0, 2), keepdims=True)
        std = np.maximum(stack.std(axis=(0, 2), keepdims=True), EPS)
        for i, clip in zip(idx, (stack - mean) / std):
            features[i] = clip
    out = rows.copy()
    out["features"] = features
    return out
