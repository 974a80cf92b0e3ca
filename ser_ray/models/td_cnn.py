"""Time-distributed CNN + (Bi)LSTM: one small 2-D CNN applied to each of 7 chunks of the log-mel.

After the time-distributed CNN-LSTM of the multimodal-emotion-recognition projects: the spectrogram
is cut into half-overlapping chunks, the same CNN turns every chunk into a vector, and an LSTM reads
the sequence of chunk vectors. ``td_cnn_lstm`` classifies from the LSTM's last state;
``td_cnn_bilstm_attn`` uses a bidirectional LSTM and attention pooling over the chunks.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ser_ray.features.config import FeatureConfig
from ser_ray.models import register
from ser_ray.models.layers import AttentionPool, conv2d_block, time_chunks
from ser_ray.models.norm import utterance_cmvn


@dataclasses.dataclass
class TDCNNHparams:
    chunks: int = 7  # half-overlapping time chunks
    width: int = 32  # CNN channels: width, width, 2*width, 2*width over four blocks
    hidden: int = 128  # LSTM hidden size (per direction)
    attn_dim: int = 64  # attention MLP width (td_cnn_bilstm_attn only)
    dropout: float = 0.3  # in the CNN blocks and before the head
    cmvn: bool = True  # per-utterance normalisation over the whole clip (see norm.utterance_cmvn)


class _TDCNN(nn.Module):
    """``[B, n_mels, frames]`` -> logits ``[B, num_classes]`` (shared by the two registered families)."""

    Hparams = TDCNNHparams
    bidirectional = False

    def __init__(self, num_classes: int, feature_config: FeatureConfig, hparams: TDCNNHparams):
        super().__init__()
        if hparams.chunks < 2:
            raise ValueError(f"{self.family}: chunks={hparams.chunks}; use at least 2")
        self.num_classes = num_classes
        self.hparams = hparams
        w, d = hparams.width, hparams.dropout
        self.cnn = nn.Sequential(
            conv2d_block(1, w, 3, pool=2, act="elu"),
            conv2d_block(w, w, 3, pool=2, act="elu"),
            conv2d_block(w, 2 * w, 3, pool=2, act="elu"),
            conv2d_block(2 * w, 2 * w, 3, pool=2, act="elu"),
        )
        self.lstm = nn.LSTM(2 * w, hparams.hidden, batch_first=True, bidirectional=self.bidirectional)
        out = hparams.hidden * (2 if self.bidirectional else 1)
        self.pool = AttentionPool(out, hparams.attn_dim) if self.bidirectional else None
        self.head = nn.Sequential(nn.Dropout(d), nn.Linear(out, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.cmvn:
            x = utterance_cmvn(x)
        chunks = time_chunks(x, self.hparams.chunks)  # [B, n, mels, L]
        b, n = chunks.shape[:2]
        z = self.cnn(chunks.flatten(0, 1).unsqueeze(1))  # [B*n, 1, mels, L] -> [B*n, 2w, mels/16, L/16]
        z = z.mean(dim=(-2, -1)).view(b, n, -1)  # [B, n, 2w]
        out, _ = self.lstm(z)  # [B, n, H or 2H]
        pooled = self.pool(out) if self.pool is not None else out[:, -1]
        return self.head(pooled)


@register("td_cnn_lstm", input_kind="logmel")
class TDCNNLSTM(_TDCNN):
    """Chunk CNN -> unidirectional LSTM -> last state -> dense."""


@register("td_cnn_bilstm_attn", input_kind="logmel")
class TDCNNBiLSTMAttn(_TDCNN):
    """Chunk CNN -> bidirectional LSTM -> attention pooling over chunks -> dense."""

    bidirectional = True
