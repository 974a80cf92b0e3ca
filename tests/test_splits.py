"""Every split protocol keeps speakers apart, on real EmoDB and on the synthetic corpus."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ser_ray import cli
from ser_ray.corpora import build_manifest
from ser_ray.corpora.manifest import read_manifest, write_manifest
from ser_ray.corpora.synthetic import generate
from ser_ray.splits import (
    CREMAD_TEST_ACTORS,
    CREMAD_VAL_ACTORS,
    SpeakerLeakError,
    apply_protocol,
    assert_speaker_disjoint,
    cremad_fixed,
    fixed_speaker_split,
    fold_lists,
    kfold,
    leaky_random_split,
    loso,
    train_val_split,
)


@pytest.fixture(scope="module")
def emodb(emodb_root):
    return build_manifest("emodb", str(emodb_root))[0]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, actors=10, seed=1, sentences=["DFA"], workers=1, progress=False)
    return build_manifest("synthetic", str(root))[0]


@pytest.mark.parametrize("corpus", ["emodb", "synthetic"])
@pytest.mark.parametrize("protocol", ["kfold", "loso", "cremad-fixed", "fixed"])
def test_every_protocol_is_speaker_disjoint(corpus, protocol, request):
    df = request.getfixturevalue(corpus)
    out = apply_protocol(df, protocol, k=5, seed=0)
    column = "split" if protocol in ("cremad-fixed", "fixed") else "fold"
    assert out[column].notna().all() and len(out) == len(df)
    assert_speaker_disjoint(out)
    folds = fold_lists(out, protocol, 0)
    assert not folds["leaky"]
    assert sorted(s for speakers in folds["speakers"].values() for s in speakers) == sorted(df["speaker"].unique())
    if column == "split":
        assert set(out["split"]) == {"train", "val", "test"}
    if protocol == "kfold":
        assert sorted(out["fold"].unique()) == [0, 1, 2, 3, 4]
        assert out.equals(kfold(df, 5, 0))  # deterministic
    if protocol == "loso":
        assert out["fold"].nunique() == df["speaker"].nunique()


def test_fixed_split_is_70_10_20_of_speakers_and_mixes_genders(synthetic):
    out = fixed_speaker_split(synthetic, 0.1, 0.2, seed=0)
    speakers = out.groupby("split")["speaker"].nunique().to_dict()
    assert speakers == {"test": 2, "val": 1, "train": 7}
    assert out[out["split"] == "test"]["gender"].nunique() == 2
    assert out.equals(fixed_speaker_split(synthetic, 0.1, 0.2, seed=0))
    assert not out.equals(fixed_speaker_split(synthetic, 0.1, 0.2, seed=1))


def test_cremad_fixed_uses_the_tfds_actors():
    actors = range(1001, 1092)
    df = pd.DataFrame({"speaker": [f"cremad:{a}" for a in actors], "corpus": "cremad", "emotion": "anger"})
    out = cremad_fixed(df)
    split = dict(zip(actors, out["split"]))
    assert {a for a, s in split.items() if s == "test"} == set(CREMAD_TEST_ACTORS)
    assert {a for a, s in split.items() if s == "val"} == set(CREMAD_VAL_ACTORS)
    assert (out["split"] == "train").sum() == 91 - 19 - 9


def test_train_val_split_inside_a_fold_is_speaker_disjoint(emodb):
    folds = kfold(emodb, 5, seed=0)
    train = folds[folds["fold"] != 0]
    fit, val = train_val_split(train, 0.15, seed=0)
    assert len(fit) + len(val) == len(train) and len(val) > 0
    assert_speaker_disjoint(fit, val, folds[folds["fold"] == 0])


def test_leaky_split_needs_the_flag_and_is_marked(emodb):
    with pytest.raises(ValueError, match="overstates accuracy"):
        leaky_random_split(emodb)
    out = leaky_random_split(emodb, seed=0, allow_leaky=True)
    assert out["leaky"].all() and out.attrs["leaky"]
    assert fold_lists(out, "random")["leaky"] is True
    with pytest.raises(SpeakerLeakError):
        assert_speaker_disjoint(out)


def test_kfold_refuses_more_folds_than_speakers(synthetic):
    with pytest.raises(ValueError, match="number of speakers"):
        kfold(synthetic, 11)
    assert loso(synthetic)["fold"].max() == 9


def test_splits_cli_writes_manifest_and_fold_lists(emodb, tmp_path):
    manifest = str(tmp_path / "m.parquet")
    write_manifest(emodb, manifest)
    out = str(tmp_path / "loso.parquet")
    assert cli.main(["splits", "--manifest", manifest, "--protocol", "loso", "--out", out]) == 0
    df = read_manifest(out)
    assert df["fold"].nunique() == 10
    folds = json.loads(open(out + ".folds.json").read())
    assert folds["protocol"] == "loso" and len(folds["speakers"]) == 10 and folds["leaky"] is False

    leaky = str(tmp_path / "random.csv")
    assert cli.main(["splits", "--manifest", manifest, "--protocol", "random", "--out", leaky]) == 2
    assert cli.main(["splits", "--manifest", manifest, "--protocol", "random", "--leaky", "--out", leaky]) == 0
    assert read_manifest(leaky)["leaky"].all()
    assert json.loads(open(leaky + ".folds.json").read())["leaky"] is True


def test_published_folds_are_used_as_given(tmp_path):
    """``--folds FILE``: test speakers per fold from JSON or CSV, bare ids match namespaced speakers,
    unlisted speakers only ever train, and a speaker in two folds or a name matching nobody is refused."""
    import json

    from ser_ray.splits import SpeakerLeakError, given_folds, read_folds
    from ser_ray.train.data import assign_folds, fold_frames

    df = pd.DataFrame({"speaker": [f"emodb:{s}" for s in ["03", "03", "08", "09", "10", "11"]], "gender": "m",
                       "emotion": ["anger", "sadness", "anger", "sadness", "anger", "sadness"],
                       "path": [f"/c/{i}.wav" for i in range(6)]})
    (tmp_path / "folds.json").write_text(json.dumps([["03", "08"], ["emodb:09"]]))
    (tmp_path / "folds.csv").write_text("fold,speaker\n0,03\n0,08\n1,09\n")
    assert read_folds(str(tmp_path / "folds.json")) == [["03", "08"], ["emodb:09"]]
    assert read_folds(str(tmp_path / "folds.csv")) == [["03", "08"], ["09"]]
    out, n = assign_folds(df, "loso", 5, 0, folds=str(tmp_path / "folds.csv"))
    assert n == 2 and out["fold"].tolist() == [0, 0, 0, 1, -1, -1]
    train, val, test = fold_frames(out, "loso", 1, val_fraction=0.3, seed=0)
    assert set(test["speaker"]) == {"emodb:09"} and not set(train["speaker"]) & set(val["speaker"])
    assert {"emodb:10", "emodb:11"} <= set(train["speaker"]) | set(val["speaker"])  # never tested, always training
    with pytest.raises(SpeakerLeakError, match="two folds"):
        given_folds(df, [["03"], ["emodb:03"]])
    with pytest.raises(ValueError, match="not in the manifest"):
        given_folds(df, [["99"]])
