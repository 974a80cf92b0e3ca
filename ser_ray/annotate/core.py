"""``annotate_file``: the one per-file annotation function (offline Ray Data actors and Serve call it).

A file becomes one ``files`` row (uri, status, error, duration, dominant label, per-label mean
probabilities, segment counts, the feature normalisation used) and one ``segments`` row per speech
window. Bad input never raises: it becomes a ``files`` row with ``status="error"``, an ``error_code`` and
a message saying what is wrong. Failures that are not the file's fault (S3 throttling, a dropped
connection, permission denied, a full disk) are retried with backoff and, if they persist, give
``status="retry"``: the writer does not count such a row as done, so the next run tries the file again.
Messages are fixed texts naming the file; the underlying exception goes to the log only.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
import time
from typing import Callable, Sequence

import numpy as np
import soundfile as sf

from ser_ray import storage
from ser_ray.annotate.vad import METHODS, is_speech
from ser_ray.annotate.windows import Opener, audio_info, file_size, iter_windows, open_audio, open_source
from ser_ray.audio.decode import AudioError, soundfile_cause

log = logging.getLogger(__name__)

PredictProba = Callable[[np.ndarray], np.ndarray]  # windows [N, samples] at 16 kHz -> probs [N, L]
NORMALISE_BY = ("auto", "none", "file")


@dataclasses.dataclass(frozen=True)
class AnnotateConfig:
    window_s: float = 3.0
    hop_s: float = 1.5
    vad: str = "energy"  # energy | silero | none
    vad_threshold_db: float = -45.0  # energy VAD: windows quieter than this (dBFS) are skipped
    batch_size: int = 32  # windows per predict_proba call
    max_file_mb: float = 4096.0  # larger inputs get an error row instead of being read
    # longer recordings get an error row before any window is read (a few KB of FLAC can hold hours)
    max_duration_s: float | None = None
    # windows one file may make (a tiny hop_s over a long file multiplies the model work)
    max_windows: int | None = 20_000
    sample_rate: int = 16_000
    labels: tuple[str, ...] = ()  # empty: taken from ``predict_proba.__self__.labels`` (a Bundle)
    # none | file | auto: file standardises each member's features over the recording's own speech
    # windows (for bundles trained with normalise_by: speaker); auto follows the bundle
    normalise_by: str = "auto"
    # storage failures (throttling, network, permission) are tried this many times per file, with
    # backoff from retry_backoff_s, before the file gets a status="retry" row
    io_attempts: int = 3
    retry_backoff_s: float = 0.5
    # auto: each member as an ONNX Runtime session (CPU) or TorchScript trace where its logits stay equal;
    # Bundle.optimise_for_inference); eager, torchscript, onnx: that form (eager where it fails)
    backend: str = "auto"

    def __post_init__(self):
        from ser_ray.ensemble.runtime import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r}: choose one of {list(BACKENDS)}")
        if self.normalise_by not in NORMALISE_BY:
            raise ValueError(f"normalise_by {self.normalise_by!r}: choose one of {list(NORMALISE_BY)}")
        if self.window_s <= 0 or self.hop_s <= 0:
            raise ValueError(f"window_s and hop_s must be positive, got {self.window_s}, {self.hop_s}")
        if self.vad not in METHODS:
            raise ValueError(f"unknown VAD method {self.vad!r}; choose one of {METHODS}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def with_labels(self, labels: Sequence[str]) -> "AnnotateConfig":
        return dataclasses.replace(self, labels=tuple(labels))


def _labels(predict_proba: PredictProba, config: AnnotateConfig) -> list[str]:
    if config.labels:
        return list(config.labels)
    owner = getattr(predict_proba, "__self__", None)
    if owner is not None and getattr(owner, "labels", None):
        return list(owner.labels)
    raise ValueError("annotate_file needs the labels: set AnnotateConfig(labels=...) or pass Bundle.predict_proba")


def resolve_normalisation(config: AnnotateConfig, trained: str) -> AnnotateConfig:
    """``config`` with ``normalise_by`` settled for a bundle trained with ``trained`` (``none`` or
    ``speaker``; ``auto`` follows it); a mode the members were not trained for is refused, since it
    would label silently wrong."""
    wanted = config.normalise_by
    if wanted == "auto":
        wanted = "none" if trained == "none" else "file"
    if (wanted == "file") != (trained != "none"):
        raise ValueError(
            f"normalise_by {wanted!r} does not fit this bundle: its members were trained with normalise_by "
            f"{trained!r}; use " + ("'file'" if trained != "none" else "'none'") + " (or 'auto')")
    return dataclasses.replace(config, normalise_by=wanted)


def file_row(uri: str, labels: Sequence[str], **values) -> dict:
    """A ``files`` row with every column present (None/NaN where unknown), in a fixed order."""
    row = {"uri": uri, "status": "ok", "error": None, "duration_s": float("nan"), "label": None}
    row.update({f"prob_{label}": float("nan") for label in labels})
    row.update({"n_segments": 0, "n_windows": 0, "normalise_by": None, "error_code": None})
    row.update(values)
    return row


class WindowBudget:
    """Windows that several files (one ``/annotate`` request) may make together; thread-safe.

    Each file takes its count from the header, before any window is read; a file that does not fit
    gets a ``retry`` row (``request_full``), so one request's answer stays bounded however many long
    files it names.
    """

    def __init__(self, limit: int):
        self.limit = self.left = int(limit)
        self._lock = threading.Lock()

    def take(self, windows: int) -> bool:
        with self._lock:
            if windows > self.left:
                return False
            self.left -= windows
            return True


class WindowBudgetSpent(Exception):
    """The file's windows do not fit in what is left of its request's ``WindowBudget``."""


def annotate_file(uri: str, predict_proba: PredictProba, config: AnnotateConfig = AnnotateConfig(),
                  opener: Opener | None = None, budget: WindowBudget | None = None) -> tuple[dict, list[dict]]:
    """``(file_row, segment_rows)`` for one local path or ``s3://`` URI; never raises for bad input.

    ``opener`` opens a local path (default: any regular file); Serve passes one that never leaves
    its allowed roots, and a ``budget`` shared by the files of one request.
    """
    labels = _labels(predict_proba, config)
    bundle = getattr(predict_proba, "__self__", None)
    config = resolve_normalisation(config, getattr(bundle, "normalise_by", "none"))
    name = os.path.basename(uri.rstrip("/")) or uri
    taken = False

    def reserve(windows: int) -> None:
        nonlocal taken  # a storage retry re-reads the header: take the file's windows once
        if budget is not None and not taken:
            if windows > budget.limit:  # would never fit, however the files are batched
                raise AudioError(f"{name}: {windows} windows are over the limit of {budget.limit} per request "
                                 "(max_windows_per_request)", "too_long")
            if not budget.take(windows):
                raise WindowBudgetSpent(windows)
            taken = True

    for attempt in range(1, max(1, config.io_attempts) + 1):
        try:
            return _annotate(uri, predict_proba, config, labels, opener, reserve)
        except WindowBudgetSpent as exc:
            message = (f"{name}: its {exc.args[0]} windows do not fit in what is left of this request's "
                       f"{budget.limit} (max_windows_per_request); send it in a smaller batch")
            return file_row(uri, labels, status="retry", error=message, error_code="request_full"), []
        except Exception as exc:
            status, code, message = classify(exc, name)
        if status != "retry" or attempt >= config.io_attempts:
            break
        log.warning("%s: %s (%s); attempt %d of %d", uri, message, code, attempt, config.io_attempts)
        time.sleep(config.retry_backoff_s * 2 ** (attempt - 1))
    if status == "retry":
        message += f"; tried {attempt} times, the next run tries again"
    return file_row(uri, labels, status=status, error=message, error_code=code), []


def classify(exc: BaseException, name: str) -> tuple[str, str, str]:
    """``(status, error_code, message)`` for an exception raised while annotating file ``name``.

    ``error``: the file's fault (retrying gives the same answer). ``retry``: the storage's or the
    machine's (throttling, network, permission, disk full), worth trying again later. Messages are
    fixed texts: storage errors carry bucket names, credentials' owners and server text, which go to
    the log only.
    """
    if isinstance(exc, AudioError):
        return "error", exc.code, str(exc)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return "error", "not_found", f"{name}: file not found"
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "error", "access_denied", f"{name}: is a symbolic link that changed while being opened; not read"
    if isinstance(exc, OSError):
        log.warning("storage error on %s: %r", name, exc)
        text = str(exc)
        if isinstance(exc, PermissionError) or "ACCESS_DENIED" in text or "AccessDenied" in text or \
                "HTTP response code: 403" in text:
            return "retry", "permission_denied", f"{name}: permission denied by the storage"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "retry", "disk_full", f"{name}: no space left on the machine's disk"
        return "retry", "storage_unavailable", f"{name}: the storage did not answer (throttled or disconnected)"
    log.warning("annotating %s failed", name, exc_info=exc)
    return "error", "internal", f"{name}: internal error ({type(exc).__name__}); details are in the log"


def _annotate(uri: str, predict_proba: PredictProba, config: AnnotateConfig, labels: list[str], opener,
              reserve: Callable[[int], None]):
    name = os.path.basename(uri.rstrip("/")) or uri

    def check_size(nbytes):
        if nbytes is None or nbytes < 0:
            raise FileNotFoundError(uri)
        if nbytes > config.max_file_mb * 1024**2:
            raise AudioError(
                f"{name}: file too large ({nbytes / 1024**2:.0f} MB > max_file_mb={config.max_file_mb:g}); "
                "raise max_file_mb or split the file", "too_large")

    if storage.is_s3(uri):
        check_size(storage.size(uri))  # before the download
    sr_out = config.sample_rate
    segments: list[dict] = []
    prob_sum = np.zeros(len(labels), dtype=np.float64)
    n_windows, last_end = 0, 0.0
    pending: list[tuple[float, float, np.ndarray]] = []
    by_file = config.normalise_by == "file"
    bundle = getattr(predict_proba, "__self__", None)
    if by_file and not hasattr(bundle, "features"):
        raise ValueError("normalise_by 'file' needs Bundle.predict_proba (the features of every window first)")
    # file mode: features of every speech window, labelled once the recording's statistics are known
    held: list[tuple[float, float]] = []
    held_features: list[dict] = []

    def emit(spans, probs):
        nonlocal prob_sum
        probs = np.asarray(probs, dtype=np.float64)
        if probs.shape != (len(spans), len(labels)):
            raise ValueError(f"predict_proba returned shape {probs.shape}, expected {(len(spans), len(labels))}")
        if not np.isfinite(probs).all():  # never a label from NaN probabilities
            raise AudioError(f"{name}: the model gave non-finite probabilities for this audio", "model_output")
        prob_sum += probs.sum(axis=0)
        for (start, end), p in zip(spans, probs):
            k = int(p.argmax())
            seg = {"uri": uri, "start_s": round(start, 6), "end_s": round(end, 6), "label": labels[k], "confidence": float(p[k])}
            seg.update({f"prob_{label}": float(v) for label, v in zip(labels, p)})
            segments.append(seg)

    def flush():
        waves = np.stack([w for _, _, w in pending])
        if by_file:
            held.extend((start, end) for start, end, _ in pending)
            held_features.append(bundle.features(waves))
        else:
            emit([(start, end) for start, end, _ in pending], predict_proba(waves))
        pending.clear()

    with open_source(uri, opener) as source:
        check_size(file_size(source))
        f = open_audio(source, name)
        with f:
            info = audio_info(f)
            if config.max_duration_s and info.duration_s > config.max_duration_s:
                raise AudioError(f"{name}: {info.duration_s:.0f} s of audio is over the limit of "
                                 f"{config.max_duration_s:g} s (max_duration_s)", "too_long")
            windows = 1 + max(0, int(np.ceil((info.duration_s - config.window_s) / config.hop_s)))
            if config.max_windows and windows > config.max_windows:
                raise AudioError(f"{name}: {info.duration_s:.0f} s at hop_s={config.hop_s:g} would be {windows} windows, "
                                 f"over the limit of {config.max_windows} (max_windows)", "too_long")
            reserve(windows)
            try:
                for start, end, wave in iter_windows(f, config.window_s, config.hop_s, sr_out, name=name):
                    n_windows += 1
                    last_end = end
                    real = wave[: max(1, int(round((end - start) * sr_out)))]
                    if not is_speech(real, config.vad, config.vad_threshold_db, sr_out):
                        continue
                    pending.append((start, end, wave))
                    if len(pending) >= config.batch_size:
                        flush()
            except sf.SoundFileError as exc:  # corrupt data after a valid header
                raise AudioError(f"{name}: could not decode audio (soundfile: {soundfile_cause(exc)})",
                                 "decode_failed") from None
            if pending:
                flush()
    if held:
        features = {key: np.concatenate([part[key] for part in held_features]) for key in held_features[0]}
        emit(held, bundle.proba_from_features(features, standardise=True))
    if n_windows == 0:
        raise AudioError(f"{name}: no audio could be read", "decode_failed")
    n = len(segments)
    # the end of the last window is the end of the audio actually read (a truncated file's header
    # can claim more)
    duration = min(info.duration_s, last_end) if config.hop_s <= config.window_s else info.duration_s
    values = dict(duration_s=float(duration), n_segments=n, n_windows=n_windows, normalise_by=config.normalise_by)
    if n:
        mean = prob_sum / n
        values["label"] = labels[int(mean.argmax())]
        values.update({f"prob_{label}": float(v) for label, v in zip(labels, mean)})
    return file_row(uri, labels, **values), segments
