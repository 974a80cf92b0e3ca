"""ser-ray's Ray Data feature extraction vs the seed's one-process librosa loop, in one run.

    python benchmarks/features.py                  # 2,400 generated clips (16 kHz + 44.1 kHz mixed)
    python benchmarks/features.py --root DIR       # your WAVs instead
    python benchmarks/features.py --compare        # also: tasks vs actor pool, batch sizes

The seed: ``librosa.load(path, sr=16000)`` (soxr_hq resampling), ``librosa.util.fix_length`` to 3 s,
``librosa.feature.melspectrogram(n_mels=128, n_fft=2048, hop_length=512)``, ``power_to_db``.
ser-ray: ``prepare()`` (read, decode, torchaudio resample, batched torch log-mel, write Parquet).
Ray start-up (``ray.init`` + first tasks importing torch) is reported apart from steady-state.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import soundfile as sf

SR_SEED = 16_000


def speech_like(rng: np.random.Generator, seconds: float, sr: int) -> np.ndarray:
    """Noise through a few moving resonances, gated by a ~4 Hz syllable envelope; float32 in [-1, 1]."""
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = rng.uniform(90, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0, None) ** 2
    audio = envelope * voiced + 0.05 * rng.standard_normal(n)
    return (0.3 * audio / np.abs(audio).max()).astype(np.float32)


def generate_wavs(out_dir: str, n: int, seconds: float = 2.5, rates=(16_000, 44_100),
                  unique: int = 200, seed: int = 0) -> list[str]:
    """``n`` mono PCM-16 WAV files, cycling through ``rates`` so resampling counts.

    Only ``unique`` distinct clips are synthesised (synthesis is slower than extraction); the rest
    are byte copies under their own names, which costs the pipeline exactly as much per file.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    blobs = []
    for i in range(min(n, unique)):
        sr = rates[i % len(rates)]
        buffer = io.BytesIO()
        sf.write(buffer, speech_like(rng, seconds * rng.uniform(0.8, 1.3), sr), sr, format="WAV", subtype="PCM_16")
        blobs.append((sr, buffer.getvalue()))
    paths = []
    for i in range(n):
        sr, blob = blobs[i % len(blobs)]
        path = os.path.join(out_dir, f"clip{i:05d}_{sr}.wav")
        with open(path, "wb") as f:
            f.write(blob)
        paths.append(path)
    return paths


def manifest_for(paths: list[str]) -> pd.DataFrame:
    """A minimal manifest (the contract's columns, placeholder labels) for a list of files."""
    info = [sf.info(p) for p in paths]
    return pd.DataFrame({
        "path": paths,
        "corpus": "synthetic",
        "speaker": [f"synthetic:{i % 91:04d}" for i in range(len(paths))],
        "gender": "unknown",
        "sentence": "bench",
        "emotion": "neutral",
        "intensity": "XX",
        "duration_s": [i.duration for i in info],
        "sample_rate": [i.samplerate for i in info],
    })


def seed_features(path: str) -> np.ndarray:
    import librosa

    y, _ = librosa.load(path, sr=SR_SEED)
    y = librosa.util.fix_length(y, size=3 * SR_SEED)
    mel = librosa.feature.melspectrogram(y=y, sr=SR_SEED, n_mels=128, n_fft=2048, hop_length=512)
    return librosa.power_to_db(mel)


def breakdown(paths: list[str], batch_size: int) -> None:
    """Where a clip's time goes, in this process on one core, seed vs ser-ray (ms per clip)."""
    import librosa
    import torch

    from ser_ray import storage
    from ser_ray.audio.decode import decode_audio, fix_length, resample, to_mono
    from ser_ray.features import FeatureConfig, FeatureExtractor

    torch.set_num_threads(1)  # what one Ray worker gets (OMP_NUM_THREADS=1)
    extractor = FeatureExtractor(FeatureConfig())
    t = {k: 0.0 for k in ("read", "decode", "resample_soxr_hq", "resample_torchaudio",
                          "mel_librosa", "mel_torch_batched")}
    waves = []
    resample(np.zeros(441, np.float32), 44_100, 16_000)  # kernels are cached per rate pair
    resample(np.zeros(441, np.float32), 22_050, 16_000)
    for p in paths:
        t0 = time.perf_counter()
        data = storage.read_bytes(p)
        t1 = time.perf_counter()
        audio, sr = decode_audio(data, p)
        mono = to_mono(audio)
        t2 = time.perf_counter()
        y = librosa.resample(mono, orig_sr=sr, target_sr=SR_SEED, res_type="soxr_hq")
        t3 = time.perf_counter()
        wave = fix_length(resample(mono, sr, SR_SEED), 3 * SR_SEED)
        t4 = time.perf_counter()
        librosa.power_to_db(librosa.feature.melspectrogram(
            y=librosa.util.fix_length(y, size=3 * SR_SEED), sr=SR_SEED, n_mels=128, n_fft=2048, hop_length=512))
        t5 = time.perf_counter()
        waves.append(wave)
        for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            t[k] += dt
    stacked = np.stack(waves)
    extractor(stacked[:batch_size])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(stacked), batch_size):
        extractor(stacked[i:i + batch_size])
    t["mel_torch_batched"] = time.perf_counter() - t0
    n = len(paths)
    print(f"\nper-clip breakdown over {n} clips, one core (ms/clip):")
    for k, v in t.items():
        print(f"  {k:<22s} {1000 * v / n:7.2f}")
    seed = t["read"] + t["decode"] + t["resample_soxr_hq"] + t["mel_librosa"]
    ours = t["read"] + t["decode"] + t["resample_torchaudio"] + t["mel_torch_batched"]
    print(f"  {'seed total':<22s} {1000 * seed / n:7.2f}   (read+decode+soxr_hq+librosa mel)")
    print(f"  {'ser-ray total':<22s} {1000 * ours / n:7.2f}   (read+decode+torchaudio+torch mel, batch {batch_size})")


def run_prepare(manifest, root, batch_size, strategy):
    from ser_ray.features.pipeline import prepare

    t0 = time.perf_counter()
    info = prepare(manifest, root, batch_size=batch_size, strategy=strategy, progress=False)
    dt = time.perf_counter() - t0
    assert info.n_ok == len(manifest) and not info.reused, info
    return dt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="directory of WAV files (default: generate --n clips)")
    parser.add_argument("--n", type=int, default=2400, help="clips to generate when no --root")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--strategy", choices=["tasks", "actors"], default="tasks")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--breakdown-n", type=int, default=200, help="clips in the in-process breakdown")
    parser.add_argument("--compare", action="store_true", help="also time tasks vs actors and batch sizes")
    parser.add_argument("--no-seed", action="store_true", help="skip the seed loop (with --compare)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the in-process breakdown")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="ser-ray-bench-")
    try:
        if args.root:
            paths = sorted(glob.glob(os.path.join(args.root, "**", "*.wav"), recursive=True))
        else:
            t0 = time.perf_counter()
            paths = generate_wavs(os.path.join(work, "wavs"), args.n)
            print(f"generated {len(paths)} clips (16 kHz + 44.1 kHz, 2-3.3 s) in {time.perf_counter() - t0:.1f} s")
        if not paths:
            print(f"no .wav files under {args.root}", file=sys.stderr)
            return 2
        manifest = manifest_for(paths)
        rates = manifest["sample_rate"].value_counts().to_dict()
        print(f"{len(paths)} clips, sample rates {rates}, {manifest['duration_s'].sum() / 60:.1f} min of audio")

        # --- the seed: one process, librosa ---------------------------------------------------
        seed_rate = float("nan")
        if not args.no_seed:
            import librosa  # noqa: F401  (import time is not the seed's per-clip cost)

            seed_features(paths[0])
            t0 = time.perf_counter()
            for p in paths:
                seed_features(p)
            seed_s = time.perf_counter() - t0
            seed_rate = len(paths) / seed_s
            print(f"\nseed (1 process, librosa): {seed_s:7.1f} s  {seed_rate:7.1f} clips/s")

        # --- ser-ray: Ray Data ------------------------------------------------------------
        import ray

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t0
        # Warm-up on a different small manifest: starts the workers and imports torch in them.
        warm = manifest.iloc[: 2 * args.num_cpus].copy()
        warm_s = run_prepare(warm, os.path.join(work, "cache-warm"), args.batch_size, args.strategy)
        run_s = run_prepare(manifest, os.path.join(work, "cache"), args.batch_size, args.strategy)
        rate = len(paths) / run_s
        print(f"ser-ray start-up: ray.init {init_s:.1f} s + first tiny prepare {warm_s:.1f} s (workers import torch)")
        print(f"ser-ray (Ray Data, {args.num_cpus} CPUs, {args.strategy}, batch {args.batch_size}): "
              f"{run_s:7.1f} s  {rate:7.1f} clips/s  (steady state, includes Parquet write)")
        cold = len(paths) / (init_s + warm_s + run_s)
        print(f"ratio ser-ray / seed: {rate / seed_rate:.2f}x steady state, {cold / seed_rate:.2f}x including start-up")

        if args.compare:
            print("\nstrategy x batch size (same clips, fresh cache each):")
            for strategy in ("tasks", "actors"):
                for bs in (16, 64, 256):
                    dt = run_prepare(manifest, os.path.join(work, f"cache-{strategy}-{bs}"), bs, strategy)
                    print(f"  {strategy:<6s} batch {bs:>3d}: {dt:6.1f} s  {len(paths) / dt:7.1f} clips/s")
        ray.shutdown()

        if not args.no_breakdown:
            step = max(1, len(paths) // args.breakdown_n)
            breakdown(paths[::step][: args.breakdown_n], args.batch_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
