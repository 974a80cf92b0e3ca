"""Calibration by likelihood: the temperature of a softmax, the negative log-likelihood it minimises,
and the simplex weights of a mixture of calibrated members.

Used by classical models (their logit scale, out of fold) and by ensembles (each member's temperature
on validation data); kept below both so neither imports the other.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax, softmax

_EPS = 1e-12


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], _EPS, None))))


def fit_temperature(logits: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` (searched over ``log T``)."""
    logits = np.asarray(logits, dtype=np.float64)

    def loss(log_t: float) -> float:
        return float(-np.mean(log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(y)), y]))

    res = minimize_scalar(loss, bounds=tuple(np.log(bounds)), method="bounded")
    return float(np.exp(res.x))


def label_ids(values: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the bundle labels {list(labels)}; apply the label map first")
    return np.array([index[v] for v in values], dtype=np.int64)


def fit_weights(member_probs: Sequence[np.ndarray], y: np.ndarray) -> np.ndarray:
    """Simplex weights minimising the NLL of ``sum_k w_k * probs_k`` (``w = softmax(theta)``)."""
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in member_probs])  # [K, N, L]
    picked = stack[:, np.arange(len(y)), y]  # [K, N]: each member's probability of the truth
    if len(stack) == 1:
        return np.ones(1)

    def loss(theta):
        w = softmax(theta)
        mix = np.clip(w @ picked, _EPS, None)
        value = -np.mean(np.log(mix))
        # d/dtheta via the softmax Jacobian: dL/dw_k = -mean(picked_k / mix)
        grad_w = -(picked / mix).mean(axis=1)
        return value, w * (grad_w - w @ grad_w)

    res = minimize(loss, np.zeros(len(stack)), jac=True, method="L-BFGS-B")
    return softmax(res.x)


def choose_weights(member_probs: Sequence[np.ndarray], y: np.ndarray, groups=None) -> tuple[np.ndarray, str]:
    """Mixture weights and how they were chosen: ``"fitted"`` (:func:`fit_weights`) or ``"equal"``.

    Fitted weights follow the held-out data they were fitted on, noise included. With ``groups`` (the
    speaker of each row) spanning three or more speakers, the two are compared by leave-one-speaker-out
    likelihood — weights fitted on the other speakers, scored on the one left out — and equal weights
    are kept unless fitted ones score better there. Otherwise (one or two speakers) fitted weights.
    """
    fitted = fit_weights(member_probs, y)
    k = len(member_probs)
    if k == 1 or groups is None:
        return fitted, "fitted"
    groups = np.asarray(groups)
    speakers = np.unique(groups)
    if len(speakers) < 3:
        return fitted, "fitted"
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in member_probs])  # [K, N, L]
    loss_fitted = loss_equal = 0.0
    for speaker in speakers:
        held = groups == speaker
        w = fit_weights(list(stack[:, ~held]), y[~held])
        loss_fitted += nll(np.tensordot(w, stack[:, held], axes=1), y[held]) * held.sum()
        loss_equal += nll(stack[:, held].mean(axis=0), y[held]) * held.sum()
    return (fitted, "fitted") if loss_fitted < loss_equal else (np.full(k, 1.0 / k), "equal")
