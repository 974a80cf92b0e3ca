"""Classification metrics as plain dicts (JSON-ready): UA, WA, macro-F1, per class, confusion.

UA (unweighted accuracy) is the mean per-class recall (sklearn's balanced accuracy), the usual
headline number for emotion recognition because corpora are unbalanced; WA is plain accuracy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)


def classification_metrics(y_true, y_pred, labels: list[str]) -> dict:
    """UA, WA, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    ``y_true``/``y_pred`` hold label names or integer ids (indices into ``labels``). The confusion
    matrix is ``[true][pred]`` in ``labels`` order. UA averages recall over the classes present in
    ``y_true`` (a class absent from a held-out speaker does not count as 0).
    """
    labels = list(labels)
    y_true, y_pred = _as_ids(y_true, labels), _as_ids(y_pred, labels)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("no predictions to score")
    ids = list(range(len(labels)))
    cm = confusion_matrix(y_true, y_pred, labels=ids)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, zero_division=0
    )
    present = support > 0
    return {
        "ua": float(recall[present].mean()),
        "wa": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=np.flatnonzero(present), average="macro", zero_division=0)),
        "n": int(len(y_true)),
        "labels": labels,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion": cm.tolist(),
    }


def scores_from_confusion(cm) -> dict:
    """UA, WA and macro-F1 from a ``[true][pred]`` confusion matrix (used inside the training loop).

    Same conventions as :func:`classification_metrics`: classes absent from the true labels are
    left out of UA and macro-F1.
    """
    cm = np.asarray(cm, dtype=np.float64)
    support, predicted, hits = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    present = support > 0
    if not present.any():
        return {"ua": 0.0, "wa": 0.0, "macro_f1": 0.0}
    recall = hits / np.maximum(support, 1)
    precision = hits / np.maximum(predicted, 1)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return {
        "ua": float(recall[present].mean()),
        "wa": float(hits.sum() / cm.sum()),
        "macro_f1": float(f1[present].mean()),
    }


def _as_ids(values, labels: list[str]) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not in the label list {labels}")
    return np.array([index[str(v)] for v in values], dtype=np.int64)


def metrics_by_group(df: pd.DataFrame, group_col: str, true_col: str = "true", pred_col: str = "pred") -> dict:
    """Accuracy (and count) per value of ``group_col``, e.g. per intensity or per speaker."""
    if group_col not in df.columns:
        raise ValueError(f"no column {group_col!r} to group by; columns are {list(df.columns)}")
    out = {}
    for value, group in df.groupby(group_col, sort=True):
        out[str(value)] = {"accuracy": float((group[true_col] == group[pred_col]).mean()), "n": int(len(group))}
    return out


def summarize_folds(fold_metrics: list[dict], keys: tuple[str, ...] = ("ua", "wa", "macro_f1")) -> dict:
    """``{key: {"mean", "std", "values"}}`` over folds (std is the population std over folds)."""
    if not fold_metrics:
        raise ValueError("no fold metrics to summarize")
    out = {}
    for key in keys:
        values = np.array([float(m[key]) for m in fold_metrics])
        out[key] = {"mean": float(values.mean()), "std": float(values.std()), "values": values.tolist()}
    return out


def expected_calibration_error(probs, y, n_bins: int = 15) -> float:
    """ECE: the support-weighted gap between confidence and accuracy over equal-width confidence bins.

    ``probs`` is ``[N, L]`` (rows sum to 1), ``y`` the true class ids.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y)
    if probs.ndim != 2 or len(probs) != len(y):
        raise ValueError(f"probs must be [N, L] with N = len(y); got {probs.shape} and {len(y)}")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    # right-closed bins: (0, 1/n], (1/n, 2/n], ...; a confidence of exactly 0 cannot occur
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)
