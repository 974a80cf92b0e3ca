"""ACRNN-like: log-mel with Δ and ΔΔ as three input channels, a CNN, a BiLSTM and attention pooling.

After Chen et al., "3-D Convolutional Recurrent Neural Networks with Attention Model for Speech
Emotion Recognition" (IEEE SPL 2018): the deltas are computed here from the cached log-mels, so the
family reads the same feature cache as cnn and bigru_attn. Frames of the zero padding that makes a
short clip one window long are left out of the attention pooling, so a 1.5 s clip in a 3 s window
is pooled over its own 1.5 s only.
"""

from __future__ import annotations

import dataclasses

import torch
import torchaudio
from torch import nn

from ser_ray.features.config import FeatureConfig
from ser_ray.models import register


@dataclasses.dataclass
class ACRNNHparams:
    width: int = 32  # channels of the first conv block; the second has twice as many
    hidden: int = 128  # LSTM hidden size per direction
    attn_dim: int = 64  # width of the attention scoring MLP
    dropout: float = 0.3  # before the LSTM and before the head
    deltas: bool = True  # Δ and ΔΔ channels besides the static log-mel
    cmvn: bool = True  # per-utterance normalisation of the static log-mel (over the clip's frames)


@register("acrnn", input_kind="logmel")
class ACRNN(nn.Module):
    """``[B, n_mels, frames]`` -> logits ``[B, num_classes]``."""

    Hparams = ACRNNHparams

    def __init__(self, num_classes: int, feature_config: FeatureConfig, hparams: ACRNNHparams):
        super().__init__()
        self.num_classes = num_classes
        self.hparams = h = hparams
        channels = 3 if h.deltas else 1
        self.conv = nn.Sequential(
            nn.Conv2d(channels, h.width, kernel_size=5, padding=2, bias=False),
            nn.BatchNorm2d(h.width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d((2, 1)),  # frequency only: keep the time resolution for the LSTM
            nn.Conv2d(h.width, 2 * h.width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(2 * h.width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d((2, 2), ceil_mode=True),
        )
        bands = -(-(feature_config.num_channels // 2) // 2)  # after the two frequency poolings
        self.project = nn.Linear(2 * h.width * bands, 2 * h.hidden)
        self.dropout = nn.Dropout(h.dropout)
        self.lstm = nn.LSTM(2 * h.hidden, h.hidden, batch_first=True, bidirectional=True)
        self.score = nn.Sequential(nn.Linear(2 * h.hidden, h.attn_dim), nn.Tanh(), nn.Linear(h.attn_dim, 1))
        self.head = nn.Linear(2 * h.hidden, num_classes)

    @staticmethod
    def frame_mask(x: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` True for frames that are not the clip's trailing padding (log-mel at its floor)."""
        floor = x.amin(dim=(1, 2), keepdim=True)
        active = (x > floor + 1e-3).any(dim=1)  # [B, T]
        idx = torch.arange(x.shape[-1], device=x.device).expand_as(active)
        last = torch.where(active, idx, torch.full_like(idx, -1)).amax(dim=1, keepdim=True)
        mask = idx <= last
        mask[:, 0] = True  # an all-silent clip still has one frame to pool
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.frame_mask(x)
        if self.hparams.cmvn:  # utterance_cmvn over the clip's own frames, not its padding
            x = masked_cmvn(x, mask)
        if self.hparams.deltas:
            d1 = torchaudio.functional.compute_deltas(x)
            x = torch.stack([x, d1, torchaudio.functional.compute_deltas(d1)], dim=1)  # [B, 3, M, T]
        else:
            x = x.unsqueeze(1)
        x = self.conv(x)  # [B, C, M/4, T/2]
        b, c, m, t = x.shape
        x = self.dropout(torch.relu(self.project(x.permute(0, 3, 1, 2).reshape(b, t, c * m))))
        # the frame mask at the LSTM's time resolution (pooled by 2 like the conv); packed sequences
        # keep the backward direction from starting in the padding
        mask = nn.functional.max_pool1d(mask.float().unsqueeze(1), 2, ceil_mode=True).squeeze(1)[:, :t] > 0
        lengths = mask.sum(dim=1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=t)  # [B, T/2, 2H]
        scores = self.score(out).squeeze(-1).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1).unsqueeze(-1)
        return self.head(self.dropout((weights * out).sum(dim=1)))


def masked_cmvn(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``norm.utterance_cmvn`` with statistics over the frames where ``mask [B, T]`` holds: each band
    centred over them, the clip scaled by their std."""
    m = mask.unsqueeze(1).to(x.dtype)  # [B, 1, T]
    n = m.sum(dim=-1, keepdim=True).clamp_min(1.0)
    x = x - (x * m).sum(dim=-1, keepdim=True) / n
    var = ((x * m) ** 2).sum(dim=(1, 2)) / (n.squeeze(-1).squeeze(-1) * x.shape[1])
    return x / var.sqrt().clamp_min(eps).view(-1, 1, 1)
