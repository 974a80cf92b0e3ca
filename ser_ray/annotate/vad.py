"""Voice activity per window: which windows are worth classifying.

``energy`` (default): a window whose RMS level is below ``threshold_db`` dBFS is non-speech.
``silero``: the Silero VAD model, used only when the ``silero-vad`` package is installed (it is not a
ser-ray dependency). ``none``: every window counts as speech.
"""

from __future__ import annotations

import functools

import numpy as np

METHODS = ("energy", "silero", "none")


def rms_dbfs(wave: np.ndarray) -> float:
    """RMS level in dB relative to full scale (a full-scale sine is about -3 dBFS)."""
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) if wave.size else 0.0
    return 20.0 * np.log10(max(rms, 1e-10))


@functools.lru_cache(maxsize=1)
def _silero():
    try:
        from silero_vad import get_speech_timestamps, load_silero_vad
    except ImportError:
        raise ValueError("vad='silero' needs the silero-vad package (pip install silero-vad)") from None
    return load_silero_vad(), get_speech_timestamps


def is_speech(wave: np.ndarray, method: str = "energy", threshold_db: float = -45.0, sample_rate: int = 16_000) -> bool:
    """Whether a window (its real, unpadded samples) contains speech."""
    if method == "none":
        return True
    if method == "energy":
        return rms_dbfs(wave) >= threshold_db
    if method == "silero":
        import torch

        model, timestamps = _silero()
        return bool(timestamps(torch.from_numpy(np.ascontiguousarray(wave)), model, sampling_rate=sample_rate))
    raise ValueError(f"unknown VAD method {method!r}; choose one of {METHODS}")
