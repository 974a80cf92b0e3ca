"""Corpus adapters and manifests: real EmoDB, tiny hand-named corpora, S3, and the CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from ser_ray import cli
from ser_ray.corpora import build_manifest, combine_manifests
from ser_ray.corpora.manifest import MANIFEST_COLUMNS, read_manifest, validate_manifest, write_manifest


def write_wav(path, seconds=0.25, sample_rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    sf.write(path, 0.1 * np.sin(2 * np.pi * 220 * t), sample_rate, subtype="PCM_16")


def wav_bytes(seconds=0.25, sample_rate=16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(int(seconds * sample_rate)), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def test_emodb_manifest_from_the_cli(emodb_root, tmp_path, capsys):
    out = tmp_path / "emodb.parquet"
    assert cli.main(["manifest", "--corpus", "emodb", "--root", str(emodb_root), "--out", str(out)]) == 0
    df = read_manifest(str(out))
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert len(df) == 535
    assert df["speaker"].nunique() == 10
    assert set(df["emotion"]) == {"anger", "boredom", "disgust", "fear", "happiness", "neutral", "sadness"}
    assert set(df["gender"]) == {"female", "male"}
    assert df.groupby("gender")["speaker"].nunique().to_dict() == {"female": 5, "male": 5}
    row = df[df["path"].str.endswith("03a01Fa.wav")].iloc[0]
    assert (row.speaker, row.gender, row.sentence, row.emotion, row.intensity) == ("emodb:03", "male", "a01", "happiness", "a")
    assert row.sample_rate == 16000 or row.sample_rate > 0
    assert (df["duration_s"] > 0.5).all()
    printed = capsys.readouterr().out
    assert "535 clips, 10 speakers, 7 emotions" in printed


def test_cremad_names_genders_and_skips_are_reported(tmp_path):
    for name in ["1001_IEO_ANG_HI.wav", "1001_DFA_NEU_XX.wav", "1002_TIE_SAD_XX.wav", "1076_MTI_SAD_XX.wav", "1003_XYZ_ANG_XX.wav"]:
        write_wav(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not audio")
    (tmp_path / "1002_ITS_FEA_XX.wav").write_bytes(b"this is not a wav file")
    (tmp_path / "VideoDemographics.csv").write_text("ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,C,N\n1002,21,Female,C,N\n")

    df, report = build_manifest("cremad", str(tmp_path))

    assert len(df) == 3
    by_name = df.set_index(df["path"].str.rsplit("/", n=1).str[-1])
    assert by_name.loc["1001_IEO_ANG_HI.wav", ["speaker", "gender", "sentence", "emotion", "intensity"]].tolist() == [
        "cremad:1001", "male", "IEO", "anger", "HI",
    ]
    assert by_name.loc["1002_TIE_SAD_XX.wav", "gender"] == "female"
    assert by_name.loc["1001_IEO_ANG_HI.wav", "duration_s"] == pytest.approx(0.25)
    skipped = report["skipped"]
    assert skipped["known bad clip"]["count"] == 1 and "1076_MTI_SAD_XX" in skipped["known bad clip"]["examples"][0]
    assert skipped["name does not parse"]["count"] == 1
    assert skipped["not audio"]["count"] == 1 and "notes.txt" in skipped["not audio"]["examples"][0]
    assert skipped["not readable audio"]["count"] == 1 and "1002_ITS_FEA_XX.wav" in skipped["not readable audio"]["examples"][0]
    # VideoDemographics.csv is the corpus's own metadata, not a skipped file.
    assert report["files_found"] == 7


def test_ravdess_names(tmp_path):
    names = {
        "Actor_01/03-01-05-02-01-01-01.wav": ("ravdess:01", "male", "01", "anger", "strong"),
        "Actor_02/03-01-02-01-02-02-02.wav": ("ravdess:02", "female", "02", "calm", "normal"),
        "Actor_02/03-01-08-01-01-01-02.wav": ("ravdess:02", "female", "01", "surprise", "normal"),
    }
    for name in names:
        write_wav(tmp_path / name, sample_rate=48000)
    write_wav(tmp_path / "Actor_01/01-01-05-02-01-01-01.wav")  # audio-visual: not ours
    write_wav(tmp_path / "Actor_01/03-02-05-02-01-01-01.wav")  # song

    df, report = build_manifest("ravdess", str(tmp_path))

    assert len(df) == 3
    for name, expected in names.items():
        row = df[df["path"].str.endswith(name)].iloc[0]
        assert (row.speaker, row.gender, row.sentence, row.emotion, row.intensity) == expected
        assert row.sample_rate == 48000
    assert report["skipped"]["not audio-only"]["count"] == 1
    assert report["skipped"]["song, not speech"]["count"] == 1


def test_unknown_corpus_and_missing_root_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="choose from"):
        build_manifest("iemocap", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        build_manifest("emodb", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_manifest_round_trip(tmp_path, suffix):
    write_wav(tmp_path / "corpus/Actor_01/03-01-05-02-01-01-01.wav")
    write_wav(tmp_path / "corpus/Actor_01/03-01-01-01-02-01-01.wav")
    df, _ = build_manifest("ravdess", str(tmp_path / "corpus"))
    path = str(tmp_path / f"m{suffix}")
    write_manifest(df, path)
    back = read_manifest(path)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert back["sentence"].tolist() == ["01", "02"] or sorted(back["sentence"]) == ["01", "02"]  # "01" stays a string
    assert back["sample_rate"].dtype == np.int64


def test_validate_manifest_names_the_problem():
    df = pd.DataFrame([{c: "x" for c in MANIFEST_COLUMNS}])
    df["speaker"], df["gender"], df["duration_s"], df["sample_rate"] = "emodb:03", "male", 1.0, 16000
    with pytest.raises(ValueError, match="unknown emotion labels"):
        validate_manifest(df)
    with pytest.raises(ValueError, match="missing columns"):
        validate_manifest(df.drop(columns="speaker"))
    df["emotion"], df["speaker"] = "anger", "03"
    with pytest.raises(ValueError, match="namespaced"):
        validate_manifest(df)


def test_combining_corpora_applies_one_label_map(emodb_root, tmp_path):
    write_wav(tmp_path / "Actor_02/03-01-02-01-02-02-02.wav")  # calm
    write_wav(tmp_path / "Actor_02/03-01-05-01-02-02-02.wav")  # anger
    emodb, _ = build_manifest("emodb", str(emodb_root))
    ravdess, _ = build_manifest("ravdess", str(tmp_path))

    six = combine_manifests([emodb, ravdess], "six")
    assert set(six["emotion"]) == {"anger", "disgust", "fear", "happiness", "neutral", "sadness"}
    assert len(six) == 535 - 81 + 1  # boredom and calm dropped
    calm = combine_manifests([emodb, ravdess], "six_calm_as_neutral")
    assert len(calm) == 535 - 81 + 2
    assert calm.loc[calm["emotion_original"] == "calm", "emotion"].tolist() == ["neutral"]
    assert set(calm["corpus"]) == {"emodb", "ravdess"}


def test_manifest_from_s3(s3_bucket, tmp_path):
    bucket, client = s3_bucket
    for name in ["03a01Fa.wav", "08b02Wc.wav", "16a05Tb.wav"]:
        client.put_object(Bucket=bucket, Key=f"emodb/{name}", Body=wav_bytes(0.5))
    client.put_object(Bucket=bucket, Key="emodb/README.md", Body=b"# EmoDB")
    client.put_object(Bucket=bucket, Key="emodb/xx.wav", Body=wav_bytes(0.1))

    df, report = build_manifest("emodb", f"s3://{bucket}/emodb")

    assert sorted(df["path"]) == [f"s3://{bucket}/emodb/{n}" for n in ["03a01Fa.wav", "08b02Wc.wav", "16a05Tb.wav"]]
    assert df["duration_s"].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert df.set_index("speaker")["gender"].to_dict() == {"emodb:03": "male", "emodb:08": "female", "emodb:16": "female"}
    assert report["skipped"]["not audio"]["count"] == 1
    assert report["skipped"]["name does not parse"]["count"] == 1

    # The manifest itself can live on S3 too.
    out = f"s3://{bucket}/manifests/emodb.csv"
    write_manifest(df, out)
    pd.testing.assert_frame_equal(read_manifest(out), df, check_dtype=False)


def test_describe_writes_tables_and_plots(emodb_root, tmp_path, capsys):
    manifest = tmp_path / "emodb.csv"
    write_manifest(build_manifest("emodb", str(emodb_root))[0], str(manifest))
    out = tmp_path / "eda"
    assert cli.main(["describe", "--manifest", str(manifest), "--out", str(out)]) == 0
    for name in ["class_balance", "durations_by_emotion", "durations_by_speaker", "speakers_by_gender"]:
        assert (out / f"{name}.png").stat().st_size > 1000
        assert (out / f"{name}.csv").exists()
    balance = pd.read_csv(out / "class_balance.csv", index_col=0)
    assert balance.loc["anger", "clips"] == 127 and balance["clips"].sum() == 535
    assert "class_balance" in capsys.readouterr().out
    gender = pd.read_csv(out / "speakers_by_gender.csv", index_col=0)
    assert gender["speakers"].to_dict() == {"female": 5, "male": 5}
    assert json.dumps(gender["clips"].astype(int).to_dict())
