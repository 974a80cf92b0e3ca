"""Hostile audio: odd sample rates, extreme channel counts and non-finite samples give a clear error
row (or a bounded amount of work), never gigabytes of memory or a label from NaN probabilities."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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
