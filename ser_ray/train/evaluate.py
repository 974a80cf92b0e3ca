"""Predictions of a saved model on feature-cache rows: one row per clip with per-label probabilities."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from ser_ray.features.pipeline import features_array

log = logging.getLogger(__name__)

# manifest columns carried into the predictions when present (for per-group metrics)
KEEP_COLUMNS = ("path", "speaker", "gender", "intensity", "sentence")


@torch.inference_mode()
def predict_proba(model: torch.nn.Module, features: np.ndarray, batch_size: int = 64,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Softmax probabilities ``[N, L]`` of ``model`` (eval mode) for features ``[N, C, F]``."""
    model = model.to(device).eval()
    out = []
    for start in range(0, len(features), batch_size):
        x = torch.as_tensor(features[start:start + batch_size], dtype=torch.float32, device=device)
        out.append(torch.softmax(model(x).float(), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def predict(model_dir_or_checkpoint, df: pd.DataFrame, batch_size: int = 64,
            device: str | torch.device | None = None) -> pd.DataFrame:
    """Per clip of ``df`` (feature-cache rows): path, speaker, ..., ``true``, ``pred``, ``prob_<label>``.

    ``model_dir_or_checkpoint`` is a ``save_model`` directory (local or ``s3://``), a
    ``ray.train.Checkpoint`` or a ``TrainResult``. Rows whose features failed (``error`` set) are left
    out. ``true`` is None when ``df`` has no ``emotion`` column.
    """
    from ser_ray.models import load_model

    source = getattr(model_dir_or_checkpoint, "best_checkpoint", model_dir_or_checkpoint)
    if hasattr(source, "as_directory"):  # a ray.train.Checkpoint
        from ser_ray.train.loop import checkpoint_uri

        source = checkpoint_uri(source)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_model(str(source), map_location=device)
    if "error" in df.columns:
        df = df[df["error"].isna()]
    if len(df) == 0:
        raise ValueError("no clips with features to predict")
    features = features_array(df)
    expected = tuple(meta.feature_config.shape)
    if tuple(features.shape[1:]) != expected:
        raise ValueError(
            f"features have shape {features.shape[1:]} but the model at {source} expects {expected} "
            f"({meta.feature_config.kind}); prepare the cache with the model's feature config"
        )
    probs = predict_proba(model, features, batch_size, device)
    out = df[[c for c in KEEP_COLUMNS if c in df.columns]].reset_index(drop=True)
    out["true"] = df["emotion"].to_numpy() if "emotion" in df.columns else None
    out["pred"] = np.asarray(meta.labels)[probs.argmax(axis=1)]
    for i, label in enumerate(meta.labels):
        out[f"prob_{label}"] = probs[:, i].astype(np.float32)
    return out
