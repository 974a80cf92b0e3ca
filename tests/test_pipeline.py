"""`ser-ray run`: a corpus to a bundle to an annotated archive in one flow, resumable stage by stage."""

from __future__ import annotations

import json

import pandas as pd
import soundfile as sf
import yaml

from ser_ray.annotate.writer import ResultWriter


def test_run_searches_ensembles_annotates_and_resumes(ray_session, tmp_path, capsys):
    from ser_ray.cli import main
    from ser_ray.corpora.synthetic import generate

    corpus = tmp_path / "corpus"
    generate(corpus, actors=6, seed=0, sentences=["TIE", "IOM"], emotions=["neutral", "anger", "sadness"],
             workers=1, progress=False)
    archive = tmp_path / "archive"
    archive.mkdir()
    for i, path in enumerate(sorted(corpus.rglob("*.wav"))[:3]):
        data, sr = sf.read(path)
        sf.write(archive / f"clip{i}.wav", data, sr)
    (archive / "notes.txt").write_text("not audio")
    config = {
        "name": "flow",
        "data": {"corpus": "synthetic", "protocol": "kfold", "k": 3, "test_fold": 0, "val_fraction": 0.34,
                 "features": {"n_mels": 32, "window_s": 1.5}},
        "families": ["logreg", "cnn"], "num_samples": 2, "max_epochs": 1, "grace_period": 1,
        "max_concurrent_trials": 1, "tpe_startup_trials": 1,
        "resources": {"cnn": {"cpu": 1}, "logreg": {"cpu": 1}},
        "train": {"patience": 0, "batch_size": 16},
        "space": {"cnn": {"hparams": {"width": 8}}},
        "annotate": {"input": str(archive), "hop_s": 1.5},
    }
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = ["run", "--config", str(path), "--root", str(corpus), "--out", str(tmp_path / "results")]

    assert main(argv) == 0
    first = capsys.readouterr().out
    experiment = tmp_path / "results" / "flow"
    assert "[1/3] search" in first and "[2/3] ensemble" in first and "[3/3] annotate" in first
    assert (experiment / "split.parquet").exists() and (experiment / "bundle" / "bundle.json").exists()
    metrics = json.loads((experiment / "bundle" / "ensemble_metrics.json").read_text())
    assert 0.0 <= metrics["test"]["ensemble"]["ua"] <= 1.0
    files, segments = ResultWriter(str(experiment / "annotations")).read_tables()
    assert len(files) == 4 and (files["status"] == "ok").sum() == 3 and len(segments) > 0

    assert main(argv) == 0  # everything is done: every stage says so, nothing is redone
    again = capsys.readouterr().out
    assert again.count("skipped:") == 2 and "3 already done" not in again and "4 already done" in again
    assert pd.read_parquet(experiment / "trials.parquet").shape[0] == 2
