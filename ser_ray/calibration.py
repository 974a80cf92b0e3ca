"""Calibration by likelihood: the temperature of a softmax, and the negative log-likelihood it minimises.

Used by classical models (their logit scale, out of fold) and by ensembles (each member's temperature
on validation data); kept below both so neither imports the other.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

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
