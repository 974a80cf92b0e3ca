"""Self-training of a per-fold classical ensemble on each test speaker's unlabelled clips.

Speaker-adaptive evaluation (``normalise_by: speaker``) already reads a test speaker's clips, without
their labels, to standardise them. Self-training takes the same clips one step further: the ensemble
labels them, the clips it labels with confidence at least ``threshold`` join the training rows with
those labels, every member is refitted with the setting its inner cross-validation chose, and the
refitted ensemble labels the speaker's clips again. Test labels are never read.

Members may read different features (functionals, boaw's MFCC frames): every ``x`` below is a
sequence with one array per member, rows in the same order, of the member's encodings
(:func:`encodings`: what its classifier reads, made once because every refit reads the same rows).

The threshold (or none: no self-training) is chosen per fold on the training speakers alone: each
inner fold's held-out speakers are self-trained one at a time from their out-of-fold ensemble
probabilities, exactly as a test speaker is, and the setting with the best out-of-fold UA wins (ties:
no self-training, then the higher threshold). Only classical members refit in seconds, so only
ensembles of classical members self-train.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy.special import softmax

THRESHOLDS = (0.5, 0.7, 0.9)  # ensemble probability a pseudo-label needs
INNER_FOLDS = 5  # as the members' own inner cross-validation


@dataclasses.dataclass
class Member:
    """A fitted classical model and the temperature the ensemble applies to its log-probabilities."""

    model: object  # a ser_ray.models.classical._ClassicalModel after fit_arrays
    temperature: float = 1.0


Features = Sequence[np.ndarray]  # one array per member, rows aligned


def encodings(members: Sequence[Member], features: Features) -> list[np.ndarray]:
    """Each member's encoding (``encode_array``) of its own features of the same rows."""
    _check_per_member(members, features)
    return [m.model.encode_array(a) for m, a in zip(members, features)]


def rows(x: Features, index) -> list[np.ndarray]:
    """The same rows of every member's features."""
    return [a[index] for a in x]


def _check_per_member(members: Sequence[Member], *xs: Features) -> None:
    for x in xs:
        if isinstance(x, np.ndarray) or len(x) != len(members):
            raise ValueError(f"{len(members)} member(s) need one feature array each, got "
                             f"{'one array' if isinstance(x, np.ndarray) else len(x)}")


def mixture(members: Sequence[Member], weights: np.ndarray, x_fit: Features, y_fit, x_pred: Features, *,
            final: bool = True) -> np.ndarray:
    """The ensemble's probabilities for ``x_pred`` with every member refitted on ``(x_fit, y_fit)``."""
    _check_per_member(members, x_fit, x_pred)
    probs = [softmax(m.model.refit_logits(fit, y_fit, pred, final=final) / m.temperature, axis=1)
             for m, fit, pred in zip(members, x_fit, x_pred)]
    return np.tensordot(np.asarray(weights, dtype=np.float64), np.stack(probs), axes=1)


def self_train_group(members: Sequence[Member], weights: np.ndarray, x_train: Features, y_train: np.ndarray,
                     x_group: Features, group_probs: np.ndarray, threshold: float, *,
                     final: bool = True) -> tuple[np.ndarray, int]:
    """One group (a speaker's clips): the ensemble refitted on the training rows plus the group's clips
    whose probability ``group_probs`` reaches ``threshold`` (labelled with their argmax); returns its
    probabilities for the whole group and how many clips were pseudo-labelled."""
    _check_per_member(members, x_train, x_group)
    keep = group_probs.max(axis=1) >= threshold
    if not keep.any():
        return group_probs, 0
    x_fit = [np.concatenate([train, group[keep]]) for train, group in zip(x_train, x_group)]
    y_fit = np.concatenate([y_train, group_probs.argmax(axis=1)[keep]])
    return mixture(members, weights, x_fit, y_fit, x_group, final=final), int(keep.sum())


def self_train_speakers(members: Sequence[Member], weights: np.ndarray, x_train: Features, y_train: np.ndarray,
                        x: Features, speakers: np.ndarray, probs: np.ndarray, threshold: float, *,
                        final: bool = True) -> tuple[np.ndarray, int]:
    """:func:`self_train_group` for each speaker of ``x`` on its own; the probabilities of all rows and
    how many clips were pseudo-labelled in all."""
    out = np.array(probs, dtype=np.float64, copy=True)
    speakers = np.asarray(speakers).astype(str)
    pseudo = 0
    for speaker in np.unique(speakers):
        index = np.flatnonzero(speakers == speaker)
        out[index], n = self_train_group(members, weights, x_train, y_train, rows(x, index), probs[index], threshold,
                                         final=final)
        pseudo += n
    return out, pseudo


@dataclasses.dataclass
class Copies:
    """Speed-perturbed copies of training rows (``data.speed_perturb``): each member's encodings, labels
    and speakers. Every refit of a training set trains on the copies of that set's speakers too, as the
    members' own fits did."""

    x: Features
    y: np.ndarray
    speakers: np.ndarray

    def joined(self, x: Features, y: np.ndarray, speakers: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """``(x, y)`` with the copies of ``speakers`` appended."""
        keep = np.isin(np.asarray(self.speakers).astype(str), np.asarray(speakers).astype(str))
        return [np.concatenate([a, c[keep]]) for a, c in zip(x, self.x)], np.concatenate([y, self.y[keep]])


def _with_copies(copies: Copies | None, x: Features, y: np.ndarray, speakers: np.ndarray):
    return (list(x), y) if copies is None else copies.joined(x, y, speakers)


def choose_threshold(members: Sequence[Member], weights: np.ndarray, x: Features, y: np.ndarray,
                     speakers: np.ndarray, oof_probs: np.ndarray,
                     thresholds: Sequence[float] = THRESHOLDS, copies: Copies | None = None) -> tuple[float | None, dict]:
    """The threshold (None: no self-training) with the best out-of-fold UA on the training rows.

    ``oof_probs`` are the ensemble's out-of-fold probabilities of the training rows ``x, y`` (each
    predicted by members that never saw its speaker). For each threshold, every inner fold's held-out
    speakers are self-trained one at a time (members refitted on the inner fold's training rows) and
    the UA over all rows is compared with the UA of ``oof_probs``. Returns ``(threshold, {"none": ua,
    "0.5": ua, ...})``.
    """
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold

    speakers = np.asarray(speakers).astype(str)
    scores = {"none": float(balanced_accuracy_score(y, oof_probs.argmax(1)))}
    n_groups = len(np.unique(speakers))
    if n_groups < 2:
        return None, scores
    splits = list(GroupKFold(n_splits=min(INNER_FOLDS, n_groups)).split(y, y, speakers))
    for threshold in thresholds:
        probs = oof_probs.copy()
        for fit_idx, held_idx in splits:
            x_fit, y_fit = _with_copies(copies, rows(x, fit_idx), y[fit_idx], speakers[fit_idx])
            probs[held_idx], _ = self_train_speakers(members, weights, x_fit, y_fit, rows(x, held_idx),
                                                     speakers[held_idx], oof_probs[held_idx], threshold, final=False)
        scores[str(threshold)] = float(balanced_accuracy_score(y, probs.argmax(1)))
    # ties: no self-training first, then the higher (more cautious) threshold
    order = [None] + sorted(thresholds, reverse=True)
    best = max(order, key=lambda t: (scores["none" if t is None else str(t)], -order.index(t)))
    return best, scores


def self_train_fold(members: Sequence[Member], weights: np.ndarray, x_train: Features, y_train: np.ndarray,
                    train_speakers: np.ndarray, oof_probs: np.ndarray, x_test: Features,
                    test_speakers: np.ndarray, test_probs: np.ndarray,
                    thresholds: Sequence[float] = THRESHOLDS, copies: Copies | None = None) -> tuple[np.ndarray, dict]:
    """A fold's test probabilities after self-training on each test speaker's clips (the threshold
    chosen on the training speakers by :func:`choose_threshold`), and what was done. ``copies``: the
    training rows' speed-perturbed copies, trained on by every refit."""
    threshold, scores = choose_threshold(members, weights, x_train, y_train, train_speakers, oof_probs, thresholds,
                                         copies=copies)
    out, pseudo = np.asarray(test_probs, dtype=np.float64), 0
    if threshold is not None:
        x_fit, y_fit = _with_copies(copies, x_train, y_train, train_speakers)
        out, pseudo = self_train_speakers(members, weights, x_fit, y_fit, x_test, test_speakers, test_probs,
                                          threshold)
    return out, {"threshold": threshold, "inner_ua": scores, "pseudo_labelled": pseudo}
