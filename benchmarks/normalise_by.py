"""Window accuracy on the synthetic archive: a bundle trained without feature normalisation, annotated
per window (``normalise_by: none``), against one trained on speaker-normalised features, annotated
with each recording's own statistics (``normalise_by: file``).

Both bundles hold the same family (default ``logreg`` on utterance functionals) trained by ``ser-ray
cv`` on the same speakers of a synthetic corpus (protocol ``fixed``: validation and test actors held
out), so the only difference is the normalisation. The archive's recordings are other synthetic
speakers; to mimic recording set-ups, each file is also annotated at a random gain (-20..+10 dB).

    python benchmarks/normalise_by.py [--actors 16] [--files 8] [--family logreg] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actors", type=int, default=16)
    parser.add_argument("--files", type=int, default=8, help="archive recordings")
    parser.add_argument("--family", default="logreg")
    parser.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()

    import ray

    from ser_ray.annotate import AnnotateConfig, annotate_file
    from ser_ray.annotate.accuracy import window_accuracy
    from ser_ray.corpora import synthetic
    from ser_ray.corpora.labels import apply_label_map
    from ser_ray.ensemble.bundle import load_bundle, save_bundle
    from ser_ray.ensemble.fit import fit_bundle_from_dirs
    from ser_ray.train.config import TrainConfig
    from ser_ray.train.cv import run_cv
    from ser_ray.train.data import assign_folds, fold_frames, load_manifest

    out = Path(args.out or tempfile.mkdtemp(prefix="ser-ray-normalise-"))
    corpus, archive = out / "corpus", out / "archive"
    if not (out / "corpus.done").exists():
        synthetic.generate(corpus, actors=args.actors, seed=0, workers=2, progress=False)
        (out / "corpus.done").write_text("ok")
    if not (archive / "timeline.csv").exists():
        synthetic.generate_archive(archive, files=args.files, seed=1, min_s=30.0, max_s=60.0, progress=False)
    timeline = pd.read_csv(archive / "timeline.csv")

    # the archive again at a random gain per file: one more recording set-up per speaker
    rng = np.random.default_rng(0)
    gained = out / "archive-gain"
    gained.mkdir(exist_ok=True)
    for path in sorted(archive.glob("*.wav")):
        audio, sr = sf.read(path, dtype="float32")
        gain = 10 ** (rng.uniform(-20.0, 10.0) / 20)
        sf.write(gained / path.name, np.clip(audio * gain, -1, 1), sr)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for mode in ("none", "speaker"):
        config = TrainConfig.from_dict({"family": args.family, "seed": 0, "label_map": "six",
                                        "data": {"corpus": "synthetic", "root": str(corpus), "protocol": "fixed",
                                                 "normalise_by": mode, "cache_root": str(out / "cache")}})
        result = out / f"cv-{mode}"
        summary = run_cv(config, result)
        manifest = apply_label_map(load_manifest(config), "six")
        manifest, _ = assign_folds(manifest, "fixed", 5, 0)
        _, val_df, test_df = fold_frames(manifest, "fixed", 0, 0.15, 0)
        bundle, report = fit_bundle_from_dirs([str(result / "fold_0" / "model")], val_df, test_df)
        save_bundle(bundle, str(out / f"bundle-{mode}"))
        bundle = load_bundle(str(out / f"bundle-{mode}"))
        annotate = AnnotateConfig(window_s=bundle.window_s, hop_s=bundle.window_s / 2)
        for name, root in (("archive", archive), ("archive at random gain", gained)):
            start = time.perf_counter()
            segments = []
            for path in sorted(root.glob("*.wav")):
                row, segs = annotate_file(str(path), bundle.predict_proba, annotate)
                assert row["status"] == "ok", row
                segments += [{**s, "file": path.name} for s in segs]
            seconds = time.perf_counter() - start
            frame = pd.DataFrame(segments)
            frame["uri"] = frame["file"]
            rows.append({
                "trained with": f"normalise_by: {mode}",
                "annotated with": f"normalise_by: {row['normalise_by']}",
                "input": name,
                "test UA (corpus, held-out actors)": summary["ua"]["mean"],
                "window accuracy": window_accuracy(frame, timeline),
                "windows": len(frame),
                "seconds": round(seconds, 1),
            })
            print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    print()
    print("| " + " | ".join(table.columns) + " |")
    print("|" + "---|" * len(table.columns))
    for record in table.to_dict("records"):
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in record.values()) + " |")
    table.to_csv(out / "normalise_by.csv", index=False)
    ray.shutdown()


if __name__ == "__main__":
    main()
