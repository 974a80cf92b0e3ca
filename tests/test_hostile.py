"""Hostile audio: odd sample rates, extreme channel counts and non-finite samples give a clear error
row (or a bounded amount of work), never gigabytes of memory or a label from NaN probabilities."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import soundfile as sf

from ser_ray.annotate import AnnotateConfig, annotate_file
from ser_ray.audio.decode import AudioError, decode_audio

LABELS = ("a", "b")
CONFIG = AnnotateConfig(window_s=1.0, hop_s=1.0, vad="none", labels=LABELS)


def uniform(waves: np.ndarray) -> np.ndarray:
    return np.full((len(waves), len(LABELS)), 1.0 / len(LABELS))


def test_an_odd_sample_rate_costs_no_memory():
    """A 2 KB WAV whose header says 16,001 Hz: torchaudio's sinc kernel for 16001 -> 16000 took +8 GB
    and 35 s; soxr's polyphase resampler takes what any rate takes. Measured on the process."""
    code = textwrap.dedent("""
        import io, json, resource, time
        import numpy as np, soundfile as sf
        from ser_ray.features.config import FeatureConfig
        from ser_ray.features.extractor import FeatureExtractor
        from ser_ray.audio.decode import decode_audio
        extractor = FeatureExtractor(FeatureConfig(n_mels=32, n_fft=512, hop_length=256))
        extractor.prepare_wave(np.zeros(1000, np.float32), 22050)  # imports and first-call costs
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        buf = io.BytesIO()
        sf.write(buf, (0.1 * np.random.default_rng(0).standard_normal(1000)).astype(np.float32), 16001,
                 format="WAV", subtype="PCM_16")
        start = time.process_time()
        audio, sr = decode_audio(buf.getvalue(), "odd.wav")
        wave = extractor.prepare_wave(audio, sr)
        print(json.dumps({"sr": sr, "grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                          "cpu_s": time.process_time() - start, "finite": bool(np.isfinite(wave).all())}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["sr"] == 16001 and result["finite"]
    assert result["grew_mb"] < 100 and result["cpu_s"] < 2.0, result


def _wav(path, data, sr, subtype="FLOAT"):
    sf.write(path, np.asarray(data, dtype=np.float32), sr, format="WAV", subtype=subtype)
    return str(path)


@pytest.mark.parametrize("case", ["nan", "inf", "huge"])
def test_non_finite_or_absurd_samples_are_an_error_row(tmp_path, case):
    """NaN made loud audio "silence", ±Inf / 1e30 gave a label with null probabilities; now the file
    is refused with the cause, by the decoder and by the streaming annotator alike."""
    rng = np.random.default_rng(0)
    audio = 0.3 * rng.standard_normal(3 * 16_000)
    audio[20_000] = {"nan": np.nan, "inf": np.inf, "huge": 1e30}[case]
    path = _wav(tmp_path / f"{case}.wav", audio, 16_000)
    with pytest.raises(AudioError, match="NaN or infinite|sample values reach"):
        decode_audio(open(path, "rb").read(), "x.wav")
    row, segments = annotate_file(path, uniform, CONFIG)
    assert row["status"] == "error" and row["label"] is None and segments == []
    assert ("NaN or infinite" in row["error"]) or ("sample values reach" in row["error"])


def test_tiny_rates_and_too_many_channels_are_refused_before_any_work(tmp_path):
    """A 6 KB WAV at 1 Hz was 3,000 model windows; 20 channels at 16 kHz would be read 30 s at a time."""
    slow = _wav(tmp_path / "one-hertz.wav", np.zeros(3000), 1, subtype="PCM_16")
    row, _ = annotate_file(slow, uniform, CONFIG)
    assert row["status"] == "error" and "sample rate 1 Hz" in row["error"] and row["n_windows"] == 0
    wide = _wav(tmp_path / "wide.wav", np.zeros((16_000, 20)), 16_000, subtype="PCM_16")
    row, _ = annotate_file(wide, uniform, CONFIG)
    assert row["status"] == "error" and "20 channels" in row["error"]
    # an ordinary 44.1 kHz stereo file still works
    ok = _wav(tmp_path / "ok.wav", 0.1 * np.ones((44_100 * 2, 2)), 44_100, subtype="PCM_16")
    row, segments = annotate_file(ok, uniform, CONFIG)
    assert row["status"] == "ok" and len(segments) == 2


def test_a_wide_high_rate_file_is_read_in_bounded_blocks(tmp_path):
    """A read block was 30 s x rate x channels: a 48 KB FLAC (8 channels at 192 kHz, 31 s of DC)
    took +344 MB in one read. Blocks now hold at most 16 MiB of decoded samples. Measured on the process."""
    code = textwrap.dedent("""
        import json, resource, sys, numpy as np
        from ser_ray.annotate import AnnotateConfig, annotate_file
        config = AnnotateConfig(window_s=1.0, hop_s=1.0, vad="none", labels=("a", "b"))
        uniform = lambda w: np.full((len(w), 2), 0.5)
        annotate_file(sys.argv[2], uniform, config)  # imports and first-call costs
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        row, _ = annotate_file(sys.argv[1], uniform, config)
        print(json.dumps({"status": row["status"], "windows": row["n_windows"],
                          "grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
    """)
    sr, channels = 192_000, 8
    second = np.full((sr, channels), 0.25, np.float32)
    for name, seconds in (("wide.flac", 31), ("short.flac", 1)):
        with sf.SoundFile(tmp_path / name, "w", sr, channels, format="FLAC", subtype="PCM_16") as f:
            for _ in range(seconds):
                f.write(second)
    assert (tmp_path / "wide.flac").stat().st_size < 200_000
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "wide.flac"), str(tmp_path / "short.flac")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "ok" and result["windows"] == 31
    assert result["grew_mb"] < 100, result


def test_windows_per_file_are_capped_before_any_work(tmp_path):
    path = _wav(tmp_path / "long.wav", np.zeros(16_000 * 30), 16_000, subtype="PCM_16")
    config = AnnotateConfig(window_s=1.0, hop_s=0.01, vad="none", labels=LABELS, max_windows=1000)
    row, _ = annotate_file(path, uniform, config)  # 30 s every 10 ms: 2,901 windows
    assert row["error_code"] == "too_long" and "2901 windows" in row["error"] and row["n_windows"] == 0


def test_non_finite_probabilities_never_become_a_label(tmp_path):
    path = _wav(tmp_path / "fine.wav", 0.1 * np.ones(16_000), 16_000, subtype="PCM_16")

    def broken(waves):
        return np.full((len(waves), len(LABELS)), np.nan)

    row, segments = annotate_file(path, broken, CONFIG)
    assert row["status"] == "error" and "non-finite probabilities" in row["error"] and segments == []


def test_listing_does_not_follow_directory_symlinks(tmp_path):
    """``sub/up -> ..`` listed each file 41 times; two such links never finished."""
    import os
    import time

    from ser_ray.annotate.listing import list_archive

    (tmp_path / "sub").mkdir()
    _wav(tmp_path / "a.wav", np.zeros(100), 16_000, subtype="PCM_16")
    _wav(tmp_path / "sub" / "b.wav", np.zeros(100), 16_000, subtype="PCM_16")
    os.symlink("..", tmp_path / "sub" / "up")
    os.symlink(str(tmp_path), tmp_path / "sub" / "root")
    start = time.perf_counter()
    uris = list_archive(str(tmp_path))
    assert uris == [str(tmp_path / "a.wav"), str(tmp_path / "sub" / "b.wav")]
    assert time.perf_counter() - start < 5


def test_a_fifo_or_device_in_an_archive_is_an_error_row_not_a_hang(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: one in an archive hung the run."""
    import os

    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    row, _ = annotate_file(str(fifo), uniform, CONFIG)
    assert row["status"] == "error" and row["error_code"] == "not_a_file", row
    row, _ = annotate_file("/dev/zero", uniform, CONFIG)
    assert row["status"] == "error" and row["error_code"] == "not_a_file", row


# -- storage faults: S3 throttling, dropped connections, 403 ---------------------------------------
@pytest.fixture
def faulty_s3(s3_server, monkeypatch):
    """The loopback S3 server behind a fault-injecting proxy; S3 clients in this process use the proxy."""
    from faulty_s3 import FaultyS3Proxy

    proxy = FaultyS3Proxy(s3_server).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.stop()


FAST = AnnotateConfig(window_s=1.0, hop_s=1.0, vad="none", labels=LABELS, retry_backoff_s=0.05)


@pytest.mark.parametrize("mode, code", [("throttle", "storage_unavailable"), ("drop", "storage_unavailable"),
                                        ("forbid", "permission_denied")])
def test_storage_faults_are_retried_then_a_retry_row_the_next_run_redoes(s3_bucket, faulty_s3, tmp_path, mode, code):
    """503 SlowDown, a connection cut mid-download and 403 were permanent error rows that reruns
    never retried. Now: retried with backoff inside the run (a short burst of faults costs nothing),
    a lasting fault gives status=retry with a fixed message (no bucket, no AWS text), and the next
    run annotates the file and its row supersedes the retry row."""
    from ser_ray.annotate.writer import ResultWriter

    bucket, client = s3_bucket
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.random.default_rng(0).standard_normal(32_000)).astype(np.float32), 16_000, format="WAV")
    client.put_object(Bucket=bucket, Key="in/clip.wav", Body=buf.getvalue())
    uri = f"s3://{bucket}/in/clip.wav"
    methods = ("GET",) if mode == "drop" else ("GET", "HEAD")

    faulty_s3.inject(mode, faults=2, methods=methods)  # a burst shorter than the retries
    row, segments = annotate_file(uri, uniform, FAST)
    assert row["status"] == "ok" and len(segments) == 2, row

    faulty_s3.inject(mode, faults=10_000, methods=methods)  # lasts longer than the run's patience
    row, segments = annotate_file(uri, uniform, FAST)
    assert row["status"] == "retry" and row["error_code"] == code and segments == [], row
    assert bucket not in row["error"] and "AWS" not in row["error"] and "tries again" in row["error"]

    out = str(tmp_path / "out")
    with ResultWriter(out) as writer:
        writer.commit([row], [])
        assert uri not in writer.done_uris()  # the next run will do it
    faulty_s3.inject(mode, faults=0)
    with ResultWriter(out) as writer:
        assert uri not in writer.done_uris()
        row, segments = annotate_file(uri, uniform, FAST)
        writer.commit([row], segments)
    files, segments = ResultWriter(out).read_tables()
    assert files["status"].tolist() == ["ok"] and len(segments) == 2


def test_a_killed_download_leaves_no_temporary_file(s3_bucket, faulty_s3, tmp_path):
    """S3 objects were copied to named temp files (``/tmp/ser-ray-*``) that a SIGKILL left behind; the
    copy is now an unnamed file that disappears with the process."""
    import os
    import signal
    import tempfile

    bucket, client = s3_bucket
    client.put_object(Bucket=bucket, Key="in/big.wav", Body=open(_wav(tmp_path / "big.wav", np.zeros(160_000), 16_000,
                                                                        subtype="PCM_16"), "rb").read())
    temp = tempfile.gettempdir()
    before = {n for n in os.listdir(temp) if n.startswith("ser-ray-")}
    faulty_s3.inject("stall", faults=1, methods=("GET",))
    code = "import sys; from ser_ray.annotate import AnnotateConfig, annotate_file; " \
           "annotate_file(sys.argv[1], lambda w: None, AnnotateConfig(labels=('a', 'b')))"
    child = subprocess.Popen([sys.executable, "-c", code, f"s3://{bucket}/in/big.wav"], env=dict(os.environ))
    try:
        assert faulty_s3.stalled.wait(60), "the download never started"
        time.sleep(0.5)  # half the object is in the temporary copy now
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert {n for n in os.listdir(temp) if n.startswith("ser-ray-")} == before
