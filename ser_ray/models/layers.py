"""Small building blocks shared by the model-zoo families (conv blocks, attention pooling, chunking)."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU}


def conv1d_block(
    in_ch: int, out_ch: int, kernel: int, pool: int, stride: int, dropout: float = 0.0,
    act: str = "relu", batch_norm: bool = True,
) -> nn.Sequential:
    """Conv1d ('same' padding) -> [BN] -> activation -> max-pool -> [dropout], over ``[B, C, T]``.

    The pool is padded and rounds up, so a short window never shrinks to zero frames. Give ``dropout``
    only to a block that no batch norm follows: a batch norm fed by dropout learns running statistics
    that eval mode never sees (the "variance shift" measured in ``models/cnn.py``).
    """
    layers = [nn.Conv1d(in_ch, out_ch, kernel, padding=kernel // 2)]
    layers += [nn.BatchNorm1d(out_ch)] if batch_norm else []
    layers += [ACTIVATIONS[act](), nn.MaxPool1d(pool, stride, padding=(pool - 1) // 2, ceil_mode=True)]
    layers += [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(*layers)


def conv2d_block(
    in_ch: int, out_ch: int, kernel: int | tuple[int, int] = 3, pool: int | tuple[int, int] = 2,
    dropout: float = 0.0, act: str = "relu",
) -> nn.Sequential:
    """Conv2d ('same' padding) -> BN -> activation -> max-pool (ceil) -> [dropout], over ``[B, C, H, W]``.

    As in ``conv1d_block``, ``dropout`` belongs only on a block that no batch norm follows.
    """
    layers = [
        nn.Conv2d(in_ch, out_ch, kernel, padding="same"),
        nn.BatchNorm2d(out_ch),
        ACTIVATIONS[act](),
        nn.MaxPool2d(pool, ceil_mode=True),
    ]
    layers += [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(*layers)


class AttentionPool(nn.Module):
    """``[B, T, D]`` -> ``[B, D]``: a softmax-over-time weighted sum (the weights come from a small MLP)."""

    def __init__(self, dim: int, attn_dim: int = 64):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Linear(attn_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.score(x), dim=1)  # [B, T, 1]
        return (weights * x).sum(dim=1)


def time_chunks(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, C, T]`` -> ``[B, n, C, L]``: ``n`` evenly spaced, half-overlapping chunks along time.

    Chunk length ``L = 2T / (n + 1)`` (50 % overlap, as the rolling windows of the TD-CNN originals);
    computed from the input, so any window length works.
    """
    t = x.shape[-1]
    length = max(1, min(t, (2 * t) // (n + 1)))
    starts = torch.linspace(0, t - length, n).round().long().tolist()
    return torch.stack([x[..., s : s + length] for s in starts], dim=1)

