"""Model families: shapes, a training step, save/load round-trips (local and S3), batch independence.

Tiny sizes throughout (32 mels, 1 s windows, a 2-layer random wav2vec2), all on CPU, no hub access.
"""

from __future__ import annotations

import pytest
import torch

from helpers import one_torch_thread, train_steps  # noqa: F401  (one_torch_thread: autouse fixture)
from ser_ray.features.config import FeatureConfig
from ser_ray.models import (
    MODELS,
    build_model,
    default_hparams,
    family_input_kind,
    load_model,
    on_epoch_start,
    param_groups,
    save_model,
)

LABELS = ["anger", "disgust", "fear", "happiness", "neutral", "sadness"]
LOGMEL = FeatureConfig(kind="logmel", window_s=1.0, n_mels=32, n_fft=512, hop_length=256)
WAVE = FeatureConfig(kind="waveform", window_s=0.25)  # 4000 samples -> 399 wav2vec2 frames
SMALL = {"cnn": {"width": 8}, "bigru_attn": {"hidden": 16, "attn_dim": 16}}


def logmel_batch(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *LOGMEL.shape, generator=g) * 10 - 40  # dB-like values


def test_registry_lists_families_and_their_inputs():
    assert {"cnn", "bigru_attn", "wav2vec2"} <= set(MODELS)
    assert family_input_kind("cnn") == "logmel"
    assert family_input_kind("bigru_attn") == "logmel"
    assert family_input_kind("wav2vec2") == "waveform"
    assert default_hparams("cnn")["cmvn"] is True
    assert default_hparams("wav2vec2")["freeze"] == "feature_encoder"


def test_bad_requests_fail_with_clear_messages():
    with pytest.raises(ValueError, match=r"unknown hyperparameter.*'widht'.*valid.*'width'"):
        build_model("cnn", 6, LOGMEL, widht=16)
    with pytest.raises(ValueError, match="unknown model family 'resnet'"):
        build_model("resnet", 6, LOGMEL)
    with pytest.raises(ValueError, match="kind='logmel'"):
        build_model("cnn", 6, WAVE)
    with pytest.raises(ValueError, match="freeze="):
        build_model("wav2vec2", 6, WAVE, freeze="everything", pretrained="/nonexistent")


@pytest.mark.parametrize("family", ["cnn", "bigru_attn"])
def test_spectrogram_family_trains_and_gives_logits(family):
    torch.manual_seed(0)
    model = build_model(family, len(LABELS), LOGMEL, **SMALL[family])
    x, y = logmel_batch(4), torch.tensor([0, 1, 2, 3])
    assert model(x).shape == (4, len(LABELS))
    before = [p.detach().clone() for p in model.parameters()]
    losses = train_steps(model, x, y, params=param_groups(model, 1e-3))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("family", ["cnn", "bigru_attn"])
def test_prediction_ignores_batch_and_recording_level(family):
    torch.manual_seed(0)
    model = build_model(family, len(LABELS), LOGMEL, **SMALL[family])
    train_steps(model, logmel_batch(4), torch.tensor([0, 1, 2, 3]), steps=2)  # non-trivial BN stats
    model.eval()
    x = logmel_batch(5, seed=1)
    with torch.no_grad():
        batched = model(x)
        alone = model(x[2:3])
        # a louder recording / another microphone: +12 dB overall, a per-band tilt
        coloured = model(x[2:3] + 12 + torch.linspace(-3, 3, LOGMEL.n_mels).view(1, -1, 1))
    torch.testing.assert_close(alone, batched[2:3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(coloured, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["cnn", "bigru_attn"])
def test_save_load_round_trip_local(family, tmp_path):
    model = build_model(family, len(LABELS), LOGMEL, **SMALL[family])
    train_steps(model, logmel_batch(4), torch.tensor([0, 1, 2, 3]), steps=1)
    meta = save_model(
        tmp_path / "m", model, family=family, hparams=SMALL[family], labels=LABELS,
        feature_config=LOGMEL, extra={"fold": 3},
    )
    assert (tmp_path / "m" / "model.json").is_file() and (tmp_path / "m" / "model.safetensors").is_file()
    loaded, meta2 = load_model(str(tmp_path / "m"))
    assert meta2.family == family and meta2.labels == LABELS and meta2.feature_config == LOGMEL
    assert meta2.hparams == meta.hparams == {**default_hparams(family), **SMALL[family]}
    assert meta2.extra["fold"] == 3
    model.eval()
    x = logmel_batch(3, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_save_load_round_trip_s3(s3_bucket):
    bucket, client = s3_bucket
    model = build_model("cnn", len(LABELS), LOGMEL, width=8).eval()
    uri = f"s3://{bucket}/runs/fold0/model"
    save_model(uri, model, family="cnn", hparams={"width": 8}, labels=LABELS, feature_config=LOGMEL)
    # (pyarrow also writes "runs/"-style directory markers)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"] if not o["Key"].endswith("/")}
    assert keys == {"runs/fold0/model/model.json", "runs/fold0/model/model.safetensors"}
    loaded, meta = load_model(uri)
    x = logmel_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert meta.labels == LABELS


def test_load_model_names_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_model"):
        load_model(str(tmp_path / "nothing"))


# -- wav2vec2 --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    """A random, tiny wav2vec2 checkpoint written with save_pretrained (stands in for the hub)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32, 32), conv_kernel=(10, 3), conv_stride=(5, 2), conv_bias=False,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_labels=6,
    )
    path = tmp_path_factory.mktemp("pretrained") / "tiny-wav2vec2"
    Wav2Vec2Model(config).save_pretrained(path)
    return path


def wave_batch(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(n, 1, WAVE.num_samples, generator=g)


def test_wav2vec2_from_local_pretrained_trains_saves_and_reloads(tiny_pretrained, tmp_path):
    torch.manual_seed(0)
    model = build_model("wav2vec2", len(LABELS), WAVE, pretrained=str(tiny_pretrained))
    # the pretrained encoder really was loaded, and the head is new
    from safetensors.torch import load_file

    ref = load_file(tiny_pretrained / "model.safetensors")
    key = "encoder.layers.0.attention.q_proj.weight"
    torch.testing.assert_close(model.model.wav2vec2.state_dict()[key], ref[key])
    assert model.model.classifier.out_features == len(LABELS)

    x, y = wave_batch(2), torch.tensor([0, 5])
    assert model(x).shape == (2, len(LABELS))
    assert model(x.squeeze(1)).shape == (2, len(LABELS))  # [B, samples] works too
    losses = train_steps(model, x, y, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))

    save_model(tmp_path / "m", model, family="wav2vec2", hparams={"pretrained": "s3://gone/nowhere"},
               labels=LABELS, feature_config=WAVE)
    loaded, meta = load_model(str(tmp_path / "m"))  # must not touch the pretrained source
    assert meta.extra["transformers_config"]["hidden_size"] == 32
    model.eval()
    x = wave_batch(3, seed=1)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)
        # one clip alone gives the same logits as inside a batch; loudness does not matter
        torch.testing.assert_close(model(x[1:2]), out[1:2], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(3.0 * x[1:2]), out[1:2], rtol=1e-4, atol=1e-4)


def test_wav2vec2_from_s3_pretrained(tiny_pretrained, s3_bucket, tmp_path, monkeypatch):
    from ser_ray.models import wav2vec2

    bucket, client = s3_bucket
    for f in tiny_pretrained.iterdir():
        client.upload_file(str(f), bucket, f"zoo/tiny-wav2vec2/{f.name}")
    monkeypatch.setattr(wav2vec2, "DEFAULT_CACHE", tmp_path / "cache")
    uri = f"s3://{bucket}/zoo/tiny-wav2vec2"
    model = build_model("wav2vec2", 4, WAVE, pretrained=uri, freeze="encoder")
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1
    assert {p.name for p in cached[0].iterdir()} == {p.name for p in tiny_pretrained.iterdir()}
    local = build_model("wav2vec2", 4, WAVE, pretrained=str(tiny_pretrained), freeze="encoder")
    base = lambda m: m.model.wav2vec2.state_dict()  # noqa: E731
    for k, v in base(local).items():
        torch.testing.assert_close(base(model)[k], v)
    build_model("wav2vec2", 4, WAVE, pretrained=uri)  # second build reuses the cache
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_wav2vec2_freezing_and_layerwise_lr(tiny_pretrained):
    def trainable(model, part):
        return {p.requires_grad for n, p in model.model.named_parameters() if part in n}

    kw = {"pretrained": str(tiny_pretrained)}
    m = build_model("wav2vec2", 6, WAVE, **kw)  # default: feature encoder frozen
    assert trainable(m, "feature_extractor") == {False}
    assert trainable(m, "encoder.layers") == {True} and trainable(m, "classifier") == {True}

    assert m.find_unused_parameters  # the checkpoint's layerdrop 0.1: DDP must allow skipped layers

    m = build_model("wav2vec2", 6, WAVE, freeze="none", layerdrop=0.0, mask_time_prob=0.0, **kw)
    assert all(p.requires_grad for p in m.parameters())
    assert m.model.config.layerdrop == 0.0 and not m.find_unused_parameters

    m = build_model("wav2vec2", 6, WAVE, freeze="encoder", unfreeze_after_epochs=2, **kw)
    assert trainable(m, "wav2vec2.") == {False} and trainable(m, "classifier") == {True}
    assert not on_epoch_start(m, 1)
    assert on_epoch_start(m, 2)
    assert trainable(m, "encoder.layers") == {True} and trainable(m, "feature_extractor") == {False}
    assert not on_epoch_start(m, 3)

    m = build_model("wav2vec2", 6, WAVE, layerwise_lr_decay=0.5, **kw)
    groups = param_groups(m, 1e-3)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(m.model.named_parameters())
    assert len(lr_of) == len(named)  # every parameter, frozen ones included
    assert lr_of[id(named["classifier.weight"])] == 1e-3
    assert lr_of[id(named["wav2vec2.encoder.layers.1.attention.q_proj.weight"])] == 1e-3 * 0.5
    assert lr_of[id(named["wav2vec2.encoder.layers.0.attention.q_proj.weight"])] == 1e-3 * 0.25
    assert lr_of[id(named["wav2vec2.feature_projection.projection.weight"])] == 1e-3 * 0.125


def test_two_workers_honour_the_family_hooks(ray_session, tiny_pretrained, tmp_path):
    """wav2vec2 with layerdrop (whole layers skipped each step: DDP needs find_unused_parameters) and a
    scheduled unfreeze at epoch 1 (a DDP wrapper syncs only what was trainable when it was built, so the
    loop wraps again) trains on two Ray Train workers, and the workers' weights stay identical."""
    import numpy as np
    import pandas as pd

    from ser_ray.train.config import TrainConfig
    from ser_ray.train.loop import fit

    rng = np.random.default_rng(0)

    def rows(speakers):
        return pd.DataFrame([
            {"path": f"/w/{s}_{label}_{i}.wav", "speaker": f"w:{s}", "emotion": label, "intensity": "XX",
             "features": (0.1 * (c + 1) * rng.standard_normal((1, WAVE.num_samples))).astype(np.float32),
             "error": None}
            for s in speakers for c, label in enumerate(LABELS[:2]) for i in range(4)])

    cfg = TrainConfig(family="wav2vec2", epochs=2, batch_size=4, lr=1e-3, num_workers=2, cpus_per_worker=0.5,
                      patience=0, hparams={"pretrained": str(tiny_pretrained), "layerdrop": 0.5, "freeze": "encoder",
                                           "unfreeze_after_epochs": 1})
    result = fit(rows([1, 2]), rows([3]), LABELS[:2], WAVE, cfg, name="hooks", storage_path=str(tmp_path / "ray"))
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert all(h["replicas_in_sync"] for h in result.history), [h["replicas_in_sync"] for h in result.history]
