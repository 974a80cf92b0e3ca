"""DummyNet: a plain 1-D CNN over frame-level ZCR / energy (or log-mel) contours."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ser_ray.features.config import FeatureConfig
from ser_ray.models import register
from ser_ray.models.layers import conv1d_block
from ser_ray.models.norm import row_standardise, utterance_cmvn

ROWS = {"zcr": [0], "energy": [1], "both": [0, 1]}  # rows of a zcr_energy feature


@dataclasses.dataclass
class DummyNetHparams:
    channels: str = "both"  # zcr | energy | both: which zcr_energy rows to read (ignored for logmel)
    width: int = 512  # the first two conv layers; the third has width // 4 (512-512-128)
    dense: int = 256  # the hidden dense layer
    dropout: float = 0.3  # before each dense layer
    cmvn: bool = True  # per-utterance normalisation


@register("dummynet", input_kind="zcr_energy", accepts=("zcr_energy", "logmel"))
class DummyNet(nn.Module):
    """``[B, C, frames]`` -> logits ``[B, num_classes]``.

    Three conv layers (kernel 5, ReLU, max-pool 5 / stride 2), flatten, two dense layers. The input
    rows are the conv channels: ZCR and/or RMS energy for ``zcr_energy`` features; for ``logmel``
    the mel bands (a 1-D CNN over time; the original's flattened log-mel mixes band and time in one
    axis, which a 1-D conv over bands-as-channels sees without the arbitrary band-to-band seams).
    The flatten ties the model to its feature config's window length, as in the original.
    Normalisation: each ZCR/energy row standardised per clip (loudness-free); log-mel per-clip CMVN.
    """

    Hparams = DummyNetHparams

    def __init__(self, num_classes: int, feature_config: FeatureConfig, hparams: DummyNetHparams):
        super().__init__()
        if hparams.channels not in ROWS:
            raise ValueError(f"dummynet: channels={hparams.channels!r}; choose zcr, energy or both")
        self.num_classes = num_classes
        self.hparams = hparams
        self.kind = feature_config.kind
        self.rows = ROWS[hparams.channels] if self.kind == "zcr_energy" else None
        in_ch = len(self.rows) if self.rows else feature_config.num_channels
        w = hparams.width
        self.features = nn.Sequential(
            conv1d_block(in_ch, w, 5, pool=5, stride=2, batch_norm=False),
            conv1d_block(w, w, 5, pool=5, stride=2, batch_norm=False),
            conv1d_block(w, w // 4, 5, pool=5, stride=2, batch_norm=False),
        )
        with torch.no_grad():  # flattened size for this window length
            flat = self.features(torch.zeros(1, in_ch, feature_config.num_frames)).numel()
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(hparams.dropout),
            nn.Linear(flat, hparams.dense),
            nn.ReLU(),
            nn.Dropout(hparams.dropout),
            nn.Linear(hparams.dense, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            x = x[:, self.rows]
            x = row_standardise(x) if self.hparams.cmvn else x
        elif self.hparams.cmvn:
            x = utterance_cmvn(x)
        return self.head(self.features(x))  # [B, C, T] -> [B, width/4, ~T/8] -> [B, num_classes]
