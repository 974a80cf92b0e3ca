"""The typed, hashable feature configuration shared by training, evaluation, Serve and annotation."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Literal

FeatureKind = Literal["logmel", "mfcc", "zcr_energy", "waveform", "functionals"]
FEATURE_KINDS = ("logmel", "mfcc", "zcr_energy", "waveform", "functionals")
LEVEL_NORMALISATIONS = ("none", "peak", "rms")  # waveform level before features
MIN_SPEED, MAX_SPEED = 0.5, 2.0  # speed perturbation beyond this no longer sounds like speech


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """How a clip becomes model input. Defaults are the SonoNet log-mel settings.

    ``waveform`` keeps the fixed-length 16 kHz window itself (``[1, samples]``): wav2vec2 reads it,
    and training can compute log-mels from it on the fly after waveform-domain augmentation.
    ``functionals`` is one named vector of utterance statistics per clip (``[D, 1]``, see
    ``ser_ray.features.functionals``), read by the classical families.
    """

    kind: FeatureKind = "logmel"
    sample_rate: int = 16_000
    window_s: float = 3.0
    n_mels: int = 128
    n_fft: int = 2048
    hop_length: int = 512
    n_mfcc: int = 40
    top_db: float | None = 80.0
    # Waveform level normalisation before features: none | peak | rms.
    normalize: str = "none"
    # Playback speed of the audio before features: 1.0 for every model input. Other values make the
    # speed-perturbed training copies (``data.speed_perturb``): 0.9 plays 10 % slower, its pitch and
    # formants 10 % lower, like a slower speaker with a longer vocal tract.
    speed: float = 1.0

    def __post_init__(self):
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"unknown feature kind {self.kind!r}; choose one of {list(FEATURE_KINDS)}")
        if self.normalize not in LEVEL_NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalize!r}; choose one of {list(LEVEL_NORMALISATIONS)}")
        if not MIN_SPEED <= self.speed <= MAX_SPEED:
            raise ValueError(f"speed {self.speed}: choose a playback speed within [{MIN_SPEED}, {MAX_SPEED}]")

    @property
    def num_samples(self) -> int:
        return int(round(self.window_s * self.sample_rate))

    @property
    def num_frames(self) -> int:
        if self.kind == "waveform":
            return self.num_samples
        if self.kind == "functionals":
            return 1
        # centred STFT frames, as librosa and torchaudio (center=True) produce
        return 1 + self.num_samples // self.hop_length

    @property
    def num_channels(self) -> int:
        """Feature rows per frame: mel bands, MFCCs, 2 (ZCR, energy), 1 (the waveform itself) or the
        number of utterance functionals."""
        if self.kind == "functionals":
            from ser_ray.features.functionals import num_functionals

            return num_functionals(self.n_mels, self.n_mfcc)
        return {"logmel": self.n_mels, "mfcc": self.n_mfcc, "zcr_energy": 2, "waveform": 1}[self.kind]

    def feature_names(self) -> list[str] | None:
        """Names of the feature rows of ``functionals`` (what a classical model weighs); None otherwise."""
        if self.kind != "functionals":
            return None
        from ser_ray.features.functionals import functional_names

        return functional_names(self.n_mels, self.n_mfcc)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_channels, self.num_frames)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown feature config keys: {sorted(unknown)}")
        return cls(**data)

    def key(self) -> str:
        """A short stable hash, used to key feature caches (``speed`` 1.0 leaves it as it was before
        speed existed, so older caches stay valid)."""
        data = self.to_dict()
        if data["speed"] == 1.0:
            del data["speed"]
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
