"""Utterance functionals and the classical families (logreg, svm): features, fitting, the torch form of
the fitted scikit-learn models, saving and loading, and ``ser-ray cv`` with them on real Ray."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch

from ser_ray.features import FeatureConfig, FeatureExtractor
from ser_ray.models import build_model, family_feature_config, load_model, save_model

SR = 16_000
FUNCTIONALS = FeatureConfig(kind="functionals", window_s=2.0, n_mels=32, n_mfcc=13, n_fft=512, hop_length=160)


def voice(seconds: float, f0: float = 150.0, level: float = 0.3, seed: int = 0) -> np.ndarray:
    """A harmonic "vowel" with a little noise: voiced, with a known pitch."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    return (level * x / 2 + 0.005 * rng.standard_normal(len(t))).astype(np.float32)


def test_functionals_are_named_finite_and_ignore_the_padding():
    extractor = FeatureExtractor(FUNCTIONALS)
    names = FUNCTIONALS.feature_names()
    assert FUNCTIONALS.shape == (len(names), 1) and len(set(names)) == len(names)
    clip = voice(1.2)
    padded_2s = extractor.prepare_wave(clip, SR)  # zero-padded to the 2 s window
    longer = FeatureExtractor(FeatureConfig(**{**FUNCTIONALS.to_dict(), "window_s": 3.0}))
    a = extractor(padded_2s[None])[0, :, 0]
    b = longer(longer.prepare_wave(clip, SR)[None])[0, :, 0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)  # padding is not part of the clip
    value = dict(zip(names, a))
    assert value["duration_s"] == pytest.approx(1.2, abs=0.02)
    # 150 Hz is 17.5 semitones above 55 Hz; most of a steady vowel is voiced
    assert value["f0_p50"] == pytest.approx(12 * np.log2(150 / 55), abs=0.3)
    assert value["voiced_fraction"] > 0.8
    # silence and an empty window give zeros, never NaN; a clip's vector does not depend on its batch
    batch = np.stack([padded_2s, np.zeros_like(padded_2s), extractor.prepare_wave(voice(2.0, 220, seed=1), SR)])
    out = extractor(batch)
    assert np.isfinite(out).all() and not out[1].any()
    np.testing.assert_allclose(out[0, :, 0], a, rtol=1e-5, atol=1e-4)
    # higher pitch and louder voice show up where they should
    high = dict(zip(names, out[2, :, 0]))
    assert high["f0_p50"] > value["f0_p50"] + 5


SMALL = FeatureConfig(kind="functionals", n_mels=2, n_mfcc=2)  # 61 functionals: enough for toy blobs


def toy(n_per_class=12, classes=3, dim=SMALL.num_channels, speakers=4, seed=0):
    """Separable blobs with a per-speaker offset (what speaker-grouped CV has to see through)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (classes, dim))
    x, y, g = [], [], []
    for s in range(speakers):
        offset = rng.normal(0, 1, dim)
        for c in range(classes):
            x.append(centres[c] + offset + rng.normal(0, 1, (n_per_class, dim)))
            y += [c] * n_per_class
            g += [f"s{s}"] * n_per_class
    return np.concatenate(x)[:, :, None].astype(np.float32), np.array(y), np.array(g)


@pytest.mark.parametrize("family,hparams", [("logreg", {}), ("svm", {"kernel": "linear"}), ("svm", {"kernel": "rbf"}),
                                            ("mlp", {"hidden": 16, "seeds": 2})])
def test_classical_fit_matches_sklearn_and_round_trips(tmp_path, family, hparams):
    x, y, g = toy()
    fc = SMALL
    model = build_model(family, 3, fc, **hparams)
    info = model.fit_arrays(x, y, g)
    key = "alpha" if family == "mlp" else "C"
    assert info["inner_folds"] == 4 and info["chosen"][key] in [r[key] for r in info["grid"]]
    assert getattr(model.hparams, key) == info["chosen"][key]  # the saved hparams say what was used
    # the torch module reproduces the fitted scikit-learn estimator(s)' decision values
    z = (x[:, :, 0] - model.mean.numpy()) / model.scale.numpy()
    est = model._fit_scaled(z.astype(np.float64), y, info["chosen"], final=True)
    with torch.no_grad():
        decision = model.decision(torch.as_tensor(z)).numpy()
    np.testing.assert_allclose(decision, model._decision(est, z.astype(np.float64)), rtol=1e-3, atol=1e-3)
    # out-of-fold probabilities are calibrated probabilities of a separable problem
    assert info["oof_probs"].shape == (len(y), 3) and np.allclose(info["oof_probs"].sum(1), 1)
    assert info["inner_ua"] > 0.9 and model.logit_scale.item() > 0
    # saved and loaded (rbf: support vectors of fitted size) -> the same probabilities
    save_model(str(tmp_path / "m"), model, family=family, hparams=None, labels=["a", "b", "c"], feature_config=fc)
    loaded, meta = load_model(str(tmp_path / "m"))
    with torch.no_grad():
        np.testing.assert_allclose(loaded(torch.as_tensor(x)).numpy(), model(torch.as_tensor(x)).numpy(), atol=1e-5)
    assert meta.hparams[key] == getattr(model.hparams, key)


@pytest.mark.parametrize("family,hparams", [("logreg", {"C": 0.1}), ("svm", {"kernel": "rbf", "C": 1.0, "gamma": 1.0})])
def test_speed_copies_train_but_never_judge_or_leak(family, hparams):
    """Copies (``fit_arrays(copies=...)``) join the training rows of the inner folds whose training
    speakers they copy, and only those: the held-out speaker's own copies never reach its out-of-fold
    predictions, and out-of-fold rows are original clips alone."""
    x, y, g = toy()
    x = x + np.random.default_rng(1).normal(0, 8, x.shape).astype(np.float32)  # overlapping classes
    plain = build_model(family, 3, SMALL, **hparams)
    base = plain.fit_arrays(x, y, g)
    # copies of s0 only, with wrong labels: the inner fold that holds s0 out must not see them
    own = g == "s0"
    copies = (x[own] + 0.01, (y[own] + 1) % 3, g[own])
    model = build_model(family, 3, SMALL, **hparams)
    info = model.fit_arrays(x, y, g, copies=copies)
    assert info["n_copies"] == own.sum() and info["oof_probs"].shape == base["oof_probs"].shape

    def decisions(fit):  # out-of-fold decision values (up to a per-row shift) before the fitted temperature
        logp = np.log(fit["oof_probs"])
        return (logp - logp[:, :1]) / fit["logit_scale"]

    np.testing.assert_allclose(decisions(info)[own], decisions(base)[own], atol=1e-5)
    assert not np.allclose(decisions(info)[~own], decisions(base)[~own], atol=1e-2)  # the others trained on them
    assert (model.mean == plain.mean).all()  # standardised by the original clips
    with torch.no_grad():  # the kept model was fitted with the copies (rbf: support vectors among them)
        changed = model(torch.as_tensor(x[own])).argmax(1) != plain(torch.as_tensor(x[own])).argmax(1)
    assert changed.any()
    with pytest.raises(ValueError, match="not among the training speakers"):
        build_model(family, 3, SMALL, **hparams).fit_arrays(x[~own], y[~own], g[~own], copies=copies)


def test_bag_of_audio_words_counts_the_clips_voiced_frames_against_learnt_words(tmp_path):
    """``boaw``: a codebook learnt from the training clips' MFCC frames, one histogram per codebook with
    ``assignments`` counts per counted frame, the zero padding and pauses not counted, and a classifier
    that separates voices by pitch and level; it saves and loads like the other classical families."""
    fc = dataclasses.replace(family_feature_config("boaw"), window_s=1.5)
    extractor = FeatureExtractor(fc)
    pitches, levels = (110.0, 180.0, 260.0), (0.05, 0.2, 0.6)  # three "emotions"
    clips, y, g = [], [], []
    for speaker in range(4):
        for c, (f0, level) in enumerate(zip(pitches, levels)):
            for k in range(4):
                seconds = 0.6 + 0.1 * k
                clips.append(extractor.prepare_wave(voice(seconds, f0 * (1 + 0.04 * speaker), level, seed=speaker * 50 + k), SR))
                y.append(c)
                g.append(f"s{speaker}")
    x = extractor(np.stack(clips))
    y, g = np.array(y), np.array(g)
    model = build_model("boaw", 3, fc, codebook_size=24, assignments=3, codebooks=2)
    assert model.num_features == 48
    info = model.fit_arrays(x, y, g)
    assert info["inner_ua"] > 0.9 and model.codebook.abs().sum(-1).gt(0).all()
    with torch.no_grad():
        encoded = model.encode(torch.as_tensor(x))
        counts = torch.expm1(encoded) / 100  # per codebook, each counted frame adds `assignments` counts
        np.testing.assert_allclose(counts.view(len(x), 2, 24).sum(-1).numpy(), 3.0, rtol=1e-4)
        # the padding is not counted: the same clip in a longer window gives the same histogram
        longer = FeatureExtractor(dataclasses.replace(fc, window_s=3.0))
        wide = longer(longer.prepare_wave(voice(0.6, 110.0, 0.05, seed=0), SR)[None])
        np.testing.assert_allclose(model.encode(torch.as_tensor(wide)).numpy(), encoded[:1].numpy(), atol=1e-5)
        _, counted = model.frames(torch.as_tensor(x[:1]))
        assert abs(counted.sum().item() - 0.6 * SR / fc.hop_length) <= 3  # the 0.6 s clip's frames only
        # speaker / recording standardisation (normalise_by) keeps which frames are counted
        from ser_ray.features.speaker_norm import standardise_group

        _, counted_all = model.frames(torch.as_tensor(x))
        _, counted_std = model.frames(torch.as_tensor(standardise_group(x)))
        assert torch.equal(counted_all, counted_std)
        probs = torch.softmax(model(torch.as_tensor(x)), -1).numpy()
    assert (probs.argmax(1) == y).mean() > 0.9
    # an inner fold's rows are encoded with codebooks learnt from that fold's training rows alone;
    # the kept model's codebooks (learnt from every row) are left as they were
    kept = model.codebook.clone()
    train_idx, held_out = np.flatnonzero(g != "s0"), np.flatnonzero(g == "s0")
    # (copies of training rows, here the first four rows themselves, are encoded by the same codebooks)
    z_train, z_copies, z_held_out = model._inner_fold_features(x, train_idx, held_out, x, train_idx[:4])
    np.testing.assert_allclose(z_copies, z_train[:4], atol=1e-9)
    fold_model = build_model("boaw", 3, fc, codebook_size=24, assignments=3, codebooks=2)
    fold_model.fit_encoder(x[train_idx])
    v_train = fold_model.encode_array(x[train_idx])
    expected = (fold_model.encode_array(x[held_out]) - v_train.mean(0)) / np.where(v_train.std(0) < 1e-8, 1, v_train.std(0))
    np.testing.assert_allclose(z_held_out, expected, atol=1e-6)
    assert torch.equal(model.codebook, kept) and not torch.allclose(fold_model.codebook, kept)
    save_model(str(tmp_path / "m"), model, family="boaw", hparams=None, labels=["a", "b", "c"], feature_config=fc)
    loaded, meta = load_model(str(tmp_path / "m"))
    with torch.no_grad():
        np.testing.assert_allclose(torch.softmax(loaded(torch.as_tensor(x)), -1).numpy(), probs, atol=1e-5)
    assert meta.hparams["C"] == model.hparams.C is not None
    with pytest.raises(ValueError, match="audio words"):  # fewer frames than words: said, not fitted
        build_model("boaw", 3, fc, codebook_size=5000).fit_arrays(x, y, g)
    with pytest.raises(ValueError, match="MFCC"):
        model.encode(torch.zeros(2, 7, 10))


def test_self_training_refits_on_the_confident_pseudo_labels_only():
    """``self_train_group``: the members refitted on the training rows plus exactly the group's clips
    whose ensemble probability reaches the threshold, labelled with the ensemble's argmax (checked
    against scikit-learn fitted on those rows); ``choose_threshold`` picks the best inner UA."""
    from scipy.special import softmax
    from sklearn.linear_model import LogisticRegression

    from ser_ray.train.self_train import Member, choose_threshold, encodings, self_train_group

    x, y, g = toy(seed=1)
    test = g == "s3"
    model = build_model("logreg", 3, SMALL)
    info = model.fit_arrays(x[~test], y[~test], g[~test])
    x_group = x[test] + 0.5  # the new speaker, shifted
    probs = softmax(np.random.default_rng(0).normal(0, 2, (len(x_group), 3)), axis=1)  # the ensemble's, say
    member = Member(model, temperature=1.7)
    (v_train,), (v_group,) = encodings([member], [x[~test]]), encodings([member], [x_group])
    threshold = float(np.median(probs.max(1)))  # half the clips qualify
    adapted, n = self_train_group([member], np.ones(1), [v_train], y[~test], [v_group], probs, threshold)
    keep = probs.max(1) >= threshold
    assert n == keep.sum() and 0 < n < len(probs)
    z = lambda a: (a[:, :, 0] - model.mean.numpy()) / model.scale.numpy()  # noqa: E731
    sk = LogisticRegression(C=model.hparams.C, class_weight="balanced", max_iter=3000).fit(
        np.concatenate([z(x[~test]), z(x_group[keep])]), np.concatenate([y[~test], probs.argmax(1)[keep]]))
    expected = softmax(sk.decision_function(z(x_group)) * model.logit_scale.item() / 1.7, axis=1)
    np.testing.assert_allclose(adapted, expected, atol=1e-4)
    # a threshold no clip reaches leaves the group as it was
    unchanged, n = self_train_group([member], np.ones(1), [v_train], y[~test], [v_group], probs, 1.01)
    assert n == 0 and np.array_equal(unchanged, probs)
    # the threshold with the best out-of-fold UA on the training speakers (ties: none, then higher)
    chosen, scores = choose_threshold([member], np.ones(1), [v_train], y[~test], g[~test], info["oof_probs"])
    assert set(scores) == {"none", "0.5", "0.7", "0.9"}
    assert scores["none" if chosen is None else str(chosen)] == max(scores.values())
    if scores["none"] == max(scores.values()):
        assert chosen is None
    with pytest.raises(ValueError, match="one feature array each"):
        self_train_group([member], np.ones(1), v_train, y[~test], v_group, probs, threshold)
    # speed copies join a refit's training rows for that refit's own speakers only
    from ser_ray.train.self_train import Copies

    some = np.r_[0:6, 36:42]  # six rows of s0, six of s1
    copies = Copies([v_train[some] + 0.1], y[~test][some], g[~test][some])
    (joined,), y_joined = copies.joined([v_train], y[~test], np.array(["s1", "s2"]))
    assert len(joined) == len(v_train) + 6 and np.array_equal(joined[len(v_train):], v_train[36:42] + 0.1)
    assert np.array_equal(y_joined[len(v_train):], y[~test][36:42])


def test_two_classes_and_one_speaker():
    x, y, g = toy(classes=2)
    fc = SMALL
    for hparams in ({"kernel": "linear"}, {"kernel": "rbf"}):
        model = build_model("svm", 2, fc, **hparams)
        info = model.fit_arrays(x, y, g)
        with torch.no_grad():
            probs = torch.softmax(model(torch.as_tensor(x)), -1).numpy()
        assert (probs.argmax(1) == y).mean() > 0.9 and info["inner_ua"] > 0.9
    model = build_model("mlp", 2, fc, hidden=8, seeds=1)  # one output unit inside scikit-learn
    model.fit_arrays(x, y, g)
    with torch.no_grad():
        assert (torch.softmax(model(torch.as_tensor(x)), -1).numpy().argmax(1) == y).mean() > 0.9
    model = build_model("logreg", 2, fc)
    info = model.fit_arrays(x, y, np.zeros(len(y)))  # one speaker: nothing to validate on
    assert info["inner_folds"] == 1 and "inner_ua" not in info and model.hparams.C is not None


def test_classical_families_read_functionals():
    fc = family_feature_config("logreg")
    assert fc.kind == "functionals" and fc.hop_length == 160 and fc.shape == (len(fc.feature_names()), 1)
    with pytest.raises(ValueError, match="functionals"):
        build_model("logreg", 3, FeatureConfig(kind="logmel"))
    with pytest.raises(ValueError, match="kernel"):
        build_model("svm", 3, fc, kernel="poly")


def test_cv_with_logreg_runs_without_ray_train(ray_session, tmp_path):
    """``ser-ray cv --family logreg`` on a tiny synthetic corpus: real Ray Data features, per-fold
    scikit-learn fits in the driver (no Ray Train run directory), a model that loads, a summary."""
    from ser_ray.cli import main
    from ser_ray.corpora import synthetic

    root = tmp_path / "corpus"
    synthetic.generate(root, actors=4, seed=0, sentences=["IEO", "TIE"], emotions=["anger", "neutral", "sadness"],
                       workers=1, progress=False)
    out = tmp_path / "cv"
    # a worker no node can host stops at once, naming the setting, instead of waiting for ever
    start = time.perf_counter()
    rc = main(["cv", "--corpus", "synthetic", "--root", str(root), "--family", "cnn", "--protocol", "loso",
               "--set", "cpus_per_worker=64", "--out", str(tmp_path / "never")])
    assert rc == 2 and time.perf_counter() - start < 30
    assert not (tmp_path / "never" / "summary.json").exists()
    rc = main(["cv", "--corpus", "synthetic", "--root", str(root), "--family", "logreg", "--protocol", "loso",
               "--max-folds", "2", "--set", "data.features={window_s: 1.0}", "--out", str(out)])
    assert rc in (0, None)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["family"] == "logreg" and summary["normalise_by"] == "none" and len(summary["ua"]["values"]) == 2
    assert summary["feature_config"]["kind"] == "functionals"
    fold = json.loads((out / "fold_0" / "metrics.json").read_text())
    assert fold["best_epoch"] == 1 and fold["test_speakers"] == ["synthetic:1001"]
    assert "synthetic:1001" not in fold["val_speakers"]
    model, meta = load_model(str(out / "fold_0" / "model"))
    assert meta.family == "logreg" and meta.hparams["C"] is not None and meta.extra["fit"]["inner_folds"] >= 2
    # out-of-fold probabilities of the training speakers only
    import pandas as pd

    run = out / "ray" / "logreg-loso-fold0"
    oof = pd.read_parquet(run / "oof.parquet")
    assert "synthetic:1001" not in set(oof["speaker"]) and np.allclose(oof.filter(like="prob_").sum(1), 1, atol=1e-4)
    assert not list(run.glob("checkpoint_*"))  # no Ray Train run behind it
    assert (out / "fold_0" / "oof_predictions.parquet").exists()  # what per-fold ensembles fit weights on
    # speed perturbation: one more feature cache per speed, copies of the fold's training clips only
    rc = main(["cv", "--corpus", "synthetic", "--root", str(root), "--family", "logreg", "--protocol", "loso",
               "--max-folds", "1", "--set", "data.features={window_s: 1.0}", "--set", "data.speed_perturb=[0.9]",
               "--set", f"data.cache_root={out / 'cache'}", "--out", str(tmp_path / "speed")])
    assert rc in (0, None)
    fit = json.loads((tmp_path / "speed" / "ray" / "logreg-loso-fold0" / "fit.json").read_text())
    assert fit["n_copies"] == fit["n_train"] == len(oof)
    caches = [json.loads(p.read_text())["feature_config"] for p in (out / "cache").glob("*/cache.json")]
    assert sorted(c.get("speed", 1.0) for c in caches) == [0.9, 1.0]


def _normalised_bundle(directory):
    """A one-member bundle whose logreg was fitted on per-speaker standardised functionals."""
    from ser_ray.ensemble.bundle import Bundle, Member, save_bundle
    from ser_ray.features.speaker_norm import standardise_group

    fc = FeatureConfig(kind="functionals", window_s=1.0, n_mels=16, n_mfcc=8, n_fft=512, hop_length=160)
    extractor = FeatureExtractor(fc)
    feats, labels, speakers = [], [], []
    for speaker, level in enumerate((0.05, 0.2, 0.6)):  # three "speakers" at very different loudness
        waves = np.stack([voice(1.0, f0=f0, level=level, seed=seed) for f0 in (120.0, 240.0) for seed in range(4)])
        feats.append(standardise_group(extractor(waves)))
        labels += [0] * 4 + [1] * 4
        speakers += [speaker] * 8
    model = build_model("logreg", 2, fc, C=0.1)
    model.fit_arrays(np.concatenate(feats), np.array(labels), np.array(speakers))
    bundle = Bundle(["low", "high"], [Member("logreg", model.eval(), fc)], window_s=1.0, normalise_by="speaker")
    save_bundle(bundle, str(directory))
    return str(directory)


def test_file_normalisation_labels_a_recording_with_its_own_statistics(tmp_path):
    """A bundle trained on speaker-normalised features: annotation standardises each recording over its
    own speech windows, so the same recording 10x louder gets the same labels and probabilities; modes
    the members were not trained for are refused instead of labelling silently wrong."""
    import soundfile as sf

    from ser_ray.annotate import AnnotateConfig, annotate_file
    from ser_ray.ensemble.bundle import load_bundle

    bundle = load_bundle(_normalised_bundle(tmp_path / "bundle"))
    assert bundle.normalise_by == "speaker"
    recording = np.concatenate([voice(3.0, 120.0, 0.1, seed=1), voice(3.0, 240.0, 0.1, seed=2)])
    sf.write(tmp_path / "quiet.wav", recording, SR)
    sf.write(tmp_path / "loud.wav", recording * 8, SR)
    config = AnnotateConfig(window_s=1.0, hop_s=1.0, vad="none")
    quiet_row, quiet = annotate_file(str(tmp_path / "quiet.wav"), bundle.predict_proba, config)
    loud_row, loud = annotate_file(str(tmp_path / "loud.wav"), bundle.predict_proba, config)
    assert quiet_row["normalise_by"] == "file" and quiet_row["status"] == "ok" and len(quiet) == 6
    assert [s["label"] for s in quiet] == ["low"] * 3 + ["high"] * 3  # the pitch contrast inside the recording
    np.testing.assert_allclose([s["prob_high"] for s in quiet], [s["prob_high"] for s in loud], atol=0.02)
    # the windows are labelled as one group: the same as the bundle on all of them at once
    waves = np.stack([recording[i * SR:(i + 1) * SR] for i in range(6)])
    np.testing.assert_allclose([s["prob_high"] for s in quiet], bundle.predict_proba_group(waves)[:, 1], atol=1e-5)
    with pytest.raises(ValueError, match="speaker-normalised"):
        bundle.predict_proba(waves)  # one window at a time would be silently wrong
    with pytest.raises(ValueError, match="normalise_by 'none' does not fit"):
        annotate_file(str(tmp_path / "quiet.wav"), bundle.predict_proba, AnnotateConfig(normalise_by="none"))
    from ser_ray.serve.app import _member_names

    with pytest.raises(ValueError, match="offline"):
        _member_names(str(tmp_path / "bundle"))


def test_bundle_from_speaker_normalised_models_fits_per_speaker(tmp_path):
    """``fit_bundle_from_dirs`` on models trained with normalise_by speaker: the bundle says so, and its
    validation logits are computed speaker by speaker (each standardised with its own statistics)."""
    import pandas as pd

    from ser_ray.ensemble.bundle import load_bundle
    from ser_ray.ensemble.fit import fit_bundle_from_dirs

    source = load_bundle(_normalised_bundle(tmp_path / "source"))
    member = source.members[0]
    save_model(str(tmp_path / "m"), member.model, family="logreg", hparams=None, labels=source.labels,
               feature_config=member.feature_config, extra={"normalise_by": "speaker"})
    rows = [{"wave": voice(1.0, f0, level, seed=k), "sample_rate": SR, "speaker": f"s{level}",
             "emotion": "low" if f0 < 200 else "high"}
            for level in (0.05, 0.5) for f0 in (120.0, 240.0) for k in range(3)]
    frame = pd.DataFrame(rows)
    bundle, report = fit_bundle_from_dirs([str(tmp_path / "m")], frame, frame)
    assert bundle.normalise_by == "speaker" and report["normalise_by"] == "speaker"
    assert report["test"]["ensemble"]["ua"] == 1.0  # pitch contrast within each speaker, whatever the level
