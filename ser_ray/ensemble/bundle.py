"""The bundle: everything needed to run a fitted ensemble, in one directory (local or ``s3://``).

Layout::

    bundle.json              schema version, labels, sample rate, window, members, data summary
    members/<name>/          one model per member in ``save_model`` layout

``Bundle.features``, ``Bundle.member_forward`` and ``Bundle.combine`` are the three steps of
``Bundle.predict_proba``; Serve runs all three in its ingress (or ``member_forward`` in one deployment
per member), offline annotation calls ``predict_proba``, so both give the same probabilities.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ser_ray import __version__, storage
from ser_ray.audio.decode import fix_length, normalize
from ser_ray.features.config import FeatureConfig
from ser_ray.features.extractor import FeatureExtractor

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUNDLE_JSON = "bundle.json"
# Windows per forward pass inside member_logits: bounds memory for large inputs.
_CHUNK = 64


@dataclasses.dataclass
class Member:
    """One model of the ensemble: its logits are divided by ``temperature``, its probabilities
    weighted by ``weight``."""

    family: str
    model: nn.Module
    feature_config: FeatureConfig
    weight: float = 1.0
    temperature: float = 1.0
    metrics: dict = dataclasses.field(default_factory=dict)
    name: str = ""
    hparams: dict | None = None  # taken from ``model.hparams`` when None

    def __post_init__(self):
        if not self.name:
            self.name = self.family
        self._extractor: FeatureExtractor | None = None
        # what inference runs: the model, or an equal faster form of it (Bundle.optimise_for_inference)
        self.runner = self.model
        self.backend = "eager"

    def extractor(self, device) -> FeatureExtractor:
        if self._extractor is None or self._extractor.device != torch.device(device):
            self._extractor = FeatureExtractor(self.feature_config, device)
        return self._extractor

    def resolved_hparams(self) -> dict:
        if self.hparams is not None:
            return dict(self.hparams)
        hp = getattr(getattr(self.model, "module", self.model), "hparams", None)
        return dataclasses.asdict(hp) if dataclasses.is_dataclass(hp) else {}


@dataclasses.dataclass
class Bundle:
    """Labels, members and the shared window (``sample_rate``, ``window_s``) of an ensemble."""

    labels: list[str]
    members: list[Member]
    sample_rate: int = 16_000
    window_s: float = 3.0
    data_summary: dict = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    created: str = ""
    version: str = __version__
    device: str = "cpu"
    # none | speaker: the members were trained on features standardised per speaker; such a bundle
    # labels a group of windows together (one recording: ``predict_proba_group``), never one alone
    normalise_by: str = "none"

    def __post_init__(self):
        if self.normalise_by not in ("none", "speaker"):
            raise ValueError(f"bundle normalise_by {self.normalise_by!r}: choose none or speaker")
        self.labels = list(self.labels)
        if not self.members:
            raise ValueError("a bundle needs at least one member")
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"bundle member names must be unique, got {names}")
        for m in self.members:
            fc = m.feature_config
            if fc.sample_rate != self.sample_rate or fc.window_s != self.window_s:
                raise ValueError(
                    f"member {m.name!r} reads {fc.window_s} s windows at {fc.sample_rate} Hz but the "
                    f"bundle uses {self.window_s} s at {self.sample_rate} Hz; all members must share them"
                )

    @property
    def num_samples(self) -> int:
        return int(round(self.window_s * self.sample_rate))

    def weights(self) -> np.ndarray:
        w = np.asarray([m.weight for m in self.members], dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"ensemble weights must be non-negative and not all zero, got {w.tolist()}")
        return w / w.sum()

    def _features(self, i: int, waves: np.ndarray) -> list[torch.Tensor]:
        """Member ``i``'s input features for windows ``[N, samples]``, in chunks of ``_CHUNK`` windows.

        Windows of another length are padded or trimmed to the bundle window; the member's own
        waveform normalisation (``feature_config.normalize``) is applied here.
        """
        member = self.members[i]
        waves = np.asarray(waves, dtype=np.float32)
        if waves.ndim == 1:
            waves = waves[None, :]
        waves = fix_length(waves, self.num_samples)
        if member.feature_config.normalize != "none":
            waves = np.stack([normalize(w, member.feature_config.normalize) for w in waves])
        extractor = member.extractor(self.device)
        return [extractor.extract(waves[start : start + _CHUNK]) for start in range(0, len(waves), _CHUNK)]

    @torch.inference_mode()
    def member_forward(self, i: int, features: np.ndarray) -> np.ndarray:
        """Raw logits ``[N, L]`` of member ``i`` from its input features ``[N, C, F]`` (``features()``'s
        array for the member's feature config): the model alone, in chunks of ``_CHUNK`` windows."""
        x = np.asarray(features, dtype=np.float32)
        return self._logits(i, [torch.as_tensor(x[s : s + _CHUNK], device=self.device) for s in range(0, len(x), _CHUNK)])

    def _logits(self, i: int, features: list[torch.Tensor]) -> np.ndarray:
        if not features:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        out = [self.members[i].runner(f).float().cpu().numpy() for f in features]
        return np.concatenate(out).astype(np.float32, copy=False)

    @torch.inference_mode()
    def member_logits(self, i: int, waves: np.ndarray) -> np.ndarray:
        """Raw logits ``[N, L]`` of member ``i`` for windows ``[N, samples]`` (float32, 16 kHz)."""
        return self._logits(i, self._features(i, waves))

    def combine(self, member_logits: Sequence[np.ndarray]) -> np.ndarray:
        """Weighted mean of ``softmax(logits / T)`` over members -> probabilities ``[N, L]``."""
        if len(member_logits) != len(self.members):
            raise ValueError(f"expected logits of {len(self.members)} members, got {len(member_logits)}")
        weights = self.weights()
        probs = None
        for w, m, logits in zip(weights, self.members, member_logits):
            p = softmax(np.asarray(logits, dtype=np.float64) / m.temperature) * w
            probs = p if probs is None else probs + p
        return probs.astype(np.float32)

    @torch.inference_mode()
    def predict_proba(self, waves: np.ndarray) -> np.ndarray:
        """Ensemble probabilities ``[N, L]`` for windows ``[N, samples]`` at 16 kHz.

        Members with the same feature config (cnn and bigru_attn by default) share one extraction:
        the same features ``member_logits`` would compute, once. A bundle trained on speaker-normalised
        features refuses: its windows need their group's statistics (``predict_proba_group``).
        """
        if self.normalise_by != "none":
            raise ValueError("this bundle's members were trained on speaker-normalised features: label a whole "
                             "recording (or speaker) at once with predict_proba_group / normalise_by: file")
        shared = self._shared_features(waves)  # stays on the bundle's device
        return self.combine([self._logits(i, shared[m.feature_config]) for i, m in enumerate(self.members)])

    def _shared_features(self, waves: np.ndarray) -> dict:
        """``{FeatureConfig: chunks of features}``: one extraction per distinct member feature config."""
        shared: dict = {}
        for i, member in enumerate(self.members):
            if member.feature_config not in shared:
                shared[member.feature_config] = self._features(i, waves)
        return shared

    @torch.inference_mode()
    def features(self, waves: np.ndarray) -> dict:
        """Every member's input features for windows ``[N, samples]`` as host arrays, to hold across
        batches until a group is complete: ``{FeatureConfig: [N, C, F] array}``."""
        return {fc: (torch.cat(chunks).cpu().numpy() if chunks else np.zeros((0, *fc.shape), np.float32))
                for fc, chunks in self._shared_features(waves).items()}

    @torch.inference_mode()
    def logits_from_features(self, features: dict, *, standardise: bool = False) -> list[np.ndarray]:
        """Every member's raw logits ``[N, L]`` from ``features()`` output; ``standardise`` first
        standardises each feature config over all ``N`` windows as one group."""
        from ser_ray.features.speaker_norm import standardise_group

        logits = []
        for i, member in enumerate(self.members):
            x = features[member.feature_config]
            if standardise and len(x):
                x = standardise_group(x)
            logits.append(self.member_forward(i, x))
        return logits

    def proba_from_features(self, features: dict, *, standardise: bool = False) -> np.ndarray:
        """Probabilities ``[N, L]`` from ``features()`` output (see ``logits_from_features``)."""
        return self.combine(self.logits_from_features(features, standardise=standardise))

    def predict_proba_group(self, waves: np.ndarray) -> np.ndarray:
        """Probabilities for windows that form one group (a recording, a speaker): with a bundle trained on
        speaker-normalised features each member's features are standardised over the group first."""
        return self.proba_from_features(self.features(waves), standardise=self.normalise_by != "none")

    def to(self, device: str) -> "Bundle":
        self.device = str(device)
        for m in self.members:
            m.model.to(device)
            m.runner, m.backend = m.model, "eager"  # a trace is tied to the device it was made on
        return self

    def optimise_for_inference(self, backend: str = "auto") -> dict[str, str]:
        """Run each member in a faster form equal to it (``ser_ray.ensemble.runtime``): an ONNX Runtime
        session (CPU) or a frozen TorchScript trace where its logits equal the module's, the module itself
        otherwise. Returns ``{member: backend}`` (also ``Member.backend``)."""
        from ser_ray.ensemble.runtime import choose_runner

        for m in self.members:
            m.runner, m.backend = choose_runner(m.model, m.feature_config, self.device, backend)
        chosen = {m.name: m.backend for m in self.members}
        log.info("inference backends: %s", chosen)
        return chosen

    def describe(self) -> dict:
        """``bundle.json`` content (without writing anything)."""
        return {
            "schema_version": self.schema_version,
            "labels": self.labels,
            "sample_rate": self.sample_rate,
            "window_s": self.window_s,
            "members": [
                {
                    "name": m.name,
                    "family": m.family,
                    "path": f"members/{m.name}",
                    "weight": float(m.weight),
                    "temperature": float(m.temperature),
                    "feature_config": m.feature_config.to_dict(),
                    "metrics": m.metrics,
                }
                for m in self.members
            ],
            "data_summary": self.data_summary,
            "normalise_by": self.normalise_by,
            "ser_ray_version": self.version,
            "created": self.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def save_bundle(bundle: Bundle, uri: str) -> str:
    """Write ``bundle`` under ``uri`` (local dir or ``s3://`` prefix); ``bundle.json`` goes last."""
    from ser_ray.models import save_model

    for m in bundle.members:
        save_model(
            storage.join(uri, "members", m.name),
            m.model,
            family=m.family,
            hparams=m.resolved_hparams(),
            labels=bundle.labels,
            feature_config=m.feature_config,
        )
    desc = bundle.describe()
    bundle.created = desc["created"]
    storage.write_bytes(storage.join(uri, BUNDLE_JSON), json.dumps(desc, indent=2, default=_json_default).encode())
    log.info("bundle with %d member(s) written to %s", len(bundle.members), uri)
    return uri


def read_bundle_json(uri: str) -> dict:
    path = storage.join(uri, BUNDLE_JSON)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: not found; is {uri} a bundle written by `ser-ray ensemble`?")
    try:
        return json.loads(storage.read_bytes(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def load_bundle(uri: str, device: str = "cpu") -> Bundle:
    """The bundle under ``uri`` with every member loaded in eval mode on ``device``.

    Fails with a clear message when the schema version is not this one, or when a member's saved
    feature config or labels differ from what ``bundle.json`` says.
    """
    from ser_ray.models import load_model

    desc = read_bundle_json(uri)
    version = desc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{uri}: bundle schema version {version!r}, but this ser-ray ({__version__}) reads version "
            f"{SCHEMA_VERSION}; re-create the bundle with `ser-ray ensemble` from this version"
        )
    labels = list(desc["labels"])
    members = []
    for entry in desc["members"]:
        name = entry["name"]
        expected = FeatureConfig.from_dict(entry["feature_config"])
        model, meta = load_model(storage.join(uri, entry["path"]), map_location=device)
        if meta.feature_config != expected:
            diff = {
                k: (v, meta.feature_config.to_dict()[k])
                for k, v in expected.to_dict().items()
                if meta.feature_config.to_dict()[k] != v
            }
            raise ValueError(
                f"{uri}: member {name!r} was saved with a different feature config than bundle.json "
                f"says; differing fields (bundle.json, member): {diff}. Re-create the bundle."
            )
        if list(meta.labels) != labels:
            raise ValueError(
                f"{uri}: member {name!r} has labels {meta.labels} but the bundle has {labels}; "
                "re-create the bundle"
            )
        if meta.family != entry["family"]:
            raise ValueError(f"{uri}: member {name!r} is family {meta.family!r}, bundle.json says {entry['family']!r}")
        members.append(
            Member(
                family=meta.family,
                model=model,
                feature_config=meta.feature_config,
                weight=float(entry.get("weight", 1.0)),
                temperature=float(entry.get("temperature", 1.0)),
                metrics=dict(entry.get("metrics") or {}),
                name=name,
                hparams=dict(meta.hparams),
            )
        )
    return Bundle(
        labels=labels,
        members=members,
        sample_rate=int(desc["sample_rate"]),
        window_s=float(desc["window_s"]),
        data_summary=dict(desc.get("data_summary") or {}),
        schema_version=version,
        created=desc.get("created", ""),
        version=desc.get("ser_ray_version", "unknown"),
        device=str(device),
        normalise_by=desc.get("normalise_by", "none"),
    )


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
