"""Decode, downmix, resample and pad/trim audio: the one way audio enters ser-ray."""

from __future__ import annotations

import functools
import io

import numpy as np
import soundfile as sf
import torch
import torchaudio

from ser_ray import storage


class AudioError(ValueError):
    """An input that is not usable audio; the message names the input and the cause."""


def decode_audio(data: bytes, name: str = "<bytes>") -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC/OGG (and MP3 where libsndfile can) to float32 ``[channels, samples]``."""
    if not data:
        raise AudioError(f"{name}: empty file (0 bytes)")
    try:
        audio, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for bad input
        # LibsndfileError's str() names the BytesIO object; its error_string is the cause alone.
        cause = getattr(exc, "error_string", None) or str(exc)
        raise AudioError(f"{name}: not a readable audio file (soundfile: {cause})") from None
    if audio.shape[0] == 0:
        raise AudioError(f"{name}: audio has no samples")
    return np.ascontiguousarray(audio.T), int(sample_rate)


def to_mono(audio: np.ndarray) -> np.ndarray:
    """``[channels, samples]`` or ``[samples]`` -> ``[samples]`` by averaging channels."""
    return audio if audio.ndim == 1 else audio.mean(axis=0)


@functools.lru_cache(maxsize=16)
def _resampler(orig_sr: int, target_sr: int) -> torchaudio.transforms.Resample:
    # Building the sinc kernel costs more than applying it (15 ms for 22.05 -> 16 kHz), so keep it.
    return torchaudio.transforms.Resample(orig_sr, target_sr)


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited sinc resampling (torchaudio); a no-op at the target rate."""
    if orig_sr == target_sr:
        return wave.astype(np.float32, copy=False)
    with torch.inference_mode():
        out = _resampler(int(orig_sr), int(target_sr))(
            torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
        )
    return out.numpy()


def fix_length(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """Zero-pad at the end or trim the end to exactly ``num_samples`` (librosa's ``fix_length``)."""
    if wave.shape[-1] >= num_samples:
        return wave[..., :num_samples]
    pad = [(0, 0)] * (wave.ndim - 1) + [(0, num_samples - wave.shape[-1])]
    return np.pad(wave, pad)


def normalize(wave: np.ndarray, mode: str) -> np.ndarray:
    """``none``, ``peak`` (max |x| = 1) or ``rms`` (RMS = 0.1): loudness differs between speakers."""
    if mode == "none":
        return wave
    if mode == "peak":
        scale = np.abs(wave).max()
        return wave / scale if scale > 0 else wave
    if mode == "rms":
        rms = float(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))
        return (wave * (0.1 / rms)).astype(np.float32) if rms > 0 else wave
    raise ValueError(f"unknown normalisation {mode!r}; choose none, peak or rms")


def load_clip(uri: str, sample_rate: int = 16_000) -> np.ndarray:
    """Read a local path or ``s3://`` URI and return mono float32 audio at ``sample_rate``."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise AudioError(f"{uri}: file not found") from None
    audio, sr = decode_audio(data, uri)
    return resample(to_mono(audio), sr, sample_rate)
