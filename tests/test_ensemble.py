"""Bundles (save/load, local and S3, clear errors) and ensemble fitting (temperatures, weights, CLI)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from scipy.special import softmax

from ser_ray.ensemble import Bundle, Member, load_bundle, save_bundle
from ser_ray.ensemble.fit import fit_temperature, fit_weights, nll
from ser_ray.features.config import FeatureConfig
from ser_ray.models import build_model, save_model

LABELS = ["anger", "happiness", "neutral", "sadness"]
FC = FeatureConfig(n_mels=32)


def tiny_bundle() -> Bundle:
    torch.manual_seed(0)
    cnn = build_model("cnn", len(LABELS), FC, width=4).eval()
    gru = build_model("bigru_attn", len(LABELS), FC, hidden=8, layers=1, attn_dim=8).eval()
    return Bundle(
        LABELS,
        [Member("cnn", cnn, FC, weight=0.7, temperature=1.5), Member("bigru_attn", gru, FC, weight=0.3, temperature=0.8)],
        data_summary={"corpora": ["synthetic"]},
    )


def waves(n=5, seed=0):
    return (np.random.default_rng(seed).standard_normal((n, 48_000)) * 0.1).astype(np.float32)


def test_bundle_round_trip_local(tmp_path):
    bundle = tiny_bundle()
    save_bundle(bundle, str(tmp_path / "b"))
    desc = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert desc["schema_version"] == 1 and desc["labels"] == LABELS
    assert [m["path"] for m in desc["members"]] == ["members/cnn", "members/bigru_attn"]
    assert desc["members"][0]["temperature"] == 1.5 and desc["members"][0]["feature_config"]["n_mels"] == 32
    assert {"sample_rate", "window_s", "data_summary", "ser_ray_version", "created"} <= set(desc)

    loaded = load_bundle(str(tmp_path / "b"))
    x = waves()
    np.testing.assert_allclose(loaded.predict_proba(x), bundle.predict_proba(x), atol=1e-6)
    assert [m.weight for m in loaded.members] == [0.7, 0.3]
    # member_logits + combine is exactly predict_proba (Serve runs them in separate deployments)
    parts = [loaded.member_logits(i, x) for i in range(2)]
    np.testing.assert_allclose(loaded.combine(parts), loaded.predict_proba(x), atol=1e-6)
    probs = loaded.predict_proba(x)
    assert probs.shape == (5, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_bundle_round_trip_s3(s3_bucket):
    bucket, client = s3_bucket
    bundle = tiny_bundle()
    save_bundle(bundle, f"s3://{bucket}/bundles/v1")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert "bundles/v1/bundle.json" in keys and "bundles/v1/members/cnn/model.safetensors" in keys
    loaded = load_bundle(f"s3://{bucket}/bundles/v1")
    np.testing.assert_allclose(loaded.predict_proba(waves()), bundle.predict_proba(waves()), atol=1e-6)


def _edit_json(path, edit):
    desc = json.loads(path.read_text())
    edit(desc)
    path.write_text(json.dumps(desc))


def test_bundle_schema_and_feature_config_mismatch_fail_clearly(tmp_path):
    save_bundle(tiny_bundle(), str(tmp_path / "b"))
    bj = tmp_path / "b" / "bundle.json"
    original = bj.read_text()

    _edit_json(bj, lambda d: d.update(schema_version=99))
    with pytest.raises(ValueError, match="schema version 99"):
        load_bundle(str(tmp_path / "b"))

    bj.write_text(original)
    _edit_json(bj, lambda d: d["members"][1]["feature_config"].update(n_mels=64))
    with pytest.raises(ValueError, match=r"member 'bigru_attn'.*feature config.*n_mels.*\(64, 32\)"):
        load_bundle(str(tmp_path / "b"))

    with pytest.raises(FileNotFoundError, match="bundle.json"):
        load_bundle(str(tmp_path / "nowhere"))


def test_members_must_share_window():
    model = build_model("cnn", 4, FeatureConfig(window_s=2.0), width=4)
    with pytest.raises(ValueError, match="share"):
        Bundle(LABELS, [Member("cnn", model, FeatureConfig(window_s=2.0))], window_s=3.0)


def toy_problem(n=400, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    onehot = np.eye(classes)[y]
    good = 4.0 * onehot + rng.standard_normal((n, classes))  # mostly right, overconfident
    flip = rng.random(n) < 0.15  # some confidently wrong answers: a temperature above 1 helps
    good[flip] = 4.0 * np.eye(classes)[rng.integers(0, classes, flip.sum())] + rng.standard_normal((flip.sum(), classes))
    good *= 3.0  # sharpen: a well-ranked but overconfident member
    poor = 0.5 * onehot + rng.standard_normal((n, classes))  # barely informative
    return good, poor, y


def test_temperature_reduces_nll_and_weights_favour_better_member():
    good, poor, y = toy_problem()
    t = fit_temperature(good, y)
    assert t > 1.0
    assert nll(softmax(good / t, axis=1), y) < nll(softmax(good, axis=1), y) - 0.05

    w = fit_weights([softmax(good / t, axis=1), softmax(poor / fit_temperature(poor, y), axis=1)], y)
    assert w.shape == (2,) and abs(w.sum() - 1) < 1e-9 and w[0] > 0.7


def test_weights_are_fitted_only_where_they_predict_left_out_speakers_better():
    from ser_ray.calibration import choose_weights

    good, poor, y = toy_problem()
    probs = [softmax(good / fit_temperature(good, y), axis=1), softmax(poor / fit_temperature(poor, y), axis=1)]
    speakers = np.arange(len(y)) % 5
    w, how = choose_weights(probs, y, speakers)  # one member is far better everywhere: fitting pays
    assert how == "fitted" and w[0] > 0.7
    assert choose_weights(probs, y)[1] == "fitted"  # without speakers nothing to compare on
    # two equally good members whose strengths flip from speaker to speaker: weights fitted on the
    # pooled rows follow whichever speakers dominate them and lose on the speaker left out
    rng = np.random.default_rng(1)
    n, classes = 400, 4
    y2 = rng.integers(0, classes, n)
    speakers2 = np.repeat(np.arange(8), n // 8)
    onehot = np.eye(classes)[y2]
    strong = np.isin(speakers2, [0, 1, 2, 3, 4])  # member a is sharp on 5 speakers, b on the other 3
    a = softmax(np.where(strong[:, None], 3.0, 0.3) * onehot + rng.standard_normal((n, classes)), axis=1)
    b = softmax(np.where(strong[:, None], 0.3, 3.0) * onehot + rng.standard_normal((n, classes)), axis=1)
    w2, how2 = choose_weights([a, b], y2, speakers2)
    assert how2 == "equal" and np.allclose(w2, 0.5)


def test_ensemble_command_from_model_dirs(tmp_path):
    from ser_ray.cli import main
    from ser_ray.corpora.manifest import write_manifest

    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        path = tmp_path / "audio" / f"clip{i}.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, (rng.standard_normal(16_000 * 2) * 0.1).astype(np.float32), 16_000)
        rows.append({
            # speakers 1001-1002 validate, 1003-1004 test: no speaker on both sides
            "path": str(path), "corpus": "synthetic", "speaker": f"synthetic:{1001 + 2 * (i >= 10) + i % 2}",
            "gender": "female",
            "sentence": "IEO", "emotion": LABELS[i % 4], "intensity": "XX", "duration_s": 2.0, "sample_rate": 16_000,
            "split": "val" if i < 10 else "test",
        })
    manifest = write_manifest(pd.DataFrame(rows), str(tmp_path / "manifest.parquet"))
    bundle = tiny_bundle()
    dirs = []
    for m in bundle.members:
        d = tmp_path / "runs" / m.name / "model"  # a train result dir: the model sits in model/
        save_model(str(d), m.model, family=m.family, hparams=m.resolved_hparams(), labels=LABELS, feature_config=FC)
        dirs.append(str(d.parent))
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "best.json").write_text(json.dumps({m.family: {"checkpoint_path": d, "val_ua": 0.3} for m, d in zip(bundle.members, dirs)}))

    out = tmp_path / "bundle"
    assert main(["ensemble", "--from", str(tmp_path / "exp"), "--out", str(out), "--manifest", manifest]) == 0
    report = json.loads((out / "ensemble_metrics.json").read_text())
    assert set(report["validation"]["members"]) == {"cnn", "bigru_attn"}
    for split in ("validation", "test"):
        assert {"ua", "wa", "macro_f1", "ece"} <= set(report[split]["ensemble"])
    assert report["test"]["ensemble"]["n"] == 6
    loaded = load_bundle(str(out))
    assert abs(sum(m.weight for m in loaded.members) - 1) < 1e-6
    assert loaded.data_summary["n_val"] == 10
    assert loaded.members[0].metrics["validation"]["n"] == 10
    # a split with a speaker on both sides is refused: weights or scores would see that speaker twice
    leaky = pd.DataFrame(rows).assign(speaker="synthetic:1001")
    leaky_path = write_manifest(leaky, str(tmp_path / "leaky.parquet"))
    assert main(["ensemble", "--from", str(tmp_path / "exp"), "--out", str(tmp_path / "b2"), "--manifest", leaky_path]) == 2


@pytest.mark.parametrize("backend", ["auto", "torchscript", "onnx"])
def test_faster_member_forms_give_the_same_logits(tmp_path, backend):
    """optimise_for_inference runs a member as an ONNX Runtime session or a TorchScript trace only where
    its logits equal the module's: every member's logits after it equal the eager ones (1e-4) at batch
    sizes other than the example's, and each member says which form it runs (forced forms are used)."""
    from ser_ray.ensemble import Bundle, Member, load_bundle, save_bundle
    from ser_ray.models import build_model

    torch.manual_seed(0)
    fc = FeatureConfig(kind="logmel", window_s=1.0, n_mels=32, n_fft=512, hop_length=256)
    members = [Member("cnn", build_model("cnn", 4, fc, width=8).eval(), fc, name="cnn"),
               Member("bigru_attn", build_model("bigru_attn", 4, fc, hidden=16, attn_dim=16).eval(), fc, name="gru")]
    uri = save_bundle(Bundle(["a", "b", "c", "d"], members, window_s=1.0), str(tmp_path / "b"))
    eager, fast = load_bundle(uri), load_bundle(uri)
    backends = fast.optimise_for_inference(backend)
    assert set(backends) == {"cnn", "gru"} and {m.name: m.backend for m in fast.members} == backends
    assert set(backends.values()) <= {"onnx", "torchscript", "eager"}
    if backend != "auto":
        assert set(backends.values()) == {backend}
    rng = np.random.default_rng(1)
    for n in (1, 3, 8, 13):
        waves = (0.1 * rng.standard_normal((n, 16_000))).astype(np.float32)
        for i in range(2):
            np.testing.assert_allclose(fast.member_logits(i, waves), eager.member_logits(i, waves), atol=1e-4)
    fast.to("cpu")  # moving a bundle drops its converted forms (they are tied to a device)
    assert {m.backend for m in fast.members} == {"eager"}


class _BakesItsBatchSize(torch.nn.Module):
    """Logits that depend on the batch size through a Python int: a trace or an ONNX export bakes the
    example's size in and answers wrongly for any other size."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.linear(x.mean(-1)) * int(x.shape[0])


@pytest.mark.parametrize("backend", ["auto", "onnx", "torchscript"])
def test_a_form_that_differs_from_the_model_is_not_used(backend):
    """A converted form whose logits differ at other batch sizes than its example's is refused: the
    member runs as the module itself (eager) and its logits stay right at every size."""
    from ser_ray.ensemble.runtime import choose_runner

    fc = FeatureConfig(kind="logmel", window_s=1.0, n_mels=32, n_fft=512, hop_length=256)
    model = _BakesItsBatchSize().eval()
    runner, name = choose_runner(model, fc, "cpu", backend)
    assert (runner, name) == (model, "eager")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_writes_members_that_compute_the_same_logits(tmp_path, fmt):
    """`ser-ray export` writes each member as ONNX (run here with onnxruntime) or TorchScript (torch.jit.load)
    and export.json; the exported files give the bundle's member logits (1e-4), and export.json's
    weights and temperatures recombine them into Bundle.predict_proba."""
    import onnxruntime as ort
    from scipy.special import softmax as sp_softmax

    from ser_ray.cli import main
    from ser_ray.ensemble import Bundle, Member, load_bundle, save_bundle
    from ser_ray.models import build_model

    torch.manual_seed(0)
    fc = FeatureConfig(kind="logmel", window_s=1.0, n_mels=32, n_fft=512, hop_length=256)
    members = [Member("cnn", build_model("cnn", 4, fc, width=8).eval(), fc, weight=3, temperature=2.0, name="cnn"),
               Member("bigru_attn", build_model("bigru_attn", 4, fc, hidden=16, attn_dim=16).eval(), fc, name="gru")]
    uri = save_bundle(Bundle(["a", "b", "c", "d"], members, window_s=1.0), str(tmp_path / "b"))
    assert main(["export", "--bundle", uri, "--out", str(tmp_path / "x"), "--format", fmt]) == 0
    desc = json.loads((tmp_path / "x" / "export.json").read_text())
    assert [m["name"] for m in desc["members"]] == ["cnn", "gru"] and desc["labels"] == ["a", "b", "c", "d"]
    bundle = load_bundle(uri)
    waves = (0.1 * np.random.default_rng(2).standard_normal((5, 16_000))).astype(np.float32)
    features = bundle.features(waves)[fc]
    probs = 0
    for i, entry in enumerate(desc["members"]):
        path = str(tmp_path / "x" / entry["file"])
        if fmt == "onnx":
            logits = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"features": features})[0]
        else:
            logits = torch.jit.load(path)(torch.as_tensor(features)).numpy()
        np.testing.assert_allclose(logits, bundle.member_logits(i, waves), atol=1e-4)
        probs = probs + entry["weight"] * sp_softmax(logits / entry["temperature"], axis=1)
    np.testing.assert_allclose(probs, bundle.predict_proba(waves), atol=1e-4)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_refusing_a_member_writes_nothing(tmp_path, fmt):
    """A member whose exported form would differ is refused with its name, and the members before it
    are not written either: no half ensemble in the output directory."""
    from ser_ray.ensemble import Bundle, Member
    from ser_ray.ensemble.export import write_export
    from ser_ray.models import build_model

    fc = FeatureConfig(kind="logmel", window_s=1.0, n_mels=32, n_fft=512, hop_length=256)
    bundle = Bundle(["a", "b", "c", "d"], [Member("cnn", build_model("cnn", 4, fc, width=8).eval(), fc, name="cnn"),
                                           Member("cnn", _BakesItsBatchSize().eval(), fc, name="odd")], window_s=1.0)
    with pytest.raises(ValueError, match="member 'odd'.*nothing was written"):
        write_export(bundle, str(tmp_path / "x"), fmt, source="memory")
    assert not (tmp_path / "x").exists()
