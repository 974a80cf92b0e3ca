"""RezoNet: a lightweight 2-D CNN with rectangular kernels over a 40-band log-mel spectrogram.

After Anjum et al., "Deep-Net: A Lightweight CNN-Based Speech Emotion Recognition System Using Deep
Frequency Features" (Sensors 2022): a few conv blocks whose kernels are long along one axis, so early
layers see whole formant regions (tall kernels) and later ones longer spans of time (wide kernels).
Its features are 40 mels with a 512-sample window and a 10 ms hop (``family_feature_config``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ser_ray.features.config import FeatureConfig
from ser_ray.models import register
from ser_ray.models.layers import conv2d_block
from ser_ray.models.norm import utterance_cmvn


@dataclasses.dataclass
class RezoNetHparams:
    width: int = 16  # channels of the first block; doubled in the second and third
    freq_kernel: int = 9  # height of the first block's (freq x 3) kernel
    time_kernel: int = 9  # width of the second block's (3 x time) kernel
    dropout: float = 0.3  # after each block and before the head
    cmvn: bool = True  # per-utterance normalisation (see norm.utterance_cmvn)


@register("rezonet", input_kind="logmel", features={"n_mels": 40, "n_fft": 512, "hop_length": 160})
class RezoNet(nn.Module):
    """``[B, 40, frames]`` -> logits ``[B, num_classes]``.

    Blocks: (freq_kernel x 3) -> (3 x time_kernel) -> (3 x 3), each with batch norm, ReLU and max-pool;
    global average pooling; dropout and one dense layer. Any mel count / window length works.
    """

    Hparams = RezoNetHparams

    def __init__(self, num_classes: int, feature_config: FeatureConfig, hparams: RezoNetHparams):
        super().__init__()
        self.num_classes = num_classes
        self.hparams = hparams
        w, d = hparams.width, hparams.dropout
        self.features = nn.Sequential(
            conv2d_block(1, w, (hparams.freq_kernel, 3), pool=2),
            conv2d_block(w, 2 * w, (3, hparams.time_kernel), pool=2),
            conv2d_block(2 * w, 4 * w, 3, pool=2),
        )
        self.head = nn.Sequential(nn.Dropout(d), nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.cmvn:
            x = utterance_cmvn(x)
        x = self.features(x.unsqueeze(1))  # [B, 1, mels, T] -> [B, 4w, mels/8, T/8]
        return self.head(x.mean(dim=(-2, -1)))
