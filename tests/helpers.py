"""Helpers shared by the model and augmentation tests (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors on a shared 2-core machine: a second intra-op thread only adds contention
    (a CNN step takes seconds instead of milliseconds when the cores are busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_steps(model, x, y, steps: int = 3, params=None) -> list[float]:
    """``steps`` AdamW steps on one batch; the losses (``params``: parameter groups, default all)."""
    model.train()
    opt = torch.optim.AdamW(params if params is not None else model.parameters(), 1e-3)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
