"""wav2vec 2.0 (Hugging Face ``transformers``) fine-tuned on the raw 16 kHz window.

``pretrained`` is a hub name (``facebook/wav2vec2-base``), a local ``save_pretrained`` directory or
an ``s3://`` prefix holding one (downloaded once to ``~/.cache/ser-ray/models/``). A model saved with
``save_model`` carries its transformers config in ``model.json``, so loading it never needs the hub.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ser_ray import storage
from ser_ray.features.config import FeatureConfig
from ser_ray.models import register

log = logging.getLogger(__name__)

FREEZE_CHOICES = ("feature_encoder", "encoder", "none")
DEFAULT_CACHE = Path.home() / ".cache" / "ser-ray" / "models"


@dataclasses.dataclass
class Wav2Vec2Hparams:
    pretrained: str = "facebook/wav2vec2-base"
    # feature_encoder: CNN frozen, transformer fine-tuned (the usual recipe);
    # encoder: everything but the head frozen; none: everything trained.
    freeze: str = "feature_encoder"
    layerwise_lr_decay: float = 1.0  # lr of layer i = base * decay**(depth above it); 1.0 = off
    unfreeze_after_epochs: int | None = None  # with freeze="encoder": train the transformer from then on
    normalize: bool = True  # per-utterance zero mean, unit variance (as Wav2Vec2FeatureExtractor)
    # Overrides of the checkpoint's regularisation (None keeps the checkpoint's: base has 0.1, 0.05).
    layerdrop: float | None = None  # randomly skipped transformer layers while training
    mask_time_prob: float | None = None  # wav2vec2's built-in SpecAugment-style time masking


@register("wav2vec2", input_kind="waveform")
class Wav2Vec2Classifier(nn.Module):
    """Waveform ``[B, 1, samples]`` or ``[B, samples]`` at 16 kHz -> logits ``[B, num_classes]``."""

    Hparams = Wav2Vec2Hparams

    def __init__(
        self,
        num_classes: int,
        feature_config: FeatureConfig,
        hparams: Wav2Vec2Hparams,
        config: dict | None = None,
    ):
        super().__init__()
        from transformers import AutoConfig, AutoModelForAudioClassification

        if hparams.freeze not in FREEZE_CHOICES:
            raise ValueError(f"freeze={hparams.freeze!r}; choose one of {list(FREEZE_CHOICES)}")
        if feature_config.sample_rate != 16_000:
            raise ValueError(
                f"wav2vec2 expects 16 kHz audio, the feature config has {feature_config.sample_rate} Hz"
            )
        self.num_classes = num_classes
        self.hparams = hparams
        if config is not None:  # rebuilding a saved model: architecture only, weights come next
            cfg = AutoConfig.for_model(**config)
            self.model = AutoModelForAudioClassification.from_config(cfg)
        else:
            source = hparams.pretrained
            if storage.is_s3(source):
                source = str(download_prefix(source))
            log.info("loading pretrained %s from %s", hparams.pretrained, source)
            # The checkpoint's own head (if any) has another size: a fresh head is initialised.
            overrides = {
                k: getattr(hparams, k)
                for k in ("layerdrop", "mask_time_prob")
                if getattr(hparams, k) is not None
            }
            self.model = AutoModelForAudioClassification.from_pretrained(
                source, num_labels=num_classes, ignore_mismatched_sizes=True, **overrides
            )
        self._apply_freeze(hparams.freeze)

    @property
    def find_unused_parameters(self) -> bool:
        """DDP must be built with ``find_unused_parameters=True``: layerdrop skips whole layers."""
        return getattr(self.model.config, "layerdrop", 0.0) > 0

    @classmethod
    def for_loading(cls, num_classes, feature_config, hparams, extra: dict) -> "Wav2Vec2Classifier":
        """The architecture of a saved model, built from the config stored in ``model.json``."""
        if "transformers_config" not in extra:
            raise ValueError("model.json has no extra.transformers_config; re-save the model with save_model")
        return cls(num_classes, feature_config, hparams, config=extra["transformers_config"])

    def export_extra(self) -> dict:
        return {"transformers_config": self.model.config.to_dict()}

    # -- freezing -------------------------------------------------------------------------------
    def _apply_freeze(self, freeze: str) -> None:
        for p in self.model.parameters():
            p.requires_grad_(True)
        if freeze == "feature_encoder":
            self.model.freeze_feature_encoder()
        elif freeze == "encoder":
            self.model.freeze_base_model()

    def on_epoch_start(self, epoch: int) -> bool:
        """Called by the training loop before each epoch (0-based); True when it unfroze something.

        With ``freeze="encoder"`` and ``unfreeze_after_epochs=N``, the transformer (not the CNN
        feature encoder) becomes trainable from epoch N. The optimizer already holds every parameter
        (``param_groups`` includes frozen ones). A DistributedDataParallel wrapper only syncs the
        parameters that were trainable when it was built: on True, wrap the model again.
        """
        n = self.hparams.unfreeze_after_epochs
        if self.hparams.freeze != "encoder" or n is None or epoch < n or self._unfrozen:
            return False
        self._apply_freeze("feature_encoder")
        self._unfrozen = True
        log.info("epoch %d: unfreezing the wav2vec2 transformer", epoch)
        return True

    _unfrozen = False

    # -- optimisation ---------------------------------------------------------------------------
    def param_groups(self, base_lr: float, decay: float | None = None) -> list[dict]:
        """Optimizer parameter groups with layer-wise learning-rate decay.

        Head: ``base_lr``; transformer layer i of L: ``base_lr * decay**(L - i)``; everything
        below the transformer (CNN, projection, positional conv): ``base_lr * decay**(L + 1)``.
        Frozen parameters are included so that a later unfreeze trains them.
        """
        decay = self.hparams.layerwise_lr_decay if decay is None else decay
        base = self.model.base_model
        n_layers = len(base.encoder.layers)
        base_prefix = self.model.base_model_prefix + "."
        groups: dict[int, list] = {}
        for name, p in self.model.named_parameters():
            if not name.startswith(base_prefix):
                depth = 0  # head: projector, classifier, layer weights
            elif ".encoder.layers." in name:
                i = int(name.split(".encoder.layers.")[1].split(".")[0])
                depth = n_layers - i
            else:
                depth = n_layers + 1
            groups.setdefault(depth, []).append(p)
        return [
            {"params": params, "lr": base_lr * decay**depth, "name": f"depth{depth}"}
            for depth, params in sorted(groups.items())
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.squeeze(1)  # [B, 1, samples] -> [B, samples]
        if self.hparams.normalize:
            # per clip, so a prediction never depends on the rest of the batch
            x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-7)
        # Fixed-length windows: no attention mask (wav2vec2-base is trained without one).
        return self.model(input_values=x).logits


def download_prefix(uri: str, cache_root: str | Path | None = None) -> Path:
    """Every object under the ``s3://`` prefix ``uri``, downloaded once to a local directory.

    The cache directory is keyed by the URI and the objects' ETags, so changed weights are fetched
    again; a finished download is renamed into place so concurrent workers never see half a copy.
    """
    import boto3

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    client = boto3.client("s3")
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if rel and not rel.endswith("/"):
                objects.append((obj["Key"], rel, obj.get("ETag", ""), obj["Size"]))
    if not objects:
        raise FileNotFoundError(f"{uri}: no objects under this prefix; expected a save_pretrained directory")
    digest = hashlib.sha256(repr((uri.rstrip("/"), sorted(objects))).encode()).hexdigest()[:20]
    root = Path(cache_root or DEFAULT_CACHE)
    target = root / digest
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{digest}.tmp-"))
    try:
        log.info("downloading %d objects from %s to %s", len(objects), uri, target)
        for key, rel, _, _ in objects:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(dest))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
