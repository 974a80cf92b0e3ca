"""Search spaces for the model-zoo families, as plain data.

Written in the format of a tune config's YAML ``space`` section (``ser_ray.tune.space``): a nested
dict shaped like the ``TrainConfig`` fields (``lr``, ``weight_decay``, ``batch_size``, ``hparams.*``,
``augment.*``) whose leaves are one-key distributions (``{"loguniform": [lo, hi]}``,
``{"uniform": [lo, hi]}``, ``{"int": [lo, hi]}`` (inclusive), ``{"choice": [...]}``) or fixed values.
``ser_ray.tune.space.merge_space({}, ZOO_SPACES[family])`` turns one into Ray Tune domains.
Kept as data here (no Ray import) so the models package stays light.
"""

from __future__ import annotations

_OPTIMISER = {
    "lr": {"loguniform": [1.0e-4, 3.0e-3]},
    "weight_decay": {"loguniform": [1.0e-6, 1.0e-2]},
    "batch_size": {"choice": [16, 32, 64]},
}

# SpecAugment on the training batch (ser_ray.audio.augment.Augmenter); p = 0 is no augmentation.
_SPEC_AUGMENT = {
    "p": {"uniform": [0.0, 0.8]},
    "freq_mask": {"choice": [0, 8, 16, 24]},  # max bands per mask
    "time_mask": {"choice": [0, 10, 20, 40]},  # max frames per mask
}
# ZCR/energy rows are too few to mask: time masks only.
_TIME_AUGMENT = {"p": {"uniform": [0.0, 0.8]}, "freq_mask": 0, "time_mask": {"choice": [0, 5, 10, 20]}}

ZOO_SPACES: dict[str, dict] = {
    "acrnn": {
        **_OPTIMISER,
        "mixup": {"choice": [0.0, 0.2, 0.4]},
        "hparams": {"width": {"choice": [16, 32]}, "hidden": {"choice": [64, 128]},
                    "dropout": {"uniform": [0.1, 0.5]}},
        "augment": _SPEC_AUGMENT,
    },
    "dummynet": {
        **_OPTIMISER,
        "hparams": {
            "channels": {"choice": ["zcr", "energy", "both"]},
            "width": {"choice": [128, 256, 512]},
            "dense": {"choice": [128, 256, 512]},
            "dropout": {"uniform": [0.0, 0.5]},
        },
        "augment": _TIME_AUGMENT,
    },
    "rezonet": {
        **_OPTIMISER,
        "hparams": {
            "width": {"choice": [8, 16, 32]},
            "freq_kernel": {"choice": [5, 7, 9, 11]},
            "time_kernel": {"choice": [5, 7, 9, 11]},
            "dropout": {"uniform": [0.1, 0.5]},
        },
        "augment": {**_SPEC_AUGMENT, "freq_mask": {"choice": [0, 4, 8]}},  # 40 bands only
    },
    "exponet": {
        **_OPTIMISER,
        "hparams": {
            "width": {"choice": [16, 32, 64]},
            "kernel": {"choice": [3, 5, 7]},
            "dense": {"choice": [256, 512]},
            "dropout": {"uniform": [0.1, 0.5]},
        },
        "augment": _SPEC_AUGMENT,
    },
    "mfcc_cnn": {
        **_OPTIMISER,
        "hparams": {
            "width": {"choice": [32, 64, 96]},
            "kernel": {"choice": [3, 5, 7]},
            "dropout": {"uniform": [0.0, 0.4]},
        },
        "augment": {**_SPEC_AUGMENT, "freq_mask": {"choice": [0, 4, 8]}},  # 40 coefficients
    },
    "td_cnn_lstm": {
        **_OPTIMISER,
        "hparams": {
            "chunks": {"choice": [5, 7, 9]},
            "width": {"choice": [16, 32, 64]},
            "hidden": {"choice": [64, 128, 256]},
            "dropout": {"uniform": [0.1, 0.5]},
        },
        "augment": _SPEC_AUGMENT,
    },
    "td_cnn_bilstm_attn": {
        **_OPTIMISER,
        "hparams": {
            "chunks": {"choice": [5, 7, 9]},
            "width": {"choice": [16, 32, 64]},
            "hidden": {"choice": [64, 128, 256]},
            "attn_dim": {"choice": [32, 64, 128]},
            "dropout": {"uniform": [0.1, 0.5]},
        },
        "augment": _SPEC_AUGMENT,
    },
    "par_cnn_bilstm_attn": {
        **_OPTIMISER,
        "hparams": {
            "width": {"choice": [8, 16, 32]},
            "hidden": {"choice": [64, 128, 256]},
            "layers": {"int": [1, 2]},
            "attn_dim": {"choice": [32, 64, 128]},
            "dropout": {"uniform": [0.1, 0.5]},
        },
        "augment": _SPEC_AUGMENT,
    },
    "par_cnn_transformer": {
        **_OPTIMISER,
        "lr": {"loguniform": [5.0e-5, 1.0e-3]},  # transformers like smaller steps
        "hparams": {
            "width": {"choice": [8, 16, 32]},
            "d_model": {"choice": [32, 64, 128]},
            "heads": {"choice": [2, 4]},  # every d_model above divides by both
            "layers": {"int": [1, 4]},
            "ff_dim": {"choice": [128, 256, 512]},
            "dropout": {"uniform": [0.1, 0.5]},
        },
        "augment": _SPEC_AUGMENT,
    },
}
