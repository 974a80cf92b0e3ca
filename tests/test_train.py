"""Training: metrics by hand, config loading, a real Ray Train run that learns and survives a killed
worker, and cross-validation writing its result directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ser_ray.features.config import FeatureConfig
from ser_ray.train.config import TrainConfig, load_config
from ser_ray.train.metrics import (
    classification_metrics,
    expected_calibration_error,
    metrics_by_group,
    scores_from_confusion,
    summarize_folds,
)

LABELS = ["anger", "happiness", "neutral", "sadness"]
TINY = FeatureConfig(n_mels=32, window_s=1.0)  # features [32, 32]


# -- metrics ---------------------------------------------------------------------------------------


def test_classification_metrics_match_hand_computed_values():
    y_true = ["a", "a", "a", "a", "b", "b", "c", "c"]
    y_pred = ["a", "a", "a", "b", "b", "a", "c", "c"]
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    # recalls: a 3/4, b 1/2, c 2/2 -> UA 0.75; WA 6/8
    assert m["ua"] == pytest.approx(0.75)
    assert m["wa"] == pytest.approx(0.75)
    # precisions: a 3/4, b 1/2, c 1 -> F1 a 0.75, b 0.5, c 1.0
    assert m["per_class"]["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["macro_f1"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert m["confusion"] == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]
    # integer ids give the same numbers, and the in-loop confusion-matrix scores agree
    ids = classification_metrics([0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 0, 2, 2], ["a", "b", "c"])
    assert ids["ua"] == m["ua"] and ids["macro_f1"] == m["macro_f1"]
    assert scores_from_confusion(m["confusion"]) == pytest.approx({k: m[k] for k in ("ua", "wa", "macro_f1")})


def test_ua_ignores_classes_absent_from_the_held_out_speaker():
    m = classification_metrics(["a", "a", "b"], ["a", "c", "b"], ["a", "b", "c"])
    assert m["ua"] == pytest.approx((0.5 + 1.0) / 2)  # c has no true clips: not averaged as 0
    with pytest.raises(ValueError, match="not in the label list"):
        classification_metrics(["a"], ["z"], ["a", "b"])


def test_group_summary_and_calibration():
    df = pd.DataFrame({"intensity": ["HI", "HI", "LO", "LO"], "true": list("abab"), "pred": list("abba")})
    assert metrics_by_group(df, "intensity") == {"HI": {"accuracy": 1.0, "n": 2}, "LO": {"accuracy": 0.0, "n": 2}}
    s = summarize_folds([{"ua": 0.5, "wa": 0.6, "macro_f1": 0.4}, {"ua": 0.7, "wa": 0.8, "macro_f1": 0.6}])
    assert s["ua"]["mean"] == pytest.approx(0.6) and s["ua"]["std"] == pytest.approx(0.1)
    # two clips at confidence 0.9 (one right) and two at 0.6 (both right): |0.5-0.9|/2 + |1-0.6|/2
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    assert expected_calibration_error(probs, np.array([0, 1, 0, 1])) == pytest.approx(0.4)
    assert expected_calibration_error(np.eye(3), np.arange(3)) == pytest.approx(0.0)


# -- config ----------------------------------------------------------------------------------------


def test_config_loads_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("family: bigru_attn\nhparams: {hidden: 64}\nepochs: 20\ndata: {corpus: emodb, root: /x}\n")
    cfg = load_config(path, ["epochs=5", "hparams.dropout=0.3", "data.protocol=loso", "use_gpu=false"])
    assert (cfg.family, cfg.epochs, cfg.use_gpu) == ("bigru_attn", 5, False)
    assert cfg.hparams == {"hidden": 64, "dropout": 0.3}
    assert cfg.data.protocol == "loso" and cfg.data.corpus == "emodb"
    assert cfg.scheduler == "plateau" and TrainConfig(family="wav2vec2").scheduler == "cosine"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown key.*epoch"):
        load_config(path, ["epoch=3"])
    with pytest.raises(ValueError, match="protocol"):
        load_config(path, ["data.protocol=random"])


def test_every_command_reads_config_the_same_way(tmp_path):
    """train, tune and run: one YAML reader, the same --set overrides, unknown keys refused by name."""
    from ser_ray.pipeline import load_pipeline_config
    from ser_ray.tune.config import load_search_config

    path = tmp_path / "t.yaml"
    path.write_text("name: t\nfamilies: [logreg]\ndata: {corpus: synthetic, features: {n_mels: 32}}\n"
                    "annotate: {input: /archive}\n")
    tune = load_search_config(_without_annotate(path, tmp_path),
                              ["max_epochs=4", "data.features.window_s=1.5"], **{"data.root": "/corpus"})
    assert (tune.max_epochs, tune.data.features, tune.data.root) == (4, {"n_mels": 32, "window_s": 1.5}, "/corpus")
    run = load_pipeline_config(str(path), ["num_samples=3"])
    assert run.search.num_samples == 3 and run.annotate == {"input": "/archive"}
    for load in (lambda o: load_search_config(_without_annotate(path, tmp_path), o),
                 lambda o: load_pipeline_config(str(path), o)):
        with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_epoch'\]; valid keys: .*max_epochs"):
            load(["max_epoch=4"])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="YAML mapping"):
        load_config(tmp_path / "list.yaml")


def _without_annotate(path, tmp_path):
    out = tmp_path / "tune.yaml"
    out.write_text("".join(line for line in path.read_text().splitlines(True) if not line.startswith("annotate")))
    return out


# -- a real Ray Train run --------------------------------------------------------------------------


def separable_rows(speakers: list[int], per_class: int = 12, seed: int = 0) -> pd.DataFrame:
    """Cache-shaped rows where each label is a flickering band pattern and each speaker a band gain.

    The speaker gain is constant over time (per-utterance normalisation removes it); the label's
    pattern changes sign every frame, so it survives normalisation: learnable, speaker-independent.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for spk in speakers:
        gain = rng.normal(0, 3, size=(TINY.n_mels, 1)).astype(np.float32)
        for c, label in enumerate(LABELS):
            for i in range(per_class):
                x = rng.normal(0, 1, size=TINY.shape).astype(np.float32) + gain
                x[c * 8:(c + 1) * 8, ::2] += 2.0
                x[c * 8:(c + 1) * 8, 1::2] -= 2.0
                rows.append({"path": f"/tiny/{spk}_{label}_{i}.wav", "speaker": f"tiny:{spk}",
                             "emotion": label, "intensity": "XX", "features": x, "error": None})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def killed_run(ray_session, tmp_path_factory):
    """A 3-epoch cnn run on two Ray Train workers (DDP over gloo on CPU) whose worker process is killed
    at the start of epoch 1 (once); the group restarts from the last checkpoint."""
    from ser_ray.train.loop import fit

    tmp = tmp_path_factory.mktemp("train")
    train_df = separable_rows([1, 2, 3, 4])
    val_df = separable_rows([5], seed=1)
    cfg = TrainConfig(family="cnn", hparams={"width": 8}, epochs=3, batch_size=16, lr=3e-3, max_failures=1,
                      num_workers=2, cpus_per_worker=0.5)
    marker = tmp / "killed.txt"
    result = fit(train_df, val_df, LABELS, TINY, cfg, name="killed", storage_path=str(tmp / "ray"),
                 extra_loop_config={"fail_at_epoch": 1, "fail_marker": str(marker)})
    return result, marker


def test_cnn_learns_held_out_speakers(killed_run):
    from ser_ray.train.evaluate import predict

    result, _ = killed_run
    test_df = separable_rows([6, 7], seed=2)
    predictions = predict(result.best_checkpoint, test_df, batch_size=32)
    assert list(predictions.columns[:3]) == ["path", "speaker", "intensity"]
    assert {"true", "pred", *(f"prob_{label}" for label in LABELS)} <= set(predictions.columns)
    assert np.allclose(predictions[[f"prob_{label}" for label in LABELS]].sum(axis=1), 1, atol=1e-5)
    ua = classification_metrics(predictions["true"], predictions["pred"], LABELS)["ua"]
    assert ua >= 0.7, f"held-out UA {ua:.2f}: the cnn did not learn a separable task in 3 epochs"
    assert result.best_metrics["val_ua"] >= 0.7


def test_killed_worker_resumes_from_its_checkpoint(killed_run):
    result, marker = killed_run
    assert marker.exists(), "the test hook never killed the worker"
    # one entry per epoch: epoch 0 ran once before the kill; 1 and 2 after resuming, not from scratch
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert [h["restarts"] for h in result.history] == [0, 1, 1]
    for key in ("train_loss", "val_loss", "val_ua", "val_wa", "val_macro_f1", "lr"):
        assert all(np.isfinite(h[key]) for h in result.history), key
    # two workers: each epoch's shards cover the training set once, and validation scores every
    # validation clip (confusion matrices summed over workers), not one worker's shard
    assert all(h["train_n"] == 4 * len(LABELS) * 12 for h in result.history), [h["train_n"] for h in result.history]
    assert all(h["val_n"] == len(LABELS) * 12 for h in result.history), [h["val_n"] for h in result.history]
    # the best checkpoint is a save_model directory plus the training state
    from ser_ray.models import load_model

    model, meta = load_model(result.best_checkpoint)
    assert meta.labels == LABELS and meta.family == "cnn" and meta.feature_config == TINY


# -- cross-validation on a tiny synthetic corpus ---------------------------------------------------


def test_cv_writes_the_result_directory(ray_session, tmp_path):
    from ser_ray.corpora import synthetic
    from ser_ray.train.cv import run_cv

    root = tmp_path / "corpus"
    synthetic.generate(root, actors=4, sentences=["IEO"], emotions=["anger", "neutral", "sadness"],
                       workers=1, progress=False)
    cfg = load_config(None, [
        "family=cnn", "hparams.width=8", "epochs=2", "batch_size=8", "patience=0",
        "data.corpus=synthetic", f"data.root={root}", "data.protocol=loso", "data.val_fraction=0.3",
        "data.features={n_mels: 32, window_s: 1.0}",
    ])
    out = tmp_path / "cv"
    summary = run_cv(cfg, out, max_folds=2)  # two folds at once: 2 CPUs, 1 per fold

    folds = json.loads((out / "folds.json").read_text())
    assert folds["protocol"] == "loso" and len(folds["folds"]) == 4
    for f in folds["folds"]:
        assert not set(f["test_speakers"]) & set(f["train_speakers"] + f["val_speakers"])
    metrics = json.loads((out / "fold_0" / "metrics.json").read_text())
    assert {"ua", "wa", "macro_f1", "confusion", "per_class", "by_intensity", "ece", "best_epoch"} <= set(metrics)
    assert metrics["test_speakers"] == folds["folds"][0]["test_speakers"]
    predictions = pd.read_parquet(out / "fold_0" / "predictions.parquet")
    assert set(predictions["speaker"]) == set(metrics["test_speakers"])
    assert (out / "fold_0" / "model" / "model.json").exists()
    assert (out / "fold_0" / "learning_curves.png").stat().st_size > 0
    assert (out / "confusion.png").stat().st_size > 0
    saved = json.loads((out / "summary.json").read_text())
    assert saved["labels"] == ["anger", "neutral", "sadness"] and saved["leaky"] is False
    assert saved["folds_run"] == [0, 1] and summary["ua"]["mean"] == pytest.approx(
        np.mean([metrics["ua"], json.loads((out / "fold_1" / "metrics.json").read_text())["ua"]]))

    # both folds one after another in ONE Ray Train run give what each gave in its own run beside the
    # other (same seed, data and threads), and what the one-model path (`fit`: `ser-ray train`,
    # cross-corpus) gives for the same fold
    from ser_ray.models import family_feature_config
    from ser_ray.train.cv import run_fold
    from ser_ray.train.data import assign_folds, feature_rows, fold_frames, label_mapped, load_manifest

    one_run = tmp_path / "cv-one-run"
    run_cv(dataclasses.replace(cfg, concurrent_folds=1), one_run, max_folds=2)
    assert len(list((one_run / "ray").glob("*-folds-0-1"))) == 1  # one run trained both folds
    manifest, labels = label_mapped(load_manifest(cfg), cfg.label_map)
    manifest, _ = assign_folds(manifest, "loso", cfg.data.k, cfg.seed)
    feature_config = family_feature_config("cnn", FeatureConfig(**cfg.data.features))
    rows, _ = feature_rows(manifest, feature_config, str(out / "cache"))
    tr, va, te = fold_frames(manifest, "loso", 1, cfg.data.val_fraction, cfg.seed).with_features(rows, keep_failed=True)
    run_fold(1, tr, va, te, labels, feature_config, cfg, tmp_path / "fit-fold1" / "fold_1", run_name="fit-fold1",
             storage_path=str(tmp_path / "fit-ray"))
    probs = [c for c in predictions.columns if c.startswith("prob_")]
    for other, fold in ((one_run, 0), (one_run, 1), (tmp_path / "fit-fold1", 1)):
        for name in ("ua", "confusion", "best_epoch", "epochs_run"):
            assert json.loads((other / f"fold_{fold}" / "metrics.json").read_text())[name] == \
                json.loads((out / f"fold_{fold}" / "metrics.json").read_text())[name], (other, fold, name)
        np.testing.assert_allclose(pd.read_parquet(other / f"fold_{fold}" / "predictions.parquet")[probs],
                                   pd.read_parquet(out / f"fold_{fold}" / "predictions.parquet")[probs], atol=1e-6)


def test_folds_in_one_run_resume_the_fold_that_was_killed(ray_session, tmp_path):
    """Two folds in one Ray Train run; the worker is killed at epoch 1 of the second fold. The restarted
    group does not train the first fold again and resumes the second from its last checkpoint."""
    from ser_ray.models import load_model
    from ser_ray.train.loop import fit_folds

    cfg = TrainConfig(family="cnn", hparams={"width": 8}, epochs=3, batch_size=16, lr=3e-3, max_failures=1,
                      cpus_per_worker=1)
    folds = {0: (separable_rows([1, 2, 3]), separable_rows([4], seed=1)),
             1: (separable_rows([2, 3, 4]), separable_rows([1], seed=1))}
    marker = tmp_path / "killed.txt"
    results = fit_folds(folds, LABELS, TINY, cfg, name="two-folds", storage_path=str(tmp_path / "ray"),
                        extra_loop_config={"fail_at_epoch": 1, "fail_at_fold": 1, "fail_marker": str(marker)})
    assert marker.exists(), "the test hook never killed the worker"
    assert sorted(results) == [0, 1]
    # fold 0 finished before the kill and was not trained again after it
    fold0 = Path(results[0].path) / "result.json"
    assert fold0.stat().st_mtime < marker.stat().st_mtime
    assert [h["restarts"] for h in results[0].history] == [0, 0, 0]
    # fold 1: epoch 0 once before the kill, 1 and 2 after resuming
    assert [h["epoch"] for h in results[1].history] == [0, 1, 2]
    assert [h["restarts"] for h in results[1].history] == [0, 1, 1]
    assert all(h["fold"] == 1 for h in results[1].history)
    for fold, result in results.items():
        best = max(result.history, key=lambda h: (h["val_ua"], -h["val_loss"]))
        assert result.best_metrics["epoch"] == best["epoch"], fold
        model, meta = load_model(result.best_checkpoint)
        assert meta.extra["epoch"] == best["epoch"] and meta.labels == LABELS


def test_fold_concurrency_follows_the_cluster_and_the_setting(ray_session):
    from ser_ray.train.config import TrainConfig
    from ser_ray.train.cv import fold_concurrency

    assert fold_concurrency(TrainConfig(family="cnn"), 10) == 2  # the test session's 2 CPUs, 1 per fold
    assert fold_concurrency(TrainConfig(family="cnn", cpus_per_worker=2), 10) == 1
    assert fold_concurrency(TrainConfig(family="cnn", cpus_per_worker=0.5), 3) == 3
    assert fold_concurrency(TrainConfig(family="cnn", concurrent_folds=1), 10) == 1
    assert fold_concurrency(TrainConfig(family="logreg"), 10) == 1  # seconds each, in this process
    with pytest.raises(ValueError, match="concurrent_folds"):
        TrainConfig(concurrent_folds=-1)


def test_mixup_draws_a_partner_and_a_dominant_weight():
    import numpy as np
    import torch

    from ser_ray.train.config import TrainConfig
    from ser_ray.train.loop import _mixup

    x = torch.zeros(8, 4, 5)
    assert _mixup(x, 0.0, np.random.default_rng(0)) == (1.0, None)  # off
    lam, partner = _mixup(x, 0.4, np.random.default_rng(0))
    assert 0.5 <= lam <= 1.0 and sorted(partner.tolist()) == list(range(8))
    with pytest.raises(ValueError, match="mixup"):
        TrainConfig(mixup=-0.2)
