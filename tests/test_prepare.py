"""prepare(): manifest -> Ray Data -> Parquet feature cache, locally and on S3, with bad clips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
import time

import numpy as np
import pandas as pd
import pytest

from ser_ray import storage
from ser_ray.audio.decode import load_clip
from ser_ray.features import FeatureConfig, FeatureExtractor
from ser_ray.features.pipeline import (
    CACHE_JSON,
    cache_key,
    features_array,
    load_cache,
    load_cache_pandas,
    prepare,
)

EMOTIONS = {"W": "anger", "L": "boredom", "E": "disgust", "A": "fear", "F": "happiness", "T": "sadness", "N": "neutral"}


def manifest_of(paths: list[str]) -> pd.DataFrame:
    """A manifest by hand: EmoDB names give speaker (chars 0-1) and emotion (char 5)."""
    names = [p.rsplit("/", 1)[-1] for p in paths]
    return pd.DataFrame({
        "path": paths,
        "corpus": "emodb",
        "speaker": ["emodb:" + n[:2] for n in names],
        "gender": "unknown",
        "sentence": [n[2:5] for n in names],
        "emotion": [EMOTIONS.get(n[5], "neutral") for n in names],
        "intensity": [n[6:7] for n in names],
        "duration_s": 2.0,
        "sample_rate": 22_050,
    })


def reference_features(paths, config=FeatureConfig()) -> np.ndarray:
    """The extractor run in this process, clip by clip: what the pipeline must reproduce."""
    extractor = FeatureExtractor(config)
    return np.stack([extractor(extractor.prepare_wave(load_clip(p, config.sample_rate), config.sample_rate)[None])[0]
                     for p in paths])


@pytest.fixture
def clips_dir(tmp_path, emodb_root):
    """20 real EmoDB clips plus one corrupt and one empty WAV in a local directory."""
    d = tmp_path / "clips"
    d.mkdir()
    for src in sorted(emodb_root.glob("*.wav"))[::25][:20]:
        shutil.copy(src, d / src.name)
    (d / "16b01Wz.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot really a wave file")
    (d / "16b02Nz.wav").write_bytes(b"")
    return d


def test_prepare_local_counts_errors_and_reuses(ray_session, clips_dir, tmp_path):
    paths = sorted(str(p) for p in clips_dir.glob("*.wav"))
    manifest = manifest_of(paths)
    root = str(tmp_path / "cache")

    info = prepare(manifest, root, batch_size=8, progress=False)
    assert (info.n_ok, info.n_error, info.reused) == (20, 2, False)
    assert info.path == f"{root}/{info.key}"
    messages = dict(info.errors)
    assert "empty file" in messages[str(clips_dir / "16b02Nz.wav")]
    assert "not a readable audio file" in messages[str(clips_dir / "16b01Wz.wav")]

    frame = load_cache_pandas(info)
    assert list(frame.columns) == list(manifest.columns) + ["features", "error"]
    assert len(frame) == 22 and frame["path"].tolist() == paths
    pd.testing.assert_frame_equal(frame[manifest.columns], manifest)
    bad = frame["error"].notna()
    assert bad.sum() == 2
    x = features_array(frame)
    assert x.shape == (22, 128, 94) and x.dtype == np.float32
    assert np.all(x[bad.to_numpy()] == 0)
    good = ~bad.to_numpy()
    np.testing.assert_allclose(x[good], reference_features(np.array(paths)[good]), atol=1e-3)

    # Same inputs: the complete cache is reused, nothing recomputed.
    t0 = time.perf_counter()
    again = prepare(manifest, root, batch_size=8, progress=False)
    assert again.reused and (again.key, again.n_ok, again.n_error) == (info.key, 20, 2)
    assert time.perf_counter() - t0 < 2.0

    # A cache dir without cache.json (a crashed run) is removed and rebuilt.
    (tmp_path / "cache" / info.key / CACHE_JSON).unlink()
    (tmp_path / "cache" / info.key / "partial.parquet").write_bytes(b"half a file")
    redone = prepare(manifest, root, batch_size=8, progress=False)
    assert not redone.reused and (redone.n_ok, redone.n_error) == (20, 2)
    assert not (tmp_path / "cache" / info.key / "partial.parquet").exists()
    assert load_cache(redone).count() == 22


def test_cache_key_follows_config_and_manifest(clips_dir):
    manifest = manifest_of(sorted(str(p) for p in clips_dir.glob("*.wav")))
    key = cache_key(manifest, FeatureConfig())
    assert key == cache_key(manifest.copy(), FeatureConfig())
    assert key != cache_key(manifest, FeatureConfig(kind="mfcc"))
    assert key != cache_key(manifest, FeatureConfig(normalize="rms"))
    relabelled = manifest.assign(emotion="neutral")
    assert key != cache_key(relabelled, FeatureConfig())
    (clips_dir / "16b02Nz.wav").write_bytes(b"now it has bytes")  # a file replaced in place
    assert key != cache_key(manifest, FeatureConfig())


def test_load_cache_refuses_an_incomplete_cache(tmp_path):
    (tmp_path / "abc").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete feature cache"):
        load_cache_pandas(str(tmp_path / "abc"))


def test_prepare_from_s3_into_s3_matches_local(ray_session, s3_bucket, emodb_root):
    bucket, client = s3_bucket
    local = sorted(str(p) for p in emodb_root.glob("*.wav"))[::60][:6]
    uris = []
    for p in local:
        key = "corpus/emodb/" + p.rsplit("/", 1)[-1]
        client.upload_file(p, bucket, key)
        uris.append(f"s3://{bucket}/{key}")
    manifest = manifest_of(uris)
    config = FeatureConfig(kind="mfcc")

    info = prepare(manifest, f"s3://{bucket}/features", config, batch_size=4, progress=False)
    assert (info.n_ok, info.n_error) == (6, 0)
    assert info.path.startswith(f"s3://{bucket}/features/")
    assert storage.exists(storage.join(info.path, CACHE_JSON))

    frame = load_cache_pandas(info.path)
    assert frame["path"].tolist() == uris
    np.testing.assert_allclose(features_array(frame), reference_features(local, config), atol=1e-3)
    ds = load_cache(info.path)
    assert ds.count() == 6
    row = ds.take(1)[0]
    assert row["features"].shape == config.shape == (40, 94)
    assert prepare(manifest, f"s3://{bucket}/features", config, progress=False).reused


def test_actor_pool_strategy_gives_the_same_rows(ray_session, emodb_root, tmp_path):
    paths = sorted(str(p) for p in emodb_root.glob("*.wav"))[1::90][:4]
    info = prepare(manifest_of(paths), str(tmp_path), FeatureConfig(kind="zcr_energy"),
                   strategy="actors", batch_size=2, progress=False)
    frame = load_cache_pandas(info)
    assert info.n_ok == 4
    np.testing.assert_allclose(features_array(frame), reference_features(paths, info.config), atol=1e-5)


def test_cli_prepare_writes_and_reports(ray_session, clips_dir, tmp_path, capsys):
    from ser_ray.cli import main

    paths = sorted(str(p) for p in clips_dir.glob("*.wav"))[:3]
    manifest_path = tmp_path / "m.csv"
    manifest_of(paths).to_csv(manifest_path, index=False)
    code = main(["prepare", "--manifest", str(manifest_path), "--out", str(tmp_path / "c"),
                 "--features", "waveform", "--normalize", "peak", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "3 clips ok, 0 errors" in out
    info_dir = out.split(":", 1)[0]
    x = features_array(load_cache_pandas(info_dir))
    assert x.shape == (3, 1, 48_000)
    assert np.allclose(np.abs(x).max(axis=(1, 2)), 1.0, atol=1e-3)  # peak-normalised windows


def test_local_processes_write_the_same_rows_as_ray_data(ray_session, clips_dir, tmp_path):
    """strategy="local" (worker processes, no Ray) gives Ray Data's rows: features, errors, columns."""
    paths = sorted(str(p) for p in clips_dir.glob("*.wav"))
    manifest = manifest_of(paths)
    local = prepare(manifest, str(tmp_path / "local"), strategy="local", batch_size=4, progress=False)
    tasks = prepare(manifest, str(tmp_path / "tasks"), strategy="tasks", batch_size=4, progress=False)
    assert (local.n_ok, local.n_error, local.key) == (20, 2, tasks.key)
    assert sorted(local.errors) == sorted(tasks.errors)
    a, b = load_cache_pandas(local), load_cache_pandas(tasks)
    pd.testing.assert_frame_equal(a.drop(columns="features"), b.drop(columns="features"))
    np.testing.assert_array_equal(features_array(a), features_array(b))
    assert load_cache(local).count() == 22  # Ray Data reads what the processes wrote
    assert json.loads(storage.read_bytes(storage.join(local.path, CACHE_JSON)))["strategy"] == "local"


def _prepare_without_ray(manifest: pd.DataFrame, tmp_path, out: str):
    """`ser-ray prepare` in a fresh process with no Ray to join: (its stdout, the multiprocessing start
    methods its worker pools used)."""
    import os
    import subprocess
    import sys

    manifest.to_csv(tmp_path / "m.csv", index=False)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_ID")}
    probe = ("import multiprocessing, sys, ser_ray.cli; methods = []; get = multiprocessing.get_context; "
             "multiprocessing.get_context = lambda m=None: methods.append(m) or get(m); "
             "code = ser_ray.cli.main(sys.argv[1:]); "
             "print('ray started:', 'ray' in sys.modules and sys.modules['ray'].is_initialized(), methods); "
             "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, "prepare", "--manifest", str(tmp_path / "m.csv"),
                           "--out", out, "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_prepare_without_ray_forks_local_workers(clips_dir, tmp_path):
    """`ser-ray prepare` with no Ray running or given starts none: forked worker processes do it."""
    paths = sorted(str(p) for p in clips_dir.glob("*.wav"))
    out = _prepare_without_ray(manifest_of(paths), tmp_path, str(tmp_path / "c"))
    assert "20 clips ok, 2 errors" in out and "ray started: False ['fork']" in out
    cache = out.split(":", 1)[0]
    assert json.loads((Path(cache) / CACHE_JSON).read_text())["strategy"] == "local"
    frame = load_cache_pandas(cache)
    good = frame["error"].isna().to_numpy()
    np.testing.assert_allclose(features_array(frame)[good], reference_features(np.array(paths)[good]), atol=1e-3)


def test_cli_prepare_without_ray_on_s3_spawns_local_workers(s3_bucket, emodb_root, tmp_path):
    """Clips and cache on S3 with no Ray: local workers again, spawned (the AWS SDK the command has
    started is not fork-safe), and the rows equal the extractor's."""
    bucket, client = s3_bucket
    local = sorted(str(p) for p in emodb_root.glob("*.wav"))[::90][:5]
    uris = []
    for p in local:
        client.upload_file(p, bucket, "clips/" + p.rsplit("/", 1)[-1])
        uris.append(f"s3://{bucket}/clips/" + p.rsplit("/", 1)[-1])
    out = _prepare_without_ray(manifest_of(uris), tmp_path, f"s3://{bucket}/cache")
    assert "5 clips ok, 0 errors" in out and "ray started: False ['spawn']" in out
    cache = out.split(": ", 1)[0]
    assert json.loads(storage.read_bytes(storage.join(cache, CACHE_JSON)))["strategy"] == "local"
    frame = load_cache_pandas(cache)
    assert frame["path"].tolist() == uris
    np.testing.assert_allclose(features_array(frame), reference_features(local), atol=1e-3)
