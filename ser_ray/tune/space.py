"""Search spaces: one per model family, written in code, overridable from YAML.

A family's space is a nested dict shaped like the ``TrainConfig`` fields it changes (``lr``,
``weight_decay``, ``batch_size``, ``hparams.*`` for the model, ``augment.*`` for the training-batch
augmenter). Leaves are Ray Tune domains (``tune.loguniform``, ``tune.choice``, ...) or fixed values.

Searching over several families at once is a conditional space: Optuna picks ``family`` first and
then only that family's parameters (named ``<family>/<path>`` so every name has one distribution).
:func:`define_by_run` builds that function for ``OptunaSearch(space=...)``; Ray un-flattens the
``/`` names, so a trial's config reads ``{"family": "cnn", "cnn": {"lr": ..., "hparams": {...}}}``
and :func:`trial_overrides` returns the ``cnn`` part.

YAML overrides (the ``space`` section of a tune config) use one-key mappings for distributions::

    space:
      cnn:
        lr: {loguniform: [1.0e-4, 1.0e-2]}
        batch_size: {choice: [32, 64]}
        hparams:
          width: {choice: [16, 32]}
          cmvn: true            # a fixed value
          dropout: null         # drop the parameter from the search (family default applies)
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from ray import tune
from ray.tune.search.sample import Domain

# Training-batch augmentation (ser_ray.audio.augment.Augmenter): SpecAugment masks on log-mel
# features; p = share of clips hit by each step (p = 0 is "no augmentation", the TrainConfig default).
_LOGMEL_AUGMENT = {
    "p": tune.uniform(0.0, 0.8),
    "freq_mask": tune.choice([0, 8, 16, 24]),  # max mel bins per mask
    "time_mask": tune.choice([0, 10, 20, 40]),  # max frames per mask
}

# Range-valued settings are searched by their low end; the trial gets [low, low + width].
RANGE_WIDTHS = {("augment", "noise_snr_db"): 20.0}

DEFAULT_SPACES: dict[str, dict] = {
    "cnn": {
        "lr": tune.loguniform(1e-4, 3e-3),
        "weight_decay": tune.loguniform(1e-6, 1e-2),
        "batch_size": tune.choice([16, 32, 64]),
        "hparams": {
            "width": tune.choice([16, 24, 32, 48]),
            "dropout": tune.uniform(0.0, 0.6),  # before the head
        },
        "augment": _LOGMEL_AUGMENT,
    },
    "bigru_attn": {
        "lr": tune.loguniform(1e-4, 3e-3),
        "weight_decay": tune.loguniform(1e-6, 1e-2),
        "batch_size": tune.choice([16, 32, 64]),
        "hparams": {
            "hidden": tune.choice([64, 128, 192, 256]),
            "layers": tune.randint(1, 4),  # 1, 2 or 3
            "dropout": tune.uniform(0.0, 0.5),
        },
        "augment": _LOGMEL_AUGMENT,
    },
    "wav2vec2": {
        "lr": tune.loguniform(1e-5, 2e-4),
        "weight_decay": tune.loguniform(1e-6, 1e-2),
        "batch_size": tune.choice([8, 16]),
        "hparams": {
            "freeze": tune.choice(["feature_encoder", "encoder"]),
            "layerwise_lr_decay": tune.uniform(0.7, 1.0),
        },
        "augment": {
            "p": tune.uniform(0.0, 0.8),
            "noise_snr_db": tune.uniform(5.0, 25.0),  # low end of the added-noise SNR range (dB)
        },
    },
    # Classical families: scikit-learn on utterance functionals or MFCC frames (no epochs, no lr).
    "logreg": {"hparams": {"C": tune.loguniform(1e-4, 1.0), "class_weight": tune.choice(["balanced", "none"])}},
    "svm": {
        "hparams": {
            "kernel": tune.choice(["linear", "rbf"]),
            "C": tune.loguniform(1e-4, 100.0),
            "gamma": tune.uniform(0.25, 2.0),  # rbf only, in units of 1/D
            "class_weight": tune.choice(["balanced", "none"]),
        },
    },
    "mlp": {"hparams": {"hidden": tune.choice([64, 128, 256]), "alpha": tune.loguniform(0.1, 100.0)}},
    # bag of audio words: MFCC frames counted against k-means codebooks, then logistic regression
    "boaw": {"hparams": {"C": tune.loguniform(1e-4, 1.0), "codebook_size": tune.choice([500, 1000, 2000]),
                         "assignments": tune.choice([10, 20, 40])}},
}

# YAML distribution name -> Ray Tune constructor taking the listed values
_DISTRIBUTIONS: dict[str, Callable[..., Domain]] = {
    "loguniform": tune.loguniform,
    "uniform": tune.uniform,
    "quniform": tune.quniform,
    "randint": tune.randint,  # [low, high)
    "int": lambda low, high: tune.randint(low, high + 1),  # [low, high], inclusive
    "lograndint": tune.lograndint,
    "choice": lambda *values: tune.choice(list(values)),
}


def parse_value(value: Any, where: str = "space") -> Any:
    """A YAML leaf -> a Ray Tune domain (``{loguniform: [a, b]}``) or the fixed value itself."""
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _DISTRIBUTIONS:
        kind, args = next(iter(value.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise ValueError(f"{where}: choice needs a non-empty list, e.g. {{choice: [16, 32]}}")
            return _DISTRIBUTIONS[kind](*args)
        if not isinstance(args, list) or len(args) not in (2, 3):
            raise ValueError(f"{where}: {kind} needs [low, high], e.g. {{{kind}: [0.0001, 0.01]}}; got {args!r}")
        return _DISTRIBUTIONS[kind](*args)
    return value


def merge_space(base: dict, override: dict | None, where: str = "space") -> dict:
    """``base`` with ``override`` merged in, leaf by leaf; a ``null`` leaf removes that parameter."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        path = f"{where}.{key}"
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and not (len(value) == 1 and next(iter(value)) in _DISTRIBUTIONS):
            out[key] = merge_space(out.get(key) if isinstance(out.get(key), dict) else {}, value, path)
        else:
            out[key] = parse_value(value, path)
    return out


def _zoo_spaces() -> dict[str, dict]:
    """The model-zoo families' spaces (``ser_ray.models.zoo_spaces``, written in the YAML format)."""
    from ser_ray.models.zoo_spaces import ZOO_SPACES

    return {family: merge_space({}, space, f"zoo.{family}") for family, space in ZOO_SPACES.items()}


DEFAULT_SPACES.update(_zoo_spaces())


def family_space(family: str, override: dict | None = None) -> dict:
    """The search space of ``family``: the default in code with ``override`` (from YAML) merged in."""
    if family not in DEFAULT_SPACES:
        raise ValueError(f"no search space for model family {family!r}; known: {sorted(DEFAULT_SPACES)}")
    return merge_space(DEFAULT_SPACES[family], override, where=f"space.{family}")


def flatten(space: dict, prefix: str = "") -> dict[str, Any]:
    """``{"hparams": {"width": d}}`` -> ``{"hparams/width": d}`` (Ray un-flattens ``/`` names)."""
    flat: dict[str, Any] = {}
    for key, value in space.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def optuna_distribution(domain: Domain):
    """The Optuna distribution of a Ray Tune domain (Ray's own converter)."""
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch.convert_search_space({"p": domain})["p"]  # its keys must not contain "/"


def _suggest(trial, name: str, domain: Domain) -> Any:
    """Ask an Optuna trial for ``name`` drawn from a Ray Tune domain (via Ray's own converter)."""
    import optuna.distributions as od

    dist = optuna_distribution(domain)
    if isinstance(dist, od.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, od.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


class DefineByRun:
    """Optuna define-by-run function over ``{family: space}``: ``family`` first, then its parameters.

    Returns the fixed values as constants, so a trial's config is complete. A class rather than a
    closure: Tune pickles the searcher (with this function) into the experiment state for resuming.
    """

    def __init__(self, spaces: dict[str, dict]):
        self.families = list(spaces)
        self.flat = {family: flatten({family: space}) for family, space in spaces.items()}

    def __call__(self, trial) -> dict:
        family = trial.suggest_categorical("family", self.families) if len(self.families) > 1 else self.families[0]
        constants: dict[str, Any] = {"family": family}
        for name, value in self.flat[family].items():
            if isinstance(value, Domain):
                _suggest(trial, name, value)
            else:
                constants[name] = value
        return constants


def define_by_run(spaces: dict[str, dict]) -> DefineByRun:
    """The define-by-run function for ``OptunaSearch(space=...)`` (see :class:`DefineByRun`)."""
    return DefineByRun(spaces)


def trial_overrides(config: dict) -> tuple[str, dict]:
    """``(family, nested TrainConfig overrides)`` from a trial's config (ranges expanded)."""
    family = config["family"]
    overrides = copy.deepcopy(config.get(family) or {})
    for (section, key), width in RANGE_WIDTHS.items():
        value = (overrides.get(section) or {}).get(key)
        if isinstance(value, (int, float)):
            overrides[section][key] = [float(value), float(value) + width]
    return family, overrides


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with nested dicts of ``override`` merged in (a copy; neither input changes)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
