"""Utterance functionals: one fixed-length, named vector per clip (or annotation window).

Frame-level descriptors (low-level descriptors, LLDs) are computed with torchaudio and librosa, then
summarised over the clip's own frames by statistics. The zero padding that makes every clip one
window long is not part of the clip: frames past the last non-zero sample are left out of every
statistic, so a 1.2 s clip and the same clip padded to 3 s give the same vector.

LLDs and statistics (names are ``<lld>_<stat>``, see :func:`functional_names`):

- ``logmel<i>`` (``n_mels`` bands), ``mfcc<i>`` and ``dmfcc<i>`` (``n_mfcc`` coefficients and their
  deltas): mean, std, p10, p90.
- ``loudness`` (frame RMS in dB), ``zcr``, ``centroid`` / ``rolloff`` (kHz), ``flux``
  (half-wave-rectified log-mel change), ``flatness`` (log10), ``f0`` (semitones above 55 Hz, voiced
  frames only): mean, std, p10, p50, p90, slope (per second).
- ``voiced_fraction``, ``voiced_segments_per_s`` (a speaking-rate proxy), ``duration_s``.

Nothing here needs labels or other clips: speaker or recording normalisation happens later
(``ser_ray.features.speaker_norm``), and a clip's vector never depends on its batch.
"""

from __future__ import annotations

import numpy as np
import torch

BAND_STATS = ("mean", "std", "p10", "p90")
CONTOUR_STATS = ("mean", "std", "p10", "p50", "p90", "slope")
CONTOURS = ("loudness", "zcr", "centroid", "rolloff", "flux", "flatness", "f0")
GLOBALS = ("voiced_fraction", "voiced_segments_per_s", "duration_s")

F0_MIN, F0_MAX = 60.0, 500.0  # Hz: the YIN search range (adult speech, shouting included)
F0_REF = 55.0  # Hz: f0 is reported in semitones above this
YIN_FRAME = 1024  # samples at 16 kHz: two periods of 31 Hz, enough for F0_MIN
VOICED_MIN_DB = -35.0  # a voiced frame is within this many dB of the clip's loudest frame
VOICED_MAX_ZCR = 0.25  # ... and crosses zero less often than this (fricatives cross more)


def functional_names(n_mels: int, n_mfcc: int) -> list[str]:
    """The column name of every entry of the functionals vector, in order."""
    names = []
    for prefix, n in (("logmel", n_mels), ("mfcc", n_mfcc), ("dmfcc", n_mfcc)):
        names += [f"{prefix}{i}_{stat}" for i in range(n) for stat in BAND_STATS]
    names += [f"{lld}_{stat}" for lld in CONTOURS for stat in CONTOUR_STATS]
    return names + list(GLOBALS)


def num_functionals(n_mels: int, n_mfcc: int) -> int:
    return len(BAND_STATS) * (n_mels + 2 * n_mfcc) + len(CONTOURS) * len(CONTOUR_STATS) + len(GLOBALS)


def valid_frames(waves: torch.Tensor, hop_length: int, num_frames: int) -> torch.Tensor:
    """``[B, frames]`` bool: frames whose centre lies before the clip's zero padding starts."""
    nonzero = waves != 0
    idx = torch.arange(waves.shape[-1], device=waves.device)
    length = torch.where(nonzero, idx + 1, torch.zeros_like(idx)).amax(dim=-1)  # last non-zero + 1
    centres = torch.arange(num_frames, device=waves.device) * hop_length
    return centres.unsqueeze(0) < length.unsqueeze(1)


def _masked_stats(x: torch.Tensor, mask: torch.Tensor, stats: tuple[str, ...], frame_s: float) -> torch.Tensor:
    """``x [B, K, T]`` summarised over the frames where ``mask [B, K, T]`` -> ``[B, K, len(stats)]``.

    Rows without a single frame give zeros (never NaN).
    """
    x = x.double()
    vals = torch.where(mask, x, torch.full_like(x, float("nan")))
    count = mask.sum(-1)
    out = []
    mean = torch.nanmean(vals, dim=-1)
    for stat in stats:
        if stat == "mean":
            out.append(mean)
        elif stat == "std":
            out.append(torch.nanmean((vals - mean.unsqueeze(-1)) ** 2, dim=-1).sqrt())
        elif stat.startswith("p"):
            out.append(torch.nanquantile(vals, int(stat[1:]) / 100.0, dim=-1))
        elif stat == "slope":  # least-squares trend per second over the frames used
            t = torch.arange(x.shape[-1], device=x.device, dtype=x.dtype) * frame_s
            t = torch.where(mask, t.expand_as(x), torch.full_like(x, float("nan")))
            dt = t - torch.nanmean(t, dim=-1, keepdim=True)
            var_t = torch.nansum(dt**2, dim=-1)
            cov = torch.nansum(dt * (vals - mean.unsqueeze(-1)), dim=-1)
            out.append(torch.where(var_t > 0, cov / var_t.clamp_min(1e-12), torch.zeros_like(cov)))
        else:
            raise ValueError(f"unknown statistic {stat!r}")
    result = torch.stack(out, dim=-1)
    result = torch.where((count > 0).unsqueeze(-1), result, torch.zeros_like(result))
    return torch.nan_to_num(result, nan=0.0, posinf=0.0, neginf=0.0).float()


def utterance_functionals(extractor, waves: torch.Tensor) -> torch.Tensor:
    """``[B, samples]`` float32 at the config's rate -> ``[B, D, 1]`` functionals (``D = num_functionals``).

    ``extractor`` is the calling :class:`~ser_ray.features.extractor.FeatureExtractor` (its mel
    filterbank, dB floor and DCT are the ones every other feature kind uses).
    """
    import librosa

    c = extractor.config
    sr, hop, n_fft = c.sample_rate, c.hop_length, c.n_fft
    frame_s = hop / sr
    power = extractor.power_spectrogram(waves)  # [B, n_fft/2+1, T], centred, |X|^2
    logmel = extractor._power_to_db(extractor.mel.mel_scale(power))  # [B, n_mels, T]
    mfcc = torch.einsum("bmt,mk->bkt", logmel, extractor.dct)
    dmfcc = torchaudio_deltas(mfcc)
    n_frames = logmel.shape[-1]
    valid = valid_frames(waves, hop, n_frames)  # [B, T]

    wave_np = waves.detach().cpu().numpy().astype(np.float32)
    mag = power.detach().cpu().numpy().astype(np.float32) ** 0.5
    rms = librosa.feature.rms(S=mag, frame_length=n_fft)[..., 0, :]  # [B, T]
    loudness = 20.0 * np.log10(np.maximum(rms, 1e-5))
    zcr = librosa.feature.zero_crossing_rate(wave_np, frame_length=n_fft, hop_length=hop, center=True)[..., 0, :]
    centroid = librosa.feature.spectral_centroid(S=mag, sr=sr, n_fft=n_fft)[..., 0, :] / 1000.0
    rolloff = librosa.feature.spectral_rolloff(S=mag, sr=sr, n_fft=n_fft, roll_percent=0.85)[..., 0, :] / 1000.0
    flatness = np.log10(np.maximum(librosa.feature.spectral_flatness(S=mag)[..., 0, :], 1e-10))
    flux = librosa.onset.onset_strength(S=logmel.detach().cpu().numpy(), sr=sr, hop_length=hop, aggregate=np.mean)
    f0 = librosa.yin(wave_np, fmin=F0_MIN, fmax=F0_MAX, sr=sr, frame_length=max(YIN_FRAME, n_fft),
                     hop_length=hop, center=True)
    contours = [loudness, zcr, centroid, rolloff, flux, flatness, 12.0 * np.log2(np.maximum(f0, 1.0) / F0_REF)]
    contours = torch.as_tensor(np.stack([fix_frames(x, n_frames) for x in contours], axis=1), device=waves.device)

    valid_np = valid.cpu().numpy()
    loud_ref = np.where(valid_np, loudness, -np.inf).max(axis=-1, keepdims=True)
    voiced = (valid_np & (loudness > loud_ref + VOICED_MIN_DB) & (fix_frames(zcr, n_frames) < VOICED_MAX_ZCR)
              & (f0 > F0_MIN * 1.05) & (f0 < F0_MAX * 0.95))
    contour_mask = np.repeat(valid_np[:, None, :], len(CONTOURS), axis=1)
    contour_mask[:, CONTOURS.index("f0")] = voiced
    contour_mask = torch.as_tensor(contour_mask, device=waves.device)

    n_valid = valid_np.sum(-1)
    onsets = np.diff(voiced.astype(np.int8), axis=-1, prepend=0) == 1
    duration = n_valid * frame_s
    globals_ = np.stack([voiced.sum(-1) / np.maximum(n_valid, 1),
                         onsets.sum(-1) / np.maximum(duration, frame_s), duration], axis=-1)

    band_mask = valid.unsqueeze(1)
    parts = [
        _masked_stats(x, band_mask.expand_as(x), BAND_STATS, frame_s).flatten(1) for x in (logmel, mfcc, dmfcc)
    ]
    parts.append(_masked_stats(contours, contour_mask, CONTOUR_STATS, frame_s).flatten(1))
    parts.append(torch.as_tensor(globals_, dtype=torch.float32, device=waves.device))
    return torch.cat(parts, dim=1).unsqueeze(-1)


def torchaudio_deltas(x: torch.Tensor) -> torch.Tensor:
    import torchaudio

    return torchaudio.functional.compute_deltas(x, win_length=5)


def fix_frames(x: np.ndarray, n_frames: int) -> np.ndarray:
    """Trim or edge-pad the last axis to ``n_frames`` (librosa and torch framings can differ by one)."""
    if x.shape[-1] >= n_frames:
        return x[..., :n_frames]
    pad = [(0, 0)] * (x.ndim - 1) + [(0, n_frames - x.shape[-1])]
    return np.pad(x, pad, mode="edge")
