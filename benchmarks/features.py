"""ser-ray's feature extraction (`prepare`) vs the seed's one-process librosa loop, in one run.

    python benchmarks/features.py                  # 1,440 generated clips, 48 kHz, ~3.7 s (RAVDESS-shaped)
    python benchmarks/features.py --root DIR       # your WAVs instead
    python benchmarks/features.py --compare        # also: Ray Data tasks vs actor pool, batch sizes

The seed: ``librosa.load(path, sr=16000)`` (soxr_hq resampling), ``librosa.util.fix_length`` to 3 s,
``librosa.feature.melspectrogram(n_mels=128, n_fft=2048, hop_length=512)``, ``power_to_db``.
ser-ray: ``prepare()`` (read, decode, soxr resample, batched torch log-mel, write Parquet).

Three measurements, each with its baseline from the same run:
1. whole process: ``ser-ray prepare`` as a user runs it vs the seed loop as a script (imports
   included), alternated, ``--repeats`` each, medians;
2. steady state in this process: the seed loop warm (librosa imported, first clip done) vs each
   ``prepare`` strategy's marginal rate, N / (time for 2N clips - time for N clips), which cancels
   fixed costs (worker start, Ray Data planning, the cache's own bookkeeping);
3. a per-clip breakdown on one core.
Run it on a quiet machine: the baseline shares the cores with anything else running.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import shutil
import statistics
import subprocess
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


def generate_wavs(out_dir: str, n: int, seconds: float = 3.7, rates=(48_000,),
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
        sf.write(buffer, speech_like(rng, seconds * rng.uniform(0.85, 1.15), sr), sr, format="WAV", subtype="PCM_16")
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


SEED_SCRIPT = """
import sys
import librosa
for path in open(sys.argv[1]).read().split():
    y, _ = librosa.load(path, sr=16000)
    y = librosa.util.fix_length(y, size=3 * 16000)
    librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=16000, n_mels=128, n_fft=2048, hop_length=512))
"""


def whole_process(paths: list[str], manifest_path: str, work: str, repeats: int) -> tuple[float, float]:
    """Median wall seconds of the seed script and of `ser-ray prepare`, each a fresh process, alternated."""
    list_path = os.path.join(work, "paths.txt")
    with open(list_path, "w") as f:
        f.write("\n".join(paths))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_ID")}
    seed, ours = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", SEED_SCRIPT, list_path], check=True, env=env)
        seed.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ser_ray.cli", "prepare", "--manifest", manifest_path,
                        "--out", os.path.join(work, f"cache-cli-{i}"), "--no-progress"],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ours.append(time.perf_counter() - t0)
        print(f"  run {i + 1}: seed script {seed[-1]:5.2f} s   ser-ray prepare {ours[-1]:5.2f} s")
    return statistics.median(seed), statistics.median(ours)


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
    t = {k: 0.0 for k in ("read", "decode", "resample_librosa", "resample_ser_ray",
                          "mel_librosa", "mel_torch_batched")}
    waves = []
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
    seed = t["read"] + t["decode"] + t["resample_librosa"] + t["mel_librosa"]
    ours = t["read"] + t["decode"] + t["resample_ser_ray"] + t["mel_torch_batched"]
    print(f"  {'seed total':<22s} {1000 * seed / n:7.2f}   (read+decode+librosa soxr_hq+librosa mel)")
    print(f"  {'ser-ray total':<22s} {1000 * ours / n:7.2f}   (read+decode+soxr HQ+torch mel, batch {batch_size})")


def _cpus() -> int:
    from ser_ray.features.pipeline import _local_cpus

    return _local_cpus()


def run_prepare(manifest, root, batch_size, strategy):
    from ser_ray.features.pipeline import prepare

    t0 = time.perf_counter()
    info = prepare(manifest, root, batch_size=batch_size, strategy=strategy, progress=False)
    dt = time.perf_counter() - t0
    assert info.n_ok == len(manifest) and not info.reused, info
    return dt


def marginal_rate(manifest, root, batch_size, strategy) -> tuple[float, float, float]:
    """(seconds for N, seconds for 2N, N / difference): the rate once fixed costs are paid."""
    one = run_prepare(manifest, root + "-1", batch_size, strategy)
    two = run_prepare(pd.concat([manifest, manifest], ignore_index=True), root + "-2", batch_size, strategy)
    return one, two, len(manifest) / max(two - one, 1e-9)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="directory of WAV files (default: generate --n clips)")
    parser.add_argument("--n", type=int, default=1440, help="clips to generate when no --root")
    parser.add_argument("--rates", default="48000", help="comma-separated sample rates of the generated clips")
    parser.add_argument("--seconds", type=float, default=3.7, help="mean length of a generated clip")
    parser.add_argument("--repeats", type=int, default=3, help="whole-process runs of each (0: skip)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--breakdown-n", type=int, default=200, help="clips in the in-process breakdown")
    parser.add_argument("--compare", action="store_true", help="also time tasks vs actors and batch sizes")
    parser.add_argument("--no-seed", action="store_true", help="skip the seed loop and the whole-process runs")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the in-process breakdown")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="ser-ray-bench-")
    try:
        if args.root:
            paths = sorted(glob.glob(os.path.join(args.root, "**", "*.wav"), recursive=True))
        else:
            t0 = time.perf_counter()
            rates = tuple(int(r) for r in args.rates.split(","))
            paths = generate_wavs(os.path.join(work, "wavs"), args.n, args.seconds, rates)
            print(f"generated {len(paths)} clips ({args.rates} Hz, ~{args.seconds} s) in {time.perf_counter() - t0:.1f} s")
        if not paths:
            print(f"no .wav files under {args.root}", file=sys.stderr)
            return 2
        manifest = manifest_for(paths)
        rates = manifest["sample_rate"].value_counts().to_dict()
        print(f"{len(paths)} clips, sample rates {rates}, {manifest['duration_s'].sum() / 60:.1f} min of audio")

        manifest_path = os.path.join(work, "manifest.csv")
        manifest.to_csv(manifest_path, index=False)

        # --- 1. whole process, as a user runs each -----------------------------------------------
        if not args.no_seed and args.repeats:
            print(f"\nwhole process, {len(paths)} clips (fresh processes, alternated):")
            seed_wall, ours_wall = whole_process(paths, manifest_path, work, args.repeats)
            print(f"median: seed script {seed_wall:.2f} s ({len(paths) / seed_wall:.0f} clips/s), "
                  f"ser-ray prepare {ours_wall:.2f} s ({len(paths) / ours_wall:.0f} clips/s): "
                  f"ser-ray takes {ours_wall / seed_wall:.2f}x the seed's time")

        # --- 2. steady state in this process --------------------------------------------------------
        seed_rate = float("nan")
        seed_rates, local_rates = [], []
        print(f"\nsteady state ({max(1, args.repeats)} rounds, alternated; medians below):")
        for _ in range(max(1, args.repeats)):
            if not args.no_seed:
                import librosa  # noqa: F401  (import time is not the seed's per-clip cost)

                seed_features(paths[0])
                t0 = time.perf_counter()
                for p in paths:
                    seed_features(p)
                seed_rates.append(len(paths) / (time.perf_counter() - t0))
            one, two, rate = marginal_rate(manifest, os.path.join(work, f"cache-local-{len(local_rates)}"),
                                           args.batch_size, "local")
            local_rates.append(rate)
            print(f"  seed loop {seed_rates[-1] if seed_rates else float('nan'):6.1f} clips/s   ser-ray local: "
                  f"{len(paths)} clips {one:.2f} s, {2 * len(paths)} clips {two:.2f} s -> {rate:6.1f} clips/s")
        if seed_rates:
            seed_rate = statistics.median(seed_rates)
        rate = statistics.median(local_rates)
        print(f"seed loop (1 process, librosa, warm): {seed_rate:7.1f} clips/s")
        print(f"ser-ray local processes ({_cpus()} workers): {rate:7.1f} clips/s marginal = "
              f"{rate / seed_rate:.2f}x the seed loop")

        import ray

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t0
        # Warm-up on a different small manifest: starts the workers and imports torch in them.
        warm = manifest.iloc[: 2 * args.num_cpus].copy()
        warm_s = run_prepare(warm, os.path.join(work, "cache-warm"), args.batch_size, "tasks")
        one, two, rate = marginal_rate(manifest, os.path.join(work, "cache-tasks"), args.batch_size, "tasks")
        print(f"ser-ray Ray Data tasks ({args.num_cpus} CPUs, batch {args.batch_size}; ray.init {init_s:.1f} s + "
              f"first tiny prepare {warm_s:.1f} s before): {len(paths)} clips {one:.2f} s, {2 * len(paths)} clips "
              f"{two:.2f} s -> {rate:7.1f} clips/s marginal = {rate / seed_rate:.2f}x the seed loop")

        if args.compare:
            print("\nRay Data strategy x batch size (same clips, fresh cache each):")
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
