"""Model families by name, and the one way to build, save and load them.

Every family is one module with one ``nn.Module`` class registered here with ``@register``. The class
carries its hyperparameters as a dataclass (``Hparams``) and is built as
``cls(num_classes, feature_config, hparams)``. Its forward takes features as cached,
``[B, C, F]`` float32, and returns logits ``[B, num_classes]``; per-utterance normalisation lives
inside the model so training, Serve and annotation all get it.

A saved model is a directory (local or ``s3://``) with ``model.json`` (family, hparams, labels,
feature config, ser-ray version, extra) and ``model.safetensors`` (the state dict). Loading needs
nothing else: no hub, no training config.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Protocol

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from ser_ray import __version__, storage
from ser_ray.features.config import FeatureConfig

MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"

# family name -> model class (each class has ``Hparams``, ``family`` and ``input_kind`` attributes)
MODELS: dict[str, type[nn.Module]] = {}


def register(
    name: str, input_kind: str, accepts: tuple[str, ...] | None = None, features: dict | None = None
) -> Callable:
    """Class decorator adding a model family to ``MODELS``.

    ``input_kind`` is the ``FeatureConfig.kind`` the family is meant for; ``accepts`` lists every
    kind it can read (defaults to just ``input_kind``); ``features`` are ``FeatureConfig`` fields the
    family needs besides its kind (rezonet: 40 mels, n_fft 512, hop 160), see ``family_feature_config``.
    """
    features = dict(features or {})
    settable = {f.name for f in dataclasses.fields(FeatureConfig)} - {"kind"}  # kind is input_kind
    if set(features) - settable:
        bad = sorted(set(features) - settable)
        raise ValueError(f"model family {name!r}: features {bad} must be among {sorted(settable)}")

    def decorate(cls):
        if name in MODELS:
            raise ValueError(f"model family {name!r} is registered twice")
        if not dataclasses.is_dataclass(getattr(cls, "Hparams", None)):
            raise TypeError(f"{cls.__name__}: a model family needs an `Hparams` dataclass")
        cls.family = name
        cls.input_kind = input_kind
        cls.accepts = tuple(accepts or (input_kind,))
        cls.feature_overrides = features
        MODELS[name] = cls
        return cls

    return decorate


def _family(family: str) -> type[nn.Module]:
    try:
        return MODELS[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(MODELS)}") from None


def family_input_kind(family: str) -> str:
    """The ``FeatureConfig.kind`` a family needs: ``logmel`` for cnn/bigru_attn, ``waveform`` for wav2vec2."""
    return _family(family).input_kind


def family_feature_config(family: str, base: FeatureConfig = FeatureConfig()) -> FeatureConfig:
    """``base`` with the family's kind and the feature settings it requires.

    The kind is always the family's ``input_kind`` (build a model from another accepted kind by
    passing that ``FeatureConfig`` to ``build_model`` directly); fields the family does not fix
    (window, sample rate, level normalisation, ...) keep ``base``'s values. Families with different
    results here need separate feature caches (the cache key is the feature config).
    """
    cls = _family(family)
    return dataclasses.replace(base, kind=cls.input_kind, **cls.feature_overrides)


def default_hparams(family: str) -> dict:
    """Every hyperparameter of a family with its default value."""
    return dataclasses.asdict(_family(family).Hparams())


def resolve_hparams(family: str, hparams: dict | None = None):
    """``hparams`` merged over the family's defaults, as its ``Hparams`` dataclass.

    Unknown names raise ``ValueError`` listing the valid ones (a typo in a config or search space
    must not be silently ignored).
    """
    cls = _family(family)
    hparams = dict(hparams or {})
    valid = [f.name for f in dataclasses.fields(cls.Hparams)]
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for model family {family!r}; valid: {valid}"
        )
    return cls.Hparams(**hparams)


def build_model(
    family: str, num_classes: int, feature_config: FeatureConfig | None = None, **hparams: Any
) -> nn.Module:
    """A freshly initialised (or, for wav2vec2, pretrained) model of ``family``.

    ``feature_config`` defaults to ``family_feature_config(family)``.
    """
    cls = _family(family)
    if feature_config is None:
        feature_config = family_feature_config(family)
    if feature_config.kind not in cls.accepts:
        raise ValueError(
            f"model family {family!r} reads features of kind {list(cls.accepts)}, but the feature "
            f"config has kind {feature_config.kind!r}; use FeatureConfig(kind={cls.input_kind!r})"
        )
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return cls(int(num_classes), feature_config, resolve_hparams(family, hparams))


@dataclasses.dataclass
class ModelMeta:
    """What ``model.json`` says about a saved model."""

    family: str
    hparams: dict
    labels: list[str]
    feature_config: FeatureConfig
    version: str = __version__
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["feature_config"] = self.feature_config.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ModelMeta":
        return cls(
            family=data["family"],
            hparams=dict(data.get("hparams") or {}),
            labels=list(data["labels"]),
            feature_config=FeatureConfig.from_dict(data["feature_config"]),
            version=data.get("version", "unknown"),
            extra=dict(data.get("extra") or {}),
        )


def save_model(
    directory: str,
    model: nn.Module,
    *,
    family: str,
    hparams: dict | None,
    labels: list[str],
    feature_config: FeatureConfig,
    extra: dict | None = None,
) -> ModelMeta:
    """Write ``model.json`` and ``model.safetensors`` under ``directory`` (local path or ``s3://``).

    ``hparams`` may be partial (defaults fill the rest) or ``None`` (the model's own). Families that
    need more to rebuild offline add it to ``extra`` themselves (wav2vec2: its transformers config).
    """
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if getattr(model, "family", family) != family:
        raise ValueError(f"save_model(family={family!r}) got a {model.family!r} model")
    if hparams is None and dataclasses.is_dataclass(getattr(model, "hparams", None)):
        hparams = dataclasses.asdict(model.hparams)  # the values the model was built with
    resolved = dataclasses.asdict(resolve_hparams(family, hparams))
    extra = dict(extra or {})
    # A family may need more than its hparams to rebuild offline (wav2vec2: its transformers config).
    if hasattr(model, "export_extra"):
        extra.update(model.export_extra())
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != len(labels):
        raise ValueError(f"model has {num_classes} outputs but {len(labels)} labels were given: {labels}")
    meta = ModelMeta(family, resolved, list(labels), feature_config, __version__, extra)
    # contiguous CPU copies: safetensors refuses views and shared storage
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(directory, MODEL_WEIGHTS), save_safetensors(state))
    # model.json last: its presence means the directory is complete
    blob = json.dumps(meta.to_dict(), indent=2, sort_keys=True).encode()
    storage.write_bytes(storage.join(directory, MODEL_JSON), blob)
    return meta


def read_model_meta(directory: str) -> ModelMeta:
    uri = storage.join(directory, MODEL_JSON)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: not found; is {directory} a directory written by save_model?")
    return ModelMeta.from_dict(json.loads(storage.read_bytes(uri)))


def load_model(directory: str, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """The model saved under ``directory`` (in eval mode) and its ``ModelMeta``."""
    meta = read_model_meta(directory)
    cls = _family(meta.family)
    hparams = resolve_hparams(meta.family, meta.hparams)
    if hasattr(cls, "for_loading"):
        model = cls.for_loading(len(meta.labels), meta.feature_config, hparams, meta.extra)
    else:
        model = cls(len(meta.labels), meta.feature_config, hparams)
    state = load_safetensors(storage.read_bytes(storage.join(directory, MODEL_WEIGHTS)))
    model.load_state_dict(state)
    return model.to(map_location).eval(), meta


class TrainingHooks(Protocol):
    """What a family's model may define for the training loop; each hook is optional, and the loop
    (``train/loop.py``) honours every one a model has. Families without them train all parameters
    at one learning rate under a plain DistributedDataParallel wrapper.
    """

    #: DDP must look for parameters a step did not use (wav2vec2's layerdrop skips whole layers).
    find_unused_parameters: bool

    def param_groups(self, base_lr: float) -> list[dict]:
        """Optimizer parameter groups (wav2vec2: layer-wise learning-rate decay), frozen ones included."""

    def on_epoch_start(self, epoch: int) -> bool:
        """Called before each epoch (0-based); True when the set of trainable parameters changed, after
        which the loop wraps the model in DistributedDataParallel again (a wrapper only syncs the
        parameters that were trainable when it was built)."""


def _core(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # under a DDP wrapper


def param_groups(model: nn.Module, base_lr: float) -> list[dict]:
    """Optimizer parameter groups: the family's own (:class:`TrainingHooks`) or one group.

    Frozen parameters are included, so a family that unfreezes later (``on_epoch_start``) trains them
    without rebuilding the optimizer (optimizers skip parameters whose grad is None).
    """
    model = _core(model)
    if hasattr(model, "param_groups"):
        return model.param_groups(base_lr)
    return [{"params": list(model.parameters()), "lr": base_lr}]


def on_epoch_start(model: nn.Module, epoch: int) -> bool:
    """Let the family react to a new epoch (wav2vec2: scheduled unfreezing); True if it changed."""
    model = _core(model)
    return bool(model.on_epoch_start(epoch)) if hasattr(model, "on_epoch_start") else False


def ddp_options(model: nn.Module) -> dict:
    """Keyword arguments for the family's DistributedDataParallel wrapper."""
    return {"find_unused_parameters": bool(getattr(_core(model), "find_unused_parameters", False))}


# Importing the family modules registers them (wav2vec2 imports transformers only when built).
from ser_ray.models import acrnn, bigru_attn, cnn, wav2vec2  # noqa: E402,F401

# The model zoo: the families of the projects ser-ray grew from.
from ser_ray.models import dummynet, exponet, mfcc_cnn, parallel, rezonet, td_cnn  # noqa: E402,F401

# Classical families on utterance functionals and MFCC frames (fitted by scikit-learn, run as torch modules).
from ser_ray.models import boaw, classical  # noqa: E402,F401

__all__ = [
    "MODELS",
    "ModelMeta",
    "build_model",
    "default_hparams",
    "family_feature_config",
    "family_input_kind",
    "load_model",
    "on_epoch_start",
    "param_groups",
    "ddp_options",
    "TrainingHooks",
    "read_model_meta",
    "register",
    "resolve_hparams",
    "save_model",
]
