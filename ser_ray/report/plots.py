"""Figures for result directories: confusion matrices and learning curves (matplotlib, Agg)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on workers or servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path | str:
    """Lay out, write (creating the folder, or under an ``s3://`` prefix) and close a figure: every
    ser-ray PNG goes through here."""
    from ser_ray import storage

    fig.tight_layout()
    if storage.is_s3(str(path)):
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=dpi, format="png")
        plt.close(fig)
        storage.write_bytes(str(path), buffer.getvalue())
        return str(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_confusion(cm, labels: list[str], path: str | Path, normalize: bool = True, title: str | None = None) -> Path:
    """Write a ``[true][pred]`` confusion matrix as a PNG; ``normalize`` shows each row as recall."""
    cm = np.asarray(cm, dtype=np.float64)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    size = 1.0 + 0.75 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or ("confusion (row-normalised)" if normalize else "confusion (counts)"))
    threshold = shown.max() / 2 if shown.size else 0
    for i in range(shown.shape[0]):
        for j in range(shown.shape[1]):
            text = f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if shown[i, j] > threshold else "black")
    return save_figure(fig, path)


def plot_learning_curves(history: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Train loss, val loss (left) and val UA (right) per epoch from a training history."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, ua_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss_ax.plot(epochs, [h.get("train_loss") for h in history], marker="o", label="train loss")
    loss_ax.plot(epochs, [h.get("val_loss") for h in history], marker="o", label="val loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.legend()
    ua_ax.plot(epochs, [h.get("val_ua") for h in history], marker="o", color="tab:green", label="val UA")
    if history and "train_acc" in history[0]:
        ua_ax.plot(epochs, [h.get("train_acc") for h in history], marker=".", color="tab:gray", label="train acc")
    ua_ax.set_xlabel("epoch")
    ua_ax.set_ylim(0, 1)
    ua_ax.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
