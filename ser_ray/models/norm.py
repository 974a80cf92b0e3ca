"""Per-utterance normalisation shared by the spectrogram families."""

from __future__ import annotations

import torch


def utterance_cmvn(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``[B, C, F]`` -> each clip's bands centred over time and scaled by the clip's std.

    Speakers differ in loudness and recording set-up; removing each clip's per-band mean (its
    channel/level colouring) and overall scale is what makes speaker-independent accuracy hold up.
    Per clip only, so a prediction never depends on the rest of the batch.
    """
    x = x - x.mean(dim=-1, keepdim=True)
    std = x.flatten(1).std(dim=1, unbiased=False).clamp_min(eps)
    return x / std.view(-1, *([1] * (x.ndim - 1)))


def row_standardise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``[B, C, F]`` -> every row of every clip to zero mean and unit variance over time.

    For rows on different scales (ZCR in [0, 1], RMS energy in amplitude units), where
    ``utterance_cmvn``'s single per-clip scale would let the largest row dominate. Still per clip,
    and a louder recording (energy times k) gives the same result.
    """
    x = x - x.mean(dim=-1, keepdim=True)
    return x / x.std(dim=-1, keepdim=True, unbiased=False).clamp_min(eps)
