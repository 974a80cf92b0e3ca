"""The Serve app over real HTTP: predictions, annotation rows, access control, upload limits, the client.

One tiny three-member bundle (random cnn + bigru_attn on 1 s log-mel windows, a logreg fitted on
functionals of tones) is served once for the module on 127.0.0.1; every test talks to it with httpx like a user would.
"""

from __future__ import annotations

import io
import os
import time
import types

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import free_port
from ser_ray.features.config import FeatureConfig
from ser_ray.auth import digest

LABELS = ["anger", "disgust", "fear", "happiness", "neutral", "sadness"]
FEATURES = FeatureConfig(kind="logmel", window_s=1.0, n_mels=32, n_fft=512, hop_length=256)
CLASSICAL = FeatureConfig(kind="functionals", window_s=1.0, n_mels=32, n_mfcc=13, n_fft=512, hop_length=160)
MAX_UPLOAD_MB = 0.25
API_KEY = "test-key-0123456789"
REQUEST_TIMEOUT_S = 20
MAX_WINDOWS_PER_REQUEST = 16  # 1 s windows every 0.5 s: 8 s of audio per /annotate request


def tone(seconds: float, sr: int = 16_000, freq: float = 220.0, seed: int = 0, channels: int = 1) -> np.ndarray:
    """A loud noisy harmonic signal (passes the energy VAD), ``[samples, channels]``."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(len(t))
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


def fitted_logreg():
    """A logreg fitted on functionals of tones of six pitches (one per label), three "speakers"."""
    from ser_ray.features.extractor import FeatureExtractor
    from ser_ray.models import build_model

    extractor = FeatureExtractor(CLASSICAL)
    waves = np.stack([tone(1.0, freq=110 * (1 + label), seed=seed)[:, 0] for label in range(len(LABELS))
                      for seed in range(6)])
    labels = np.repeat(np.arange(len(LABELS)), 6)
    model = build_model("logreg", len(LABELS), CLASSICAL, C=0.1)
    model.fit_arrays(extractor(waves), labels, np.tile(np.arange(6) % 3, len(LABELS)))
    return model


def make_bundle(directory) -> str:
    from ser_ray.ensemble.bundle import Bundle, Member, save_bundle
    from ser_ray.models import build_model

    torch.manual_seed(0)
    members = [
        Member("cnn", build_model("cnn", len(LABELS), FEATURES, width=8), FEATURES, weight=0.6, temperature=1.5, name="cnn"),
        Member("bigru_attn", build_model("bigru_attn", len(LABELS), FEATURES, hidden=16, attn_dim=16), FEATURES,
               weight=0.4, temperature=1.0, name="bigru"),
    ]
    members.append(Member("logreg", fitted_logreg(), CLASSICAL, weight=0.5, temperature=1.0, name="logreg"))
    for m in members:
        m.model.eval()
    save_bundle(Bundle(labels=LABELS, members=members, sample_rate=16_000, window_s=1.0), str(directory))
    return str(directory)


def test_access_policy_decides_without_reading(tmp_path):
    """Lexical check first (no filesystem access for /etc/passwd), then realpath for symlinks."""
    from ser_ray.serve.access import AccessPolicy

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "s.wav").write_bytes(b"x")
    os.symlink(outside / "s.wav", root / "link.wav")
    os.symlink(root, tmp_path / "root-alias")  # a root spelled through a symlink still works
    policy = AccessPolicy([str(tmp_path / "root-alias")], ["bkt", "shared/team-a"])
    allowed = [str(root / "a.wav"), str(tmp_path / "root-alias" / "a.wav"), "s3://bkt/x/y.wav",
               "s3://shared/team-a/z.flac"]
    for uri in allowed:
        assert policy.check(uri).status == 200, uri
    assert policy.check(str(tmp_path / "root-alias" / "a.wav")).path == str(root / "a.wav")
    refused = {str(root / ".." / "outside" / "s.wav"): 403, str(root / "link.wav"): 403, "/etc/passwd": 403,
               str(root) + "-other/a.wav": 403, "s3://other/x.wav": 403, "s3://shared/team-b/x.wav": 403,
               "s3://bkt/a/../../other/x": 403, "s3://bkt": 400, "http://example.com/a.wav": 400,
               "a.wav": 400, "": 400, "/x\x00y": 400}
    for uri, status in refused.items():
        assert policy.check(uri).status == status, uri


def test_a_directory_swapped_for_a_symlink_after_the_check_is_not_followed(tmp_path):
    """Between check and open, a directory on the resolved path replaced by a symlink to outside the
    root redirected the read (12 of 64 on a stand-in). The fd walk with O_NOFOLLOW refuses it."""
    import threading

    from ser_ray.serve.access import AccessPolicy

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    (root / "d" / "x.wav").write_bytes(b"inside")
    (outside / "x.wav").write_bytes(b"SECRET")
    policy = AccessPolicy([str(root)])
    stop = threading.Event()

    def flip():
        real, link = root / "d", root / "d-link"
        while not stop.is_set():
            os.rename(real, root / "d-real")
            os.symlink(outside, link)
            os.rename(link, real)  # d is now a symlink to outside
            os.unlink(real)
            os.rename(root / "d-real", real)
            time.sleep(0.0002)  # leave the real directory in place for a moment so some reads get through

    flipper = threading.Thread(target=flip)
    flipper.start()
    reads, refused = [], 0
    # Bounded by time and by reads, not by a count of tries: on a loaded machine the flipper can hold
    # every one of a fixed number of tries (CI once saw no read at all in 400).
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline and (len(reads) < 50 or refused == 0) and len(reads) < 5000:
            decision = policy.check(str(root / "d" / "x.wav"))
            if decision.status != 200:
                continue
            try:
                with policy.open(decision.path) as f:
                    reads.append(f.read())
            except OSError:
                refused += 1
    finally:
        stop.set()
        flipper.join()
    assert b"SECRET" not in reads
    assert reads, "no read got through the flips at all"
    print(f"{len(reads)} reads, {refused} refused mid-flip")


def test_relative_allow_root_resolves_where_the_user_runs_the_command(tmp_path, monkeypatch):
    import argparse

    from ser_ray.serve.commands import add_arguments, config_from_args

    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--bundle", "b", "--allow-root", "archive", "--allow-root", "/abs"]))
    assert config.allowed_roots == [str(tmp_path / "archive"), "/abs"]


def test_serve_config_from_string_args():
    from ser_ray.serve.app import ServeConfig

    cfg = ServeConfig.from_dict({"bundle": "s3://b/bundle", "allowed_roots": "/a, /b", "max_batch_size": "8",
                                 "num_gpus": "0.5", "window_s": "none"})
    assert (cfg.allowed_roots, cfg.max_batch_size, cfg.num_gpus, cfg.window_s) == (["/a", "/b"], 8, 0.5, None)
    with pytest.raises(ValueError, match="unknown serve option.*max_bach"):
        ServeConfig.from_dict({"bundle": "x", "max_bach": 4})
    with pytest.raises(ValueError, match="needs `bundle`"):
        ServeConfig.from_dict({})


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    import boto3
    from ray import serve

    from ser_ray.serve.app import ServeConfig, build_app

    tmp = tmp_path_factory.mktemp("serve")
    bundle = make_bundle(tmp / "bundle")
    root = tmp / "audio"
    (root / "sub").mkdir(parents=True)
    sf.write(root / "a.wav", tone(2.5, seed=1), 16_000)
    sf.write(root / "sub" / "b.flac", tone(3.2, sr=22_050, freq=330, seed=2, channels=2), 22_050)
    sf.write(root / "c.wav", tone(1.7, freq=150, seed=3), 16_000)
    (root / "notes.txt").write_text("not audio")
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    outside = tmp / "outside"
    outside.mkdir()
    sf.write(outside / "secret.wav", tone(1.0), 16_000)
    os.symlink(outside / "secret.wav", root / "link.wav")

    bucket = f"serve-audio-{free_port()}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    sf.write(tmp / "s3.wav", tone(2.0, seed=4), 16_000)
    s3.upload_file(str(tmp / "s3.wav"), bucket, "clips/s3.wav")

    config = ServeConfig(
        bundle=bundle, allowed_roots=[str(root)], allowed_buckets=[bucket], max_upload_mb=MAX_UPLOAD_MB,
        hop_s=0.5, max_batch_size=8, num_cpus=0.5, ingress_num_cpus=0.25, ingress_threads=4,
        api_key_sha256=digest(API_KEY), ingress_max_ongoing=8, max_queued_requests=4, retry_after_s=3,
        request_timeout_s=REQUEST_TIMEOUT_S, max_windows_per_request=MAX_WINDOWS_PER_REQUEST,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": REQUEST_TIMEOUT_S})
    serve.run(build_app(config), name="ser-ray-test", route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        yield types.SimpleNamespace(http=http, url=f"http://127.0.0.1:{port}", root=root, outside=outside,
                                    bucket=bucket, bundle=bundle, config=config, tmp=tmp)
    serve.shutdown()


def wav_bytes(seconds: float = 2.0, sr: int = 16_000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds), sr, format="WAV")
    return buf.getvalue()


def client_for_new_app(served, prefix: str) -> httpx.Client:
    """A client on new connections for an app just added at ``prefix``, once that prefix is routed to it.

    Adding an app makes HAProxy reload its routing table; a keep-alive connection opened before the
    reload is served by the old process and table until HAProxy closes it (seconds to minutes), so
    there ``prefix`` still falls to the app at "/". New connections get the new table."""
    deadline = time.time() + 30
    while httpx.get(served.url + prefix + "/healthz", timeout=30).status_code == 404:
        assert time.time() < deadline, f"{prefix} not routed within 30 s"
        time.sleep(0.2)
    return httpx.Client(base_url=served.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"})


def assert_still_serving(served):
    r = served.http.post("/annotate", json={"uris": [str(served.root / "a.wav")]})
    assert r.status_code == 200, r.text
    assert r.json()["files"][0]["status"] == "ok"


def test_health_and_labels(served):
    r = httpx.get(served.url + "/healthz")  # the one route without the key
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert r.json()["members"] == ["cnn", "bigru", "logreg"]
    assert r.json()["member_status"] == {"cnn": "ok", "bigru": "ok", "logreg": "ok"}  # each member answered
    assert r.json()["limits"]["max_upload_duration_s"] == 600.0  # the limits in force, for clients
    assert served.http.get("/labels").json() == {"labels": LABELS}


def test_predict_upload_gives_label_probabilities_and_segments(served):
    r = served.http.post("/predict", files={"file": ("clip.wav", wav_bytes(2.0), "audio/wav")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] in LABELS
    assert set(body["probabilities"]) == set(LABELS)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["duration_s"] == pytest.approx(2.0)
    # 1 s windows every 0.5 s over 2 s: starts 0, 0.5, 1.0 (the last one padded)
    assert [s["start_s"] for s in body["segments"]] == [0.0, 0.5, 1.0]
    for seg in body["segments"]:
        assert seg["label"] in LABELS
        assert sum(seg["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_annotate_rows_one_file_row_per_uri_and_error_rows_for_bad_files(served):
    uris = [str(served.root / "a.wav"), str(served.root / "sub" / "b.flac"), str(served.root / "corrupt.wav"),
            str(served.root / "notes.txt"), str(served.root / "missing.wav"), f"s3://{served.bucket}/clips/s3.wav"]
    r = served.http.post("/annotate", json={"uris": uris})
    assert r.status_code == 200, r.text
    files = {f["uri"]: f for f in r.json()["files"]}
    assert list(files) == uris
    for uri in (uris[0], uris[1], uris[5]):
        assert files[uri]["status"] == "ok" and files[uri]["label"] in LABELS, files[uri]
        assert files[uri]["n_segments"] > 0
    for uri in uris[2:5]:
        assert files[uri]["status"] == "error" and files[uri]["error"], files[uri]
    assert "not a readable audio file" in files[uris[3]]["error"]
    assert files[uris[1]]["duration_s"] == pytest.approx(3.2, abs=1e-3)
    segments = r.json()["segments"]
    assert {s["uri"] for s in segments} == {uris[0], uris[1], uris[5]}
    assert sum(1 for s in segments if s["uri"] == uris[0]) == files[uris[0]]["n_segments"]


@pytest.mark.parametrize(
    "make_uri, status",
    [
        (lambda s: str(s.root) + "/../outside/secret.wav", 403),  # traversal
        (lambda s: str(s.root) + "/../../../../../etc/passwd", 403),
        (lambda s: "/etc/passwd", 403),  # absolute, outside
        (lambda s: str(s.root / "link.wav"), 403),  # symlink inside the root pointing out
        (lambda s: str(s.outside / "secret.wav"), 403),  # a directory that is not an allowed root
        (lambda s: str(s.root) + "2/a.wav", 403),  # a sibling sharing the root's name prefix
        (lambda s: "s3://other-bucket/x.wav", 403),  # disallowed bucket
        (lambda s: f"s3://{s.bucket}/../other-bucket/x.wav", 403),
        (lambda s: "file:///etc/passwd", 400),
        (lambda s: "audio/a.wav", 400),  # relative
    ],
)
def test_annotate_refuses_uris_outside_roots_and_buckets(served, make_uri, status):
    bad = make_uri(served)
    good = str(served.root / "a.wav")
    r = served.http.post("/annotate", json={"uris": [good, bad]})
    assert r.status_code == status, r.text
    # the whole request is refused, naming the offending URI only
    assert [x["uri"] for x in r.json()["refused"]] == [bad]
    assert "nothing was read" in r.json()["detail"]
    answer = r.text.replace(bad, "")  # the client's own URI aside, no root or bucket is named
    assert str(served.root) not in answer and served.bucket not in answer
    assert_still_serving(served)


def test_annotate_rejects_malformed_bodies(served):
    assert served.http.post("/annotate", json={"uris": []}).status_code == 400
    assert served.http.post("/annotate", json={"paths": ["x"]}).status_code == 422
    assert served.http.post("/annotate", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert_still_serving(served)


def test_upload_limits_and_non_audio(served):
    big = b"\0" * int((MAX_UPLOAD_MB + 0.1) * 1024 * 1024)
    # declared size over the limit
    r = served.http.post("/predict", files={"file": ("big.wav", big, "audio/wav")})
    assert r.status_code == 413, r.text
    assert "limit" in r.json()["detail"]

    # no Content-Length (chunked): bytes are counted while reading
    boundary = "ser-ray-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode()

    def chunks():
        yield head
        for i in range(0, len(big), 64 * 1024):
            yield big[i:i + 64 * 1024]
        yield f"\r\n--{boundary}--\r\n".encode()

    r = served.http.post("/predict", content=chunks(),
                         headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text

    r = served.http.post("/predict", files={"file": ("notes.txt", b"hello, not audio", "text/plain")})
    assert r.status_code == 415
    assert "notes.txt: not a readable audio file" in r.json()["detail"]
    assert "object at 0x" not in r.json()["detail"] and "BytesIO" not in r.json()["detail"]  # no internals
    slow = io.BytesIO()
    sf.write(slow, np.zeros(3000, np.float32), 1, format="WAV", subtype="PCM_16")  # 1 Hz: hours of windows
    r = served.http.post("/predict", files={"file": ("slow.wav", slow.getvalue(), "audio/wav")})
    assert r.status_code == 415 and "sample rate 1 Hz" in r.json()["detail"]
    dc = io.BytesIO()  # 20 minutes of DC: a small FLAC that would be 800 windows
    sf.write(dc, np.full(20 * 60 * 8000, 0.25, np.float32), 8000, format="FLAC")
    assert len(dc.getvalue()) < MAX_UPLOAD_MB * 1024 * 1024
    r = served.http.post("/predict", files={"file": ("long.flac", dc.getvalue(), "audio/flac")})
    assert r.status_code == 422 and "over the limit of 600 s" in r.json()["detail"], r.text
    r = served.http.post("/predict", content=wav_bytes(), headers={"content-type": "audio/wav"})
    assert r.status_code == 415 and "multipart" in r.json()["detail"]
    r = served.http.post("/predict", files={"other": ("clip.wav", wav_bytes(), "audio/wav")})
    assert r.status_code == 400 and "'file'" in r.json()["detail"]

    r = served.http.post("/predict", files={"file": ("clip.wav", wav_bytes(1.2), "audio/wav")})
    assert r.status_code == 200 and r.json()["label"] in LABELS
    assert_still_serving(served)


def test_endpoint_matches_offline_annotation(served):
    from ser_ray.annotate import AnnotateConfig, annotate_file
    from ser_ray.ensemble.bundle import load_bundle

    bundle = load_bundle(served.bundle)
    config = AnnotateConfig(window_s=1.0, hop_s=served.config.hop_s, vad=served.config.vad)
    uris = [str(served.root / "a.wav"), str(served.root / "sub" / "b.flac"), str(served.root / "c.wav")]
    answer = served.http.post("/annotate", json={"uris": uris}).json()
    for uri, row in zip(uris, answer["files"]):
        offline_row, offline_segments = annotate_file(uri, bundle.predict_proba, config)
        assert row["label"] == offline_row["label"]
        for label in LABELS:
            assert row[f"prob_{label}"] == pytest.approx(offline_row[f"prob_{label}"], abs=1e-4)
        served_segments = [s for s in answer["segments"] if s["uri"] == uri]
        assert len(served_segments) == len(offline_segments) > 0
        for mine, theirs in zip(served_segments, offline_segments):
            assert (mine["start_s"], mine["end_s"], mine["label"]) == (theirs["start_s"], theirs["end_s"], theirs["label"])
            for label in LABELS:
                assert mine[f"prob_{label}"] == pytest.approx(theirs[f"prob_{label}"], abs=1e-4)


def test_members_in_deployments_answer_like_members_in_the_ingress(served):
    """The two member placements run the same features, member forward passes and combine: a second app
    with one deployment per member (eager modules) gives the rows of the first (members in the ingress,
    TorchScript where faster), to 1e-4."""
    import dataclasses

    from ray import serve

    from ser_ray.serve.app import build_app

    config = dataclasses.replace(served.config, members="deployments", backend="eager", num_cpus=0.05,
                                 ingress_num_cpus=0.05, route_prefix="/dep")
    serve.run(build_app(config), name="ser-ray-deployments", route_prefix="/dep")
    try:
        uris = [str(served.root / "a.wav"), str(served.root / "sub" / "b.flac")]
        ours = served.http.post("/annotate", json={"uris": uris}).json()
        with client_for_new_app(served, "/dep") as dep:
            theirs = dep.post("/dep/annotate", json={"uris": uris}).json()
            health = dep.get("/dep/healthz").json()
        assert len(ours["segments"]) == len(theirs["segments"]) > 0
        for mine, other in zip(ours["files"] + ours["segments"], theirs["files"] + theirs["segments"]):
            assert (mine["uri"], mine["label"], mine.get("start_s")) == (other["uri"], other["label"], other.get("start_s"))
            for label in LABELS:
                assert mine[f"prob_{label}"] == pytest.approx(other[f"prob_{label}"], abs=1e-4)
        assert health["member_status"] == {"cnn": "ok", "bigru": "ok", "logreg": "ok"}
    finally:
        serve.delete("ser-ray-deployments")


def test_annotate_via_endpoint_writes_tables_and_resumes(served):
    from ser_ray.annotate.writer import ResultWriter
    from ser_ray.annotate.endpoint import annotate_via_endpoint

    out = served.tmp / "annotations"
    # an archive with only allowed files: a subfolder of the root (the symlink would be refused)
    summary = annotate_via_endpoint(str(served.root / "sub"), str(out), served.url, batch_files=1, progress=False,
                                    api_key=API_KEY)
    assert summary["n_processed"] == 1
    archive = served.tmp / "archive"
    archive.mkdir()
    for i in range(3):
        sf.write(archive / f"clip{i}.wav", tone(1.5 + i * 0.5, seed=10 + i), 16_000)
    (archive / "readme.txt").write_text("not audio")
    # the archive is not under the server's roots: every URI gets an error row, the run ends normally
    refused = annotate_via_endpoint(str(archive), str(served.tmp / "refused"), served.url, progress=False,
                                    api_key=API_KEY)
    assert (refused["n_processed"], refused["n_error"]) == (4, 4)
    rows = ResultWriter(str(served.tmp / "refused")).read_tables()[0]
    assert set(rows["error_code"]) == {"refused"} and rows["error"].str.contains("outside the allowed roots").all()
    with pytest.raises(Exception, match="401"):  # no key: a fatal error, nothing written
        annotate_via_endpoint(str(archive), str(served.tmp / "nokey"), served.url, progress=False,
                              api_key="wrong")

    # serve the archive's files through the allowed root: copy them in
    target = served.root / "archive"
    target.mkdir()
    for p in archive.iterdir():
        (target / p.name).write_bytes(p.read_bytes())
    out2 = served.tmp / "annotations2"
    first = annotate_via_endpoint(str(target), str(out2), served.url, batch_files=2, concurrency=2, progress=False,
                                  api_key=API_KEY)
    assert (first["n_files"], first["n_processed"], first["n_ok"], first["n_error"]) == (4, 4, 3, 1)
    files, segments = ResultWriter(str(out2)).read_tables()
    assert sorted(files["uri"]) == sorted(str(p) for p in target.iterdir())
    assert files["uri"].is_unique
    assert set(segments["uri"]) == {str(target / f"clip{i}.wav") for i in range(3)}
    again = annotate_via_endpoint(str(target), str(out2), served.url, progress=False, api_key=API_KEY)
    assert (again["n_skipped"], again["n_processed"]) == (4, 0)
    assert len(ResultWriter(str(out2)).read_tables()[0]) == 4


def test_api_key_and_host_are_checked_before_anything_is_read(served):
    """No authentication and any Host header were accepted: a web page could reach a loopback
    endpoint by DNS rebinding. Now every route but /healthz needs the key, every route the Host."""
    body = {"uris": [str(served.root / "a.wav")]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
        r = httpx.post(served.url + "/annotate", json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert "API key" in r.json()["detail"]
    r = httpx.post(served.url + "/predict", files={"file": ("clip.wav", wav_bytes(1.0), "audio/wav")})
    assert r.status_code == 401
    assert httpx.post(served.url + "/annotate", json=body, headers={"X-API-Key": API_KEY}).status_code == 200
    rebound = {"Authorization": f"Bearer {API_KEY}", "Host": "attacker.example:8000"}
    assert httpx.post(served.url + "/annotate", json=body, headers=rebound).status_code == 421
    assert httpx.get(served.url + "/healthz", headers={"Host": "attacker.example"}).status_code == 421
    assert httpx.get(served.url.replace("127.0.0.1", "localhost") + "/labels",
                     headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_a_repeated_uri_is_annotated_once(served):
    uri = str(served.root / "a.wav")
    answer = served.http.post("/annotate", json={"uris": [uri, uri, uri]}).json()
    assert [f["uri"] for f in answer["files"]] == [uri]
    starts = [s["start_s"] for s in answer["segments"]]
    assert len(starts) == len(set(starts)) == answer["files"][0]["n_segments"]


def test_hard_links_and_fifos_under_a_root_are_not_read(served):
    """A hard link inside a root to a file outside it looked like any file inside."""
    hard = served.root / "hard.wav"
    os.link(served.outside / "secret.wav", hard)
    fifo = served.root / "pipe.wav"
    os.mkfifo(fifo)
    try:
        answer = served.http.post("/annotate", json={"uris": [str(hard), str(fifo)]}).json()
    finally:
        hard.unlink()
        fifo.unlink()
    rows = {f["uri"]: f for f in answer["files"]}
    assert rows[str(hard)]["status"] == "error" and rows[str(hard)]["error_code"] == "access_denied"
    assert rows[str(fifo)]["status"] == "error" and rows[str(fifo)]["error_code"] == "not_a_file"
    assert answer["segments"] == []


def test_slow_uploads_cannot_hold_the_endpoint(served):
    """~64 sockets trickling uploads held every ingress slot for ever, /healthz included. Now the
    slots are bounded, the overflow gets 503 with Retry-After at once, and the HTTP proxy cuts every
    request at request_timeout_s, after which the endpoint answers again."""
    import socket
    import time

    request = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
               "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 200000\r\n\r\n").encode()
    port = int(served.url.rsplit(":", 1)[1])
    sockets = []
    try:
        for _ in range(served.config.ingress_max_ongoing + served.config.max_queued_requests + 2):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(request)  # headers, then nothing: the body never comes
            sockets.append(sock)
        time.sleep(2.0)
        start = time.perf_counter()
        r = served.http.post("/annotate", json={"uris": [str(served.root / "a.wav")]}, timeout=REQUEST_TIMEOUT_S * 3)
        if r.status_code == 503:  # refused at once, with a time to come back
            assert time.perf_counter() - start < 5 and int(r.headers["retry-after"]) >= 1, r.headers
        else:  # or served once the stalled uploads were cut
            assert r.status_code == 200 and time.perf_counter() - start < REQUEST_TIMEOUT_S * 2
        answers = []
        for sock in sockets:
            sock.settimeout(REQUEST_TIMEOUT_S * 2)
            answers.append(sock.recv(200).split(b"\r\n", 1)[0])
        assert all(a.startswith(b"HTTP/1.1 408") or a.startswith(b"HTTP/1.1 503") for a in answers), answers
    finally:
        for sock in sockets:
            sock.close()
    assert_still_serving(served)


class _ScriptedEndpoint:
    """A stand-in /annotate that answers from a script: (status, headers[, delay_s]) per request, then
    200 rows."""

    def __init__(self, script):
        import http.server
        import json
        import threading

        self.script, self.times = list(script), []
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                uris = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["uris"]
                endpoint.times.append(time.perf_counter())
                status, headers, *delay = endpoint.script.pop(0) if endpoint.script else (200, {})
                time.sleep(delay[0] if delay else 0.0)  # a server still computing
                body = {"files": [{"uri": u, "status": "ok", "error": None, "duration_s": 1.0, "label": "anger",
                                   "n_segments": 0, "n_windows": 1} for u in uris], "segments": []}
                data = json.dumps(body if status == 200 else {"detail": "busy"}).encode()
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped: what the test wants
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_client_honours_retry_after_and_stops_at_once_on_a_fatal_answer(tmp_path):
    from ser_ray.annotate.endpoint import EndpointError, annotate_via_endpoint

    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(4):
        (archive / f"{i}.wav").write_bytes(b"x")
    endpoint = _ScriptedEndpoint([(503, {"Retry-After": "2"})])  # overloaded once, asks for 2 s
    summary = annotate_via_endpoint(str(archive), str(tmp_path / "out"), endpoint.url, batch_files=4,
                                    concurrency=1, progress=False, api_key="k")
    assert summary["n_ok"] == 4 and endpoint.times[1] - endpoint.times[0] >= 1.9  # not the 1 s backoff
    endpoint.server.shutdown()

    # one batch is refused for good (401) while the others are told to come back in 60 s
    endpoint = _ScriptedEndpoint([(401, {})] + [(503, {"Retry-After": "60"})] * 3)
    start = time.perf_counter()
    with pytest.raises(EndpointError, match="401"):
        annotate_via_endpoint(str(archive), str(tmp_path / "out2"), endpoint.url, batch_files=1, concurrency=4,
                              progress=False, api_key="k")
    assert time.perf_counter() - start < 10  # the 60 s waits were not sat out
    endpoint.server.shutdown()


def test_a_timed_out_batch_is_not_sent_again_while_the_server_may_still_compute_it(tmp_path):
    """The client re-sent a timed-out batch while the server still computed it (up to 6x the load).
    Now its URIs get retry rows at once, and the next run annotates them."""
    from ser_ray.annotate.endpoint import annotate_via_endpoint
    from ser_ray.annotate.writer import ResultWriter

    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(3):
        (archive / f"{i}.wav").write_bytes(b"x")
    endpoint = _ScriptedEndpoint([(200, {}, 4.0)])  # answers after 4 s; the client waits 1 s
    summary = annotate_via_endpoint(str(archive), str(tmp_path / "out"), endpoint.url, batch_files=3,
                                    progress=False, api_key="k", timeout_s=1.0)
    time.sleep(4.0)  # long enough for a re-sent batch to have arrived
    assert len(endpoint.times) == 1 and summary["n_ok"] == 0
    files = ResultWriter(str(tmp_path / "out")).read_tables()[0]
    assert set(files["status"]) == {"retry"} and set(files["error_code"]) == {"timeout"} and len(files) == 3
    again = annotate_via_endpoint(str(archive), str(tmp_path / "out"), endpoint.url, batch_files=3,
                                  progress=False, api_key="k", timeout_s=10.0)
    assert (again["n_processed"], again["n_ok"], len(endpoint.times)) == (3, 3, 2)
    files = ResultWriter(str(tmp_path / "out")).read_tables()[0]
    assert set(files["status"]) == {"ok"} and files["uri"].is_unique and len(files) == 3
    endpoint.server.shutdown()


def test_one_request_makes_a_bounded_number_of_windows(served):
    """Nothing bounded the windows of one /annotate request (256 files x 4 h each, every segment in one
    answer). Now the files of a request share max_windows_per_request, taken from each header before
    any window is read: a file that does not fit gets a retry row (request_full), one that could never
    fit an error row, and the client sends the retry rows again alone, so every file still gets its row."""
    from ser_ray.annotate.endpoint import annotate_via_endpoint
    from ser_ray.annotate.writer import ResultWriter

    folder = served.root / "budget"
    folder.mkdir()
    for i in range(4):  # 3.2 s at hop 0.5: 6 windows each, 24 together (limit 16)
        sf.write(folder / f"clip{i}.wav", tone(3.2, seed=20 + i), 16_000)
    sf.write(served.root / "huge.wav", tone(9.0, seed=30), 16_000)  # 17 windows: never fits
    uris = [str(p) for p in sorted(folder.iterdir())]
    answer = served.http.post("/annotate", json={"uris": uris + [str(served.root / "huge.wav")]}).json()
    rows = {f["uri"]: f for f in answer["files"]}
    assert len(rows) == 5 and len(answer["segments"]) <= MAX_WINDOWS_PER_REQUEST
    assert rows[str(served.root / "huge.wav")]["error_code"] == "too_long"
    assert "max_windows_per_request" in rows[str(served.root / "huge.wav")]["error"]
    fitted = [u for u in uris if rows[u]["status"] == "ok"]
    full = [u for u in uris if rows[u]["status"] == "retry"]
    assert len(fitted) == 2 and len(full) == 2 and {rows[u]["error_code"] for u in full} == {"request_full"}
    assert sum(rows[u]["n_windows"] for u in fitted) <= MAX_WINDOWS_PER_REQUEST
    assert served.http.get("/healthz").json()["limits"]["max_windows_per_request"] == MAX_WINDOWS_PER_REQUEST

    out = served.tmp / "budget-out"
    summary = annotate_via_endpoint(str(folder), str(out), served.url, batch_files=4, progress=False,
                                    api_key=API_KEY)
    files, segments = ResultWriter(str(out)).read_tables()
    assert (summary["n_ok"], len(files)) == (4, 4) and set(files["status"]) == {"ok"} and files["uri"].is_unique
    assert len(segments) == 4 * 6 and not segments.duplicated(["uri", "start_s"]).any()


@pytest.mark.parametrize("members", ["ingress", "deployments"])
def test_a_member_slower_than_its_timeout_gives_503_not_a_hang(served, members):
    """Member calls had no time limit and /healthz said ok without asking the members. A second app on
    the same Serve instance, whose member limit (1 µs) no model call can meet, with the members in the
    ingress or in deployments of their own: /healthz, /annotate and /predict answer 503 with
    Retry-After within seconds, and the first app is unaffected."""
    from ray import serve

    from ser_ray.ensemble.bundle import Bundle, Member, load_bundle, save_bundle
    from ser_ray.serve.app import ServeConfig, build_app

    cnn = load_bundle(served.bundle).members[0]
    one = save_bundle(Bundle(labels=LABELS, members=[Member("cnn", cnn.model, FEATURES, name="cnn")],
                             sample_rate=16_000, window_s=1.0), str(served.tmp / "one-member"))
    config = ServeConfig(bundle=one, allowed_roots=[str(served.root)], hop_s=0.5,
                         num_cpus=0.05, ingress_num_cpus=0.05, ingress_threads=2, api_key_sha256=digest(API_KEY),
                         member_timeout_s=1e-6, retry_after_s=2, route_prefix="/slow", members=members)
    serve.run(build_app(config), name="ser-ray-slow", route_prefix="/slow")
    try:
        start = time.perf_counter()
        with client_for_new_app(served, "/slow") as slow:
            health = slow.get("/slow/healthz")
            assert health.status_code == 503 and health.json()["member_status"]["cnn"] != "ok", health.text
            r = slow.post("/slow/annotate", json={"uris": [str(served.root / "a.wav")]})
            assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
            r = slow.post("/slow/predict", files={"file": ("clip.wav", wav_bytes(1.0), "audio/wav")})
            assert r.status_code == 503, r.text
        assert time.perf_counter() - start < 20
    finally:
        serve.delete("ser-ray-slow")
    assert_still_serving(served)


def test_serve_cli_fails_clearly_when_nothing_listens_where_it_claims():
    """Serve keeps its first HTTP options when it already runs on a cluster: --host/--port were ignored
    silently. The CLI now checks that the address answers."""
    from ser_ray.serve.commands import check_listening

    with pytest.raises(SystemExit, match=f"nothing listens on 127.0.0.1:{(port := free_port())}"):
        check_listening("127.0.0.1", port)


def test_http_goes_through_haproxy_when_it_is_installed(served):
    """The default HTTP proxy: with the HAProxy binary that ray[serve] installs on Linux, the endpoint's
    port is HAProxy's, which hands requests to the ingress replicas' own HTTP servers."""
    import psutil

    from ser_ray.session import haproxy_binary

    if haproxy_binary() is None:
        pytest.skip("no HAProxy binary: Serve's Python proxy serves HTTP")
    port = int(served.url.rsplit(":", 1)[1])
    listeners = {c.pid for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid}
    assert listeners and {psutil.Process(pid).name() for pid in listeners} == {"haproxy"}, listeners
    r = served.http.post("/predict", files={"file": ("clip.wav", wav_bytes(1.5), "audio/wav")})
    assert r.status_code == 200 and r.json()["label"] in LABELS, r.text


def test_serve_proxy_env_picks_the_proxy_for_a_ray_about_to_start(monkeypatch):
    from ser_ray import session
    from ser_ray.errors import UserError

    assert session.serve_proxy_env("python") == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    monkeypatch.setattr(session, "haproxy_binary", lambda: "/usr/sbin/haproxy")
    assert session.serve_proxy_env("auto")["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert session.serve_proxy_env("haproxy")["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == session.DRAIN_S
    monkeypatch.setattr(session, "haproxy_binary", lambda: None)
    assert session.serve_proxy_env("auto") == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}  # falls back quietly
    with pytest.raises(UserError, match="no HAProxy binary"):
        session.serve_proxy_env("haproxy")  # asked for by name: an error, not a quiet fallback
    with pytest.raises(ValueError, match="choose one of"):
        session.serve_proxy_env("nginx")
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    session.use_serve_proxy("auto")  # what the user set stays
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
