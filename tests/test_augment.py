"""Training augmentation: masks land where they should, noise hits its SNR, seeds reproduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from ser_ray.audio.augment import (
    Augmenter,
    add_noise_snr,
    random_gain,
    spec_augment,
    time_shift,
)


def tone(n_clips: int = 4, samples: int = 16_000) -> torch.Tensor:
    t = torch.arange(samples) / 16_000
    freqs = torch.linspace(200, 800, n_clips)[:, None]
    return 0.3 * torch.sin(2 * torch.pi * freqs * t)  # [B, samples]


def test_spec_augment_masks_whole_bands_and_whole_spans_only():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(8, 32, 60) * 5 - 30
    out = spec_augment(feats, freq_mask=6, time_mask=10, n_masks=1, generator=g)
    assert out.shape == feats.shape
    changed = out != feats
    assert changed.any()
    for i in range(8):
        rows = changed[i].all(dim=1)  # mel bands masked over all frames
        cols = changed[i].all(dim=0)  # frames masked over all bands
        # every changed cell lies in a fully masked band or a fully masked time span
        assert torch.equal(changed[i], rows[:, None] | cols[None, :])
        assert rows.sum() <= 6 and cols.sum() <= 10
        for mask in (rows, cols):  # each mask is one contiguous run
            idx = torch.nonzero(mask).flatten()
            if len(idx):
                assert idx[-1] - idx[0] + 1 == len(idx)
        torch.testing.assert_close(out[i][changed[i]], feats[i].mean().expand(int(changed[i].sum())))


def test_spec_augment_can_mask_one_axis_only():
    feats = torch.randn(4, 16, 40)
    out = spec_augment(feats, freq_mask=0, time_mask=8, generator=torch.Generator().manual_seed(1))
    changed = out != feats
    assert changed.any() and torch.equal(changed, changed.all(dim=1, keepdim=True).expand_as(changed))


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
def test_noise_reaches_the_requested_snr(snr_db):
    clean = tone()
    noisy = add_noise_snr(clean, (snr_db, snr_db), torch.Generator().manual_seed(2))
    noise = noisy - clean
    measured = 10 * torch.log10(clean.pow(2).mean(-1) / noise.pow(2).mean(-1))
    assert torch.allclose(measured, torch.full_like(measured, snr_db), atol=0.5)


def test_gain_and_shift_keep_shape_and_content():
    waves = tone().unsqueeze(1)  # [B, 1, samples]
    g = torch.Generator().manual_seed(3)
    louder = random_gain(waves, (6.0, 6.0), g)
    torch.testing.assert_close(louder, waves * 10 ** (6 / 20))
    shifted = time_shift(waves, 0.1, g)
    assert shifted.shape == waves.shape
    # a circular shift keeps every sample, just moves it
    torch.testing.assert_close(shifted.sort(-1).values, waves.sort(-1).values)


def test_augmenter_is_deterministic_with_a_seed_and_varies_without():
    feats = torch.randn(6, 32, 50)
    a, b, c = Augmenter(p=1.0, seed=7), Augmenter(p=1.0, seed=7), Augmenter(p=1.0, seed=8)
    out_a, out_b, out_c = a(feats), b(feats), c(feats)
    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a, out_c)
    assert not torch.equal(a(feats), out_a)  # a new draw on the next batch
    assert torch.equal(feats, Augmenter(p=0.0)(feats))  # p=0: untouched


def test_augmenter_on_waveforms_adds_noise_and_reads_yaml_lists():
    waves = tone().unsqueeze(1)
    aug = Augmenter(p=1.0, noise_snr_db=[20, 20], gain_db=None, time_shift=0.0, seed=1)
    out = aug(waves)
    assert out.shape == waves.shape and not torch.equal(out, waves)
    snr = 10 * torch.log10(waves.pow(2).mean(-1) / (out - waves).pow(2).mean(-1))
    assert torch.allclose(snr, torch.full_like(snr, 20.0), atol=0.5)
    with pytest.raises(ValueError, match="gain_db"):
        Augmenter(gain_db=[6, -6])


def test_speed_copy_lowers_pitch_and_lengthens_the_clip():
    from ser_ray.features.config import FeatureConfig
    from ser_ray.features.extractor import FeatureExtractor

    wave = tone(1)[0].numpy()  # 200 Hz, 1 s
    slow = FeatureExtractor(FeatureConfig(kind="waveform", window_s=2.0, speed=0.8)).prepare_wave(wave, 16_000)
    nonzero = np.flatnonzero(slow)
    assert abs(len(nonzero) - 16_000 / 0.8) < 50  # 1.25 s of sound in the 2 s window
    body = slow[: nonzero[-1] + 1]
    peak_hz = np.argmax(np.abs(np.fft.rfft(body))) * 16_000 / len(body)
    assert abs(peak_hz - 160) < 3  # 200 Hz played at 0.8 speed
    same = FeatureExtractor(FeatureConfig(kind="waveform", window_s=2.0)).prepare_wave(wave, 16_000)
    assert np.allclose(same[:16_000], wave, atol=1e-6) and not same[16_000:].any()
    with pytest.raises(ValueError, match="speed"):
        FeatureConfig(speed=3.0)
    assert FeatureConfig(speed=1.0).key() != FeatureConfig(speed=0.9).key()
    from ser_ray.train.config import DataSpec

    assert DataSpec(speed_perturb=["0.9", 1.1]).speed_perturb == [0.9, 1.1]
    for bad in ([1.0], [0.3]):  # the originals are always used; beyond 0.5-2 is not speech
        with pytest.raises(ValueError, match="speed_perturb"):
            DataSpec(speed_perturb=bad)
