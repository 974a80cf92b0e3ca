"""Bag of audio words (``boaw``): a classical family over MFCC frames instead of utterance statistics.

Each frame's MFCCs with their deltas and delta-deltas (60 numbers) are standardised and counted against
a codebook of "audio words" learnt by k-means from the training clips' frames (no labels); a clip
becomes a histogram of how often each word is among its frames' ``assignments`` nearest words,
``log(1 + 100 · count / frames)``, and a class-balanced logistic regression (``logreg``'s fitting, inner
CV and calibration) reads it. Where functionals summarise every descriptor over the whole clip, a
histogram keeps which spectral shapes occur together in one frame, so its errors differ from the
functional members' (what an ensemble needs). One codebook's words depend on its k-means seed, and so
did UA on EmoDB (0.72–0.76 for three seeds), so ``codebooks`` codebooks from different seeds are
counted side by side. The inner cross-validation that chooses ``C`` learns the codebooks again inside
each inner fold (``learns_encoder``), from that fold's training speakers only.

Frames below the middle of the clip's c0 range (c0: the MFCC that follows the frame's level) are left
out: the zero padding that makes a clip one window long and pauses. The rule only compares a clip's
frames with each other, so it gives the same frames after speaker or recording standardisation.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torchaudio.functional import compute_deltas

from ser_ray.features.config import FeatureConfig
from ser_ray.models import register
from ser_ray.models.classical import FUNCTIONALS, LogisticRegressionModel, mean_scale

DELTA_WIDTH = 9  # frames in the delta regression (librosa.feature.delta's default width)
ENCODE_BATCH = 64  # clips per cdist call while fitting (frames x words distances stay ~80 MB)


@dataclasses.dataclass
class BoAWHparams:
    codebook_size: int = 1000  # audio words per codebook
    assignments: int = 20  # each frame counts for its this many nearest words
    codebooks: int = 3  # codebooks from different k-means seeds, their histograms side by side
    max_frames: int = 100_000  # training frames (a random sample) k-means learns each codebook from
    C: float | None = None  # inverse L2 strength of the logistic regression; None: chosen by inner CV
    class_weight: str = "balanced"  # balanced | none


@register("boaw", input_kind="mfcc", features=FUNCTIONALS)
class BagOfAudioWordsModel(LogisticRegressionModel):
    """Codebook histograms of MFCC + Δ + ΔΔ frames, then multinomial logistic regression."""

    Hparams = BoAWHparams
    learns_encoder = True

    def __init__(self, num_classes: int, feature_config: FeatureConfig, hparams: BoAWHparams):
        if min(hparams.codebook_size, hparams.assignments, hparams.codebooks) < 1 or \
                hparams.assignments > hparams.codebook_size:
            raise ValueError(f"boaw: need 1 <= assignments ({hparams.assignments}) <= codebook_size "
                             f"({hparams.codebook_size}) and codebooks >= 1 ({hparams.codebooks})")
        super().__init__(num_classes, feature_config, hparams)
        self.n_mfcc = feature_config.n_mfcc
        dim = 3 * self.n_mfcc
        self.register_buffer("frame_mean", torch.zeros(dim))
        self.register_buffer("frame_scale", torch.ones(dim))
        self.register_buffer("codebook", torch.zeros(hparams.codebooks, hparams.codebook_size, dim))

    @staticmethod
    def encoded_size(feature_config: FeatureConfig, hparams: BoAWHparams) -> int:
        return hparams.codebooks * hparams.codebook_size

    def frames(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MFCCs ``[B, n_mfcc, T]`` -> frame descriptors ``[B, T, 3·n_mfcc]`` and the frames counted ``[B, T]``."""
        if x.ndim != 3 or x.shape[1] != self.n_mfcc:
            raise ValueError(f"boaw reads MFCCs [batch, {self.n_mfcc}, frames], got {tuple(x.shape)}")
        x = x.float()
        delta = compute_deltas(x, win_length=DELTA_WIDTH)
        frames = torch.cat([x, delta, compute_deltas(delta, win_length=DELTA_WIDTH)], dim=1).transpose(1, 2)
        c0 = x[:, 0]
        middle = (c0.amin(dim=1, keepdim=True) + c0.amax(dim=1, keepdim=True)) / 2
        return frames, c0 >= middle

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        frames, counted = self.frames(x)
        z = (frames - self.frame_mean) / self.frame_scale
        weight = counted.float().unsqueeze(-1).expand(-1, -1, self.hparams.assignments).flatten(1)
        histograms = []
        for words in self.codebook:
            nearest = torch.cdist(z, words.expand(len(z), -1, -1)).topk(self.hparams.assignments, largest=False).indices
            counts = torch.zeros(len(z), len(words), device=z.device).scatter_add_(1, nearest.flatten(1), weight)
            histograms.append(counts)
        frequency = torch.cat(histograms, dim=1) / counted.sum(dim=1, keepdim=True).clamp(min=1)
        return torch.log1p(100.0 * frequency)

    def encode_array(self, x: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        return torch.cat([self.encode(x[i:i + ENCODE_BATCH]) for i in range(0, len(x), ENCODE_BATCH)]).double().numpy()

    def fit_encoder(self, x: np.ndarray) -> None:
        """The frame standardiser and the codebooks, from the counted frames of the training clips."""
        from sklearn.cluster import MiniBatchKMeans

        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        frames = []
        for i in range(0, len(x), ENCODE_BATCH):
            chunk, counted = self.frames(x[i:i + ENCODE_BATCH])
            frames.append(chunk[counted])
        frames = torch.cat(frames).double().numpy()
        hp = self.hparams
        if len(frames) < hp.codebook_size:
            raise ValueError(f"boaw: {len(frames)} training frames cannot make {hp.codebook_size} audio words; "
                             "lower codebook_size")
        mean, scale = mean_scale(frames)
        sample = frames
        if len(sample) > hp.max_frames:
            sample = sample[np.random.default_rng(0).choice(len(sample), hp.max_frames, replace=False)]
        # float32 halves k-means' time (the words are stored and used in float32 anyway)
        sample = ((sample - mean) / scale).astype(np.float32)
        for seed in range(hp.codebooks):
            kmeans = MiniBatchKMeans(hp.codebook_size, random_state=seed, n_init=1, batch_size=4096).fit(sample)
            self.codebook[seed] = torch.as_tensor(kmeans.cluster_centers_, dtype=torch.float32)
        self.frame_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.frame_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
