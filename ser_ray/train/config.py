"""The typed training configuration: one dataclass, loadable from YAML with ``key=value`` overrides.

A YAML file holds the ``TrainConfig`` fields at the top level plus a ``data`` section (which corpus,
split protocol and feature settings a ``ser-ray train`` run uses). Overrides use dotted keys and YAML
values: ``epochs=5``, ``hparams.dropout=0.3``, ``data.protocol=loso``, ``augment={}``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ser_ray.config import apply_overrides, check_keys, read_yaml_mapping
from ser_ray.splits import PROTOCOLS as SPLIT_PROTOCOLS

SCHEDULERS = ("plateau", "cosine")
# speaker-disjoint protocols of ser_ray.splits; the leaky "random" split only through `ser-ray splits`
PROTOCOLS = tuple(p for p in SPLIT_PROTOCOLS if p != "random")
NORMALISE_BY = ("none", "speaker")  # feature normalisation of a training/evaluation run
# the metric every run reports with its epoch count (1-based, continued across restarts: Tune's
# training_iteration starts again at 1 when a lost trial is started again); ASHA and the search's
# results table count it
EPOCHS = "epochs_done"


@dataclasses.dataclass
class DataSpec:
    """Where a ``ser-ray train`` / ``ser-ray cv`` run gets its clips and how it splits them."""

    corpus: str | None = None  # cremad | ravdess | emodb | synthetic
    root: str | None = None  # corpus directory or s3:// prefix
    # several corpora combined under the run's label map, e.g. [{corpus: emodb, root: ...}, ...]
    corpora: list[dict] | None = None
    manifest: str | None = None  # or a manifest file (Parquet/CSV) instead of corpus + root
    protocol: str = "kfold"  # loso | kfold | cremad-fixed | fixed (70/10/20 speakers)
    k: int = 5  # folds for kfold
    folds: str | None = None  # published folds (JSON/CSV: test speakers per fold), used as given
    test_fold: int = 0  # the fold held out by `ser-ray train` (kfold/loso)
    val_fraction: float = 0.15  # share of training speakers held out for validation
    cache_root: str | None = None  # feature cache root; default <out>/cache
    features: dict = dataclasses.field(default_factory=dict)  # FeatureConfig overrides, e.g. n_mels
    # none | speaker: standardise features per speaker over all its clips (test speakers' too, labels
    # unused); cv, compare and cross-corpus (see ser_ray.features.speaker_norm)
    normalise_by: str = "none"
    speaker_norm: bool = False  # the older name of normalise_by: speaker; kept in step with it
    # playback speeds of extra training copies of the training speakers' clips (speed perturbation,
    # e.g. [0.9, 1.1]); classical families only, never validation or test clips
    speed_perturb: list[float] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.normalise_by not in NORMALISE_BY:
            raise ValueError(f"data.normalise_by {self.normalise_by!r}: choose one of {list(NORMALISE_BY)} "
                             "(per-file normalisation is an annotation option: `ser-ray annotate --normalise-by file`)")
        if self.speaker_norm:
            self.normalise_by = "speaker"
        self.speaker_norm = self.normalise_by == "speaker"
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"data.protocol {self.protocol!r}: choose one of {list(PROTOCOLS)}")
        self.speed_perturb = [float(v) for v in (self.speed_perturb or [])]
        from ser_ray.features.config import MAX_SPEED, MIN_SPEED

        if any(not MIN_SPEED <= v <= MAX_SPEED or v == 1.0 for v in self.speed_perturb):
            raise ValueError(f"data.speed_perturb {self.speed_perturb}: speeds within [{MIN_SPEED}, {MAX_SPEED}], "
                             "other than 1 (the original clips are always used)")
        for i, source in enumerate(self.corpora or []):
            if not isinstance(source, dict) or set(source) != {"corpus", "root"}:
                raise ValueError(f"data.corpora[{i}] = {source!r}: each entry is {{corpus: NAME, root: DIR}}")

    def sources(self) -> list[tuple[str, str]]:
        """``(corpus, root)`` pairs this spec names: ``corpora`` plus ``corpus``/``root`` when both are set."""
        pairs = [(s["corpus"], str(s["root"])) for s in self.corpora or []]
        if self.corpus and self.root:
            pairs.insert(0, (self.corpus, str(self.root)))
        return pairs

    @property
    def corpus_name(self) -> str:
        """The corpus name(s) for results: ``emodb``, ``emodb+ravdess``, or the manifest file."""
        return "+".join(corpus for corpus, _ in self.sources()) or (self.manifest or "")


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run needs besides the data itself."""

    family: str = "cnn"
    hparams: dict = dataclasses.field(default_factory=dict)  # model hyperparameters (see models)
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float | None = 5.0  # max gradient norm; None or 0 turns clipping off
    scheduler: str | None = None  # plateau | cosine; None: cosine for wav2vec2, plateau otherwise
    patience: int = 8  # epochs without a better val UA before stopping; 0 turns early stopping off
    class_weighted: bool = True  # cross-entropy weighted by inverse training class frequency
    augment: dict = dataclasses.field(default_factory=dict)  # Augmenter settings; {} = no augmentation
    mixup: float = 0.0  # Beta(a, a) mixup of training batches (inputs and targets); 0 turns it off
    num_workers: int = 1  # Ray Train workers (data-parallel)
    cpus_per_worker: float = 1.0  # CPUs reserved per worker; torch uses as many threads
    use_gpu: bool | None = None  # None: use a GPU when the cluster has one
    gpus_per_worker: float = 1.0  # with use_gpu; a fraction (0.5) lets two runs share one GPU
    amp: bool | None = None  # mixed precision; None: on with CUDA, never without it
    seed: int = 0
    label_map: str = "six"
    max_failures: int = 2  # worker-group restarts (from the last checkpoint) before giving up
    # cv folds trained at once (each its own Ray Train run); 0: as many as the cluster's CPUs/GPUs hold
    concurrent_folds: int = 0
    storage_path: str | None = None  # Ray Train storage (local dir or s3://); default <out>/ray
    name: str | None = None  # Ray Train run name; a rerun with the same name resumes
    data: DataSpec = dataclasses.field(default_factory=DataSpec)

    def __post_init__(self):
        if isinstance(self.data, dict):
            self.data = DataSpec(**self.data)
        if self.scheduler is None:
            self.scheduler = "cosine" if self.family == "wav2vec2" else "plateau"
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r}: choose one of {list(SCHEDULERS)}")
        for name in ("epochs", "batch_size", "num_workers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if int(self.concurrent_folds) < 0:
            raise ValueError(f"concurrent_folds must be 0 (as many as the cluster holds) or more, got {self.concurrent_folds}")
        if not (self.mixup >= 0 and math.isfinite(self.mixup)):
            raise ValueError(f"mixup must be 0 (off) or a positive Beta parameter, got {self.mixup}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        check_keys(cls, data, "train config")
        if isinstance(data.get("data"), dict):
            check_keys(DataSpec, data["data"], "train config 'data' section")
        return cls(**data)


def config_to_plain(config: TrainConfig | dict) -> dict:
    return config.to_dict() if isinstance(config, TrainConfig) else dict(config)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **defaults: Any) -> TrainConfig:
    """A ``TrainConfig`` from a YAML file (or just ``defaults``) with ``overrides`` applied last."""
    data: dict = dict(defaults)
    if path is not None:
        data.update(read_yaml_mapping(path, "train config"))
    data = apply_overrides(data, overrides)
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path or 'train config'}: {exc}") from exc
