"""Combined corpora, cross-corpus evaluation and the model comparison table, on two tiny synthetic
corpora: A (seed 0; anger, neutral, sadness) and B (seed 1; anger, happiness, neutral), B read with
the CREMA-D adapter so its speakers are ``cremad:10xx``, other people than A's ``synthetic:10xx``."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ser_ray.train.config import DataSpec, TrainConfig

SENTENCES = ["IEO", "TIE"]


def tiny(corpora) -> list[str]:
    """``--set`` flags: tiny features and batches, one feature cache shared by the tests (cv and
    cross-corpus runs of the same corpus and feature config reuse it)."""
    cache = corpora[0].parent / "cache"
    sets = ["data.features={n_mels: 32, window_s: 1.0}", "batch_size=8", "patience=0", f"data.cache_root={cache}"]
    return [x for s in sets for x in ("--set", s)]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    from ser_ray.corpora import synthetic

    root = tmp_path_factory.mktemp("corpora")
    synthetic.generate(root / "a", actors=4, seed=0, sentences=SENTENCES, emotions=["anger", "neutral", "sadness"],
                       workers=1, progress=False)
    synthetic.generate(root / "b", actors=4, seed=1, sentences=SENTENCES, emotions=["anger", "happiness", "neutral"],
                       workers=1, progress=False)
    return root / "a", root / "b"


def test_combined_corpora_keep_speakers_disjoint(corpora):
    from ser_ray import splits
    from ser_ray.train.data import assign_folds, fold_frames, label_mapped, load_manifest

    a, b = corpora
    spec = DataSpec(corpora=[{"corpus": "synthetic", "root": str(a)}, {"corpus": "cremad", "root": str(b)}])
    assert spec.corpus_name == "synthetic+cremad"
    df, labels = label_mapped(load_manifest(spec), "six")
    assert labels == ["anger", "happiness", "neutral", "sadness"]
    assert set(df["corpus"]) == {"synthetic", "cremad"} and df["speaker"].nunique() == 8
    # same actor number in both corpora, two different (namespaced) speakers
    assert {"synthetic:1001", "cremad:1001"} <= set(df["speaker"])
    df, n_folds = assign_folds(df, "kfold", 4, seed=0)
    splits.assert_speaker_disjoint(df, column="fold")
    for fold in range(n_folds):
        train, val, test = fold_frames(df, "kfold", fold, val_fraction=0.2, seed=0)
        splits.assert_speaker_disjoint(train, val, test)
        assert len(train) + len(val) + len(test) == len(df) and len(val) and len(test)
    # corpus/root and corpora together name both; a malformed entry is refused with its index
    both = DataSpec(corpus="emodb", root="/e", corpora=[{"corpus": "ravdess", "root": "/r"}])
    assert both.sources() == [("emodb", "/e"), ("ravdess", "/r")] and both.corpus_name == "emodb+ravdess"
    with pytest.raises(ValueError, match=r"data.corpora\[0\]"):
        DataSpec(corpora=[{"corpus": "emodb"}])
    cfg = TrainConfig.from_dict({"data": {"corpora": [{"corpus": "emodb", "root": "/e"}]}})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_shared_labels_say_what_is_dropped():
    from ser_ray.train.cross import shared_labels

    shared, dropped = shared_labels(["anger", "neutral", "sadness"], ["anger", "happiness", "neutral"])
    assert shared == ["anger", "neutral"]
    assert dropped == {"train_only": ["sadness"], "test_only": ["happiness"]}


def test_cross_corpus_cli_writes_the_report_over_shared_labels(ray_session, corpora, tmp_path, capsys):
    from ser_ray.cli import main

    a, b = corpora
    out = tmp_path / "cross"
    argv = ["cv", "--train-corpus", "synthetic", "--train-root", str(a), "--test-corpus", "cremad",
            "--test-root", str(b), "--family", "cnn", "--epochs", "2", "--out", str(out),
            "--set", "hparams.width=8", "--set", "data.val_fraction=0.25", *tiny(corpora)]
    assert main(argv) == 0
    assert "dropped ['sadness']" in capsys.readouterr().out

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["train_corpus"], summary["test_corpus"]) == ("synthetic", "cremad")
    assert summary["shared_labels"] == summary["labels"] == ["anger", "neutral"]
    assert summary["dropped_labels"] == {"train_only": ["sadness"], "test_only": ["happiness"]}
    assert 0.0 <= summary["ua"]["mean"] <= 1.0 and summary["protocol"] == "cross-corpus"
    folds = json.loads((out / "folds.json").read_text())["folds"][0]
    # validation speakers come from the training corpus, the test speakers are all of B
    assert folds["val_speakers"] and all(s.startswith("synthetic:") for s in folds["val_speakers"] + folds["train_speakers"])
    assert not set(folds["val_speakers"]) & set(folds["train_speakers"])
    assert folds["test_speakers"] == [f"cremad:{1001 + i}" for i in range(4)]
    metrics = json.loads((out / "fold_0" / "metrics.json").read_text())
    assert metrics["labels"] == ["anger", "neutral"] and metrics["n"] == folds["n_test"]
    preds = pd.read_parquet(out / "fold_0" / "predictions.parquet")
    # every B clip with a shared label is predicted, and nothing else
    assert len(preds) == folds["n_test"] and set(preds["true"]) == {"anger", "neutral"}
    assert set(preds["pred"]) <= {"anger", "neutral"}
    assert (out / "confusion.png").stat().st_size > 0 and (out / "fold_0" / "model" / "model.json").exists()


def test_compare_cli_writes_one_row_per_family(ray_session, corpora, tmp_path, capsys):
    from ser_ray.cli import main

    a, _ = corpora
    out = tmp_path / "compare"
    argv = ["compare", "--corpus", "synthetic", "--root", str(a), "--families", "cnn,exponet",
            "--protocol", "kfold", "--k", "2", "--max-folds", "1", "--epochs", "1", "--out", str(out),
            "--set", "data.val_fraction=0.25", "--set", "data.speaker_norm=true", *tiny(corpora)]
    assert main(argv) == 0
    assert "| cnn |" in capsys.readouterr().out

    table = pd.read_csv(out / "comparison.csv")
    assert list(table["family"]) == ["cnn", "exponet"]
    for column in ("ua_mean", "ua_std", "wa_mean", "macro_f1_mean", "params", "train_s_per_epoch", "infer_ms_per_clip"):
        assert table[column].notna().all(), column
    assert (table["params"] > 0).all() and (table["infer_ms_per_clip"] > 0).all() and (table["folds"] == 1).all()
    for row in table.to_dict("records"):  # the table agrees with each family's own cv summary
        summary = json.loads((out / row["family"] / "summary.json").read_text())
        assert summary["family"] == row["family"] and summary["ua"]["mean"] == pytest.approx(row["ua_mean"])
        assert summary["speaker_norm"] is True  # the transductive option is recorded with the result
    md = (out / "comparison.md").read_text()
    assert "| exponet |" in md and "±" in md and "speaker-normalised" in md.splitlines()[0]
    assert (out / "comparison.png").stat().st_size > 0
    # both families read the same log-mel features of A: one shared cache
    assert len({json.loads((out / f / "summary.json").read_text())["feature_cache"] for f in ("cnn", "exponet")}) == 1


def test_compare_per_fold_ensemble_of_classical_and_deep_members(ray_session, corpora, tmp_path):
    """``compare --ensemble``: per fold, temperatures and weights fitted on that fold's validation speakers
    (out-of-fold predictions for the classical member, the selected model's for the deep one), scored on
    the fold's test speakers beside each member; a family spec with hyperparameters gets its own row."""
    from ser_ray.cli import main

    a, _ = corpora
    out = tmp_path / "compare"
    argv = ["compare", "--corpus", "synthetic", "--root", str(a), "--families", "logreg,svm:kernel=rbf+C=1,cnn",
            "--ensemble", "--protocol", "loso", "--max-folds", "2", "--epochs", "1", "--out", str(out),
            "--set", "data.val_fraction=0.34", *tiny(corpora)]
    assert main(argv) == 0
    table = pd.read_csv(out / "comparison.csv")
    assert list(table["family"]) == ["logreg", "svm-kernel=rbf-C=1", "cnn", "ensemble", "ensemble (uniform)"]
    svm = json.loads((out / "svm-kernel=rbf-C=1" / "summary.json").read_text())
    assert svm["config"]["hparams"] == {"kernel": "rbf", "C": 1}
    summary = json.loads((out / "ensemble" / "summary.json").read_text())
    assert summary["folds"] == [0, 1] and summary["members"] == ["logreg", "svm-kernel=rbf-C=1", "cnn"]
    for fold in summary["per_fold"]:
        assert sum(fold["weights"].values()) == pytest.approx(1.0) and min(fold["weights"].values()) >= 0
        assert set(fold["members"]) == set(summary["members"]) and fold["n_val"] > 0 and fold["n_test"] > 0
        folds = json.loads((out / "cnn" / "folds.json").read_text())["folds"][fold["fold"]]
        for member in summary["members"]:  # validation predictions: validation speakers only, never test ones
            val = pd.read_parquet(out / member / f"fold_{fold['fold']}" / "val_predictions.parquet")
            assert set(val["speaker"]) == set(folds["val_speakers"])
    assert table.loc[3, "ua_mean"] == pytest.approx(summary["ua"]["mean"])
    assert table.loc[4, "ua_mean"] == pytest.approx(summary["uniform"]["ua"]["mean"])
    assert summary["uniform"]["ua"]["values"] == [f["uniform_ua"] for f in summary["per_fold"]]
    assert "ensemble" in (out / "comparison.md").read_text()


def test_compare_self_trains_the_classical_ensemble_per_test_speaker(ray_session, corpora, tmp_path):
    """``compare --ensemble --self-train`` with speaker normalisation: each fold's ensemble is refitted
    per test speaker on the clips it labels confidently (the threshold chosen on the training speakers,
    recorded per fold) and gets its own row, with members that read different features (logreg:
    functionals, boaw: MFCC frames) and speed-perturbed copies; it is refused where it cannot apply."""
    from ser_ray.cli import main
    from ser_ray.train.compare import run_compare
    from ser_ray.train.self_train import THRESHOLDS

    a, _ = corpora
    out = tmp_path / "compare"
    argv = ["compare", "--corpus", "synthetic", "--root", str(a), "--families",
            "logreg,boaw:codebook_size=24+assignments=3+codebooks=1", "--ensemble",
            "--self-train", "--protocol", "loso", "--max-folds", "2", "--out", str(out),
            "--set", "data.normalise_by=speaker", "--set", "data.speed_perturb=[1.1]", *tiny(corpora)]
    assert main(argv) == 0
    for member in ("logreg", "boaw-codebook_size=24-assignments=3-codebooks=1"):  # members and refits read copies
        fit = json.loads(next((out / member / "ray").glob("*-fold0/fit.json")).read_text())
        assert fit["n_copies"] == fit["n_train"] > 0
    table = pd.read_csv(out / "comparison.csv")
    boaw = "boaw-codebook_size=24-assignments=3-codebooks=1"
    assert list(table["family"]) == ["logreg", boaw, "ensemble", "ensemble (uniform)", "ensemble + self-training"]
    summary = json.loads((out / "ensemble" / "summary.json").read_text())
    assert summary["members"] == ["logreg", boaw]
    assert table.loc[4, "ua_mean"] == pytest.approx(summary["self_trained"]["ua"]["mean"])
    for fold in summary["per_fold"]:
        info = fold["self_train"]
        assert info["threshold"] in (None, *THRESHOLDS)
        assert set(info["inner_ua"]) == {"none", *map(str, THRESHOLDS)}
        assert 0 <= info["pseudo_labelled"] <= fold["n_test"]
        if info["threshold"] is None:  # nothing refitted: the ensemble's own answer
            assert fold["self_trained_ua"] == fold["ua"]
    assert "self-training" in (out / "comparison.md").read_text()
    config = TrainConfig.from_dict({"data": {"corpus": "synthetic", "root": str(a)}})
    for families, data, match in ((["logreg", "cnn"], {"normalise_by": "speaker"}, "not classical"),
                                  (["logreg", "svm"], {}, "normalise_by=speaker")):
        cfg = TrainConfig.from_dict({"data": {"corpus": "synthetic", "root": str(a), **data}})
        with pytest.raises(ValueError, match=match):
            run_compare(cfg, families, tmp_path / "refused", ensemble=True, self_train=True)
    with pytest.raises(ValueError, match="ensemble"):
        run_compare(config, ["logreg"], tmp_path / "refused", self_train=True)
    assert not (tmp_path / "refused").exists()  # refused before anything ran
