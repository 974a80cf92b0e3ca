"""Training-only augmentation, applied to training batches after the speaker split.

On the fly (cheap, batched, any device): ``spec_augment`` on log-mel/MFCC features; ``add_noise_snr``,
``random_gain`` and ``time_shift`` on waveforms (``time_shift`` works on features too). ``Augmenter``
bundles them with a probability and a seed, and is what the training loop calls.

Offline: speed-perturbed training copies of the training speakers' clips (``data.speed_perturb``,
for the classical families) are featurised like the originals, with ``FeatureConfig.speed`` (see
``FeatureExtractor.prepare_wave``); they live in their own feature caches, not here. (Pitch shifts and
time stretches through librosa's phase vocoder were tried for them and made EmoDB LOSO worse.)

Every random draw comes from a ``torch.Generator`` on the CPU, so a seed reproduces a run exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
import torchaudio.functional as AF


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _as_waves(x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """``[B, samples]`` or ``[B, 1, samples]`` -> ``[B, samples]`` and the shape to restore."""
    return x.reshape(x.shape[0], -1), x.shape


# -- features --------------------------------------------------------------------------------------


def spec_augment(
    feats: torch.Tensor,
    freq_mask: int = 15,
    time_mask: int = 20,
    n_masks: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SpecAugment on ``[B, C, F]``: ``n_masks`` frequency bands (each up to ``freq_mask`` rows) and
    ``n_masks`` time spans (each up to ``time_mask`` frames) per clip, filled with the clip's mean.

    Masks are drawn independently per clip (like ``torchaudio.functional.mask_along_axis_iid``,
    which cannot take a generator). The fill is the clip mean, not 0: un-normalised dB features
    would read 0 as a loud band.
    """
    b, c, f = feats.shape
    keep = torch.ones(b, c, f, dtype=torch.bool)
    for axis, size, width in ((1, c, freq_mask), (2, f, time_mask)):
        if width <= 0:
            continue
        positions = torch.arange(size)
        for _ in range(n_masks):
            w = torch.randint(0, min(width, size) + 1, (b,), generator=generator)
            start = (torch.rand(b, generator=generator) * (size - w + 1)).long()
            hit = (positions >= start[:, None]) & (positions < (start + w)[:, None])  # [B, size]
            keep &= ~(hit[:, :, None] if axis == 1 else hit[:, None, :])
    keep = keep.to(feats.device)
    fill = feats.mean(dim=(1, 2), keepdim=True)
    return torch.where(keep, feats, fill)


def time_shift(
    x: torch.Tensor, max_shift_frac: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Roll each clip along its last axis by up to ``max_shift_frac`` of its length (either way)."""
    n = x.shape[-1]
    max_shift = int(max_shift_frac * n)
    if max_shift == 0:
        return x
    shifts = torch.randint(-max_shift, max_shift + 1, (x.shape[0],), generator=generator)
    index = (torch.arange(n)[None, :] - shifts[:, None]) % n  # [B, n]
    index = index.to(x.device).view(x.shape[0], *([1] * (x.ndim - 2)), n).expand_as(x)
    return torch.gather(x, -1, index)


# -- waveforms -------------------------------------------------------------------------------------


def add_noise_snr(
    waves: torch.Tensor,
    snr_db_range: Sequence[float] = (10.0, 30.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """White noise at a per-clip SNR drawn uniformly from ``snr_db_range`` (dB)."""
    w, shape = _as_waves(waves)
    noise = torch.randn(w.shape, generator=generator).to(w.device, w.dtype)
    snr = _uniform(w.shape[0], *snr_db_range, generator).to(w.device, w.dtype)
    return AF.add_noise(w, noise, snr).reshape(shape)


def random_gain(
    waves: torch.Tensor,
    db_range: Sequence[float] = (-6.0, 6.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Each clip scaled by a gain drawn uniformly from ``db_range`` (dB)."""
    gain_db = _uniform(waves.shape[0], *db_range, generator).to(waves.device, waves.dtype)
    return waves * (10.0 ** (gain_db / 20.0)).view(-1, *([1] * (waves.ndim - 1)))


# -- the training loop's entry point -------------------------------------------------------------


@dataclasses.dataclass
class Augmenter:
    """On-the-fly augmentation of a training batch; each enabled step hits a clip with probability ``p``.

    Features ``[B, C, F]`` (C > 1): SpecAugment, time shift. Waveforms ``[B, 1, samples]`` or
    ``[B, samples]``: gain, noise, time shift. ``None``/0 disables a step. Give each Ray Train worker
    its own seed (e.g. ``seed + rank``), or all workers draw the same masks.
    """

    p: float = 0.5
    spec_augment: bool = True
    freq_mask: int = 15
    time_mask: int = 20
    n_masks: int = 2
    time_shift: float = 0.1  # max fraction of the window
    noise_snr_db: tuple[float, float] | None = (10.0, 30.0)
    gain_db: tuple[float, float] | None = (-6.0, 6.0)
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"augmentation probability p={self.p} must be within [0, 1]")
        for name in ("noise_snr_db", "gain_db"):  # YAML gives lists
            value = getattr(self, name)
            if value is not None:
                if len(value) != 2 or value[0] > value[1]:
                    raise ValueError(f"{name}={value!r}: give a [low, high] range")
                setattr(self, name, (float(value[0]), float(value[1])))
        self.generator = torch.Generator().manual_seed(self.seed)

    def reseed(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def _sometimes(self, x: torch.Tensor, augmented: torch.Tensor) -> torch.Tensor:
        hit = torch.rand(x.shape[0], generator=self.generator) < self.p
        hit = hit.to(x.device).view(-1, *([1] * (x.ndim - 1)))
        return torch.where(hit, augmented, x)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """An augmented copy of the batch. ``kind`` is ``waveform`` or a feature kind; when not
        given, one channel (``[B, 1, samples]``) or 2-D input means waveform."""
        if kind is None:
            kind = "waveform" if x.ndim == 2 or x.shape[1] == 1 else "features"
        g = self.generator
        if kind == "waveform":
            if self.gain_db is not None:
                x = self._sometimes(x, random_gain(x, self.gain_db, g))
            if self.noise_snr_db is not None:
                x = self._sometimes(x, add_noise_snr(x, self.noise_snr_db, g))
        elif self.spec_augment:
            x = self._sometimes(x, spec_augment(x, self.freq_mask, self.time_mask, self.n_masks, g))
        if self.time_shift:
            x = self._sometimes(x, time_shift(x, self.time_shift, g))
        return x
