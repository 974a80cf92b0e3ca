"""MFCC-CNN: five 1-D conv layers with ELU, max-pool and dropout over MFCC frames, one dense layer."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ser_ray.features.config import FeatureConfig
from ser_ray.models import register
from ser_ray.models.layers import conv1d_block
from ser_ray.models.norm import utterance_cmvn

WIDTHS = (1, 2, 2, 4, 4)  # layer widths as multiples of `width`


@dataclasses.dataclass
class MFCCCNNHparams:
    width: int = 64  # first layer's channels; layers use width * (1, 2, 2, 4, 4)
    kernel: int = 5
    dropout: float = 0.2  # after each conv layer
    cmvn: bool = True  # per-utterance cepstral mean (and scale) normalisation


@register("mfcc_cnn", input_kind="mfcc")
class MFCCCNN(nn.Module):
    """``[B, n_mfcc, frames]`` -> logits ``[B, num_classes]``.

    Each layer: conv1d over time (coefficients as channels) + batch norm + ELU + max-pool 2 +
    dropout after the last one (never feeding batch norm); global average pooling over time and a
    single dense (output) layer.
    """

    Hparams = MFCCCNNHparams

    def __init__(self, num_classes: int, feature_config: FeatureConfig, hparams: MFCCCNNHparams):
        super().__init__()
        self.num_classes = num_classes
        self.hparams = hparams
        layers, in_ch = [], feature_config.num_channels
        for i, mult in enumerate(WIDTHS):
            out_ch = hparams.width * mult
            last = i == len(WIDTHS) - 1  # dropout only where no batch norm follows (see layers.conv1d_block)
            layers.append(conv1d_block(in_ch, out_ch, hparams.kernel, pool=2, stride=2,
                                       dropout=hparams.dropout if last else 0.0, act="elu"))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.cmvn:
            x = utterance_cmvn(x)
        return self.head(self.features(x).mean(dim=-1))  # [B, width*4, T/32] -> [B, num_classes]
