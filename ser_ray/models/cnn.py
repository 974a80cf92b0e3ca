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
    dropout: float = 0.4  # before the head (see the class docstring for why not inside the blocks)
    cmvn: bool = True  # per-utterance normalisation (see norm.utterance_cmvn)


@register("cnn", input_kind="logmel", accepts=("logmel", "mfcc", "zcr_energy"))
class SonoNetCNN(nn.Module):
    """``[B, n_mels, frames]`` -> logits ``[B, num_classes]``.

    Each block: conv 3x3, batch norm, ReLU, max-pool 2; then global average pooling, dropout and a
    linear head, so any window length works. SonoNet puts dropout growing with depth after each
    block's batch norm, feeding the next block's batch norm: its running statistics then describe
    dropped-out activations that eval mode never sees (the dropout/BN "variance shift"). Measured
    here on EmoDB: held-out accuracy 0.30 in eval mode vs 0.61 once the statistics were recomputed
    without dropout. So dropout sits before the head only.
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
                nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),  # ceil: tiny inputs (zcr_energy's 2 rows) still work
            ]
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(min(hparams.dropout, 0.9))
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.cmvn:
            x = utterance_cmvn(x)
        x = self.features(x.unsqueeze(1))  # [B, 1, C, F] -> [B, width*8, C/16, F/16]
        return self.head(self.dropout(x.mean(dim=(-2, -1))))  # global average pool -> [B, num_classes]
