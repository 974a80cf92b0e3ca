"""Decode, downmix, resample and pad/trim audio: the one way audio enters ser-ray."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from ser_ray import storage


class AudioError(ValueError):
    """An input that is not usable audio (the file's fault: retrying will not help).

    The message names the input and the cause; ``code`` is a fixed identifier of the cause
    (``empty``, ``not_audio``, ``no_samples``, ``sample_rate``, ``channels``, ``bad_samples``,
    ``too_long``, ``too_large``, ``decode_failed``, ``not_found``, ``not_a_file``, ``model_output``)
    that the ``error_code`` column carries, for filtering without parsing messages.
    """

    def __init__(self, message: str, code: str = "not_audio"):
        super().__init__(message)
        self.code = code


MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 4_000, 384_000  # Hz: telephone speech to studio masters
MAX_ABS_SAMPLE = 64.0  # float audio is nominally within ±1; a little headroom, nothing absurd


def soundfile_cause(exc: BaseException) -> str:
    """libsndfile's own reason for a failed open or read; ``str(exc)`` would name the Python file or
    buffer object (an internal detail that does not belong in a row or an HTTP answer)."""
    return getattr(exc, "error_string", None) or type(exc).__name__


def decode_audio(data: bytes, name: str = "<bytes>") -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC/OGG (and MP3 where libsndfile can) to float32 ``[channels, samples]``."""
    if not data:
        raise AudioError(f"{name}: empty file (0 bytes)", "empty")
    try:
        audio, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for bad input
        raise AudioError(f"{name}: not a readable audio file (soundfile: {soundfile_cause(exc)})") from None
    if audio.shape[0] == 0:
        raise AudioError(f"{name}: audio has no samples", "no_samples")
    check_sample_rate(sample_rate, name)
    check_samples(audio, name)
    return np.ascontiguousarray(audio.T), int(sample_rate)


def check_sample_rate(sample_rate: int, name: str) -> None:
    """Refuse rates no real recording has: a tiny rate turns a few bytes into hours of windows."""
    if not MIN_SAMPLE_RATE <= int(sample_rate) <= MAX_SAMPLE_RATE:
        raise AudioError(f"{name}: sample rate {int(sample_rate)} Hz is outside {MIN_SAMPLE_RATE}–{MAX_SAMPLE_RATE} Hz",
                         "sample_rate")


def check_samples(audio: np.ndarray, name: str) -> None:
    """Refuse NaN, infinite and absurdly large samples (float files can hold them): they would turn
    loud audio into "silence" or make every probability NaN."""
    if not np.isfinite(audio).all():
        raise AudioError(f"{name}: audio contains NaN or infinite samples", "bad_samples")
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak > MAX_ABS_SAMPLE:
        raise AudioError(f"{name}: sample values reach {peak:.3g}; audio is expected within ±1 (at most ±{MAX_ABS_SAMPLE:g})",
                         "bad_samples")


def to_mono(audio: np.ndarray) -> np.ndarray:
    """``[channels, samples]`` or ``[samples]`` -> ``[samples]`` by averaging channels."""
    if audio.ndim == 1:
        return audio
    return audio[0] if audio.shape[0] == 1 else audio.mean(axis=0)  # one channel: no copy


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling with soxr (high quality, what ``librosa.load`` uses); a no-op at the
    target rate. soxr's polyphase filters cost the same whatever the two rates' gcd (torchaudio's sinc
    kernel grows with ``rate / gcd``: a header claiming 16,001 Hz made it allocate gigabytes), and
    nothing is cached between calls."""
    import soxr

    if orig_sr == target_sr:
        return wave.astype(np.float32, copy=False)
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if wave.ndim == 1:
        return soxr.resample(wave, int(orig_sr), int(target_sr), quality="HQ").astype(np.float32, copy=False)
    # soxr reads [samples, channels]
    return np.ascontiguousarray(soxr.resample(wave.T, int(orig_sr), int(target_sr), quality="HQ").T, dtype=np.float32)


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
        raise AudioError(f"{uri}: file not found", "not_found") from None
    audio, sr = decode_audio(data, uri)
    return resample(to_mono(audio), sr, sample_rate)
