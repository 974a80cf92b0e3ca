"""The one feature extractor matches librosa (the seed's features), and decoding handles real inputs."""

from __future__ import annotations

import io

import librosa
import numpy as np
import pytest
import soundfile as sf

from ser_ray.audio.decode import AudioError, decode_audio, fix_length, load_clip
from ser_ray.features import FeatureConfig, FeatureExtractor

SR = 16_000
# Same waveform in, same log-mel out: torch vs librosa differ only by float32 rounding.
DB_TOL = 1e-2


def seed_logmel(y: np.ndarray) -> np.ndarray:
    mel = librosa.feature.melspectrogram(y=y, sr=SR, n_fft=2048, hop_length=512, n_mels=128)
    return librosa.power_to_db(mel, ref=1.0, top_db=80)


def sample_waves() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(3 * SR) / SR
    return {
        "noise": (0.1 * rng.standard_normal(3 * SR)).astype(np.float32),
        "tone": (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def emodb_wave(emodb_root) -> np.ndarray:
    """A real EmoDB clip (22.05 kHz on disk) as the extractor's fixed 3 s window at 16 kHz."""
    path = sorted(emodb_root.glob("*.wav"))[0]
    return fix_length(load_clip(str(path), SR), 3 * SR)


def test_logmel_matches_librosa_on_tone_noise_and_speech(emodb_wave):
    extractor = FeatureExtractor(FeatureConfig())
    waves = {**sample_waves(), "emodb": emodb_wave}
    for name, y in waves.items():
        ours = extractor(y[None])[0]
        assert ours.shape == (128, 94) == FeatureConfig().shape
        assert ours.dtype == np.float32
        diff = np.abs(ours - seed_logmel(y)).max()
        assert diff < DB_TOL, f"{name}: max |ours - librosa| = {diff:.4f} dB"


def test_whole_chain_close_to_seed_librosa_load(emodb_root):
    """From the file: our decode + torchaudio resample vs librosa.load(sr=16000) (soxr_hq).

    The resamplers differ only near Nyquist, so the bands below ~7 kHz agree within 1 dB.
    """
    path = str(sorted(emodb_root.glob("*.wav"))[1])
    y, _ = librosa.load(path, sr=SR)
    seed = seed_logmel(librosa.util.fix_length(y, size=3 * SR))
    ours = FeatureExtractor(FeatureConfig())(fix_length(load_clip(path, SR), 3 * SR)[None])[0]
    diff = np.abs(ours - seed)
    assert diff.mean() < 0.2
    assert diff[:120].max() < 1.0


def test_mfcc_matches_librosa():
    config = FeatureConfig(kind="mfcc")
    extractor = FeatureExtractor(config)
    for name, y in sample_waves().items():
        ours = extractor(y[None])[0]
        ref = librosa.feature.mfcc(y=y, sr=SR, n_mfcc=40, n_fft=2048, hop_length=512, n_mels=128)
        assert ours.shape == ref.shape == config.shape == (40, 94)
        # MFCCs reach a few hundred; compare relative to their scale.
        assert np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max() + 1e-3, name


def test_zcr_energy_matches_librosa():
    config = FeatureConfig(kind="zcr_energy")
    extractor = FeatureExtractor(config)
    for name, y in sample_waves().items():
        ours = extractor(y[None])[0]
        zcr = librosa.feature.zero_crossing_rate(y, frame_length=2048, hop_length=512)[0]
        rms = librosa.feature.rms(y=y, frame_length=2048, hop_length=512)[0]
        assert ours.shape == config.shape == (2, 94)
        # ZCR differs by at most one crossing per frame (librosa counts signs of exact zeros differently).
        assert np.abs(ours[0] - zcr).max() <= 1.5 / 2048, name
        assert np.abs(ours[1] - rms).max() < 1e-5, name


def test_waveform_kind_is_the_window_itself():
    config = FeatureConfig(kind="waveform")
    y = sample_waves()["tone"]
    out = FeatureExtractor(config)(y[None])
    assert out.shape == (1, 1, 48_000) and config.shape == (1, 48_000)
    np.testing.assert_array_equal(out[0, 0], y)


def test_features_do_not_depend_on_the_batch():
    extractor = FeatureExtractor(FeatureConfig())
    quiet = 0.001 * sample_waves()["noise"]
    loud = 0.9 * sample_waves()["tone"]
    alone = extractor(quiet[None])[0]
    in_batch = extractor(np.stack([loud, quiet, loud]))[1]
    np.testing.assert_allclose(in_batch, alone, atol=1e-3)


def test_prepare_wave_downmixes_resamples_and_pads():
    extractor = FeatureExtractor(FeatureConfig())
    stereo = np.stack([np.ones(44_100, np.float32), np.zeros(44_100, np.float32)]) * 0.5  # 1 s at 44.1 kHz
    wave = extractor.prepare_wave(stereo, 44_100)
    assert wave.shape == (48_000,) and wave.dtype == np.float32
    assert abs(float(wave[8_000]) - 0.25) < 1e-3  # mono mean of 0.5 and 0, middle of the 1 s
    assert np.all(wave[16_100:] == 0)  # zero-padded after the clip's 1 s


# -- decoding ----------------------------------------------------------------------------------


def encode(audio: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, sr, format=fmt, subtype=subtype)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "fmt, subtype, sr, channels, tol",
    [
        ("WAV", "PCM_16", 16_000, 1, 1e-4),
        ("WAV", "PCM_16", 44_100, 2, 1e-4),  # stereo, 44.1 kHz
        ("WAV", "PCM_U8", 16_000, 1, 1e-2),  # 8-bit
        ("WAV", "FLOAT", 22_050, 1, 1e-7),
        ("FLAC", "PCM_16", 16_000, 2, 1e-4),
        ("OGG", "VORBIS", 44_100, 1, 0.1),  # lossy
    ],
)
def test_decode_formats(fmt, subtype, sr, channels, tol):
    t = np.arange(sr // 2) / sr
    mono = 0.5 * np.sin(2 * np.pi * 440 * t)
    audio = np.stack([mono] * channels, axis=1)
    decoded, got_sr = decode_audio(encode(audio, sr, fmt, subtype), f"clip.{fmt.lower()}")
    assert got_sr == sr
    assert decoded.dtype == np.float32 and decoded.shape[0] == channels
    n = min(decoded.shape[1], len(mono))
    assert abs(decoded.shape[1] - len(mono)) < 0.01 * len(mono)
    assert np.abs(decoded[0, :n] - mono[:n]).mean() < tol


@pytest.mark.parametrize(
    "data, cause",
    [(b"", "empty"), (b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 4, "not a readable audio file")],
)
def test_bad_bytes_raise_audio_error_naming_the_file(data, cause):
    with pytest.raises(AudioError) as info:
        decode_audio(data, "speaker01/bad_clip.wav")
    message = str(info.value)
    assert message.startswith("speaker01/bad_clip.wav: ") and cause in message
    assert "BytesIO" not in message


def test_load_clip_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="nope.wav: file not found"):
        load_clip(str(missing))
