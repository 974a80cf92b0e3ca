"""Per-speaker feature standardisation: an evaluation option of ``cv`` / ``compare`` / cross-corpus runs.

Speakers differ in loudness, pitch range and recording set-up more than emotions do. Per-utterance
CMVN (``ser_ray.models.norm``) removes those differences but also each clip's own loudness and
spectral tilt, which carry arousal (anger is louder than sadness *for the same speaker*). Standardising
every feature row with the mean and std of the whole speaker keeps the within-speaker contrasts.

The statistics of a test speaker come from that speaker's clips without their labels: transductive
speaker adaptation, as in the SER literature's "speaker normalisation". It needs all of a speaker's
clips up front; a result directory records it (``normalise_by`` in its summary), and a model
trained on it records it in ``model.json`` (``extra.normalise_by``). A bundle of such models is
run by offline annotation with ``normalise_by: file``: each recording's windows are standardised
with that recording's own statistics (the same :func:`standardise_group`), the closest thing to a
speaker's clips that an archive of unknown speakers offers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

EPS = 1e-5


def standardise_group(stack: np.ndarray) -> np.ndarray:
    """Features ``[N, C, F]`` of one group (a speaker's clips, a recording's windows) with every row
    ``C`` standardised over the whole group (all its clips and frames): the one normalisation that
    training (``normalise_by: speaker``) and annotation (``normalise_by: file``) share."""
    stack = np.asarray(stack, dtype=np.float32)
    mean = stack.mean(axis=(0, 2), keepdims=True)
    std = np.maximum(stack.std(axis=(0, 2), keepdims=True), EPS)
    return (stack - mean) / std


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
        for i, clip in zip(idx, standardise_group(np.stack(features[idx]))):
            features[i] = clip
    out = rows.copy()
    out["features"] = features
    return out
