"""Stacked bidirectional GRU over log-mel frames with self-attention pooling."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ser_ray.features.config import FeatureConfig
from ser_ray.models import register
from ser_ray.models.norm import utterance_cmvn


@dataclasses.dataclass
class BiGRUAttnHparams:
    hidden: int = 128  # GRU hidden size per direction
    layers: int = 3
    attn_dim: int = 128  # width of the attention scoring MLP
    dropout: float = 0.3  # between GRU layers and before the head
    cmvn: bool = True  # per-utterance normalisation (see norm.utterance_cmvn)


@register("bigru_attn", input_kind="logmel", accepts=("logmel", "mfcc", "zcr_energy"))
class BiGRUAttn(nn.Module):
    """``[B, n_mels, frames]`` -> logits ``[B, num_classes]``.

    A scoring MLP gives each frame a weight (softmax over time); the clip vector is the weighted
    sum of the GRU outputs, so emotional frames count more than silence.
    """

    Hparams = BiGRUAttnHparams

    def __init__(self, num_classes: int, feature_config: FeatureConfig, hparams: BiGRUAttnHparams):
        super().__init__()
        self.num_classes = num_classes
        self.hparams = hparams
        h = hparams
        self.gru = nn.GRU(
            input_size=feature_config.num_channels,
            hidden_size=h.hidden,
            num_layers=h.layers,
            batch_first=True,
            bidirectional=True,
            dropout=h.dropout if h.layers > 1 else 0.0,
        )
        self.score = nn.Sequential(nn.Linear(2 * h.hidden, h.attn_dim), nn.Tanh(), nn.Linear(h.attn_dim, 1))
        self.dropout = nn.Dropout(h.dropout)
        self.head = nn.Linear(2 * h.hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.cmvn:
            x = utterance_cmvn(x)
        out, _ = self.gru(x.transpose(1, 2))  # [B, C, T] -> [B, T, C] -> [B, T, 2H]
        weights = torch.softmax(self.score(out), dim=1)  # [B, T, 1], sums to 1 over time
        context = (weights * out).sum(dim=1)  # [B, 2H]
        return self.head(self.dropout(context))
