"""The search's configuration: data, families, budget, scheduler, resources, storage (YAML + overrides)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ser_ray import storage
from ser_ray.config import apply_overrides, check_keys, read_yaml_mapping
from ser_ray.train.config import DataSpec
from ser_ray.tune import space as spaces

# Per-trial resources of one Train worker; cnn/bigru_attn share a GPU four ways.
DEFAULT_RESOURCES: dict[str, dict] = {
    "cnn": {"cpu": 1.0, "gpu": 0.25},
    "bigru_attn": {"cpu": 1.0, "gpu": 0.25},
    "wav2vec2": {"cpu": 4.0, "gpu": 1.0},
}

DRIVER_CPU = 0.25  # the trial's own process (builds datasets, waits on the TorchTrainer)



@dataclasses.dataclass
class SearchConfig:
    """One search: data, families, budget, scheduler, resources, storage. Loadable from YAML."""

    name: str = "tune"
    data: DataSpec = dataclasses.field(default_factory=DataSpec)  # corpus, root, protocol, test_fold, features
    families: list[str] = dataclasses.field(default_factory=lambda: ["cnn", "bigru_attn"])
    num_samples: int = 16  # trials in all (over every family)
    max_epochs: int = 20  # epochs of a trial that ASHA never stops
    grace_period: int = 2  # epochs every trial gets before ASHA may stop it
    reduction_factor: int = 3  # ASHA keeps the top 1/reduction_factor at each rung
    max_concurrent_trials: int = 2
    resources: dict = dataclasses.field(default_factory=dict)  # family -> {cpu, gpu}; merged over DEFAULT_RESOURCES
    gpu: bool | None = None  # None: use GPUs when the cluster has them
    seed: int = 0
    tpe_startup_trials: int = 5  # random trials before TPE models the results (Optuna's default is 10)
    metric: str = "val_ua"
    storage_path: str = "~/ser-ray-results/tune"  # local directory or s3:// prefix
    train: dict = dataclasses.field(default_factory=dict)  # TrainConfig fields every trial starts from
    space: dict = dataclasses.field(default_factory=dict)  # family -> space overrides (see space.py)
    start_from_defaults: bool = True  # each family's first trial is its default config (a baseline)
    evaluate_test: bool = True  # test metrics of the best trial per family (selection stays on val)
    # a trial whose process dies (its node lost) is started again up to this many times; its
    # TorchTrainer (same storage and name) resumes from the last checkpoint
    trial_retries: int = 2

    def __post_init__(self):
        if isinstance(self.data, dict):
            self.data = DataSpec(**self.data)
        if self.data.speaker_norm:
            raise ValueError("data.speaker_norm is an evaluation option of cv/compare (it needs every clip "
                             "of the test speakers up front); the models a search leaves behind serve unknown "
                             "speakers, so tune does not take it")
        if isinstance(self.families, str):
            self.families = [f.strip() for f in self.families.split(",") if f.strip()]
        if not self.families:
            raise ValueError("families: name at least one model family, e.g. [cnn, bigru_attn]")
        for family in self.families:
            spaces.family_space(family)  # unknown family -> clear error
        for name in ("num_samples", "max_epochs", "grace_period", "max_concurrent_trials"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if int(self.trial_retries) < 0:
            raise ValueError(f"trial_retries must be 0 or more, got {self.trial_retries}")
        unknown = sorted(set(self.space) - set(spaces.DEFAULT_SPACES))
        if unknown:
            raise ValueError(f"space: unknown family {unknown}; known: {sorted(spaces.DEFAULT_SPACES)}")

    @property
    def experiment_path(self) -> str:
        return storage.join(storage_root(self.storage_path), self.name)

    def family_resources(self, family: str) -> dict:
        return {**DEFAULT_RESOURCES.get(family, {"cpu": 1.0, "gpu": 0.0}), **(self.resources.get(family) or {})}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_search_config(path: str | Path | None = None, overrides: list[str] | None = None,
                       **options: Any) -> SearchConfig:
    """A ``SearchConfig`` from YAML, then ``--set`` style ``overrides`` (``max_epochs=4``,
    ``data.features.n_mels=64``), then keyword ``options`` from command flags (``None`` values ignored)."""
    data = read_yaml_mapping(path, "tune config") if path is not None else {}
    return search_config_from_mapping(apply_overrides(data, overrides), str(path or "tune config"), **options)


def search_config_from_mapping(data: dict, where: str = "tune config", **options: Any) -> SearchConfig:
    """A ``SearchConfig`` from a mapping and keyword options (``data.root=...``; ``None`` values are
    ignored); unknown keys are refused, naming the valid ones."""
    data = dict(data)
    for key, value in options.items():
        if value is None:
            continue
        if key.startswith("data."):
            data["data"] = {**(data.get("data") or {}), key[5:]: value}
        else:
            data[key] = value
    check_keys(SearchConfig, data, where)
    try:
        return SearchConfig(**data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


def storage_root(path: str) -> str:
    """A local path made absolute (``~`` expanded); an ``s3://`` prefix as given."""
    return path if storage.is_s3(path) else str(Path(path).expanduser().resolve())

