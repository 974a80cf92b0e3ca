"""Peak memory of annotating one long recording: a 2-hour WAV vs a 10-minute WAV.

Each length runs ``annotate_file`` with a CNN bundle in a fresh child process that reports its peak
RSS (``ru_maxrss``), so the numbers do not mix. Streaming keeps the peak flat: the 2-hour file's
decoded audio alone (float32) would be 460 MB.

    python benchmarks/long_file_memory.py [--minutes 120]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16_000


def write_long(path: Path, minutes: float) -> None:
    """A long 16 kHz PCM_16 recording written 60 s at a time (the generator is bounded too)."""
    rng = np.random.default_rng(0)
    t = np.arange(60 * SR) / SR
    with sf.SoundFile(path, "w", samplerate=SR, channels=1, subtype="PCM_16") as f:
        for k in range(int(np.ceil(minutes))):
            x = 0.1 * np.sin(2 * np.pi * (110 + k % 50) * t) + 0.02 * rng.standard_normal(len(t))
            f.write(x[: int(min(60, (minutes - k) * 60) * SR)].astype(np.float32))


def child(path: str, bundle_dir: str) -> None:
    import torch

    from ser_ray.annotate.core import AnnotateConfig, annotate_file
    from ser_ray.ensemble import load_bundle

    torch.set_num_threads(2)
    bundle = load_bundle(bundle_dir)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    row, segs = annotate_file(path, bundle.predict_proba, AnnotateConfig(hop_s=3.0, batch_size=64))
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"status": row["status"], "error": row["error"], "duration_s": row["duration_s"],
                      "n_windows": row["n_windows"], "wall_s": wall, "rss_after_load_mb": before / 1024,
                      "peak_rss_mb": peak / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=120.0)
    parser.add_argument("--baseline-minutes", type=float, default=10.0)
    parser.add_argument("--child", nargs=2, metavar=("WAV", "BUNDLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    import torch

    from ser_ray.ensemble import Bundle, Member, save_bundle
    from ser_ray.features.config import FeatureConfig
    from ser_ray.models import build_model

    work = Path(tempfile.mkdtemp(prefix="ser-ray-longmem-"))
    torch.manual_seed(0)
    fc = FeatureConfig()
    labels = ["anger", "disgust", "fear", "happiness", "neutral", "sadness"]
    bundle_dir = save_bundle(Bundle(labels, [Member("cnn", build_model("cnn", 6, fc).eval(), fc)]), str(work / "bundle"))
    results = {}
    # the baseline is long enough to fill whole batches: activations of a full batch are part of the peak
    for minutes in (args.baseline_minutes, args.minutes):
        wav = work / f"long_{minutes:g}min.wav"
        write_long(wav, minutes)
        out = subprocess.run([sys.executable, __file__, "--child", str(wav), bundle_dir], capture_output=True, text=True, check=True)
        results[minutes] = r = json.loads(out.stdout.strip().splitlines()[-1])
        decoded_mb = minutes * 60 * SR * 4 / 1024**2
        print(f"{minutes:6g} min ({wav.stat().st_size / 1024**2:6.0f} MB on disk, {decoded_mb:6.0f} MB decoded): "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB (after model load {r['rss_after_load_mb']:.0f} MB), "
              f"{r['n_windows']} windows in {r['wall_s']:.0f} s, status {r['status']}")
        wav.unlink()
    short, long = results[args.baseline_minutes], results[args.minutes]
    print(f"peak RSS growth from {args.baseline_minutes:g} min to {args.minutes:g} min: {long['peak_rss_mb'] - short['peak_rss_mb']:+.0f} MB")


if __name__ == "__main__":
    main()
