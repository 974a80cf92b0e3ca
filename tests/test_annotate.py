"""Annotating archives: windows, VAD, bad inputs, resumable output (local and S3), kill + rerun,
window accuracy, bounded memory and plots."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from ser_ray.annotate.accuracy import window_accuracy
from ser_ray.annotate.core import AnnotateConfig, annotate_file
from ser_ray.annotate.listing import list_archive
from ser_ray.annotate.windows import iter_windows
from ser_ray.annotate.writer import ResultWriter
from ser_ray.ensemble import Bundle, Member, save_bundle
from ser_ray.features.config import FeatureConfig
from ser_ray.models import build_model

REPO = Path(__file__).resolve().parents[1]
LABELS = ["anger", "happiness", "neutral", "sadness"]
FC = FeatureConfig(n_mels=32)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cnn = build_model("cnn", len(LABELS), FC, width=4).eval()
    gru = build_model("bigru_attn", len(LABELS), FC, hidden=8, layers=1, attn_dim=8).eval()
    path = tmp_path_factory.mktemp("bundle") / "b"
    save_bundle(Bundle(LABELS, [Member("cnn", cnn, FC, weight=0.6), Member("bigru_attn", gru, FC, weight=0.4)]), str(path))
    return str(path)


def noise(seconds: float, sr: int, channels: int = 1, seed: int = 0, level: float = 0.1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((int(seconds * sr), channels)) * level
    return x.astype(np.float32) if channels > 1 else x[:, 0].astype(np.float32)


def uniform_proba(waves: np.ndarray) -> np.ndarray:
    """A stand-in model: depends on the input so batching bugs would show, costs nothing."""
    energy = np.sqrt((waves.astype(np.float64) ** 2).mean(axis=1))
    logits = np.stack([energy * k for k in range(len(LABELS))], axis=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


CFG = AnnotateConfig(labels=tuple(LABELS))


# -- windows and VAD ------------------------------------------------------------------------------
def test_windows_stream_in_blocks_and_pad_the_tail(tmp_path):
    path = tmp_path / "stereo44k.wav"
    audio = noise(10.0, 44_100, channels=2)
    sf.write(path, audio, 44_100)
    with sf.SoundFile(path) as f:
        wins = list(iter_windows(f, 3.0, 1.5, block_s=1.0))  # blocks shorter than a window
    assert [round(s, 3) for s, _, _ in wins] == [0.0, 1.5, 3.0, 4.5, 6.0, 7.5]
    assert wins[-1][1] == pytest.approx(10.0) and all(w.shape == (48_000,) for _, _, w in wins)
    # same samples as cutting the whole file at once
    from ser_ray.audio.decode import resample

    whole = sf.read(path, dtype="float32")[0].mean(axis=1)  # as stored (PCM_16)
    start = int(4.5 * 44_100)
    np.testing.assert_allclose(wins[3][2], resample(whole[start : start + 3 * 44_100], 44_100, 16_000), atol=1e-5)
    assert np.all(wins[-1][2][40_000:] == 0)  # 2.5 s of audio, then zero padding

    short = tmp_path / "short.wav"
    sf.write(short, noise(1.0, 16_000), 16_000)
    with sf.SoundFile(short) as f:
        [(s, e, w)] = list(iter_windows(f, 3.0, 1.5))
    assert (s, e, w.shape) == (0.0, 1.0, (48_000,))


def test_energy_vad_skips_silence(tmp_path):
    path = tmp_path / "half_silent.wav"
    sf.write(path, np.concatenate([np.zeros(16_000 * 6, np.float32), noise(6.0, 16_000)]), 16_000)
    row, segs = annotate_file(str(path), uniform_proba, CFG)
    assert row["status"] == "ok" and row["n_windows"] == 7
    assert row["n_segments"] == len(segs) == 4 and min(s["start_s"] for s in segs) >= 4.5
    row, segs = annotate_file(str(path), uniform_proba, AnnotateConfig(labels=tuple(LABELS), vad="none"))
    assert row["n_segments"] == 7
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16_000 * 4, np.float32), 16_000)
    row, segs = annotate_file(str(silent), uniform_proba, CFG)
    assert row["status"] == "ok" and row["label"] is None and segs == []


def test_silero_vad_tells_real_speech_from_noise(tmp_path, emodb_root):
    """``vad="silero"`` (the silero-vad package, model inside the wheel): a real EmoDB utterance in the
    middle of a file is speech, the white noise and silence around it are not; the energy VAD at its
    default threshold calls the noise speech too."""
    from ser_ray.audio.decode import load_clip

    speech = load_clip(str(sorted(emodb_root.glob("*.wav"))[0]), 16_000)[: 3 * 16_000]
    speech = np.pad(speech, (0, 3 * 16_000 - len(speech)))
    rng = np.random.default_rng(0)
    audio = np.concatenate([0.02 * rng.standard_normal(3 * 16_000), speech, np.zeros(3 * 16_000)]).astype(np.float32)
    path = tmp_path / "noise-speech-silence.wav"
    sf.write(path, audio, 16_000)
    config = AnnotateConfig(window_s=3.0, hop_s=3.0, vad="silero", labels=tuple(LABELS))
    row, segs = annotate_file(str(path), uniform_proba, config)
    assert row["status"] == "ok" and row["n_windows"] == 3
    assert [s["start_s"] for s in segs] == [3.0]
    row, segs = annotate_file(str(path), uniform_proba, AnnotateConfig(window_s=3.0, hop_s=3.0, labels=tuple(LABELS)))
    assert [s["start_s"] for s in segs] == [0.0, 3.0]  # energy: noise at -34 dBFS passes -45 dBFS


def test_annotate_file_rows_and_limits(tmp_path, bundle_dir):
    from ser_ray.ensemble import load_bundle

    bundle = load_bundle(bundle_dir)
    path = tmp_path / "a.wav"
    sf.write(path, noise(7.0, 22_050, seed=3), 22_050)
    row, segs = annotate_file(str(path), bundle.predict_proba, AnnotateConfig())  # labels from the bundle
    assert row["status"] == "ok" and row["duration_s"] == pytest.approx(7.0) and row["n_segments"] == 4
    mean = np.mean([[s[f"prob_{lab}"] for lab in LABELS] for s in segs], axis=0)
    assert row["label"] == LABELS[int(mean.argmax())]
    assert row[f"prob_{LABELS[0]}"] == pytest.approx(mean[0])
    assert all(s["label"] == max(LABELS, key=lambda lab: s[f"prob_{lab}"]) for s in segs)
    row, segs = annotate_file(str(path), bundle.predict_proba, AnnotateConfig(max_file_mb=0.01))
    assert row["status"] == "error" and "too large" in row["error"] and segs == []
    row, _ = annotate_file(str(tmp_path / "missing.wav"), bundle.predict_proba, AnnotateConfig())
    assert row["status"] == "error" and "not found" in row["error"]


# -- listing and writer ---------------------------------------------------------------------------
def test_listing_skips_output_inside_input(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "out" / "files").mkdir(parents=True)
    for p in ["in/b.wav", "in/sub/a.flac", "in/notes.txt", "in/out/files/part-000000.parquet"]:
        (tmp_path / p).write_bytes(b"x")
    uris = list_archive(str(tmp_path / "in"), str(tmp_path / "in" / "out"))
    assert uris == sorted(str(tmp_path / p) for p in ["in/b.wav", "in/notes.txt", "in/sub/a.flac"])


def _rows(uris):
    files = [{"uri": u, "status": "ok", "error": None, "duration_s": 1.0, "label": "anger", "prob_anger": 1.0, "n_segments": 1, "n_windows": 1} for u in uris]
    segs = [{"uri": u, "start_s": 0.0, "end_s": 1.0, "label": "anger", "confidence": 1.0, "prob_anger": 1.0} for u in uris]
    return files, segs


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_writer_commits_resumes_and_never_writes_twice(tmp_path, fmt):
    out = tmp_path / "out"
    with ResultWriter(str(out), fmt) as w:
        assert w.commit(*_rows(["a", "b"])) == 0
    # a killed run: a segments part whose files part never came
    (out / "segments" / f"part-000001.{fmt}").write_bytes((out / "segments" / f"part-000000.{fmt}").read_bytes())
    (out / "files" / f"part-000009.{fmt}.tmp").write_bytes(b"half")

    with ResultWriter(str(out), fmt) as w:
        assert not (out / "segments" / f"part-000001.{fmt}").exists()
        assert not (out / "files" / f"part-000009.{fmt}.tmp").exists()
        assert w.done_uris() == {"a", "b"}
        files, segs = _rows(["b", "c", "c"])
        assert w.commit(files, segs[:2] + segs[1:2]) is not None  # b: already done, dropped; c: once
        assert w.commit(*_rows(["a"])) is None
        # a storage failure is not final: the file is tried again and its new row supersedes the old
        failed = [dict(_rows(["d"])[0][0], status="retry", error="d: the storage did not answer", n_segments=0)]
        assert w.commit(failed, []) is not None and "d" not in w.done_uris()
        assert w.commit(*_rows(["d"])) is not None and "d" in w.done_uris()
    files, segs = ResultWriter(str(out), fmt).read_tables()
    assert files["uri"].tolist() == ["a", "b", "c", "d"] and segs["uri"].tolist() == ["a", "b", "c", "d"]
    assert files["error"].isna().all() and files["n_segments"].tolist() == [1, 1, 1, 1]
    with pytest.raises(RuntimeError, match="lock"):
        ResultWriter(str(out), fmt).commit(*_rows(["e"]))


def test_one_writer_per_output(tmp_path):
    """Two runs on one output lost committed batches (same batch numbers, each deleting the other's
    in-flight segments); now the second refuses, naming the first, and the lock dies with its holder."""
    from ser_ray.annotate.lock import OutputBusy

    out = str(tmp_path / "out")
    with ResultWriter(out) as first:
        first.commit(*_rows(["a"]))
        with pytest.raises(OutputBusy, match=f"pid {os.getpid()}"):
            ResultWriter(out).__enter__()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from ser_ray.annotate.writer import ResultWriter
        writer = ResultWriter({out!r}).__enter__()
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputBusy, match=f"pid {holder.pid}"):
            ResultWriter(out).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with ResultWriter(out) as second:  # the killed holder's lock went with it
        assert second.done_uris() == {"a"}


def test_one_writer_per_s3_output(s3_bucket):
    """On S3: a conditional put creates the lease; a live holder's lease refuses a second run, a
    lease whose holder process is gone is taken over at once."""
    from ser_ray.annotate.lock import OutputBusy, OutputLock

    bucket, client = s3_bucket
    out = f"s3://{bucket}/annotations"
    with ResultWriter(out) as first:
        first.commit(*_rows(["a"]))
        with pytest.raises(OutputBusy, match="another annotate run"):
            ResultWriter(out).__enter__()
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="annotations/_lock")  # released
    stale = OutputLock(out)
    stale.holder["pid"] = 2**22 + 12345  # no such process on this host: a killed run's lease
    stale.acquire()
    stale._stop.set()  # it stops renewing, as a killed process would
    with ResultWriter(out) as second:
        assert second.done_uris() == {"a"}


# -- archives through Ray Data ---------------------------------------------------------------------
def make_mixed_archive(root: Path) -> dict[str, str]:
    """Files of every kind an archive holds, and the status each must get."""
    root.mkdir(parents=True)
    expect = {}

    def wav(name, data, sr, status="ok", **kw):
        sf.write(root / name, data, sr, **kw)
        expect[name] = status

    wav("good.wav", noise(4.0, 16_000, seed=1), 16_000)
    wav("stereo.wav", noise(4.0, 44_100, channels=2, seed=2), 44_100)
    wav("pcm_u8.wav", noise(3.5, 22_050, seed=3), 22_050, subtype="PCM_U8")
    wav("rate48k.wav", noise(3.0, 48_000, seed=4), 48_000)
    wav("rate96k.wav", noise(3.0, 96_000, seed=5), 96_000, subtype="PCM_24")
    wav("clip.flac", noise(4.0, 16_000, seed=6), 16_000, format="FLAC")
    wav("clip.ogg", noise(4.0, 16_000, seed=7), 16_000, format="OGG", subtype="VORBIS")
    wav("silent.wav", np.zeros(16_000 * 3, np.float32), 16_000)
    (root / "sub").mkdir()
    wav("sub/nested.wav", noise(2.0, 16_000, seed=8), 16_000)
    (root / "empty.wav").write_bytes(b"")
    (root / "notes.txt").write_text("not audio\n")
    (root / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + os.urandom(2000))
    (root / "random.flac").write_bytes(os.urandom(4096))
    expect.update({"empty.wav": "error", "notes.txt": "error", "corrupt.wav": "error", "random.flac": "error"})
    return expect


def test_mixed_archive_every_file_one_row(ray_session, tmp_path, bundle_dir):
    from ser_ray.cli import main

    archive = tmp_path / "archive"
    expect = make_mixed_archive(archive)
    out = archive / "annotations"  # inside the input: must not be annotated itself
    args = ["annotate", "--input", str(archive), "--output", str(out), "--bundle", bundle_dir, "--batch-files", "4"]
    assert main(args) == 0
    files, segs = ResultWriter(str(out)).read_tables()
    assert sorted(files["uri"]) == sorted(str(archive / n) for n in expect)
    got = {os.path.relpath(u, archive): s for u, s in zip(files["uri"], files["status"])}
    assert got == expect
    errors = files[files["status"] == "error"].set_index("uri")["error"]
    assert errors[str(archive / "empty.wav")].startswith("empty.wav: empty file")
    assert "not a readable audio file" in errors[str(archive / "notes.txt")]
    ok = files[files["status"] == "ok"].set_index("uri")
    assert ok.loc[str(archive / "rate96k.wav"), "duration_s"] == pytest.approx(3.0)
    assert ok.loc[str(archive / "silent.wav"), "n_segments"] == 0
    assert segs.groupby("uri").size().to_dict() == {u: n for u, n in ok["n_segments"].items() if n}
    assert set(LABELS) >= set(ok["label"].dropna())

    assert main(args) == 0  # a rerun finds everything done
    files2, _ = ResultWriter(str(out)).read_tables()
    assert len(files2) == len(files)


# The child is a second driver on the test session's Ray (as a job on a cluster): starting a second
# local Ray in the child takes a 30 s startup deadline that a loaded 2-core machine can miss.
KILL_SCRIPT = textwrap.dedent(
    """
    import sys, ray
    import ray.data
    ray.init(address=sys.argv[4], log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from ser_ray.annotate.core import AnnotateConfig
    from ser_ray.annotate.offline import annotate_archive
    annotate_archive(sys.argv[1], sys.argv[2], sys.argv[3], AnnotateConfig(hop_s=0.5), batch_files=1, progress=False)
    """
)


def _run_and_kill_after_first_commit(input_uri, output_uri, bundle_uri, committed, log_path: Path) -> None:
    """Run annotate_archive in a child process; SIGKILL it once ``committed()`` is non-empty."""
    import ray

    log = open(log_path, "wb")  # a file, not a pipe: an undrained pipe would stall the child
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, input_uri, output_uri, bundle_uri, address],
        cwd=REPO, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 300  # generous: CI machines share their cores
        while not committed():
            tail = lambda: log_path.read_text(errors="replace")[-2000:]  # noqa: E731
            assert proc.poll() is None, f"annotate child exited early: {tail()}"
            assert time.time() < deadline, f"no batch committed within 300 s: {tail()}"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        try:  # anything the child started shares its session
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    _wait_for_free_cpus()


def _wait_for_free_cpus(timeout=60):
    """The killed driver's actors are reaped by Ray shortly after; wait so the rerun gets CPUs."""
    import ray

    deadline = time.time() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0) and time.time() < deadline:
        time.sleep(0.2)


def _archive_of_speech(root: Path, n: int, seconds: float = 20.0) -> list[Path]:
    root.mkdir(parents=True)
    paths = []
    for i in range(n):
        paths.append(root / f"rec{i:02d}.wav")
        sf.write(paths[-1], noise(seconds, 48_000, seed=i), 48_000)
    return paths


def test_kill_and_resume_local(ray_session, tmp_path, bundle_dir):
    from ser_ray.annotate.offline import annotate_archive

    paths = _archive_of_speech(tmp_path / "in", 8)
    out = tmp_path / "out"
    _run_and_kill_after_first_commit(str(tmp_path / "in"), str(out), bundle_dir, lambda: list((out / "files").glob("part-*.parquet")), tmp_path / "child.log")

    before = {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in (out / "files").glob("part-*.parquet")}
    done_before = ResultWriter(str(out)).done_uris()
    assert 1 <= len(done_before) < len(paths), "the kill should land mid-run"

    summary = annotate_archive(str(tmp_path / "in"), str(out), bundle_dir, AnnotateConfig(hop_s=0.5), batch_files=2, progress=False)
    assert summary["n_skipped"] == len(done_before)  # finished files are not recomputed
    assert summary["n_processed"] == len(paths) - len(done_before)
    after = {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in (out / "files").glob("part-*.parquet")}
    assert all(after[name] == digest for name, digest in before.items())  # committed parts untouched
    files, segs = ResultWriter(str(out)).read_tables()
    assert sorted(files["uri"]) == sorted(map(str, paths)) and files["uri"].is_unique
    assert (files["status"] == "ok").all()
    assert len(segs) == files["n_segments"].sum()
    assert not segs.duplicated(["uri", "start_s"]).any()
    assert not list(out.rglob("*.tmp"))


def test_kill_and_resume_s3(ray_session, s3_bucket, tmp_path, bundle_dir):
    from ser_ray.annotate.offline import annotate_archive

    bucket, client = s3_bucket
    paths = _archive_of_speech(tmp_path / "in", 5, seconds=15.0)
    for p in paths:
        client.upload_file(str(p), bucket, f"audio/{p.name}")
    client.put_object(Bucket=bucket, Key="audio/readme.txt", Body=b"not audio")
    in_uri, out_uri = f"s3://{bucket}/audio", f"s3://{bucket}/annotations"

    def committed():
        resp = client.list_objects_v2(Bucket=bucket, Prefix="annotations/files/")
        return [o["Key"] for o in resp.get("Contents", []) if o["Key"].endswith(".parquet")]

    _run_and_kill_after_first_commit(in_uri, out_uri, bundle_dir, committed, tmp_path / "child.log")
    first = set(committed())
    done_before = ResultWriter(out_uri).done_uris()
    assert 1 <= len(done_before) < 6

    summary = annotate_archive(in_uri, out_uri, bundle_dir, AnnotateConfig(hop_s=0.5), batch_files=2, progress=False)
    assert summary["n_skipped"] == len(done_before) and summary["n_processed"] == 6 - len(done_before)
    assert first <= set(committed())
    files, segs = ResultWriter(out_uri).read_tables()
    assert files["uri"].is_unique and len(files) == 6
    assert files.set_index("uri").loc[f"{in_uri}/readme.txt", "status"] == "error"
    assert (files["status"] == "ok").sum() == 5 and len(segs) == files["n_segments"].sum()


def test_a_file_that_kills_its_worker_gets_a_row_and_the_run_ends(ray_session, tmp_path, bundle_dir):
    """Ray Data restarts a dead actor and retries its task forever by default: a file that kills its
    worker (decoder crash, OOM killer) made the run never end, with no row. Here the worker reading
    one file is SIGKILLed on every attempt; the run still ends, with a worker_crashed row for it."""
    import threading

    from ser_ray.annotate.offline import annotate_archive

    archive = tmp_path / "in"
    archive.mkdir()
    sf.write(archive / "a-good.wav", noise(3.0, 16_000, seed=1), 16_000)
    sf.write(archive / "b-deadly.wav", noise(600.0, 16_000, seed=2), 16_000)  # long: time to kill it
    sf.write(archive / "c-good.wav", noise(3.0, 16_000, seed=3), 16_000)
    deadly = str(archive / "b-deadly.wav")
    out = tmp_path / "out"
    entry = hashlib.sha1(deadly.encode()).hexdigest()
    stop, killed, result = threading.Event(), [], {}

    def killer():  # plays the crashing decoder: kill whichever worker starts the deadly file
        while not stop.is_set():
            for path in out.glob(f"_attempts/*/{entry}"):
                try:
                    count, pid = path.read_text().split()
                except (OSError, ValueError):
                    continue
                pid = int(pid.removeprefix("pid="))
                if int(count) <= 2 and pid not in killed:
                    killed.append(pid)
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def run():
        result["summary"] = annotate_archive(str(archive), str(out), bundle_dir, AnnotateConfig(hop_s=0.5),
                                             batch_files=1, num_actors=1, progress=False, max_attempts=2)

    watcher, runner = threading.Thread(target=killer), threading.Thread(target=run)
    watcher.start()
    runner.start()
    runner.join(timeout=400)
    stop.set()
    watcher.join()
    assert not runner.is_alive(), "the run did not end"
    assert len(killed) == 2
    files, _ = ResultWriter(str(out)).read_tables()
    rows = files.set_index("uri")
    assert rows.loc[deadly, "status"] == "error" and rows.loc[deadly, "error_code"] == "worker_crashed"
    assert "gave up after 2 attempts" in rows.loc[deadly, "error"]
    assert (rows.drop(deadly)["status"] == "ok").all() and len(rows) == 3
    assert not list(out.glob("_attempts/*"))  # the run's journal is removed when it ends
    _wait_for_free_cpus()


# -- accuracy, memory, plots ----------------------------------------------------------------------
def test_window_accuracy_on_hand_made_frames():
    timeline = pd.DataFrame(
        [("a.wav", 0.0, 1.0, "silence"), ("a.wav", 1.0, 7.0, "anger"), ("a.wav", 7.0, 12.0, "sadness"),
         ("b.wav", 0.0, 5.0, "neutral")],
        columns=["file", "start_s", "end_s", "emotion"],
    )
    segments = pd.DataFrame(
        [("/x/a.wav", 0.0, 3.0, "anger"),  # mostly anger: right
         ("/x/a.wav", 4.5, 7.5, "sadness"),  # mostly anger: wrong
         ("/x/a.wav", 6.0, 9.0, "sadness"),  # mostly sadness: right
         ("/x/a.wav", 11.5, 14.5, "anger"),  # past the timeline's sadness tail: overlap 0.5 s, wrong
         ("/x/b.wav", 0.0, 3.0, "neutral"),  # right
         ("/x/c.wav", 0.0, 3.0, "neutral")],  # no ground truth: not scored
        columns=["uri", "start_s", "end_s", "label"],
    )
    assert window_accuracy(segments, timeline) == pytest.approx(3 / 5)
    silent = pd.DataFrame([("/x/a.wav", 0.0, 0.9, "anger")], columns=["uri", "start_s", "end_s", "label"])
    assert np.isnan(window_accuracy(silent, timeline))


def _write_long(path: Path, minutes: float, sr: int = 16_000) -> None:
    with sf.SoundFile(path, "w", samplerate=sr, channels=1, subtype="PCM_16") as f:
        for k in range(int(minutes * 2)):  # 30 s blocks: the generator is bounded too
            f.write(noise(30.0, sr, seed=k))


def _peak_traced(path: Path) -> tuple[int, dict]:
    tracemalloc.start()
    try:
        row, segs = annotate_file(str(path), uniform_proba, AnnotateConfig(labels=tuple(LABELS), hop_s=3.0, batch_size=8))
        return tracemalloc.get_traced_memory()[1], row
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_file_length(tmp_path):
    _write_long(tmp_path / "one.wav", 1)  # 20 windows: full batches of 8, as in the long file
    _write_long(tmp_path / "ten.wav", 10)
    peak_1, row_1 = _peak_traced(tmp_path / "one.wav")
    peak_10, row_10 = _peak_traced(tmp_path / "ten.wav")
    assert row_10["duration_s"] == pytest.approx(600.0) and row_10["n_windows"] == 200
    decoded_10 = 600 * 16_000 * 4  # the whole file as float32: 38 MB
    assert peak_10 < 1.5 * peak_1 + 2 * 1024**2, (peak_1, peak_10)
    assert peak_10 < decoded_10 / 3, (peak_10, decoded_10)


def test_plots(tmp_path):
    from ser_ray.report.timeline import plot_label_distribution, plot_timeline

    segs = pd.DataFrame({"uri": "/x/a.wav", "start_s": np.arange(0, 12, 1.5), "end_s": np.arange(0, 12, 1.5) + 3})
    probs = np.random.default_rng(0).dirichlet(np.ones(4), len(segs))
    for i, lab in enumerate(LABELS):
        segs[f"prob_{lab}"] = probs[:, i]
    truth = pd.DataFrame([("a.wav", 0.0, 6.0, "anger"), ("a.wav", 6.0, 14.0, "sadness")], columns=["file", "start_s", "end_s", "emotion"])
    assert os.path.getsize(plot_timeline(segs, "/x/a.wav", str(tmp_path / "t.png"), truth=truth)) > 1000
    files = pd.DataFrame({"uri": list("abcd"), "status": ["ok", "ok", "ok", "error"], "label": ["anger", "anger", None, None]})
    assert os.path.getsize(plot_label_distribution(files, str(tmp_path / "d.png"))) > 1000
