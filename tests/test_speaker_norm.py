"""Per-speaker feature standardisation (no Ray needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ser_ray.features.speaker_norm import speaker_normalise
from ser_ray.models.norm import utterance_cmvn
from ser_ray.tune.config import SearchConfig


def _rows(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for speaker in ("a", "b"):
        for i in range(4):
            rows.append({"path": f"{speaker}{i}.wav", "speaker": speaker, "emotion": "anger",
                         "features": rng.normal(size=(3, 5)).astype(np.float32), "error": None})
    return pd.DataFrame(rows)


def test_each_speaker_is_standardised_per_row_over_its_own_clips():
    rows = speaker_normalise(_rows(np.random.default_rng(0)))
    for _, group in rows.groupby("speaker"):
        stack = np.stack(group["features"].to_list())  # [clips, rows, frames]
        np.testing.assert_allclose(stack.mean(axis=(0, 2)), 0.0, atol=1e-5)
        np.testing.assert_allclose(stack.std(axis=(0, 2)), 1.0, atol=1e-4)


def test_a_louder_recording_setup_is_removed_but_loudness_within_a_speaker_is_kept():
    rows = _rows(np.random.default_rng(1))
    # speaker b recorded 12 dB hotter and with a different channel colouring: a per-row offset on log-mels
    louder = rows.copy()
    offset = np.array([[12.0], [9.0], [15.0]], dtype=np.float32)
    louder["features"] = [f + offset if s == "b" else f for f, s in zip(rows["features"], rows["speaker"])]
    np.testing.assert_allclose(np.stack(speaker_normalise(louder)["features"].to_list()),
                               np.stack(speaker_normalise(rows)["features"].to_list()), atol=1e-4)

    # within speaker a, clip 0 is made 6 units louder than the others: that contrast survives speaker
    # normalisation, while per-utterance CMVN maps it back to the quiet version
    shouted = rows.copy()
    shouted.at[0, "features"] = rows.at[0, "features"] + 6.0
    normed = speaker_normalise(shouted)
    a = normed[normed["speaker"] == "a"]["features"].to_list()
    assert a[0].mean() > max(clip.mean() for clip in a[1:]) + 1.0
    cmvn = utterance_cmvn(torch.from_numpy(np.stack([shouted.at[0, "features"], rows.at[0, "features"]])))
    torch.testing.assert_close(cmvn[0], cmvn[1])


def test_error_rows_keep_their_features_and_stay_out_of_the_statistics():
    rows = _rows(np.random.default_rng(2))
    rows.at[0, "error"] = "a0.wav: file not found"
    rows.at[0, "features"] = np.full((3, 5), 1e6, dtype=np.float32)  # would swamp speaker a's statistics
    normed = speaker_normalise(rows)
    np.testing.assert_array_equal(normed.at[0, "features"], rows.at[0, "features"])
    rest = np.stack(normed[(normed["speaker"] == "a") & normed["error"].isna()]["features"].to_list())
    np.testing.assert_allclose(rest.mean(axis=(0, 2)), 0.0, atol=1e-5)
    assert rows.at[1, "features"] is not normed.at[1, "features"]  # the input frame is left as it was


def test_tune_refuses_speaker_norm():
    with pytest.raises(ValueError, match="speaker_norm"):
        SearchConfig(data={"corpus": "synthetic", "root": "x", "speaker_norm": True})
