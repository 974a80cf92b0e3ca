"""SonoNet baseline: a 4-block 2-D CNN over the log-mel image."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ser_ray.features.config import FeatureConfig
from ser_ray.models import register
from ser_ray.models.norm import utterance_cmvn


@dataclasses.dataclass
class CNNHparams:
    width: int = 32  # channels of the first block; each later block doubles them
    dropout: float = 1.0  # scale on the per-block dropouts 0.1, 0.2, 0.3, 0.4
    cmvn: bool = True  # per-utterance normalisation (see norm.utterance_cmvn)


@register("cnn", input_kind="logmel", accepts=("logmel", "mfcc", "zcr_energy"))
class SonoNetCNN(nn.Module):
    """``[B, n_mels, frames]`` -> logits ``[B, num_classes]``.

    Each block: conv 3x3 + ReLU, max-pool 2, batch norm, dropout growing with depth; then global
    average pooling and a linear head, so any window length works.
    """

    Hparams = CNNHparams

    def __init__(self, num_classes: int, feature_config: FeatureConfig, hparams: CNNHparams):
        super().__init__()
        self.num_classes = num_classes
        self.hparams = hparams
        blocks, in_ch = [], 1
        for i in range(4):
            out_ch = hparams.width * 2**i
            blocks += [
                nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),  # ceil: tiny inputs (zcr_energy's 2 rows) still work
                nn.BatchNorm2d(out_ch),
                nn.Dropout(min(0.1 * (i + 1) * hparams.dropout, 0.9)),
            ]
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.cmvn:
            x = utterance_cmvn(x)
        x = self.features(x.unsqueeze(1))  # [B, 1, C, F] -> [B, width*8, C/16, F/16]
        return self.head(x.mean(dim=(-2, -1)))  # global average pool -> [B, num_classes]
