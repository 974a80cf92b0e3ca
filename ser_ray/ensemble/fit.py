"""Fit an ensemble on validation data: one temperature per member, then weights over the simplex.

Both minimise validation negative log-likelihood: the temperature ``T`` of each member on its own
(``softmax(logits / T)``, searched over ``log T``), then the mixture weights with the temperatures
fixed (softmax-parametrised so they stay on the simplex), with ``scipy.optimize.minimize``.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.special import softmax

from ser_ray import storage
from ser_ray.audio.decode import fix_length, load_clip, resample, to_mono
# ensemble callers import these from here too
from ser_ray.calibration import choose_weights, fit_temperature, fit_weights, label_ids, nll  # noqa: F401
from ser_ray.ensemble.bundle import Bundle, Member

log = logging.getLogger(__name__)


# -- data -------------------------------------------------------------------------------------
def windows_from_frame(df: pd.DataFrame, sample_rate: int = 16_000, window_s: float = 3.0, workers: int = 4) -> np.ndarray:
    """Fixed windows ``[N, samples]`` (mono, ``sample_rate``, padded/trimmed) for each row.

    Rows carry either ``wave`` (array) with ``sample_rate`` or ``path`` (local or ``s3://``). No
    waveform normalisation here: each member applies its own in ``Bundle.member_logits``.
    """
    n = int(round(sample_rate * window_s))
    if "wave" in df:
        rates = df["sample_rate"] if "sample_rate" in df else [sample_rate] * len(df)
        waves = [resample(to_mono(np.asarray(w, np.float32)), int(sr), sample_rate) for w, sr in zip(df["wave"], rates)]
    elif "path" in df:
        with ThreadPoolExecutor(workers) as pool:
            waves = list(pool.map(lambda p: load_clip(p, sample_rate), df["path"]))
    else:
        raise ValueError("the validation frame needs a `wave` or a `path` column")
    if not waves:
        return np.zeros((0, n), np.float32)
    return np.stack([fix_length(w, n) for w in waves]).astype(np.float32)


# -- fitting ----------------------------------------------------------------------------------
def scores(probs: np.ndarray, y: np.ndarray, labels: Sequence[str]) -> dict:
    """UA, WA, macro-F1, ECE, NLL and the ``[true][pred]`` confusion matrix of probabilities against
    true class ids."""
    from ser_ray.train.metrics import classification_metrics, expected_calibration_error

    m = classification_metrics(y, probs.argmax(axis=1), list(labels))
    return {
        "ua": m["ua"],
        "wa": m["wa"],
        "macro_f1": m["macro_f1"],
        "ece": expected_calibration_error(probs, y),
        "nll": nll(probs, y),
        "n": int(len(y)),
        "confusion": m["confusion"],
    }


def member_logits_all(bundle: Bundle, waves: np.ndarray, batch: int = 64, groups=None) -> list[np.ndarray]:
    """Every member's logits for ``waves``; a bundle trained on speaker-normalised features
    standardises each group of ``groups`` (the speaker of each window) with its own statistics."""
    if bundle.normalise_by != "none":
        if groups is None:
            raise ValueError("a bundle trained on speaker-normalised features needs each window's speaker")
        groups = np.asarray(groups).astype(str)
        out = [np.zeros((len(waves), len(bundle.labels)), np.float32) for _ in bundle.members]
        for group in np.unique(groups):
            idx = np.flatnonzero(groups == group)
            for k, lg in enumerate(bundle.logits_from_features(bundle.features(waves[idx]), standardise=True)):
                out[k][idx] = lg
        return out
    return [
        np.concatenate([bundle.member_logits(i, waves[s : s + batch]) for s in range(0, max(len(waves), 1), batch)])
        for i in range(len(bundle.members))
    ]


def fit_ensemble(bundle: Bundle, val_waves: np.ndarray, val_y: np.ndarray, groups=None) -> dict:
    """Set every member's temperature and weight in place from validation data; returns the
    validation report (members before/after calibration and the ensemble)."""
    logits = member_logits_all(bundle, val_waves, groups=groups)
    report = {"members": {}}
    for m, lg in zip(bundle.members, logits):
        raw = scores(softmax(lg, axis=1), val_y, bundle.labels)
        m.temperature = fit_temperature(lg, val_y)
        cal = scores(softmax(lg / m.temperature, axis=1), val_y, bundle.labels)
        report["members"][m.name] = {"uncalibrated": raw, "calibrated": cal, "temperature": m.temperature}
        m.metrics = {"validation": cal, "temperature": m.temperature}
    # fitted or equal weights, whichever predicts left-out validation speakers better (calibration.py)
    weights, report["weighting"] = choose_weights(
        [softmax(lg / m.temperature, axis=1) for m, lg in zip(bundle.members, logits)], val_y, groups)
    for m, w in zip(bundle.members, weights):
        m.weight = float(w)
    report["weights"] = {m.name: m.weight for m in bundle.members}
    report["ensemble"] = scores(bundle.combine(logits), val_y, bundle.labels)
    uniform = np.mean([softmax(lg / m.temperature, axis=1) for m, lg in zip(bundle.members, logits)], axis=0)
    report["uniform_ensemble"] = scores(uniform, val_y, bundle.labels)
    return report


def evaluate_bundle(bundle: Bundle, waves: np.ndarray, y: np.ndarray, groups=None) -> dict:
    """Members (calibrated) and the ensemble on held-out data."""
    logits = member_logits_all(bundle, waves, groups=groups)
    out = {
        "members": {
            m.name: scores(softmax(lg / m.temperature, axis=1), y, bundle.labels)
            for m, lg in zip(bundle.members, logits)
        }
    }
    out["ensemble"] = scores(bundle.combine(logits), y, bundle.labels)
    return out


# -- from checkpoints -------------------------------------------------------------------------
def resolve_model_dir(path: str) -> str:
    """A checkpoint or result directory -> the directory holding ``model.json``."""
    for candidate in (path, storage.join(path, "model")):
        if storage.exists(storage.join(candidate, "model.json")):
            return candidate
    raise FileNotFoundError(f"{path}: no model.json here or in {path}/model; is it a saved model or checkpoint?")


def members_from_dirs(model_dirs: Sequence[str], device: str = "cpu") -> tuple[list[Member], list[str], str]:
    """Load each model dir as a member (weight 1, temperature 1); all must share labels and the input
    normalisation they were trained with (``model.json`` ``extra.normalise_by``), which is returned."""
    from ser_ray.models import load_model

    members, labels, modes = [], None, set()
    for path in model_dirs:
        model, meta = load_model(resolve_model_dir(path), map_location=device)
        modes.add(meta.extra.get("normalise_by", "none"))
        if len(modes) > 1:
            raise ValueError(f"{path}: trained with normalise_by {meta.extra.get('normalise_by', 'none')!r}, unlike "
                             "the models before it; a bundle's members must share their input normalisation")
        if labels is None:
            labels = list(meta.labels)
        elif list(meta.labels) != labels:
            raise ValueError(f"{path}: labels {meta.labels} differ from the first model's {labels}")
        name = meta.family
        k = 2
        while name in {m.name for m in members}:
            name, k = f"{meta.family}_{k}", k + 1
        members.append(Member(meta.family, model, meta.feature_config, name=name, hparams=meta.hparams))
    if not members:
        raise ValueError("no model directories given")
    return members, labels, modes.pop()


def fit_bundle_from_dirs(
    model_dirs: Sequence[str],
    val_df: pd.DataFrame,
    test_df: pd.DataFrame | None = None,
    *,
    device: str = "cpu",
    data_summary: dict | None = None,
) -> tuple[Bundle, dict]:
    """Load the models, fit temperatures and weights on ``val_df``, evaluate on ``test_df``.

    Frames have an ``emotion`` column (bundle labels) and ``path`` or ``wave`` (see
    ``windows_from_frame``). Returns the bundle (not yet saved) and the metrics report.
    """
    members, labels, normalise_by = members_from_dirs(model_dirs, device)
    fc = members[0].feature_config
    bundle = Bundle(labels, members, sample_rate=fc.sample_rate, window_s=fc.window_s,
                    data_summary=dict(data_summary or {}), device=device, normalise_by=normalise_by)

    def prepare(df):
        df = df[df["emotion"].isin(labels)]
        groups = df["speaker"].to_numpy() if "speaker" in df else None
        return windows_from_frame(df, bundle.sample_rate, bundle.window_s), label_ids(df["emotion"], labels), groups

    val_w, val_y, val_g = prepare(val_df)
    if len(val_y) == 0:
        raise ValueError(f"no validation rows with labels in {labels}")
    log.info("fitting temperatures and weights of %d members on %d validation windows", len(members), len(val_y))
    report = {"labels": labels, "normalise_by": normalise_by, "validation": fit_ensemble(bundle, val_w, val_y, val_g)}
    if test_df is not None and len(test_df):
        test_w, test_y, test_g = prepare(test_df)
        report["test"] = evaluate_bundle(bundle, test_w, test_y, test_g)
        for m in bundle.members:
            m.metrics["test"] = report["test"]["members"][m.name]
    bundle.data_summary.setdefault("n_validation", int(len(val_y)))
    if "test" in report:
        bundle.data_summary.setdefault("n_test", int(report["test"]["ensemble"]["n"]))
    return bundle, report
