"""Energy VAD vs Silero VAD on the synthetic archive with noise added.

For each method and noise level, every window (``--window-s``, hop half of it) of every recording is
called speech or not and compared with ``timeline.csv`` (a window is speech when the span it overlaps
most is not ``silence``): agreement, speech recall and non-speech recall. With ``--bundle``, the
speech windows are also labelled and scored (window accuracy). Noise is white, at the given SNR
relative to each file's speech level.

    python benchmarks/vad.py [--files 6] [--snr 20 10 0] [--bundle DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=6)
    parser.add_argument("--snr", type=float, nargs="+", default=[20.0, 10.0, 0.0], help="dB; inf for clean")
    parser.add_argument("--window-s", type=float, default=3.0)
    parser.add_argument("--bundle", default=None, help="also label the speech windows with this bundle")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from ser_ray.annotate.accuracy import window_accuracy, window_truth
    from ser_ray.annotate.vad import is_speech
    from ser_ray.annotate.windows import iter_windows
    from ser_ray.corpora import synthetic

    out = Path(args.out or tempfile.mkdtemp(prefix="ser-ray-vad-"))
    archive = out / "archive"
    if not (archive / "timeline.csv").exists():
        synthetic.generate_archive(archive, files=args.files, seed=3, min_s=30.0, max_s=60.0, progress=False)
    timeline = pd.read_csv(archive / "timeline.csv")
    bundle = None
    if args.bundle:
        from ser_ray.ensemble.bundle import load_bundle

        bundle = load_bundle(args.bundle)
    rng = np.random.default_rng(0)
    rows = []
    for snr in args.snr:
        noisy = out / f"snr{snr:g}"
        noisy.mkdir(exist_ok=True)
        for path in sorted(archive.glob("*.wav")):
            audio, sr = sf.read(path, dtype="float32")
            speech = audio[np.abs(audio) > 1e-4]
            level = float(np.sqrt(np.mean(speech**2))) if len(speech) else 0.1
            noise = rng.standard_normal(len(audio)).astype(np.float32) * level * 10 ** (-snr / 20) if np.isfinite(snr) else 0
            sf.write(noisy / path.name, np.clip(audio + noise, -1, 1), sr)
        for method in ("energy", "silero"):
            windows, decisions, waves = [], [], []
            start = time.perf_counter()
            for path in sorted(noisy.glob("*.wav")):
                with sf.SoundFile(path) as f:
                    for s, e, wave in iter_windows(f, args.window_s, args.window_s / 2, 16_000, name=path.name):
                        real = wave[: max(1, int(round((e - s) * 16_000)))]
                        windows.append({"uri": path.name, "start_s": s, "end_s": e})
                        decisions.append(is_speech(real, method))
                        waves.append(wave)
            vad_s = time.perf_counter() - start
            frame = pd.DataFrame(windows)
            truth = window_truth(frame, timeline).notna().to_numpy()
            said = np.array(decisions)
            row = {"SNR dB": snr, "VAD": method, "windows": len(frame),
                   "agreement": float((said == truth).mean()),
                   "speech recall": float(said[truth].mean()) if truth.any() else float("nan"),
                   "non-speech recall": float((~said[~truth]).mean()) if (~truth).any() else float("nan"),
                   "VAD ms/window": 1000 * vad_s / max(len(frame), 1)}
            if bundle is not None and said.any():
                kept = frame[said].reset_index(drop=True)
                probs = bundle.predict_proba(np.stack([w for w, k in zip(waves, said) if k]))
                kept["label"] = np.asarray(bundle.labels)[probs.argmax(1)]
                row["window accuracy"] = window_accuracy(kept, timeline)
            rows.append(row)
            print(row, flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "vad.csv", index=False)
    print()
    print("| " + " | ".join(table.columns) + " |")
    print("|" + "---|" * len(table.columns))
    for record in table.to_dict("records"):
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in record.values()) + " |")


if __name__ == "__main__":
    main()
