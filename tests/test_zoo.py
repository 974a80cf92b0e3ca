"""The model zoo: every family builds from its own feature config, trains, round-trips through
save/load, and predicts each clip independently of its batch and its recording level.

Tiny sizes throughout (1 s windows, 32 mels where the family allows, a few channels), CPU only.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import one_torch_thread, train_steps  # noqa: F401  (one_torch_thread: autouse fixture)
from ser_ray.features.config import FeatureConfig
from ser_ray.models import (
    MODELS,
    build_model,
    default_hparams,
    family_feature_config,
    family_input_kind,
    load_model,
    save_model,
)
from ser_ray.models.zoo_spaces import ZOO_SPACES

LABELS = ["anger", "disgust", "fear", "happiness", "neutral", "sadness"]
BASE = FeatureConfig(window_s=1.0, n_mels=32, n_fft=512, hop_length=256)
TINY = {
    "acrnn": {"width": 4, "hidden": 8, "attn_dim": 8},
    "dummynet": {"width": 32, "dense": 16},
    "rezonet": {"width": 4},
    "exponet": {"width": 8, "dense": 32},
    "mfcc_cnn": {"width": 8},
    "td_cnn_lstm": {"width": 4, "hidden": 8},
    "td_cnn_bilstm_attn": {"width": 4, "hidden": 8, "attn_dim": 8},
    "par_cnn_bilstm_attn": {"width": 4, "hidden": 8, "attn_dim": 8},
    "par_cnn_transformer": {"width": 4, "d_model": 16, "heads": 2, "layers": 1, "ff_dim": 32},
}
ZOO = list(TINY)


def features(config: FeatureConfig, n: int, seed: int = 0) -> torch.Tensor:
    """A batch shaped like ``config``'s cached features, with plausible value ranges."""
    g = torch.Generator().manual_seed(seed)
    if config.kind == "zcr_energy":
        zcr = torch.rand(n, 1, config.num_frames, generator=g) * 0.5
        rms = torch.rand(n, 1, config.num_frames, generator=g) * 0.1
        return torch.cat([zcr, rms], dim=1)
    return torch.randn(n, *config.shape, generator=g) * 10 - 40  # dB-like


def build(family: str, config: FeatureConfig | None = None):
    torch.manual_seed(0)
    config = config or family_feature_config(family, BASE)
    return build_model(family, len(LABELS), config, **TINY[family]), config


def test_zoo_families_declare_their_features():
    assert set(ZOO) <= set(MODELS)
    fc = family_feature_config("rezonet", BASE)
    assert (fc.kind, fc.n_mels, fc.n_fft, fc.hop_length, fc.window_s) == ("logmel", 40, 512, 160, 1.0)
    assert family_feature_config("mfcc_cnn", BASE).kind == "mfcc"
    assert family_feature_config("dummynet").kind == family_input_kind("dummynet") == "zcr_energy"
    # families without requirements get the base config back, with their kind
    assert family_feature_config("cnn", BASE) == BASE
    assert family_feature_config("wav2vec2", BASE) == dataclasses.replace(BASE, kind="waveform")
    # build_model's default feature config is the family's own (dummynet's flatten needs zcr_energy)
    model = build_model("dummynet", 4, width=16, dense=8)
    assert model(features(family_feature_config("dummynet"), 2)).shape == (2, 4)


@pytest.mark.parametrize("family", ZOO)
def test_zoo_family_gives_logits_and_trains(family):
    model, config = build(family)
    x, y = features(config, 4), torch.tensor([0, 1, 2, 3])
    assert model(x).shape == (4, len(LABELS))
    before = [p.detach().clone() for p in model.parameters()]
    losses = train_steps(model, x, y)
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert all(changed), f"{family}: {changed.count(False)} parameter tensors got no update"


@pytest.mark.parametrize("family", ZOO)
def test_zoo_family_round_trips_and_ignores_batch_and_level(family, tmp_path):
    model, config = build(family)
    train_steps(model, features(config, 4), torch.tensor([0, 1, 2, 3]))  # non-trivial BN stats
    save_model(tmp_path / "m", model, family=family, hparams=TINY[family], labels=LABELS, feature_config=config)
    loaded, meta = load_model(str(tmp_path / "m"))
    assert meta.family == family and meta.feature_config == config
    model.eval()
    x = features(config, 3, seed=1)
    with torch.no_grad():
        batched = model(x)
        torch.testing.assert_close(loaded(x), batched, rtol=0, atol=0)
        torch.testing.assert_close(model(x[1:2]), batched[1:2], rtol=1e-4, atol=1e-5)
        # a louder recording: +12 dB on dB features, 4x the RMS energy on zcr_energy
        louder = x.clone()
        if config.kind == "zcr_energy":
            louder[:, 1] *= 4.0
        else:
            louder += 12.0
        torch.testing.assert_close(model(louder), batched, rtol=1e-4, atol=1e-4)


def test_acrnn_pools_over_the_clip_not_its_padding():
    """The same clip padded to two window lengths (log-mel at its floor) gives the same logits."""
    model, config = build("acrnn")
    model.eval()
    clip = features(config, 1)[:, :, :40]
    floor = clip.amin() - 1.0
    short = torch.cat([clip, torch.full((1, config.num_channels, 23), float(floor))], dim=2)
    long = torch.cat([clip, torch.full((1, config.num_channels, 60), float(floor))], dim=2)
    with torch.no_grad():
        torch.testing.assert_close(model(short), model(long), rtol=1e-4, atol=1e-4)
    assert model.frame_mask(short).sum() == 40


def test_dummynet_channel_choice_and_log_mel_input():
    config = family_feature_config("dummynet", BASE)
    x = features(config, 2)
    zcr_only = build_model("dummynet", 6, config, channels="zcr", width=16, dense=8).eval()
    with torch.no_grad():
        out = zcr_only(x)
        x2 = x.clone()
        x2[:, 1] = torch.rand_like(x2[:, 1])  # the energy row is not read
        torch.testing.assert_close(zcr_only(x2), out)
    with pytest.raises(ValueError, match="channels='pitch'"):
        build_model("dummynet", 6, config, channels="pitch")
    model = build_model("dummynet", 6, BASE, width=16, dense=8)  # log-mel: bands as channels
    assert model(features(BASE, 2)).shape == (2, 6)
    with pytest.raises(ValueError, match="kind='zcr_energy'"):
        build_model("dummynet", 6, dataclasses.replace(BASE, kind="mfcc"))


def test_zoo_spaces_name_real_hparams_and_sample_into_buildable_models():
    space = pytest.importorskip("ser_ray.tune.space")
    assert set(ZOO_SPACES) == set(ZOO)
    for family, plain in ZOO_SPACES.items():
        assert set(plain["hparams"]) <= set(default_hparams(family)), family
        domains = space.merge_space({}, plain, where=f"zoo.{family}")  # the tune YAML format parses
        for _ in range(2):
            hparams = {k: (v.sample() if hasattr(v, "sample") else v) for k, v in domains["hparams"].items()}
            config = family_feature_config(family, BASE)
            with torch.no_grad():
                assert build_model(family, 6, config, **hparams).eval()(features(config, 1)).shape == (1, 6)
