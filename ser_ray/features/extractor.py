"""The one feature extractor: batched, torch-based, on CPU or CUDA.

Training, evaluation, Ray Serve and offline annotation all call ``FeatureExtractor``; nothing else in
ser-ray computes features. Results are per clip: a clip's features never depend on what else is in
its batch (the dB floor is taken per clip, unlike ``torchaudio.transforms.AmplitudeToDB`` on a batch).
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio

from ser_ray.audio.decode import fix_length, normalize, resample, to_mono
from ser_ray.features.config import FeatureConfig
from ser_ray.features.functionals import utterance_functionals

AMIN = 1e-10  # librosa.power_to_db's floor


class FeatureExtractor:
    """Waveforms ``[B, samples]`` at ``config.sample_rate`` -> features ``[B, channels, frames]``."""

    def __init__(self, config: FeatureConfig = FeatureConfig(), device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        c = config
        # Same settings as librosa.feature.melspectrogram's defaults (Slaney mel scale and norm,
        # zero padding when centring), so features match the seed code. The spectrogram is kept
        # complex and squared as re² + im²: torch's |z|² of a complex tensor (what power=2 does) costs
        # as much as the FFT itself.
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=c.sample_rate,
            n_fft=c.n_fft,
            hop_length=c.hop_length,
            n_mels=c.n_mels,
            center=True,
            pad_mode="constant",
            power=None,
            norm="slaney",
            mel_scale="slaney",
        ).to(self.device)
        if c.kind in ("mfcc", "functionals"):
            self.dct = torchaudio.functional.create_dct(c.n_mfcc, c.n_mels, norm="ortho").to(self.device)

    # -- waveform preparation -------------------------------------------------------------------
    def prepare_wave(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """Decoded audio (any rate, mono or ``[channels, samples]``) -> fixed-length mono window.

        A config ``speed`` other than 1 plays the audio that much faster (speed perturbation): read as
        if recorded at ``speed`` times its rate, then resampled, so tempo, pitch and formants all move."""
        rate = int(round(sample_rate * self.config.speed))
        wave = resample(to_mono(audio), rate, self.config.sample_rate)
        return fix_length(normalize(wave, self.config.normalize), self.config.num_samples)

    # -- features -------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, waves: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.extract(waves).cpu().numpy()

    def extract(self, waves: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Features as a float32 tensor on ``self.device``; also usable inside a model's forward."""
        x = torch.as_tensor(waves, dtype=torch.float32).to(self.device)
        if x.ndim == 1:
            x = x.unsqueeze(0)
        kind = self.config.kind
        if kind == "waveform":
            return x.unsqueeze(1)
        if kind == "zcr_energy":
            return self._zcr_energy(x)
        if kind == "functionals":
            return utterance_functionals(self, x)
        logmel = self._power_to_db(self.mel.mel_scale(self.power_spectrogram(x)))
        if kind == "logmel":
            return logmel
        return torch.einsum("bmt,mk->bkt", logmel, self.dct)

    def power_spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        """``|STFT|²`` ``[B, n_fft/2+1, frames]`` (centred, Hann window)."""
        spec = self.mel.spectrogram(x)
        return spec.real.square().addcmul_(spec.imag, spec.imag)

    def _power_to_db(self, power: torch.Tensor) -> torch.Tensor:
        db = 10.0 * torch.log10(torch.clamp(power, min=AMIN))
        if self.config.top_db is not None:
            floor = db.amax(dim=(-2, -1), keepdim=True) - self.config.top_db
            db = torch.maximum(db, floor)
        return db

    def _zcr_energy(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-crossing rate and RMS energy per frame (librosa's centred framing)."""
        n_fft, hop = self.config.n_fft, self.config.hop_length
        padded = torch.nn.functional.pad(x, (n_fft // 2, n_fft // 2))
        frames = padded.unfold(-1, n_fft, hop)  # [B, frames, n_fft]
        signs = torch.signbit(frames)
        zcr = (signs[..., 1:] != signs[..., :-1]).float().mean(-1)
        rms = frames.pow(2).mean(-1).sqrt()
        return torch.stack([zcr, rms], dim=1)
