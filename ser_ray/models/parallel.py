"""Parallel two-branch models: a 2-D CNN over the log-mel image beside a sequence model over its frames.

``par_cnn_bilstm_attn``: the sequence branch is a BiLSTM with attention pooling.
``par_cnn_transformer``: it is a Transformer encoder (``nn.TransformerEncoder``) with mean pooling,
after the parallel CNN + Transformer of "Parallel is all you want" (the frames are max-pooled 2x in
frequency and 4x in time first, as there; no positional encoding, as there).
The two branch vectors are concatenated and a dense layer gives the logits.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ser_ray.features.config import FeatureConfig
from ser_ray.models import register
from ser_ray.models.layers import AttentionPool, conv2d_block
from ser_ray.models.norm import utterance_cmvn


def cnn_branch(width: int) -> nn.Sequential:
    """``[B, 1, mels, T]`` -> ``[B, 4 * width]``: three conv blocks and global average pooling.

    No dropout inside (it would feed batch norm); the models put it before their heads.
    """
    return nn.Sequential(
        conv2d_block(1, width, 3, pool=2),
        conv2d_block(width, 2 * width, 3, pool=4),
        conv2d_block(2 * width, 4 * width, 3, pool=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


@dataclasses.dataclass
class ParBiLSTMHparams:
    width: int = 16  # CNN branch: width, 2*width, 4*width channels
    hidden: int = 128  # LSTM hidden size per direction
    layers: int = 1  # LSTM layers
    attn_dim: int = 64
    dropout: float = 0.3
    cmvn: bool = True  # per-utterance normalisation (see norm.utterance_cmvn)


@register("par_cnn_bilstm_attn", input_kind="logmel")
class ParCNNBiLSTMAttn(nn.Module):
    """``[B, n_mels, frames]`` -> logits: CNN branch ‖ BiLSTM-attention branch -> dense."""

    Hparams = ParBiLSTMHparams

    def __init__(self, num_classes: int, feature_config: FeatureConfig, hparams: ParBiLSTMHparams):
        super().__init__()
        self.num_classes = num_classes
        self.hparams = hparams
        h = hparams
        self.cnn = cnn_branch(h.width)
        self.lstm = nn.LSTM(
            feature_config.num_channels, h.hidden, num_layers=h.layers, batch_first=True,
            bidirectional=True, dropout=h.dropout if h.layers > 1 else 0.0,
        )
        self.pool = AttentionPool(2 * h.hidden, h.attn_dim)
        self.head = nn.Sequential(nn.Dropout(h.dropout), nn.Linear(4 * h.width + 2 * h.hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.cmvn:
            x = utterance_cmvn(x)
        image = self.cnn(x.unsqueeze(1))  # [B, 4w]
        seq, _ = self.lstm(x.transpose(1, 2))  # [B, T, mels] -> [B, T, 2H]
        return self.head(torch.cat([image, self.pool(seq)], dim=1))


@dataclasses.dataclass
class ParTransformerHparams:
    width: int = 16  # CNN branch: width, 2*width, 4*width channels
    d_model: int = 64  # Transformer width (pooled mel bands are projected to it)
    heads: int = 4
    layers: int = 4
    ff_dim: int = 512
    dropout: float = 0.3
    cmvn: bool = True  # per-utterance normalisation (see norm.utterance_cmvn)


@register("par_cnn_transformer", input_kind="logmel")
class ParCNNTransformer(nn.Module):
    """``[B, n_mels, frames]`` -> logits: CNN branch ‖ Transformer-encoder branch -> dense."""

    Hparams = ParTransformerHparams

    def __init__(self, num_classes: int, feature_config: FeatureConfig, hparams: ParTransformerHparams):
        super().__init__()
        h = hparams
        if h.d_model % h.heads:
            raise ValueError(f"par_cnn_transformer: d_model={h.d_model} must be divisible by heads={h.heads}")
        self.num_classes = num_classes
        self.hparams = hparams
        self.cnn = cnn_branch(h.width)
        self.shrink = nn.MaxPool2d((2, 4), ceil_mode=True)  # [mels, T] -> [mels/2, T/4]
        self.project = nn.Linear((feature_config.num_channels + 1) // 2, h.d_model)
        layer = nn.TransformerEncoderLayer(h.d_model, h.heads, h.ff_dim, h.dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, h.layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Dropout(h.dropout), nn.Linear(4 * h.width + h.d_model, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.cmvn:
            x = utterance_cmvn(x)
        image = self.cnn(x.unsqueeze(1))  # [B, 4w]
        seq = self.project(self.shrink(x).transpose(1, 2))  # [B, T/4, mels/2] -> [B, T/4, d_model]
        seq = self.encoder(seq).mean(dim=1)  # [B, d_model]
        return self.head(torch.cat([image, seq], dim=1))
