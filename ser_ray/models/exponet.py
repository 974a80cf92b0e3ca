"""ExpoNet: a 1-D CNN over frame energy and the log-mel bands.

The original reads ZCR ‖ energy ‖ flattened mel. One ``FeatureConfig`` gives one feature kind, so
this version takes log-mel input and derives what a log-mel can honestly give: the frame energy
(log of the summed mel power) as an extra row next to the mel bands. ZCR cannot be recovered from
a mel spectrogram and is left out; the spectral shape it tracks is in the mel bands themselves.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ser_ray.features.config import FeatureConfig
from ser_ray.models import register
from ser_ray.models.layers import conv1d_block
from ser_ray.models.norm import utterance_cmvn

DB = 10.0 / math.log(10.0)  # dB = DB * ln(power)
WIDTHS = (1, 2, 4, 4, 8)  # block widths as multiples of `width`


@dataclasses.dataclass
class ExpoNetHparams:
    width: int = 32  # first block's channels; blocks use width * (1, 2, 4, 4, 8)
    kernel: int = 5
    dense: int = 512
    dropout: float = 0.3  # after each block and before the head
    energy: bool = True  # add the frame-energy row
    cmvn: bool = True  # per-utterance normalisation (see norm.utterance_cmvn)


@register("exponet", input_kind="logmel")
class ExpoNet(nn.Module):
    """``[B, n_mels, frames]`` -> logits ``[B, num_classes]``.

    Five blocks of conv1d (bands as channels) + batch norm + ReLU + max-pool 2 (dropout after the last
    block only, where no batch norm follows), global average pooling over time, dense 512, output
    layer. The mel bands are conv channels rather than one flattened vector, so the model works for
    any window length.
    """

    Hparams = ExpoNetHparams

    def __init__(self, num_classes: int, feature_config: FeatureConfig, hparams: ExpoNetHparams):
        super().__init__()
        self.num_classes = num_classes
        self.hparams = hparams
        blocks, in_ch = [], feature_config.num_channels + int(hparams.energy)
        for i, mult in enumerate(WIDTHS):
            out_ch = hparams.width * mult
            last = i == len(WIDTHS) - 1  # dropout only where no batch norm follows (see layers.conv1d_block)
            blocks.append(conv1d_block(in_ch, out_ch, hparams.kernel, pool=2, stride=2,
                                       dropout=hparams.dropout if last else 0.0))
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Linear(in_ch, hparams.dense),
            nn.ReLU(),
            nn.Dropout(hparams.dropout),
            nn.Linear(hparams.dense, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.energy:
            # frame energy in dB: log of the summed mel power (from the dB bands)
            energy = DB * torch.logsumexp(x / DB, dim=1, keepdim=True)
            x = torch.cat([x, energy], dim=1)  # [B, n_mels + 1, T]
        if self.hparams.cmvn:
            x = utterance_cmvn(x)
        x = self.features(x)  # [B, width*8, T/32]
        return self.head(x.mean(dim=-1))
